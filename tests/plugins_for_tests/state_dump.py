"""Test plugin: at train begin (after any resume loaded its state), the main process writes the
trainable tensors and the optimizer's state dict to ``<output_dir>/state_at_train_begin.pt``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from perl_plugins import hookimpl


@hookimpl
def perl_on_train_begin(trainer: Any, model: Any) -> None:
    if not trainer.is_world_process_zero():
        return
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    dump = {"params": params, "optimizer": trainer.optimizer.state_dict(), "world_size": trainer.args.world_size}
    torch.save(dump, Path(trainer.args.output_dir) / "state_at_train_begin.pt")
