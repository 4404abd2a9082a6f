"""Several adapters in one pipeline: loaded under names, mixed with weights, taken out one by one.

On the tiny SD and SDXL pipelines two LoRA adapters render as diffusers' own multi-adapter loading
(`load_lora_weights(adapter_name=...)` + `set_adapters`) renders them; weight 0 turns one off;
unloading one leaves the other as it renders alone, unloading all gives the base model back exactly.
Then LoHa and LoKr mixing, what is refused (a name in use, a full fine-tune beside another, kinds that
do not mix, personalize), saving one adapter out of several, the CLI, and, on the toy world, that two
separately trained adapters mixed at 1.0/1.0 still render their own subjects.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_subject_images, render_np
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from db_adapters import (
    AdapterError,
    InputError,
    attached_adapter,
    attached_adapters,
    load_adapter,
    personalize,
    set_adapter_weights,
    unload_adapter,
)
from db_adapters.adapter_file import pack_metadata, unpack_metadata
from db_adapters.cli import main
from db_adapters.fuse import fuse_adapter
from db_adapters.safe_reading import read_file_metadata, read_tensors
from db_adapters.testing import tiny_pipeline_of

# Two steps at a high rate move the adapters' weights enough to change every picture; no class images.
QUICK = {"steps": 2, "learning_rate": 1e-2, "prior_preservation": False, "progress": False}
RENDER_STEPS = 1  # one denoiser step still runs every adapted layer, text encoders included
TOLERANCE = 1e-4  # ours against diffusers' own loading; taking adapters out must be exact
# peft's warning when plain diffusers loads a second adapter: the point of those tests.
SECOND_ADAPTER_WARNING = "ignore:Already found a .peft_config. attribute:UserWarning"
SUBJECTS = {"dog": True, "cat": False}  # name -> train_text_encoder: the two adapters adapt different parts


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """`files(family, kind)`: {"dog": path, "cat": path}, two adapters trained once per module on that family."""
    cache: dict[tuple[str, str], dict[str, object]] = {}

    def make(family: str, kind: str = "lora") -> dict[str, object]:
        if (family, kind) not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-{kind}")
            pipe = tiny_pipeline_of(family)
            paths = {}
            for seed, (name, text_encoder) in enumerate(SUBJECTS.items()):
                adapter = personalize(
                    pipe,
                    make_subject_images(),
                    name,
                    strategy=kind,
                    train_text_encoder=text_encoder,
                    seed=seed,
                    output_dir=folder,
                    **QUICK,
                )
                paths[name] = adapter.save(folder / f"{name}.safetensors")
                unload_adapter(pipe)
            cache[family, kind] = paths
        return cache[family, kind]

    return make


@pytest.fixture(scope="module")
def alone(files):
    """`alone(family, kind, name)`: the picture with only that adapter loaded (None: the base model's), cached."""
    cache: dict[tuple, np.ndarray] = {}

    def render_alone(family: str, kind: str, name: str | None) -> np.ndarray:
        if (family, kind, name) not in cache:
            pipe = tiny_pipeline_of(family)
            if name is not None:
                load_adapter(pipe, files(family, kind)[name])
            cache[family, kind, name] = render(pipe)
        return cache[family, kind, name]

    return render_alone


def render(pipe) -> np.ndarray:
    return render_np(pipe, "a dog", steps=RENDER_STEPS)


def difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def load_both(family: str, paths: dict):
    pipe = tiny_pipeline_of(family)
    for path in paths.values():
        load_adapter(pipe, path)
    return pipe


def adapter_layers(pipe) -> list[BaseTunerLayer]:
    return [m for name in ("unet", "text_encoder", "text_encoder_2") if hasattr(pipe, name) for m in
            getattr(pipe, name).modules() if isinstance(m, BaseTunerLayer)]  # fmt: skip


# --- two LoRA adapters, on SD and SDXL -------------------------------------------------------------------


@pytest.mark.filterwarnings(SECOND_ADAPTER_WARNING)
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_two_loras_render_as_diffusers_own_multi_adapter_loading(family, files, alone):
    paths = files(family)
    ours = load_both(family, paths)
    assert {name: a.name for name, a in attached_adapters(ours).items()} == {"dog": "dog", "cat": "cat"}
    plain = tiny_pipeline_of(family)  # no db_adapters on this side: diffusers' own verbs
    for name, path in paths.items():
        plain.load_lora_weights(str(path), adapter_name=name)
    for weights in ({"dog": 1.0, "cat": 1.0}, {"dog": -0.5, "cat": 0.6}):
        set_adapter_weights(ours, weights)
        plain.set_adapters(list(weights), list(weights.values()))
        mixed = render(ours)
        gap = difference(mixed, render(plain))
        print(f"{family} {weights}: ours vs diffusers {gap:.2e}")
        assert gap <= TOLERANCE
        # Both act: the mix is neither adapter alone (further from each than the tolerance that calls renders equal).
        assert min(difference(mixed, alone(family, "lora", name)) for name in paths) > TOLERANCE


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_weight_zero_turns_one_adapter_off(family, files, alone):
    pipe = load_both(family, files(family))
    set_adapter_weights(pipe, {"dog": 0.0})
    assert np.array_equal(render(pipe), alone(family, "lora", "cat"))
    set_adapter_weights(pipe, {"dog": 1.0, "cat": 0})
    assert np.array_equal(render(pipe), alone(family, "lora", "dog"))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_unloading_one_leaves_the_other_as_it_renders_alone(family, files, alone):
    paths = files(family)
    pipe = load_both(family, paths)
    unload_adapter(pipe, "cat")
    assert list(attached_adapters(pipe)) == ["dog"]
    assert np.array_equal(render(pipe), alone(family, "lora", "dog"))
    load_adapter(pipe, paths["cat"])
    unload_adapter(pipe, "dog")
    assert np.array_equal(render(pipe), alone(family, "lora", "cat"))
    load_adapter(pipe, paths["dog"])
    unload_adapter(pipe)  # all of them
    assert attached_adapters(pipe) == {} and not adapter_layers(pipe)
    assert not any(getattr(getattr(pipe, c), "peft_config", None) for c in ("unet", "text_encoder"))
    assert np.array_equal(render(pipe), alone(family, "lora", None))
    with pytest.raises(AdapterError, match="nothing to unload"):
        unload_adapter(pipe)


def test_the_adapters_left_keep_their_weights(files):
    paths = files("sd")
    pipe = load_both("sd", paths)
    set_adapter_weights(pipe, {"dog": 0.5})
    unload_adapter(pipe, "cat")
    reference = tiny_pipeline_of("sd")
    load_adapter(reference, paths["dog"])
    set_adapter_weights(reference, {"dog": 0.5})
    assert np.array_equal(render(pipe), render(reference))


@pytest.mark.filterwarnings(SECOND_ADAPTER_WARNING)
def test_dora_and_lora_adapters_mix_as_diffusers_mixes_them(files):
    paths = {"dog": files("sd", "dora")["dog"], "cat": files("sd")["cat"]}
    ours = load_both("sd", paths)
    set_adapter_weights(ours, {"cat": 0.7})
    plain = tiny_pipeline_of("sd")
    for name, path in paths.items():
        plain.load_lora_weights(str(path), adapter_name=name)
    plain.set_adapters(["dog", "cat"], [1.0, 0.7])
    assert difference(render(ours), render(plain)) <= TOLERANCE


# --- LoHa and LoKr: peft's per-adapter scale ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_and_lokr_adapters_mix_by_scaling_each_update(kind, files, alone):
    pipe = load_both("sd", files("sd", kind))
    # One adapted layer that holds both: its output moves by the sum of each adapter's update, each scaled.
    layer = next(m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer) and len(m.scaling) == 2)
    x = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(0))

    def update(weights: dict[str, float]) -> torch.Tensor:
        set_adapter_weights(pipe, weights)
        with torch.no_grad():
            return layer(x) - layer.get_base_layer()(x)

    dog, cat = update({"dog": 1, "cat": 0}), update({"dog": 0, "cat": 1})
    assert dog.abs().max() > 1e-6 and cat.abs().max() > 1e-6
    for weights in ({"dog": 1.0, "cat": 1.0}, {"dog": 0.3, "cat": -1.2}):
        expected = weights["dog"] * dog + weights["cat"] * cat
        torch.testing.assert_close(update(weights), expected, atol=1e-6, rtol=1e-4)
    set_adapter_weights(pipe, {"dog": 0.0, "cat": 1.0})  # and so do the pictures
    assert np.array_equal(render(pipe), alone("sd", kind, "cat"))


