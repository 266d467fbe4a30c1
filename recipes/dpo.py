"""DPO recipe (Rafailov et al. 2023): stock ``trl.DPOTrainer`` with a LoRA policy on Taskmaster
coffee preference pairs (a thumbs-up and a thumbs-down reply to the same context). The reference
is the same base with the adapters off, so one copy of the base weights serves both.

    python recipes/dpo.py --config recipes/dpo.yaml                       # embedded default, CPU, <10 min
    python recipes/dpo.py --config recipes/dpo.yaml --beta 0.2 --epochs 2  # any key can be overridden
    python recipes/dpo.py --config recipes/dpo.yaml --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct

Loss: -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))), summed response log-probs.
Summary: on held-out pairs, the accuracy and mean margin of DPO's implicit reward
beta * (logp - ref) between chosen and rejected. Writes OUTPUT_DIR/summary.json and curves.png.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed
from trl import DPOConfig, TrlParser

from perl_plugins.data.defaults import default_dataset
from perl_plugins.data.text import trim_prompts
from perl_plugins.host.arguments import check_options
from perl_plugins.models.adapters import LoraOptions
from perl_plugins.training.recipe_kit import load_base, save_policy, stage_args, take, train_dpo
from perl_plugins.training.reporting import plot_curves, write_summary


@dataclass
class DPORecipeConfig:
    output_dir: str = field(default="outputs/dpo", metadata={"help": "Where the adapter, summary and curves go."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model; default: embedded."})
    model_size: str = field(default="demo", metadata={"help": "Embedded default size when no model is given."})
    taskmaster_file: str | None = field(default=None, metadata={"help": "Thumbs up/down file; default: coffee."})
    plugins: str = field(default="lora", metadata={"help": "Plugins on the DPO trainer (lora required; fp8...)."})
    plugin_options: str = field(default="{}", metadata={"help": "Plugin options (a mapping in YAML, JSON on the CLI)."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    context_turns: int = field(default=4, metadata={"help": "Keep the last N dialog turns of each context."})
    max_prompt_tokens: int = field(default=128, metadata={"help": "Keep the latest prompt tokens up to this."})
    max_length: int = field(default=192, metadata={"help": "Max tokens of prompt + response."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    train_samples: int = field(default=0, metadata={"help": "Training pairs (0: all)."})
    eval_samples: int = field(default=0, metadata={"help": "Held-out pairs (0: all)."})
    epochs: float = field(default=1.0, metadata={"help": "Epochs."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps (overrides epochs if > 0)."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per step."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of the LoRA adapter."})
    beta: float = field(default=0.1, metadata={"help": "DPO inverse temperature."})
    loss_type: str = field(default="sigmoid", metadata={"help": "trl DPO loss: sigmoid, hinge, ipo, robust..."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations (large models)."})


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = TrlParser([DPORecipeConfig]).parse_args_and_config(argv)
    check_options(cfg.plugin_options, cfg.plugins)  # before anything loads
    if "lora" not in cfg.plugins.split(","):
        raise SystemExit("This recipe's reference is the base with adapters off: keep 'lora' in plugins.")
    set_seed(cfg.seed)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    model_path, tokenizer = load_base(cfg.model_name_or_path, cfg.model_size)
    data = default_dataset("dpo", cfg.taskmaster_file, cfg.context_turns, seed=cfg.seed)
    train, test = data["train"].shuffle(seed=cfg.seed), data["test"]
    train, test = take(train, cfg.train_samples), take(test, cfg.eval_samples)
    train, test = (
        trim_prompts(train, tokenizer, cfg.max_prompt_tokens),
        trim_prompts(test, tokenizer, cfg.max_prompt_tokens),
    )
    print(f"[dpo] LoRA policy on {len(train)} preference pairs, {len(test)} held out", flush=True)
    args = stage_args(
        DPOConfig,
        os.path.join(cfg.output_dir, "policy"),
        cfg.seed,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        max_length=cfg.max_length,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    lora = LoraOptions(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
    metrics, logs, trainer = train_dpo(model_path, tokenizer, train, test, args, lora, cfg.plugins, cfg.plugin_options)
    summary = {
        "eval_reward_accuracy": metrics["eval_rewards/accuracies"],
        "eval_reward_margin": metrics["eval_rewards/margins"],
        "eval_loss": metrics["eval_loss"],
        "train_loss": next((log["train_loss"] for log in reversed(logs) if "train_loss" in log), math.nan),
    }
    save_policy(trainer, args.output_dir, summary, cfg.taskmaster_file)
    write_summary(cfg.output_dir, "dpo", summary, {"model": model_path, "plugins": cfg.plugins, "pairs": len(train)})
    plot_curves(
        cfg.output_dir,
        {
            "DPO: loss": (logs, ["loss", "dpo_loss"]),
            "DPO: implicit rewards": (logs, ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
            "DPO: reward accuracy": (logs, ["rewards/accuracies"]),
        },
    )
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
