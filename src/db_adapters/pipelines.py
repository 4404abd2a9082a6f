"""Which pipelines db-adapters supports, and fingerprints that tell base models apart.

Supported: the `StableDiffusionPipeline` family (SD 1.x and 2.x, epsilon and v-prediction): a
`UNet2DConditionModel`, an `AutoencoderKL`, one `CLIPTextModel` and its `CLIPTokenizer`.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

SUPPORTED = "StableDiffusionPipeline (Stable Diffusion 1.x and 2.x)"
# A model folder may carry its own recommended personalization settings (a small model needs other
# steps and learning rates than SD 1.5); `personalize` uses them for the settings left out.
RECOMMENDATIONS_FILE = "db_adapters.json"
RECOMMENDABLE = ("steps", "learning_rate", "num_class_images", "class_inference_steps")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_supported(pipe: Any) -> None:
    """Raise `InputError` unless `pipe` is a text-to-image pipeline db-adapters can personalize.

    Args:
        pipe (`DiffusionPipeline`): the pipeline to check.

    Example:
        >>> from db_adapters.testing import tiny_pipeline
        >>> check_supported(tiny_pipeline())
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    name = type(pipe).__name__
    if not isinstance(pipe, StableDiffusionPipeline):
        raise InputError(
            f"pipeline {name} is not supported; db-adapters supports {SUPPORTED}. "
            "Load the model with StableDiffusionPipeline.from_pretrained(...)."
        )
    parts = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    for part, cls in parts.items():
        if not isinstance(getattr(pipe, part, None), cls):
            raise InputError(f"pipeline {name} has no {cls.__name__} as `{part}`; supported: {SUPPORTED}.")
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(
            f"scheduler prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}."
        )


def native_resolution(pipe: DiffusionPipeline) -> int:
    """The image size the pipeline was trained at (512 for SD 1.5, 768 for SD 2.x v-models)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def base_module_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Parameter names and shapes of `module` as it was before any peft layers were injected."""
    shapes = {}
    for name, tensor in module.state_dict().items():
        if "lora_" in name or ".lora." in name:
            continue
        shapes[name.replace(".base_layer.", ".")] = list(tensor.shape)
    return shapes


def architecture_fingerprint(pipe: DiffusionPipeline) -> str:
    """A hash of the UNet's and text encoder's parameter names and shapes (adapter layers excluded)."""
    shapes = {"unet": base_module_shapes(pipe.unet), "text_encoder": base_module_shapes(pipe.text_encoder)}
    return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(pipe: DiffusionPipeline) -> str:
    """A hash of a few base weights: tells two checkpoints of the same architecture apart, cheaply.

    Hashing every weight of SD 1.5 would read 4 GB; the token embeddings and the UNet's first and
    last convolutions differ between any two trainings, so they stand for the whole.
    """
    import torch

    digest = hashlib.sha256()
    probes = [
        pipe.text_encoder.get_input_embeddings().weight,
        pipe.unet.conv_in.weight,
        pipe.unet.conv_out.weight,
    ]
    for tensor in probes:
        flat = tensor.detach().reshape(-1)[:65536].to("cpu", torch.float32).contiguous()
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:16]


def recommended_settings(pipe: DiffusionPipeline) -> dict[str, Any]:
    """The model folder's recommended `personalize` settings (steps, learning rate, class images and their steps)."""
    from pathlib import Path

    folder = model_id(pipe)
    path = Path(folder) / RECOMMENDATIONS_FILE if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in settings.items() if k in RECOMMENDABLE} if isinstance(settings, dict) else {}


def model_id(pipe: DiffusionPipeline) -> str:
    """The hub id or folder the pipeline came from, or '' for one built in memory."""
    return str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "")
