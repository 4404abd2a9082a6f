"""The model families db-adapters trains, one file each, and `family_of(pipe)` that picks one.

A family is one file in this folder whose class is decorated with `@register_family`; adding a
family touches no other module of the library (its tiny test pipeline goes in `testing.py`).
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..registry import Registry
from .base import Family

_REGISTRY: Registry[type[Family]] = Registry("family", Family, __name__, __path__)


def register_family(cls: type[Family]) -> type[Family]:
    """Register a `Family` subclass under its `name`; usable as a class decorator.

    Args:
        cls (`type[Family]`): the class; its `name` must be new, or name this same class.

    Example:
        >>> from db_adapters.families import get_family
        >>> get_family("sdxl").text_encoders
        ('text_encoder', 'text_encoder_2')
    """
    return _REGISTRY.register(cls)


def get_family(name: str) -> type[Family]:
    """The family registered as `name` ("sd", "sdxl"); `InputError` naming the known ones otherwise."""
    return _REGISTRY.get(name)


def available_families() -> list[type[Family]]:
    """Every registered family, in name order."""
    return _REGISTRY.classes()


def supported_pipelines() -> str:
    """The families' titles, for messages: what db-adapters can personalize."""
    return "; ".join(family.title for family in available_families())


def family_of(pipe: Any) -> type[Family]:
    """The family of `pipe`, checked to have every part training needs; `InputError` listing what is supported.

    Args:
        pipe (`DiffusionPipeline`): the pipeline to personalize.

    Example:
        >>> from db_adapters.testing import tiny_pipeline
        >>> family_of(tiny_pipeline()).name
        'sd'
    """
    for family in available_families():
        if family.serves(pipe):
            family.check(pipe)
            return family
    raise InputError(
        f"pipeline {type(pipe).__name__} is not supported; db-adapters personalizes text-to-image pipelines of: "
        f"{supported_pipelines()}. Load the model with that pipeline class's from_pretrained(...)."
    )


__all__ = ["Family", "available_families", "family_of", "get_family", "register_family", "supported_pipelines"]
