"""LoRA: low-rank peft layers on the UNet's attention projections (and the text encoder's).

The file is diffusers' own LoRA format, written by `save_lora_weights`, so plain diffusers loads it
with `pipe.load_lora_weights(path)`; it carries `lora_adapter_metadata` so a rank != alpha scale
survives the round trip.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AdapterError, InputError
from ..export import read_file_metadata, read_tensors, save_tensors
from . import register_strategy
from .base import Strategy

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

ADAPTER_NAME = "dreambooth"
# The peers' choices (diffusers' train_dreambooth_lora.py): attention projections only.
UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclasses.dataclass
class LoraOptions:
    """LoRA's options. `alpha` None means alpha = rank (scale 1), as in the peers' defaults."""

    rank: int = 4
    alpha: float | None = None
    target_modules: list[str] | None = None
    text_encoder_target_modules: list[str] | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise InputError(f"rank={self.rank!r} must be a positive integer (4-64 is usual).")
        if self.alpha is None:
            self.alpha = self.rank
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise InputError(f"alpha={self.alpha!r} must be a positive number (often equal to rank).")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise InputError(f"dropout={self.dropout!r} must be in [0, 1).")
        self.target_modules = _module_list("target_modules", self.target_modules, UNET_TARGETS)
        self.text_encoder_target_modules = _module_list(
            "text_encoder_target_modules", self.text_encoder_target_modules, TEXT_ENCODER_TARGETS
        )


def _module_list(name: str, value: object, default: tuple[str, ...]) -> list[str]:
    if value is None:
        return list(default)
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not value or not all(isinstance(v, str) and v for v in value):
        raise InputError(f"{name}={value!r} must be a non-empty list of module names, e.g. ['to_q', 'to_v'].")
    return list(value)


@register_strategy
class Lora(Strategy):
    """peft LoRA layers; only they train, the base weights stay frozen and untouched."""

    name = "lora"
    Options = LoraOptions
    default_learning_rate = 1e-4  # diffusers' LoRA DreamBooth README

    def _lora_config(self, targets: list[str]):
        from peft import LoraConfig

        return LoraConfig(
            r=self.options.rank,
            lora_alpha=self.options.alpha,
            lora_dropout=self.options.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )

    def apply(self, pipe: StableDiffusionPipeline, *, train_text_encoder: bool) -> None:
        from peft import inject_adapter_in_model

        self.train_text_encoder = train_text_encoder
        self.components = self.components_for(train_text_encoder)
        pipe.unet.add_adapter(self._lora_config(self.options.target_modules), adapter_name=ADAPTER_NAME)
        if train_text_encoder:
            # transformers 5's CLIPTextModel.add_adapter demands peft >= 0.22; peft's own injection
            # is what it would call, and works with the peft releases we support.
            inject_adapter_in_model(
                self._lora_config(self.options.text_encoder_target_modules), pipe.text_encoder, ADAPTER_NAME
            )
        for params in self.trainable_parameters(pipe).values():
            for param in params:
                # Trainable weights stay fp32 even on an fp16 pipeline: AMP unscales only fp32 gradients.
                param.data = param.data.float()

    def trainable_parameters(self, pipe: StableDiffusionPipeline) -> dict[str, list[torch.nn.Parameter]]:
        return {
            component: [p for n, p in getattr(pipe, component).named_parameters() if ".lora_" in n]
            for component in self.components
        }

    def finish(self, pipe: StableDiffusionPipeline) -> None:
        for params in self.trainable_parameters(pipe).values():
            for param in params:
                param.requires_grad_(False)

    def remove(self, pipe: StableDiffusionPipeline) -> None:
        pipe.unload_lora_weights()

    def save(
        self, pipe: StableDiffusionPipeline, path: Path, metadata: dict[str, str], dtype: torch.dtype | None
    ) -> None:
        from diffusers import StableDiffusionPipeline as Pipeline
        from peft.utils import get_peft_model_state_dict

        layers, configs = {}, {}
        for component in self.components:
            module = getattr(pipe, component)
            state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
            if component == "text_encoder":
                state = _with_text_model_prefix(state)
            layers[component] = {k: v.to("cpu", dtype) if dtype else v.to("cpu") for k, v in state.items()}
            configs[component] = self._lora_config(self._targets(component)).to_dict()
        with tempfile.TemporaryDirectory(prefix=".db-adapters-", dir=Path(path).parent) as scratch:
            # diffusers writes its own key layout and `lora_adapter_metadata`; we add our metadata
            # beside them and move the file into place atomically.
            Pipeline.save_lora_weights(
                scratch,
                unet_lora_layers=layers["unet"],
                text_encoder_lora_layers=layers.get("text_encoder"),
                unet_lora_adapter_metadata=configs["unet"],
                text_encoder_lora_adapter_metadata=configs.get("text_encoder"),
                weight_name="lora.safetensors",
            )
            written = Path(scratch) / "lora.safetensors"
            save_tensors(path, read_tensors(written), {**read_file_metadata(written), **metadata})

    def load(self, pipe: StableDiffusionPipeline, path: Path) -> None:
        header = read_file_metadata(path)
        components = {key.partition(".")[0] for key in read_tensors(path)}
        if not components <= {"unet", "text_encoder"}:
            raise AdapterError(f"{str(path)!r}: tensors for unknown components {sorted(components)} in a LoRA file.")
        self.components = tuple(c for c in ("unet", "text_encoder") if c in components)
        self.train_text_encoder = "text_encoder" in components
        _check_lora_metadata(header, path)
        try:
            with _diffusers_log_level(logging.ERROR if not self.train_text_encoder else None):
                pipe.load_lora_weights(str(path), adapter_name=ADAPTER_NAME)
        except (ValueError, RuntimeError, KeyError) as error:
            pipe.unload_lora_weights()
            raise AdapterError(f"{str(path)!r} does not fit this pipeline's LoRA layers ({error}).") from None

    def _targets(self, component: str) -> list[str]:
        return self.options.target_modules if component == "unet" else self.options.text_encoder_target_modules


@contextmanager
def _diffusers_log_level(level: int | None) -> Iterator[None]:
    # A UNet-only file makes diffusers log "No LoRA keys associated to CLIPTextModel" at warning
    # level; that is expected for our files, so it is hidden for their load only.
    import diffusers.utils.logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    if level is not None:
        diffusers_logging.set_verbosity(level)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


def _with_text_model_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers 5 flattened CLIPTextModel (no `text_model.` level); older diffusers releases and
    # kohya converters expect the `text_model.` prefix, and current diffusers strips it when needed.
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def _check_lora_metadata(header: dict[str, str], path: Path) -> None:
    text = header.get("lora_adapter_metadata")
    if text is None:
        return
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        raise AdapterError(f"{str(path)!r}: lora_adapter_metadata is not JSON.") from None
    if not isinstance(parsed, dict):
        raise AdapterError(f"{str(path)!r}: lora_adapter_metadata is not a JSON object.")
