"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, epsilon or v-prediction.

Serves `StableDiffusionPipeline` and its subclasses (text-to-image); img2img and inpainting pipelines
are other classes and are not served.
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

PREDICTION_TYPES = ("epsilon", "v_prediction")


class DiffusionFamily(Family):
    """What the DDPM families (SD 1.x/2.x, SDXL) share: an epsilon or v-prediction scheduler and its objective."""

    @classmethod
    def check(cls, pipe: Any) -> None:
        super().check(pipe)
        check_prediction_type(pipe)

    @classmethod
    def objective(cls, pipe: Any, config: TrainConfig) -> Objective:
        return ddpm_objective(pipe, config, cls.title)


@register_family
class StableDiffusion(DiffusionFamily):
    """SD 1.x/2.x: the prompt's last hidden state conditions the UNet through cross-attention."""

    name = "sd"
    title = "Stable Diffusion 1.x/2.x (StableDiffusionPipeline)"
    pipeline_classes = ("StableDiffusionPipeline",)
    embedding_file_keys = {"text_encoder": "emb_params"}  # A1111's name; diffusers' load_textual_inversion reads it

    @classmethod
    def encode_prompt(
        cls, pipe: Any, ids: Mapping[str, torch.Tensor], encoders: Mapping[str, torch.nn.Module] | None = None
    ) -> Conditioning:
        encoder = cls.encoder(pipe, "text_encoder", encoders)
        return {"encoder_hidden_states": encoder(ids["text_encoder"].to(encoder.device))[0]}  # (1, 77, D)

    @classmethod
    def predict(
        cls, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        return denoiser(noisy, timesteps, conditioning["encoder_hidden_states"]).sample


def ddpm_objective(pipe: Any, config: TrainConfig, title: str) -> Objective:
    """The DDPM objective of the pipeline's schedule; flow-matching settings are refused, not ignored."""
    from ..objectives import DDPMObjective

    flow_settings = {"timestep_density": "uniform", "loss_weighting": "none"}
    changed = [
        f"{name}={getattr(config, name)!r}"
        for name, default in flow_settings.items()
        if getattr(config, name) != default
    ]
    if changed:
        raise InputError(
            f"{', '.join(changed)} applies to flow-matching models (SD3, Flux); {title} trains the DDPM objective: "
            "use snr_gamma for timestep weighting."
        )
    return DDPMObjective(pipe.scheduler.config, config.snr_gamma)


def check_prediction_type(pipe: Any) -> None:
    """`InputError` unless the pipeline's scheduler predicts epsilon or v (the DDPM objectives we train)."""
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(
            f"scheduler prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}."
        )