# --- what is refused ------------------------------------------------------------------------------------


def test_a_name_in_use_is_refused_and_changes_nothing(files, alone):
    paths = files("sd")
    pipe = tiny_pipeline_of("sd")
    load_adapter(pipe, paths["dog"])
    with pytest.raises(AdapterError, match=r"already carries an adapter named 'dog'.*name="):
        load_adapter(pipe, paths["cat"], name="dog")
    assert list(attached_adapters(pipe)) == ["dog"]
    assert np.array_equal(render(pipe), alone("sd", "lora", "dog"))
    assert load_adapter(pipe, paths["cat"], name="cat_2").name == "cat_2"


def test_the_default_name_is_the_file_stem_and_bad_names_are_input_errors(files, tmp_path):
    odd = tmp_path / "my dog v1.5.safetensors"
    shutil.copy(files("sd")["dog"], odd)
    pipe = tiny_pipeline_of("sd")
    assert load_adapter(pipe, odd).name == "my_dog_v1_5"
    with pytest.warns(UserWarning, match=r"'my_dog_v1_5' and 'dog' share the identifier"):
        load_adapter(pipe, files("sd")["dog"])  # the same subject twice: its prompts cannot tell them apart
    unload_adapter(pipe, "dog")
    for name in ("", "a.b", "dog cat", 7):
        with pytest.raises(InputError, match="letters, digits"):
            load_adapter(pipe, files("sd")["cat"], name=name)
    assert list(attached_adapters(pipe)) == ["my_dog_v1_5"]


