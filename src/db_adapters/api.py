"""`personalize()`: resolves one run plan, then wires the parts in the one direction data flows.

images -> data -> prior (class images) -> latents -> trainer(family, strategy, loss) -> Adapter.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter import Adapter, attach, refuse_if_adapted
from .config import TrainConfig, help_text
from .latents import training_set
from .memory import FrozenParts
from .pivotal import TokenEmbeddings
from .plan import RunPlan, make_plan
from .prior import class_images as make_class_images
from .subjects import Subject, as_subjects, class_groups
from .trainer import StepCallback, Trainer, seeded_global_rng

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    from .checkpoint import RunCheckpoints
    from .latents import TrainingSet

logger = logging.getLogger("db_adapters")

ImagesInput = str | os.PathLike | Sequence[Any]


def personalize(
    pipe: DiffusionPipeline,
    images: ImagesInput | Subject | Sequence[Subject],
    class_noun: str | None = None,
    *,
    class_images: ImagesInput | None = None,
    strategy: str = "lora",
    callback: StepCallback | None = None,
    **settings: Any,
) -> Adapter:
    """Fine-tune `pipe` in place so that "a {identifier} {class_noun}" renders the subject in `images`.

    After it returns, `pipe` itself generates the subject; `adapter.save(path)` writes it to one
    safetensors file. If training fails or is interrupted, `pipe` is left as it was. A pipeline that
    already carries an adapter is refused: call `unload_adapter(pipe)` first.

    Args:
        pipe (`DiffusionPipeline`): a text-to-image pipeline of a supported family (SD 1.x/2.x, SDXL),
            on the device to train on, in the dtype to train in.
        images (`str | PathLike | list | Subject | list[Subject]`): a folder, image paths, or PIL images of
            the subject (3-5); or several `Subject(images, class_noun)`s, trained into one adapter with one
            identifier each (then leave `class_noun` and `class_images` out: each Subject has its own).
        class_noun (`str | None`): the subject's coarse class, e.g. "dog".
        class_images (`str | PathLike | list | None`): your own class images; topped up by generation.
        strategy (`str`): a registered strategy: "lora" (default), "dora", "loha", "lokr", "oft" or "full".
        callback (`Callable[[int, dict], None] | None`): called after every step with the losses.
        **settings: the training settings below, and the strategy's options.

    Returns:
        The `Adapter`: `.identifier`, `.instance_prompt`, `.subjects` (one per subject), `.save(path)`.

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
    refuse_if_adapted(pipe)
    subjects = as_subjects(images, class_noun, class_images, settings)
    plan = make_plan(pipe, subjects, strategy=strategy, settings=dict(settings))
    # Checked before class images are generated: a refused resume should cost nothing.
    checkpoints, resume_from = _run_checkpoints(plan)
    prior = _prior_images(pipe, plan)
    tokens = _new_tokens(pipe, plan)
    try:
        adapter = _personalize(pipe, plan, prior, tokens, callback, checkpoints, resume_from)
    except BaseException:
        if tokens is not None:
            tokens.remove(pipe)
        raise
    if tokens is not None:
        tokens.finish(pipe)  # the trained rows become the pipeline's own new tokens
    attach(pipe, adapter)
    return adapter


def _new_tokens(pipe: DiffusionPipeline, plan: RunPlan) -> TokenEmbeddings | None:
    """With pivotal tuning, the run's new tokens, added to the pipeline (before prompts are tokenized)."""
    if not plan.new_tokens:
        return None
    tokens = TokenEmbeddings(plan.new_tokens)
    tokens.add(pipe, plan.family, seed=plan.config.seed)
    return tokens


def _personalize(
    pipe: DiffusionPipeline,
    plan: RunPlan,
    prior: dict[str, list[Image.Image]],
    tokens: TokenEmbeddings | None,
    callback: StepCallback | None,
    checkpoints: RunCheckpoints | None,
    resume_from: tuple | None,
) -> Adapter:
    data = training_set(pipe, plan, prior)
    first = plan.subjects[0]
    adapter = Adapter(
        identifier=first.identifier,
        class_noun=first.class_noun,
        instance_prompt=first.instance_prompt,
        strategy=plan.strategy,
        base_model=plan.base_model,
        resolution=plan.config.resolution,
        steps=plan.config.steps,
        subjects=[subject.binding() for subject in plan.subjects],
        tokens=plan.new_tokens,
        extra={
            "class_prompt": first.class_prompt,
            "prior_preservation": plan.config.prior_preservation,
            "learning_rate": plan.config.learning_rate,  # kohya files show it (ss_learning_rate)
        },
    )
    unquantized = _quantize_base(pipe, plan)
    try:
        adapter.history = _train(pipe, plan, data, callback, checkpoints, resume_from, tokens)
    except BaseException:
        if unquantized is not None:  # the pipeline as it came, with its full-precision denoiser
            setattr(pipe, plan.family.denoiser, unquantized.to(plan.device))
        raise
    return adapter


