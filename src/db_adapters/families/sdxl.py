"""Stable Diffusion XL: two CLIP text encoders, a UNet conditioned on pooled text and image size.

Serves `StableDiffusionXLPipeline` (text-to-image, base model). SDXL img2img, inpainting and the
refiner are other classes (the refiner also lacks the first text encoder) and are not served.
As SDXL computes it: the penultimate hidden states of both encoders, concatenated, condition
cross-attention; encoder 2's pooled projection and `add_time_ids` (original size, crop top-left,
target size) enter through the UNet's added conditioning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import register_family
from .base import Conditioning
from .sd import DiffusionFamily

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import torch

    from ..data import CropGeometry


@register_family
class StableDiffusionXL(DiffusionFamily):
    """SDXL base: text_encoder (CLIP ViT-L) + text_encoder_2 (OpenCLIP ViT-bigG with projection)."""

    name = "sdxl"
    title = "Stable Diffusion XL (StableDiffusionXLPipeline)"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")

    @classmethod
    def encode_prompt(
        cls, pipe: Any, ids: Mapping[str, torch.Tensor], encoders: Mapping[str, torch.nn.Module] | None = None
    ) -> Conditioning:
        import torch

        hidden, pooled = [], None
        for name in cls.text_encoders:
            encoder = cls.encoder(pipe, name, encoders)
            output = encoder(ids[name].to(encoder.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # (1, 77, D_i): SDXL conditions on the penultimate layer
            pooled = output.text_embeds if hasattr(output, "text_embeds") else pooled
        # Only the last encoder (the one with a projection) gives the pooled embedding, as in SDXL.
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    @classmethod
    def image_conditioning(cls, geometries: Sequence[CropGeometry], resolution: int) -> Conditioning:
        import torch

        # add_time_ids: (original height, width, crop top, left, target height, width), per image.
        rows = [[*g.original_size, *g.crop_top_left, resolution, resolution] for g in geometries]
        return {"time_ids": torch.tensor(rows, dtype=torch.float32)}

    @classmethod
    def predict(
        cls, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        return denoiser(noisy, timesteps, conditioning["encoder_hidden_states"], added_cond_kwargs=added).sample

    @classmethod
    def native_resolution(cls, pipe: Any) -> int:
        # SDXL's pipeline reads its default size from `default_sample_size` (128 latents -> 1024 px).
        sample_size = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
        return int(sample_size) * int(pipe.vae_scale_factor)
