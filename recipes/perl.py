"""PERL recipe (arXiv 2403.10704): a LoRA reward model on thumbs up/down feedback, then RLOO with a
LoRA policy on the *same* frozen base, scored by the stage-1 reward adapter.

    python recipes/perl.py --config recipes/perl.yaml [--any_key value ...]
    python recipes/perl.py --config recipes/perl.yaml --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct

Stage 1: stock ``transformers.Trainer`` on a one-label classifier (BCE on the reward logit) with
``lora`` (+ ``grm`` / ``fp8`` / ``adapter_ckpt`` if listed in ``plugins``); held-out accuracy and
ROC AUC. Stage 2: stock ``trl.RLOOTrainer``; policy = LoRA adapter, reference = adapters off,
reward = the stage-1 adapter + head loaded onto the policy's base (one copy of the base weights).
Held-out RL reward: ``rl_eval_prompts`` test prompts x ``rl_eval_samples`` samples, before and after,
with standard errors over prompts; ``rl_compare_full`` repeats stage 2 with a fully fine-tuned policy.
Writes OUTPUT_DIR/summary.json, OUTPUT_DIR/samples.md and OUTPUT_DIR/curves.png.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    TrainingArguments,
    set_seed,
)
from trl import RLOOConfig, RLOOTrainer, TrlParser

from perl_plugins import attach
from perl_plugins.arguments import options_for
from perl_plugins.data.defaults import default_dataset
from perl_plugins.embedded import resolve_model
from perl_plugins.plugins.lora import AdapterReward, LoraOptions, lora_config, roles
from perl_plugins.pointwise import pointwise_trainer, reward_classifier
from perl_plugins.recipe_stages import policy_with_reward, sample_completions
from perl_plugins.reporting import plot_curves, write_summary
from perl_plugins.reward_model import save_reward_adapter


@dataclass
class PerlConfig:
    output_dir: str = field(default="outputs/perl", metadata={"help": "Where adapters, summary and curves go."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model; default: embedded."})
    model_size: str = field(default="demo", metadata={"help": "Embedded default size when no model is given."})
    taskmaster_file: str | None = field(default=None, metadata={"help": "Thumbs up/down file; default: coffee."})
    rm_plugins: str = field(default="lora", metadata={"help": "Reward-model stage plugins (lora required; grm...)."})
    rl_plugins: str = field(default="lora", metadata={"help": "RL stage plugins (lora required)."})
    plugin_options: str = field(
        default="{}", metadata={"help": "Plugin options for both stages (a mapping in YAML, JSON on the CLI)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of both stages."})
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the leak-free train/test split (the embedded base saw split 0's train)."}
    )
    context_turns: int = field(default=4, metadata={"help": "Keep the last N dialog turns of each context."})
    max_length: int = field(default=192, metadata={"help": "Reward model: max tokens of prompt + completion."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of both adapters."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of both adapters."})
    # stage 1: reward model
    reward_adapter: str | None = field(
        default=None, metadata={"help": "A trained reward adapter directory: skip stage 1 and run the RL stage on it."}
    )
    rm_train_samples: int = field(default=0, metadata={"help": "Train rows for the reward model (0: all)."})
    rm_eval_samples: int = field(default=0, metadata={"help": "Held-out rows to evaluate on (0: all)."})
    rm_epochs: float = field(default=1.0, metadata={"help": "Reward-model epochs."})
    rm_max_steps: int = field(default=-1, metadata={"help": "Reward-model steps (overrides epochs if > 0)."})
    rm_batch_size: int = field(default=16, metadata={"help": "Reward-model batch size."})
    rm_learning_rate: float = field(default=1e-3, metadata={"help": "Reward-model learning rate."})
    rm_lr_scheduler: str = field(default="linear", metadata={"help": "Reward-model learning-rate schedule."})
    rm_warmup_ratio: float = field(default=0.0, metadata={"help": "Reward-model warm-up share of the steps."})
    rm_full_learning_rate: float = field(
        default=1e-4, metadata={"help": "Learning rate when the reward model is fully fine-tuned (benchmarks)."}
    )
    # stage 2: RL
    rl_prompts: int = field(default=64, metadata={"help": "Training prompts for RLOO."})
    rl_eval_prompts: int = field(default=64, metadata={"help": "Held-out prompts for reward before/after."})
    rl_eval_samples: int = field(default=4, metadata={"help": "Sampled completions per held-out prompt."})
    rl_max_steps: int = field(default=30, metadata={"help": "RLOO optimizer steps."})
    rl_batch_size: int = field(default=8, metadata={"help": "Completions per RLOO step."})
    rl_num_generations: int = field(default=4, metadata={"help": "Completions per prompt (RLOO's k)."})
    rl_max_completion_length: int = field(default=24, metadata={"help": "Max new tokens per completion."})
    rl_learning_rate: float = field(default=5e-4, metadata={"help": "Policy learning rate."})
    rl_beta: float = field(default=0.05, metadata={"help": "KL penalty to the reference (adapters off)."})
    rl_kl_limit: float = field(default=0.5, metadata={"help": "Documented bound the final KL must stay below."})
    rl_compare_full: bool = field(default=False, metadata={"help": "Also run RL with a fully fine-tuned policy (rl_full_*)."})
    rl_full_learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate of the full fine-tuning policy."})


def reward_trainer(cfg: PerlConfig, model_path: str, tokenizer, train, test, plugins: str | None = None):
    """Stage 1's stock ``Trainer`` (BCE on the reward logit), plugins attached, not yet trained.

    ``plugins`` defaults to ``cfg.rm_plugins``; ``""`` fine-tunes the whole model (the comparison
    PERL draws: LoRA reward models on par with full fine-tuning at the same budget)."""
    plugins = cfg.rm_plugins if plugins is None else plugins
    args = TrainingArguments(
        output_dir=os.path.join(cfg.output_dir, "reward_model"),
        num_train_epochs=cfg.rm_epochs,
        max_steps=cfg.rm_max_steps,
        per_device_train_batch_size=cfg.rm_batch_size,
        per_device_eval_batch_size=cfg.rm_batch_size,
        learning_rate=cfg.rm_learning_rate,
        lr_scheduler_type=_setting(cfg, "rm_lr_scheduler"),
        warmup_steps=_setting(cfg, "rm_warmup_ratio"),  # a float below 1 is a share of the steps
        train_sampling_strategy="group_by_length",  # batches of like lengths: far less padding to compute
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
    )
    trainer = pointwise_trainer(reward_classifier(model_path), tokenizer, args, train, test, max_length=cfg.max_length)
    names = [name for name in plugins.split(",") if name]
    options = options_for(names, cfg.plugin_options)
    if "lora" in names:
        options.update(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
    return attach(trainer, plugins=names, **options)


def train_reward_model(cfg: PerlConfig, model_path: str, tokenizer, data) -> tuple[str, dict, list]:
    """Stage 1: LoRA reward model on pointwise thumbs up/down; returns (adapter dir, metrics, logs)."""
    train, test = data["train"].shuffle(seed=cfg.seed), data["test"]
    if cfg.rm_train_samples:
        train = train.select(range(min(cfg.rm_train_samples, len(train))))
    if cfg.rm_eval_samples:
        test = test.select(range(min(cfg.rm_eval_samples, len(test))))
    trainer = reward_trainer(cfg, model_path, tokenizer, train, test)
    trainer.train()
    metrics = trainer.evaluate()
    adapter_dir = os.path.join(cfg.output_dir, "reward_adapter")
    save_reward_adapter(trainer.model, adapter_dir, trainer.model.active_adapter)
    return adapter_dir, metrics, trainer.state.log_history


def held_out_rewards(model, tokenizer, reward: AdapterReward, prompts: list[str], cfg: PerlConfig) -> dict[str, Any]:
    """``rl_eval_samples`` sampled completions per held-out prompt from the model's active policy,
    scored by the reward adapter, with a fixed sampling seed (the same draws before and after RL)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed + 7919)
    try:
        completions = sample_completions(
            model, tokenizer, prompts, _setting(cfg, "rl_eval_samples"), cfg.rl_max_completion_length,
            batch_size=64, desc="Held-out samples",  # a small model's generate is per-step overhead: batch wide
        )
    finally:
        torch.random.set_rng_state(state)
    flat_prompts = [p for p, cs in zip(prompts, completions) for _ in cs]
    flat = [c for cs in completions for c in cs]
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


