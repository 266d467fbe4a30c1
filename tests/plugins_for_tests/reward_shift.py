"""Test plugin: adds a constant to every RL reward (``perl_shape_rewards``) and records the shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from perl_plugins import hookimpl


@dataclass
class RewardShiftOptions:
    reward_shift_value: float = field(default=100.0, metadata={"help": "Constant added to every reward."})


@hookimpl
def perl_plugin_options() -> type:
    return RewardShiftOptions


@hookimpl
def perl_shape_rewards(trainer: Any, prompts: list[Any], completions: list[Any], rewards: Any, options: dict[str, Any]):
    assert len(prompts) == len(completions) == rewards.shape[0]
    trainer.__dict__.setdefault("reward_shift_shapes", []).append(tuple(rewards.shape))
    return rewards + options["reward_shift"].reward_shift_value
