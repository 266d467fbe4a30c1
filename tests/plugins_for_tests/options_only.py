"""Test plugin: declares an option and implements nothing else (attaching it wraps nothing)."""

from __future__ import annotations

from dataclasses import dataclass, field

from perl_plugins import hookimpl


@dataclass
class OptionsOnlyOptions:
    options_only_level: int = field(default=1, metadata={"help": "An option nobody reads."})
    options_only_tag: str = field(default="x", metadata={"help": "Another option nobody reads."})


@hookimpl
def perl_plugin_options() -> type:
    return OptionsOnlyOptions
