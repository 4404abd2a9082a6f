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

    from ..config import TrainConfig
    from ..data import CropGeometry
    from ..objectives import Objective

# Conditioning: the denoiser's inputs besides the noisy latents and timesteps, by name; each tensor's
# first dimension is the batch. A family decides the names and reads them back in `predict`.
Conditioning = dict[str, "torch.Tensor"]


class Family(ABC):
    """Base class of model families. Subclasses set the class attributes and implement the verbs.

    Attributes:
        name: the family's short name, stored in adapter files ("sd", "sdxl").
        pipeline_classes: the diffusers pipeline classes it serves (and their subclasses), by name.
        title: what users call it ("Stable Diffusion 1.x/2.x").
        denoiser: the pipeline attribute of the denoiser ("unet", "transformer").
        text_encoders: the pipeline attributes of the text encoders, in prompt-encoding order.
        tokenizers: each text encoder's tokenizer attribute, in the same order.
        trained_text_encoders: those `train_text_encoder` trains (SD3's and Flux's T5 stays frozen).
        optional_parts: parts a pipeline may lack (SD3 runs without its T5; its conditioning is then zeros).
        class_samplers: the class-image samplers that suit the model, the default first.
        adapter_targets: the denoiser modules adapter strategies (LoRA, ...) adapt by default.
        text_encoder_adapter_targets: the same for the text encoders.
        embedding_file_keys: pivotal tuning's tokens in a textual-inversion file, key per CLIP encoder (the
            names A1111 and ComfyUI read: "clip_l", "clip_g"; SD 1.x/2.x files hold one "emb_params").
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    denoiser: ClassVar[str] = "unet"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    trained_text_encoders: ClassVar[tuple[str, ...] | None] = None  # None: all of `text_encoders`
    optional_parts: ClassVar[tuple[str, ...]] = ()
    # The samplers class images may be drawn with, the default first (`prior.py` knows them by name).
    class_samplers: ClassVar[tuple[str, ...]] = ("dpmsolver++", "ddim", "euler", "ddpm", "pipeline")
    # The peers' choice (diffusers' DreamBooth LoRA scripts for SD and SDXL): attention projections.
    adapter_targets: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
    text_encoder_adapter_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    embedding_file_keys: ClassVar[dict[str, str]] = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}

    # --- which pipelines ---------------------------------------------------------------------------

    @classmethod
    def serves(cls, pipe: Any) -> bool:
        """Whether `pipe` is a pipeline of this family (a text-to-image one; img2img and inpainting are not).

        By class name along the pipeline's class hierarchy, so finding the family of an SD pipeline does
        not import Flux's or SD3's pipeline modules (and their T5 code).
        """
        return any(
            klass.__name__ in cls.pipeline_classes and klass.__module__.startswith("diffusers.")
            for klass in type(pipe).__mro__
        )

    @classmethod
    def check(cls, pipe: Any) -> None:
        """Raise `InputError` if `pipe`, though of this family, lacks a part training needs."""
        for part in (cls.denoiser, "vae", *cls.text_encoders, *cls.tokenizers):
            if getattr(pipe, part, None) is None and part not in cls.optional_parts:
                raise InputError(
                    f"pipeline {type(pipe).__name__} has no `{part}`; db-adapters trains {cls.title} pipelines "
                    "with every part loaded (a refiner without its first text encoder cannot be personalized)."
                )

    # --- parts -------------------------------------------------------------------------------------

    @classmethod
    def components(cls, train_text_encoder: bool = True) -> tuple[str, ...]:
        """The components a strategy may train: the denoiser, then the trainable text encoders if asked."""
        encoders = cls.text_encoders if cls.trained_text_encoders is None else cls.trained_text_encoders
        return (cls.denoiser, *encoders) if train_text_encoder else (cls.denoiser,)

    @classmethod
    def tokenizer_list(cls, pipe: Any) -> list[Any]:
        """The pipeline's tokenizers, in text-encoder order (the binder checks identifiers in all of them)."""
        return [getattr(pipe, name) for name in cls.tokenizers if getattr(pipe, name, None) is not None]

    @classmethod
    def native_resolution(cls, pipe: Any) -> int:
        """The image size the pipeline was trained at (512 for SD 1.5, 768 for SD 2.x v, 1024 for SDXL and Flux)."""
        # SDXL, SD3 and Flux pipelines carry `default_sample_size`; SD 1.x/2.x read the UNet's config.
        sample_size = getattr(pipe, "default_sample_size", None) or getattr(pipe, cls.denoiser).config.sample_size
        return int(sample_size) * int(pipe.vae_scale_factor)

    @classmethod
    def resolution_multiple(cls, pipe: Any) -> int:
        """Training sizes must be multiples of this: the VAE's downsampling times the denoiser's patch size."""
        return int(pipe.vae_scale_factor) * int(getattr(getattr(pipe, cls.denoiser).config, "patch_size", 1) or 1)

    # --- prompts and conditioning ------------------------------------------------------------------

    @classmethod
    def prompt_ids(cls, pipe: Any, prompt: str) -> dict[str, torch.Tensor]:
        """Token ids of `prompt` per text encoder, each (1, max_length), padded as the pipeline pads."""
        ids = {}
        for encoder, tokenizer_name in zip(cls.text_encoders, cls.tokenizers, strict=True):
            tokenizer = getattr(pipe, tokenizer_name, None)
            if tokenizer is None:  # an optional encoder the pipeline was loaded without
                continue
            ids[encoder] = tokenizer(
                prompt,
                padding="max_length",
                max_length=cls.max_length(tokenizer_name, tokenizer),
                truncation=True,
                return_tensors="pt",
            ).input_ids
        return ids

    @classmethod
    def max_length(cls, tokenizer_name: str, tokenizer: Any) -> int:
        """How many tokens the pipeline pads a prompt to for this tokenizer (CLIP: 77)."""
        return int(tokenizer.model_max_length)

    @classmethod
    @abstractmethod
    def encode_prompt(
        cls, pipe: Any, ids: Mapping[str, torch.Tensor], encoders: Mapping[str, torch.nn.Module] | None = None
    ) -> Conditioning:
        """The prompt's conditioning (batch 1), as the pipeline computes it at inference.

        `encoders` are the modules to run instead of the pipeline's own (the trained text encoders,
        as the trainer wraps them); any encoder not in it is the pipeline's.
        """

    @classmethod
    def encoder(cls, pipe: Any, name: str, encoders: Mapping[str, torch.nn.Module] | None) -> Any:
        """The text encoder `name` to run: the trainer's module if it has one, else the pipeline's (or None)."""
        return (encoders or {}).get(name) or getattr(pipe, name, None)

    @classmethod
    def image_conditioning(cls, geometries: Sequence[CropGeometry], resolution: int) -> Conditioning:
        """Per-image conditioning from each training image's size and crop (N first); none by default."""
        return {}

    @classmethod
    def run_conditioning(cls, pipe: Any, config: TrainConfig) -> Conditioning:
        """Conditioning that is the same for every sample of the run (batch 1); none by default."""
        return {}

    @classmethod
    @abstractmethod
    def predict(
        cls, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        """The denoiser's output for noisy latents (B, C, h, w) at `timesteps` (B,)."""

    @classmethod
    @abstractmethod
    def objective(cls, pipe: Any, config: TrainConfig) -> Objective:
        """The training objective (noise schedule, target, per-sample weighting) with the run's settings."""

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
        denoiser's first and last weights outside its Linear layers (for a UNet, conv_in's and conv_out's
        kernels). Linear layers are left out because a quantized base (QLoRA) stores them packed; hashing
        all of SDXL would read 10 GB, and these stand for the whole."""
        encoders = [getattr(pipe, name, None) for name in cls.text_encoders]
        tensors = [encoder.get_input_embeddings().weight for encoder in encoders if encoder is not None]
        weights = [
            parameter
            for module in getattr(pipe, cls.denoiser).modules()
            if not _is_linear(module)
            for parameter in module.parameters(recurse=False)
            if parameter.is_floating_point()
        ]
        kernels = [w for w in weights if w.ndim > 1] or weights
        return [*tensors, kernels[0], kernels[-1]] if kernels else tensors

    @classmethod
    def architecture_fingerprint(cls, pipe: Any) -> str:
        """A hash of the trainable components' parameter names and shapes (adapter layers excluded)."""
        shapes = {name: base_module_shapes(getattr(pipe, name)) for name in cls.components()}
        for component, tokenizer in zip(cls.text_encoders, cls.tokenizers, strict=True):
            if component in shapes:
                _without_added_tokens(shapes[component], getattr(pipe, component), getattr(pipe, tokenizer))
        return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]


