"""Pieces several recipes share: sampling from a LoRA policy, and a LoRA policy
that carries a reward adapter on its own base (one copy of the base weights)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from perl_plugins.models.adapters import AdapterReward, LoraOptions, lora_config
from perl_plugins.models.reward import load_reward_adapter
from perl_plugins.models.roles import Roles


def sample_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    num_samples: int = 1,
    max_new_tokens: int = 24,
    temperature: float = 1.0,
    batch_size: int = 16,
    desc: str = "Sampling",
) -> list[list[str]]:
    """``num_samples`` sampled completions per prompt from the model's active adapter (no grad)."""
    flat = [p for p in prompts for _ in range(num_samples)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    completions: list[str] = []
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(flat), batch_size), desc=desc):
                chunk = flat[start : start + batch_size]
                batch = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left").to(device)
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    temperature=temperature,
                    pad_token_id=tokenizer.pad_token_id,
                )
                completions.extend(
                    tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
                )
    finally:
        model.train(was_training)
    return [completions[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def sampled_rewards(
    model: torch.nn.Module,
    tokenizer: Any,
    reward: AdapterReward,
    prompts: list[str],
    num_samples: int,
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    stop_at_newline: bool = False,
) -> dict[str, Any]:
    """``num_samples`` sampled completions per prompt from the model's active policy, scored by
    ``reward``, with a sampling seed fixed by ``seed`` (the same draws before and after training):
    mean, std of single rewards, standard error over prompts, per-prompt means, mean length, samples."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed + 7919)
    try:
        completions = sample_completions(
            model,
            tokenizer,
            prompts,
            num_samples,
            max_new_tokens,
            temperature,
            batch_size=64,
            desc="Held-out samples",  # a small model's generate is per-step overhead: batch wide
        )
    finally:
        torch.random.set_rng_state(state)
    flat_prompts = [p for p, cs in zip(prompts, completions) for _ in cs]
    flat = [c for cs in completions for c in cs]
    if stop_at_newline:
        flat = [first_line(c) for c in flat]  # generation stopped there; the newline is no part of the turn
    rewards = np.asarray(reward(prompts=flat_prompts, completions=flat), dtype=np.float64)
    per_prompt = rewards.reshape(len(prompts), -1).mean(axis=1)
    return {
        "mean": float(rewards.mean()),
        "std": float(rewards.std(ddof=1)),
        # Samples of one prompt are correlated: the standard error counts prompts, not samples.
        "se": float(per_prompt.std(ddof=1) / math.sqrt(len(prompts))),
        "per_prompt": per_prompt,
        "mean_length": float(np.mean([len(c) for c in flat])),  # characters: decoded text re-tokenizes unevenly
        "samples": [(p, c, float(r)) for p, c, r in zip(flat_prompts, flat, rewards)],
    }


def line_end_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokens whose text holds a newline."""
    return [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])]


def stop_at_line_end(model: torch.nn.Module, tokenizer: Any) -> None:
    """Let ``model.generate`` (and trl's RL trainers, which read the same list) end a completion at
    the end of its line, as at EOS: a rated completion is one agent turn, one line; sampling on runs
    into the next ``User:`` turn, text no thumb ever rated."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.insert(0, tokenizer.eos_token_id)
    model.generation_config.eos_token_id = eos + [i for i in line_end_ids(tokenizer) if i not in eos]


def first_line(completion: str) -> str:
    """A completion up to its first newline: the agent turn a thumb rates."""
    return completion.split("\n", 1)[0]


class TurnReward(AdapterReward):
    """:class:`AdapterReward` on the first line of each completion (see :func:`stop_at_line_end`):
    the reward model was trained on single turns, ending there."""

    def texts(self, prompts: list[Any], completions: list[Any]) -> list[Any]:
        return super().texts(prompts, [first_line(c) if isinstance(c, str) else c for c in completions])


def policy_with_reward(
    model: torch.nn.Module, tokenizer: Any, reward_dir: str, lora: LoraOptions, reward: AdapterReward | None = None
) -> tuple[Any, Roles, AdapterReward]:
    """Wrap ``model`` (a causal LM) in a fresh LoRA policy adapter and load the reward adapter at
    ``reward_dir`` next to it: roles ``policy`` (trainable), ``reference`` (adapters off) and
    ``reward`` (frozen), and ``reward`` (default: an :class:`AdapterReward` of ``reward_dir``) bound to them."""
    from peft import get_peft_model

    policy = get_peft_model(model, lora_config(model, lora))
    load_reward_adapter(policy, reward_dir, adapter_name="reward")
    roles = Roles(policy, {"policy": policy.active_adapter, "reference": None, "reward": "reward"})
    reward = reward or AdapterReward(reward_dir)
    reward.bind(roles, tokenizer)
    return policy, roles, reward


def iteration_log(values: list[float], key: str) -> list[dict[str, float]]:
    """A ``log_history``-like list (``step`` = iteration, from 1) for :func:`perl_plugins.training.reporting.plot_curves`."""
    return [{"step": i, key: v} for i, v in enumerate(values, 1)]
