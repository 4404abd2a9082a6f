"""Training settings: one flat dataclass of defaults, validated when built.

Defaults for real models follow the paper and the peers (../REFERENCE.md): prior preservation on
with lambda = 1, 200 class images (diffusers' README example; the paper used ~1000 and notes fewer
suffice), 800 steps (diffusers' README with prior preservation; the paper ~1000), learning rate
5e-6 for a full fine-tune (the paper's SD setting) and 1e-4 for LoRA (diffusers' LoRA README), at the
pipeline's native resolution (512 for SD 1.5, 768 for SD 2.x). `None` means "use that default".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import InputError

DEFAULT_STEPS = 800
DEFAULT_NUM_CLASS_IMAGES = 200
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
CLASS_SAMPLERS = ("dpmsolver++", "ddim", "euler", "ddpm", "pipeline")


@dataclass
class TrainConfig:
    """Everything `personalize` needs besides the pipeline, the images and the strategy."""

    steps: int = DEFAULT_STEPS
    learning_rate: float | None = None  # None: the strategy's default
    text_encoder_learning_rate: float | None = None  # None: same as learning_rate
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    prior_preservation: bool = True
    num_class_images: int = DEFAULT_NUM_CLASS_IMAGES
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    resolution: int | None = None  # None: the pipeline's native resolution
    center_crop: bool = True
    random_flip: bool = False
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    mixed_precision: str | None = None  # None: "no" (fp32), as diffusers does by default
    use_8bit_adam: bool = False
    adam_min_8bit_size: int = 4096  # bitsandbytes' default: tensors smaller than this keep 32-bit state
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    gradient_checkpointing: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    validation_prompts: list[str] | None = None
    validation_every: int | None = None
    validation_steps: int = 25
    class_sampler: str = "dpmsolver++"
    class_inference_steps: int = 25
    class_batch_size: int = 4
    class_image_dir: Path | None = None  # the class-image cache; None: output_dir/class_images
    seed: int = 0
    output_dir: Path | None = None
    progress: bool = True
    checkpoint_every: int | None = None  # save the training state to output_dir/checkpoints every N steps
    keep_checkpoints: int = 2  # the newest K checkpoints are kept
    resume: bool = False  # continue from the newest checkpoint in output_dir/checkpoints

    def __post_init__(self) -> None:
        self._check_positive_int("steps", self.steps)
        self._check_positive_int("batch_size", self.batch_size)
        self._check_positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        self._check_positive_int("num_class_images", self.num_class_images)
        self._check_positive_int("class_inference_steps", self.class_inference_steps)
        self._check_positive_int("class_batch_size", self.class_batch_size)
        self._check_positive_int("validation_steps", self.validation_steps)
        for name in ("learning_rate", "text_encoder_learning_rate"):
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
        if not isinstance(self.lr_warmup_steps, int) or self.lr_warmup_steps < 0:
            raise InputError(f"lr_warmup_steps={self.lr_warmup_steps!r} must be an integer >= 0.")
        if self.mixed_precision is None:
            self.mixed_precision = "no"
        self._check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        self._check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        self._check_choice("class_sampler", self.class_sampler, CLASS_SAMPLERS)
        if self.resolution is not None:
            from .data import validate_resolution

            validate_resolution(self.resolution)
        if self.validation_every is not None:
            self._check_positive_int("validation_every", self.validation_every)
            if not self.validation_prompts:
                raise InputError("validation_every is set but validation_prompts is empty; pass prompts to render.")
        if self.validation_prompts is not None and isinstance(self.validation_prompts, str):
            self.validation_prompts = [self.validation_prompts]
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise InputError(f"seed={self.seed!r} must be an integer >= 0.")
        if self.output_dir is not None:
            self.output_dir = Path(self.output_dir)
        self._check_checkpoint_settings()
        if self.class_image_dir is not None:
            self.class_image_dir = Path(self.class_image_dir)

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
