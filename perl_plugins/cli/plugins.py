"""``perl-plugins plugins``: the available plugins with their source, hooks and options (no torch:
plugin modules import it when a hook first runs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from perl_plugins.errors import PluginError


def describe_plugins(extra: str | None = None) -> dict[str, Any]:
    """Every available plugin (installed entry points, built-ins, and ``extra`` local files) with
    its source, hooks and options; a plugin that fails to load is listed with its error."""
    from perl_plugins.host.plugin_set import PluginSet
    from perl_plugins.host.registry import installed_plugins, split_names

    names = list(installed_plugins()) + [n for n in split_names(extra or []) if isinstance(n, str)]
    described = []
    for name in dict.fromkeys(names):
        try:
            plugin_set = PluginSet.from_names([name])
        except PluginError as exc:
            described.append({"name": name, "source": "unavailable", "error": str(exc), "hooks": [], "options": []})
            continue
        plugin = plugin_set.plugins[0]
        option_cls = plugin_set.option_classes[plugin.name]
        options = [
            {
                "name": f.name,
                "type": str(f.type),
                "default": None if f.default is dataclasses.MISSING else f.default,
                "help": f.metadata.get("help", ""),
            }
            for f in (dataclasses.fields(option_cls) if option_cls else ())
        ]
        hooks = sorted(hook.name for hook in plugin_set.pm.get_hookcallers(plugin_set.pm.get_plugin(plugin.name)) or ())
        described.append({"name": plugin.name, "source": plugin.source, "hooks": hooks, "options": options})
    return {"plugins": described}


def _print_plugins(listing: dict[str, Any]) -> None:
    for plugin in listing["plugins"]:
        print(f"{plugin['name']}  [{plugin['source']}]")
        if "error" in plugin:
            print(f"    error: {plugin['error']}")
            continue
        print(f"    hooks: {', '.join(plugin['hooks'])}")
        for option in plugin["options"]:
            print(f"    --{option['name']} (default {option['default']!r}): {option['help']}")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="perl-plugins plugins", description="List available plugins.")
    parser.add_argument("--json", action="store_true", help="print JSON: {'plugins': [...]}")
    parser.add_argument("--plugins", default=None, help="also describe these local plugin files")
    args = parser.parse_args(argv)
    listing = describe_plugins(args.plugins)
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
    else:
        _print_plugins(listing)
    return 0
