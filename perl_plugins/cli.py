"""The ``perl-plugins`` command: list plugins, run trl trainers with plugins, the demo, export."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from .errors import PluginError

USAGE = """perl-plugins COMMAND [ARGS]

commands:
  demo                              the PERL recipe at demo size on the embedded default (no network)
  plugins [--json] [--plugins P]    list available plugins, their options and hooks
  sft|reward|dpo|kto|grpo|rloo ...  trl's trainer with plugins: --plugins a,b plus trl's own flags,
                                    or --config x.yaml (see `perl-plugins reward --help`)
  export CKPT --out DIR [--merge]   an adapter_ckpt checkpoint as a peft adapter or a merged model
  models [--json]                   model aliases for --model_name_or_path and where each comes from
"""


def describe_plugins(extra: str | None = None) -> dict[str, Any]:
    """Every available plugin (installed entry points, built-ins, and ``extra`` local files) with
    its source, hooks and options; a plugin that fails to load is listed with its error."""
    from .manager import PluginSet
    from .registry import installed_plugins, split_names

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
        hooks = sorted(
            hook.name for hook in plugin_set.pm.get_hookcallers(plugin_set.pm.get_plugin(plugin.name)) or ()
        )
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


def _plugins_command(argv: Sequence[str]) -> int:
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "plugins":
            return _plugins_command(rest)
        if command == "demo":
            from .demo import main as demo_main

            return demo_main(rest)
        if command == "models":
            from .models import main as models_main

            return models_main(rest)
        if command == "export":
            from .export import main as export_main

            return export_main(rest)
        from .train_command import TRAINERS, run

        if command not in TRAINERS:
            print(f"perl-plugins: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            return 2
        try:
            run(command, rest)
        finally:
            _end_process_group()
        return 0
    except PluginError as exc:
        print(f"perl-plugins: error: {exc}", file=sys.stderr)
        return 2


def _end_process_group() -> None:
    """Tear down a multi-process launch's process group before the interpreter exits (its
    communication threads must not outlive it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
