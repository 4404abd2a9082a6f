"""What the training loop trains on, computed once: encoded images, prompt ids and embeddings.

The frozen VAE encodes every subject and class image once (kept as its Gaussian, so each step still
samples fresh latents); prompts are tokenized once, and embedded once when the text encoders are
frozen; per-image conditioning (SDXL's size and crop) is computed once from each image's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .data import crop_geometry, image_batch

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from PIL import Image

    from .families.base import Conditioning
    from .plan import RunPlan


@dataclass
class LatentBank:
    """Encoded images, kept as the VAE's Gaussian (mean, std): each step samples fresh latents."""

    mean: torch.Tensor  # (N, C, h, w), float32
    std: torch.Tensor  # (N, C, h, w), float32
    scaling_factor: float
    shift_factor: float = 0.0

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import torch

        mean, std = self.mean[indices], self.std[indices]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return (mean + std * noise.to(mean.device) - self.shift_factor) * self.scaling_factor


@dataclass
class TrainingHalf:
    """One half of every batch (the subjects' images, or the class images) and its prompts.

    A run with one subject has one prompt per half; with several, each image has its subject's (or
    its class's) prompt, `prompts[prompt_index[i]]`.

    Attributes:
        latents: the encoded images.
        prompt_ids: the prompts' token ids per text encoder, each (P, L).
        prompt_index: which prompt each image has, (N,) int64.
        image_conditioning: per-image conditioning, each tensor (N, ...) (SDXL's time ids; else empty).
        prompt_embeds: the prompts' conditioning (batch P), when the text encoders are frozen.
    """

    latents: LatentBank
    prompt_ids: dict[str, torch.Tensor]
    prompt_index: torch.Tensor
    image_conditioning: Conditioning = field(default_factory=dict)
    prompt_embeds: Conditioning | None = None


@dataclass
class TrainingSet:
    """The instance half, the class half when prior preservation is on, the conditioning every sample
    of the run shares (Flux's guidance value, batch 1), and the frozen text encoders' outputs when
    others train (`frozen_encoders`, handed to the family's `encode_prompt` in place of the encoders)."""

    instance: TrainingHalf
    prior: TrainingHalf | None = None
    shared: Conditioning = field(default_factory=dict)
    frozen_encoders: dict[str, FrozenEncoderOutputs] = field(default_factory=dict)


class FrozenEncoderOutputs:
    """A frozen text encoder that runs once per prompt: later calls with the same ids return the stored output.

    While CLIP encoders train, SD3's and Flux's T5 stays frozen; without this it would run every step
    (on the CPU, once offloaded). Called like the encoder, so a family's `encode_prompt` needs no change.

    Args:
        module (`torch.nn.Module`): the frozen encoder.
    """

    def __init__(self, module: Any) -> None:
        self.module, self.outputs = module, {}

    @property
    def device(self) -> Any:
        return self.module.device

    def __call__(self, ids: torch.Tensor, **kwargs: Any) -> Any:
        import torch

        key = (ids.cpu().numpy().tobytes(), tuple(sorted(kwargs.items())))
        if key not in self.outputs:
            with torch.no_grad():
                self.outputs[key] = self.module(ids.to(self.module.device), **kwargs)
        return self.outputs[key]


def encode_images(vae: Any, pixels: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 1) -> LatentBank:
    """Encode pixels in [-1, 1] once, with the frozen VAE: an (N, 3, H, W) tensor or a list of (1, 3, H, W).

    One image at a time by default: the encoder's full-resolution activations are what this costs in
    memory (about 0.5 GB an image for SD's VAE at 512 px in fp16), and memory the allocator took for a
    batch of them stays with the process for the rest of the run (measured: +93 MiB of resident memory
    for 100 class images at 128 px in batches of 8, which then set the run's peak); the encoder runs
    once per image, so the batch size barely changes the time.
    """
    import torch

    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start : start + batch_size]
            batch = (chunk if isinstance(chunk, torch.Tensor) else torch.cat(list(chunk))).to(vae.device, vae.dtype)
            dist = vae.encode(batch).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return LatentBank(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor), float(shift))


def training_set(pipe: Any, plan: RunPlan, prior: dict[str, list[Image.Image]]) -> TrainingSet:
    """Encode the subjects' images (both orientations with `random_flip`) and the class images once.

    Args:
        pipe (`DiffusionPipeline`): the frozen base pipeline.
        plan (`RunPlan`): the run's resolved settings and inputs.
        prior (`dict[str, list[PIL.Image]]`): the class images per class prompt; empty without prior preservation.

    Example:
        >>> data = training_set(pipe, plan, prior={})  # doctest: +SKIP
    """
    config = plan.config
    groups = []
    for subject in plan.subjects:
        groups.append((subject.instance_prompt, list(subject.images), False))
        if config.random_flip:
            groups.append((subject.instance_prompt, list(subject.images), True))
    data = TrainingSet(instance=_half(pipe, plan, groups), shared=plan.family.run_conditioning(pipe, config))
    if any(prior.values()):
        data.prior = _half(pipe, plan, [(prompt, images, False) for prompt, images in prior.items() if images])
    if plan.prompts_encoded_each_step:
        _remember_frozen_encoders(pipe, plan, data)
    return data


def _remember_frozen_encoders(pipe: Any, plan: RunPlan, data: TrainingSet) -> None:
    """Run the encoders that stay frozen once per prompt now, while they are still on the accelerator."""
    trained = set(plan.family.components(train_text_encoder=True))
    for name in plan.family.text_encoders:
        if name not in trained and getattr(pipe, name, None) is not None:
            data.frozen_encoders[name] = FrozenEncoderOutputs(getattr(pipe, name))
    import torch

    with torch.no_grad():
        for half in (data.instance, data.prior) if data.frozen_encoders else ():
            if half is not None:
                plan.family.encode_prompt(pipe, half.prompt_ids, data.frozen_encoders)


def _half(pipe: Any, plan: RunPlan, groups: list[tuple[str, list[Image.Image], bool]]) -> TrainingHalf:
    """One half from (prompt, images, mirrored) groups; groups with the same prompt share its embedding."""
    import torch

    family, resolution = plan.family, plan.config.resolution
    prompts = list(dict.fromkeys(prompt for prompt, _, _ in groups))
    images = [image for _, group, _ in groups for image in group]
    pixels = [image_batch([image], resolution, flip=flip) for _, group, flip in groups for image in group]
    index = [prompts.index(prompt) for prompt, group, _ in groups for _ in group]
    ids = [family.prompt_ids(pipe, prompt) for prompt in prompts]
    geometries = [crop_geometry(image, resolution) for image in images]
    half = TrainingHalf(
        latents=encode_images(pipe.vae, pixels),
        prompt_ids={name: torch.cat([one[name] for one in ids]) for name in ids[0]},
        prompt_index=torch.tensor(index, dtype=torch.long),
        image_conditioning=family.image_conditioning(geometries, resolution),
    )
    if not plan.prompts_encoded_each_step:
        with torch.no_grad():
            embeds = family.encode_prompt(pipe, half.prompt_ids)
        half.prompt_embeds = {key: value.float() for key, value in embeds.items()}
    return half
