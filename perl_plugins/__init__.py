"""perl-plugins: cheap, robust RLHF on stock trl / transformers trainers, one flag per capability.

This module is the public API, and importing it is cheap: every name loads its module on first
use (PEP 562), so ``perl-plugins --help``, ``plugins`` and ``import perl_plugins.hookspecs`` never
import torch. Plugins use only these names (plus ``models``, ``checkpoint`` and ``data``), never
``perl_plugins.host``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "attach": "perl_plugins.host.attach",
    "trainer_family": "perl_plugins.host.attach",
    "state": "perl_plugins.host.attach",
    "LossTerms": "perl_plugins.host.loss_terms",
    "PluginArguments": "perl_plugins.host.arguments",
    "hookimpl": "perl_plugins.hookspecs",
    "hookspec": "perl_plugins.hookspecs",
    "PluginError": "perl_plugins.errors",
    "PluginIncompatibleError": "perl_plugins.errors",
    "PluginLoadError": "perl_plugins.errors",
    "PluginOptionError": "perl_plugins.errors",
    "UnknownPluginError": "perl_plugins.errors",
}

__all__ = [
    "LossTerms",
    "PluginArguments",
    "PluginError",
    "PluginIncompatibleError",
    "PluginLoadError",
    "PluginOptionError",
    "UnknownPluginError",
    "__version__",
    "attach",
    "hookimpl",
    "hookspec",
    "state",
    "trainer_family",
]

if TYPE_CHECKING:
    from perl_plugins.errors import (
        PluginError,
        PluginIncompatibleError,
        PluginLoadError,
        PluginOptionError,
        UnknownPluginError,
    )
    from perl_plugins.hookspecs import hookimpl, hookspec
    from perl_plugins.host.arguments import PluginArguments
    from perl_plugins.host.attach import attach, state, trainer_family
    from perl_plugins.host.loss_terms import LossTerms


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'perl_plugins' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
