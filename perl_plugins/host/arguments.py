"""``PluginArguments``: one dataclass that gives an ``HfArgumentParser``/``TrlParser`` script
``--plugins`` plus every plugin's own options, from flags or from ``--config x.yaml``."""

from __future__ import annotations

import dataclasses
import json
import typing
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from perl_plugins.errors import PluginError, PluginOptionError
from perl_plugins.host.plugin_set import PluginSet
from perl_plugins.host.registry import installed_plugins, split_names


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


def _shared_option_names() -> set[str]:
    """Options that trl's ``ModelConfig`` already declares with the same meaning (``--lora_r``...):
    they are left out of ``PluginArguments`` so both can sit in one parser."""
    from trl import ModelConfig

    return {f.name for f in dataclasses.fields(ModelConfig)}


def _attach_kwargs(self, *other_args: Any) -> tuple[list[Any], dict[str, Any]]:
    """The ``(plugins, options)`` to pass to :func:`perl_plugins.attach`: options of the enabled
    plugins, read from this object or, for shared names, from ``other_args`` (e.g. trl's
    ``ModelConfig``); an option found nowhere keeps its plugin's default."""
    names = split_names(self.plugins)
    plugin_set = PluginSet.from_names([n for n in names if isinstance(n, str)])
    _refuse_options_of_plugins_not_enabled(self, plugin_set.names)
    options = {}
    for key in plugin_set.option_fields():
        for source in (self, *other_args):
            if hasattr(source, key):
                options[key] = getattr(source, key)
                break
    return names, options


def _refuse_options_of_plugins_not_enabled(args: Any, enabled: list[str]) -> None:
    """An option set (away from its default) for a plugin that is not enabled would be ignored in
    silence: refuse it, as ``attach()`` refuses unknown options, naming the plugin it belongs to."""
    for field in dataclasses.fields(args):
        owner = args.option_owners.get(field.name)
        if owner is None or owner in enabled:
            continue
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if getattr(args, field.name) != default:
            raise PluginOptionError(
                f"--{field.name} is an option of plugin {owner!r}, which is not enabled (plugins: "
                f"{', '.join(enabled) or 'none'}): add {owner} to --plugins, or drop the option."
            )


def check_options(options: dict[str, Any] | str | None, *stage_plugins: str | Sequence[Any]) -> None:
    """A recipe shares one option table between stages that enable different plugins (see
    :func:`options_for`): an option that no stage's plugins declare would be ignored in silence, so
    refuse it, naming the plugin it belongs to, as the CLI and ``attach()`` do."""
    options = parse_plugin_options(options)
    enabled = list(dict.fromkeys(n for plugins in stage_plugins for n in split_names(plugins)))
    declared = PluginSet.from_names(enabled).option_fields()
    stray = [key for key in options if key not in declared]
    if not stray:
        return
    owners = make_plugin_arguments().option_owners
    owner = owners.get(stray[0])
    names = ", ".join(str(n) for n in enabled) or "none"
    if owner is None:
        raise PluginOptionError(
            f"plugin_options: {stray[0]!r} is not an option of any plugin the recipe enables ({names})."
        )
    raise PluginOptionError(
        f"plugin_options: {stray[0]!r} is an option of plugin {owner!r}, which no stage of the recipe enables "
        f"(plugins: {names}): add {owner} to a stage's plugins, or drop the option."
    )


def make_plugin_arguments(extra_plugins: str | Sequence[str] | None = None) -> type:
    """Build a ``PluginArguments`` dataclass with the options of every installed plugin and of
    ``extra_plugins`` (local plugin files, whose options are not known until they are named)."""
    extras = [n for n in split_names(extra_plugins or []) if isinstance(n, str)]
    names = list(installed_plugins()) + extras
    fields = [_plugins_field()]
    seen = {"plugins"} | _shared_option_names()
    owners: dict[str, str] = {}  # option -> the plugin it belongs to
    for name in dict.fromkeys(names):
        try:
            plugin_set = PluginSet.from_names([name])
            owner = plugin_set.names[0]
            option_cls = plugin_set.option_classes[owner]
        except PluginError as exc:
            if name in extras:  # named by the user (e.g. a typo in a local path): that is the error
                raise
            # an installed third-party plugin that is broken must not break every script
            warnings.warn(f"perl-plugins: skipping options of plugin {name!r}: {exc}", stacklevel=2)
            continue
        if option_cls is None:
            continue
        hints = typing.get_type_hints(option_cls)  # resolve postponed annotations for the arg parser
        for field in dataclasses.fields(option_cls):
            if field.name in seen:
                continue
            seen.add(field.name)
            owners[field.name] = owner
            default = (
                dataclasses.field(default_factory=field.default_factory, metadata=field.metadata)
                if field.default is dataclasses.MISSING
                else dataclasses.field(default=field.default, metadata=field.metadata)
            )
            fields.append((field.name, hints[field.name], default))
    namespace = {"attach_kwargs": _attach_kwargs, "option_owners": owners}
    return dataclasses.make_dataclass("PluginArguments", fields, namespace=namespace)


def __getattr__(name: str) -> Any:
    # Built on first use: it imports every installed plugin to collect their options.
    if name == "PluginArguments":
        globals()["PluginArguments"] = make_plugin_arguments()
        return globals()["PluginArguments"]
    raise AttributeError(name)


def options_for(plugins: str | Sequence[Any], options: dict[str, Any] | str | None) -> dict[str, Any]:
    """The subset of ``options`` (a dict or a JSON object string) that ``plugins`` declare: lets a
    recipe share one option table between stages that enable different plugins."""
    owned = PluginSet.from_names(plugins).option_fields()
    return {key: value for key, value in parse_plugin_options(options).items() if key in owned}


def parse_plugin_options(options: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """A recipe's ``plugin_options`` as a dict: a mapping (from YAML) or a JSON object string (from
    the command line); anything else is refused, naming the value."""
    if isinstance(options, str):
        try:
            options = json.loads(options or "{}")
        except json.JSONDecodeError as exc:
            raise PluginOptionError(
                f"plugin_options {options!r} is not valid JSON ({exc.msg}); give an object, e.g. '{{\"lora_r\": 8}}'."
            ) from None
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise PluginOptionError(
            f"plugin_options must map option names to values, got {type(options).__name__} {options!r}."
        )
    return dict(options)
