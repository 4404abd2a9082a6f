"""Stable Diffusion 3 and 3.5: an MMDiT transformer trained by rectified flow, conditioned on CLIP-L,
CLIP-G and T5-XXL.

Serves `StableDiffusion3Pipeline` (text-to-image). As the pipeline computes it: both CLIP encoders'
penultimate hidden states side by side, zero-padded to T5's width, then T5's sequence after them;
the pooled projections of both CLIP encoders side by side. A pipeline loaded without T5
(`text_encoder_3=None`, to save memory) gets zeros for T5's part, as at inference. T5 is never
trained; `train_text_encoder` trains the two CLIP encoders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import InputError
from . import register_family
from .base import Conditioning, Family

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

    from ..config import TrainConfig
    from ..objectives import Objective

# The T5 length SD3's pipeline pads prompts to unless told otherwise (`max_sequence_length`).
T5_MAX_LENGTH = 256


@register_family
class StableDiffusion3(Family):
    """SD3/SD3.5: CLIP-L + CLIP-G + T5 prompt embeddings and pooled projections into an SD3 transformer."""

    name = "sd3"
    title = "Stable Diffusion 3/3.5 (StableDiffusion3Pipeline)"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    trained_text_encoders = ("text_encoder", "text_encoder_2")
    optional_parts = ("text_encoder_3", "tokenizer_3")
    class_samplers = ("pipeline",)
    # diffusers' train_dreambooth_lora_sd3.py: the joint attention's projections, both streams.
    adapter_targets = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )

    @classmethod
    def max_length(cls, tokenizer_name: str, tokenizer: Any) -> int:
        return T5_MAX_LENGTH if tokenizer_name == "tokenizer_3" else int(tokenizer.model_max_length)

    @classmethod
    def encode_prompt(
        cls, pipe: Any, ids: Mapping[str, torch.Tensor], encoders: Mapping[str, torch.nn.Module] | None = None
    ) -> Conditioning:
        import torch

        hidden, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            encoder = cls.encoder(pipe, name, encoders)
            output = encoder(ids[name].to(encoder.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # (1, 77, D_i)
            pooled.append(output.text_embeds)  # (1, P_i)
        clip = torch.cat(hidden, dim=-1)
        t5 = cls.encoder(pipe, "text_encoder_3", encoders)
        if t5 is not None:
            sequence = t5(ids["text_encoder_3"].to(t5.device))[0]  # (P, 256, D_t5)
        else:  # as the pipeline does without T5: zeros of the transformer's joint width
            width = pipe.transformer.config.joint_attention_dim
            sequence = torch.zeros(clip.shape[0], T5_MAX_LENGTH, width, dtype=clip.dtype, device=clip.device)
        clip = torch.nn.functional.pad(clip, (0, sequence.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, sequence.to(clip.dtype)], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }

    @classmethod
    def predict(
        cls, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        # The objective's noise levels are sigmas; SD3's transformer takes sigma * 1000, as its pipeline gives.
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps * 1000.0,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            pooled_projections=conditioning["pooled_projections"],
        ).sample

    @classmethod
    def objective(cls, pipe: Any, config: TrainConfig) -> Objective:
        return flow_objective(pipe, config, cls.title)


def flow_objective(pipe: Any, config: TrainConfig, title: str) -> Objective:
    """The rectified-flow objective of the pipeline's scheduler; DDPM-only settings are refused, not ignored."""
    from ..objectives import FlowMatchingObjective

    if config.snr_gamma is not None:
        raise InputError(
            f"snr_gamma={config.snr_gamma!r} applies to DDPM models (SD 1.x/2.x, SDXL); {title} trains by "
            "rectified flow: use loss_weighting ('sigma_sqrt', 'cosmap') and timestep_density instead."
        )
    return FlowMatchingObjective(
        pipe.scheduler.config,
        density=config.timestep_density,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        mode_scale=config.mode_scale,
        weighting=config.loss_weighting,
    )
