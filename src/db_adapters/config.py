"""Training settings: one flat dataclass of defaults, each with its help text, validated when built.

Every setting is written once, here: `personalize`'s keyword arguments, its docstring and
`db-adapt train`'s options are generated from these fields (and from each strategy's `Options`).

Defaults for real models follow the paper and the peers (../REFERENCE.md): prior preservation on
with lambda = 1, 200 class images (diffusers' README example; the paper used ~1000 and notes fewer
suffice), 800 steps (diffusers' README with prior preservation; the paper ~1000), learning rate
5e-6 for a full fine-tune (the paper's SD setting) and 1e-4 for LoRA (diffusers' LoRA README), at the
pipeline's native resolution. `None` means "resolved for the run" (see `plan.py`).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import InputError

DEFAULT_STEPS = 800
DEFAULT_NUM_CLASS_IMAGES = 200
DEFAULT_CLASS_INFERENCE_STEPS = 20  # DPM-Solver++ needs 20 (its paper: 15-20 for high quality); the peers use 50
# Pivotal tuning's new embeddings: textual inversion's usual AdamW rate (diffusers' textual-inversion docs use 5e-4).
DEFAULT_TOKEN_LEARNING_RATE = 5e-4
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
CLASS_SAMPLERS = ("dpmsolver++", "ddim", "euler", "ddpm", "pipeline")
TIMESTEP_DENSITIES = ("uniform", "logit_normal", "mode")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
QUANTIZATIONS = ("nf4", "int8")
MEMORY_PRESETS = ("24gb", "16gb", "12gb", "8gb")


def setting(
    default: Any, help: str, *, cli: bool = True, choices: tuple[str, ...] | None = None, flag: str | None = None
) -> Any:
    """A dataclass field with its help text (shown by `help(personalize)` and `db-adapt train --help`).

    Args:
        default (`Any`): the default value (immutable).
        help (`str`): one sentence: what it does and, where it helps, its usual values.
        cli (`bool`): whether `db-adapt train` offers it as an option.
        choices (`tuple[str, ...] | None`): the allowed values, for the CLI's choice list.
        flag (`str | None`): the CLI option's name when it is not the field's (`--validation-prompt`).

    Example:
        >>> from dataclasses import dataclass, fields
        >>> @dataclass
        ... class Options:
        ...     rank: int = setting(4, "LoRA rank.")
        >>> fields(Options)[0].metadata["help"]
        'LoRA rank.'
    """
    return field(default=default, metadata={"help": help, "cli": cli, "choices": choices, "flag": flag})


def help_text(spec: Field) -> str:
    """A field's help text, with its default when it has one worth saying."""
    text = spec.metadata.get("help", "")
    if spec.default is not MISSING and spec.default not in (None, False, ()):
        text += f" Default: {spec.default!r}."
    return text


