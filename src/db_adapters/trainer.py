"""One readable DreamBooth training loop on accelerate.

It takes a pipeline already made trainable by a strategy, the encoded training set and a loss, and
optimises `strategy.trainable_parameters(pipe)`; it does not know which strategy it runs. Each step
draws `batch_size` instance and `batch_size` class latents, noises each with its own timesteps, runs
the UNet once on both halves, and hands the halves to the loss separately.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import DbAdaptersError
from .loss import LossHalf, PriorPreservationLoss, training_target

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from diffusers import StableDiffusionPipeline

    from .config import TrainConfig
    from .strategies import Strategy

logger = logging.getLogger("db_adapters")

StepCallback = Callable[[int, dict[str, float]], None]


class TrainingError(DbAdaptersError, RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message says what to try."""


@dataclass
class LatentBank:
    """Encoded images, kept as the VAE's Gaussian (mean, std): each step samples fresh latents."""

    mean: torch.Tensor  # (N, C, h, w), float32
    std: torch.Tensor  # (N, C, h, w), float32
    scaling_factor: float

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import torch

        mean, std = self.mean[indices], self.std[indices]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return (mean + std * noise.to(mean.device)) * self.scaling_factor


@dataclass
class TrainingSet:
    """What the loop trains on: instance latents + prompt ids, and optionally the class half."""

    instance: LatentBank
    instance_ids: torch.Tensor  # (1, L) token ids of the instance prompt
    prior: LatentBank | None = None
    prior_ids: torch.Tensor | None = None
    # Prompt embeddings, computed once when the text encoder is frozen.
    instance_embeds: torch.Tensor | None = None
    prior_embeds: torch.Tensor | None = None


def encode_images(pipe: StableDiffusionPipeline, pixels: torch.Tensor, batch_size: int = 8) -> LatentBank:
    """Encode (N, 3, H, W) pixels in [-1, 1] once, with the frozen VAE."""
    import torch

    vae = pipe.vae
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], batch_size):
            batch = pixels[start : start + batch_size].to(vae.device, vae.dtype)
            dist = vae.encode(batch).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
    return LatentBank(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor))


