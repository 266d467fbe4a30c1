"""Test plugin: changes the trainer and its arguments in ``perl_configure``, then fails in
``fails_midway_stage``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from perl_plugins import hookimpl

STAGES = ("configure", "prepare_model")


@dataclass
class FailsMidwayOptions:
    fails_midway_stage: str = field(default="prepare_model", metadata={"help": f"Hook that raises: {STAGES}."})

    def __post_init__(self) -> None:
        if self.fails_midway_stage not in STAGES:
            raise ValueError(f"fails_midway_stage must be one of {STAGES}")


@hookimpl
def perl_plugin_options() -> type:
    return FailsMidwayOptions


@hookimpl
def perl_configure(trainer: Any, options: dict[str, Any]) -> None:
    trainer.fails_midway_configured = True
    trainer.model = nn.Linear(1, 1)  # replaced attribute: must be restored
    trainer.args.learning_rate = 123.0  # changed in place: must be restored too
    if options["fails_midway"].fails_midway_stage == "configure":
        raise RuntimeError("fails_midway: failing in perl_configure")


@hookimpl
def perl_prepare_model(options: dict[str, Any]) -> None:
    if options["fails_midway"].fails_midway_stage == "prepare_model":
        raise RuntimeError("fails_midway: failing in perl_prepare_model")


@hookimpl
def perl_on_step_end() -> None:
    raise AssertionError("never reached")
