"""Every private trl / transformers / torch name the package relies on, in one module.

The host attaches plugins by replacing a few private methods of a trainer *instance*, and plugins
need a few private steps of the stock checkpoint save; those names are not API and may change in
any release. Keeping them here (``checkpoint/zero.py`` holds DeepSpeed ZeRO's) means a library
upgrade is checked against one file, and ``tests/test_layers.py`` fails wherever else one appears.

Checked against: transformers 5.24.0, trl 1.16.0, torch 2.13.0, accelerate 1.15.0, deepspeed 0.19.8.

Each ``wrap_*`` function replaces one private method on the instance with ``wrapper(stock, ...)``,
where ``stock`` is the bound method it replaces and the other arguments are those the trainer
passes; the replacement keeps the private name, so the stock trainer calls it unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

# The stock directory name of a checkpoint, f"{CHECKPOINT_PREFIX}-{global_step}" (public in
# transformers.trainer_utils as PREFIX_CHECKPOINT_DIR; spelled out to keep this import cheap).
CHECKPOINT_PREFIX = "checkpoint"


def checkpoint_dir(trainer: Any, trial: Any) -> str:
    """Where ``Trainer._save_checkpoint`` writes the checkpoint of the current step."""
    return os.path.join(trainer._get_output_dir(trial=trial), f"{CHECKPOINT_PREFIX}-{trainer.state.global_step}")


def wrap_save_checkpoint(trainer: Any, wrapper: Callable[..., None]) -> None:
    """``Trainer._save_checkpoint(model, trial)``: each save_steps / epoch end."""
    stock = trainer._save_checkpoint

    def _save_checkpoint(model: Any, trial: Any) -> None:
        wrapper(stock, model, trial)

    trainer._save_checkpoint = _save_checkpoint


def wrap_load_from_checkpoint(trainer: Any, wrapper: Callable[..., None]) -> None:
    """``Trainer._load_from_checkpoint(resume_from_checkpoint, model=None)``: model weights on resume
    (never called under DeepSpeed, which reads its engine shards in the training loop)."""
    stock = trainer._load_from_checkpoint

    def _load_from_checkpoint(resume_from_checkpoint: str, model: Any = None) -> None:
        wrapper(stock, resume_from_checkpoint, model)

    trainer._load_from_checkpoint = _load_from_checkpoint


def wrap_inner_training_loop(trainer: Any, wrapper: Callable[..., Any]) -> None:
    """``Trainer._inner_training_loop(..., resume_from_checkpoint=None, ...)``: the training loop,
    entered once per ``train()`` before the model is wrapped (DDP, DeepSpeed engine)."""
    stock = trainer._inner_training_loop

    def _inner_training_loop(*args: Any, resume_from_checkpoint: str | None = None, **kwargs: Any) -> Any:
        return wrapper(stock, *args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    trainer._inner_training_loop = _inner_training_loop


def computes_rewards(trainer: Any) -> bool:
    """Whether the trainer scores completions with reward functions (trl's GRPO/RLOO)."""
    return callable(getattr(trainer, "_calculate_rewards", None))


def wrap_calculate_rewards(trainer: Any, wrapper: Callable[..., Any]) -> None:
    """``GRPOTrainer/RLOOTrainer._calculate_rewards(inputs, prompts, completions, completion_ids_list)``:
    a ``(num_completions, num_reward_funcs)`` tensor, each generation round."""
    stock = trainer._calculate_rewards

    def _calculate_rewards(inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Any:
        return wrapper(stock, inputs, prompts, completions, completion_ids_list)

    trainer._calculate_rewards = _calculate_rewards


def wrap_load_best_model(trainer: Any, wrapper: Callable[..., None]) -> None:
    """``Trainer._load_best_model()``: at the end of ``train()`` with ``load_best_model_at_end``."""
    stock = trainer._load_best_model

    def _load_best_model() -> None:
        wrapper(stock)

    trainer._load_best_model = _load_best_model


def keep_signature_columns(trainer: Any, columns: Sequence[str]) -> None:
    """Add ``columns`` to the dataset columns ``remove_unused_columns`` keeps (by default the
    arguments of the model's ``forward``, set lazily by ``_set_signature_columns_if_needed``)."""
    trainer._set_signature_columns_if_needed()
    kept = list(trainer._signature_columns)
    trainer._signature_columns = [*kept, *(c for c in columns if c not in kept)]


def save_optimizer_state(trainer: Any, directory: str) -> None:
    """The stock files of a checkpoint's optimizer, scheduler and gradient scaler (under DeepSpeed,
    this process's engine shards), as ``Trainer._save_checkpoint`` writes them."""
    trainer._save_optimizer_and_scheduler(directory)
    trainer._save_scaler(directory)


def push_checkpoint(trainer: Any, checkpoint_dir: str) -> None:
    """Push a written checkpoint to the hub as ``Trainer._save_checkpoint`` does (``push_to_hub``)."""
    trainer._push_from_checkpoint(checkpoint_dir)


def save_entropy_control(trainer: Any, directory: str) -> None:
    """GRPO's adaptive entropy coefficient, in the file its ``_save_checkpoint`` writes and its
    ``_load_optimizer_and_scheduler`` reads back on resume; nothing for other trainers."""
    if getattr(trainer, "use_adaptive_entropy", False):
        state = {"entropy_coef": trainer.entropy_coef, "last_world_entropy": trainer._last_world_entropy}
        with open(os.path.join(directory, "entropy_ctrl_state.json"), "w") as f:
            json.dump(state, f)
