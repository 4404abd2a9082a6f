"""LoRA on a quantized base (QLoRA): refused where it cannot work, trained where bitsandbytes runs (CPU
nf4 layers here; the GPU script covers `quantize_base`), and saved as a file for the unquantized base."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_subject_images, render_np

from db_adapters import InputError, load_adapter, personalize
from db_adapters.adapter import BaseModelWarning
from db_adapters.families import get_family
from db_adapters.quantize import is_quantized
from db_adapters.safe_reading import read_tensors
from db_adapters.testing import quantize_linear_layers, tiny_pipeline, tiny_pipeline_of

QUICK = {"steps": 3, "num_class_images": 2, "class_inference_steps": 2, "progress": False}


def test_quantize_base_without_a_gpu_says_what_to_do(tmp_path):
    with pytest.raises(InputError, match=r"quantize_base='nf4' needs a CUDA GPU .* on cpu; move it"):
        personalize(tiny_pipeline(), make_subject_images(), "dog", quantize_base="nf4", output_dir=tmp_path, **QUICK)


@pytest.mark.parametrize("quantized_already", [True, False])
def test_a_full_fine_tune_of_a_quantized_base_is_refused(quantized_already, tmp_path):
    pipe = tiny_pipeline()
    settings = {"strategy": "full", "output_dir": tmp_path, **QUICK}
    if quantized_already:
        quantize_linear_layers(pipe.unet)
    else:
        settings["quantize_base"] = "nf4"
    with pytest.raises(InputError, match="strategy='full' cannot train a quantized base"):
        personalize(pipe, make_subject_images(), "dog", **settings)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_lora_on_a_quantized_base_trains_and_loads_onto_the_unquantized_base(family, tmp_path):
    pipe = tiny_pipeline_of(family)
    denoiser_name = get_family(family).denoiser
    quantize_linear_layers(getattr(pipe, denoiser_name))
    assert is_quantized(getattr(pipe, denoiser_name))
    adapter = personalize(pipe, make_subject_images(), "dog", learning_rate=1e-2, output_dir=tmp_path, **QUICK)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in adapter.history)
    lora = {n: p for n, p in getattr(pipe, denoiser_name).named_parameters() if ".lora_" in n}
    assert lora and {p.dtype for p in lora.values()} == {torch.float32}
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    path = adapter.save(tmp_path / "qlora.safetensors")
    assert all(t.dtype == torch.float32 for t in read_tensors(path).values())

    prompt = f"a {adapter.identifier} dog"
    plain = tiny_pipeline_of(family)  # the unquantized base
    base = render_np(plain, prompt)
    plain.load_lora_weights(str(path))
    assert abs(render_np(plain, prompt) - base).max() > 1e-3
    fresh = tiny_pipeline_of(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelWarning)  # the same base model: no warning either
        load_adapter(fresh, path)
    assert abs(render_np(fresh, prompt) - render_np(plain, prompt)).max() <= 1e-4
