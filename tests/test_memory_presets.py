"""`memory=` presets: what each budget chooses for models of real sizes, and how a run resolves them."""

from __future__ import annotations

import pytest
from PIL import Image

from db_adapters import InputError
from db_adapters.memory import memory_preset, static_gigabytes
from db_adapters.plan import make_plan
from db_adapters.subjects import Subject
from db_adapters.testing import tiny_pipeline

# Denoiser parameter counts of the real models, in half precision.
SD15, SDXL, FLUX = 859_520_964, 2_567_463_684, 11_901_408_320


def preset(budget: str, parameters: int, *, full: bool = False, quantizable: bool = True) -> dict:
    return memory_preset(budget, parameters, 2, trains_every_weight=full, can_quantize=quantizable)


def test_smaller_budgets_switch_on_more_savings_for_sd15_lora():
    chosen = {budget: preset(budget, SD15) for budget in ("24gb", "16gb", "12gb", "8gb")}
    assert [c["gradient_checkpointing"] for c in chosen.values()] == [False, True, True, True]
    assert [c["use_8bit_adam"] for c in chosen.values()] == [False, False, True, True]
    assert [c["quantize_base"] for c in chosen.values()] == [None, None, None, "nf4"]
    assert all(c["offload_frozen"] for c in chosen.values())


def test_a_full_fine_tune_of_sd15_fits_16gb_with_8bit_adam_and_is_refused_at_8gb():
    assert preset("16gb", SD15, full=True, quantizable=False)["use_8bit_adam"]  # DreamBooth's 16 GB recipe
    assert static_gigabytes(SD15, 2, trains_every_weight=True, use_8bit_adam=True, quantize_base=None) < 0.75 * 16
    with pytest.raises(
        InputError, match=r"memory='8gb' cannot hold .* use memory='12gb' or a larger .*strategy='lora'"
    ):
        preset("8gb", SD15, full=True, quantizable=False)


def test_flux_lora_quantizes_until_its_12b_weights_fit():
    at_24gb = preset("24gb", FLUX)
    assert at_24gb["quantize_base"] == "int8"  # 23.8 GB in bf16 does not leave room
    assert not at_24gb["use_8bit_adam"]  # a LoRA's own AdamW state shrinks nothing worth a step
    assert preset("12gb", FLUX)["quantize_base"] == "nf4"  # QLoRA: the peers' ~9 GB recipe
    with pytest.raises(InputError, match=r"memory='8gb' .* about 6.5 GB .* use memory='12gb'"):
        preset("8gb", FLUX)


def test_sdxl_lora_fits_every_preset_and_its_full_fine_tune_none():
    assert [preset(b, SDXL)["quantize_base"] for b in ("24gb", "16gb", "12gb", "8gb")] == [None, None, None, "nf4"]
    with pytest.raises(InputError, match=r"about 25.7 GB .* use a GPU with more memory"):
        preset("24gb", SDXL, full=True, quantizable=False)


def test_settings_the_caller_fixed_count_in_the_fit_and_the_refusal_names_them():
    fits = memory_preset("16gb", SD15, 2, trains_every_weight=True, can_quantize=False, fixed={"use_8bit_adam": None})
    assert fits["use_8bit_adam"]  # None is "unset": the preset may choose
    with pytest.raises(
        InputError,
        match=r"about 13.8 GB .* use memory='24gb' .* leave use_8bit_adam=False out so the preset may choose",
    ):
        memory_preset("16gb", SD15, 2, trains_every_weight=True, can_quantize=False, fixed={"use_8bit_adam": False})
    fixed_base = memory_preset(
        "24gb", FLUX, 2, trains_every_weight=False, can_quantize=True, fixed={"quantize_base": "nf4"}
    )
    assert fixed_base["quantize_base"] == "nf4"


def test_a_strategy_that_cannot_train_a_quantized_base_is_never_given_one():
    assert preset("8gb", SDXL, quantizable=False)["quantize_base"] is None
    with pytest.raises(InputError, match="use a GPU with more memory"):
        preset("24gb", FLUX, quantizable=False)


def plan_of(pipe, **settings):
    images = [Image.new("RGB", (32, 32), "red")]
    return make_plan(pipe, [Subject(images, "dog")], strategy=settings.pop("strategy", "lora"), settings=settings)


def test_a_run_takes_the_presets_choices_for_what_it_left_unset():
    config = plan_of(tiny_pipeline(), memory="12gb").config
    assert (config.gradient_checkpointing, config.use_8bit_adam, config.offload_frozen) == (True, True, True)
    config = plan_of(tiny_pipeline(), memory="12gb", use_8bit_adam=False, gradient_checkpointing=False).config
    assert (config.gradient_checkpointing, config.use_8bit_adam) == (False, False)  # what the caller said wins
    config = plan_of(tiny_pipeline()).config
    assert (config.gradient_checkpointing, config.use_8bit_adam, config.quantize_base) == (False, False, None)


def test_a_preset_that_would_quantize_a_cpu_pipeline_says_so():
    with pytest.raises(InputError, match=r"memory=.8gb. quantizes .*\(nf4\).* needs a CUDA GPU.* on cpu"):
        plan_of(tiny_pipeline(), memory="8gb")


def test_an_unknown_preset_is_refused_with_the_choices():
    with pytest.raises(InputError, match="24gb"):
        plan_of(tiny_pipeline(), memory="6gb")
