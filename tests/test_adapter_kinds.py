"""The peft adapter kinds beyond LoRA (DoRA, LoHa, LoKr, OFT), on every family's tiny pipeline.

One matrix of kinds x families with the same checks: the kind trains (its weights change, the base
weights do not), its file loads into a fresh pipeline and renders the same, and unloading gives back
the base model's pixels exactly; a DoRA file also loads through plain diffusers. Then the kinds'
options, damaged files, and (with -s) their file sizes on the tiny SD pipeline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_subject_images, render_np
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from db_adapters import AdapterError, InputError, get_strategy, load_adapter, personalize, unload_adapter
from db_adapters.adapter_file import METADATA_KEY
from db_adapters.families import get_family
from db_adapters.safe_reading import read_file_metadata, read_tensors
from db_adapters.testing import TINY_PIPELINES, tiny_pipeline_of

KINDS = ["dora", "loha", "lokr", "oft"]
FAMILIES = list(TINY_PIPELINES)
QUICK = {"num_class_images": 2, "class_inference_steps": 2, "progress": False}
RENDER_STEPS = 2


@pytest.fixture(scope="module")
def class_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One class-image cache per family, shared by the kinds (the same seed draws the same images)."""
    return {family: tmp_path_factory.mktemp(f"class-{family}") for family in FAMILIES}


@pytest.fixture(scope="module")
def base_renders() -> dict[tuple[str, str], np.ndarray]:
    """The base pipelines' pictures, by family and prompt: rendered once, compared by every kind."""
    return {}


def base_render(cache: dict, family: str, prompt: str) -> np.ndarray:
    if (family, prompt) not in cache:
        cache[family, prompt] = render_np(tiny_pipeline_of(family), prompt, steps=RENDER_STEPS)
    return cache[family, prompt]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items()}


def adapter_weights(pipe, marker: str, components) -> torch.Tensor:
    return torch.cat(
        [
            p.detach().flatten().clone()
            for c in components
            for n, p in getattr(pipe, c).named_parameters()
            if marker in n
        ]
    )


def assert_base_model(pipe, components, base) -> None:
    """No adapter layer or peft config is left, and every weight is the base model's."""
    for name in components:
        module = getattr(pipe, name)
        assert not any(isinstance(m, BaseTunerLayer) for m in module.modules()), name
        assert not getattr(module, "peft_config", None), name
        state = module.state_dict()
        assert state.keys() == base[name].keys(), name
        assert all(torch.equal(state[k], v) for k, v in base[name].items()), name


# --- every kind on every family -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_kind_trains_saves_loads_and_unloads(family, kind, class_images, base_renders, tmp_path):
    pipe = tiny_pipeline_of(family)
    components = get_family(family).components(train_text_encoder=True)
    base = {name: snapshot(getattr(pipe, name)) for name in components}
    marker = get_strategy(kind).marker
    seen: list[torch.Tensor] = []
    adapter = personalize(
        pipe,
        make_subject_images(),
        "dog",
        strategy=kind,
        train_text_encoder=True,
        steps=2,
        learning_rate=1e-2,
        class_image_dir=class_images[family],
        output_dir=tmp_path,
        callback=lambda step, logs: seen.append(adapter_weights(pipe, marker, components)),
        **QUICK,
    )
    assert not torch.equal(seen[0], seen[-1]), "the adapter's weights did not change between steps 1 and 2"
    for name in components:  # every trained component has the kind's layers; its base weights are untouched
        state = snapshot(getattr(pipe, name))
        assert any(marker in k for k in state), name
        assert all(torch.equal(state[k], v) for k, v in base[name].items()), name
    path = adapter.save(tmp_path / f"{kind}.safetensors")
    prompt = f"a {adapter.identifier} dog"
    trained = render_np(pipe, prompt, steps=RENDER_STEPS)
    base_pixels = base_render(base_renders, family, prompt)
    assert np.abs(trained - base_pixels).max() > 1e-3, "training left the pictures as they were"

    fresh = tiny_pipeline_of(family)
    loaded = load_adapter(fresh, path)
    assert loaded.strategy.name == kind and loaded.strategy.train_text_encoder
    assert np.abs(render_np(fresh, prompt, steps=RENDER_STEPS) - trained).max() <= 1e-4

    unload_adapter(pipe)
    assert np.array_equal(render_np(pipe, prompt, steps=RENDER_STEPS), base_pixels)
    assert_base_model(pipe, components, base)

    if kind == "dora":  # no db_adapters on the loading side: the pipeline class's own load_lora_weights
        plain = tiny_pipeline_of(family)
        plain.load_lora_weights(str(path))
        difference = np.abs(render_np(plain, prompt, steps=RENDER_STEPS) - trained).max()
        print(f"{family}: DoRA through plain diffusers differs by {difference:.2e}")
        assert difference <= 1e-4