@dataclass
class TrainConfig:
    """Everything `personalize` needs besides the pipeline, the images, the class noun and the strategy."""

    identifier: str | None = setting(None, "The rare token [V] bound to the subject; None lets the binder choose one.")
    instance_prompt: str | None = setting(None, 'The subject images\' prompt; None: "a {identifier} {class_noun}".')
    class_prompt: str | None = setting(None, 'The class images\' prompt; None: "a {class_noun}".')
    strict: bool = setting(False, "A questionable identifier is an error instead of a warning.")
    steps: int | None = setting(
        None, "Optimiser steps; None: 800, or the model folder's recommendation (db_adapters.json)."
    )
    learning_rate: float | None = setting(
        None, "Learning rate; None: the model folder's recommendation or the strategy's (LoRA 1e-4, full 5e-6)."
    )
    text_encoder_learning_rate: float | None = setting(None, "Text encoders' learning rate; None: learning_rate.")
    batch_size: int = setting(1, "Instance images per step; as many class images join them.")
    gradient_accumulation_steps: int = setting(1, "Micro-batches per optimiser step.")
    prior_preservation: bool = setting(True, "Add the class-prior loss (the paper's method).")
    num_class_images: int | None = setting(None, "Class images for the prior; None: 200, or the recommendation.")
    prior_loss_weight: float = setting(1.0, "Lambda, the prior term's weight (the paper: 1.0).")
    train_text_encoder: bool | None = setting(
        None,
        "Train the text encoder(s) too (all of the family's encoders); None: the model folder's recommendation,"
        " else no.",
    )
    pivotal_tokens: int = setting(
        0,
        "Pivotal tuning: bind each subject to this many new tokens (<s0><s1>...) whose embeddings train with "
        "the adapter, as diffusers' advanced script's --train_text_encoder_ti (2 is usual); 0: a rare word.",
    )
    token_learning_rate: float | None = setting(
        None, f"Learning rate of the new tokens' embeddings (pivotal_tokens); None: {DEFAULT_TOKEN_LEARNING_RATE}."
    )
    resolution: int | None = setting(None, "Training size in pixels, a multiple of 8; None: the model's native size.")
    random_flip: bool = setting(False, "Also train on left-right mirrored subject images.")
    snr_gamma: float | None = setting(
        None, "Min-SNR weighting gamma (5.0 is usual), applied to each half on its own (SD 1.x/2.x, SDXL)."
    )
    timestep_density: str = setting(
        "uniform",
        "Flow-matching models (SD3, Flux): how training sigmas are drawn (diffusers' SD3 densities).",
        choices=TIMESTEP_DENSITIES,
    )
    logit_mean: float = setting(0.0, "Mean of the logit-normal timestep density (SD3, Flux).")
    logit_std: float = setting(1.0, "Standard deviation of the logit-normal timestep density (SD3, Flux).")
    mode_scale: float = setting(1.29, "Scale of the 'mode' timestep density (SD3, Flux).")
    loss_weighting: str = setting(
        "none",
        "Flow-matching loss weighting per sample: 'none', 'sigma_sqrt' or 'cosmap' (SD3, Flux).",
        choices=FLOW_WEIGHTINGS,
    )
    guidance_scale: float = setting(
        1.0, "Flux dev (guidance-distilled): the guidance value the transformer is given while training."
    )
    noise_offset: float = setting(0.0, "Offset-noise strength (0.05-0.1 helps very dark or bright images).")
    mixed_precision: str | None = setting(
        None,
        "'no' (fp32), 'fp16' or 'bf16' autocast; None matches the pipeline's dtype (fp16 -> fp16 with loss "
        "scaling, bf16 -> bf16), and a float32 pipeline trains in bf16 on a GPU that supports it (else fp32). "
        "Trainable weights stay fp32.",
        choices=MIXED_PRECISION,
    )
    memory: str | None = setting(
        None,
        "GPU memory preset, '24gb', '16gb', '12gb' or '8gb': chooses gradient checkpointing, 8-bit Adam, "
        "offloading and a quantized base (LoRA) for those settings left unset (README: Memory presets).",
        choices=MEMORY_PRESETS,
    )
    use_8bit_adam: bool | None = setting(
        None, "bitsandbytes' 8-bit AdamW (optimizer state in uint8); None: off, or as `memory` chooses."
    )
    quantize_base: str | None = setting(
        None,
        "Train LoRA on the frozen denoiser quantized by bitsandbytes (QLoRA): 'nf4' or 'int8'; needs CUDA. The "
        "file still loads onto the unquantized base.",
        choices=QUANTIZATIONS,
    )
    offload_frozen: bool | None = setting(
        None,
        "Move the frozen VAE and text encoders off the GPU once latents and prompt embeddings are cached; "
        "None: on when training on CUDA.",
    )
    adam_min_8bit_size: int = setting(4096, "8-bit Adam: tensors smaller than this keep 32-bit state.", cli=False)
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas.", cli=False)
    adam_weight_decay: float = setting(1e-2, "AdamW weight decay.")
    adam_epsilon: float = setting(1e-8, "AdamW epsilon.", cli=False)
    gradient_checkpointing: bool | None = setting(
        None, "Recompute activations in the backward pass: less memory, slower; None: off, or as `memory` chooses."
    )
    compile: bool = setting(
        False, "torch.compile the denoiser for training: faster steps on CUDA after a slow first one (compiling)."
    )
    lr_scheduler: str = setting("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(0, "Warmup steps of the learning-rate schedule.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.")
    validation_prompts: tuple[str, ...] | None = setting(
        None,
        'Preview prompts rendered during training; "{id}" becomes the identifier ("{id2}": the second subject\'s).',
        flag="--validation-prompt",
    )
    validation_every: int | None = setting(None, "Render previews every N steps into output_dir/previews.")
    validation_steps: int = setting(25, "Sampler steps of each preview.")
    class_sampler: str | None = setting(
        None,
        "Sampler of the class images ('ddpm' is the paper's ancestral sampling); None: DPM-Solver++ for SD and "
        "SDXL, the pipeline's own flow-matching sampler for SD3 and Flux.",
        choices=CLASS_SAMPLERS,
    )
    class_inference_steps: int | None = setting(None, "Sampler steps per class image; None: 20, or the recommendation.")
    class_guidance_scale: float | None = setting(
        None, "Classifier-free guidance of the class images; None: the pipeline's own default."
    )
    class_batch_size: int = setting(4, "Class images generated per pipeline call.")
    class_precision: str | None = setting(
        None,
        "Autocast of the class-image generation: 'no', 'fp16' or 'bf16'; None: a float32 pipeline's under the "
        "run's mixed precision (bf16 on most GPUs), or bf16 on a CPU that computes it natively (AVX512-BF16, "
        "AMX); a half-precision one as it is.",
        choices=MIXED_PRECISION,
    )
    class_image_dir: Path | None = setting(None, "The class-image cache; None: output_dir/class_images.")
    seed: int = setting(0, "Seeds the identifier choice, class images, initial weights, noise and data order.")
    output_dir: Path | None = setting(None, "The run's files: class-image cache, previews, checkpoints.")
    progress: bool = setting(True, "Show a progress bar.", cli=False)
    checkpoint_every: int | None = setting(
        None, "Save the complete training state to output_dir/checkpoints every N steps."
    )
    keep_checkpoints: int = setting(2, "Keep the newest K checkpoints.")
    resume: bool = setting(
        False,
        "Continue bit-exactly from the newest complete checkpoint in output_dir/checkpoints; refused, naming "
        "the difference, if an input or a result-changing setting differs.",
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "class_batch_size", "validation_steps"):
            self._check_positive_int(name, getattr(self, name))
        for name in ("steps", "num_class_images", "class_inference_steps"):
            if getattr(self, name) is not None:
                self._check_positive_int(name, getattr(self, name))
        if self.train_text_encoder is not None and not isinstance(self.train_text_encoder, bool):
            raise InputError(
                f"train_text_encoder={self.train_text_encoder!r} must be True, False or None (the model folder's "
                "recommendation); check db_adapters.json if you did not set it."
            )
        if not isinstance(self.pivotal_tokens, int) or isinstance(self.pivotal_tokens, bool) or self.pivotal_tokens < 0:
            raise InputError(f"pivotal_tokens={self.pivotal_tokens!r} must be an integer >= 0 (2 is usual; 0: off).")
        for name in ("learning_rate", "text_encoder_learning_rate", "token_learning_rate"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value > 0 and math.isfinite(value)):
                raise InputError(f"{name}={value!r} must be a positive number, e.g. 1e-4 for LoRA.")
        if not (_is_number(self.prior_loss_weight) and self.prior_loss_weight >= 0):
            raise InputError(f"prior_loss_weight={self.prior_loss_weight!r} must be >= 0 (the paper uses 1.0).")
        if self.snr_gamma is not None and not (_is_number(self.snr_gamma) and self.snr_gamma > 0):
            raise InputError(f"snr_gamma={self.snr_gamma!r} must be a positive number (5.0 is common) or None.")
        if not (_is_number(self.noise_offset) and self.noise_offset >= 0):
            raise InputError(f"noise_offset={self.noise_offset!r} must be >= 0 (0.05-0.1 is common).")
        if not (_is_number(self.max_grad_norm) and self.max_grad_norm > 0):
            raise InputError(f"max_grad_norm={self.max_grad_norm!r} must be a positive number.")
        if self.class_guidance_scale is not None and not (
            _is_number(self.class_guidance_scale) and self.class_guidance_scale >= 0
        ):
            raise InputError(
                f"class_guidance_scale={self.class_guidance_scale!r} must be a number >= 0 (7.5 is usual)."
            )
        if not isinstance(self.lr_warmup_steps, int) or self.lr_warmup_steps < 0:
            raise InputError(f"lr_warmup_steps={self.lr_warmup_steps!r} must be an integer >= 0.")
        if self.memory is not None:
            self._check_choice("memory", self.memory, MEMORY_PRESETS)
        for name in ("mixed_precision", "class_precision"):
            if getattr(self, name) is not None:
                self._check_choice(name, getattr(self, name), MIXED_PRECISION)
        self._check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        if self.class_sampler is not None:
            self._check_choice("class_sampler", self.class_sampler, CLASS_SAMPLERS)
        self._check_choice("timestep_density", self.timestep_density, TIMESTEP_DENSITIES)
        self._check_choice("loss_weighting", self.loss_weighting, FLOW_WEIGHTINGS)
        if self.quantize_base is not None:
            self._check_choice("quantize_base", self.quantize_base, QUANTIZATIONS)
        for name in ("logit_mean", "logit_std", "mode_scale", "guidance_scale"):
            if not (_is_number(getattr(self, name)) and math.isfinite(getattr(self, name))):
                raise InputError(f"{name}={getattr(self, name)!r} must be a finite number.")
        if self.logit_std <= 0:
            raise InputError(f"logit_std={self.logit_std!r} must be positive (1.0 is usual).")
        if self.resolution is not None:
            from .data import validate_resolution

            validate_resolution(self.resolution)
        self._check_validation_settings()
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise InputError(f"seed={self.seed!r} must be an integer >= 0.")
        if self.output_dir is not None:
            self.output_dir = Path(self.output_dir)
        self._check_checkpoint_settings()
        if self.class_image_dir is not None:
            self.class_image_dir = Path(self.class_image_dir)

    def _check_validation_settings(self) -> None:
        if isinstance(self.validation_prompts, str):
            self.validation_prompts = (self.validation_prompts,)
        elif self.validation_prompts is not None:
            self.validation_prompts = tuple(self.validation_prompts) or None
        if self.validation_every is not None:
            self._check_positive_int("validation_every", self.validation_every)
            if not self.validation_prompts:
                raise InputError("validation_every is set but validation_prompts is empty; pass prompts to render.")
            if self.output_dir is None:
                raise InputError("validation_every needs output_dir: previews are written to output_dir/previews.")

    def _check_checkpoint_settings(self) -> None:
        if self.checkpoint_every is not None:
            self._check_positive_int("checkpoint_every", self.checkpoint_every)
        self._check_positive_int("keep_checkpoints", self.keep_checkpoints)
        if not isinstance(self.resume, bool):
            raise InputError(f"resume={self.resume!r} must be True or False.")
        for name in ("checkpoint_every", "resume"):
            if getattr(self, name) and self.output_dir is None:
                raise InputError(
                    f"{name} needs output_dir (--output-dir): checkpoints are kept in output_dir/checkpoints."
                )

    @staticmethod
    def _check_positive_int(name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{name}={value!r} must be a positive integer.")

    @staticmethod
    def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
        if value not in choices:
            raise InputError(f"{name}={value!r} is not one of {', '.join(choices)}.")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
