"""Test plugin: adds a weighted L2 term over the trainable weights and counts train/step/log hooks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from perl_plugins import hookimpl

TERM = "aux_l2"


@dataclass
class AuxLossOptions:
    aux_loss_weight: float = field(default=0.5, metadata={"help": "Weight of the aux_l2 loss term."})

    def __post_init__(self) -> None:
        if self.aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")


@hookimpl
def perl_plugin_options() -> type:
    return AuxLossOptions


@hookimpl
def perl_configure(trainer: Any) -> None:
    # Per-trainer record of what the hooks saw, for the tests to assert on.
    trainer.aux_loss_events = Counter()
    trainer.aux_loss_logged_keys = []


@hookimpl
def perl_compute_loss(model: Any, terms: Any, options: dict[str, Any]) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    value = sum(p.pow(2).mean() for p in params) / len(params)
    terms.add(TERM, value, options["aux_loss"].aux_loss_weight)


@hookimpl
def perl_on_train_begin(trainer: Any, model: Any) -> None:
    trainer.aux_loss_events["train_begin"] += 1
    assert model is trainer.model_wrapped


@hookimpl
def perl_on_step_end(trainer: Any, state: Any) -> None:
    trainer.aux_loss_events["step_end"] += 1
    assert state.global_step == trainer.aux_loss_events["step_end"]


@hookimpl
def perl_on_log(trainer: Any, logs: dict[str, float]) -> None:
    trainer.aux_loss_events["log"] += 1
    trainer.aux_loss_logged_keys.append(sorted(logs))