def test_a_full_fine_tune_is_alone_in_its_pipeline(files, alone, tmp_path):
    pipe = tiny_pipeline_of("sd")
    full = personalize(
        pipe, make_subject_images(), "dog", strategy="full", output_dir=tmp_path, **{**QUICK, "steps": 1}
    )
    full_path = full.save(tmp_path / "full.safetensors")
    with pytest.raises(AdapterError, match=r"full adapter.*cannot be weighted"):
        set_adapter_weights(pipe, {"dreambooth": 0.5})
    for other in (files("sd")["dog"], full_path):  # nothing beside it, not even another full fine-tune
        with pytest.raises(AdapterError, match=r"full and oft adapters must be alone"):
            load_adapter(pipe, other, name="other")
    unload_adapter(pipe)
    assert np.array_equal(render(pipe), alone("sd", "lora", None))

    load_adapter(pipe, files("sd")["dog"])
    with pytest.raises(AdapterError, match=r"full.safetensors' is a full adapter .* 'dog' \(lora"):
        load_adapter(pipe, full_path)
    assert list(attached_adapters(pipe)) == ["dog"]
    assert np.array_equal(render(pipe), alone("sd", "lora", "dog"))


def test_kinds_that_do_not_mix_are_refused_naming_those_that_do(files):
    pipe = tiny_pipeline_of("sd")
    load_adapter(pipe, files("sd")["dog"])
    with pytest.raises(AdapterError, match=r"loha adapter .* only as dora with lora; loha with loha; lokr with lokr"):
        load_adapter(pipe, files("sd", "loha")["cat"])
    assert list(attached_adapters(pipe)) == ["dog"]


def test_personalize_on_a_pipeline_with_adapters_is_refused_naming_how_to_unload(files):
    pipe = load_both("sd", files("sd"))
    with pytest.raises(AdapterError, match=r"'dog' .*'cat' .*db_adapters.unload_adapter\(pipe\)"):
        personalize(pipe, make_subject_images(), "dog", **QUICK)
    assert list(attached_adapters(pipe)) == ["dog", "cat"]


def test_fusing_takes_one_adapter(files):
    pipe = load_both("sd", files("sd"))
    with pytest.raises(AdapterError, match=r"carries 2 adapters \('dog', 'cat'\); fusing takes one"):
        fuse_adapter(pipe)
    assert list(attached_adapters(pipe)) == ["dog", "cat"]


def test_bad_weights_names_and_lookups_are_refused(files):
    pipe = tiny_pipeline_of("sd")
    with pytest.raises(AdapterError, match="carries no db-adapters adapter"):
        set_adapter_weights(pipe, {"dog": 1.0})
    dog, _ = (load_adapter(pipe, path) for path in files("sd").values())
    with pytest.raises(AdapterError, match=r"no adapter named 'cow'; it carries 'dog', 'cat'"):
        set_adapter_weights(pipe, {"cow": 1.0})
    with pytest.raises(AdapterError, match=r"no adapter named 'cow'"):
        unload_adapter(pipe, "cow")
    for weight in (float("nan"), "1", True, None):
        with pytest.raises(InputError, match="finite number"):
            set_adapter_weights(pipe, {"dog": weight})
    with pytest.raises(AdapterError, match="attached_adapters"):
        attached_adapter(pipe)  # which one? the caller must pick
    unload_adapter(pipe, "cat")
    assert attached_adapter(pipe) is dog


