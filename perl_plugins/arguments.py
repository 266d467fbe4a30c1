"""``PluginArguments``: one dataclass that gives an ``HfArgumentParser``/``TrlParser`` script
``--plugins`` plus every plugin's own options, from flags or from ``--config x.yaml``."""

from __future__ import annotations

import dataclasses
import typing
import warnings
from collections.abc import Sequence
from typing import Any

from .errors import PluginError
from .manager import PluginSet
from .registry import installed_plugins, split_names


def _plugins_field() -> tuple[str, Any, dataclasses.Field]:
    return (
        "plugins",
        str | None,
        dataclasses.field(
            default=None,
            metadata={
                "help": "Comma-separated plugins to attach (names or paths of local plugin files); "
                "defaults to $PERL_PLUGINS."
            },
        ),
    )


def _attach_kwargs(self) -> tuple[list[Any], dict[str, Any]]:
    """The ``(plugins, options)`` to pass to :func:`perl_plugins.attach` (options of enabled plugins only)."""
    names = split_names(self.plugins)
    enabled = {name: None for name in names if isinstance(name, str)}
    plugin_set = PluginSet.from_names(list(enabled))
    owners = plugin_set.option_fields()
    options = {key: getattr(self, key) for key in owners}
    return names, options


def make_plugin_arguments(extra_plugins: str | Sequence[str] | None = None) -> type:
    """Build a ``PluginArguments`` dataclass with the options of every installed plugin and of
    ``extra_plugins`` (local plugin files, whose options are not known until they are named)."""
    names = list(installed_plugins()) + [n for n in split_names(extra_plugins or []) if isinstance(n, str)]
    fields = [_plugins_field()]
    seen = {"plugins"}
    for name in dict.fromkeys(names):
        try:
            plugin_set = PluginSet.from_names([name])
            option_cls = plugin_set.option_classes[plugin_set.names[0]]
        except PluginError as exc:  # a broken third-party plugin must not break every script
            warnings.warn(f"perl-plugins: skipping options of plugin {name!r}: {exc}", stacklevel=2)
            continue
        if option_cls is None:
            continue
        hints = typing.get_type_hints(option_cls)  # resolve postponed annotations for the arg parser
        for field in dataclasses.fields(option_cls):
            if field.name in seen:
                continue
            seen.add(field.name)
            default = (
                dataclasses.field(default_factory=field.default_factory, metadata=field.metadata)
                if field.default is dataclasses.MISSING
                else dataclasses.field(default=field.default, metadata=field.metadata)
            )
            fields.append((field.name, hints[field.name], default))
    return dataclasses.make_dataclass("PluginArguments", fields, namespace={"attach_kwargs": _attach_kwargs})


PluginArguments = make_plugin_arguments()
