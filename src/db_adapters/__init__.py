"""db-adapters: DreamBooth subject personalization as a plugin for diffusers pipelines.

Public names are imported lazily, so `import db_adapters` stays quiet and fast: torch, diffusers
and peft load only when a function that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import AdapterError, DbAdaptersError, InputError

__version__ = "0.1.0"

_LAZY = {
    "personalize": "api",
    "Subject": "subjects",
    "Adapter": "adapter",
    "load_adapter": "adapter",
    "unload_adapter": "adapter",
    "set_adapter_weights": "adapter",
    "attached_adapter": "adapter",
    "attached_adapters": "adapter",
    "Strategy": "strategies",
    "register_strategy": "strategies",
    "get_strategy": "strategies",
    "available_strategies": "strategies",
    "choose_identifier": "binder",
    "validate_identifier": "binder",
}

__all__ = ["AdapterError", "DbAdaptersError", "InputError", "__version__", *_LAZY]

if TYPE_CHECKING:
    from .adapter import (  # noqa: F401
        Adapter,
        attached_adapter,
        attached_adapters,
        load_adapter,
        set_adapter_weights,
        unload_adapter,
    )
    from .api import personalize  # noqa: F401
    from .binder import choose_identifier, validate_identifier  # noqa: F401
    from .strategies import Strategy, available_strategies, get_strategy, register_strategy  # noqa: F401
    from .subjects import Subject  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'db_adapters' has no attribute {name!r}")
