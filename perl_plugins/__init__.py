"""perl-plugins: cheap, robust RLHF on stock trl / transformers trainers, one flag per capability.

Importing the package is cheap (no torch): torch, transformers and trl load when a trainer is
attached or a loss term is built, so ``perl-plugins --help`` and ``plugins`` answer at once.
"""

from perl_plugins.host.attach import attach
from perl_plugins.errors import (
    PluginError,
    PluginIncompatibleError,
    PluginLoadError,
    PluginOptionError,
    UnknownPluginError,
)
from perl_plugins.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = [
    "LossTerms",
    "PluginError",
    "PluginIncompatibleError",
    "PluginLoadError",
    "PluginOptionError",
    "UnknownPluginError",
    "__version__",
    "attach",
    "hookimpl",
    "hookspec",
]


def __getattr__(name: str):
    if name == "LossTerms":  # holds tensors: imports torch
        from perl_plugins.host.loss_terms import LossTerms

        return LossTerms
    # PluginArguments imports every installed plugin to collect options: only pay for it when used.
    if name == "PluginArguments":
        from perl_plugins.host.arguments import PluginArguments

        return PluginArguments
    raise AttributeError(name)
