"""Test plugin: implements a hook whose name does not exist (``perl_on_step_ends``)."""

from __future__ import annotations

from typing import Any

from perl_plugins import hookimpl


@hookimpl
def perl_on_step_ends(trainer: Any) -> None:
    pass
