"""Named registries (model families today): explicit entries, a duplicate name is an error, lookups load lazily.

A registry holds two kinds of entries: built-in ones, named as ``"module:attribute"`` and imported only when first
looked up (so registering a family needs no import of its module, and the modules never import each other in a
cycle), and entries registered at run time with ``register`` (a user's own family, in a notebook or a plugin).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Generic, TypeVar

from analysis.errors import ConfigError, ToolkitError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name, built-in (lazily imported) or registered."""

    def __init__(
        self, kind: str, builtin: Mapping[str, str], *, hint: str, error: type[ToolkitError] = ConfigError
    ) -> None:
        self.kind = kind
        self._builtin = dict(builtin)  # name -> "module:attribute"
        self._loaded: dict[str, T] = {}
        self._hint = hint  # how to add an entry, for the unknown-name error
        self._error = error

    def register(self, name: str, value: T) -> T:
        """Add an entry; a name already taken (built in or registered) is an error."""
        if name in self._builtin or name in self._loaded:
            raise self._error(f"{self.kind} {name!r} is already registered; choose another name")
        self._loaded[name] = value
        return value

    def unregister(self, name: str) -> None:
        """Remove an entry added with ``register`` (built-in entries stay)."""
        if name in self._builtin:
            raise self._error(f"{self.kind} {name!r} is built in and cannot be removed")
        self._loaded.pop(name, None)

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name is an error listing the registered ones."""
        if name not in self._loaded:
            if name not in self._builtin:
                raise self._error(f"no {self.kind} {name!r}; registered: {', '.join(self.names())}. {self._hint}")
            module, attribute = self._builtin[name].split(":")
            self._loaded[name] = getattr(importlib.import_module(module), attribute)
        return self._loaded[name]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted({*self._builtin, *self._loaded})

    def __contains__(self, name: object) -> bool:
        return name in self._builtin or name in self._loaded
