"""LoRA on a quantized base (QLoRA): the frozen denoiser in 4-bit NF4 or 8-bit, through bitsandbytes.

`personalize(..., quantize_base="nf4")` reloads the pipeline's denoiser through diffusers'
`BitsAndBytesConfig` (which needs a CUDA GPU), after the class images and latents were made with the
full-precision base; a pipeline whose denoiser was already loaded so is trained as it is. LoRA's
own weights stay fp32, and the file they are saved to loads onto the unquantized base with plain
`load_lora_weights` (the module names do not change). Other strategies (full, DoRA, LoHa, LoKr, OFT) refuse
a quantized base.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import QUANTIZATIONS
from .errors import InputError

if TYPE_CHECKING:
    import torch

    from .families import Family
    from .strategies import Strategy

__all__ = ["QUANTIZATIONS", "check_quantization", "is_quantized", "quantize_denoiser"]


def is_quantized(module: Any) -> bool:
    """Whether `module` holds bitsandbytes-quantized weights (loaded so, or quantized by `quantize_base`).

    Example:
        >>> import torch
        >>> is_quantized(torch.nn.Linear(2, 2))
        False
    """
    if getattr(module, "is_quantized", False):  # diffusers' flag on a model loaded with a quantization_config
        return True
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in module.parameters())


def check_quantization(kind: str | None, denoiser: Any, strategy: Strategy, device: torch.device) -> None:
    """Refuse what cannot work: a quantized base for a strategy that cannot train one (its
    `quantized_base_refusal` says why), quantizing without a CUDA GPU."""
    quantized = kind is not None or is_quantized(denoiser)
    if quantized and strategy.quantized_base_refusal:
        raise InputError(
            f"strategy={strategy.name!r} cannot train a quantized base ({strategy.quantized_base_refusal}); use "
            "strategy='lora' with a quantized base, or load the model unquantized."
        )
    if kind is not None and device.type != "cuda":
        raise InputError(
            f"quantize_base={kind!r} needs a CUDA GPU (diffusers' BitsAndBytesConfig quantizes on the GPU), and "
            f"the pipeline is on {device}; move it with pipe.to('cuda') first, or leave quantize_base unset."
        )


def quantize_denoiser(pipe: Any, family: type[Family], kind: str, compute_dtype: torch.dtype) -> Any:
    """Replace the pipeline's denoiser by its copy quantized to `kind`; returns the original (to restore it).

    The copy is loaded with diffusers' `BitsAndBytesConfig` from the model's own folder when the
    pipeline came from one, else from a temporary save of the denoiser.

    Args:
        pipe (`DiffusionPipeline`): the pipeline, on a CUDA device.
        family (`type[Family]`): its family (which component is the denoiser).
        kind (`str`): "nf4" (4-bit NormalFloat, double quantization) or "int8".
        compute_dtype (`torch.dtype`): the dtype the quantized layers compute in.

    Example:
        >>> original = quantize_denoiser(pipe, family_of(pipe), "nf4", torch.bfloat16)  # doctest: +SKIP
    """
    from diffusers import BitsAndBytesConfig

    from .pipelines import model_id

    if kind == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    original = getattr(pipe, family.denoiser)
    source = Path(model_id(pipe) or "")
    with tempfile.TemporaryDirectory(prefix="db-adapters-quantize-") as scratch:
        if (source / family.denoiser / "config.json").is_file():
            folder = source / family.denoiser
        else:
            original.save_pretrained(scratch)
            folder = Path(scratch)
        quantized = type(original).from_pretrained(str(folder), quantization_config=config, dtype=compute_dtype)
    original.to("cpu")  # kept to put back if training fails; host memory, not the GPU's
    setattr(pipe, family.denoiser, quantized)
    return original