def test_a_failed_load_beside_another_adapter_leaves_that_one_working(files, alone, tmp_path):
    # Metadata that contradicts the file is found after the layers went in: they must come out again alone.
    dog = files("sd")["dog"]
    header = read_file_metadata(dog)
    info = unpack_metadata(header, dog)
    header |= pack_metadata({**info, "train_text_encoder": False})
    edited = tmp_path / "edited.safetensors"
    save_file(read_tensors(dog), str(edited), metadata=header)
    pipe = tiny_pipeline_of("sd")
    load_adapter(pipe, files("sd")["cat"])
    with pytest.raises(AdapterError, match="damaged or was edited"):
        load_adapter(pipe, edited)
    assert list(attached_adapters(pipe)) == ["cat"]
    assert np.array_equal(render(pipe), alone("sd", "lora", "cat"))


# --- saving one of several ------------------------------------------------------------------------------


def test_each_adapter_saves_only_its_own_weights(files, tmp_path):
    pipe = tiny_pipeline_of("sd")
    trained = personalize(pipe, make_subject_images(), "dog", output_dir=tmp_path, **QUICK)
    alone_file = trained.save(tmp_path / "trained-alone.safetensors")
    cat = load_adapter(pipe, files("sd")["cat"])
    assert list(attached_adapters(pipe)) == ["dreambooth", "cat"]
    for adapter, original in ((trained, alone_file), (cat, files("sd")["cat"])):
        again = read_tensors(adapter.save(tmp_path / f"{adapter.name}-again.safetensors"))
        expected = read_tensors(original)
        assert again.keys() == expected.keys(), adapter.name
        assert all(torch.equal(again[key], expected[key]) for key in expected), adapter.name
    unload_adapter(pipe, "cat")
    with pytest.raises(AdapterError, match="no longer attached"):
        cat.save(tmp_path / "gone.safetensors")


# --- the CLI --------------------------------------------------------------------------------------------


def test_generate_mixes_several_adapters_with_weights(tiny_dir, files, tmp_path):
    paths = files("sd")
    identifiers = {name: unpack_metadata(read_file_metadata(p), p)["identifier"] for name, p in paths.items()}
    out = tmp_path / "grid.png"
    args = ["generate", "--model", str(tiny_dir), "--steps", "2", "--output", str(out)]
    args += ["--adapter", str(paths["dog"]), "--adapter", str(paths["cat"])]
    result = CliRunner().invoke(main, [*args, "--weight", "1", "--weight", "0.5", "--prompt", "a {dog} and a {cat}"])
    assert result.exit_code == 0, result.output
    assert f"a {identifiers['dog']} and a {identifiers['cat']}" in result.output and out.stat().st_size > 0

    wrong_count = CliRunner().invoke(main, [*args, "--weight", "1", "--prompt", "a {dog}"])
    assert wrong_count.exit_code != 0 and "one --weight per --adapter" in wrong_count.output
    which_id = CliRunner().invoke(main, [*args, "--prompt", "a {id} dog"])
    assert which_id.exit_code != 0 and '"{dog}", "{cat}"' in which_id.output
    assert "Traceback" not in wrong_count.output + which_id.output


# --- the toy world: two subjects mixed at full weight ---------------------------------------------------

