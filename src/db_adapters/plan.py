"""The run plan: every setting of one `personalize` run, resolved once, before anything is trained.

Defaults that depend on the pipeline (resolution, mixed precision, the model folder's recommended
steps and learning rate), on the strategy (learning rate) or on the binder (identifier, prompts) are
decided here and nowhere else; the prior, the trainer, previews and checkpoints read the plan.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import binder
from .config import (
    DEFAULT_CLASS_INFERENCE_STEPS,
    DEFAULT_NUM_CLASS_IMAGES,
    DEFAULT_STEPS,
    DEFAULT_TOKEN_LEARNING_RATE,
    TrainConfig,
)
from .data import check_image_sizes, load_images
from .errors import InputError
from .families import Family, family_of
from .memory import memory_preset, offload_wanted
from .pipelines import architecture_fingerprint, model_id, recommended_settings, weights_fingerprint
from .pivotal import new_tokens
from .quantize import check_quantization
from .strategies import Strategy, get_strategy
from .subjects import PlannedSubject, Subject

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("db_adapters")

# What each pipeline dtype trains under when mixed_precision is left unset.
_MATCHING_PRECISION = {"float32": "no", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class RunPlan:
    """One run, fully resolved: the family and strategy, the inputs, and a `TrainConfig` with no open defaults.

    Attributes:
        family: the pipeline's model family.
        strategy: the strategy instance (options validated).
        config: the settings, with steps, learning rates, class-image count and steps, guidance,
            resolution and mixed precision filled in.
        subjects: each subject's images (loaded), class noun, identifier, prompts and given class images.
        base_model: the base model's id and fingerprints (stored in the adapter file).
        device: where the pipeline is, so where training runs.
    """

    family: type[Family]
    strategy: Strategy
    config: TrainConfig
    subjects: tuple[PlannedSubject, ...]
    base_model: dict[str, str]
    device: torch.device

    @property
    def identifiers(self) -> list[str]:
        """Every subject's identifier, in the order the subjects were given."""
        return [subject.identifier for subject in self.subjects]

    @property
    def new_tokens(self) -> list[str]:
        """Pivotal tuning's new tokens, every subject's in order; empty without pivotal tuning."""
        count = self.config.pivotal_tokens
        return new_tokens(count * len(self.subjects)) if count else []

    @property
    def prompts_encoded_each_step(self) -> bool:
        """Whether the text encoders run every step (something in them trains), or once before training."""
        return self.config.train_text_encoder or bool(self.config.pivotal_tokens)


def make_plan(
    pipe: Any,
    subjects: list[Subject],
    *,
    strategy: str = "lora",
    settings: dict[str, Any],
) -> RunPlan:
    """Check every input and resolve every default of a `personalize` call (see its docstring for the args)."""
    family = family_of(pipe)
    config_settings = {k: settings.pop(k) for k in list(settings) if k in TrainConfig.field_names()}
    recommended = recommended_settings(pipe, strategy)
    # The rest are the strategy's options (it rejects others); the model folder may recommend some.
    chosen = get_strategy(strategy)(**(_recommended_options(strategy, recommended) | settings))
    config = TrainConfig(**config_settings)
    config = _resolve_defaults(pipe, family, chosen, config, recommended)
    if config.pivotal_tokens and chosen.name == "full" and config.train_text_encoder:
        raise InputError(
            "pivotal_tokens with strategy='full' and train_text_encoder=True: the full fine-tune trains the whole "
            "embedding table already. Leave out train_text_encoder (the new tokens still train), or pivotal_tokens."
        )
    planned = _plan_subjects(pipe, family, config, subjects)
    denoiser = getattr(pipe, family.denoiser)
    check_quantization(config.quantize_base, denoiser, chosen, denoiser.device)
    return RunPlan(
        family=family,
        strategy=chosen,
        config=config,
        subjects=tuple(planned),
        base_model={
            "model_id": model_id(pipe),
            "family": family.name,
            "architecture": architecture_fingerprint(pipe),
            "weights": weights_fingerprint(pipe),
        },
        device=denoiser.device,
    )


def _plan_subjects(
    pipe: Any, family: type[Family], config: TrainConfig, subjects: list[Subject]
) -> list[PlannedSubject]:
    several = len(subjects) > 1
    planned: list[PlannedSubject] = []
    for number, subject in enumerate(subjects):
        # Errors name the subject's place in the list when there are several.
        where = f"subjects[{number}]." if several else ""
        class_noun = binder.validate_class_noun(subject.class_noun)
        images = load_images(subject.images, name=f"{where}images")
        check_image_sizes(images, config.resolution, name=f"{where}images")
        given = [] if subject.class_images is None else load_images(subject.class_images, name=f"{where}class_images")
        taken = [s.identifier for s in planned] + [s.identifier.strip() for s in subjects if s.identifier]
        identifier = _identifier(pipe, family, config, class_noun, subject.identifier, number, taken)
        instance_prompt = subject.instance_prompt or binder.instance_prompt(identifier, class_noun)
        if identifier not in instance_prompt.split():
            logger.warning("instance_prompt %r does not contain the identifier %r.", instance_prompt, identifier)
        class_prompt = (config.class_prompt if not several else None) or binder.class_prompt(class_noun)
        planned.append(PlannedSubject(images, class_noun, identifier, instance_prompt, class_prompt, given))
    return planned


