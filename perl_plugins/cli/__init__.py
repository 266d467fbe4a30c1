"""The ``perl-plugins`` command: a table of subcommands, each in its own module, imported only
when that subcommand runs (``--help``, ``plugins``, ``recipes`` and ``env`` never import torch)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

# Names only: train_command imports trl when a trainer runs.
from perl_plugins.cli.train import TRAINERS
from perl_plugins.models.card import invoked_as


@dataclass(frozen=True)
class Command:
    module: str  # perl_plugins.cli.<module>, imported when the command runs; its main(argv) -> exit status
    usage: str  # the command's line in `perl-plugins --help`
    summary: str


COMMANDS: dict[str, Command] = {
    "demo": Command("demo", "demo", "the PERL recipe at demo size on the embedded default (no network)"),
    "plugins": Command("plugins", "plugins [--json] [--plugins P]", "list available plugins, their options and hooks"),
    "recipes": Command(
        "recipes", "recipes [cp NAME DEST]", "list the recipes, or copy one (and its YAML) into your repo"
    ),
    "env": Command("env", "env [--json] [--torch]", "versions, accelerator and plugins, for bug reports"),
    "export": Command(
        "export", "export CKPT --out DIR [--merge]", "an adapter_ckpt checkpoint as a peft adapter or a merged model"
    ),
    "models": Command("models", "models [--json]", "model aliases for --model_name_or_path and where each comes from"),
}


def usage() -> str:
    lines = ["perl-plugins COMMAND [ARGS]", "", "commands:"]
    for command in COMMANDS.values():
        lines.append(f"  {command.usage:<34}{command.summary}")
    trainers = "|".join(TRAINERS) + " ..."
    lines.append(f"  {trainers:<34}trl's trainer with plugins: --plugins a,b plus trl's own flags,")
    lines.append(f"  {'':<34}or --config x.yaml (see `perl-plugins reward --help`)")
    return "\n".join(lines) + "\n"


def train(argv: Sequence[str], command: str) -> int:
    """``perl-plugins {sft,reward,...}``: trl's trainer with plugins (see :mod:`perl_plugins.cli.train`)."""
    from perl_plugins.cli.train import run

    try:
        run(command, argv)
    finally:
        _end_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS and name not in TRAINERS:
        print(f"perl-plugins: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        with invoked_as(["perl-plugins", *argv]):  # the exact command, for model cards
            if name in TRAINERS:
                return train(rest, name)
            return importlib.import_module(f"perl_plugins.cli.{COMMANDS[name].module}").main(rest)
    except Exception as exc:  # one rule for every user error: one line, exit 2; anything else is a bug
        from perl_plugins.cli.user_errors import is_user_error

        if not is_user_error(exc):
            raise
        print(f"perl-plugins: error: {exc}", file=sys.stderr)
        return 2


def _end_process_group() -> None:
    """Tear down a multi-process launch's process group before the interpreter exits (its
    communication threads must not outlive it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
