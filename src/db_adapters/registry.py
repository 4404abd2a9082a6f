"""Registries of plug-in classes found by folder: strategies and model families register here by name.

A plug-in is one file in its package whose class is decorated with the registry's `register`; the
package's modules are imported on the first lookup, so adding one touches no other file. Classes
defined elsewhere (a user's code, a test) register the same way.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from .errors import InputError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Named subclasses of `base`, discovered in `package` (every module but `skip`).

    Args:
        kind (`str`): what the plug-ins are, for messages ("strategy", "family").
        base (`type`): the class every plug-in subclasses.
        package (`str`): the package whose modules define the built-in plug-ins.
        paths (`list[str]`): that package's `__path__`.

    Example:
        >>> from db_adapters.strategies import Strategy
        >>> registry = Registry("strategy", Strategy, "db_adapters.strategies", [])
        >>> registry.names()
        []
    """

    def __init__(self, kind: str, base: type, package: str, paths: list[str], skip: tuple[str, ...] = ("base",)):
        self.kind, self.base, self.package, self.paths, self.skip = kind, base, package, paths, skip
        self._classes: dict[str, T] = {}
        self._builtins_loaded = False

    def register(self, cls: T) -> T:
        """Register `cls` under its `name`; usable as a class decorator."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not a {self.base.__name__} subclass")
        name = getattr(cls, "name", "")
        if not name:
            raise TypeError(f"{cls.__name__} has no `name`; set a class attribute such as name = 'lora'")
        known = self._classes.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({known.__qualname__})")
        self._classes[name] = cls
        return cls

    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for module in pkgutil.iter_modules(self.paths):
                if module.name not in self.skip:
                    importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load_builtins()
        return sorted(self._classes)

    def classes(self) -> list[T]:
        """The registered classes, in name order."""
        return [self._classes[name] for name in self.names()]

    def get(self, name: str) -> T:
        """The class registered as `name`; `InputError` naming the known ones otherwise."""
        self._load_builtins()
        if name not in self._classes:
            raise InputError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._classes))}.")
        return self._classes[name]