def _recommended_options(strategy: str, recommended: dict[str, Any]) -> dict[str, Any]:
    """The recommended values of `strategy`'s own options (a LoRA rank), for those the caller left out."""
    known = {f.name for f in dataclasses.fields(get_strategy(strategy).Options)}
    return {k: v for k, v in recommended.items() if k in known}


def _resolve_defaults(
    pipe: Any, family: type[Family], strategy: Strategy, config: TrainConfig, recommended: dict[str, Any]
) -> TrainConfig:
    def pick(name: str, fallback: Any) -> Any:
        value = getattr(config, name)
        return value if value is not None else recommended.get(name, fallback)

    learning_rate = pick("learning_rate", strategy.default_learning_rate)
    _check_family_settings(pipe, family, config)
    denoiser = getattr(pipe, family.denoiser)
    mixed_precision = resolve_mixed_precision(config.mixed_precision, denoiser.dtype, denoiser.device)
    preset = _memory_preset(pipe, family, strategy, config)
    return dataclasses.replace(
        config,
        steps=pick("steps", DEFAULT_STEPS),
        train_text_encoder=_text_encoder_choice(config, strategy, recommended),
        learning_rate=learning_rate,
        text_encoder_learning_rate=config.text_encoder_learning_rate or learning_rate,
        token_learning_rate=config.token_learning_rate or DEFAULT_TOKEN_LEARNING_RATE,
        num_class_images=pick("num_class_images", DEFAULT_NUM_CLASS_IMAGES),
        class_inference_steps=pick("class_inference_steps", DEFAULT_CLASS_INFERENCE_STEPS),
        class_guidance_scale=_class_guidance(pipe, config.class_guidance_scale),
        class_sampler=config.class_sampler or family.class_samplers[0],
        resolution=pick("resolution", None) or family.native_resolution(pipe),
        mixed_precision=mixed_precision,
        class_precision=resolve_class_precision(
            config.class_precision, mixed_precision, denoiser.dtype, denoiser.device
        ),
        gradient_checkpointing=_unset_or(config.gradient_checkpointing, preset.get("gradient_checkpointing", False)),
        use_8bit_adam=_unset_or(config.use_8bit_adam, preset.get("use_8bit_adam", False)),
        quantize_base=_unset_or(config.quantize_base, preset.get("quantize_base")),
        offload_frozen=offload_wanted(_unset_or(config.offload_frozen, preset.get("offload_frozen")), denoiser.device),
    )


def _text_encoder_choice(config: TrainConfig, strategy: Strategy, recommended: dict[str, Any]) -> Any:
    """The caller's `train_text_encoder`, else the model folder's recommendation, else False.

    A recommendation yields to pivotal tuning in a full fine-tune, which trains the embedding table already
    (the caller asking for both is refused in `make_plan`). Not coerced to bool: `TrainConfig` checks it.
    """
    if config.train_text_encoder is not None:
        return config.train_text_encoder
    if config.pivotal_tokens and strategy.name == "full":
        return False
    return recommended.get("train_text_encoder", False)


