"""LoRA extraction from a full fine-tune (`extract_lora`, `db-adapt extract`).

At full rank the extracted LoRA, loaded by plain diffusers or by `load_adapter`, renders as the full
fine-tune did (its changes made only in Linear and Conv2d weights, which a LoRA can hold); at a low
rank the reported retained energy is the file's own; the energy mode picks, per layer, the smallest
rank that meets the threshold; and what a LoRA cannot hold is listed with its share of the change.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from conftest import make_subject_images, render_np
from peft.tuners.tuners_utils import BaseTunerLayer

from db_adapters import AdapterError, InputError, get_strategy, load_adapter, personalize
from db_adapters.adapter_file import METADATA_KEY
from db_adapters.cli import main
from db_adapters.extract import extract_lora
from db_adapters.files import save_tensors
from db_adapters.formats import export_adapter
from db_adapters.safe_reading import read_file_metadata, read_tensors, read_weights
from db_adapters.testing import tiny_pipeline_of

QUICK = {"prior_preservation": False, "progress": False, "train_text_encoder": True}
LORA_FORM = (torch.nn.Linear, torch.nn.Conv2d)
_FILES: dict[str, tuple] = {}


def base_weights(family: str) -> dict[str, dict[str, torch.Tensor]]:
    pipe = tiny_pipeline_of(family)
    return {
        name: dict(getattr(pipe, name).state_dict())
        for name in ("unet", "text_encoder", "text_encoder_2")
        if getattr(pipe, name, None) is not None
    }


def perturbed_full(family: str, tmp_path_factory) -> tuple:
    """A full fine-tune file whose only changes are in Linear and Conv2d weights (a LoRA can hold all of them).

    One step of real full fine-tuning gives the file its metadata; then every weight is set back to the
    base and the Linear and Conv2d weights get random changes. SDXL's first text encoder keeps its last
    layer, as SDXL's real training does (it conditions on the penultimate layer), so its two CLIP
    encoders have different changed layers under the same module names.
    """
    if family not in _FILES:
        pipe = tiny_pipeline_of(family)
        base = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in base_weights(family)}
        adapter = personalize(pipe, make_subject_images(), "dog", strategy="full", steps=1, **QUICK)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for component, state in base.items():
                module = getattr(pipe, component)
                module.load_state_dict(state)
                for name, layer in module.named_modules():
                    kept = family == "sdxl" and component == "text_encoder" and ".layers.1." in f".{name}."
                    if type(layer) in LORA_FORM and not kept:
                        noise = torch.randn(layer.weight.shape, generator=generator)
                        layer.weight.add_(noise * 0.3 * layer.weight.std())
        path = adapter.save(tmp_path_factory.mktemp(f"full-{family}") / "full.safetensors")
        _FILES[family] = (path, adapter.instance_prompt, render_np(pipe, adapter.instance_prompt))
    return _FILES[family]


def trained_full(tmp_path_factory) -> tuple:
    """A real (if brief) full fine-tune of the tiny SD pipeline: biases, norms and embeddings change too."""
    if "trained" not in _FILES:
        pipe = tiny_pipeline_of("sd")
        settings = {"steps": 2, "learning_rate": 5e-3, **QUICK}
        adapter = personalize(pipe, make_subject_images(), "dog", strategy="full", **settings)
        path = adapter.save(tmp_path_factory.mktemp("trained") / "full.safetensors")
        _FILES["trained"] = (path, adapter.instance_prompt, None)
    return _FILES["trained"]


def changes(path, family: str) -> dict[str, torch.Tensor]:
    """`component.name` -> the fine-tune's change of that tensor, for the tensors that changed."""
    base = base_weights(family)
    found = {}
    for key, tensor in read_weights(path).items():
        component, _, name = key.partition(".")
        delta = tensor - base[component][name]
        if delta.abs().max() > 0:
            found[key] = delta
    return found


