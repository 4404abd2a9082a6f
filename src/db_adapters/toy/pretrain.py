"""The recipe that trains the toy base model from scratch, in resumable stages on a CPU.

    python examples/train_toy_base.py --work-dir runs/toy-base [--max-minutes 60]

Stages, each skipped when its output exists, each checkpointing so an interrupted run continues:
1. `dataset`  render `num_images` world images with their attributes (seeds 0..N-1).
2. `vae`      train the AutoencoderKL (L1 + MSE reconstruction, tiny KL) and set its scaling factor.
3. `latents`  encode every image once (mean and std of the latent Gaussian).
4. `decoder`  fine-tune the VAE's decoder alone, the encoder frozen (as Stability's "ft-MSE" VAE was
              made): the latent space the denoiser learns stays the same, and the decoded pictures
              keep the small details (a pattern's second colour, the mark) that the short `vae`
              stage blurs. Written to `work_dir/vae_ft`, which the pipeline ships.
5. `denoiser` train UNet and text encoder jointly on latents, captions drawn with random omissions
              (10% empty, for classifier-free guidance; 10% the class noun alone, so "a box" keeps
              meaning every box), min-SNR weighted; from `rare_from_step`, part of each batch comes
              from the images with a second colour or a mark, captioned with both; EMA weights ship.
6. `export`   assemble the EMA weights into a `StableDiffusionPipeline` folder `work_dir/pipeline`.
Losses go to `work_dir/*_loss.csv`; the settings and wall time of every stage to `work_dir/recipe.json`.

The settings, and how a run keeps them across sittings or is branched, are in `recipe`.
"""

from __future__ import annotations

import csv
import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_state,
    prune_checkpoints,
    restore_optimizer,
    save_checkpoint,
)
from ..files import save_tensors
from ..loss import PriorPreservationLoss
from ..pipelines import RECOMMENDATIONS_FILE
from . import base
from .recipe import PretrainConfig, record_settings, recorded_settings, refuse_changed_settings
from .world import ATTRIBUTES, caption, random_caption, sample_attributes


class OutOfTime(Exception):
    """The run's time budget is spent; it stopped after a checkpoint and continues when rerun."""


def run(config: PretrainConfig) -> Path:
    """Run every stage that has not finished; return the pipeline folder.

    Raises:
        InputError: if `config.work_dir` holds a run started with other weight-shaping settings
            (`config_for` continues one with its own).
    """
    import torch

    torch.set_num_threads(config.threads)
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    recorded = recorded_settings(work)
    if recorded is not None:
        refuse_changed_settings(work, recorded, asdict(config))
    deadline = time.monotonic() + config.max_minutes * 60 if config.max_minutes else None
    record_settings(work, config)  # before any stage, so a run paused in its first stage resumes as it began
    for stage in (stage_dataset, stage_vae, stage_latents, stage_decoder, stage_denoiser, stage_export):
        started = time.monotonic()
        seconds = stage(config, work, deadline)  # None when the stage had already finished
        if seconds is not None:
            record_settings(work, config, stage.__name__, seconds or time.monotonic() - started)
    return work / "pipeline"


# --- 1. dataset ---------------------------------------------------------------------------------


def attribute_codes(attributes: dict[str, str]) -> list[int]:
    return [ATTRIBUTES[name].index(attributes[name]) for name in ATTRIBUTES]


def attribute_dict(codes: list[int]) -> dict[str, str]:
    return {name: ATTRIBUTES[name][code] for name, code in zip(ATTRIBUTES, codes, strict=True)}


def stage_dataset(config: PretrainConfig, work: Path, deadline: float | None) -> float | None:
    import numpy as np
    import torch

    path = work / "dataset.safetensors"
    if path.exists():
        return None
    from .probe import render_examples

    seeds = [config.seed * 10_000_000 + i for i in range(config.num_images)]
    jobs = [(seed, sample_attributes(seed)) for seed in seeds]
    images, codes = render_examples(jobs, workers=config.render_workers)
    assert images.shape[1] == base.RESOLUTION and codes.shape[1] == len(ATTRIBUTES)
    images, codes = np.ascontiguousarray(images), np.ascontiguousarray(codes)
    save_tensors(path, {"images": torch.from_numpy(images), "attributes": torch.from_numpy(codes)}, {})
    return 0.0


