"""Test plugin: refuses every trainer but a DPOTrainer."""

from __future__ import annotations

from typing import Any

from perl_plugins import hookimpl
from perl_plugins.errors import PluginIncompatibleError
from perl_plugins.host.attach import trainer_family


@hookimpl
def perl_check_trainer(trainer: Any) -> None:
    if trainer_family(trainer) != "DPOTrainer":
        raise PluginIncompatibleError(f"refuses: needs a DPOTrainer, got {type(trainer).__name__}.")


@hookimpl
def perl_compute_loss(terms: Any) -> None:
    raise AssertionError("a refused plugin must never run")
