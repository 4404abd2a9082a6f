"""One readable DreamBooth training loop on accelerate.

It takes a pipeline already made trainable by a strategy, the encoded training set and the run plan,
and optimises `strategy.trainable_parameters(pipe)`; it knows neither the strategy nor the model
family by name. Each step draws `batch_size` instance and `batch_size` class latents, noises each with
its own timesteps (the family's objective), runs the denoiser once on both halves (the family's
`predict`), and hands the halves to the loss separately.

With `RunCheckpoints` it saves its complete state every N steps (trainable weights, optimizer,
lr scheduler, gradient scaler, step, every RNG, data order, loss history) and resumes from one
bit-exactly: the global torch RNG (dropout) is seeded from `config.seed` for the run and restored
with the rest, so a resumed run computes the very same steps the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .checkpoint import optimizer_state, restore_optimizer, restore_rng, rng_state
from .distributed import rank_seed
from .errors import TrainingError
from .loss import LossHalf

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import torch

    from .checkpoint import RunCheckpoints
    from .config import TrainConfig
    from .latents import TrainingHalf, TrainingSet
    from .plan import RunPlan

logger = logging.getLogger("db_adapters")

StepCallback = Callable[[int, dict[str, float]], None]
LOSS_NAMES = ("loss", "instance", "prior")


@dataclass
class HalfBatch:
    """One half's share of a step: noisy latents (B, C, h, w), timesteps (B,), targets, conditioning."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    conditioning: dict[str, torch.Tensor]

    @staticmethod
    def concatenate(halves: list[HalfBatch]) -> HalfBatch:
        """Both halves as one batch, instance first, for a single denoiser call."""
        import torch

        return HalfBatch(
            noisy=torch.cat([h.noisy for h in halves]),
            timesteps=torch.cat([h.timesteps for h in halves]),
            target=torch.cat([h.target for h in halves]),
            conditioning={key: torch.cat([h.conditioning[key] for h in halves]) for key in halves[0].conditioning},
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> HalfBatch:
        """On `device`; floating inputs in the denoiser's `dtype` (timesteps keep theirs)."""

        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)

        return HalfBatch(
            noisy=move(self.noisy),
            timesteps=self.timesteps.to(device),
            target=self.target.to(device),  # float32 whatever the denoiser's dtype: the loss is computed in it
            conditioning={key: move(value) for key, value in self.conditioning.items()},
        )


class IndexStream:
    """Endless shuffled passes over N items, drawn from one generator (so runs are reproducible)."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size, self.generator, self.order, self.position = size, generator, [], 0

    def take(self, count: int) -> torch.Tensor:
        import torch

        picked = []
        while len(picked) < count:
            if self.position >= len(self.order):
                self.order = torch.randperm(self.size, generator=self.generator).tolist()
                self.position = 0
            picked.append(self.order[self.position])
            self.position += 1
        return torch.tensor(picked)

    def state(self) -> dict[str, Any]:
        """The pass order and position (JSON-able); the generator is saved by its owner."""
        return {"size": self.size, "order": list(self.order), "position": self.position}

    def load_state(self, state: dict[str, Any]) -> None:
        if state["size"] != self.size:
            raise TrainingError(f"the checkpoint's data has {state['size']} items, this run {self.size}.")
        self.order, self.position = list(state["order"]), int(state["position"])


@contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG (CPU, and `device` if CUDA) for the block; the caller's state after.

    Dropout and peft's LoRA initialisation draw from the global RNG; seeding it per run makes a run
    depend on `seed` alone, not on what the process did before.

    Args:
        seed (`int`): the run's seed.
        device (`torch.device`): the training device; a CUDA device's RNG is forked and seeded too.

    Example:
        >>> import torch
        >>> with seeded_global_rng(1, torch.device("cpu")):
        ...     a = torch.rand(1)
        >>> with seeded_global_rng(1, torch.device("cpu")):
        ...     b = torch.rand(1)
        >>> bool(a == b)
        True
    """
    import torch

    cuda = device.type == "cuda" and torch.cuda.is_available()
    index = device.index if device.index is not None else (torch.cuda.current_device() if cuda else 0)
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _make_accelerator(config: TrainConfig, device: torch.device) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from .distributed import processes

    # processes() sets accelerate's state up for CPU (gloo) when several CPU processes were launched;
    # a bare PartialState() would make each of them a single process on a machine without GPUs.
    if processes(device).world == 1:
        # accelerate keeps one process-wide state and refuses a second Accelerator with other
        # settings; a library is called many times per process, so start each run afresh.
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=device.type == "cpu",
        # The modules stay on the pipeline's device: `prepare` would move them to accelerate's current
        # device (cuda:0 for a pipeline on cuda:1) while the frozen VAE and encoders stayed behind.
        device_placement=False,
    )


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused when every trainable tensor is on CUDA or the CPU), or bitsandbytes' 8-bit AdamW."""
    import torch

    kwargs = {
        "betas": config.adam_betas,
        "weight_decay": config.adam_weight_decay,
        "eps": config.adam_epsilon,
    }
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, min_8bit_size=config.adam_min_8bit_size, **kwargs)
    parameters = [p for group in groups for p in group["params"]]
    # None leaves the choice to torch (foreach elsewhere, e.g. on MPS).
    return torch.optim.AdamW(groups, fused=True if fused_adamw_suits(parameters) else None, **kwargs)


