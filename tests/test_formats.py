"""Adapter file formats: kohya files that diffusers' own kohya reader loads into the same pixels, peft files that
peft loads, `db-adapt export`, and the adapters that cannot convert (full fine-tunes, SD3 to kohya)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner
from conftest import make_subject_images, render_np
from safetensors import safe_open

from db_adapters import AdapterError, load_adapter, personalize
from db_adapters.cli import main
from db_adapters.families import get_family
from db_adapters.formats import export_adapter
from db_adapters.formats.kohya import to_kohya
from db_adapters.testing import tiny_pipeline_of

# No class images: what is converted is the trained LoRA, and every second counts on two cores.
QUICK = {"prior_preservation": False, "progress": False}
KOHYA_FAMILIES = ["sd", "sdxl", "flux"]
# What A1111/ComfyUI look for, as diffusers' kohya readers map it back (the tiny UNets' block numbers).
EXPECTED_KEYS = {
    "sd": [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    ],
    "sdxl": [
        # layers_per_block 1: down_blocks.1.attentions.0 is input_blocks.3.1, up_blocks.0.attentions.1 output_blocks.1.1
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q.lora_down.weight",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.lora_up.weight",
        "lora_unet_output_blocks_1_1_transformer_blocks_0_attn1_to_out_0.alpha",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight",
    ],
    "flux": [
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
        "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight",
        "lora_unet_double_blocks_0_img_attn_proj.alpha",
        "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight",
        "lora_unet_double_blocks_0_txt_mlp_2.lora_up.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    ],
}
_TRAINED: dict[str, tuple] = {}


def trained(family: str, tmp_path_factory) -> tuple:
    """One tiny LoRA per family for the whole file: rank 4, alpha 8, text-encoder LoRA, a visible change."""
    if family not in _TRAINED:
        settings = {"rank": 4, "alpha": 8, "train_text_encoder": True, "steps": 2, "learning_rate": 5e-2}
        if family == "flux":
            # diffusers' Flux kohya reader splits the single blocks' fused linear1 at FLUX.1's real widths
            # (3072, 12288), which a tiny model lacks: the round trip adapts the double blocks, and the single
            # blocks are checked by the kohya arithmetic below.
            settings["target_modules"] = [f"transformer_blocks.0.{m}" for m in get_family("flux").adapter_targets]
        pipe = tiny_pipeline_of(family)
        output_dir = tmp_path_factory.mktemp(f"run-{family}")
        adapter = personalize(pipe, make_subject_images(), "dog", output_dir=output_dir, **settings, **QUICK)
        path = adapter.save(output_dir / "dog.safetensors")
        prompt = adapter.instance_prompt
        _TRAINED[family] = (pipe, adapter, path, prompt, render_np(pipe, prompt))
    return _TRAINED[family]


def header_of(path) -> tuple[dict[str, str], list[str]]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata(), list(handle.keys())


@pytest.mark.parametrize("family", KOHYA_FAMILIES)
def test_kohya_file_renders_the_same_through_diffusers_kohya_reader(family, tmp_path, tmp_path_factory, caplog):
    _, adapter, _, prompt, expected = trained(family, tmp_path_factory)
    kohya_path = adapter.save(tmp_path / "dog_kohya.safetensors", format="kohya")

    header, keys = header_of(kohya_path)
    assert all(key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for key in keys)
    assert set(EXPECTED_KEYS[family]) <= set(keys), sorted(keys)[:8]
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in keys)
    with safe_open(str(kohya_path), "pt") as handle:
        for key in keys:
            if key.endswith(".alpha"):
                rank = handle.get_tensor(key.replace(".alpha", ".lora_down.weight")).shape[0]
                assert handle.get_tensor(key).item() / rank == pytest.approx(8 / 4), key  # trained alpha / rank
    assert header["ss_network_module"] == "networks.lora" and header["ss_network_dim"] == "4"
    assert header["ss_network_alpha"] == "8.0" and adapter.identifier in header["ss_training_comment"]
    assert header["ss_learning_rate"] == "0.05" and header["ss_max_train_steps"] == "2"
    assert header["ss_base_model_version"] == {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}[family]
    assert "lora_adapter_metadata" not in header  # diffusers would apply alpha twice from it
    assert json.loads(header["db_adapters"])["file_format"] == "kohya"

    # (The diffusers-format file's own round trip is test_families.py's.)
    plain = tiny_pipeline_of(family)
    with caplog.at_level(logging.WARNING):
        plain.load_lora_weights(str(kohya_path))  # no db_adapters on the loading side
    assert not [r for r in caplog.records if "unsupported" in r.getMessage().lower()]
    diff = float(abs(render_np(plain, prompt) - expected).max())
    base = float(abs(render_np(tiny_pipeline_of(family), prompt) - expected).max())
    print(f"\n{family}: kohya file through diffusers' reader: max |pixel diff| {diff:.2e}; base vs trained {base:.3f}")
    assert diff <= 1e-4
    assert base > 1e-3  # the adapter visibly changes the images


def _flux_lora(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random rank-4 LoRA weights on every Linear of the tiny Flux transformer that kohya's names cover."""
    from db_adapters.formats.kohya import _DOUBLE, _OUTSIDE, _SINGLE

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in tiny_pipeline_of("flux").transformer.named_modules():
        inner = name.split(".", 2)[-1]
        covered = inner in (_DOUBLE if name.startswith("transformer_blocks") else _SINGLE)
        if isinstance(module, torch.nn.Linear) and (covered or name in _OUTSIDE):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator)
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=generator)
    return state


