"""Tests of the prior-preservation loss against numbers worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from db_adapters.errors import InputError
from db_adapters.loss import LossHalf, LossTerms, PriorPreservationLoss, training_target

# snr = alpha_bar / (1 - alpha_bar): 0.8 / 0.2 = 4, 0.5 / 0.5 = 1, 0.2 / 0.8 = 0.25.
ALPHAS_CUMPROD = torch.tensor([0.8, 0.5, 0.2])


def constant(value: float, batch: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full((batch, 4, 2, 2), value, dtype=dtype)


def half_with_errors(errors: list[float], timesteps: list[int]) -> LossHalf:
    """A half whose sample i has prediction - target = errors[i] everywhere, so its MSE is errors[i]^2."""
    prediction = torch.stack([constant(error)[0] for error in errors])
    return LossHalf(prediction, torch.zeros_like(prediction), torch.tensor(timesteps))


def scalar(tensor: torch.Tensor) -> float:
    assert tensor.ndim == 0
    return tensor.item()


# --- plain MSE and the prior weight --------------------------------------------------------------


def test_mse_of_known_tensor():
    prediction = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    target = torch.zeros_like(prediction)
    loss = PriorPreservationLoss(ALPHAS_CUMPROD)
    # (1 + 4 + 9 + 16) / 4 = 30 / 4 = 7.5
    assert scalar(loss.half_loss(LossHalf(prediction, target, torch.tensor([1])))) == pytest.approx(7.5)


def test_per_sample_mean_then_batch_mean():
    # Sample 0 errors 1 (MSE 1), sample 1 errors 3 (MSE 9): (1 + 9) / 2 = 5.
    loss = PriorPreservationLoss(ALPHAS_CUMPROD)
    assert scalar(loss.half_loss(half_with_errors([1.0, 3.0], [0, 2]))) == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("prior_loss_weight", "expected_total"),
    [
        (0.0, 1.0),  # 1 + 0 * 4
        (0.5, 3.0),  # 1 + 0.5 * 4
        (1.0, 5.0),  # 1 + 1 * 4
        (2.0, 9.0),  # 1 + 2 * 4
    ],
)
def test_prior_loss_weight_scales_only_the_prior_half(prior_loss_weight, expected_total):
    loss = PriorPreservationLoss(ALPHAS_CUMPROD, prior_loss_weight=prior_loss_weight)
    # instance errors 1 -> MSE 1; prior errors 2 -> MSE 4 (reported unscaled).
    terms = loss(half_with_errors([1.0], [0]), half_with_errors([2.0], [1]))
    assert isinstance(terms, LossTerms)
    assert scalar(terms.instance) == pytest.approx(1.0)
    assert scalar(terms.prior) == pytest.approx(4.0)
    assert scalar(terms.total) == pytest.approx(expected_total)


def test_without_prior_half_total_is_instance_loss():
    terms = PriorPreservationLoss(ALPHAS_CUMPROD, prior_loss_weight=3.0)(half_with_errors([2.0], [0]))
    assert terms.prior is None
    assert scalar(terms.total) == pytest.approx(4.0)  # 2^2, the prior weight plays no part
    assert terms.total is terms.instance


def test_gradients_flow_through_total_and_instance_stays_attached():
    prediction = torch.tensor([[[[1.0, 3.0]]]], requires_grad=True)  # (1, 1, 1, 2)
    prior_prediction = torch.tensor([[[[2.0, 2.0]]]], requires_grad=True)
    zeros = torch.zeros(1, 1, 1, 2)
    loss = PriorPreservationLoss(ALPHAS_CUMPROD, prior_loss_weight=0.5)
    terms = loss(LossHalf(prediction, zeros, torch.tensor([0])), LossHalf(prior_prediction, zeros, torch.tensor([1])))
    assert terms.instance.requires_grad and terms.prior.requires_grad
    terms.total.backward()
    # instance: d/dx of (x0^2 + x1^2) / 2 is x -> [1, 3]
    assert prediction.grad.flatten().tolist() == pytest.approx([1.0, 3.0])
    # prior: 0.5 * d/dx of (x0^2 + x1^2) / 2 = 0.5 * x -> [1, 1]
    assert prior_prediction.grad.flatten().tolist() == pytest.approx([1.0, 1.0])


# --- SNR and min-SNR weights ---------------------------------------------------------------------


def test_snr_from_hand_made_schedule():
    snr = PriorPreservationLoss(ALPHAS_CUMPROD).snr(torch.tensor([0, 1, 2, 0]))
    assert snr.dtype == torch.float32
    assert snr.tolist() == pytest.approx([4.0, 1.0, 0.25, 4.0], rel=1e-6)


@pytest.mark.parametrize(
    ("prediction_type", "snr_gamma", "expected"),
    [
        # epsilon: min(snr, gamma) / snr with snr = 4, 1, 0.25
        ("epsilon", 1.0, [1 / 4, 1 / 1, 0.25 / 0.25]),  # [0.25, 1, 1]
        ("epsilon", 2.0, [2 / 4, 1 / 1, 0.25 / 0.25]),  # [0.5, 1, 1]
        # v_prediction: min(snr, gamma) / (snr + 1)
        ("v_prediction", 1.0, [1 / 5, 1 / 2, 0.25 / 1.25]),  # [0.2, 0.5, 0.2]
        ("v_prediction", 2.0, [2 / 5, 1 / 2, 0.25 / 1.25]),  # [0.4, 0.5, 0.2]
        ("epsilon", None, [1.0, 1.0, 1.0]),
        ("v_prediction", None, [1.0, 1.0, 1.0]),
    ],
)
def test_timestep_weights(prediction_type, snr_gamma, expected):
    loss = PriorPreservationLoss(ALPHAS_CUMPROD, prediction_type, snr_gamma=snr_gamma)
    weights = loss.timestep_weights(torch.tensor([0, 1, 2]))
    assert weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)


def test_zero_terminal_snr_gives_finite_weights():
    # alpha_bar = 0 -> snr 0 (zero-terminal-SNR schedules); alpha_bar = 1 -> snr infinite.
    alphas = torch.tensor([0.8, 0.0, 1.0])
    epsilon = PriorPreservationLoss(alphas, "epsilon", snr_gamma=2.0).timestep_weights(torch.tensor([0, 1, 2]))
    # min(snr, 2) / snr: 2 / 4 = 0.5; at snr -> 0 the ratio snr / snr -> 1; at snr = inf, 2 / inf = 0
    assert epsilon.tolist() == pytest.approx([0.5, 1.0, 0.0])
    v = PriorPreservationLoss(alphas, "v_prediction", snr_gamma=2.0).timestep_weights(torch.tensor([0, 1, 2]))
    # min(snr, 2) / (snr + 1): 2 / 5 = 0.4; 0 / 1 = 0; 2 / inf = 0
    assert v.tolist() == pytest.approx([0.4, 0.0, 0.0])


def test_min_snr_epsilon_with_different_timesteps_per_half():
    loss = PriorPreservationLoss(ALPHAS_CUMPROD, "epsilon", prior_loss_weight=0.5, snr_gamma=2.0)
    # epsilon weights with gamma 2: t0 -> 2/4 = 0.5, t1 -> 1, t2 -> 1.
    instance = half_with_errors([1.0, 2.0], [0, 1])  # MSE [1, 4], weights [0.5, 1] -> [0.5, 4], mean 2.25
    prior = half_with_errors([3.0, 1.0], [2, 0])  # MSE [9, 1], weights [1, 0.5] -> [9, 0.5], mean 4.75
    terms = loss(instance, prior)
    assert scalar(terms.instance) == pytest.approx(2.25)
    assert scalar(terms.prior) == pytest.approx(4.75)
    assert scalar(terms.total) == pytest.approx(4.625)  # 2.25 + 0.5 * 4.75 = 2.25 + 2.375
    # Weighting the prior half with the instance timesteps [0, 1] would give [9 * 0.5, 1 * 1] -> mean
    # 2.75 and total 2.25 + 1.375 = 3.625: the halves' own timesteps are what gives 4.625.


def test_min_snr_v_prediction_with_different_timesteps_per_half():
    loss = PriorPreservationLoss(ALPHAS_CUMPROD, "v_prediction", prior_loss_weight=1.0, snr_gamma=1.0)
    # v weights with gamma 1: t0 -> 1/5 = 0.2, t1 -> 1/2 = 0.5, t2 -> 0.25/1.25 = 0.2.
    instance = half_with_errors([1.0, 2.0], [0, 1])  # MSE [1, 4] -> [0.2, 2.0], mean 1.1
    prior = half_with_errors([3.0, 1.0], [2, 1])  # MSE [9, 1] -> [1.8, 0.5], mean 1.15
    terms = loss(instance, prior)
    assert scalar(terms.instance) == pytest.approx(1.1)
    assert scalar(terms.prior) == pytest.approx(1.15)
    assert scalar(terms.total) == pytest.approx(2.25)  # 1.1 + 1 * 1.15


def test_min_snr_weights_are_not_taken_from_the_concatenated_batch():
    """diffusers #5791: min-SNR weights from the 2B concatenated timesteps applied to B instance losses."""
    loss = PriorPreservationLoss(ALPHAS_CUMPROD, "epsilon", prior_loss_weight=1.0, snr_gamma=2.0)
    instance = half_with_errors([1.0], [0])  # MSE 1 at t0, weight 2/4 = 0.5 -> 0.5
    prior = half_with_errors([2.0], [2])  # MSE 4 at t2, weight 0.25/0.25 = 1 -> 4
    terms = loss(instance, prior)
    assert scalar(terms.instance) == pytest.approx(0.5)
    assert scalar(terms.total) == pytest.approx(4.5)  # 0.5 + 1 * 4

    # The bug, reproduced: weights of cat([t_instance, t_prior]) = [0.5, 1], broadcast against the
    # single instance loss 1 -> [0.5, 1], mean 0.75 instead of 0.5.
    per_sample_instance = torch.tensor([1.0])
    concatenated = torch.cat([instance.timesteps, prior.timesteps])
    buggy_instance = (per_sample_instance * loss.timestep_weights(concatenated)).mean()
    assert buggy_instance.item() == pytest.approx(0.75)
    assert scalar(terms.instance) != pytest.approx(buggy_instance.item())


