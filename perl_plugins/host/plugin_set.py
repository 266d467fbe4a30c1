"""The enabled plugins of one trainer: a pluggy manager plus each plugin's validated options."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pluggy

from perl_plugins import hookspecs
from perl_plugins.errors import PluginLoadError, PluginOptionError
from perl_plugins.host.registry import LoadedPlugin, load, split_names


class PluginSet:
    """Plugins registered on their own ``pluggy.PluginManager`` (one per attached trainer)."""

    def __init__(self, plugins: Sequence[LoadedPlugin]) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins = list(plugins)
        # pluggy calls the last registered plugin first: register in reverse so that hooks run
        # (and chain, and firstresult hooks pick) in the order the plugins were given.
        for plugin in reversed(self.plugins):
            if self.pm.has_plugin(plugin.name):
                raise PluginLoadError(f"Plugin {plugin.name!r} was given twice.")
            try:
                self.pm.register(plugin.module, name=plugin.name)
            except (pluggy.PluginValidationError, ValueError) as exc:
                raise PluginLoadError(f"Plugin {plugin.name!r} ({plugin.source}) is invalid: {exc}") from exc
        try:  # a misspelled hook name must not be ignored in silence
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin)
            raise PluginLoadError(f"Plugin {name!r} implements an unknown hook: {exc}") from exc
        self.option_classes = self._collect_option_classes()
        self.options: dict[str, Any] = {}

    @classmethod
    def from_names(cls, plugins: str | Sequence[Any] | None) -> PluginSet:
        """Load plugins from names, local paths or already-imported plugin modules/objects."""
        loaded = []
        for item in split_names(plugins):
            if isinstance(item, str):
                loaded.append(load(item))
            else:
                name = getattr(item, "PLUGIN_NAME", None) or getattr(item, "__name__", type(item).__name__)
                loaded.append(LoadedPlugin(name.rsplit(".", 1)[-1], "object", item))
        return cls(loaded)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def _collect_option_classes(self) -> dict[str, type | None]:
        classes: dict[str, type | None] = {name: None for name in self.names}
        owners: dict[str, str] = {}
        for impl in self.pm.hook.perl_plugin_options.get_hookimpls():
            option_cls = impl.function()
            if option_cls is None:
                continue
            if not dataclasses.is_dataclass(option_cls):
                raise PluginLoadError(f"Plugin {impl.plugin_name!r}: perl_plugin_options must return a dataclass type.")
            for field in dataclasses.fields(option_cls):
                if field.name in owners:
                    raise PluginLoadError(
                        f"Option {field.name!r} is declared by both {owners[field.name]!r} and {impl.plugin_name!r}."
                    )
                owners[field.name] = impl.plugin_name
            classes[impl.plugin_name] = option_cls
        return classes

    def option_fields(self) -> dict[str, str]:
        """Every option name mapped to the plugin that declares it."""
        return {
            f.name: name for name, cls in self.option_classes.items() if cls is not None for f in dataclasses.fields(cls)
        }

    def configure_options(self, values: dict[str, Any]) -> dict[str, Any]:
        """Build every plugin's options from flat ``values``; unknown names are an error."""
        owners = self.option_fields()
        unknown = sorted(set(values) - set(owners))
        if unknown:
            raise PluginOptionError(
                f"Unknown plugin option(s) {unknown} for plugins {self.names}; "
                f"known options: {sorted(owners) or '(none)'}."
            )
        options: dict[str, Any] = {}
        for name, cls in self.option_classes.items():
            if cls is None:
                options[name] = None
                continue
            mine = {key: value for key, value in values.items() if owners[key] == name}
            try:
                options[name] = cls(**mine)
            except (TypeError, ValueError) as exc:
                raise PluginOptionError(f"Plugin {name!r}: {exc}") from exc
        self.options = options
        return options

    def implements(self, hook_name: str) -> bool:
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())

    def chain(self, hook_name: str, value_arg: str, value: Any, **kwargs: Any) -> Any:
        """Call a hook's implementations in pluggy's order, feeding each the previous result.

        Used by hooks whose results compose (``perl_prepare_model``, ``perl_shape_rewards``):
        ``None`` from an implementation keeps the current value.
        """
        kwargs["options"] = self.options
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):  # pluggy calls LIFO
            call_args = {**kwargs, value_arg: value}
            result = impl.function(*[call_args[arg] for arg in impl.argnames])
            if result is not None:
                value = result
        return value

    def call(self, hook_name: str, **kwargs: Any) -> Any:
        """Call a hook the pluggy way (all results, or the first one for ``firstresult`` hooks)."""
        return getattr(self.pm.hook, hook_name)(options=self.options, **kwargs)