def _quantize_base(pipe: DiffusionPipeline, plan: RunPlan) -> Any:
    """With `quantize_base`, swap in the quantized denoiser (after the class images and latents were made
    with the full-precision one); returns the original, or None."""
    if plan.config.quantize_base is None:
        return None
    from .quantize import quantize_denoiser

    dtype = getattr(pipe, plan.family.denoiser).dtype
    return quantize_denoiser(pipe, plan.family, plan.config.quantize_base, dtype)


def _run_checkpoints(plan: RunPlan) -> tuple[RunCheckpoints | None, tuple | None]:
    """The run's checkpoint folder (None without checkpoint_every/resume) and the checkpoint to resume from."""
    config = plan.config
    if not (config.checkpoint_every or config.resume):
        return None, None
    from .checkpoint import FOLDER_NAME, RunCheckpoints, images_digest, run_fingerprint

    one = len(plan.subjects) == 1
    fingerprint = run_fingerprint(
        config,
        # A one-subject run keeps the fingerprint it always had, so its checkpoints still resume.
        images=images_digest(plan.subjects[0].images) if one else [images_digest(s.images) for s in plan.subjects],
        class_images=_given_class_images_digest(plan),
        strategy=plan.strategy.name,
        strategy_options=plan.strategy.config(),
        # The weights decide the result, not where the model was loaded from.
        base_model={k: plan.base_model[k] for k in ("architecture", "weights")},
        identifier=plan.subjects[0].identifier if one else plan.identifiers,
        instance_prompt=plan.subjects[0].instance_prompt if one else [s.instance_prompt for s in plan.subjects],
        class_prompt=plan.subjects[0].class_prompt if one else [s.class_prompt for s in plan.subjects],
        # The resolved rate of the text encoders matters only when they train.
        text_encoder_learning_rate=config.text_encoder_learning_rate if config.train_text_encoder else None,
    )
    checkpoints = RunCheckpoints(
        config.output_dir / FOLDER_NAME, fingerprint, every=config.checkpoint_every, keep=config.keep_checkpoints
    )
    if config.resume:
        return checkpoints, checkpoints.resume_point()
    checkpoints.refuse_to_overwrite()
    return checkpoints, None


def _given_class_images_digest(plan: RunPlan) -> Any:
    from .checkpoint import images_digest

    if len(plan.subjects) == 1:
        given = plan.subjects[0].class_images
        return images_digest(given) if given else None
    return [images_digest(s.class_images) if s.class_images else None for s in plan.subjects]


def default_cache_dir() -> Path:
    """Where class images are cached when neither `class_image_dir` nor `output_dir` is given."""
    root = os.environ.get("DB_ADAPTERS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "db_adapters"
    )
    return Path(root) / "class_images"


def _prior_images(pipe: DiffusionPipeline, plan: RunPlan) -> dict[str, list[Image.Image]]:
    """The class images of each class prompt of the run (the given ones, topped up by generation)."""
    config = plan.config
    if not config.prior_preservation:
        return {}
    cache = config.class_image_dir or (
        config.output_dir / "class_images" if config.output_dir is not None else default_cache_dir()
    )
    return {
        prompt: make_class_images(
            pipe,
            prompt,
            config.num_class_images,
            config.resolution,
            seed=config.seed,
            cache_dir=cache,
            base_fingerprint=plan.base_model["weights"],
            sampler=config.class_sampler,
            num_inference_steps=config.class_inference_steps,
            guidance_scale=config.class_guidance_scale,
            batch_size=config.class_batch_size,
            given=given,
            precision=config.class_precision,
        )
        for prompt, given in class_groups(plan.subjects).items()
    }


