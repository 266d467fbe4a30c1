"""Errors raised for bad plugin input. Each names the culprit and is raised before anything changes."""


class PluginError(ValueError):
    """Base class of every perl-plugins error about plugins, their options or their trainer."""


class UnknownPluginError(PluginError):
    """A plugin name that is neither built in, installed, nor an existing local file."""


class PluginLoadError(PluginError):
    """A plugin (local file or entry point) that could not be imported."""


class PluginIncompatibleError(PluginError):
    """A plugin attached to a trainer (or combined with a setting) it does not support."""


class PluginOptionError(PluginError):
    """An option that no enabled plugin declares, or a value its plugin rejects."""


class UsageError(ValueError):
    """A command line the CLI cannot run as given (a missing or contradictory setting)."""
