"""A procedural toy image world (classes, colours, patterns, marks, scenes) for measurable DreamBooth experiments.

`render` draws an image from a seed and attributes, `caption` and `random_caption` give the prompts a
tiny base model is trained on, and `SUBJECTS` are rare toy subjects to personalize, each with
reference photos and an exact prior-match probability. `load_probe` gives the frozen probe that reads
attributes back off an image (the toy DINO/CLIP); it and `Probe`, `train_probe` are imported on first
use, so `import db_adapters.toy` does not import torch.
"""

from typing import Any

from .world import (
    ATTRIBUTES,
    IDENTITY_ATTRIBUTES,
    SUBJECTS,
    Layout,
    Subject,
    caption,
    check_attributes,
    contact_sheet,
    layout,
    prior_match_probability,
    random_caption,
    render,
    render_background,
    sample_attributes,
    subject_caption,
    value_probabilities,
)

# Names served from .probe on first access: that module imports torch, which the world does not need.
_PROBE_EXPORTS = ("Probe", "load_probe", "train_probe")

__all__ = [
    "ATTRIBUTES",
    "IDENTITY_ATTRIBUTES",
    "SUBJECTS",
    "Layout",
    "Probe",
    "Subject",
    "base_dir",
    "caption",
    "check_attributes",
    "contact_sheet",
    "layout",
    "load_base_pipeline",
    "load_probe",
    "prior_match_probability",
    "random_caption",
    "render",
    "render_background",
    "sample_attributes",
    "subject_caption",
    "train_probe",
    "value_probabilities",
]


def __getattr__(name: str) -> Any:
    if name in _PROBE_EXPORTS:
        from . import probe

        return getattr(probe, name)
    if name in ("load_base_pipeline", "base_dir"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
