"""Imports deferred to first use, so that listing plugins or asking for help never imports torch."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands in for module ``name`` until an attribute is read; then imports it for good.

    Plugin modules bind ``torch = lazy_import("torch")`` at their top: their options and hooks are
    read by ``perl-plugins plugins`` without torch, and torch is imported when a hook first runs.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        value = getattr(self._module, attr)
        setattr(self, attr, value)  # later reads (every training step) skip __getattr__
        return value

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy_import(name: str) -> Any:
    """A module that is imported the first time one of its attributes is read."""
    return LazyModule(name)