def _without_added_tokens(shapes: dict[str, list[int]], encoder: Any, tokenizer: Any) -> None:
    """Count the embedding table's rows without tokens added to the vocabulary (textual inversions, pivotal
    tuning's): they grow the table but are not the architecture an adapter was trained on."""
    added = len(tokenizer) - tokenizer.vocab_size
    table = encoder.get_input_embeddings()
    names = [f"{name}.weight" for name, module in encoder.named_modules() if module is table]
    for name in names:
        if added > 0 and name in shapes:
            shapes[name] = [shapes[name][0] - added, *shapes[name][1:]]


def _adapter_keys(module: torch.nn.Module) -> set[str]:
    """State-dict keys of peft adapter weights (any kind or name): in an injected layer, all but its base layer's."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        f"{name}.{key}"
        for name, layer in module.named_modules()
        if isinstance(layer, BaseTunerLayer)
        for key in layer.state_dict()
        if not key.startswith("base_layer.")
    }


def base_module_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Parameter names and shapes of `module` as it was before any peft layers were injected, and as it
    would be unquantized: a bitsandbytes layer counts as the Linear it stands for (its packed weight
    and quantization state are not the architecture)."""
    quantized = {
        name.replace(".base_layer", ""): layer for name, layer in module.named_modules() if _is_quantized_linear(layer)
    }
    adapter_keys = _adapter_keys(module)
    shapes = {}
    for name, tensor in module.state_dict().items():
        if name in adapter_keys or "lora_" in name or ".lora." in name:
            continue
        name = name.replace(".base_layer.", ".")
        layer_name, _, rest = name.rpartition(".weight")
        if layer_name in quantized and name.startswith(f"{layer_name}.weight"):
            if rest == "":  # the weight itself, as the Linear's (out, in); quantization state is left out
                shapes[name] = [quantized[layer_name].out_features, quantized[layer_name].in_features]
            continue
        shapes[name] = list(tensor.shape)
    return shapes


def _is_linear(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or _is_quantized_linear(module)


def _is_quantized_linear(module: Any) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt (subclasses of nn.Linear), by their packed weight.
    weight = getattr(module, "weight", None)
    return hasattr(module, "in_features") and type(weight).__name__ in ("Params4bit", "Int8Params")
