"""Training objectives: how a clean latent becomes one training example, and how its error is weighted.

A model family names its objective; the trainer draws timesteps, noises latents and asks for the
target through it, and the prior-preservation loss weights each half with it. The trainer never
knows which objective it runs. `DDPMObjective` is the denoising-diffusion objective of Stable
Diffusion 1.x/2.x and SDXL (epsilon or v-prediction, optional min-SNR weighting);
`FlowMatchingObjective` is the rectified flow of SD3 and Flux.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from .loss import FlowMatchingLoss, PriorPreservationLoss, training_target

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


class FlowMatchingObjective(Objective):
    """Rectified flow (SD3, Flux): x_s = (1 - s) x_0 + s eps, target eps - x_0, at sigmas s in (0, 1].

    Sigmas come from the pipeline's `FlowMatchEulerDiscreteScheduler` config, its shift included
    (SD3's shift 3; Flux shifts at inference only, by resolution, so its training table is unshifted),
    drawn through diffusers' `compute_density_for_timestep_sampling`: u from the density, then the
    table's entry at index u * N, as diffusers' SD3 and Flux DreamBooth scripts do. The denoiser
    and the loss both receive the sigmas; a family scales them to its denoiser's timestep convention.

    Args:
        scheduler_config (`dict`): the pipeline's scheduler config.
        density (`str`): "uniform", "logit_normal" or "mode".
        logit_mean, logit_std (`float`): the logit-normal density's parameters.
        mode_scale (`float`): the "mode" density's scale.
        weighting (`str`): the loss weighting: "none", "sigma_sqrt" or "cosmap".

    Example:
        >>> import torch
        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> objective = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
        >>> sigmas = objective.sample_timesteps(4, torch.Generator().manual_seed(0))
        >>> bool(((sigmas > 0) & (sigmas <= 1)).all())
        True
    """

    def __init__(
        self,
        scheduler_config: dict[str, Any],
        density: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        weighting: str = "none",
    ) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.sigmas = scheduler.sigmas.float().cpu()  # (N,), shift applied as the config says
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.density, self.weighting = density, weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale

    def sample_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            # diffusers' name for the uniform density is anything else, e.g. "none".
            weighting_scheme="none" if self.density == "uniform" else self.density,
            batch_size=count,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            generator=generator,
        )
        indices = (u * self.num_train_timesteps).long().clamp(0, len(self.sigmas) - 1)
        return self.sigmas[indices]  # (count,)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = timesteps.reshape(-1, *[1] * (latents.ndim - 1)).to(latents.dtype)
        return (1.0 - sigmas) * latents + sigmas * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def loss(self, prior_loss_weight: float) -> FlowMatchingLoss:
        return FlowMatchingLoss(self.weighting, prior_loss_weight)