def _unset_or(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


def _memory_preset(pipe: Any, family: type[Family], strategy: Strategy, config: TrainConfig) -> dict[str, Any]:
    """What `memory=` chooses for this pipeline's denoiser and this strategy (empty without a preset)."""
    if config.memory is None:
        return {}
    denoiser = getattr(pipe, family.denoiser)
    first = next(denoiser.parameters())
    chosen = memory_preset(
        config.memory,
        sum(p.numel() for p in denoiser.parameters()),
        first.element_size(),
        trains_every_weight=strategy.trains_every_weight,
        can_quantize=strategy.quantized_base_refusal is None,
        # What the caller set counts in the fit: memory='16gb' with use_8bit_adam=False must not run over budget.
        fixed={name: getattr(config, name) for name in ("gradient_checkpointing", "use_8bit_adam", "quantize_base")},
    )
    if chosen["quantize_base"] and config.quantize_base is None and denoiser.device.type != "cuda":
        raise InputError(
            f"memory={config.memory!r} quantizes this model's denoiser ({chosen['quantize_base']}) to fit, which "
            f"needs a CUDA GPU, and the pipeline is on {denoiser.device}; move it with pipe.to('cuda'), or use a "
            "larger preset."
        )
    return chosen


def _check_family_settings(pipe: Any, family: type[Family], config: TrainConfig) -> None:
    multiple = family.resolution_multiple(pipe)
    if config.resolution is not None and config.resolution % multiple:
        raise InputError(
            f"resolution={config.resolution} must be a multiple of {multiple} for {family.title} (its VAE and "
            f"latent patches); e.g. {config.resolution // multiple * multiple or multiple}."
        )
    if config.class_sampler is not None and config.class_sampler not in family.class_samplers:
        raise InputError(
            f"class_sampler={config.class_sampler!r} does not suit {family.title}; use one of: "
            f"{', '.join(family.class_samplers)}."
        )


def resolve_mixed_precision(requested: str | None, dtype: torch.dtype, device: torch.device | None = None) -> str:
    """The autocast a run uses: `requested`, or the one matching the pipeline's dtype when None.

    fp16 pipeline -> "fp16" (autocast with a gradient scaler), bf16 -> "bf16", fp32 -> "bf16" on a
    CUDA GPU that supports it (Ampere and later: as fast as fp16, no loss scaling), else "no".
    Trainable weights are fp32 in every case. A half-precision pipeline under another autocast (or
    none) would train on half weights without a scaler, or mix fp16 and bf16: refused.

    Args:
        requested (`str | None`): "no", "fp16", "bf16", or None to match the pipeline.
        dtype (`torch.dtype`): the denoiser's dtype.
        device (`torch.device | None`): where the denoiser is (None: the CPU).

    Example:
        >>> import torch
        >>> resolve_mixed_precision(None, torch.bfloat16), resolve_mixed_precision(None, torch.float32)
        ('bf16', 'no')
    """
    name = str(dtype).removeprefix("torch.")
    matching = _MATCHING_PRECISION.get(name)
    if matching is None:
        raise InputError(f"the pipeline's denoiser is in {name}; load it in float32, float16 or bfloat16.")
    if requested is None:
        if matching == "no" and device is not None and device.type == "cuda" and _cuda_bf16_supported():
            return "bf16"
        return matching
    if name != "float32" and requested != matching:
        raise InputError(
            f"mixed_precision={requested!r} cannot train a pipeline loaded in {name} (dtype= / --dtype); "
            f"use mixed_precision={matching!r} (or leave it unset to match), or load the pipeline in float32."
        )
    return requested


def resolve_class_precision(
    requested: str | None, mixed_precision: str, dtype: torch.dtype, device: torch.device | None = None
) -> str:
    """The autocast class images are generated under: `requested`, or chosen when None.

    A half-precision pipeline generates in its own dtype ("no"). A float32 one generates under the run's
    mixed precision (bf16 on most GPUs); trained in fp32 on a CPU that computes bf16 natively (AVX512-BF16
    or AMX: oneDNN's bf16 kernels), it still generates under bf16 autocast, as on a GPU: class images are
    samples of the prior, and there this is 1.2-1.4x faster (8 class images of the medium pipeline in
    `benchmarks/speed.py`, 1 thread: 9.1-9.2 s against 11.1-12.6 s in fp32). Training stays fp32 on the CPU.

    Args:
        requested (`str | None`): "no", "fp16", "bf16", or None to choose.
        mixed_precision (`str`): the run's autocast (`resolve_mixed_precision`).
        dtype (`torch.dtype`): the denoiser's dtype.
        device (`torch.device | None`): where the denoiser is (None: the CPU).

    Example:
        >>> import torch
        >>> resolve_class_precision(None, "bf16", torch.float32, torch.device("cuda"))
        'bf16'
        >>> resolve_class_precision(None, "fp16", torch.float16), resolve_class_precision("no", "no", torch.float32)
        ('no', 'no')
    """
    import torch

    if requested is not None:
        return requested
    if dtype != torch.float32:
        return "no"
    on_cpu = device is None or device.type == "cpu"
    if mixed_precision == "no" and on_cpu and _cpu_bf16_native():
        return "bf16"
    return mixed_precision


def _cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 in hardware (elsewhere torch emulates it, slower than fp32)."""
    import torch

    # torch has no public query for this; its private ones are read defensively, so a torch without
    # them means fp32 class images, not an error.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _cuda_bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _class_guidance(pipe: Any, requested: float | None) -> float:
    if requested is not None:
        return float(requested)
    # The pipeline's own default (7.5 for SD, 5.0 for SDXL): what `pipe(prompt)` would use.
    parameter = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    default = parameter.default if parameter is not None else None
    return float(default) if isinstance(default, int | float) else 7.5


def _identifier(
    pipe: Any,
    family: type[Family],
    config: TrainConfig,
    class_noun: str,
    given: str | None,
    number: int,
    taken: list[str],
) -> str:
    if config.pivotal_tokens:
        if given is not None:
            raise InputError(
                f"identifier={given!r} and pivotal_tokens={config.pivotal_tokens}: pivotal tuning binds the subject "
                "to new tokens, not to a word; leave the identifier out (or set pivotal_tokens=0)."
            )
        return "".join(new_tokens(config.pivotal_tokens, first=number * config.pivotal_tokens))
    tokenizers = family.tokenizer_list(pipe)
    if given is None:
        # The first subject's choice is the one-subject run's (seed alone); later subjects skip taken ones.
        return binder.choose_identifier(tokenizers, class_noun, seed=config.seed + number, exclude=taken)
    return binder.validate_identifier(tokenizers, given, class_noun, strict=config.strict)