def rl_report(before: dict[str, Any], after: dict[str, Any], prefix: str = "rl") -> dict[str, float]:
    """Before/after means and standard errors, the gain in standard deviations of the
    before-distribution, and the paired standard error of the gain (prompt-level differences)."""
    diff = after["per_prompt"] - before["per_prompt"]
    return {
        f"{prefix}_reward_before": before["mean"],
        f"{prefix}_reward_before_se": before["se"],
        f"{prefix}_reward_after": after["mean"],
        f"{prefix}_reward_after_se": after["se"],
        f"{prefix}_gain": after["mean"] - before["mean"],
        f"{prefix}_gain_se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
        f"{prefix}_gain_in_std": (after["mean"] - before["mean"]) / before["std"],
        f"{prefix}_length_before": before["mean_length"],
        f"{prefix}_length_after": after["mean_length"],
    }


def rl_stage(
    cfg: PerlConfig, model_path: str, tokenizer, reward_dir: str, data=None, policy: str = "lora"
) -> tuple[dict, list, dict]:
    """Stage 2: RLOO from ``model_path`` scored by the reward adapter at ``reward_dir``; returns
    (metrics, logs, {"before": ..., "after": ...} held-out rewards and samples).

    ``policy="lora"`` is PERL: a LoRA policy on the same base object as the reward adapter and the
    reference (adapters off). ``policy="full"`` fine-tunes every weight (the comparison PERL draws):
    the reward adapter then sits on a separate frozen copy of the base."""
    if data is None:
        data = default_dataset("rloo", cfg.taskmaster_file, cfg.context_turns, seed=_setting(cfg, "split_seed"))
    prompts = list(dict.fromkeys(data["train"]["prompt"]))[: cfg.rl_prompts]
    eval_prompts = list(dict.fromkeys(data["test"]["prompt"]))[: cfg.rl_eval_prompts]
    args = RLOOConfig(
        output_dir=os.path.join(cfg.output_dir, "policy" if policy == "lora" else "policy_full"),
        max_steps=cfg.rl_max_steps,
        per_device_train_batch_size=cfg.rl_batch_size,
        num_generations=cfg.rl_num_generations,
        max_completion_length=cfg.rl_max_completion_length,
        learning_rate=cfg.rl_learning_rate if policy == "lora" else _setting(cfg, "rl_full_learning_rate"),
        beta=cfg.rl_beta,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if policy == "lora":
        reward = AdapterReward(reward_dir)
        peft_config = lora_config(model, LoraOptions(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha))
    else:
        _, _, reward = policy_with_reward(
            AutoModelForCausalLM.from_pretrained(model_path), tokenizer, reward_dir, LoraOptions(lora_r=cfg.lora_r)
        )
        peft_config = None
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if policy == "lora":
        attach(trainer, plugins=cfg.rl_plugins, **options_for(cfg.rl_plugins, cfg.plugin_options))
        use_policy = lambda: roles(trainer).use("policy")
    else:
        use_policy = contextlib.nullcontext
    with use_policy():
        before = held_out_rewards(trainer.model, tokenizer, reward, eval_prompts, cfg)
    trainer.train()
    with use_policy():
        after = held_out_rewards(trainer.model, tokenizer, reward, eval_prompts, cfg)
    trainer.save_model(args.output_dir)
    prefix = "rl" if policy == "lora" else "rl_full"
    logs = trainer.state.log_history
    metrics = {
        **rl_report(before, after, prefix),
        f"{prefix}_final_kl": next((log["kl"] for log in reversed(logs) if "kl" in log), math.nan),
    }
    return metrics, logs, {"before": before, "after": after}


def run_rl(cfg, model_path: str, tokenizer, reward_dir: str, data=None) -> tuple[dict, list]:
    """Stage 2 with a LoRA policy, as other recipes reuse it: (metrics, logs); see :func:`rl_stage`."""
    metrics, logs, _ = rl_stage(cfg, model_path, tokenizer, reward_dir, data)
    return metrics, logs


def _setting(cfg, name: str) -> Any:
    """``cfg.name``, or PerlConfig's default where a recipe reusing these stages has no such key."""
    return getattr(cfg, name, PerlConfig.__dataclass_fields__[name].default)


def write_samples(output_dir: str, evals: dict[str, dict[str, Any]], per_side: int = 6) -> Path:
    """OUTPUT_DIR/samples.md: held-out completions before and after RL, side by side, with mean
    lengths, so that what the RL did to the text (reward hacking included) is visible."""
    before, after = evals["before"], evals["after"]
    lines = [
        "# Held-out samples before and after RL",
        "",
        (f"Mean completion length (characters): before {before['mean_length']:.1f}, after {after['mean_length']:.1f}. "
        f"Mean reward: before {before['mean']:.3f} ± {before['se']:.3f}, after {after['mean']:.3f} ± {after['se']:.3f}."),
        "",
    ]
    step = max(1, len(before["samples"]) // per_side)
    for k in range(0, min(len(before["samples"]), step * per_side), step):
        prompt, b, rb = before["samples"][k]
        _, a, ra = after["samples"][k]
        lines += [
            f"## Sample {k // step + 1}",
            "",
            "```",
            "\n".join(prompt.split("\n")[-3:]),
            "```",
            "",
            f"- before (reward {rb:.3f}): `{b!r}`",
            f"- after (reward {ra:.3f}): `{a!r}`",
            "",
        ]
    path = Path(output_dir) / "samples.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = TrlParser([PerlConfig]).parse_args_and_config(argv)
    if "lora" not in cfg.rm_plugins.split(",") or "lora" not in cfg.rl_plugins.split(","):
        raise SystemExit("The PERL recipe trains through LoRA: keep 'lora' in rm_plugins and rl_plugins.")
    set_seed(cfg.seed)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cfg.model_name_or_path, cfg.model_size)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rm_data = default_dataset("reward", cfg.taskmaster_file, cfg.context_turns, seed=cfg.split_seed)
    if cfg.reward_adapter:
        reward_dir, rm_logs = cfg.reward_adapter, []
        rm_metrics = dict.fromkeys(("eval_accuracy", "eval_auc", "eval_loss"), math.nan)
        print(f"[perl] stage 1 skipped: reward adapter {reward_dir}", flush=True)
    else:
        print(f"[perl] stage 1: LoRA reward model on {len(rm_data['train'])} thumbs up/down rows", flush=True)
        reward_dir, rm_metrics, rm_logs = train_reward_model(cfg, model_path, tokenizer, rm_data)
        print(f"[perl] reward model: accuracy {rm_metrics['eval_accuracy']:.3f}, AUC {rm_metrics['eval_auc']:.3f}", flush=True)
    rl_data = default_dataset("rloo", cfg.taskmaster_file, cfg.context_turns, seed=cfg.split_seed)
    print(f"[perl] stage 2: RLOO, LoRA policy + reward adapter on one base, {cfg.rl_max_steps} steps", flush=True)
    rl_metrics, rl_logs, rl_evals = rl_stage(cfg, model_path, tokenizer, reward_dir, rl_data)
    write_samples(cfg.output_dir, rl_evals)
    if cfg.rl_compare_full:
        print("[perl] stage 2 again with a fully fine-tuned policy (PERL's comparison)", flush=True)
        full_metrics, _, _ = rl_stage(cfg, model_path, tokenizer, reward_dir, rl_data, policy="full")
        rl_metrics.update(full_metrics)
        rl_metrics["rl_lora_over_full_gain"] = rl_metrics["rl_gain"] / full_metrics["rl_full_gain"]
    metrics = {
        "rm_eval_accuracy": rm_metrics["eval_accuracy"],
        "rm_eval_auc": rm_metrics["eval_auc"],
        "rm_eval_loss": rm_metrics["eval_loss"],
        **rl_metrics,
        "rl_kl_limit": cfg.rl_kl_limit,
    }
    write_summary(cfg.output_dir, "perl", metrics, {"model": model_path, "rm_plugins": cfg.rm_plugins, "rl_plugins": cfg.rl_plugins})
    plot_curves(
        cfg.output_dir,
        {
            "reward model: loss": (rm_logs, ["loss", "reward_loss", "grm_reg_loss"]),
            "RLOO: reward": (rl_logs, ["reward"]),
            "RLOO: KL to reference": (rl_logs, ["kl"]),
            "RLOO: loss": (rl_logs, ["loss"]),
        },
    )
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
