"""The model-family contract: what training, saving and loading need to know about a pipeline family.

A family (SD 1.x/2.x, SDXL, ...) is one file in this folder. It says which pipeline classes it
serves; which component is the denoiser and which are the text encoders (with their tokenizers); how
a prompt becomes the denoiser's conditioning; how the denoiser is called; the training objective;
the native resolution; how diffusers writes its LoRA files; and which weights fingerprint the base
model. The trainer, strategies, prior, adapter and export ask the family and never name a pipeline.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InputError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    import torch

    from ..data import CropGeometry
    from ..objectives import Objective

# Conditioning: the denoiser's inputs besides the noisy latents and timesteps, by name; each tensor's
# first dimension is the batch. A family decides the names and reads them back in `predict`.
Conditioning = dict[str, "torch.Tensor"]


class Family(ABC):
    """Base class of model families. Subclasses set the class attributes and implement the verbs.

    Attributes:
        name: the family's short name, stored in adapter files ("sd", "sdxl").
        title: what users call it ("Stable Diffusion 1.x/2.x").
        denoiser: the pipeline attribute of the denoiser ("unet", "transformer").
        text_encoders: the pipeline attributes of the text encoders, in prompt-encoding order.
        tokenizers: each text encoder's tokenizer attribute, in the same order.
        adapter_targets: the denoiser modules adapter strategies (LoRA, ...) adapt by default.
        text_encoder_adapter_targets: the same for the text encoders.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    denoiser: ClassVar[str] = "unet"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    # The peers' choice (diffusers' DreamBooth LoRA scripts for SD and SDXL): attention projections.
    adapter_targets: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
    text_encoder_adapter_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")

    # --- which pipelines ---------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def serves(cls, pipe: Any) -> bool:
        """Whether `pipe` is a pipeline of this family (a text-to-image one; img2img and inpainting are not)."""

    @classmethod
    def check(cls, pipe: Any) -> None:
        """Raise `InputError` if `pipe`, though of this family, lacks a part training needs."""
        for part in (cls.denoiser, "vae", *cls.text_encoders, *cls.tokenizers):
            if getattr(pipe, part, None) is None:
                raise InputError(
                    f"pipeline {type(pipe).__name__} has no `{part}`; db-adapters trains {cls.title} pipelines "
                    "with every part loaded (a refiner without its first text encoder cannot be personalized)."
                )

    # --- parts -------------------------------------------------------------------------------------

    @classmethod
    def components(cls, train_text_encoder: bool = True) -> tuple[str, ...]:
        """The components a strategy may train: the denoiser, then the text encoders if asked."""
        return (cls.denoiser, *cls.text_encoders) if train_text_encoder else (cls.denoiser,)

    @classmethod
    def tokenizer_list(cls, pipe: Any) -> list[Any]:
        """The pipeline's tokenizers, in text-encoder order (the binder checks identifiers in all of them)."""
        return [getattr(pipe, name) for name in cls.tokenizers]

    @classmethod
    def native_resolution(cls, pipe: Any) -> int:
        """The image size the pipeline was trained at (512 for SD 1.5, 768 for SD 2.x v, 1024 for SDXL)."""
        return int(getattr(pipe, cls.denoiser).config.sample_size) * int(pipe.vae_scale_factor)

    # --- prompts and conditioning ------------------------------------------------------------------

    @classmethod
    def prompt_ids(cls, pipe: Any, prompt: str) -> dict[str, torch.Tensor]:
        """Token ids of `prompt` per text encoder, each (1, max_length), padded as the pipeline pads."""
        ids = {}
        for encoder, tokenizer_name in zip(cls.text_encoders, cls.tokenizers, strict=True):
            tokenizer = getattr(pipe, tokenizer_name)
            ids[encoder] = tokenizer(
                prompt,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
        return ids

    @classmethod
    @abstractmethod
    def encode_prompt(cls, encoders: Mapping[str, torch.nn.Module], ids: Mapping[str, torch.Tensor]) -> Conditioning:
        """The prompt's conditioning (batch 1) from the text encoders, as the pipeline computes it."""

    @classmethod
    def image_conditioning(cls, geometries: Sequence[CropGeometry], resolution: int) -> Conditioning:
        """Per-image conditioning from each training image's size and crop (N first); none by default."""
        return {}

    @classmethod
    @abstractmethod
    def predict(
        cls, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        """The denoiser's output for noisy latents (B, C, h, w) at `timesteps` (B,)."""

    @classmethod
    @abstractmethod
    def objective(cls, pipe: Any, snr_gamma: float | None) -> Objective:
        """The training objective: noise schedule, target and per-sample weighting."""

    # --- files -------------------------------------------------------------------------------------

    @classmethod
    def save_lora_weights(
        cls,
        pipe: Any,
        folder: str | Path,
        layers: Mapping[str, dict[str, torch.Tensor]],
        configs: Mapping[str, dict[str, Any]],
        weight_name: str,
    ) -> None:
        """Write LoRA layers with the pipeline class's own `save_lora_weights`, so plain diffusers reads them.

        Every diffusers LoRA mixin names its arguments `<component>_lora_layers` and
        `<component>_lora_adapter_metadata`, with the component names the family uses.
        """
        arguments: dict[str, Any] = {}
        for component, state in layers.items():
            arguments[f"{component}_lora_layers"] = state
            arguments[f"{component}_lora_adapter_metadata"] = configs[component]
        type(pipe).save_lora_weights(str(folder), weight_name=weight_name, **arguments)

    @classmethod
    def fingerprint_tensors(cls, pipe: Any) -> list[torch.Tensor]:
        """A few base weights that differ between any two trainings: every token embedding table and the
        denoiser's first and last layers. Hashing all of SDXL would read 10 GB; these stand for the whole."""
        tensors = [getattr(pipe, name).get_input_embeddings().weight for name in cls.text_encoders]
        # Weights, not biases: for a UNet these are conv_in's and conv_out's kernels.
        weights = [p for p in getattr(pipe, cls.denoiser).parameters() if p.ndim > 1]
        return [*tensors, weights[0], weights[-1]]

    @classmethod
    def architecture_fingerprint(cls, pipe: Any) -> str:
        """A hash of the trainable components' parameter names and shapes (adapter layers excluded)."""
        shapes = {name: base_module_shapes(getattr(pipe, name)) for name in cls.components()}
        return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]


def base_module_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Parameter names and shapes of `module` as it was before any peft layers were injected."""
    shapes = {}
    for name, tensor in module.state_dict().items():
        if "lora_" in name or ".lora." in name:
            continue
        shapes[name.replace(".base_layer.", ".")] = list(tensor.shape)
    return shapes
