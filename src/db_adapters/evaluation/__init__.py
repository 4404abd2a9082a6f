"""The DreamBooth paper's evaluation protocol: DreamBench prompts, DINO / CLIP-I / CLIP-T / PRES / DIV.

`evaluate` generates images of the DreamBench prompts with a (personalized) pipeline, embeds them
and the subject's real photos, and returns a `Report`. The metric functions in `metrics` are pure;
the feature models live in `embedders` (DINO, CLIP) and `lpips` (LPIPS, implemented here without
torchvision). Submodules import torch and transformers only when used.

Example:
    >>> from db_adapters.evaluation import evaluate, tiny_embedders  # doctest: +SKIP
    >>> report = evaluate(pipe, adapter, "photos/", "dog", live=True, embedders=tiny_embedders())  # doctest: +SKIP
    >>> report.save("eval/report.json", "eval/sheet.png")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "evaluate": "protocol",
    "Report": "protocol",
    "Embedders": "embedders",
    "load_embedders": "embedders",
    "tiny_embedders": "embedders",
    "DinoEmbedder": "embedders",
    "ClipEmbedder": "embedders",
    "LPIPS": "lpips",
    "load_lpips": "lpips",
    "random_lpips": "lpips",
    "dreambench_prompts": "dreambench",
    "dreambench_subjects": "dreambench",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .dreambench import dreambench_prompts, dreambench_subjects  # noqa: F401
    from .embedders import ClipEmbedder, DinoEmbedder, Embedders, load_embedders, tiny_embedders  # noqa: F401
    from .lpips import LPIPS, load_lpips, random_lpips  # noqa: F401
    from .protocol import Report, evaluate  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
