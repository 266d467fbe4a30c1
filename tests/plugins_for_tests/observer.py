"""Test plugin: looks at every loss but adds nothing (attaching it must not change training)."""

from __future__ import annotations

from typing import Any

from perl_plugins import hookimpl


@hookimpl
def perl_compute_loss(trainer: Any, terms: Any) -> None:
    trainer.__dict__.setdefault("observed_losses", []).append(terms[terms.base_name].item())
