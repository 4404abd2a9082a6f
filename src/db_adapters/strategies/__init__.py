"""The strategy registry: every way of injecting trainable weights registers here, by name.

A strategy is one file in this folder whose class is decorated with `@register_strategy`; the
folder's modules are imported on first lookup, so adding a strategy touches no other file. Strategies
defined elsewhere (a user's code, a test) register the same way.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import InputError
from .base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}
_builtins_loaded = False


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
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"{cls!r} is not a Strategy subclass")
    name = getattr(cls, "name", "")
    if not name:
        raise TypeError(f"{cls.__name__} has no `name`; set a class attribute such as name = 'lora'")
    known = _REGISTRY.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"a strategy named {name!r} is already registered ({known.__qualname__})")
    _REGISTRY[name] = cls
    return cls


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in pkgutil.iter_modules(__path__):
            if module.name != "base":
                importlib.import_module(f"{__name__}.{module.name}")


def available_strategies() -> list[str]:
    """The registered strategy names, sorted. Example: `available_strategies()` -> ['full', 'lora']."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered as `name`; `InputError` naming the known ones otherwise.

    Args:
        name (`str`): a registered name such as "lora" or "full".

    Example:
        >>> get_strategy("lora").name
        'lora'
    """
    _load_builtins()
    if name not in _REGISTRY:
        raise InputError(f"unknown strategy {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


__all__ = ["Strategy", "available_strategies", "get_strategy", "register_strategy"]
