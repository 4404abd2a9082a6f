"""FLUX.1 (dev and schnell): a rectified-flow transformer on packed latents, conditioned on CLIP's pooled
embedding and T5's sequence, and (dev, guidance-distilled) on a guidance value.

Serves `FluxPipeline` (text-to-image). As the pipeline does: latents (B, C, H, W) are packed into
2x2 patches, (B, HW/4, 4C), with `img_ids` giving each patch's position and `txt_ids` zeros for the
T5 tokens; the transformer's output is unpacked again. The transformer gets the sigma itself as its
timestep (the pipeline passes timestep / 1000). A guidance-distilled model (`guidance_embeds`) is
given the run's `guidance_scale` (1.0 by default, as diffusers' DreamBooth script trains FLUX.1-dev).
T5 is never trained; `train_text_encoder` trains the CLIP encoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import register_family
from .base import Conditioning, Family
from .sd3 import flow_objective

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

    from ..config import TrainConfig
    from ..objectives import Objective

# The T5 length FLUX.1's pipeline pads prompts to unless told otherwise (`max_sequence_length`).
T5_MAX_LENGTH = 512


@register_family
class Flux(Family):
    """FLUX.1: CLIP-L pooled + T5 sequence into a Flux transformer over packed latents."""

    name = "flux"
    title = "FLUX.1 dev/schnell (FluxPipeline)"
    pipeline_classes = ("FluxPipeline",)
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    trained_text_encoders = ("text_encoder",)
    class_samplers = ("pipeline",)
    # diffusers' train_dreambooth_lora_flux.py: attention of both streams and their feed-forwards.
    adapter_targets = (
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )

    @classmethod
    def max_length(cls, tokenizer_name: str, tokenizer: Any) -> int:
        return T5_MAX_LENGTH if tokenizer_name == "tokenizer_2" else int(tokenizer.model_max_length)

    @classmethod
    def resolution_multiple(cls, pipe: Any) -> int:
        return int(pipe.vae_scale_factor) * 2  # latents are packed in 2x2 patches

    @classmethod
    def encode_prompt(
        cls, pipe: Any, ids: Mapping[str, torch.Tensor], encoders: Mapping[str, torch.nn.Module] | None = None
    ) -> Conditioning:
        clip = cls.encoder(pipe, "text_encoder", encoders)
        t5 = cls.encoder(pipe, "text_encoder_2", encoders)
        pooled = clip(ids["text_encoder"].to(clip.device), output_hidden_states=False).pooler_output  # (1, D)
        sequence = t5(ids["text_encoder_2"].to(t5.device))[0]  # (1, 512, D_t5)
        return {"encoder_hidden_states": sequence, "pooled_projections": pooled.to(sequence.dtype)}

    @classmethod
    def run_conditioning(cls, pipe: Any, config: TrainConfig) -> Conditioning:
        import torch

        if not pipe.transformer.config.guidance_embeds:
            return {}  # schnell: not guidance-distilled
        return {"guidance": torch.full((1,), float(config.guidance_scale))}

    @classmethod
    def predict(
        cls, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        import torch
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)  # (B, HW/4, 4C)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        text = conditioning["encoder_hidden_states"]
        text_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        output = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(noisy.dtype),
            guidance=conditioning.get("guidance"),
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=image_ids,
        ).sample
        # The pipeline's unpacking, at the latent size itself (a VAE factor of 1).
        return FluxPipeline._unpack_latents(output, height, width, 1)

    @classmethod
    def objective(cls, pipe: Any, config: TrainConfig) -> Objective:
        return flow_objective(pipe, config, cls.title)
