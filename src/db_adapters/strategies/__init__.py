"""The strategy registry: every way of injecting trainable weights registers here, by name.

A strategy is one file in this folder whose class is decorated with `@register_strategy`; the
folder's modules are imported on first lookup, so adding a strategy touches no other file. Strategies
defined elsewhere (a user's code, a test) register the same way.
"""

from __future__ import annotations

from ..registry import Registry
from .base import Strategy

_REGISTRY: Registry[type[Strategy]] = Registry("strategy", Strategy, __name__, __path__)


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Register a `Strategy` subclass under its `name`; usable as a class decorator.

    Args:
        cls (`type[Strategy]`): the class; its `name` must be new, or name this same class.

    Example:
        >>> from db_adapters.strategies import Strategy, register_strategy, get_strategy
        >>> @register_strategy
        ... class Mine(get_strategy("lora")):
        ...     name = "mine"
        >>> get_strategy("mine") is Mine
        True
    """
    return _REGISTRY.register(cls)


def available_strategies() -> list[str]:
    """The registered strategy names, sorted. Example: `available_strategies()` -> ['full', 'lora']."""
    return _REGISTRY.names()


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered as `name`; `InputError` naming the known ones otherwise.

    Args:
        name (`str`): a registered name such as "lora" or "full".

    Example:
        >>> get_strategy("lora").name
        'lora'
    """
    return _REGISTRY.get(name)


__all__ = ["Strategy", "available_strategies", "get_strategy", "register_strategy"]
