"""perl-plugins: cheap, robust RLHF on stock trl / transformers trainers, one flag per capability."""

from .attach import attach
from .errors import (
    PluginError,
    PluginIncompatibleError,
    PluginLoadError,
    PluginOptionError,
    UnknownPluginError,
)
from .hookspecs import hookimpl, hookspec
from .loss_terms import LossTerms

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
    # PluginArguments imports every installed plugin to collect options: only pay for it when used.
    if name == "PluginArguments":
        from .arguments import PluginArguments

        return PluginArguments
    raise AttributeError(name)