def _train(
    pipe: DiffusionPipeline,
    plan: RunPlan,
    data: TrainingSet,
    callback: StepCallback | None,
    checkpoints: RunCheckpoints | None = None,
    resume_from: tuple | None = None,
    tokens: TokenEmbeddings | None = None,
) -> list[dict[str, float]]:
    strategy = plan.strategy
    flags = _requires_grad_flags(pipe, plan)
    # peft draws LoRA's initial weights from the global RNG: seed it, so a run depends on `seed` alone.
    with seeded_global_rng(plan.config.seed, plan.device):
        strategy.apply(pipe, plan.family, train_text_encoder=plan.config.train_text_encoder)
    frozen = FrozenParts.of(pipe, plan)
    try:
        trainer = Trainer(
            pipe,
            plan,
            data,
            callback=callback,
            validation=_previewer(pipe, plan, frozen),
            checkpoints=checkpoints,
            resume_from=resume_from,
            extra_parameters=tokens.trainable_parameters() if tokens is not None else None,
        )
        if plan.config.offload_frozen:  # everything they had to compute is cached in `data`
            frozen.offload()
        history = trainer.run()
    except BaseException:
        # Failed or interrupted (Ctrl-C too): the caller gets back the pipeline it passed in.
        frozen.restore()
        strategy.remove(pipe)
        _restore_requires_grad(flags)
        raise
    frozen.restore()
    strategy.finish(pipe)
    _restore_requires_grad(flags)
    return history


def _requires_grad_flags(pipe: DiffusionPipeline, plan: RunPlan) -> dict[torch.nn.Parameter, bool]:
    modules = [getattr(pipe, name) for name in (*plan.family.components(), "vae")]
    return {p: p.requires_grad for module in modules for p in module.parameters()}


def _restore_requires_grad(flags: dict[torch.nn.Parameter, bool]) -> None:
    for param, flag in flags.items():
        param.requires_grad_(flag)


def _previewer(pipe: DiffusionPipeline, plan: RunPlan, frozen: FrozenParts):
    config = plan.config
    if not (config.validation_prompts and config.validation_every and config.output_dir):
        return None
    from .prior import generate_images

    prompts = [_with_identifiers(p, plan.identifiers) for p in config.validation_prompts]

    def render(step: int) -> None:
        import torch

        from .distributed import processes

        if not processes(plan.device).is_main:
            return  # the main process alone renders and writes previews
        folder = config.output_dir / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        was = {m: m.training for m in (getattr(pipe, name) for name in plan.family.components())}
        for module in was:
            module.eval()
        try:
            with torch.no_grad(), frozen.restored():
                for i, prompt in enumerate(prompts):
                    (image,) = generate_images(
                        pipe,
                        prompt,
                        [config.seed + i],
                        config.resolution,
                        num_inference_steps=config.validation_steps,
                        batch_size=1,
                    )
                    image.save(folder / f"step_{step:06d}_{i}.png")
        finally:
            for module, training in was.items():
                module.train(training)

    return render


def _with_identifiers(prompt: str, identifiers: list[str]) -> str:
    """A preview prompt with "{id}" (the first subject's identifier) and "{id2}", "{id3}"... filled in."""
    for number in range(len(identifiers), 1, -1):
        prompt = prompt.replace(f"{{id{number}}}", identifiers[number - 1])
    return prompt.replace("{id}", identifiers[0])


def _document_settings() -> None:
    """Give `personalize` every setting as a keyword in its signature and docstring, from `TrainConfig`.

    Each setting is written once, beside its field in `config.py`; `help(personalize)`, IDEs that read
    signatures and `db-adapt train --help` all show that one text.
    """
    from .strategies import available_strategies, get_strategy

    signature = inspect.signature(personalize)
    parameters = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    lines = ["", "    Settings (keyword arguments; `None` resolves for the run):"]
    for spec in fields(TrainConfig):
        parameters.append(
            inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=spec.default, annotation=spec.type)
        )
        lines.append(f"        {spec.name} (`{spec.type}`): {help_text(spec)}")
    for name in available_strategies():
        options = fields(get_strategy(name).Options)
        if options:
            lines.append(f"\n    Options of strategy {name!r}:")
            for spec in options:
                lines.append(f"        {spec.name} (`{spec.type}`): {help_text(spec)}")
    parameters.append(inspect.Parameter("options", inspect.Parameter.VAR_KEYWORD))
    personalize.__signature__ = signature.replace(parameters=parameters)
    marker = "\n    Returns:"
    doc = personalize.__doc__ or ""
    personalize.__doc__ = doc.replace(marker, "\n".join(lines) + "\n" + marker, 1)


_document_settings()
