"""Tiny trainers with ``lora,adapter_ckpt`` for tests/test_adapter_ckpt.py, importable and runnable.

As a script (the fault test runs it in a process it kills mid-save)::

    python tests/adapter_ckpt_run.py KIND BASE_DIR OUTPUT_DIR [RESUME]
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "User: a latte please\nAgent:",
    "User: one espresso\nAgent:",
    "User: iced mocha\nAgent:",
    "User: tea?\nAgent:",
]
GOOD = [" Sure, one latte.", " One espresso, coming up.", " Iced mocha it is.", " We have green tea."]
BAD = [" No.", " What?", " Bye.", " Coffee only."]
MAX_STEPS, SAVE_STEPS = 4, 2


def length_reward(completions: list[str], **kwargs: Any) -> list[float]:
    return [len(c) / 10 for c in completions]


def build(
    kind: str,
    base_dir: str | Path,
    output_dir: str | Path,
    *,
    seed: int = 0,
    plugins: str = "lora,adapter_ckpt",
    reward_funcs: list[Any] | None = None,
    options: dict[str, Any] | None = None,
    evaluate: bool = False,
    **args: Any,
) -> Any:
    """A fresh stock trl trainer of ``kind`` (reward, dpo, rloo, grpo), fp32 on CPU, on the tiny base in ``base_dir``
    with ``plugins`` attached; the same arguments give the same run. ``evaluate``: the reward trainer
    also evaluates on its training pairs."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import perl_plugins

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    common = dict(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        save_strategy="steps",
        per_device_train_batch_size=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    common.update(args)
    prompts, good, bad = PROMPTS * 2, GOOD * 2, BAD * 2
    preference = Dataset.from_dict({"prompt": prompts, "chosen": good, "rejected": bad})
    torch.manual_seed(seed)  # a fresh reward head is initialised at load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "reward":
            model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
            trainer = trl.RewardTrainer(
                model=model,
                args=trl.RewardConfig(**common, max_length=64),
                train_dataset=preference,
                eval_dataset=preference if evaluate else None,
                processing_class=tokenizer,
            )
        elif kind == "dpo":
            model = AutoModelForCausalLM.from_pretrained(base_dir)
            trainer = trl.DPOTrainer(
                model=model,
                args=trl.DPOConfig(**common, max_length=64),
                train_dataset=preference,
                processing_class=tokenizer,
            )
        elif kind in ("rloo", "grpo"):
            model = AutoModelForCausalLM.from_pretrained(base_dir)
            config_cls, trainer_cls = (
                (trl.RLOOConfig, trl.RLOOTrainer) if kind == "rloo" else (trl.GRPOConfig, trl.GRPOTrainer)
            )
            config = config_cls(**common, num_generations=2, max_completion_length=8, beta=0.0)
            trainer = trainer_cls(
                model=model,
                reward_funcs=reward_funcs or [length_reward],
                args=config,
                train_dataset=Dataset.from_dict({"prompt": prompts}),
                processing_class=tokenizer,
            )
        else:
            raise ValueError(f"unknown kind {kind!r}")
    return perl_plugins.attach(trainer, plugins=plugins, **(options or {}))


def train(trainer: Any, resume: str | bool | None = None) -> list[dict[str, float]]:
    """Train (or resume) and return the per-step log dicts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return [entry for entry in trainer.state.log_history if "loss" in entry]


if __name__ == "__main__":
    kind, base_dir, output_dir, *rest = sys.argv[1:]
    train(build(kind, base_dir, output_dir, save_total_limit=1), rest[0] if rest else None)
