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

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed
from trl import TrlParser

from perl_plugins.data.defaults import default_dataset
from perl_plugins.host.arguments import check_options
from perl_plugins.training.recipe_kit import STAGE_DEFAULTS, load_base, rl_stage, train_reward_model, write_samples
from perl_plugins.training.reporting import plot_curves, write_summary


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
        default=STAGE_DEFAULTS["split_seed"],
        metadata={"help": "Seed of the leak-free train/test split (the embedded base saw split 0's train)."},
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
    rm_epochs: float = field(default=2.0, metadata={"help": "Reward-model epochs."})
    rm_max_steps: int = field(default=-1, metadata={"help": "Reward-model steps (overrides epochs if > 0)."})
    rm_batch_size: int = field(default=16, metadata={"help": "Reward-model batch size."})
    rm_learning_rate: float = field(default=1e-3, metadata={"help": "Reward-model learning rate."})
    rm_lr_scheduler: str = field(
        default=STAGE_DEFAULTS["rm_lr_scheduler"], metadata={"help": "Reward-model learning-rate schedule."}
    )
    rm_warmup_ratio: float = field(
        default=STAGE_DEFAULTS["rm_warmup_ratio"], metadata={"help": "Reward-model warm-up share of the steps."}
    )
    rm_balance_classes: bool = field(
        default=STAGE_DEFAULTS["rm_balance_classes"],
        metadata={"help": "Repeat rows of the rarer thumb until both thumbs count as many train rows."},
    )
    rm_head_init: str = field(
        default=STAGE_DEFAULTS["rm_head_init"],
        metadata={
            "help": "Reward head before fine-tuning: 'random', or 'probe' (logistic regression on the frozen "
            "model's features for the train rows, then fine-tune: LP-FT)."
        },
    )
    rm_full_learning_rate: float = field(
        default=3e-4, metadata={"help": "Learning rate when the reward model is fully fine-tuned (benchmarks)."}
    )
    # stage 2: RL
    rl_prompts: int = field(default=64, metadata={"help": "Training prompts for RLOO."})
    rl_eval_prompts: int = field(default=64, metadata={"help": "Held-out prompts for reward before/after."})
    rl_eval_samples: int = field(
        default=STAGE_DEFAULTS["rl_eval_samples"], metadata={"help": "Sampled completions per held-out prompt."}
    )
    rl_max_steps: int = field(default=30, metadata={"help": "RLOO optimizer steps."})
    rl_batch_size: int = field(default=8, metadata={"help": "Completions per RLOO step."})
    rl_num_generations: int = field(default=4, metadata={"help": "Completions per prompt (RLOO's k)."})
    rl_max_completion_length: int = field(default=24, metadata={"help": "Max new tokens per completion."})
    rl_stop_at_newline: bool = field(
        default=STAGE_DEFAULTS["rl_stop_at_newline"],
        metadata={"help": "End each sampled completion at its first newline (one agent turn, as rated)."},
    )
    rl_learning_rate: float = field(default=5e-4, metadata={"help": "Policy learning rate."})
    rl_beta: float = field(default=0.1, metadata={"help": "KL penalty to the reference (adapters off)."})
    rl_kl_limit: float = field(default=0.5, metadata={"help": "Documented bound the final KL must stay below."})
    rl_compare_full: bool = field(
        default=False, metadata={"help": "Also run RL with a fully fine-tuned policy (rl_full_*)."}
    )
    rl_full_learning_rate: float = field(
        default=STAGE_DEFAULTS["rl_full_learning_rate"],
        metadata={"help": "Learning rate of the full fine-tuning policy."},
    )


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = TrlParser([PerlConfig]).parse_args_and_config(argv)
    check_options(cfg.plugin_options, cfg.rm_plugins, cfg.rl_plugins)  # before anything loads
    if "lora" not in cfg.rm_plugins.split(",") or "lora" not in cfg.rl_plugins.split(","):
        raise SystemExit("The PERL recipe trains through LoRA: keep 'lora' in rm_plugins and rl_plugins.")
    set_seed(cfg.seed)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    model_path, tokenizer = load_base(cfg.model_name_or_path, cfg.model_size)
    rm_data = default_dataset("reward", cfg.taskmaster_file, cfg.context_turns, seed=cfg.split_seed)
    if cfg.reward_adapter:
        reward_dir, rm_logs = cfg.reward_adapter, []
        rm_metrics = dict.fromkeys(("eval_accuracy", "eval_auc", "eval_loss"), math.nan)
        print(f"[perl] stage 1 skipped: reward adapter {reward_dir}", flush=True)
    else:
        print(f"[perl] stage 1: LoRA reward model on {len(rm_data['train'])} thumbs up/down rows", flush=True)
        reward_dir, rm_metrics, rm_logs = train_reward_model(cfg, model_path, tokenizer, rm_data)
        print(
            f"[perl] reward model: accuracy {rm_metrics['eval_accuracy']:.3f}, AUC {rm_metrics['eval_auc']:.3f}",
            flush=True,
        )
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
    write_summary(
        cfg.output_dir,
        "perl",
        metrics,
        {"model": model_path, "rm_plugins": cfg.rm_plugins, "rl_plugins": cfg.rl_plugins},
    )
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
