"""A procedural toy image world (classes, colours, patterns, marks, scenes) for measurable DreamBooth experiments.

`render` draws an image from a seed and attributes, `caption` and `random_caption` give the prompts a
tiny base model is trained on, and `SUBJECTS` are rare toy subjects to personalize, each with
reference photos and an exact prior-match probability.
"""

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

__all__ = [
    "ATTRIBUTES",
    "IDENTITY_ATTRIBUTES",
    "SUBJECTS",
    "Layout",
    "Subject",
    "caption",
    "check_attributes",
    "contact_sheet",
    "layout",
    "prior_match_probability",
    "random_caption",
    "render",
    "render_background",
    "sample_attributes",
    "subject_caption",
    "value_probabilities",
]