def _delta(state, module: str, alpha: float) -> torch.Tensor:
    down, up = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
    return up @ down * (alpha / down.shape[0])


def test_flux_kohya_updates_are_the_trained_updates_on_bfl_fused_layers():
    """Apply the kohya file as A1111/ComfyUI do (W += up @ down * alpha / rank on BFL's fused Linears): every
    layer, the single blocks' [q; k; v; mlp] linear1 and the final layer included, gets the trained update."""
    from diffusers.loaders.lora_conversion_utils import swap_scale_shift

    state = _flux_lora()
    kohya = to_kohya(state, "flux", alpha=8.0)

    def applied(name: str) -> torch.Tensor:
        down, up = kohya[f"lora_unet_{name}.lora_down.weight"], kohya[f"lora_unet_{name}.lora_up.weight"]
        return up @ down * (kohya[f"lora_unet_{name}.alpha"].item() / down.shape[0])

    def trained_delta(module: str) -> torch.Tensor:
        return _delta(state, f"transformer.{module}", 8.0)

    block, single = "transformer_blocks.0", "single_transformer_blocks.0"
    mlp_width = trained_delta(f"{single}.attn.to_q").shape[0] * 4
    expected = {
        "double_blocks_0_img_attn_qkv": torch.cat([trained_delta(f"{block}.attn.to_{x}") for x in "qkv"]),
        "double_blocks_0_txt_attn_qkv": torch.cat([trained_delta(f"{block}.attn.add_{x}_proj") for x in "qkv"]),
        "double_blocks_0_img_attn_proj": trained_delta(f"{block}.attn.to_out.0"),
        "double_blocks_0_txt_mlp_0": trained_delta(f"{block}.ff_context.net.0.proj"),
        "double_blocks_0_img_mod_lin": trained_delta(f"{block}.norm1.linear"),
        "single_blocks_0_linear1": torch.cat(
            [*(trained_delta(f"{single}.attn.to_{x}") for x in "qkv"), trained_delta(f"{single}.proj_mlp")]
        ),
        "single_blocks_0_linear2": trained_delta(f"{single}.proj_out"),
        "final_layer_linear": trained_delta("proj_out"),
        "final_layer_adaLN_modulation_1": swap_scale_shift(trained_delta("norm_out.linear")),
        "img_in": trained_delta("x_embedder"),
        "guidance_in_in_layer": trained_delta("time_text_embed.guidance_embedder.linear_1"),
    }
    assert expected["single_blocks_0_linear1"].shape[0] == 3 * mlp_width // 4 + mlp_width
    for name, delta in expected.items():
        torch.testing.assert_close(applied(name), delta, rtol=1e-5, atol=1e-5, msg=name)
    modules = {key.rsplit(".", 2)[0] for key in state}
    kohya_modules = {key.split(".")[0] for key in kohya}
    assert len(kohya_modules) == len(modules) - 2 * 2 - 3  # q,k,v fused twice in the double block, 4 in linear1

    # Without proj_mlp (LoRA's default targets), linear1's MLP rows get no update.
    without_mlp = {k: v for k, v in state.items() if ".proj_mlp." not in k}
    linear1 = to_kohya(without_mlp, "flux", alpha=8.0)
    down = linear1["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    up = linear1["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    update = up @ down * (linear1["lora_unet_single_blocks_0_linear1.alpha"].item() / down.shape[0])
    torch.testing.assert_close(update[:-mlp_width], expected["single_blocks_0_linear1"][:-mlp_width])
    assert update[-mlp_width:].abs().max() == 0


def test_flux_kohya_is_read_back_by_diffusers_outside_the_single_blocks():
    """diffusers' own Flux kohya reader recovers every trained update from what `to_kohya` writes (the single
    blocks aside: the reader splits them at FLUX.1's real widths), the final layer's alpha included."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    state = {k: v for k, v in _flux_lora().items() if "single_transformer_blocks" not in k}
    back = _convert_kohya_flux_lora_to_diffusers(to_kohya(state, "flux", alpha=8.0))
    # diffusers 0.42.1's reader names the layers outside the blocks (img_in, time_in, final_layer, ...) without
    # `transformer.`, so its load_lora_weights then skips them; LoRA's default targets are all inside blocks.
    back = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in back.items()}
    assert len(back) == len(state)
    for module in {key.rsplit(".", 2)[0] for key in state}:
        # The reader bakes alpha / rank into the weights: its update is B @ A.
        down, up = back[f"{module}.lora_A.weight"], back[f"{module}.lora_B.weight"]
        torch.testing.assert_close(up @ down, _delta(state, module, 8.0), rtol=1e-5, atol=1e-5, msg=module)


def test_sdxl_export_from_the_file_numbers_blocks_as_the_pipeline_does(tmp_path, tmp_path_factory):
    """From a file alone, kohya's SGM block numbers come from the up blocks' attention layers."""
    _, adapter, path, _, _ = trained("sdxl", tmp_path_factory)
    saved = adapter.save(tmp_path / "saved.safetensors", format="kohya")
    exported = export_adapter(path, tmp_path / "exported.safetensors", "kohya")
    assert tiny_pipeline_of("sdxl").unet.config.layers_per_block == 1  # not SDXL's 2: the numbers must follow it
    assert header_of(saved)[1] == header_of(exported)[1]


def test_peft_file_loads_with_peft_and_renders_the_same(tmp_path, tmp_path_factory):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from db_adapters.formats.peft import component_state

    pipe, adapter, _, prompt, expected = trained("sd", tmp_path_factory)
    path = adapter.save(tmp_path / "dog_peft.safetensors", format="peft")
    header, keys = header_of(path)
    assert "unet.base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder.base_model.model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    configs = json.loads(header["peft_config"])
    assert configs["unet"]["r"] == 4 and configs["unet"]["lora_alpha"] == 8 and configs["text_encoder"]["r"] == 4

    state = load_file(str(path))
    fresh = tiny_pipeline_of("sd")
    for component in ("unet", "text_encoder"):
        model = get_peft_model(getattr(fresh, component), LoraConfig(**configs[component]))
        result = set_peft_model_state_dict(model, component_state(state, component))
        assert not [k for k in result.unexpected_keys if "lora_" in k]
        setattr(fresh, component, model.merge_and_unload())
    assert abs(render_np(fresh, prompt) - expected).max() <= 1e-4


@pytest.fixture(scope="module")
def full_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    full = personalize(
        tiny_pipeline_of("sd"), make_subject_images(), "dog", strategy="full", steps=1, output_dir=folder, **QUICK
    )
    return full, full.save(folder / "full.safetensors")


def test_full_fine_tunes_and_sd3_to_kohya_are_refused(tmp_path, full_adapter):
    full, _ = full_adapter
    for file_format in ("kohya", "peft"):
        with pytest.raises(AdapterError, match="full fine-tune cannot be written in .* LoRA layers"):
            full.save(tmp_path / f"full_{file_format}.safetensors", format=file_format)
        assert not (tmp_path / f"full_{file_format}.safetensors").exists()
    sd3 = personalize(tiny_pipeline_of("sd3"), make_subject_images(), "dog", steps=1, output_dir=tmp_path, **QUICK)
    with pytest.raises(AdapterError, match="not offered for SD3: diffusers has no reader.*Use the diffusers format"):
        sd3.save(tmp_path / "sd3_kohya.safetensors", format="kohya")
    sd3.save(tmp_path / "sd3_peft.safetensors", format="peft")  # peft's layout has no family of its own
    with pytest.raises(ValueError, match="format='a1111' is not a known adapter file format"):
        sd3.save(tmp_path / "x.safetensors", format="a1111")
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["sd3_peft.safetensors"]


def test_load_adapter_refuses_an_export_with_what_to_use(tmp_path, tmp_path_factory):
    _, adapter, _, _, _ = trained("sd", tmp_path_factory)
    kohya_path = adapter.save(tmp_path / "dog_kohya.safetensors", format="kohya")
    with pytest.raises(AdapterError, match="kohya-format export; .*pipe.load_lora_weights"):
        load_adapter(tiny_pipeline_of("sd"), kohya_path)


# --- db-adapt export -----------------------------------------------------------------------------------------


def test_export_command_writes_each_format_and_inspect_reads_it(tmp_path, tmp_path_factory):
    _, adapter, path, prompt, expected = trained("sd", tmp_path_factory)
    for file_format in ("kohya", "peft", "diffusers"):
        out = tmp_path / f"dog_{file_format}.safetensors"
        result = CliRunner().invoke(main, ["export", str(path), "--format", file_format, "--output", str(out)])
        assert result.exit_code == 0, result.output
        assert f"({file_format} format" in result.output
        inspected = CliRunner().invoke(main, ["inspect", str(out)])
        assert inspected.exit_code == 0, inspected.output
        info = json.loads(inspected.output)
        assert info["identifier"] == adapter.identifier and info["file_format"] == file_format
    # The exported kohya file is the one Adapter.save writes.
    saved = adapter.save(tmp_path / "saved_kohya.safetensors", format="kohya")
    assert header_of(saved)[1] == header_of(tmp_path / "dog_kohya.safetensors")[1]
    fresh = tiny_pipeline_of("sd")
    load_adapter(fresh, tmp_path / "dog_diffusers.safetensors")  # an export to diffusers is our own file again
    assert abs(render_np(fresh, prompt) - expected).max() <= 1e-5


def bad_export_cases(tmp_path, lora, full):
    pickle = tmp_path / "adapter.bin"
    pickle.write_bytes(b"\x80\x04pickle")
    out = ["--output", str(tmp_path / "out.safetensors")]
    kohya = tmp_path / "k.safetensors"
    export_adapter(lora, kohya, "kohya")
    return {
        "unknown format": (["export", str(lora), "--format", "a1111", *out], "'a1111' is not one of"),
        "full to kohya": (["export", str(full), "--format", "kohya", *out], "full fine-tune cannot be written"),
        "full to peft": (["export", str(full), "--format", "peft", *out], "hold LoRA layers"),
        "missing file": (["export", str(tmp_path / "nope.safetensors"), *out], "does not exist"),
        "pickle file": (["export", str(pickle), *out], "only safetensors"),
        "output not safetensors": (["export", str(lora), "--output", str(tmp_path / "o.pt")], ".safetensors"),
        "output is the input": (["export", str(lora), "--output", str(lora)], "is the adapter file itself"),
        "export of an export": (["export", str(kohya), "--format", "peft", *out], "already a kohya-format export"),
        "not ours": (["export", str(_foreign(tmp_path)), *out], "no db-adapters metadata"),
    }


def _foreign(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(path))
    return path


@pytest.mark.parametrize(
    "case",
    [
        "unknown format",
        "full to kohya",
        "full to peft",
        "missing file",
        "pickle file",
        "output not safetensors",
        "output is the input",
        "export of an export",
        "not ours",
    ],
)
def test_bad_export_input_is_one_line_exit_2(case, tmp_path, tmp_path_factory, full_adapter):
    _, _, lora, _, _ = trained("sd", tmp_path_factory)
    args, expected = bad_export_cases(tmp_path, lora, full_adapter[1])[case]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and expected in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.safetensors").exists()