def prompt_ids(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    return tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompt(text_encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(ids.to(text_encoder.device))[0]


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


def _make_accelerator(config: TrainConfig, device: torch.device) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if not PartialState().use_distributed:
        # accelerate keeps one process-wide state and refuses a second Accelerator with other
        # settings; a library is called many times per process, so start each run afresh.
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=device.type == "cpu",
    )


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW with `use_8bit_adam` (its states are uint8)."""
    import torch

    kwargs = {
        "betas": config.adam_betas,
        "weight_decay": config.adam_weight_decay,
        "eps": config.adam_epsilon,
    }
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, min_8bit_size=config.adam_min_8bit_size, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


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
    """Runs `config.steps` optimiser steps of DreamBooth on `pipe`, in place."""

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        strategy: Strategy,
        data: TrainingSet,
        config: TrainConfig,
        *,
        learning_rate: float,
        text_encoder_learning_rate: float,
        callback: StepCallback | None = None,
        validation: Callable[[int], None] | None = None,
    ) -> None:
        from diffusers import DDPMScheduler

        self.pipe, self.strategy, self.data, self.config = pipe, strategy, data, config
        self.lrs = {"unet": learning_rate, "text_encoder": text_encoder_learning_rate}
        self.callback, self.validation = callback, validation
        # Training noise always follows the DDPM forward process of the model's own schedule,
        # whatever sampler the user set on the pipeline for inference.
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.loss = PriorPreservationLoss.from_scheduler(
            self.noise_scheduler, prior_loss_weight=config.prior_loss_weight, snr_gamma=config.snr_gamma
        )
        self.history: list[dict[str, float]] = []

    def run(self) -> list[dict[str, float]]:
        import torch

        config = self.config
        params = self.strategy.trainable_parameters(self.pipe)
        for group in params.values():
            for param in group:
                param.requires_grad_(True)
        components = [c for c in ("unet", "text_encoder") if params.get(c)]
        modules = [getattr(self.pipe, c) for c in components]
        accelerator = _make_accelerator(config, self.pipe.unet.device)
        groups = [{"params": params[c], "lr": self.lrs[c]} for c in components]
        optimizer = make_optimizer(groups, config)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=config.steps * accelerator.num_processes,
        )
        prepared = accelerator.prepare(*modules, optimizer, lr_scheduler)
        models, optimizer, lr_scheduler = list(prepared[: len(modules)]), prepared[-2], prepared[-1]
        self._models = dict(zip(components, models, strict=True))
        generator = torch.Generator("cpu").manual_seed(config.seed)
        self._instances = IndexStream(len(self.data.instance), generator)
        self._priors = IndexStream(len(self.data.prior), generator) if self.data.prior is not None else None
        self._generator = generator
        trainable = [p for group in params.values() for p in group]
        progress = _progress_bar(config, accelerator)
        try:
            with training_mode(modules, config.gradient_checkpointing):
                for step in range(1, config.steps + 1):
                    logs = self._optimiser_step(accelerator, models, optimizer, lr_scheduler, trainable, step)
                    self.history.append({"step": step, **logs})
                    progress.update(1)
                    progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if k != "lr"})
                    if self.callback is not None:
                        self.callback(step, logs)
                    if self.validation and config.validation_every and step % config.validation_every == 0:
                        self.validation(step)
        finally:
            progress.close()
            for model in models:
                # Takes accelerate's autocast wrapper off the pipeline's own modules again.
                accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            accelerator.free_memory()
            for param in trainable:
                param.grad = None
        return self.history

    def _optimiser_step(self, accelerator, models, optimizer, lr_scheduler, trainable, step: int) -> dict[str, float]:
        sums = {"loss": 0.0, "instance": 0.0, "prior": 0.0}
        for _ in range(self.config.gradient_accumulation_steps):
            with accelerator.accumulate(*models):
                terms = self._loss_terms(accelerator)
                self._check_finite(terms, step)
                accelerator.backward(terms.total)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, self.config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            sums["loss"] += terms.total.item()
            sums["instance"] += terms.instance.item()
            if terms.prior is not None:
                sums["prior"] += terms.prior.item()
        n = self.config.gradient_accumulation_steps
        logs = {k: v / n for k, v in sums.items()}
        if self.data.prior is None:
            logs.pop("prior")
        logs["lr"] = float(lr_scheduler.get_last_lr()[0])
        return logs

    def _check_finite(self, terms, step: int) -> None:
        for name, value in (("instance", terms.instance), ("prior", terms.prior)):
            if value is not None and not math.isfinite(float(value.detach())):
                raise TrainingError(
                    f"the {name} loss became {float(value.detach())} at step {step}; lower the learning rate "
                    "or train in fp32 (mixed_precision='no')."
                )

    def _noised(self, bank: LatentBank, indices) -> tuple[Any, Any, Any, Any]:
        import torch

        gen = self._generator
        latents = bank.sample(indices, gen)  # (B, C, h, w)
        noise = torch.randn(latents.shape, generator=gen)
        if self.config.noise_offset:
            noise = noise + self.config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = training_target(self.noise_scheduler, latents, noise, timesteps)
        return noisy, timesteps, target, latents

    def _embeds(self, ids, cached):
        if cached is not None:
            return cached
        return encode_prompt(self._models["text_encoder"], ids)

    def _loss_terms(self, accelerator):
        import torch

        batch = self.config.batch_size
        device = accelerator.device
        noisy_i, t_i, target_i, _ = self._noised(self.data.instance, self._instances.take(batch))
        halves = [(noisy_i, t_i, target_i, self._embeds(self.data.instance_ids, self.data.instance_embeds))]
        if self.data.prior is not None:
            noisy_c, t_c, target_c, _ = self._noised(self.data.prior, self._priors.take(batch))
            halves.append((noisy_c, t_c, target_c, self._embeds(self.data.prior_ids, self.data.prior_embeds)))
        dtype = self.pipe.unet.conv_in.weight.dtype
        model_input = torch.cat([h[0] for h in halves]).to(device, dtype)
        timesteps = torch.cat([h[1] for h in halves]).to(device)
        embeds = torch.cat([h[3].expand(batch, -1, -1) for h in halves]).to(device, dtype)
        with accelerator.autocast():
            prediction = self._models["unet"](model_input, timesteps, embeds).sample
        parts = prediction.split(batch)
        instance = LossHalf(parts[0], target_i.to(device), t_i.to(device))
        prior = None
        if len(halves) == 2:
            prior = LossHalf(parts[1], halves[1][2].to(device), halves[1][1].to(device))
        return self.loss(instance, prior)


def _progress_bar(config: TrainConfig, accelerator: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=config.steps,
        desc="personalize",
        disable=not config.progress or not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
