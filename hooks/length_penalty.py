"""length_penalty: subtract a per-character length penalty from GRPO/RLOO rewards.

Load it with ``--plugins ./hooks/length_penalty.py`` or
``perl_plugins.attach(trainer, plugins="./hooks/length_penalty.py", length_penalty_coef=0.01)``.

For each completion, ``penalty = coef * max(0, chars - target)`` is subtracted from the chosen
reward-function columns, before trl turns rewards into advantages. Length is counted in
*characters* of the completion text (for a conversational completion: of its messages' contents),
so a setting means the same thing whatever the tokenizer.
"""

import dataclasses
from typing import Any

import torch

import perl_plugins
from perl_plugins import trainer_family
from perl_plugins.errors import PluginIncompatibleError, PluginOptionError

RL_FAMILIES = ("GRPOTrainer", "RLOOTrainer")


@dataclasses.dataclass
class LengthPenaltyOptions:
    length_penalty_coef: float = dataclasses.field(
        default=0.001,
        metadata={"help": "Reward subtracted per character of a completion beyond the target length."},
    )
    length_penalty_target: int = dataclasses.field(
        default=0,
        metadata={"help": "Characters a completion may use without penalty (0: every character is penalized)."},
    )
    length_penalty_reward_funcs: str = dataclasses.field(
        default="0",
        metadata={
            "help": "Reward function columns the penalty is subtracted from: comma-separated indices or "
            "reward function names, or 'all'. Default: the first reward function only, so the "
            "penalty counts once in the weighted sum."
        },
    )

    def __post_init__(self) -> None:
        if self.length_penalty_coef < 0:
            raise ValueError(f"length_penalty_coef must be >= 0, got {self.length_penalty_coef}")
        if self.length_penalty_target < 0:
            raise ValueError(f"length_penalty_target must be >= 0, got {self.length_penalty_target}")
        if not self.length_penalty_reward_funcs.strip():
            raise ValueError("length_penalty_reward_funcs must name at least one reward function (or 'all')")


def completion_length(completion: Any) -> int:
    """Characters of a completion: a string, or a list of chat messages (their text contents)."""
    if isinstance(completion, str):
        return len(completion)
    total = 0
    for message in completion:
        content = message.get("content") or ""
        if isinstance(content, str):
            total += len(content)
        else:  # multimodal content blocks: count the text ones
            total += sum(len(block.get("text") or "") for block in content if block.get("type") == "text")
    return total


def resolve_columns(spec: str, reward_func_names: list[str]) -> list[int]:
    """Column indices named by ``spec`` ("all", or comma-separated indices / reward function names)."""
    if spec.strip() == "all":
        return list(range(len(reward_func_names)))
    columns = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item.isdigit() and int(item) < len(reward_func_names):
            columns.append(int(item))
        elif item in reward_func_names:
            columns.append(reward_func_names.index(item))
        else:
            raise PluginOptionError(
                f"length_penalty_reward_funcs: {item!r} is neither an index below {len(reward_func_names)} "
                f"nor one of the reward functions {reward_func_names}."
            )
    return sorted(set(columns))


def length_penalties(completions: list[Any], coef: float, target: int) -> torch.Tensor:
    """Per-completion penalty ``coef * max(0, length - target)`` (float32, shape ``(len(completions),)``)."""
    lengths = torch.tensor([completion_length(c) for c in completions], dtype=torch.float32)
    return coef * (lengths - target).clamp(min=0)


@perl_plugins.hookimpl
def perl_plugin_options() -> type:
    return LengthPenaltyOptions


@perl_plugins.hookimpl
def perl_check_trainer(trainer: Any, options: dict[str, Any]) -> None:
    family = trainer_family(trainer)
    if family not in RL_FAMILIES:
        raise PluginIncompatibleError(
            f"Plugin 'length_penalty' shapes RL rewards and needs a GRPOTrainer or RLOOTrainer, got {family}."
        )
    resolve_columns(options["length_penalty"].length_penalty_reward_funcs, list(trainer.reward_func_names))


@perl_plugins.hookimpl
def perl_shape_rewards(trainer: Any, completions: list[Any], rewards: torch.Tensor, options: dict[str, Any]):
    opts = options["length_penalty"]
    penalty = length_penalties(completions, opts.length_penalty_coef, opts.length_penalty_target)
    penalty = penalty.to(device=rewards.device, dtype=rewards.dtype)
    if rewards.shape[0] != penalty.shape[0]:
        # trl gathers rewards of every process, while completions are this process's only.
        penalty = trainer.accelerator.gather(penalty)
    columns = resolve_columns(opts.length_penalty_reward_funcs, list(trainer.reward_func_names))
    shaped = rewards.clone()
    shaped[:, columns] -= penalty.unsqueeze(1)
    return shaped