def load_dataset(work: Path) -> tuple[Any, Any]:
    from ..safe_reading import read_tensors

    tensors = read_tensors(work / "dataset.safetensors")
    return tensors["images"], tensors["attributes"]


def to_pixels(images_uint8: Any) -> Any:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --- shared loop machinery ----------------------------------------------------------------------


class Loop:
    """Step counter, checkpoints, time budget and loss log shared by the two training stages."""

    def __init__(self, config: PretrainConfig, work: Path, name: str, deadline: float | None) -> None:
        self.config, self.work, self.name, self.deadline = config, work, name, deadline
        self.folder = work / f"{name}_checkpoints"
        self.folder.mkdir(exist_ok=True)
        self.log = work / f"{name}_loss.csv"
        self.elapsed = 0.0
        self.step = 0
        self._first_step = 0
        self._started = time.monotonic()

    def resume(self) -> tuple[dict, dict] | None:
        stem = latest_checkpoint(self.folder, self.name)
        if stem is None:
            return None
        tensors, info = load_checkpoint(stem)
        self.step, self.elapsed = info["step"], info["elapsed_s"]
        self._first_step = self.step
        return tensors, info

    def total_elapsed(self) -> float:
        return self.elapsed + time.monotonic() - self._started

    def write_log(self, loss: float, lr: float) -> None:
        new = not self.log.exists()
        with self.log.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "loss", "lr", "elapsed_s"])
            writer.writerow([self.step, f"{loss:.5f}", f"{lr:.6g}", f"{self.total_elapsed():.1f}"])

    def checkpoint(self, tensors: dict, info: dict) -> None:
        info = {**info, "step": self.step, "elapsed_s": self.total_elapsed()}
        save_checkpoint(self.folder / f"{self.name}-{self.step:07d}", tensors, info)
        prune_checkpoints(self.folder, self.name, self.config.keep_checkpoints)

    def record_sitting(self, device: str) -> None:
        """Note in recipe.json which steps this sitting ran, where, and how long it took."""
        path = self.work / "recipe.json"
        recipe = json.loads(path.read_text()) if path.exists() else {"stages": {}}
        recipe.setdefault("sittings", []).append(
            {
                "stage": self.name,
                "device": device,
                "from_step": self._first_step,
                "to_step": self.step,
                "wall_s": round(time.monotonic() - self._started, 1),
            }
        )
        path.write_text(json.dumps(recipe, indent=1, sort_keys=True))

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def _rng_tensors(generator: Any) -> dict[str, Any]:
    return {"rng.torch": generator.get_state()}


def _denoiser_lr(step: int, config: PretrainConfig) -> float:
    """The denoiser's learning rate: one cosine cycle over `steps`, then one per restart."""
    start, cycles = 0, [(config.steps, config.learning_rate), *config.restarts]
    for steps, peak in cycles:
        if step < start + steps:
            return _cosine_lr(step - start, steps, config.warmup_steps, peak)
        start += steps
    return 0.0


def _cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    import math

    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --- 2. VAE -------------------------------------------------------------------------------------


def stage_vae(config: PretrainConfig, work: Path, deadline: float | None) -> float | None:
    import torch

    if (work / "vae" / "config.json").exists():
        return None
    images, _ = load_dataset(work)
    torch.manual_seed(config.seed)
    vae = base.build_vae(config.architecture)
    generator = torch.Generator().manual_seed(config.seed)
    elapsed = _train_autoencoder(
        vae, list(vae.parameters()), images, config, Loop(config, work, "vae", deadline), generator, train_encoder=True
    )
    _set_scaling_factor(vae, images, config.seed)
    vae.save_pretrained(work / "vae")
    return elapsed  # every sitting of this stage, not only the last


