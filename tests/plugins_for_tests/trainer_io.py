"""Test plugin: builds the optimizer and takes over checkpoint saving/loading (when asked to)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from perl_plugins import hookimpl

MARKER = "trainer_io.txt"


@dataclass
class TrainerIOOptions:
    trainer_io_lr: float = field(default=0.1, metadata={"help": "SGD learning rate."})
    trainer_io_own_checkpoints: bool = field(
        default=True, metadata={"help": "Write/read checkpoints instead of the stock trainer."}
    )


@hookimpl
def perl_plugin_options() -> type:
    return TrainerIOOptions


@hookimpl
def perl_configure(trainer: Any) -> None:
    trainer.trainer_io_calls = []


@hookimpl
def perl_create_optimizer(trainer: Any, model: Any, options: dict[str, Any]) -> torch.optim.Optimizer:
    trainer.trainer_io_calls.append("create_optimizer")
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=options["trainer_io"].trainer_io_lr)


@hookimpl
def perl_save_checkpoint(trainer: Any, checkpoint_dir: str, options: dict[str, Any]) -> bool | None:
    trainer.trainer_io_calls.append(("save", Path(checkpoint_dir).name))
    if not options["trainer_io"].trainer_io_own_checkpoints:
        return None
    Path(checkpoint_dir).mkdir(parents=True)
    (Path(checkpoint_dir) / MARKER).write_text(str(trainer.state.global_step))
    return True


@hookimpl
def perl_load_checkpoint(trainer: Any, checkpoint_dir: str, options: dict[str, Any]) -> bool | None:
    trainer.trainer_io_calls.append(("load", Path(checkpoint_dir).name))
    return True if options["trainer_io"].trainer_io_own_checkpoints else None