def test_min_snr_on_whole_batch_matches_per_sample_hand_values():
    # Batch of 3 at t = 0, 1, 2 with errors 1, 1, 2 -> MSE [1, 1, 4]; epsilon, gamma 1 weights
    # [0.25, 1, 1] -> [0.25, 1, 4], mean 5.25 / 3 = 1.75.
    loss = PriorPreservationLoss(ALPHAS_CUMPROD, snr_gamma=1.0)
    assert scalar(loss.half_loss(half_with_errors([1.0, 1.0, 2.0], [0, 1, 2]))) == pytest.approx(1.75)


# --- precision -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_are_float32_for_half_precision_inputs(dtype):
    loss = PriorPreservationLoss(ALPHAS_CUMPROD, prior_loss_weight=0.5, snr_gamma=2.0)
    instance = LossHalf(constant(1.0, dtype=dtype), constant(0.0, dtype=dtype), torch.tensor([0]))
    prior = LossHalf(constant(2.0, dtype=dtype), constant(0.0, dtype=dtype), torch.tensor([1]))
    terms = loss(instance, prior)
    assert terms.total.dtype == terms.instance.dtype == terms.prior.dtype == torch.float32
    # instance 1 * 0.5 = 0.5; prior 4 * 1 = 4; total 0.5 + 0.5 * 4 = 2.5
    assert scalar(terms.total) == pytest.approx(2.5)