def _train_autoencoder(
    vae: Any, params: list, images: Any, config: PretrainConfig, loop: Loop, generator: Any, train_encoder: bool
) -> float:
    """Train `params` of `vae` on reconstruction, resuming from `loop`'s checkpoint; the `vae` and `decoder` stages.

    Returns the stage's time over all its sittings; leaves `vae` in eval mode.
    """
    import torch

    steps, peak = (
        (config.vae_steps, config.vae_learning_rate)
        if train_encoder
        else (config.decoder_steps, config.decoder_learning_rate)
    )
    optimizer = torch.optim.AdamW(params, lr=peak, weight_decay=0.0)
    resumed = loop.resume()
    if resumed:
        tensors, info = resumed
        vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
        restore_optimizer(optimizer, tensors, info["optimizer"])
        generator.set_state(tensors["rng.torch"])
    vae.train()
    while loop.step < steps:
        lr = _cosine_lr(loop.step, steps, 100, peak)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = _reconstruction_loss(vae, images, config, generator, train_encoder=train_encoder)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loop.step += 1
        if loop.step % config.log_every == 0:
            loop.write_log(loss.item(), lr)
        if loop.step % config.checkpoint_every == 0 or loop.step == steps or loop.out_of_time():
            tensors, plain = optimizer_state(optimizer)
            state = {f"vae.{k}": v for k, v in vae.state_dict().items()}
            loop.checkpoint({**state, **tensors, **_rng_tensors(generator)}, {"optimizer": plain})
            if loop.out_of_time() and loop.step < steps:
                loop.record_sitting("cpu")
                raise OutOfTime(f"{loop.name} stopped at step {loop.step}; rerun to continue")
    loop.record_sitting("cpu")
    vae.eval()
    return loop.total_elapsed()


def _reconstruction_loss(vae: Any, images: Any, config: PretrainConfig, generator: Any, train_encoder: bool) -> Any:
    """L1 + MSE of a batch decoded from a posterior sample, plus the KL term when the encoder trains."""
    import torch

    index = torch.randint(0, images.shape[0], (config.vae_batch_size,), generator=generator)
    pixels = to_pixels(images[index])
    with torch.set_grad_enabled(train_encoder):
        posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    loss = (recon - pixels).abs().mean() + (recon - pixels).pow(2).mean()
    return loss + config.vae_kl_weight * posterior.kl().mean() if train_encoder else loss


def _set_scaling_factor(vae: Any, images: Any, seed: int) -> None:
    # Like SD's 0.18215: scale latents to unit variance so the diffusion schedule fits them.
    import torch

    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, images.shape[0], (1024,), generator=generator)
    with torch.no_grad():
        latents = vae.encode(to_pixels(images[index])).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


# --- 3. latents ---------------------------------------------------------------------------------


def stage_latents(config: PretrainConfig, work: Path, deadline: float | None) -> float | None:
    import torch
    from diffusers import AutoencoderKL

    path = work / "latents.safetensors"
    if path.exists():
        return None
    images, _ = load_dataset(work)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval().to(config.device)
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], 256):
            dist = vae.encode(to_pixels(images[start : start + 256]).to(config.device)).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
    save_tensors(path, {"mean": torch.cat(means), "std": torch.cat(stds)}, {})
    return 0.0


# --- 4. decoder ---------------------------------------------------------------------------------


def tuned_vae_dir(work: Path) -> Path:
    """The VAE a run's pipeline uses: the decoder-tuned one once that stage has run, else the `vae` stage's."""
    tuned = Path(work) / "vae_ft"
    return tuned if (tuned / "config.json").exists() else Path(work) / "vae"


def stage_decoder(config: PretrainConfig, work: Path, deadline: float | None) -> float | None:
    import torch
    from diffusers import AutoencoderKL

    if config.decoder_steps <= 0 or (work / "vae_ft" / "config.json").exists():
        return None
    images, _ = load_dataset(work)
    vae = AutoencoderKL.from_pretrained(work / "vae")
    # The encoder and its quant_conv stay as they are, so latents (and a denoiser trained on them) still fit.
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    generator = torch.Generator().manual_seed(config.seed + 4)
    loop = Loop(config, work, "decoder", deadline)
    elapsed = _train_autoencoder(vae, params, images, config, loop, generator, train_encoder=False)
    vae.save_pretrained(work / "vae_ft")
    return elapsed


# --- 5. denoiser --------------------------------------------------------------------------------


