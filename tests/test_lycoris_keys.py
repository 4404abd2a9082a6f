"""LoHa and LoKr adapters as LyCORIS/kohya keys (what ComfyUI and A1111 read): every adapted weight rebuilt from
the exported keys by ComfyUI's formulas is the weight the peft layer gives, the names map back to the very
modules adapted, and what cannot be written exactly (OFT; Flux, SD3) is refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_subject_images
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

from db_adapters import AdapterError, get_strategy, personalize
from db_adapters.cli import main
from db_adapters.formats import check_convertible, export_adapter
from db_adapters.formats.lycoris import to_lycoris
from db_adapters.strategies.base import DEFAULT_ADAPTER_NAME as ADAPTER_NAME
from db_adapters.testing import tiny_pipeline_of

QUICK = {"prior_preservation": False, "progress": False, "steps": 1, "train_text_encoder": True}
# LoKr's factors on the tiny models' 32- and 64-wide layers are (4, 8) and (8, 8): peft makes w2 a product
# w2_a @ w2_b below rank 4 and keeps both factors whole from rank 4, where LyCORIS scales by 1, not alpha / r.
CASES = {
    "loha": ("loha", {"rank": 2, "alpha": 3}),
    "lokr-w2-product": ("lokr", {"rank": 2, "alpha": 3}),
    "lokr-both-whole": ("lokr", {"rank": 4, "alpha": 2}),
}


# --- ComfyUI's formulas, the reference the exported keys are checked against ---------------------------------


def comfy_loha_delta(keys: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """comfy/weight_adapter/loha.py, `LoHaAdapter.calculate_weight` (strength 1)."""
    w1a, w1b, w2a, w2b = (keys[f"hada_{n}"] for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
    alpha = keys["alpha"].item() / w1b.shape[0] if "alpha" in keys else 1.0
    if "hada_t1" in keys:  # cp decomposition
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", keys["hada_t1"], w1b, w1a)
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", keys["hada_t2"], w2b, w2a)
    else:
        m1, m2 = w1a @ w1b, w2a @ w2b
    return alpha * (m1 * m2).reshape(shape)


def comfy_lokr_delta(keys: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """comfy/weight_adapter/lokr.py, `LoKrAdapter.calculate_weight` (strength 1)."""
    dim = None
    w1, w2 = keys.get("lokr_w1"), keys.get("lokr_w2")
    if w1 is None:
        dim = keys["lokr_w1_b"].shape[0]
        w1 = keys["lokr_w1_a"] @ keys["lokr_w1_b"]
    if w2 is None:
        dim = keys["lokr_w2_b"].shape[0]
        if "lokr_t2" in keys:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", keys["lokr_t2"], keys["lokr_w2_b"], keys["lokr_w2_a"])
            # The same values; torch 2.13's kron refuses this einsum's strided result (peft's make_kron too
            # makes w2 contiguous first).
            w2 = w2.contiguous()
        else:
            w2 = keys["lokr_w2_a"] @ keys["lokr_w2_b"]
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    alpha = keys["alpha"].item() / dim if "alpha" in keys and dim is not None else 1.0
    return alpha * torch.kron(w1, w2).reshape(shape)


COMFY = {"loha": comfy_loha_delta, "lokr": comfy_lokr_delta}


def by_module(kohya: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in kohya.items():
        name, _, kind = key.partition(".")
        modules.setdefault(name, {})[kind] = tensor
    return modules


def assert_same_update(kind: str, keys: dict[str, torch.Tensor], layer: BaseTunerLayer, where: str) -> float:
    """ComfyUI's weight from the keys is peft's (base + get_delta_weight); returns the relative error."""
    base = layer.get_base_layer().weight.detach()
    peft_delta = layer.get_delta_weight(ADAPTER_NAME).detach()
    comfy_delta = COMFY[kind](keys, base.shape)
    assert peft_delta.norm() > 1e-2 * base.norm(), f"{where}: the update is too small to tell anything"
    error = float((comfy_delta - peft_delta).norm() / peft_delta.norm())
    assert error <= 1e-5, f"{where}: ComfyUI's update differs from peft's by {error:.2e} (relative)"
    torch.testing.assert_close(base + comfy_delta, base + peft_delta, rtol=1e-5, atol=1e-6, msg=where)
    return error


# --- trained adapters on the tiny SD and SDXL pipelines, exported ---------------------------------------------


def randomise(modules, marker: str) -> None:
    """Non-trivial random adapter weights (one step leaves LoKr's zero-initialised factor near zero)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                if marker in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def diffusers_module_names(kohya_names: set[str], pipe, family: str) -> dict[str, str]:
    """kohya name -> `component.<module>` as diffusers' own kohya reader maps it (A1111/ComfyUI naming)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    # diffusers reads kohya names only on LoRA tensors: a placeholder pair per name, tagged to follow it.
    placeholders = {}
    for index, name in enumerate(sorted(kohya_names)):
        placeholders[f"{name}.lora_down.weight"] = torch.full((1, 1), float(index))
        placeholders[f"{name}.lora_up.weight"] = torch.zeros(1, 1)
    extra = {"unet_config": pipe.unet.config} if family == "sdxl" else {}
    state, _ = type(pipe).lora_state_dict(placeholders, **extra)
    # ... then each component's part as its loader converts it (load_lora_adapter, _load_lora_into_text_encoder).
    unet = convert_unet_state_dict_to_peft({k: v for k, v in state.items() if k.startswith("unet.")})
    text = {k: v for k, v in state.items() if not k.startswith("unet.")}
    text = convert_state_dict_to_peft(convert_state_dict_to_diffusers(text))
    names = sorted(kohya_names)
    return {
        names[int(t.item())]: k.removesuffix(".lora_A.weight") for k, t in {**unet, **text}.items() if "lora_A" in k
    }


def adapted_layer(pipe, module: str) -> BaseTunerLayer:
    component, _, path = module.partition(".")
    model = getattr(pipe, component)
    try:
        layer = model.get_submodule(path)
    except AttributeError:  # transformers 5's CLIP has no `text_model.` level, which kohya's names keep
        layer = model.get_submodule(path.removeprefix("text_model."))
    assert isinstance(layer, BaseTunerLayer), f"{module} is not an adapted layer"
    return layer


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_exported_keys_rebuild_the_peft_weights_by_comfyui_formulas(family, case, tmp_path):
    kind, options = CASES[case]
    pipe = tiny_pipeline_of(family)
    adapter = personalize(pipe, make_subject_images(), "dog", strategy=kind, output_dir=tmp_path, **options, **QUICK)
    components = adapter.strategy.components
    randomise([getattr(pipe, c) for c in components], adapter.strategy.marker)
    path = adapter.save(tmp_path / "dog_comfyui.safetensors", format="kohya")

    kohya = load_file(str(path))
    modules = by_module(kohya)
    adapted = {
        f"{component}.{name}"
        for component in components
        for name, layer in getattr(pipe, component).named_modules()
        if isinstance(layer, BaseTunerLayer)
    }
    assert {c for c in components if c != "unet"}, "the text encoders must be adapted and exported too"
    assert len(modules) == len(adapted), (len(modules), len(adapted))
    prefixes = ("lora_unet_", "lora_te_") if family == "sd" else ("lora_unet_", "lora_te1_", "lora_te2_")
    assert all(name.startswith(prefixes) for name in modules), sorted(modules)[:4]

    # The names are the modules diffusers' (= A1111's, ComfyUI's) kohya naming points to, each one adapted once.
    names = diffusers_module_names(set(modules), pipe, family)
    assert set(names) == set(modules)
    layers = {name: adapted_layer(pipe, module) for name, module in names.items()}
    assert len({id(layer) for layer in layers.values()}) == len(adapted)

    errors = [assert_same_update(kind, modules[name], layer, name) for name, layer in layers.items()]
    forms = {tuple(sorted(k for k in keys if k.startswith("lokr_w2"))) for keys in modules.values()}
    if case == "lokr-w2-product":
        assert forms == {("lokr_w2_a", "lokr_w2_b")}  # ComfyUI applies alpha / rank
    if case == "lokr-both-whole":
        assert forms == {("lokr_w2",)}  # ComfyUI applies no alpha: the scale 2 / 4 is in lokr_w1
    print(f"\n{family} {case}: {len(errors)} modules, max relative error {max(errors):.1e}")

    header = safe_open(str(path), "pt").metadata()
    assert header["ss_network_module"] == "lycoris.kohya"
    args = json.loads(header["ss_network_args"])
    assert args["algo"] == kind and (kind != "lokr" or args["factor"] == "-1")
    assert header["ss_network_dim"] == str(options["rank"]) and float(header["ss_network_alpha"]) == options["alpha"]
    assert header["ss_base_model_version"] == {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert adapter.identifier in header["ss_training_comment"] and header["ss_max_train_steps"] == "1"
    assert json.loads(header["db_adapters"])["file_format"] == "kohya" and "peft_config" not in header

    if case == "loha":  # `db-adapt export` from the saved file writes the same tensors as Adapter.save
        own = adapter.save(tmp_path / "dog.safetensors")
        exported = load_file(str(export_adapter(own, tmp_path / "exported.safetensors", "kohya")))
        assert exported.keys() == kohya.keys() and all(torch.equal(exported[k], kohya[k]) for k in kohya)


# --- the forms our strategies do not train, on single layers: LoKr's w1 product, Tucker cores --------------


@pytest.mark.parametrize(
    "kind, layer, options, form",
    [
        ("lokr", torch.nn.Linear(64, 48), {"r": 2, "alpha": 5, "decompose_both": True}, "lokr_w1_a"),
        ("lokr", torch.nn.Conv2d(32, 16, 3), {"r": 2, "alpha": 5, "use_effective_conv2d": True}, "lokr_t2"),
        ("lokr", torch.nn.Conv2d(32, 16, 3), {"r": 1, "alpha": 5}, "lokr_w2_b"),
        ("loha", torch.nn.Conv2d(32, 16, 3), {"r": 2, "alpha": 5, "use_effective_conv2d": True}, "hada_t1"),
        ("loha", torch.nn.Conv2d(32, 16, 3), {"r": 3, "alpha": 2}, "hada_w1_b"),
    ],
)
def test_other_peft_forms_rebuild_exactly(kind, layer, options, form):
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    config = (LoHaConfig if kind == "loha" else LoKrConfig)(target_modules=["layer"], init_weights=False, **options)
    model = torch.nn.Module()
    model.layer = layer
    inject_adapter_in_model(config, model, ADAPTER_NAME)
    randomise([model], get_strategy(kind).marker)
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}
    kohya = to_lycoris(state, kind, {"unet": config.to_dict()}, "sd")
    (keys,) = by_module(kohya).values()
    assert form in keys, sorted(keys)
    assert_same_update(kind, keys, model.layer, f"{kind} {form}")


def test_metadata_tells_sd2_by_the_cross_attention_width():
    """SD 2.x's cross-attention reads 1024-wide OpenCLIP states (SD 1.x 768): LoHa's w1_b holds the width whole,
    LoKr's splits it between its factors (32 x 32)."""
    from db_adapters.formats.lycoris import lycoris_metadata

    info = {"identifier": "olg", "class_noun": "dog", "instance_prompt": "a olg dog", "strategy_config": {"rank": 2}}
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    loha = {f"{key}.hada_w1_b": torch.zeros(2, 1024), f"{key}.hada_w2_b": torch.zeros(2, 1024)}
    lokr = {
        f"{key}.lokr_w1": torch.zeros(4, 32),
        f"{key}.lokr_w2_a": torch.zeros(8, 2),
        f"{key}.lokr_w2_b": torch.zeros(2, 32),
    }
    for strategy, state in (("loha", loha), ("lokr", lokr)):
        v2 = lycoris_metadata({**info, "strategy": strategy}, state, "sd")
        assert v2["ss_base_model_version"] == "sd_v2" and v2["ss_v2"] == "True", strategy
    narrow = {k: v[..., :768] for k, v in loha.items()}
    assert lycoris_metadata({**info, "strategy": "loha"}, narrow, "sd")["ss_base_model_version"] == "sd_v1"


# --- refusals -------------------------------------------------------------------------------------------------


def test_oft_is_refused_with_the_reason_and_nothing_is_written(tmp_path):
    pipe = tiny_pipeline_of("sd")
    adapter = personalize(
        pipe, make_subject_images(), "dog", strategy="oft", block_size=8, output_dir=tmp_path, **QUICK
    )
    reason = "cannot be written as LyCORIS keys .* exactly.* input features.* output features"
    with pytest.raises(AdapterError, match=reason):
        adapter.save(tmp_path / "oft_kohya.safetensors", format="kohya")
    own = adapter.save(tmp_path / "oft.safetensors")
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(main, ["export", str(own), "--format", "kohya", "--output", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "cannot be written as LyCORIS keys" in line and "train loha or lokr" in line
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["oft.safetensors"]


def test_the_oft_refusal_says_what_peft_oft_does():
    """The reason given is true of peft's OFT layer: it turns the input side (W @ R^T, blocks over input features),
    with a Cayley-Neumann R that is not orthogonal, where LyCORIS's oft_blocks turn the output side with an exact
    (orthogonal) Cayley transform."""
    from peft import OFTConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(32, 16)
    inject_adapter_in_model(OFTConfig(r=0, oft_block_size=8, target_modules=["proj"], init_weights=False), model)
    layer = model.proj
    base, rotation = layer.get_base_layer().weight.detach().clone(), layer.get_delta_weight("default").detach()
    assert rotation.shape == (32, 32)  # blocks over the 32 input features, not the 16 outputs
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), x @ (base @ rotation.T).T + layer.get_base_layer().bias)
    assert (rotation.T @ rotation - torch.eye(32)).abs().max() > 1e-4  # Cayley-Neumann: not orthogonal


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_kinds_on_flux_and_sd3_are_refused(kind, family):
    why = {"flux": "fuse q, k and v", "sd3": "no kohya reader for SD3"}[family]
    with pytest.raises(AdapterError, match=f"not offered in kohya/LyCORIS format: .*{why}.*written for sd and sdxl"):
        check_convertible(kind, family, "kohya")


@pytest.mark.parametrize("kind", ["loha", "lokr", "oft"])
def test_lycoris_kinds_in_peft_format_are_refused_with_what_to_use(kind):
    with pytest.raises(AdapterError, match=f"{kind} adapter is not written in peft format.*'peft_config'.*'kohya'"):
        check_convertible(kind, "sd", "peft")