def test_small_fp16_residuals_do_not_underflow():
    # 1e-4 squared is 1e-8, below fp16's smallest subnormal (about 6e-8): in fp16 the MSE is 0.
    prediction, target = constant(1e-4, dtype=torch.float16), constant(0.0, dtype=torch.float16)
    assert ((prediction - target) ** 2).mean().item() == 0.0
    residual = prediction[0, 0, 0, 0].item()  # the fp16 value nearest 1e-4
    loss = PriorPreservationLoss(ALPHAS_CUMPROD).half_loss(LossHalf(prediction, target, torch.tensor([0])))
    assert scalar(loss) == pytest.approx(residual**2, rel=1e-5)
    assert scalar(loss) > 0


# --- from_scheduler and training_target ----------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_from_scheduler_reads_schedule_and_prediction_type(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=3, prediction_type=prediction_type)
    scheduler.alphas_cumprod = ALPHAS_CUMPROD.clone()
    loss = PriorPreservationLoss.from_scheduler(scheduler, prior_loss_weight=0.25, snr_gamma=2.0)
    assert loss.prediction_type == prediction_type
    assert loss.prior_loss_weight == 0.25 and loss.snr_gamma == 2.0
    assert loss.snr(torch.tensor([0, 1, 2])).tolist() == pytest.approx([4.0, 1.0, 0.25], rel=1e-6)