# --- files on the tiny SD pipeline: sizes, DoRA as a LoRA option, plain peft, damage --------------------

# Options that give each kind about as many trainable weights as rank-4 LoRA (LoKr's count follows its
# Kronecker factors: on the tiny model's 32/64-wide layers they are full matrices whatever the rank).
MATCHED = {
    "lora": {"rank": 4},
    "dora": {"rank": 4},
    "loha": {"rank": 2},
    "lokr": {"rank": 4},
    "oft": {"block_size": 16},
}


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One-step adapter files of every kind on the tiny SD pipeline (denoiser only), and LoRA with use_dora."""
    folder = tmp_path_factory.mktemp("sd-files")
    runs = {kind: (kind, options) for kind, options in MATCHED.items()}
    runs["lora-use_dora"] = ("lora", {"rank": 4, "use_dora": True})
    files = {}
    for name, (strategy, options) in runs.items():
        adapter = personalize(
            tiny_pipeline_of("sd"),
            make_subject_images(),
            "dog",
            strategy=strategy,
            steps=1,
            learning_rate=1e-2,
            prior_preservation=False,  # the files' sizes and keys do not depend on it
            output_dir=folder,
            progress=False,
            **options,
        )
        files[name] = adapter.save(folder / f"{name}.safetensors")
    return files


def test_file_sizes_at_matched_parameter_counts(sd_files):
    rows = []
    for kind, options in MATCHED.items():
        path = sd_files[kind]
        count = sum(t.numel() for t in read_tensors(path).values())
        rows.append(f"{kind:5} {json.dumps(options):18} {count:6} weights  {path.stat().st_size:7} bytes")
    print("\ntiny SD, denoiser only:\n" + "\n".join(rows))
    assert all(path.stat().st_size > 0 for path in sd_files.values())


def test_lora_with_use_dora_writes_the_dora_file(sd_files):
    dora, lora = sd_files["dora"], sd_files["lora-use_dora"]
    dora_tensors, lora_tensors = read_tensors(dora), read_tensors(lora)
    assert dora_tensors.keys() == lora_tensors.keys()
    assert any(k.endswith("lora_magnitude_vector") for k in dora_tensors)
    assert all(torch.equal(dora_tensors[k], lora_tensors[k]) for k in dora_tensors)
    dora_header, lora_header = read_file_metadata(dora), read_file_metadata(lora)
    assert dora_header["lora_adapter_metadata"] == lora_header["lora_adapter_metadata"]
    assert json.loads(dora_header["lora_adapter_metadata"])["unet.use_dora"] is True
    ours = {name: json.loads(header[METADATA_KEY]) for name, header in (("dora", dora_header), ("lora", lora_header))}
    assert (ours["dora"].pop("strategy"), ours["lora"].pop("strategy")) == ("dora", "lora")
    assert ours["dora"] == ours["lora"]  # the same options, use_dora=True among them


@pytest.mark.parametrize("kind", ["loha", "lokr", "oft"])
def test_plain_peft_rebuilds_the_layers_from_the_file(kind, sd_files):
    """The header's peft config and the tensors are all plain peft needs."""
    from peft import PeftConfig, inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    path = sd_files[kind]
    config = PeftConfig.from_peft_type(**json.loads(read_file_metadata(path)["peft_config"])["unet"])
    plain = tiny_pipeline_of("sd")
    inject_adapter_in_model(config, plain.unet, "mine")
    weights = {k.removeprefix("unet."): v for k, v in read_tensors(path).items()}
    result = set_peft_model_state_dict(plain.unet, weights, adapter_name="mine")
    assert not result.unexpected_keys
    ours = tiny_pipeline_of("sd")
    load_adapter(ours, path)
    inputs = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)  # latents, t, prompt
    with torch.no_grad():
        theirs, mine, base = (unet(*inputs).sample for unet in (plain.unet, ours.unet, tiny_pipeline_of("sd").unet))
    assert torch.equal(theirs, mine) and not torch.allclose(mine, base)