def lora_layers(path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`component.module` -> (lora_A, lora_B) of a saved LoRA file (text-encoder keys without `text_model.`
    where the module has none, as in `base_weights`)."""
    tensors = read_tensors(path)
    pairs = {}
    for key, down in tensors.items():
        if ".lora_A." in key:
            pairs[key.removesuffix(".lora_A.weight")] = (down, tensors[key.replace(".lora_A.", ".lora_B.")])
    return pairs


def product(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return up.flatten(1) @ down.flatten(1)


def injected(pipe, component: str) -> set[str]:
    return {name for name, m in getattr(pipe, component).named_modules() if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_full_rank_lora_renders_as_the_full_fine_tune_in_both_loaders(family, tmp_path, tmp_path_factory):
    path, prompt, expected = perturbed_full(family, tmp_path_factory)
    extraction = extract_lora(tiny_pipeline_of(family), path, rank=10_000)
    changed = changes(path, family)
    assert {f"{layer.component}.{layer.module}.weight" for layer in extraction.layers} == set(changed)
    assert any(len(layer.shape) == 4 and layer.shape[2:] == (3, 3) for layer in extraction.layers)  # 3x3 convs
    assert all(layer.rank == layer.full_rank for layer in extraction.layers)
    assert extraction.retained_energy == pytest.approx(1.0, abs=1e-9) and extraction.left_out == []
    lora = extraction.save(tmp_path / "lora.safetensors")
    assert json.loads(read_file_metadata(lora)[METADATA_KEY])["strategy"] == "lora"

    plain = tiny_pipeline_of(family)
    base = render_np(plain, prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft warns of rank_pattern keys it did not use, diffusers of odd keys
        plain.load_lora_weights(str(lora))
    for component in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(plain, component, None) is not None:  # exactly the extracted layers, nothing else injected
            want = {layer.module for layer in extraction.layers if layer.component == component}
            assert injected(plain, component) == want, component
    got = render_np(plain, prompt)
    print(f"\n{family}: full-rank LoRA vs full fine-tune: max |pixel diff| {abs(got - expected).max():.2e}")
    assert abs(got - expected).max() <= 1e-4
    assert abs(got - base).max() > 1e-2  # and the fine-tune visibly changed the pictures

    ours = tiny_pipeline_of(family)
    adapter = load_adapter(ours, lora)
    assert adapter.strategy.name == "lora" and adapter.instance_prompt == prompt
    assert abs(render_np(ours, prompt) - expected).max() <= 1e-4


def test_sdxl_encoders_keep_their_own_layers(tmp_path_factory):
    # SDXL's first encoder kept its last layer, the second did not: the same module names, other sets.
    path, _, _ = perturbed_full("sdxl", tmp_path_factory)
    extraction = extract_lora(tiny_pipeline_of("sdxl"), path, rank=4)
    first = {layer.module for layer in extraction.layers if layer.component == "text_encoder"}
    second = {layer.module for layer in extraction.layers if layer.component == "text_encoder_2"}
    assert first and not any(".layers.1." in name for name in first)
    assert any(".layers.1." in name for name in second)
    targets = extraction.lora_options()["text_encoder_target_modules"]
    assert all(name.startswith(("text_encoder.", "text_encoder_2.")) for name in targets)


def test_low_rank_reports_the_energy_the_file_keeps(tmp_path, tmp_path_factory):
    path, _, _ = perturbed_full("sd", tmp_path_factory)
    extraction = extract_lora(tiny_pipeline_of("sd"), path, rank=2)
    lora = lora_layers(extraction.save(tmp_path / "lora.safetensors"))
    changed = changes(path, "sd")
    assert len(lora) == len(extraction.layers)
    kept_total = change_total = 0.0
    for layer in extraction.layers:
        name = f"{layer.component}.{layer.module}"
        down, up = lora.get(name) or lora[name.replace("text_encoder.", "text_encoder.text_model.", 1)]
        delta = changed[f"{name}.weight"].flatten(1).double()
        approximation = product(down, up).double()
        assert down.shape[0] == layer.rank == min(2, *delta.shape)
        kept = float(approximation.square().sum() / delta.square().sum())
        assert layer.retained_energy == pytest.approx(kept, rel=1e-4)
        # The truncated SVD: what it leaves out is orthogonal to what it keeps (Eckart-Young).
        residual = float((delta - approximation).square().sum() / delta.square().sum())
        assert residual == pytest.approx(1 - kept, abs=1e-4)
        assert kept < 1 - 1e-3 or layer.full_rank <= 2  # random changes are not rank 2
        kept_total += kept * float(delta.square().sum())
        change_total += float(delta.square().sum())
    assert extraction.retained_energy == pytest.approx(kept_total / change_total, rel=1e-4)


def test_energy_mode_picks_the_smallest_rank_per_layer_and_loads(tmp_path, tmp_path_factory):
    path, prompt, _ = perturbed_full("sd", tmp_path_factory)
    extraction = extract_lora(tiny_pipeline_of("sd"), path, energy=0.6)
    changed = changes(path, "sd")
    for layer in extraction.layers:
        values = torch.linalg.svdvals(changed[f"{layer.component}.{layer.module}.weight"].flatten(1).double())
        kept = values.square().cumsum(0) / values.square().sum()
        assert kept[layer.rank - 1] >= 0.6 and (layer.rank == 1 or kept[layer.rank - 2] < 0.6), layer.module
        assert layer.retained_energy == pytest.approx(float(kept[layer.rank - 1]), rel=1e-4)
    ranks = {layer.rank for layer in extraction.layers}
    assert len(ranks) > 1  # so the file needs per-layer ranks

    lora = extraction.save(tmp_path / "lora.safetensors")
    header = json.loads(read_file_metadata(lora)["lora_adapter_metadata"])
    assert header["unet.rank_pattern"] and header["unet.alpha_pattern"] == header["unet.rank_pattern"]
    for name, (down, _) in lora_layers(lora).items():  # every layer at its own rank
        module = name.split(".", 1)[1].removeprefix("text_model.")
        assert down.shape[0] == next(layer.rank for layer in extraction.layers if layer.module == module)
    plain, ours = tiny_pipeline_of("sd"), tiny_pipeline_of("sd")
    plain.load_lora_weights(str(lora))
    load_adapter(ours, lora)
    assert abs(render_np(plain, prompt) - render_np(ours, prompt)).max() <= 1e-5


def test_kohya_export_of_per_layer_ranks_renders_the_same(tmp_path, tmp_path_factory):
    # A kohya file holds one alpha per layer where peft's has alpha_pattern: the layers of other ranks
    # must keep their scale (1) there too.
    path, prompt, _ = perturbed_full("sd", tmp_path_factory)
    lora = extract_lora(tiny_pipeline_of("sd"), path, energy=0.6).save(tmp_path / "lora.safetensors")
    kohya = export_adapter(lora, tmp_path / "kohya.safetensors", "kohya")
    ours, theirs = tiny_pipeline_of("sd"), tiny_pipeline_of("sd")
    ours.load_lora_weights(str(lora))
    theirs.load_lora_weights(str(kohya))
    assert abs(render_np(theirs, prompt) - render_np(ours, prompt)).max() <= 1e-4


def test_what_a_lora_cannot_hold_is_listed_with_its_share(tmp_path_factory):
    path, _, _ = trained_full(tmp_path_factory)
    extraction = extract_lora(tiny_pipeline_of("sd"), path, rank=1)
    changed = changes(path, "sd")
    held = {f"{layer.component}.{layer.module}.weight" for layer in extraction.layers}
    listed = {item.name for item in extraction.left_out}
    assert held | listed == set(changed) and not held & listed
    assert any(name.endswith(".bias") for name in listed) and any("norm" in name for name in listed)
    assert any("embedding" in name for name in listed)
    total = sum(float(delta.double().square().sum()) for delta in changed.values())
    for item in extraction.left_out:
        assert extraction.share(item) == pytest.approx(float(changed[item.name].double().square().sum()) / total)
    assert extraction.total_change == pytest.approx(total, rel=1e-6)


def test_lora_options_take_per_layer_ranks_and_refuse_bad_ones():
    lora = get_strategy("lora")
    options = lora(rank=4, rank_pattern={"unet.conv_in": 2}).options
    assert options.alpha == 4 and options.alpha_pattern == {"unet.conv_in": 2}  # scale 1 everywhere
    assert lora(rank=4, alpha=8, rank_pattern={"to_q": 2}).options.alpha_pattern is None
    for bad in ({"to_q": 0}, {"to_q": 1.5}, {"to_q": True}, {"": 2}, ["to_q"], "to_q=2"):
        with pytest.raises(InputError, match="rank_pattern"):
            lora(rank_pattern=bad)
    with pytest.raises(InputError, match="alpha_pattern"):
        lora(alpha_pattern={"to_q": -1})


def test_a_file_whose_diffusers_rank_pattern_was_edited_is_refused(tmp_path, tmp_path_factory):
    path, _, _ = perturbed_full("sd", tmp_path_factory)
    lora = extract_lora(tiny_pipeline_of("sd"), path, energy=0.6).save(tmp_path / "lora.safetensors")
    header = read_file_metadata(lora)
    diffusers_meta = json.loads(header["lora_adapter_metadata"])
    diffusers_meta["unet.rank_pattern"] = {name: rank + 1 for name, rank in diffusers_meta["unet.rank_pattern"].items()}
    edited = save_tensors(
        tmp_path / "edited.safetensors",
        read_tensors(lora),
        {**header, "lora_adapter_metadata": json.dumps(diffusers_meta)},
    )
    with pytest.raises(AdapterError, match="rank_pattern.*damaged or was edited"):
        load_adapter(tiny_pipeline_of("sd"), edited)


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rank", "energy", "expected"),
    [
        (None, None, "either rank"),
        (4, 0.9, "either rank"),
        (0, None, "rank=0 must be a positive integer"),
        (-2, None, "rank=-2"),
        (True, None, "rank=True"),
        (None, 0, "energy=0 must be in"),
        (None, 1.5, "energy=1.5"),
        (None, -0.1, "energy=-0.1"),
    ],
)
def test_bad_rank_or_energy_is_refused(rank, energy, expected, tmp_path_factory):
    path, _, _ = perturbed_full("sd", tmp_path_factory)
    with pytest.raises(InputError, match=expected):
        extract_lora(tiny_pipeline_of("sd"), path, rank=rank, energy=energy)


def test_refuses_a_lora_file_another_base_and_its_own_file(tmp_path, tmp_path_factory):
    path, _, _ = perturbed_full("sd", tmp_path_factory)
    lora = extract_lora(tiny_pipeline_of("sd"), path, rank=2).save(tmp_path / "lora.safetensors")
    with pytest.raises(AdapterError, match="is a lora adapter, not a full fine-tune"):
        extract_lora(tiny_pipeline_of("sd"), lora, rank=2)
    with pytest.raises(AdapterError, match="trained on a 'sd' model"):
        extract_lora(tiny_pipeline_of("sdxl"), path, rank=2)
    header = read_file_metadata(path)
    info = json.loads(header[METADATA_KEY])
    info["base_model"]["architecture"] = "0" * 16
    other = save_tensors(tmp_path / "other.safetensors", read_tensors(path), {METADATA_KEY: json.dumps(info)})
    with pytest.raises(AdapterError, match="another architecture"):
        extract_lora(tiny_pipeline_of("sd"), other, rank=2)
    with pytest.raises(InputError, match="is the full fine-tune itself"):
        extract_lora(tiny_pipeline_of("sd"), path, rank=2).save(path)
    assert read_file_metadata(path) == header  # the fine-tune is still there
    adapted = tiny_pipeline_of("sd")
    load_adapter(adapted, lora)
    with pytest.raises(AdapterError, match="already carries"):
        extract_lora(adapted, path, rank=2)


# --- db-adapt extract -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_full(tiny_dir, tmp_path_factory):
    """A full fine-tune of the tiny model loaded from its folder, so the file records the folder as its model."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)
    adapter = personalize(pipe, make_subject_images(), "dog", strategy="full", steps=2, learning_rate=5e-3, **QUICK)
    return adapter.save(tmp_path_factory.mktemp("cli-full") / "full.safetensors")


def test_extract_command_prints_the_table_and_writes_a_lora(cli_full, tiny_dir, tmp_path):
    output = tmp_path / "lora.safetensors"
    args = ["extract", str(cli_full), "--rank", "3", "--output", str(output), "--device", "cpu"]
    result = CliRunner().invoke(main, args)  # no --model: the file's recorded base model
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["layer", "shape"] and "retained" in lines[0]
    assert any(line.startswith("unet.conv_in ") and " 3 of 32 " in line for line in lines)
    assert any(line.startswith("not held by a LoRA:") for line in lines)
    summary = lines[-1]
    assert summary.startswith(f"wrote {output}: ") and f"{output.stat().st_size:,} bytes" in summary
    assert "retained energy" in summary and "Traceback" not in result.output
    assert load_adapter(tiny_pipeline_of("sd"), output).strategy.name == "lora"

    half = tmp_path / "half.safetensors"
    args = ["extract", str(cli_full), "--model", str(tiny_dir), "--energy", "0.9", "--dtype", "fp16"]
    result = CliRunner().invoke(main, [*args, "--output", str(half), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in read_tensors(half).values()} == {torch.float16}


def test_bad_extract_input_is_one_line_exit_2(cli_full, tiny_dir, tmp_path, tmp_path_factory):
    lora = tmp_path / "lora.safetensors"
    assert CliRunner().invoke(main, ["extract", str(cli_full), "--rank", "2", "--output", str(lora)]).exit_code == 0
    memory_only, _, _ = perturbed_full("sd", tmp_path_factory)  # made in memory: it records no model folder
    pickle = tmp_path / "full.ckpt"
    pickle.write_bytes(b"\x80\x04pickle")
    out = ["--output", str(tmp_path / "out.safetensors")]
    cases = {
        "both": ([str(cli_full), "--rank", "2", "--energy", "0.5", *out], "either rank"),
        "neither": ([str(cli_full), *out], "either rank"),
        "rank 0": ([str(cli_full), "--rank", "0", *out], "rank=0"),
        "energy 1.5": ([str(cli_full), "--energy", "1.5", *out], "energy=1.5"),
        "a lora": ([str(lora), "--rank", "2", *out], "not a full fine-tune"),
        "missing": ([str(tmp_path / "nope.safetensors"), "--rank", "2", *out], "does not exist"),
        "pickle": ([str(pickle), "--rank", "2", *out], "pickle"),
        "no model": ([str(memory_only), "--rank", "2", *out], "pass --model"),
        "bad output": ([str(cli_full), "--rank", "2", "--output", str(tmp_path / "out.pt")], ".safetensors"),
        "other model": ([str(cli_full), "--model", str(tmp_path / "nowhere"), "--rank", "2", *out], "no such"),
    }
    for case, (args, expected) in cases.items():
        result = CliRunner().invoke(main, ["extract", *args, "--device", "cpu"])
        assert result.exit_code == 2, (case, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and expected in errors[0], (case, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "out.safetensors").exists()
