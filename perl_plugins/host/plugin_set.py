"""The enabled plugins of one trainer: a pluggy manager plus each plugin's validated options."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pluggy

from perl_plugins import hookspecs
from perl_plugins.errors import PluginLoadError, PluginOptionError
from perl_plugins.host import tracing
from perl_plugins.host.registry import LoadedPlugin, load, split_names

# Hooks whose results feed the next implementation (see PluginSet.chain).
CHAINED_HOOKS = ("perl_prepare_model", "perl_shape_rewards")


class PluginSet:
    """Plugins registered on their own ``pluggy.PluginManager`` (one per attached trainer)."""

    def __init__(self, plugins: Sequence[LoadedPlugin]) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        tracing.install(self.pm)  # before registering: perl_plugin_options calls are seen too
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
        self._refuse_twice_chained()
        self._callers: dict[str, list[tuple[str, pluggy.HookCaller]]] = {}
        self.option_classes = self._collect_option_classes()
        self.options: dict[str, Any] = {}

    def _refuse_twice_chained(self) -> None:
        """A chained hook calls each plugin once, so two implementations of it in one plugin (pluggy's
        ``specname``) would both see the same input: refuse that rather than chain it wrongly."""
        for hook_name in CHAINED_HOOKS:
            plugins = [impl.plugin_name for impl in getattr(self.pm.hook, hook_name).get_hookimpls()]
            for name in sorted({p for p in plugins if plugins.count(p) > 1}):
                raise PluginLoadError(
                    f"Plugin {name!r} implements {hook_name} twice; a chained hook takes one implementation per "
                    "plugin (act after every plugin prepared the models in perl_models_ready)."
                )

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
        for name, caller in self._per_plugin("perl_plugin_options"):
            results = caller()  # pluggy drops None: [] for a plugin without options
            if not results:
                continue
            option_cls = results[-1]
            if not dataclasses.is_dataclass(option_cls):
                raise PluginLoadError(f"Plugin {name!r}: perl_plugin_options must return a dataclass type.")
            for field in dataclasses.fields(option_cls):
                if field.name in owners:
                    raise PluginLoadError(
                        f"Option {field.name!r} is declared by both {owners[field.name]!r} and {name!r}."
                    )
                owners[field.name] = name
            classes[name] = option_cls
        return classes

    def option_fields(self) -> dict[str, str]:
        """Every option name mapped to the plugin that declares it."""
        return {
            f.name: name
            for name, cls in self.option_classes.items()
            if cls is not None
            for f in dataclasses.fields(cls)
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
        for _, caller in self._per_plugin(hook_name):
            results = caller(**kwargs, **{value_arg: value})
            if results:  # pluggy drops None results: an empty list keeps the value
                value = results[-1]
        return value

    def call(self, hook_name: str, **kwargs: Any) -> Any:
        """Call a hook the pluggy way (all results, or the first one for ``firstresult`` hooks)."""
        return getattr(self.pm.hook, hook_name)(options=self.options, **kwargs)

    def _per_plugin(self, hook_name: str) -> list[tuple[str, pluggy.HookCaller]]:
        """One pluggy hook caller per plugin implementing ``hook_name``, in the order pluggy calls them.

        Chained hooks and option collection need each plugin's result on its own. Calling each
        plugin through ``pm.subset_hook_caller`` rather than its function keeps every call visible
        to pluggy's monitoring (``$PERL_PLUGINS_TRACE``), and keeps the hookspecs' "return a
        replacement or None" contract, so plugins written against it need no change (a mutable
        carrier, as ``LossTerms`` is, would change the signature of every chained hook).
        Plugins never change once the set is built: the callers are made once per hook.
        """
        callers = self._callers.get(hook_name)
        if callers is None:
            impls = getattr(self.pm.hook, hook_name).get_hookimpls()
            order = list(dict.fromkeys(impl.plugin for impl in reversed(impls)))  # pluggy calls LIFO
            callers = [
                (self.pm.get_name(plugin), self.pm.subset_hook_caller(hook_name, [p for p in order if p is not plugin]))
                for plugin in order
            ]
            self._callers[hook_name] = callers
        return callers
