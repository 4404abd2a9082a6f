"""`personalize()`: wires the pieces together, in the one direction data flows.

images -> data (tensors) -> prior (class images) -> trainer(strategy, loss) -> Adapter (export).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import binder
from .adapter import Adapter, attach, base_model_info, refuse_if_adapted
from .config import DEFAULT_NUM_CLASS_IMAGES, DEFAULT_STEPS, TrainConfig
from .data import check_image_sizes, image_batch, load_images
from .errors import InputError
from .pipelines import check_supported, native_resolution, recommended_settings
from .prior import class_images as make_class_images
from .strategies import get_strategy
from .trainer import (
    StepCallback,
    Trainer,
    TrainingSet,
    encode_images,
    encode_prompt,
    prompt_ids,
    seeded_global_rng,
)

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from .checkpoint import RunCheckpoints
    from .strategies import Strategy

logger = logging.getLogger("db_adapters")

ImagesInput = str | os.PathLike | Sequence[Any]


def personalize(
    pipe: StableDiffusionPipeline,
    images: ImagesInput,
    class_noun: str,
    *,
    strategy: str = "lora",
    identifier: str | None = None,
    instance_prompt: str | None = None,
    class_prompt: str | None = None,
    steps: int | None = None,
    learning_rate: float | None = None,
    text_encoder_learning_rate: float | None = None,
    batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    prior_preservation: bool = True,
    num_class_images: int | None = None,
    prior_loss_weight: float = 1.0,
    class_images: ImagesInput | None = None,
    train_text_encoder: bool = False,
    resolution: int | None = None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    mixed_precision: str | None = None,
    use_8bit_adam: bool = False,
    gradient_checkpointing: bool = False,
    lr_scheduler: str = "constant",
    lr_warmup_steps: int = 0,
    max_grad_norm: float = 1.0,
    validation_prompts: Sequence[str] | None = None,
    validation_every: int | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    resume: bool = False,
    callback: StepCallback | None = None,
    strict: bool = False,
    **options: Any,
) -> Adapter:
    """Fine-tune `pipe` in place so that "a {identifier} {class_noun}" renders the subject in `images`.

    After it returns, `pipe` itself generates the subject; `adapter.save(path)` writes it to one
    safetensors file. If training fails or is interrupted, `pipe` is left as it was. A pipeline that
    already carries an adapter is refused: call `unload_adapter(pipe)` first.

    Args:
        pipe (`StableDiffusionPipeline`): an SD 1.x/2.x pipeline, on the device to train on.
        images (`str | PathLike | list`): a folder, image paths, or PIL images of the subject (3-5).
        class_noun (`str`): the subject's coarse class, e.g. "dog".
        strategy (`str`): a registered strategy: "lora" (default) or "full".
        identifier (`str | None`): the rare token; None lets the binder choose one.
        instance_prompt (`str | None`): default "a {identifier} {class_noun}".
        class_prompt (`str | None`): default "a {class_noun}".
        steps (`int | None`): optimiser steps; default 800, or the model folder's recommendation
            (`db_adapters.json` beside `model_index.json`; the toy base model ships one).
        learning_rate (`float | None`): default the strategy's (LoRA 1e-4, full 5e-6).
        text_encoder_learning_rate (`float | None`): default `learning_rate`.
        batch_size (`int`): instance images per step (as many class images join them).
        gradient_accumulation_steps (`int`): micro-batches per optimiser step.
        prior_preservation (`bool`): add the class-prior loss (the paper's method); default True.
        num_class_images (`int | None`): class images for the prior; default 200.
        prior_loss_weight (`float`): lambda, the prior term's weight; default 1.0.
        class_images (`str | PathLike | list | None`): your own class images; topped up by generation.
        train_text_encoder (`bool`): train the text encoder too.
        resolution (`int | None`): training size, a multiple of 8; default the pipeline's native size.
        snr_gamma (`float | None`): min-SNR weighting gamma (e.g. 5.0), applied per half.
        noise_offset (`float`): offset-noise strength (0.05-0.1 helps very dark/bright images).
        mixed_precision (`str | None`): "no" (default, fp32), "fp16" or "bf16".
        use_8bit_adam (`bool`): bitsandbytes' 8-bit AdamW.
        gradient_checkpointing (`bool`): trade compute for memory.
        lr_scheduler (`str`): "constant", "constant_with_warmup", "linear", "cosine", ...
        lr_warmup_steps (`int`): warmup steps.
        max_grad_norm (`float`): gradient clipping norm.
        validation_prompts (`list[str] | None`): preview prompts; "{id}" becomes the identifier.
        validation_every (`int | None`): render previews every N steps into `output_dir/previews`.
        seed (`int`): seeds the identifier choice, class images, noise and data order.
        output_dir (`str | PathLike | None`): the run's files (class-image cache, previews, checkpoints).
        checkpoint_every (`int | None`): save the complete training state to `output_dir/checkpoints`
            every N steps (safetensors + JSON); needs `output_dir`.
        keep_checkpoints (`int`): keep only the newest K checkpoints; default 2.
        resume (`bool`): continue from the newest complete checkpoint in `output_dir/checkpoints`
            (bit-exactly: the result equals an uninterrupted run's); without one, start afresh
            (and log so). Refused, naming the difference, if the images, seed, strategy or a
            setting that changes the result differ from the checkpoint's.
        callback (`Callable[[int, dict], None] | None`): called after every step with the losses.
        strict (`bool`): a questionable `identifier` is an error instead of a warning.
        **options: more `TrainConfig` settings (`random_flip`, `class_sampler`,
            `class_inference_steps`, `class_image_dir`, `progress`, ...) and the strategy's options
            (LoRA: `rank`, `alpha`, `target_modules`, `dropout`).

    Returns:
        The `Adapter`: `.identifier`, `.instance_prompt`, `.save(path)`.

    Example:
        >>> from db_adapters import personalize
        >>> from db_adapters.testing import tiny_pipeline
        >>> from PIL import Image
        >>> pipe = tiny_pipeline()
        >>> images = [Image.new("RGB", (32, 32), c) for c in ("red", "orange", "brown")]
        >>> adapter = personalize(pipe, images, "dog", steps=2, num_class_images=2, progress=False,
        ...                       class_inference_steps=2)
        >>> adapter.instance_prompt == f"a {adapter.identifier} dog"
        True
    """
    check_supported(pipe)
    refuse_if_adapted(pipe)
    class_noun = binder.validate_class_noun(class_noun)
    config_options = {k: options.pop(k) for k in list(options) if k in TrainConfig.field_names()}
    chosen = get_strategy(strategy)(**options)
    recommended = recommended_settings(pipe)
    steps = steps if steps is not None else recommended.get("steps", DEFAULT_STEPS)
    learning_rate = learning_rate if learning_rate is not None else recommended.get("learning_rate")
    if num_class_images is None:
        num_class_images = recommended.get("num_class_images", DEFAULT_NUM_CLASS_IMAGES)
    if "class_inference_steps" in recommended:
        config_options.setdefault("class_inference_steps", recommended["class_inference_steps"])
    config = TrainConfig(
        steps=steps,
        learning_rate=learning_rate,
        text_encoder_learning_rate=text_encoder_learning_rate,
        batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        prior_preservation=prior_preservation,
        num_class_images=num_class_images,
        prior_loss_weight=prior_loss_weight,
        train_text_encoder=train_text_encoder,
        resolution=resolution,
        snr_gamma=snr_gamma,
        noise_offset=noise_offset,
        mixed_precision=mixed_precision,
        use_8bit_adam=use_8bit_adam,
        gradient_checkpointing=gradient_checkpointing,
        lr_scheduler=lr_scheduler,
        lr_warmup_steps=lr_warmup_steps,
        max_grad_norm=max_grad_norm,
        validation_prompts=list(validation_prompts) if validation_prompts else None,
        validation_every=validation_every,
        seed=seed,
        output_dir=output_dir,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        resume=resume,
        **config_options,
    )
    if config.validation_every and config.output_dir is None:
        raise InputError("validation_every needs output_dir: previews are written to output_dir/previews.")
    subject = load_images(images, name="images")
    resolution = config.resolution or native_resolution(pipe)
    check_image_sizes(subject, resolution, name="images")
    identifier = _identifier(pipe, identifier, class_noun, seed, strict)
    instance_prompt = instance_prompt or binder.instance_prompt(identifier, class_noun)
    if identifier not in instance_prompt.split():
        logger.warning("instance_prompt %r does not contain the identifier %r.", instance_prompt, identifier)
    class_prompt = class_prompt or binder.class_prompt(class_noun)
    base = base_model_info(pipe)
    # Checked before class images are generated: a refused resume should cost nothing.
    checkpoints, resume_from = _run_checkpoints(
        config,
        chosen,
        subject=subject,
        class_images=class_images,
        # The weights decide the result, not where the model was loaded from.
        base_model={k: base[k] for k in ("architecture", "weights")},
        identifier=identifier,
        instance_prompt=instance_prompt,
        class_prompt=class_prompt,
        resolution=resolution,
    )

    prior = _prior_images(pipe, config, class_prompt, class_images, resolution, base["weights"])
    data = _training_set(pipe, config, subject, prior, instance_prompt, class_prompt, resolution)
    adapter = Adapter(
        identifier=identifier,
        class_noun=class_noun,
        instance_prompt=instance_prompt,
        strategy=chosen,
        base_model=base,
        resolution=resolution,
        steps=config.steps,
        extra={"class_prompt": class_prompt, "prior_preservation": config.prior_preservation},
    )
    adapter.history = _train(pipe, chosen, data, config, callback, identifier, checkpoints, resume_from)
    attach(pipe, adapter)
    return adapter


def _identifier(pipe: StableDiffusionPipeline, identifier: str | None, class_noun: str, seed: int, strict: bool) -> str:
    if identifier is None:
        return binder.choose_identifier(pipe.tokenizer, class_noun, seed=seed)
    return binder.validate_identifier(pipe.tokenizer, identifier, class_noun, strict=strict)


def _run_checkpoints(
    config: TrainConfig,
    strategy: Strategy,
    *,
    subject: list[Image.Image],
    class_images: ImagesInput | None,
    **facts: Any,
) -> tuple[RunCheckpoints | None, tuple | None]:
    """The run's checkpoint folder (None without checkpoint_every/resume) and the checkpoint to resume from."""
    if not (config.checkpoint_every or config.resume):
        return None, None
    from .checkpoint import FOLDER_NAME, RunCheckpoints, images_digest, run_fingerprint

    given = load_images(class_images, name="class_images") if class_images is not None else []
    learning_rate = config.learning_rate or strategy.default_learning_rate
    fingerprint = run_fingerprint(
        config,
        learning_rate=learning_rate,
        # The resolved rates: None and the default it stands for are the same run.
        text_encoder_learning_rate=(config.text_encoder_learning_rate or learning_rate)
        if config.train_text_encoder
        else None,
        images=images_digest(subject),
        class_images=images_digest(given) if given else None,
        strategy=strategy.name,
        strategy_options=strategy.config(),
        **facts,
    )
    checkpoints = RunCheckpoints(
        config.output_dir / FOLDER_NAME, fingerprint, every=config.checkpoint_every, keep=config.keep_checkpoints
    )
    if config.resume:
        return checkpoints, checkpoints.resume_point()
    checkpoints.refuse_to_overwrite()
    return checkpoints, None


def default_cache_dir() -> Path:
    """Where class images are cached when neither `class_image_dir` nor `output_dir` is given."""
    root = os.environ.get("DB_ADAPTERS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "db_adapters"
    )
    return Path(root) / "class_images"


def _prior_images(
    pipe: StableDiffusionPipeline,
    config: TrainConfig,
    class_prompt: str,
    given: ImagesInput | None,
    resolution: int,
    fingerprint: str,
) -> list[Image.Image]:
    if not config.prior_preservation:
        return []
    cache = config.class_image_dir or (
        config.output_dir / "class_images" if config.output_dir is not None else default_cache_dir()
    )
    return make_class_images(
        pipe,
        class_prompt,
        config.num_class_images,
        resolution,
        seed=config.seed,
        cache_dir=cache,
        base_fingerprint=fingerprint,
        sampler=config.class_sampler,
        num_inference_steps=config.class_inference_steps,
        batch_size=config.class_batch_size,
        given=load_images(given, name="class_images") if given is not None else (),
    )


def _training_set(
    pipe: StableDiffusionPipeline,
    config: TrainConfig,
    subject: list[Image.Image],
    prior: list[Image.Image],
    instance_prompt: str,
    class_prompt: str,
    resolution: int,
) -> TrainingSet:
    import torch

    pixels = image_batch(subject, resolution)
    if config.random_flip:
        # Both orientations are encoded once; the sampler then picks among them.
        pixels = torch.cat([pixels, image_batch(subject, resolution, flip=True)])
    data = TrainingSet(instance=encode_images(pipe, pixels), instance_ids=prompt_ids(pipe, instance_prompt))
    if prior:
        data.prior = encode_images(pipe, image_batch(prior, resolution))
        data.prior_ids = prompt_ids(pipe, class_prompt)
    if not config.train_text_encoder:
        with torch.no_grad():
            data.instance_embeds = encode_prompt(pipe.text_encoder, data.instance_ids).float()
            if data.prior_ids is not None:
                data.prior_embeds = encode_prompt(pipe.text_encoder, data.prior_ids).float()
    return data


def _train(
    pipe: StableDiffusionPipeline,
    strategy: Strategy,
    data: TrainingSet,
    config: TrainConfig,
    callback: StepCallback | None,
    identifier: str,
    checkpoints: RunCheckpoints | None = None,
    resume_from: tuple | None = None,
) -> list[dict[str, float]]:
    flags = _requires_grad_flags(pipe)
    lr = config.learning_rate or strategy.default_learning_rate
    # peft draws LoRA's initial weights from the global RNG: seed it, so a run depends on `seed` alone.
    with seeded_global_rng(config.seed, pipe.unet.device):
        strategy.apply(pipe, train_text_encoder=config.train_text_encoder)
    try:
        trainer = Trainer(
            pipe,
            strategy,
            data,
            config,
            learning_rate=lr,
            text_encoder_learning_rate=config.text_encoder_learning_rate or lr,
            callback=callback,
            validation=_previewer(pipe, config, identifier),
            checkpoints=checkpoints,
            resume_from=resume_from,
        )
        history = trainer.run()
    except BaseException:
        # Failed or interrupted (Ctrl-C too): the caller gets back the pipeline it passed in.
        strategy.remove(pipe)
        _restore_requires_grad(flags)
        raise
    strategy.finish(pipe)
    _restore_requires_grad(flags)
    return history


def _requires_grad_flags(pipe: StableDiffusionPipeline) -> dict[torch.nn.Parameter, bool]:
    return {p: p.requires_grad for c in ("unet", "text_encoder", "vae") for p in getattr(pipe, c).parameters()}


def _restore_requires_grad(flags: dict[torch.nn.Parameter, bool]) -> None:
    for param, flag in flags.items():
        param.requires_grad_(flag)


def _previewer(pipe: StableDiffusionPipeline, config: TrainConfig, identifier: str):
    if not (config.validation_prompts and config.validation_every and config.output_dir):
        return None
    from .prior import generate_images

    prompts = [p.replace("{id}", identifier) for p in config.validation_prompts]

    def render(step: int) -> None:
        import torch

        from .distributed import processes

        if not processes(pipe.device).is_main:
            return  # the main process alone renders and writes previews
        folder = config.output_dir / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        resolution = native_resolution(pipe) if config.resolution is None else config.resolution
        was = {m: m.training for m in (pipe.unet, pipe.text_encoder)}
        for module in was:
            module.eval()
        try:
            with torch.no_grad():
                for i, prompt in enumerate(prompts):
                    (image,) = generate_images(
                        pipe,
                        prompt,
                        [config.seed + i],
                        resolution,
                        num_inference_steps=config.validation_steps,
                        batch_size=1,
                    )
                    image.save(folder / f"step_{step:06d}_{i}.png")
        finally:
            for module, training in was.items():
                module.train(training)

    return render