def fused_adamw_suits(parameters: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW (one kernel for every tensor) can update `parameters`: all floating, on CUDA or CPU.

    torch's own default on the CPU is a for-loop over the tensors that reads each one's step count
    with `.item()`: 256 host syncs a step for a rank-4 LoRA on SD's UNet, and a profiled 9 ms of a
    0.26 s step on the medium benchmark pipeline; fused takes it to one kernel call.

    Args:
        parameters (`Sequence[torch.Tensor]`): the trainable tensors.

    Example:
        >>> import torch
        >>> fused_adamw_suits([torch.nn.Parameter(torch.zeros(2))])
        True
    """
    import torch

    floating = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return bool(parameters) and all(p.device.type in ("cuda", "cpu") and p.dtype in floating for p in parameters)


@contextmanager
def training_mode(modules: list[torch.nn.Module], gradient_checkpointing: bool) -> Iterator[None]:
    """Train mode (and gradient checkpointing) for the duration; each module's previous mode after."""
    previous = [m.training for m in modules]
    for module in modules:
        module.train()
        if gradient_checkpointing:
            _set_checkpointing(module, True)
    try:
        yield
    finally:
        for module, was_training in zip(modules, previous, strict=True):
            module.train(was_training)
            if gradient_checkpointing:
                _set_checkpointing(module, False)


def _set_checkpointing(module: torch.nn.Module, on: bool) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
        module.enable_gradient_checkpointing() if on else module.disable_gradient_checkpointing()
    else:  # transformers models
        module.gradient_checkpointing_enable() if on else module.gradient_checkpointing_disable()


class Trainer:
    """Runs `config.steps` optimiser steps of DreamBooth on `pipe`, in place.

    With `checkpoints` it saves its state when `checkpoints.due(step)`; with `resume_from` (a
    checkpoint's path, tensors and info) it continues from that checkpoint's step.
    """

    def __init__(
        self,
        pipe: Any,
        plan: RunPlan,
        data: TrainingSet,
        *,
        callback: StepCallback | None = None,
        validation: Callable[[int], None] | None = None,
        checkpoints: RunCheckpoints | None = None,
        resume_from: tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None = None,
        extra_parameters: dict[str, list[torch.nn.Parameter]] | None = None,
    ) -> None:
        self.pipe, self.plan, self.data, self.config = pipe, plan, data, plan.config
        self.family, self.strategy = plan.family, plan.strategy
        # Training runs where the pipeline is (a pipeline on cuda:1 trains on cuda:1), not on
        # accelerate's current device.
        self.device = plan.device
        self.lrs = {name: self.config.text_encoder_learning_rate for name in self.family.text_encoders}
        self.lrs[self.family.denoiser] = self.config.learning_rate
        # Parameters outside the strategy's, by group name: pivotal tuning's new token rows.
        self.extra_parameters = extra_parameters or {}
        self.lrs["token_embeddings"] = self.config.token_learning_rate
        self.callback, self.validation = callback, validation
        self.checkpoints, self.resume_from = checkpoints, resume_from
        self.last_checkpoint: Path | None = resume_from[0] if resume_from else None
        self.objective = self.family.objective(pipe, self.config)
        self.loss = self.objective.loss(self.config.prior_loss_weight)
        self.history: list[dict[str, float]] = []
        self._input_dtype: torch.dtype | None = None  # read at the first step, after the strategy applied

    def run(self) -> list[dict[str, float]]:
        config = self.config
        self._params = {**self.strategy.trainable_parameters(self.pipe), **self.extra_parameters}
        for group in self._params.values():
            for param in group:
                param.requires_grad_(True)
        trainable = [p for group in self._params.values() for p in group]
        self._check_trainable_dtypes(trainable)
        components = [c for c in self.family.components() if self._params.get(c)]
        modules = [getattr(self.pipe, c) for c in components]
        accelerator = _make_accelerator(config, self.device)
        models, optimizer, lr_scheduler = self._prepare(accelerator, components, modules)
        self._accelerator, self._optimizer, self._lr_scheduler = accelerator, optimizer, lr_scheduler
        self._seed = rank_seed(config.seed, accelerator.process_index)
        self._models = dict(zip(components, models, strict=True))
        if config.compile and self.family.denoiser in self._models:
            self._models[self.family.denoiser] = _compiled(self._models[self.family.denoiser])
        self._data_streams()
        progress = _progress_bar(config, accelerator)
        try:
            with (
                seeded_global_rng(self._seed, accelerator.device),
                training_mode(modules, config.gradient_checkpointing),
            ):
                start = self._restore(*self.resume_from[1:]) if self.resume_from else 0
                progress.update(start)
                for step in range(start + 1, config.steps + 1):
                    logs = self._optimiser_step(accelerator, models, optimizer, lr_scheduler, trainable, step)
                    self.history.append({"step": step, **logs})
                    progress.update(1)
                    progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if k != "lr"})
                    self._after_step(step, logs, accelerator)
            _log_steps_run(start, config.steps)
        finally:
            progress.close()
            for model in models:
                # Takes accelerate's autocast wrapper off the pipeline's own modules again.
                accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            accelerator.free_memory()
            for param in trainable:
                param.grad = None
        return self.history

    def _prepare(self, accelerator: Any, components: list[str], modules: list[Any]) -> tuple[list, Any, Any]:
        from diffusers.optimization import get_scheduler

        config = self.config
        groups = [{"params": self._params[c], "lr": self.lrs[c]} for c in [*components, *self.extra_parameters]]
        optimizer = make_optimizer(groups, config)
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=config.steps * accelerator.num_processes,
        )
        prepared = accelerator.prepare(*modules, optimizer, lr_scheduler)
        return list(prepared[: len(modules)]), prepared[-2], prepared[-1]

    def _data_streams(self) -> None:
        import torch

        # One generator draws data order, latents, noise and timesteps: its state is the data's state.
        # Each process of a multi-process run draws its own (rank_seed; rank 0 keeps `seed`).
        self._generator = torch.Generator("cpu").manual_seed(self._seed)
        self._instances = IndexStream(len(self.data.instance.latents), self._generator)
        prior = self.data.prior
        self._priors = IndexStream(len(prior.latents), self._generator) if prior is not None else None

    def _after_step(self, step: int, logs: dict[str, float], accelerator: Any) -> None:
        import torch

        config = self.config
        if self.callback is not None:
            self.callback(step, logs)
        if self.validation and config.validation_every and step % config.validation_every == 0:
            # Previews draw their own noise; they must not move the training RNG.
            with torch.random.fork_rng(devices=_cuda_devices(accelerator.device), device_type="cuda"):
                self.validation(step)
        if self.checkpoints is not None and self.checkpoints.due(step) and accelerator.is_main_process:
            self.last_checkpoint = self.checkpoints.save(step, *self.state(step))
            logger.info("saved checkpoint %s", self.last_checkpoint)

    def state(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The complete training state after `step`: (tensors for safetensors, JSON-able info)."""
        tensors: dict[str, torch.Tensor] = {}
        for component, group in self._params.items():
            for index, param in enumerate(group):
                tensors[f"weights.{component}.{index}"] = param.detach().cpu()
        optimizer_tensors, optimizer_plain = optimizer_state(self._optimizer)
        rng_tensors, rng_plain = rng_state()
        tensors |= optimizer_tensors | rng_tensors
        tensors["rng.trainer"] = self._generator.get_state()
        scaler = self._accelerator.scaler
        info = {
            "steps": self.config.steps,
            "weights": {c: [list(p.shape) for p in group] for c, group in self._params.items()},
            "optimizer": optimizer_plain,
            "lr_scheduler": self._lr_scheduler.state_dict(),
            "grad_scaler": scaler.state_dict() if scaler is not None else {},
            "rng": rng_plain,
            "data": {
                "instance": self._instances.state(),
                "prior": self._priors.state() if self._priors is not None else None,
            },
            "history": self.history,
        }
        return tensors, info

    def _restore(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> int:
        """Load a `state()` back; returns the step it was taken after."""
        import torch

        shapes = {c: [list(p.shape) for p in group] for c, group in self._params.items()}
        if info["weights"] != shapes:
            raise TrainingError(
                f"the checkpoint's trainable weights ({_count(info['weights'])}) do not match this run's "
                f"({_count(shapes)}); use a new output_dir."
            )
        with torch.no_grad():
            for component, group in self._params.items():
                for index, param in enumerate(group):
                    param.copy_(tensors[f"weights.{component}.{index}"].to(param.device, param.dtype))
        restore_optimizer(self._optimizer, tensors, info["optimizer"])
        self._lr_scheduler.load_state_dict(info["lr_scheduler"])
        if info["grad_scaler"] and self._accelerator.scaler is not None:
            self._accelerator.scaler.load_state_dict(info["grad_scaler"])
        step = int(info["step"])
        if self._accelerator.process_index == 0:
            restore_rng(tensors, info["rng"])
            self._generator.set_state(tensors["rng.trainer"])
            self._instances.load_state(info["data"]["instance"])
            if self._priors is not None:
                self._priors.load_state(info["data"]["prior"])
        else:
            # Only the main process's RNG and data order are saved: the other processes go on with
            # fresh noise (a resume is bit-exact on one process; on several, weights and optimizer are).
            fresh = rank_seed(self.config.seed + step, self._accelerator.process_index)
            self._generator.manual_seed(fresh)
            torch.random.default_generator.manual_seed(fresh)
        self.history = [dict(entry) for entry in info["history"]]
        logger.warning("resuming from step %d of %d (%s)", step, self.config.steps, self.resume_from[0])
        return step

    def _check_trainable_dtypes(self, trainable: list[torch.nn.Parameter]) -> None:
        import torch

        if self.config.mixed_precision == "no":
            return
        wrong = sorted({str(p.dtype).removeprefix("torch.") for p in trainable if p.dtype != torch.float32})
        if wrong:
            raise TrainingError(
                f"strategy {self.strategy.name!r} left trainable weights in {', '.join(wrong)}; under "
                f"mixed_precision={self.config.mixed_precision!r} they must be float32 (AMP unscales only fp32 "
                "gradients). Cast them to float32 in the strategy's apply(), or train with mixed_precision='no'."
            )

    def _optimiser_step(self, accelerator, models, optimizer, lr_scheduler, trainable, step: int) -> dict[str, float]:
        # The losses stay on the device until the optimiser is about to change the weights: one host
        # sync per optimiser step (not one per `.item()` per micro-step), after backward was queued.
        unchecked: list[torch.Tensor] = []
        checked: list[list[float]] = []
        for _ in range(self.config.gradient_accumulation_steps):
            with accelerator.accumulate(*models):
                terms = self._loss_terms(accelerator)
                accelerator.backward(terms.total)
                unchecked.append(_loss_values(terms))
                if accelerator.sync_gradients:
                    checked += self._checked(unchecked, step)
                    unchecked = []
                    accelerator.clip_grad_norm_(trainable, self.config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        checked += self._checked(unchecked, step)
        logs = {name: sum(row[i] for row in checked) / len(checked) for i, name in enumerate(LOSS_NAMES)}
        if self.data.prior is None:
            logs.pop("prior")
        logs["lr"] = float(lr_scheduler.get_last_lr()[0])
        return logs

    def _checked(self, values: list[torch.Tensor], step: int) -> list[list[float]]:
        """The micro-steps' (total, instance, prior) losses as floats, in one host sync; a non-finite one raises.

        Called before `optimizer.step()`: the weights (and any checkpoint) are still those of the last good step.
        """
        import torch

        rows = torch.stack(values).tolist() if values else []
        for row in rows:
            for name, value in zip(LOSS_NAMES[1:], row[1:], strict=True):
                if not math.isfinite(value):
                    raise TrainingError(self._non_finite_message(name, value, step))
        return rows

    def _non_finite_message(self, term: str, value: float, step: int) -> str:
        config = self.config
        advice = f"lower the learning rate (now {self.config.learning_rate:g})"
        if config.mixed_precision != "no":
            advice += f" or train in fp32 (mixed_precision='no' instead of {config.mixed_precision!r})"
        else:
            advice += ", or set max_grad_norm lower or snr_gamma=5.0"
        saved = ""
        if self.last_checkpoint is not None:
            saved = f" The last checkpoint, {self.last_checkpoint}, is intact."
        elif self.checkpoints is not None:
            saved = " No checkpoint had been written yet."
        return f"the {term} loss became {value} at step {step} of {config.steps}; {advice}, and start a new run.{saved}"

    def _half_batch(self, half: TrainingHalf, stream: IndexStream) -> HalfBatch:
        """`batch_size` items of one half, noised with their own timesteps (on the CPU generator)."""
        import torch

        gen, batch = self._generator, self.config.batch_size
        indices = stream.take(batch)
        latents = half.latents.sample(indices, gen)  # (B, C, h, w)
        noise = torch.randn(latents.shape, generator=gen)
        if self.config.noise_offset:
            noise = noise + self.config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
        timesteps = self.objective.sample_timesteps(batch, gen)
        prompts = half.prompt_embeds
        if prompts is None:  # the text encoders train: encode the prompts through them, every step
            prompts = self.family.encode_prompt(self.pipe, half.prompt_ids, self._models | self.data.frozen_encoders)
        chosen = half.prompt_index[indices].to(next(iter(prompts.values())).device)  # each item's own prompt
        conditioning = {key: value[chosen] for key, value in prompts.items()}
        conditioning |= {key: value[indices] for key, value in half.image_conditioning.items()}
        conditioning |= {key: value.expand(batch, *value.shape[1:]) for key, value in self.data.shared.items()}
        return HalfBatch(
            noisy=self.objective.add_noise(latents, noise, timesteps),
            timesteps=timesteps,
            target=self.objective.target(latents, noise, timesteps),
            conditioning=conditioning,
        )

    def _loss_terms(self, accelerator: Any) -> Any:
        halves = [self._half_batch(self.data.instance, self._instances)]
        if self.data.prior is not None:
            halves.append(self._half_batch(self.data.prior, self._priors))
        both = HalfBatch.concatenate(halves)  # drawn on the CPU generator: one copy of each tensor to the device
        if self._input_dtype is None:
            # Once: diffusers' `ModelMixin.dtype` walks every submodule, 8 ms a step on a medium UNet.
            self._input_dtype = getattr(self.pipe, self.family.denoiser).dtype
        inputs = both.to(self.device, self._input_dtype)
        with accelerator.autocast():
            prediction = self.family.predict(
                self._models[self.family.denoiser], inputs.noisy, inputs.timesteps, inputs.conditioning
            )
        batch = self.config.batch_size
        # The loss gets the CPU copy of the noise levels: its weights and range check need no device sync.
        parts = zip(prediction.split(batch), inputs.target.split(batch), both.timesteps.split(batch), strict=True)
        return self.loss(*(LossHalf(part, target, levels) for part, target, levels in parts))


def _loss_values(terms: Any) -> torch.Tensor:
    """(total, instance, prior) of one micro-step, detached, on the device (prior 0 without prior preservation)."""
    import torch

    prior = terms.prior if terms.prior is not None else torch.zeros_like(terms.instance)
    return torch.stack([terms.total, terms.instance, prior]).detach().float()


def _compiled(denoiser: torch.nn.Module) -> Any:
    """`denoiser` called through torch.compile, for the training steps only.

    A wrapper, not `module.compile()`: the pipeline's own module stays uncompiled for previews, for
    `unwrap_model` and after the run; both share the same parameters.
    """
    import torch

    return torch.compile(denoiser)


def _cuda_devices(device: torch.device) -> list[int]:
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _log_steps_run(start: int, steps: int) -> None:
    if start >= steps:
        logger.info("nothing left to train: the checkpoint is at the last step, %d", steps)
    else:
        logger.info("trained steps %d-%d: %d of %d steps run", start + 1, steps, steps - start, steps)


def _count(shapes: dict[str, list]) -> str:
    return ", ".join(f"{len(group)} {component} tensors" for component, group in shapes.items())


def _progress_bar(config: TrainConfig, accelerator: Any) -> Any:
    from .progress import progress_bar

    return progress_bar(config.steps, enabled=config.progress and accelerator.is_local_main_process)
