"""What db-adapters reads off any pipeline, whatever its family: where it came from, its recommended
settings, and fingerprints that tell base models apart. Family-specific facts live in `families/`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .families import family_of

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# A model folder may carry its own recommended personalization settings (a small model needs other
# steps and learning rates than SD 1.5); `personalize` uses them for the settings left out.
RECOMMENDATIONS_FILE = "db_adapters.json"
RECOMMENDABLE = (
    "steps",
    "learning_rate",
    "num_class_images",
    "class_inference_steps",
    "resolution",
    "train_text_encoder",
)


def check_supported(pipe: Any) -> None:
    """Raise `InputError` unless `pipe` is a text-to-image pipeline db-adapters can personalize.

    Args:
        pipe (`DiffusionPipeline`): the pipeline to check.

    Example:
        >>> from db_adapters.testing import tiny_pipeline
        >>> check_supported(tiny_pipeline())
    """
    family_of(pipe)


def native_resolution(pipe: DiffusionPipeline) -> int:
    """The image size the pipeline was trained at (512 for SD 1.5, 768 for SD 2.x v-models, 1024 for SDXL)."""
    return family_of(pipe).native_resolution(pipe)


def architecture_fingerprint(pipe: DiffusionPipeline) -> str:
    """A hash of the denoiser's and text encoders' parameter names and shapes (adapter layers excluded)."""
    return family_of(pipe).architecture_fingerprint(pipe)


def weights_fingerprint(pipe: DiffusionPipeline) -> str:
    """A hash of a few base weights: tells two checkpoints of the same architecture apart, cheaply.

    Hashed in float16, so the same checkpoint loaded in fp32 or fp16 has the same fingerprint (an
    adapter trained on an fp16 pipeline loads into an fp32 one without a warning).
    """
    import torch

    digest = hashlib.sha256()
    for tensor in family_of(pipe).fingerprint_tensors(pipe):
        flat = tensor.detach().reshape(-1)[:65536].to("cpu", torch.float16).contiguous()
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:16]


def recommended_settings(pipe: DiffusionPipeline, strategy: str | None = None) -> dict[str, Any]:
    """The model folder's recommended `personalize` settings for `strategy` (steps, learning rate, class images).

    The file's top-level settings hold for every strategy; its `"strategies"` entry may override them per
    strategy and add that strategy's options (a LoRA rank): a full fine-tune wants another learning rate.

    Args:
        pipe (`DiffusionPipeline`): a pipeline loaded from a folder that may hold `db_adapters.json`.
        strategy (`str | None`): the strategy's name ("lora", "full"); None: the shared settings only.

    Example:
        >>> from db_adapters.toy import load_base_pipeline
        >>> recommended_settings(load_base_pipeline(), "full")["learning_rate"] > 0
        True
    """
    settings = read_recommendations(model_id(pipe))
    shared = {k: v for k, v in settings.items() if k in RECOMMENDABLE}
    per_strategy = settings.get("strategies", {})
    own = per_strategy.get(strategy, {}) if isinstance(per_strategy, dict) and strategy else {}
    return shared | (own if isinstance(own, dict) else {})


def read_recommendations(folder: str | Path) -> dict[str, Any]:
    """The whole `db_adapters.json` of a model folder as written, or {} when it has none (or a hub id).

    Args:
        folder (`str | Path`): the model folder ('' for a pipeline built in memory).

    Example:
        >>> from db_adapters.toy.base import base_dir
        >>> read_recommendations(base_dir())["strategies"]["lora"]["rank"]
        4
    """
    path = Path(folder) / RECOMMENDATIONS_FILE if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def model_id(pipe: DiffusionPipeline) -> str:
    """The hub id or folder the pipeline came from, or '' for one built in memory."""
    return str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "")
