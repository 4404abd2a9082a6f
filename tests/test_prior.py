"""Class images: generated once by the frozen pipeline with a fast sampler, cached, topped up, never black."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from db_adapters import InputError, personalize
from db_adapters import prior as prior_module
from db_adapters.prior import cache_key, class_images
from db_adapters.testing import tiny_pipeline


def generate(pipe, tmp_path, count=3, **kwargs):
    settings = {"seed": 0, "cache_dir": tmp_path, "base_fingerprint": "fp", "num_inference_steps": 2}
    return class_images(pipe, "a dog", count, 32, **(settings | kwargs))


@pytest.fixture
def counting(monkeypatch):
    """Counts the images generated, and records the sampler and safety checker seen while generating."""
    calls = {"images": 0, "schedulers": set(), "checkers": set(), "batches": []}
    real = prior_module.generate_images

    def wrapped(pipe, prompt, seeds, resolution, **kwargs):
        calls["images"] += len(seeds)
        calls["schedulers"].add(type(pipe.scheduler).__name__)
        calls["checkers"].add(pipe.safety_checker)
        calls["batches"].append(kwargs["batch_size"])
        return real(pipe, prompt, seeds, resolution, **kwargs)

    monkeypatch.setattr(prior_module, "generate_images", wrapped)
    return calls


def test_generated_once_then_cached_and_only_missing_regenerated(tmp_path, counting):
    pipe = tiny_pipeline()
    first = generate(pipe, tmp_path, batch_size=2)
    assert len(first) == 3 and counting["images"] == 3
    again = generate(pipe, tmp_path, batch_size=2)
    assert counting["images"] == 3
    assert [list(a.getdata()) == list(b.getdata()) for a, b in zip(first, again, strict=True)] == [True] * 3
    (folder,) = tmp_path.iterdir()  # one cache folder, named by the cache key
    (folder / "class_00001.png").unlink()
    redone = generate(pipe, tmp_path, batch_size=2)
    assert counting["images"] == 4  # only the missing one
    assert list(redone[1].getdata()) == list(first[1].getdata())  # image i always comes from seed (seed, i)


def test_sampler_swapped_and_safety_checker_off_only_while_generating(tmp_path, counting):
    pipe = tiny_pipeline()
    sentinel = object()
    pipe.safety_checker = sentinel
    scheduler = pipe.scheduler
    generate(pipe, tmp_path)
    assert counting["schedulers"] == {"DPMSolverMultistepScheduler"}
    assert counting["checkers"] == {None}
    assert pipe.scheduler is scheduler and pipe.safety_checker is sentinel


def test_vae_decodes_one_image_at_a_time_while_generating_and_as_before_after(tmp_path, monkeypatch):
    pipe = tiny_pipeline()
    batches = []
    decode = pipe.vae.decoder.forward
    monkeypatch.setattr(pipe.vae.decoder, "forward", lambda z, *a, **k: batches.append(len(z)) or decode(z, *a, **k))
    generate(pipe, tmp_path, count=4, batch_size=4)
    assert batches == [1, 1, 1, 1]
    assert pipe.vae.use_slicing is False


def test_half_precision_class_images_have_their_own_cache_and_differ(tmp_path):
    pipe = tiny_pipeline()
    full = generate(pipe, tmp_path, count=2)
    half = generate(pipe, tmp_path, count=2, precision="bf16")
    assert len(list(tmp_path.iterdir())) == 2  # a second cache folder, and the first one's key unchanged
    assert (tmp_path / cache_key("fp", "a dog", 32, 2, 0, sampler="dpmsolver++", steps=2, guidance_scale=7.5)).is_dir()
    assert any(list(a.getdata()) != list(b.getdata()) for a, b in zip(full, half, strict=True))
    assert not torch.is_autocast_enabled("cpu")  # the autocast ended with the generation


def test_batching_is_configurable(tmp_path, counting):
    generate(tiny_pipeline(), tmp_path, count=5, batch_size=2)
    assert counting["batches"] == [2]  # one call, split into batches of 2 inside
    assert sorted(p.name for p in next(tmp_path.iterdir()).glob("*.png"))[-1] == "class_00004.png"


def test_cache_key_covers_every_setting():
    base = cache_key("fp", "a dog", 32, 3, 0)
    others = [
        cache_key("fp2", "a dog", 32, 3, 0),
        cache_key("fp", "a cat", 32, 3, 0),
        cache_key("fp", "a dog", 64, 3, 0),
        cache_key("fp", "a dog", 32, 4, 0),
        cache_key("fp", "a dog", 32, 3, 1),
        cache_key("fp", "a dog", 32, 3, 0, sampler="ddim"),
        cache_key("fp", "a dog", 32, 3, 0, steps=3),
        cache_key("fp", "a dog", 32, 3, 0, guidance_scale=2.0),
    ]
    assert len({base, *others}) == 9


def test_black_images_are_rejected_and_redrawn(tmp_path, monkeypatch):
    pipe = tiny_pipeline()
    real = prior_module.generate_images
    attempts = []

    def black_first(pipe, prompt, seeds, resolution, **kwargs):
        attempts.append(list(seeds))
        if len(attempts) == 1:
            return [Image.new("RGB", (resolution, resolution), "black") for _ in seeds]
        return real(pipe, prompt, seeds, resolution, **kwargs)

    monkeypatch.setattr(prior_module, "generate_images", black_first)
    images = generate(pipe, tmp_path, count=2)
    assert len(attempts) == 2 and attempts[0] != attempts[1]  # fresh seeds for the retry
    assert not any(prior_module.is_black(im) for im in images)


def test_always_black_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(
        prior_module,
        "generate_images",
        lambda pipe, prompt, seeds, res, **kw: [Image.new("RGB", (res, res)) for _ in seeds],
    )
    with pytest.raises(InputError, match="came out black"):
        generate(tiny_pipeline(), tmp_path, count=2)


def test_users_class_images_are_topped_up_with_a_message(tmp_path, counting, caplog):
    given = [Image.new("RGB", (32, 32), "blue")]
    with caplog.at_level(logging.WARNING, logger="db_adapters"):
        images = generate(tiny_pipeline(), tmp_path, count=3, given=given)
    assert len(images) == 3 and images[0] is given[0] and counting["images"] == 2
    assert "1 class images given, 3 asked for: generating the other 2" in caplog.text


def test_enough_class_images_given_means_no_generation(tmp_path, counting):
    given = [Image.new("RGB", (32, 32), c) for c in ("blue", "green", "red")]
    assert generate(tiny_pipeline(), tmp_path, count=2, given=given) == given[:2]
    assert counting["images"] == 0


def test_personalize_caches_class_images_in_output_dir(tmp_path, subject_images, counting, fast):
    personalize(tiny_pipeline(), subject_images, "dog", output_dir=tmp_path, **fast)
    personalize(tiny_pipeline(), subject_images, "dog", output_dir=tmp_path, **fast)
    assert counting["images"] == fast["num_class_images"]
    assert len(list((tmp_path / "class_images").glob("*/class_*.png"))) == fast["num_class_images"]


def test_training_noise_is_ddpm_whatever_the_inference_sampler():
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    from db_adapters.config import TrainConfig
    from db_adapters.families import family_of

    pipe = tiny_pipeline(v_prediction=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    objective = family_of(pipe).objective(pipe, TrainConfig())
    assert isinstance(objective.scheduler, DDPMScheduler)
    assert objective.scheduler.config.prediction_type == "v_prediction"
    assert objective.scheduler.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize(
    "change", [{"class_sampler": "ddim"}, {"class_inference_steps": 3}, {"class_guidance_scale": 2.0}]
)
def test_changing_how_class_images_are_sampled_makes_new_ones(change, tmp_path, subject_images, counting, fast):
    personalize(
        tiny_pipeline(), subject_images, "dog", output_dir=tmp_path / "a", class_image_dir=tmp_path / "c", **fast
    )
    assert counting["images"] == fast["num_class_images"]
    personalize(
        tiny_pipeline(), subject_images, "dog", output_dir=tmp_path / "b", class_image_dir=tmp_path / "c", **fast
    )
    assert counting["images"] == fast["num_class_images"]  # the same settings reuse the cache
    settings = {**fast, **change}
    personalize(
        tiny_pipeline(), subject_images, "dog", output_dir=tmp_path / "d", class_image_dir=tmp_path / "c", **settings
    )
    assert counting["images"] == 2 * fast["num_class_images"], change
    assert len(list((tmp_path / "c").iterdir())) == 2