def test_from_scheduler_matches_diffusers_default_schedule():
    scheduler = DDPMScheduler()
    loss = PriorPreservationLoss.from_scheduler(scheduler)
    timesteps = torch.tensor([0, 499, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    assert torch.allclose(loss.snr(timesteps).double(), alpha_bar / (1 - alpha_bar), rtol=1e-6)


def test_from_scheduler_without_alphas_cumprod():
    with pytest.raises(InputError, match="FlowMatchEulerDiscreteScheduler has no alphas_cumprod"):
        PriorPreservationLoss.from_scheduler(FlowMatchEulerDiscreteScheduler())


def test_training_target_epsilon_is_the_noise():
    scheduler = DDPMScheduler(prediction_type="epsilon")
    noise = torch.randn(2, 4, 2, 2)
    target = training_target(scheduler, torch.randn(2, 4, 2, 2), noise, torch.tensor([5, 900]))
    assert torch.equal(target, noise)


def test_training_target_v_prediction_by_hand():
    scheduler = DDPMScheduler(num_train_timesteps=2, prediction_type="v_prediction")
    # alpha_bar 0.64 -> sqrt 0.8, sqrt(1 - 0.64) = 0.6; alpha_bar 0.36 -> 0.6 and 0.8.
    scheduler.alphas_cumprod = torch.tensor([0.64, 0.36])
    latents, noise = constant(2.0, batch=2), constant(1.0, batch=2)
    target = training_target(scheduler, latents, noise, torch.tensor([0, 1]))
    # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * latents
    # t0: 0.8 * 1 - 0.6 * 2 = -0.4;  t1: 0.6 * 1 - 0.8 * 2 = -1.0
    assert torch.allclose(target[0], torch.full((4, 2, 2), -0.4))
    assert torch.allclose(target[1], torch.full((4, 2, 2), -1.0))


def test_training_target_rejects_other_prediction_types():
    scheduler = DDPMScheduler(prediction_type="sample")
    zeros = torch.zeros(1, 4, 2, 2)
    with pytest.raises(InputError, match=r"'sample' is not supported; supported: 'epsilon', 'v_prediction'"):
        training_target(scheduler, zeros, zeros, torch.tensor([0]))


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"prediction_type": "sample"}, r"prediction type 'sample' is not supported"),
        ({"prediction_type": "flow"}, r"supported: 'epsilon', 'v_prediction'"),
        ({"prior_loss_weight": -0.1}, r"prior_loss_weight must be 0 or more"),
        ({"prior_loss_weight": float("nan")}, r"prior_loss_weight must be 0 or more"),
        ({"snr_gamma": 0.0}, r"snr_gamma must be positive or None"),
        ({"snr_gamma": -5.0}, r"snr_gamma must be positive or None"),
        ({"snr_gamma": float("nan")}, r"snr_gamma must be positive or None"),
    ],
)
def test_invalid_settings(kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        PriorPreservationLoss(ALPHAS_CUMPROD, **kwargs)


@pytest.mark.parametrize(
    ("alphas", "pattern"),
    [
        (torch.zeros(2, 2), "non-empty 1-D"),
        (torch.tensor([]), "non-empty 1-D"),
        (torch.tensor([0.5, 1.5]), r"in \[0, 1\]"),
        (torch.tensor([0.5, float("nan")]), r"in \[0, 1\]"),
    ],
)
def test_invalid_alphas_cumprod(alphas, pattern):
    with pytest.raises(InputError, match=pattern):
        PriorPreservationLoss(alphas)


@pytest.mark.parametrize(
    ("prediction", "target", "timesteps", "pattern"),
    [
        (
            torch.zeros(2, 4, 2, 2),
            torch.zeros(2, 4, 2, 3),
            torch.tensor([0, 1]),
            "prediction shape .* target shape",
        ),
        (
            torch.zeros(2, 4, 2, 2),
            torch.zeros(2, 4, 2, 2),
            torch.tensor([0]),
            r"timesteps must have shape \(2,\)",
        ),
        (
            torch.zeros(2, 4, 2, 2),
            torch.zeros(2, 4, 2, 2),
            torch.tensor([[0, 1]]),
            r"timesteps must have shape",
        ),
        (
            torch.zeros(0, 4, 2, 2),
            torch.zeros(0, 4, 2, 2),
            torch.tensor([], dtype=torch.long),
            "non-empty batch",
        ),
    ],
)
def test_loss_half_checks_shapes(prediction, target, timesteps, pattern):
    with pytest.raises(ValueError, match=pattern):
        LossHalf(prediction, target, timesteps)


def test_the_ddpm_loss_needs_integer_timesteps():
    half = LossHalf(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), torch.tensor([0.0, 1.0]))
    for loss in (PriorPreservationLoss(ALPHAS_CUMPROD), PriorPreservationLoss(ALPHAS_CUMPROD, snr_gamma=5.0)):
        with pytest.raises(ValueError, match="integer"):
            loss.half_loss(half)