def stage_denoiser(config: PretrainConfig, work: Path, deadline: float | None) -> float | None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.training_utils import EMAModel

    from ..safe_reading import read_tensors

    if (work / "denoiser_done.json").exists():
        return None
    _, codes = load_dataset(work)
    rare = rare_images(codes)
    latents = read_tensors(work / "latents.safetensors")
    scale = AutoencoderKL.load_config(work / "vae")["scaling_factor"]
    tokenizer = _tokenizer(work / "tokenizer")
    torch.manual_seed(config.seed + 1)
    unet = base.build_unet(config.architecture)
    text_encoder = base.build_text_encoder(tokenizer, config.architecture)
    unet.to(config.device), text_encoder.to(config.device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    ema = EMAModel(params, decay=config.ema_decay)
    noise_scheduler = DDPMScheduler(**base.SCHEDULER_CONFIG)
    weighting = PriorPreservationLoss.from_scheduler(noise_scheduler, snr_gamma=config.snr_gamma)
    generator = torch.Generator().manual_seed(config.seed + 2)
    captions = random.Random(config.seed + 3)
    loop = Loop(config, work, "denoiser", deadline)
    resumed = loop.resume()
    if resumed:
        tensors, info = resumed
        unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        text_encoder.load_state_dict({k[13:]: v for k, v in tensors.items() if k.startswith("text_encoder.")})
        restore_optimizer(optimizer, tensors, info["optimizer"])
        ema.load_state_dict({**info["ema"], "shadow_params": _ema_list(tensors)})
        ema.to(config.device)
        generator.set_state(tensors["rng.torch"])
        captions.setstate(_as_random_state(info["caption_rng"]))
    unet.train()
    text_encoder.train()
    while loop.step < config.denoiser_steps:
        lr = _denoiser_lr(loop.step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index, texts = _denoiser_batch(codes, rare, loop.step, config, generator, captions)
        loss = _denoiser_step(
            unet, text_encoder, tokenizer, noise_scheduler, weighting, latents, index, texts, scale, config, generator
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        loop.step += 1
        if loop.step % config.log_every == 0:
            loop.write_log(loss.item(), lr)
        if loop.step % config.checkpoint_every == 0 or loop.step == config.denoiser_steps or loop.out_of_time():
            tensors, plain = optimizer_state(optimizer)
            state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
            state |= {f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()}
            ema_state = ema.state_dict()
            shadow = {f"ema.{i:05d}": p for i, p in enumerate(ema_state.pop("shadow_params"))}
            info = {"optimizer": plain, "ema": ema_state, "caption_rng": captions.getstate()}
            loop.checkpoint({**state, **tensors, **shadow, **_rng_tensors(generator)}, info)
            if loop.out_of_time() and loop.step < config.denoiser_steps:
                loop.record_sitting(config.device)
                raise OutOfTime(f"denoiser stopped at step {loop.step}; rerun to continue")
    loop.record_sitting(config.device)
    ema.copy_to(params)
    pipeline_parts(work, unet.cpu(), text_encoder.cpu())
    (work / "denoiser_done.json").write_text(json.dumps({"steps": loop.step, "elapsed_s": loop.total_elapsed()}))
    return loop.total_elapsed()


def _tokenizer(folder: Path) -> Any:
    # Trained once and then read back: BPE training is not bit-reproducible, and a resumed run
    # must see exactly the token ids its text encoder was trained on.
    from transformers import CLIPTokenizer

    if (folder / "vocab.json").exists():
        return CLIPTokenizer.from_pretrained(str(folder), model_max_length=base.MAX_TOKENS)
    return base.build_tokenizer(folder)


def _ema_list(tensors: dict) -> list:
    return [tensors[k] for k in sorted(k for k in tensors if k.startswith("ema."))]


def _as_random_state(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def rare_images(codes: Any) -> Any:
    """Indices of the dataset images that have a named second colour or a mark (the rare stream's pool)."""
    import torch

    names = list(ATTRIBUTES)
    second, mark = codes[:, names.index("second_color")], codes[:, names.index("mark")]
    return torch.nonzero((second != 0) | (mark != 0)).flatten()  # code 0 is "none" for both


def rare_count(step: int, config: PretrainConfig) -> int:
    """How many of this step's batch come from the rare stream."""
    return round(config.batch_size * config.rare_share) if step >= config.rare_from_step else 0


def _denoiser_batch(
    codes: Any, rare: Any, step: int, config: PretrainConfig, generator: Any, captions: random.Random
) -> tuple[Any, list[str]]:
    """This step's image indices and captions: the uniform draws first, then the rare stream's."""
    import torch

    n_rare = rare_count(step, config)
    index = torch.randint(0, codes.shape[0], (config.batch_size - n_rare,), generator=generator)
    texts = [_training_caption(codes[i].tolist(), config, captions) for i in index]
    if n_rare:
        picked = rare[torch.randint(0, rare.shape[0], (n_rare,), generator=generator)]
        index = torch.cat([index, picked])
        keep = ("pattern", "second_color", "mark")
        omission = config.caption_omission
        texts += [random_caption(attribute_dict(codes[i].tolist()), captions, omission, keep) for i in picked]
    return index, texts


def _denoiser_step(
    unet, text_encoder, tokenizer, noise_scheduler, weighting, latents, index, texts, scale, config, generator
):
    import torch

    device = config.device
    mean, std = latents["mean"][index], latents["std"][index]
    x0 = ((mean + std * torch.randn(mean.shape, generator=generator)) * scale).to(device)
    ids = tokenizer(texts, padding="max_length", max_length=base.MAX_TOKENS, truncation=True, return_tensors="pt")
    embeds = text_encoder(ids.input_ids.to(device))[0]
    noise = torch.randn(x0.shape, generator=generator).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    timesteps = timesteps.to(device)
    prediction = unet(noise_scheduler.add_noise(x0, noise, timesteps), timesteps, embeds).sample
    if config.snr_gamma is None:
        return torch.nn.functional.mse_loss(prediction, noise)
    per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * weighting.timestep_weights(timesteps)).mean()


def _training_caption(codes: list[int], config: PretrainConfig, rng: random.Random) -> str:
    # An empty caption now and then teaches the unconditional prediction that guidance needs; the
    # class noun alone teaches that "a box" is any box. One draw decides which, so with
    # class_only_captions=0 the draws are v1's.
    draw = rng.random()
    if draw < config.caption_dropout:
        return ""
    attributes = attribute_dict(codes)
    if draw < config.caption_dropout + config.class_only_captions:
        return caption(cls=attributes["cls"])
    return random_caption(attributes, rng, omission=config.caption_omission)


def checkpoint_pipeline(work: Path) -> Any:
    """The newest denoiser checkpoint of a run in progress, as a pipeline with its EMA weights (to probe it).

    The architecture is read off the checkpoint's weights; the VAE is the decoder-tuned one once it exists.

    Args:
        work (`Path`): the recipe's work dir.

    Example:
        >>> pipe = checkpoint_pipeline(Path("runs/toy-base"))  # doctest: +SKIP
    """
    from diffusers import AutoencoderKL

    stem = latest_checkpoint(work / "denoiser_checkpoints", "denoiser")
    if stem is None:
        raise FileNotFoundError(f"no denoiser checkpoint in {work / 'denoiser_checkpoints'}")
    tensors, _ = load_checkpoint(stem)
    vae_channels = AutoencoderKL.load_config(tuned_vae_dir(work))["block_out_channels"][0]
    architecture = base.architecture_of(tensors["unet.conv_in.weight"].shape[0], vae_channels)
    tokenizer = _tokenizer(work / "tokenizer")
    unet, text_encoder = base.build_unet(architecture), base.build_text_encoder(tokenizer, architecture)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    for param, shadow in zip(params, _ema_list(tensors), strict=True):  # EMAModel keeps them in this order
        param.data.copy_(shadow)
    pipe = base.assemble_pipeline(
        AutoencoderKL.from_pretrained(tuned_vae_dir(work)), unet.eval(), text_encoder.eval(), tokenizer
    )
    return pipe


def pipeline_parts(work: Path, unet: Any, text_encoder: Any) -> None:
    unet.eval().save_pretrained(work / "unet")
    text_encoder.eval().save_pretrained(work / "text_encoder")


# --- 6. export ----------------------------------------------------------------------------------


def stage_export(config: PretrainConfig, work: Path, deadline: float | None) -> float | None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if (work / "pipeline" / "model_index.json").exists():
        return None
    tokenizer = CLIPTokenizer.from_pretrained(str(work / "tokenizer"), model_max_length=base.MAX_TOKENS)
    pipe = base.assemble_pipeline(
        AutoencoderKL.from_pretrained(tuned_vae_dir(work)),
        UNet2DConditionModel.from_pretrained(work / "unet"),
        CLIPTextModel.from_pretrained(work / "text_encoder"),
        tokenizer,
    )
    pipe.unet.to(getattr(torch, config.export_unet_dtype))
    pipe.save_pretrained(work / "pipeline")
    # Settings `personalize` uses for this model when the caller leaves them out.
    (work / "pipeline" / RECOMMENDATIONS_FILE).write_text(
        json.dumps(base.RECOMMENDED_BY_ARCHITECTURE[config.architecture], indent=1)
    )
    return 0.0
