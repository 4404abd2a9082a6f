"""Several subjects in one run: one identifier each, class images per class, each image its own prompt."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner
from conftest import make_subject_images
from PIL import Image

from db_adapters import InputError, Subject, load_adapter, personalize, unload_adapter
from db_adapters.testing import tiny_pipeline


def cat_images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 40), color) for color in ("black", "gray", "orange")]


def two_subjects(**first: str) -> list[Subject]:
    return [Subject(make_subject_images(), "dog", **first), Subject(cat_images(), "cat")]


def test_each_subject_gets_its_own_identifier_and_the_file_keeps_them(tmp_path, fast):
    pipe = tiny_pipeline()
    adapter = personalize(pipe, two_subjects(), **fast)
    dog, cat = adapter.subjects
    assert dog["identifier"] != cat["identifier"]
    assert dog["instance_prompt"] == f"a {dog['identifier']} dog" and cat["class_prompt"] == "a cat"
    assert adapter.identifier == dog["identifier"] and adapter.identifiers == [dog["identifier"], cat["identifier"]]
    path = adapter.save(tmp_path / "two.safetensors")
    unload_adapter(pipe)
    assert load_adapter(pipe, path).subjects == adapter.subjects


def test_one_subject_run_chooses_the_identifier_it_always_did(fast):
    alone = personalize(tiny_pipeline(), make_subject_images(), "dog", **fast)
    first = personalize(tiny_pipeline(), two_subjects(), **fast)
    assert first.identifier == alone.identifier and len(alone.subjects) == 1


def test_a_given_identifier_is_kept_and_the_other_subject_avoids_it(fast):
    chosen = personalize(tiny_pipeline(), make_subject_images(), "cat", **fast).identifier
    subjects = [Subject(cat_images(), "cat"), Subject(make_subject_images(), "dog", chosen)]
    adapter = personalize(tiny_pipeline(), subjects, **fast)
    assert adapter.identifiers[1] == chosen and adapter.identifiers[0] != chosen


def test_every_image_is_conditioned_on_its_own_subjects_prompt(fast):
    from db_adapters.api import _prior_images
    from db_adapters.latents import training_set
    from db_adapters.plan import make_plan

    pipe = tiny_pipeline()
    plan = make_plan(pipe, two_subjects(), settings={**fast, "random_flip": True})
    prior = _prior_images(pipe, plan)
    assert list(prior) == ["a dog", "a cat"] and all(len(images) == 2 for images in prior.values())
    data = training_set(pipe, plan, prior)
    # 3 dog photos, mirrored, then 3 cat photos, mirrored: prompts 0 and 1.
    assert data.instance.prompt_index.tolist() == [0] * 6 + [1] * 6
    assert data.prior.prompt_index.tolist() == [0, 0, 1, 1]
    for number, subject in enumerate(plan.subjects):
        alone = plan.family.encode_prompt(pipe, plan.family.prompt_ids(pipe, subject.instance_prompt))
        embeds = data.instance.prompt_embeds["encoder_hidden_states"][number]
        assert torch.allclose(embeds, alone["encoder_hidden_states"][0].float(), atol=1e-6)


def test_the_trainer_hands_each_drawn_item_its_prompt(fast):
    from db_adapters.api import _prior_images
    from db_adapters.latents import training_set
    from db_adapters.plan import make_plan
    from db_adapters.trainer import Trainer

    pipe = tiny_pipeline()
    plan = make_plan(pipe, two_subjects(), settings={**fast, "batch_size": 4})
    data = training_set(pipe, plan, _prior_images(pipe, plan))
    plan.strategy.apply(pipe, plan.family, train_text_encoder=False)
    trainer = Trainer(pipe, plan, data)
    trainer._seed = 0
    trainer._data_streams()
    trainer._instances.take = lambda count: torch.tensor([5, 0, 3, 1])  # cat, dog, cat, dog
    batch = trainer._half_batch(data.instance, trainer._instances)
    states = data.instance.prompt_embeds["encoder_hidden_states"]
    for row, prompt in enumerate([1, 0, 1, 0]):
        assert torch.equal(batch.conditioning["encoder_hidden_states"][row], states[prompt])
    plan.strategy.remove(pipe)


@pytest.mark.parametrize(
    ("subjects", "extra", "message"),
    [
        (two_subjects(), {"class_noun": "dog"}, "class_noun given for the whole run"),
        (two_subjects(), {"identifier": "ki"}, "each Subject(images, class_noun"),
        (two_subjects(), {"class_prompt": "a pet"}, "class_prompt given for the whole run"),
        ([Subject([], "dog", "ki"), Subject([], "cat", "ki")], {}, "given to several subjects"),
        ([Subject([], "dog"), "photos/"], {}, "images[1] is a str"),
    ],
)
def test_several_subjects_refuse_run_wide_inputs(subjects, extra, message):
    pipe = tiny_pipeline()
    with pytest.raises(InputError, match=re.escape(message)):
        personalize(pipe, subjects, **extra)


def test_a_bad_subject_is_named_by_its_place(fast):
    with pytest.raises(InputError, match=r"subjects\[1\]\.images"):
        personalize(tiny_pipeline(), [Subject(make_subject_images(), "dog"), Subject([], "cat")], **fast)


def test_single_subject_without_class_noun_says_what_to_pass():
    with pytest.raises(InputError, match="class_noun is missing"):
        personalize(tiny_pipeline(), make_subject_images())


def test_cli_trains_several_subjects(tiny_dir, tmp_path):
    from db_adapters.cli import main

    for name, images in (("rex", make_subject_images()), ("tom", cat_images())):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            image.save(tmp_path / name / f"{i}.png")
    out = tmp_path / "pets.safetensors"
    args = ["train", "--model", str(tiny_dir), "--output", str(out), "--steps", "2", "--num-class-images", "2"]
    args += [
        "--class-inference-steps",
        "2",
        "--subject",
        f"{tmp_path / 'rex'}:dog",
        "--subject",
        f"{tmp_path / 'tom'}:cat:ket",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("identifier:") == 2 and "a ket cat" in result.output
    mixed = CliRunner().invoke(main, [*args, "--images", str(tmp_path / "rex")])
    assert mixed.exit_code == 2 and "--subject replaces --images" in mixed.output
    bad = CliRunner().invoke(main, [*args[:-4], "--subject", "nocolon"])
    assert bad.exit_code == 2 and "FOLDER:NOUN" in bad.output


@pytest.mark.slow
def test_toy_subject_a_still_renders_as_a_after_b_trains_in_the_same_run(tmp_path):
    """Two toy subjects of different class and colour in one run: each prompt renders its own subject."""
    from db_adapters.toy import SUBJECTS, load_base_pipeline
    from db_adapters.toy.probe import load_probe

    torch.manual_seed(0)
    probe, pipe = load_probe(), load_base_pipeline()
    box, ball = SUBJECTS["star_box"], SUBJECTS["ring_ball"]
    references = {s.name: probe.embed(s.reference_images()) for s in (box, ball)}

    def render(prompt: str) -> list[Image.Image]:
        generator = torch.Generator().manual_seed(100)
        return pipe([prompt] * 16, num_inference_steps=20, guidance_scale=4.0, generator=generator).images

    def colour_rate(images, subject) -> float:
        return sum(read["color"] == subject.attributes["color"] for read in probe.predict(images)) / len(images)

    def closeness(images, subject) -> float:
        return float((probe.embed(images) @ references[subject.name].T).mean())

    base = {s.name: render(f"a {s.attributes['cls']}") for s in (box, ball)}
    subjects = [Subject(s.reference_images(), s.attributes["cls"]) for s in (box, ball)]
    adapter = personalize(
        pipe,
        subjects,
        steps=450,
        num_class_images=16,
        class_inference_steps=10,
        class_image_dir=tmp_path,
        progress=False,
    )
    for subject, other, bound in ((box, ball, adapter.subjects[0]), (ball, box, adapter.subjects[1])):
        images = render(bound["instance_prompt"])
        rate, before = colour_rate(images, subject), colour_rate(base[subject.name], subject)
        own, others = closeness(images, subject), closeness(images, other)
        print(f"{subject.name}: colour {rate:.2f} (base {before:.2f}); cosine own {own:.3f}, other {others:.3f}")
        # Measured on the shipped v4 model (450 steps, the text encoder trained as it recommends, 16 samples):
        # star_box red 1.00 (base 0.25), cosine 0.963 vs 0.367; ring_ball blue 1.00 (base 0.12), 0.887 vs 0.374.
        # With bf16 class images (the default on a CPU with native bf16) and one thread, as `pytest -n 2`
        # runs it: star_box 1.00 (base 0.25), 0.959 vs 0.364; ring_ball 0.94 (base 0.12), 0.890 vs 0.363.
        # (v3: star_box 1.00 (base 0.12), 0.873 vs 0.400; ring_ball 1.00 (base 0.19), 0.915 vs 0.370.)
        # (v2: star_box 0.75 (base 0.25), 0.819 vs 0.318; ring_ball 1.00 (base 0.00), 0.889 vs 0.356.)
        assert rate >= before + 0.4
        assert own >= others + 0.15 and own > closeness(base[subject.name], subject)