def test_out_of_range_timesteps():
    loss = PriorPreservationLoss(ALPHAS_CUMPROD, snr_gamma=5.0)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 2\]"):
        loss.half_loss(half_with_errors([1.0], [3]))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 2\]"):
        loss.snr(torch.tensor([-1]))


# --- flow matching (SD3, Flux): hand-worked numbers ----------------------------------------------------


def test_flow_matching_noising_and_target_by_hand():
    from db_adapters.objectives import FlowMatchingObjective

    objective = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler().config)
    latents, noise = constant(2.0, batch=2), constant(1.0, batch=2)
    sigmas = torch.tensor([0.25, 0.5])
    # x_s = (1 - s) x_0 + s eps: 0.75 * 2 + 0.25 * 1 = 1.75; 0.5 * 2 + 0.5 * 1 = 1.5
    noisy = objective.add_noise(latents, noise, sigmas)
    assert torch.allclose(noisy[0], torch.full((4, 2, 2), 1.75)) and torch.allclose(
        noisy[1], torch.full((4, 2, 2), 1.5)
    )
    # target eps - x_0 = 1 - 2 = -1, whatever the sigma
    assert torch.equal(objective.target(latents, noise, sigmas), torch.full((2, 4, 2, 2), -1.0))


@pytest.mark.parametrize(
    ("weighting", "expected"),
    [
        ("none", [1.0, 1.0]),
        ("sigma_sqrt", [1 / 0.5**2, 1 / 0.25**2]),  # 4, 16
        # 2 / (pi (1 - 2 s + 2 s^2)): s = 0.5 -> 2 / (0.5 pi) = 1.2732; s = 0.25 -> 2 / (0.625 pi) = 1.0186
        ("cosmap", [2 / (math.pi * 0.5), 2 / (math.pi * 0.625)]),
    ],
)
def test_flow_matching_weightings_at_two_sigmas(weighting, expected):
    from db_adapters.loss import FlowMatchingLoss

    weights = FlowMatchingLoss(weighting).timestep_weights(torch.tensor([0.5, 0.25]))
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)


