"""Rendering with a personalized pipeline: a seeded batch of images saved as one PNG grid."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError
from .files import write_atomically

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from PIL import Image


def check_png_path(path: str | os.PathLike) -> Path:
    """Validate an output image path: a `.png` name in a writable folder."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"output {str(path)!r} must end in .png.")
    folder = path.parent if str(path.parent) else Path(".")
    if folder.exists() and not os.access(folder, os.W_OK):
        raise InputError(f"output folder {str(folder)!r} is not writable; choose another --output.")
    return path


def render(
    pipe: DiffusionPipeline,
    prompt: str,
    *,
    num_images: int = 1,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    lora_scale: float = 1.0,
) -> list[Image.Image]:
    """Generate `num_images` images of `prompt`; image i uses seed `seed + i`, so each is reproducible.

    Args:
        pipe (`DiffusionPipeline`): the (personalized) pipeline.
        prompt (`str`): the text prompt.
        num_images (`int`): how many images.
        seed (`int`): first seed.
        steps (`int`): sampler steps.
        guidance_scale (`float`): classifier-free guidance scale.
        negative_prompt (`str | None`): what to steer away from.
        lora_scale (`float`): LoRA strength (ignored without LoRA layers).

    Example:
        >>> from db_adapters.testing import tiny_pipeline
        >>> len(render(tiny_pipeline(), "a dog", num_images=2, steps=2))
        2
    """
    import torch

    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
    with torch.no_grad():
        return pipe(
            [prompt] * num_images,
            negative_prompt=[negative_prompt] * num_images if negative_prompt else None,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            **_lora_scale_argument(pipe, lora_scale),
        ).images


def _lora_scale_argument(pipe: DiffusionPipeline, scale: float) -> dict:
    # UNet pipelines take the LoRA scale in cross_attention_kwargs, MMDiT ones (SD3, Flux) in joint_attention_kwargs.
    import inspect

    accepted = inspect.signature(pipe.__call__).parameters
    for name in ("cross_attention_kwargs", "joint_attention_kwargs"):
        if name in accepted:
            return {name: {"scale": scale}}
    return {}


def grid(images: list[Image.Image], rows: int | None = None) -> Image.Image:
    """Lay images out in `rows` rows (default: a near-square grid); empty cells are white."""
    from diffusers.utils import make_image_grid

    rows = rows or math.ceil(len(images) / math.ceil(math.sqrt(len(images))))
    cols = math.ceil(len(images) / rows)
    blank = images[0].copy().point(lambda _: 255)
    return make_image_grid(images + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)


def render_grid(pipe: DiffusionPipeline, prompt: str, path: Path, **kwargs) -> Path:
    """`render` then save the grid to `path` atomically."""
    sheet = grid(render(pipe, prompt, **kwargs))
    return write_atomically(path, lambda tmp: sheet.save(tmp, format="PNG"))