def _rewrite(path, tmp_path, edit) -> object:
    tensors, header = read_tensors(path), read_file_metadata(path)
    edit(tensors)
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata=header)
    return damaged


def _drop_one(tensors):
    tensors.pop(sorted(tensors)[0])


def _reshape_one(tensors):
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(tensors[key].numel() + 1)


@pytest.mark.parametrize("edit", [_drop_one, _reshape_one], ids=["missing weight", "wrong shape"])
@pytest.mark.parametrize("kind", ["loha", "lokr", "oft"])
def test_damaged_file_is_an_adapter_error_and_leaves_the_pipeline(kind, edit, sd_files, tmp_path):
    damaged = _rewrite(sd_files[kind], tmp_path, edit)
    pipe = tiny_pipeline_of("sd")
    components = get_family("sd").components(train_text_encoder=True)
    base = {name: snapshot(getattr(pipe, name)) for name in components}
    with pytest.raises(AdapterError, match="damaged.safetensors"):
        load_adapter(pipe, damaged)
    assert_base_model(pipe, components, base)
    load_adapter(pipe, sd_files[kind])  # the pipeline is as good as new
    unload_adapter(pipe)
    assert_base_model(pipe, components, base)


# --- options --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "options", "match"),
    [
        ("dora", {"rank": 0}, "rank"),
        ("dora", {"use_dora": False}, "use_dora"),
        ("lora", {"use_dora": "yes"}, "use_dora"),
        ("loha", {"alpha": -1}, "alpha"),
        ("loha", {"rank_dropout": 1.0}, "rank_dropout"),
        ("loha", {"dropout": 0.1}, "dropout"),  # LoRA's input dropout; LoHa has rank_ and module_dropout
        ("lokr", {"decompose_factor": 0}, "decompose_factor"),
        ("lokr", {"target_modules": []}, "target_modules"),
        ("oft", {"block_size": 0}, "block_size"),
        ("oft", {"module_dropout": -0.1}, "module_dropout"),
        ("oft", {"rank": 4}, "rank"),
    ],
)
def test_bad_options_are_input_errors_naming_the_option(kind, options, match):
    with pytest.raises(InputError, match=match):
        get_strategy(kind)(**options)


@pytest.mark.parametrize(
    ("kind", "options", "match"),
    [
        ("oft", {"block_size": 24}, r"block_size=24 does not divide .* 32 .* such as 16"),
        ("loha", {"target_modules": ["no_such_layer"]}, r"strategy 'loha' cannot adapt .*no_such_layer"),
    ],
)
def test_options_that_do_not_fit_the_pipeline_are_refused_before_training(kind, options, match):
    pipe = tiny_pipeline_of("sd")
    components = get_family("sd").components(train_text_encoder=True)
    base = {name: snapshot(getattr(pipe, name)) for name in components}
    with pytest.raises(InputError, match=match):
        get_strategy(kind)(**options).apply(pipe, get_family("sd"), train_text_encoder=True)
    assert_base_model(pipe, components, base)


@pytest.mark.parametrize(("kind", "options"), [*[(kind, {}) for kind in KINDS], ("lora", {"use_dora": True})])
def test_a_quantized_base_is_refused(kind, options, tmp_path):
    """Only LoRA trains on 4/8-bit layers (QLoRA); peft's other layers fail on bitsandbytes' CPU stand-in."""
    from db_adapters.testing import quantize_linear_layers

    pipe = tiny_pipeline_of("sd")
    quantize_linear_layers(pipe.unet)
    with pytest.raises(InputError, match=f"strategy='{kind}' cannot train a quantized base.*strategy='lora'"):
        personalize(pipe, make_subject_images(), "dog", strategy=kind, output_dir=tmp_path, steps=1, **options, **QUICK)