def test_flow_matching_halves_are_weighted_by_their_own_sigmas():
    """The instance half at sigma 0.5 and the prior half at 0.25, unit errors: sigma_sqrt gives 4 and 16, so
    total = 4 + 0.5 * 16 = 12. Weights over both halves' sigmas applied to each half (the #5791 pattern of
    the SD3/Flux scripts) would give another number."""
    from db_adapters.loss import FlowMatchingLoss

    loss = FlowMatchingLoss("sigma_sqrt", prior_loss_weight=0.5)
    instance = LossHalf(constant(1.0, batch=1), constant(0.0, batch=1), torch.tensor([0.5]))
    prior = LossHalf(constant(1.0, batch=1), constant(0.0, batch=1), torch.tensor([0.25]))
    terms = loss(instance, prior)
    assert terms.instance.item() == pytest.approx(4.0) and terms.prior.item() == pytest.approx(16.0)
    assert terms.total.item() == pytest.approx(12.0)


def test_flow_sigmas_come_from_the_schedulers_config_shift_included():
    from db_adapters.objectives import FlowMatchingObjective

    shifted = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    # index i holds t = 1000 - i, s = t / 1000, shifted 3 s / (1 + 2 s): i = 500 -> s 0.5 -> 0.75
    assert shifted.sigmas[500].item() == pytest.approx(0.75)
    assert shifted.sigmas[999].item() == pytest.approx(3 * 0.001 / (1 + 2 * 0.001))
    # Flux shifts at inference only (dynamic shifting): its training table is unshifted
    dynamic = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config)
    assert dynamic.sigmas[500].item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("density", "expected_scheme"), [("uniform", "none"), ("logit_normal", "logit_normal"), ("mode", "mode")]
)
def test_flow_densities_and_weightings_are_diffusers_own(density, expected_scheme, monkeypatch):
    import diffusers.training_utils as utils

    from db_adapters.loss import FlowMatchingLoss
    from db_adapters.objectives import FlowMatchingObjective

    calls = []
    real_density, real_weighting = utils.compute_density_for_timestep_sampling, utils.compute_loss_weighting_for_sd3
    monkeypatch.setattr(
        utils, "compute_density_for_timestep_sampling", lambda **kw: calls.append(kw) or real_density(**kw)
    )
    monkeypatch.setattr(
        utils, "compute_loss_weighting_for_sd3", lambda *a, **kw: calls.append(a) or real_weighting(*a, **kw)
    )
    objective = FlowMatchingObjective(
        FlowMatchEulerDiscreteScheduler().config, density=density, logit_mean=0.3, logit_std=0.7, mode_scale=1.1
    )
    sigmas = objective.sample_timesteps(64, torch.Generator().manual_seed(0))
    assert calls[0]["weighting_scheme"] == expected_scheme and calls[0]["batch_size"] == 64
    assert (calls[0]["logit_mean"], calls[0]["logit_std"], calls[0]["mode_scale"]) == (0.3, 0.7, 1.1)
    assert bool(((sigmas > 0) & (sigmas <= 1)).all())
    FlowMatchingLoss("cosmap").timestep_weights(sigmas)
    assert calls[1][0] == "cosmap"


def test_flow_loss_refuses_what_is_not_a_sigma():
    from db_adapters.loss import FlowMatchingLoss

    with pytest.raises(InputError, match="loss weighting 'snr' is not one of none, sigma_sqrt, cosmap"):
        FlowMatchingLoss("snr")
    with pytest.raises(ValueError, match="sigmas in"):
        FlowMatchingLoss().timestep_weights(torch.tensor([3.0]))