# Two subjects of different class and colour (a red box with a star, a blue striped ball with a ring),
# trained one at a time with the toy model's recommended settings (the text encoder too, 32 class
# images), each with its own identifier; then both loaded at 1.0/1.0. Class and colour right, alone ->
# mixed (16 images per prompt, sampling seeds 100-115, 10 steps; 32 before v4). On the shipped v4: star_box
# 1.00 -> 1.00, ring_ball 0.94 -> 0.00, the other's colour 0.00 and 0.00. On v2 (400 steps): star_box 1.00 -> 1.00,
# ring_ball 1.00 -> 0.97, the other subject's colour when mixed 0.00 and 0.00. On v3 (300
# steps): star_box 1.00 -> 0.97, ring_ball 1.00 -> 0.00, the other's colour 0.00 and 0.00: mixed, "a [V]
# ball" comes out purple, the box's red over the ball's blue, often with the box's star. v3's adapters
# learn their subject far better (sweep identity 0.92 against v2's 0.80), and so interfere more. Turning
# off both adapters' UNet parts keeps the purple (the text-encoder parts carry it); adapters trained on the
# UNet only bleed too. Training both subjects in one run keeps each to its own identifier
# (tests/test_subjects.py).
# (On v1, 300 steps: 0.78 -> 0.56 and 0.84 -> 0.69; with 8 class images instead
# of 32, ring_ball fell to 0.12-0.22 when mixed.)
TOY_SUBJECTS = ("star_box", "ring_ball")
TOY_SAMPLES = 16
TOY_SAMPLE_STEPS = 10
TOY_SEED = 100
MAX_DROP = 0.35  # mixed may read its own subject this much less often than alone (v2: 0.03 at most; v1: 0.22; v3: 1.00)
MIN_LEAD = 0.3  # ... but this much more often than the other subject's colour (v2: 0.97 at least; v1: 0.43)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="known limitation on the v3 and v4 toy models: two separately trained adapters mixed at full weight bleed "
    "into each other (v4: ring_ball 0.94 alone -> 0.00 mixed); strict, so the day mixing holds again this fails",
)
def test_two_toy_adapters_mixed_at_full_weight_still_render_their_own_subjects(tmp_path):
    from db_adapters import choose_identifier
    from db_adapters.generation import render as render_images
    from db_adapters.toy import SUBJECTS as TOY_WORLD_SUBJECTS
    from db_adapters.toy import load_base_pipeline, load_probe

    pipe, probe = load_base_pipeline(), load_probe()
    subjects = {name: TOY_WORLD_SUBJECTS[name] for name in TOY_SUBJECTS}
    paths, prompts = {}, {}
    for index, (name, subject) in enumerate(subjects.items()):
        noun = subject.attributes["cls"]
        identifier = choose_identifier(pipe.tokenizer, noun, seed=index)  # its own identifier
        adapter = personalize(
            pipe,
            subject.reference_images(5),
            noun,
            identifier=identifier,
            seed=0,
            progress=False,
            output_dir=tmp_path / name,
            class_image_dir=tmp_path / f"class-{noun}",
        )
        paths[name], prompts[name] = adapter.save(tmp_path / f"{name}.safetensors"), adapter.instance_prompt
        unload_adapter(pipe)
    assert len(set(prompts.values())) == 2, prompts

    def read_rates(name: str) -> tuple[float, float]:
        """Share of "a [V] {class}" images read as the subject's class and colour, and as the other's colour."""
        subject, other = subjects[name], next(s for n, s in subjects.items() if n != name)
        images = render_images(pipe, prompts[name], num_images=TOY_SAMPLES, seed=TOY_SEED, steps=TOY_SAMPLE_STEPS,
                               guidance_scale=4.0)  # fmt: skip
        reads = probe.predict(images)
        own = sum(r["cls"] == subject.attributes["cls"] and r["color"] == subject.attributes["color"] for r in reads)
        others = sum(r["color"] == other.attributes["color"] for r in reads)
        return own / len(reads), others / len(reads)

    alone = {}
    for name in subjects:
        load_adapter(pipe, paths[name])
        alone[name] = read_rates(name)
        unload_adapter(pipe)
    for path in paths.values():
        load_adapter(pipe, path)
    assert list(attached_adapters(pipe)) == list(subjects)
    set_adapter_weights(pipe, dict.fromkeys(subjects, 1.0))  # as loaded; said out loud
    mixed = {name: read_rates(name) for name in subjects}
    for name in subjects:
        print(f"{name}: own class+colour alone {alone[name][0]:.2f}, mixed {mixed[name][0]:.2f}; "
              f"other's colour mixed {mixed[name][1]:.2f} (max drop {MAX_DROP}, min lead {MIN_LEAD})")  # fmt: skip
    for name in subjects:
        assert alone[name][0] >= 0.6, (name, alone[name])  # the adapter learnt its subject at all
        assert mixed[name][0] >= alone[name][0] - MAX_DROP, (name, alone[name], mixed[name])
        assert mixed[name][0] >= mixed[name][1] + MIN_LEAD, (name, mixed[name])
