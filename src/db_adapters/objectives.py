"""Training objectives: how a clean latent becomes one training example, and how its error is weighted.

A model family names its objective; the trainer draws timesteps, noises latents and asks for the
target through it, and the prior-preservation loss weights each half with it. The trainer never
knows which objective it runs. `DDPMObjective` is the denoising-diffusion objective of Stable
Diffusion 1.x/2.x and SDXL (epsilon or v-prediction, optional min-SNR weighting).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from .loss import PriorPreservationLoss, training_target

if TYPE_CHECKING:
    import torch


class Objective(ABC):
    """What a family trains its denoiser to do."""

    @abstractmethod
    def sample_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` training timesteps, drawn from `generator` (on the CPU, so runs are reproducible)."""

    @abstractmethod
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The noised latents x_t the denoiser sees."""

    @abstractmethod
    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser should output for x_t."""

    @abstractmethod
    def loss(self, prior_loss_weight: float) -> PriorPreservationLoss:
        """The prior-preservation loss, weighting each half by its own timesteps as this objective does."""


class DDPMObjective(Objective):
    """Denoising diffusion (Ho et al.): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, target eps or v.

    Training noise always follows the DDPM forward process of the model's own schedule, whatever
    sampler the user set on the pipeline for inference.

    Args:
        scheduler_config (`dict`): the pipeline's scheduler config (betas, prediction type, ...).
        snr_gamma (`float | None`): min-SNR weighting gamma, or None for plain MSE.

    Example:
        >>> from diffusers import DDPMScheduler
        >>> import torch
        >>> objective = DDPMObjective(DDPMScheduler().config)
        >>> objective.sample_timesteps(3, torch.Generator().manual_seed(0)).shape
        torch.Size([3])
    """

    def __init__(self, scheduler_config: dict[str, Any], snr_gamma: float | None = None) -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.snr_gamma = snr_gamma

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def sample_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        import torch

        return torch.randint(0, self.scheduler.config.num_train_timesteps, (count,), generator=generator)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return training_target(self.scheduler, latents, noise, timesteps)

    def loss(self, prior_loss_weight: float) -> PriorPreservationLoss:
        return PriorPreservationLoss.from_scheduler(
            self.scheduler, prior_loss_weight=prior_loss_weight, snr_gamma=self.snr_gamma
        )
