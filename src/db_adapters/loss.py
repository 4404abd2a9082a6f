"""The DreamBooth prior-preservation loss, for the DDPM objective (optional min-SNR weighting) and for
flow matching (SD3/Flux weighting schemes).

The paper's objective (epsilon form) is

    w_t ||eps_theta(x_t, t, c) - eps||^2 + lambda * w_t' ||eps_theta(x'_t', t', c_pr) - eps'||^2

The instance half (the subject's photos, prompt c) and the prior half (generated class images,
prompt c_pr) are separate `LossHalf` values, each carrying its own noise levels (DDPM timesteps, or
flow-matching sigmas), and each is weighted with weights computed from its own levels only. Weights
computed over the concatenated 2B levels and applied to B losses (diffusers issue #5791, and the same
pattern in the SD3/Flux DreamBooth scripts) therefore cannot be expressed here.

Example:
    >>> import torch
    >>> loss = PriorPreservationLoss(torch.tensor([0.8, 0.5, 0.2]), prior_loss_weight=0.5)
    >>> instance = LossHalf(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([0]))
    >>> prior = LossHalf(torch.full((1, 4, 2, 2), 2.0), torch.zeros(1, 4, 2, 2), torch.tensor([2]))
    >>> loss(instance, prior).total.item()  # 1 + 0.5 * 4
    3.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import FLOW_WEIGHTINGS
from .errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class LossHalf:
    """One half of the DreamBooth loss: model outputs, their targets and the noise levels they were noised at.

    Args:
        prediction: Model output, shape (B, C, H, W).
        target: What the model should have output (noise, velocity, or the flow), same shape as `prediction`.
        timesteps: The noise level of each sample, shape (B,): integer DDPM timesteps, or flow-matching sigmas;
            on the prediction's device or on the CPU.

    Example:
        >>> import torch
        >>> LossHalf(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), torch.tensor([3, 7])).timesteps.shape
        torch.Size([2])
    """

    prediction: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor

    def __post_init__(self) -> None:
        if self.prediction.shape != self.target.shape:
            raise ValueError(
                f"prediction shape {tuple(self.prediction.shape)} and target shape "
                f"{tuple(self.target.shape)} must be the same"
            )
        if self.prediction.ndim == 0 or self.prediction.shape[0] == 0:
            raise ValueError(f"prediction needs a non-empty batch dimension, got shape {tuple(self.prediction.shape)}")
        batch = self.prediction.shape[0]
        if self.timesteps.ndim != 1 or self.timesteps.shape[0] != batch:
            raise ValueError(
                f"timesteps must have shape ({batch},), one per sample of prediction "
                f"{tuple(self.prediction.shape)}, got {tuple(self.timesteps.shape)}"
            )


@dataclass(frozen=True)
class LossTerms:
    """The loss to backpropagate and its two parts, kept attached to the graph.

    Attributes:
        total: instance + prior_loss_weight * prior, a scalar to call `.backward()` on.
        instance: The weighted instance (subject) loss, a scalar.
        prior: The weighted, unscaled prior (class) loss, a scalar; None without prior preservation.
    """

    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


class HalfWeightedLoss:
    """instance + `prior_loss_weight` * prior, each half's per-sample MSE weighted by its own noise levels.

    Subclasses say how a noise level becomes a weight (`timestep_weights`).
    """

    prior_loss_weight: float = 1.0

    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """One float32 weight per sample."""
        raise NotImplementedError

    def half_loss(self, half: LossHalf) -> torch.Tensor:
        """Weighted MSE of one half: per-sample mean over C, H, W, times that half's own weights, batch mean.

        Args:
            half: Predictions, targets and noise levels of one half (instance or prior).

        Returns:
            A float32 scalar, attached to the graph of `half.prediction`.

        Example:
            >>> import torch
            >>> half = LossHalf(torch.full((2, 1, 1, 1), 3.0), torch.ones(2, 1, 1, 1), torch.tensor([0, 1]))
            >>> PriorPreservationLoss(torch.tensor([0.8, 0.5])).half_loss(half).item()  # (3 - 1)^2
            4.0
        """
        # float32 even under fp16/bf16 autocast: squared errors of small residuals underflow in fp16.
        error = half.prediction.float() - half.target.float()
        per_sample = error.pow(2).reshape(error.shape[0], -1).mean(dim=1)
        # The noise levels may stay on the CPU (the trainer keeps them there: no device sync for the weights).
        return (per_sample * self.timestep_weights(half.timesteps).to(per_sample.device)).mean()

    def __call__(self, instance: LossHalf, prior: LossHalf | None = None) -> LossTerms:
        """Compute instance + prior_loss_weight * prior, each half weighted by its own noise levels.

        Args:
            instance: The subject images' half.
            prior: The class images' half, or None to train without prior preservation.

        Returns:
            The total loss to backpropagate and its parts for logging.

        Example:
            >>> import torch
            >>> half = LossHalf(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([0]))
            >>> PriorPreservationLoss(torch.tensor([0.8])).__call__(half).prior is None
            True
        """
        instance_loss = self.half_loss(instance)
        if prior is None:
            return LossTerms(total=instance_loss, instance=instance_loss, prior=None)
        prior_loss = self.half_loss(prior)
        total = instance_loss + self.prior_loss_weight * prior_loss
        return LossTerms(total=total, instance=instance_loss, prior=prior_loss)


def _check_prior_loss_weight(prior_loss_weight: float) -> float:
    if not prior_loss_weight >= 0:
        raise InputError(f"prior_loss_weight must be 0 or more, got {prior_loss_weight!r}; 1.0 is the usual value")
    return float(prior_loss_weight)


class PriorPreservationLoss(HalfWeightedLoss):
    """DreamBooth's loss: instance MSE plus `prior_loss_weight` times class-image MSE, each min-SNR weighted.

    Args:
        alphas_cumprod: The noise schedule's cumulative alpha products, shape (T,), values in [0, 1].
        prediction_type: What the model predicts: "epsilon" (noise) or "v_prediction" (velocity).
        prior_loss_weight: Lambda, the weight of the prior-preservation half; 0 or more.
        snr_gamma: Gamma of min-SNR weighting (Hang et al. 2023; 5.0 is the usual value), or None
            for plain, unweighted MSE.

    Example:
        >>> import torch
        >>> loss = PriorPreservationLoss(torch.tensor([0.8, 0.5, 0.2]), snr_gamma=1.0)
        >>> weights = loss.timestep_weights(torch.tensor([0, 1, 2]))  # min(snr, 1) / snr, snr = 4, 1, 0.25
        >>> [round(weight, 4) for weight in weights.tolist()]
        [0.25, 1.0, 1.0]
    """

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        prior_loss_weight: float = 1.0,
        snr_gamma: float | None = None,
    ) -> None:
        _check_prediction_type(prediction_type)
        _check_prior_loss_weight(prior_loss_weight)
        if snr_gamma is not None and not snr_gamma > 0:
            raise InputError(
                f"snr_gamma must be positive or None (no min-SNR weighting), got {snr_gamma!r}; 5.0 is the usual value"
            )
        self.prediction_type = prediction_type
        self.prior_loss_weight = float(prior_loss_weight)
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        self._snr_table = _snr_table(alphas_cumprod)

    @classmethod
    def from_scheduler(
        cls, scheduler: Any, *, prior_loss_weight: float = 1.0, snr_gamma: float | None = None
    ) -> PriorPreservationLoss:
        """Build the loss from a diffusers training scheduler (e.g. `DDPMScheduler`).

        Args:
            scheduler: A scheduler with `alphas_cumprod` and `config.prediction_type`.
            prior_loss_weight: Lambda, the weight of the prior-preservation half.
            snr_gamma: Gamma of min-SNR weighting, or None for none.

        Returns:
            A loss using the scheduler's noise schedule and prediction type.

        Example:
            >>> from diffusers import DDPMScheduler
            >>> PriorPreservationLoss.from_scheduler(DDPMScheduler(), snr_gamma=5.0).prediction_type
            'epsilon'
        """
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise InputError(
                f"{type(scheduler).__name__} has no alphas_cumprod; train with a DDPM-family scheduler "
                "such as diffusers.DDPMScheduler"
            )
        return cls(
            alphas_cumprod,
            prediction_type=_prediction_type(scheduler),
            prior_loss_weight=prior_loss_weight,
            snr_gamma=snr_gamma,
        )

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep, float32, on their device.

        Args:
            timesteps: Integer timesteps, any shape.

        Returns:
            The SNR of each timestep, same shape as `timesteps`.

        Example:
            >>> import torch
            >>> PriorPreservationLoss(torch.tensor([0.8, 0.5])).snr(torch.tensor([1])).tolist()
            [1.0]
        """
        self._check_timesteps_in_range(timesteps)
        return self._snr_table.to(timesteps.device)[timesteps]

    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The min-SNR loss weight of each timestep (all ones without `snr_gamma`), float32.

        epsilon: min(snr, gamma) / snr; v_prediction: min(snr, gamma) / (snr + 1), as in the min-SNR
        paper and diffusers' training scripts.

        Args:
            timesteps: Integer timesteps, any shape.

        Returns:
            One weight per timestep, same shape as `timesteps`.

        Example:
            >>> import torch
            >>> loss = PriorPreservationLoss(torch.tensor([0.8, 0.5]), "v_prediction", snr_gamma=2.0)
            >>> round(loss.timestep_weights(torch.tensor([0])).item(), 4)  # min(4, 2) / (4 + 1)
            0.4
        """
        _check_integer(timesteps)
        if self.snr_gamma is None:
            return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
        snr = self.snr(timesteps)
        if self.prediction_type == "epsilon":
            # min(snr, gamma) / snr written as min(1, gamma / snr): equal, but gives the limit 1
            # instead of 0/0 = NaN at the zero-SNR last step of zero-terminal-SNR schedules.
            return (self.snr_gamma / snr).clamp(max=1.0)
        return snr.clamp(max=self.snr_gamma) / (snr + 1.0)

    def _check_timesteps_in_range(self, timesteps: torch.Tensor) -> None:
        _check_integer(timesteps)
        # Out-of-range indices are a device-side assert on CUDA, far harder to read than this message.
        steps = self._snr_table.shape[0]
        if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= steps):
            raise ValueError(
                f"timesteps must lie in [0, {steps - 1}] (the schedule has {steps} steps), got "
                f"{int(timesteps.min())}..{int(timesteps.max())}"
            )


def _check_integer(timesteps: torch.Tensor) -> None:
    if timesteps.is_floating_point() or timesteps.is_complex():
        raise ValueError(f"timesteps must be integer indices into alphas_cumprod, got dtype {timesteps.dtype}")


class FlowMatchingLoss(HalfWeightedLoss):
    """The prior-preservation loss for rectified-flow models (SD3, Flux), each half weighted by its own sigmas.

    The weights are diffusers' `compute_loss_weighting_for_sd3`: "none" 1, "sigma_sqrt" 1 / sigma^2,
    "cosmap" 2 / (pi (1 - 2 sigma + 2 sigma^2)).

    Args:
        weighting: "none", "sigma_sqrt" or "cosmap".
        prior_loss_weight: Lambda, the weight of the prior-preservation half; 0 or more.

    Example:
        >>> import torch
        >>> loss = FlowMatchingLoss("sigma_sqrt")
        >>> loss.timestep_weights(torch.tensor([0.5, 0.25])).tolist()  # 1 / sigma^2
        [4.0, 16.0]
    """

    def __init__(self, weighting: str = "none", prior_loss_weight: float = 1.0) -> None:
        if weighting not in FLOW_WEIGHTINGS:
            raise InputError(f"loss weighting {weighting!r} is not one of {', '.join(FLOW_WEIGHTINGS)}")
        self.weighting = weighting
        self.prior_loss_weight = _check_prior_loss_weight(prior_loss_weight)

    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The weight of each sample from its sigma in (0, 1], float32, shape (B,)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigmas = timesteps.float()
        if not sigmas.is_floating_point() or (sigmas.numel() and (sigmas.min() < 0 or sigmas.max() > 1)):
            raise ValueError("flow-matching noise levels must be sigmas in [0, 1]")
        return compute_loss_weighting_for_sd3(self.weighting, sigmas).float().reshape(sigmas.shape)


def training_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the model should predict for noised `latents`: the noise, or the velocity.

    Args:
        scheduler: The training scheduler; its `config.prediction_type` picks the target.
        latents: Clean latents x_0, shape (B, C, H, W).
        noise: The noise added to them, same shape.
        timesteps: Timesteps they were noised at, shape (B,).

    Returns:
        `noise` for "epsilon"; sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * latents for
        "v_prediction".

    Raises:
        InputError: The scheduler predicts something else (e.g. "sample").

    Example:
        >>> import torch
        >>> from diffusers import DDPMScheduler
        >>> noise = torch.randn(1, 4, 8, 8)
        >>> training_target(DDPMScheduler(), torch.zeros(1, 4, 8, 8), noise, torch.tensor([10])) is noise
        True
    """
    prediction_type = _prediction_type(scheduler)
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def _prediction_type(scheduler: Any) -> str:
    prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", None)
    if prediction_type is None:
        raise InputError(
            f"{type(scheduler).__name__} has no config.prediction_type; train with a DDPM-family "
            "scheduler such as diffusers.DDPMScheduler"
        )
    return prediction_type


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(
            f"prediction type {prediction_type!r} is not supported; supported: "
            f"{', '.join(map(repr, PREDICTION_TYPES))}. Use a model and scheduler trained for one of them"
        )


def _snr_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    alphas = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    if alphas.ndim != 1 or alphas.numel() == 0:
        raise InputError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(alphas.shape)}")
    if bool(((alphas < 0) | (alphas > 1) | alphas.isnan()).any()):
        raise InputError("alphas_cumprod values must lie in [0, 1]; pass the scheduler's alphas_cumprod")
    # float64 for the division, where 1 - alpha_bar is tiny at early steps; stored float32 for MPS/CUDA use.
    return (alphas / (1.0 - alphas)).to(torch.float32)
