"""DPO recipe (Rafailov et al. 2023): stock ``trl.DPOTrainer`` with a LoRA policy on Taskmaster
coffee preference pairs (a thumbs-up and a thumbs-down reply to the same context). The reference
is the same base with the adapters off, so one copy of the base weights serves both.

    python recipes/dpo.py --config recipes/dpo.yaml                       # embedded default, CPU, <10 min
    python recipes/dpo.py --config recipes/dpo.yaml --beta 0.2 --epochs 2  # any key can be overridden
    python recipes/dpo.py --config recipes/dpo.yaml --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct

Loss: -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))), summed response log-probs.
Summary: on held-out pairs (the leak-free test split; ``heldout_split: validation`` carves one
out of train instead, for tuning), before and after training, the accuracy of DPO's implicit
reward, margin = beta * ((logp_c - ref_c) - (logp_r - ref_r)) > 0, ties counting 1/2, and its mean
margin, with standard errors over pairs and the paired standard error of the gain. Before
training the policy *is* the reference (LoRA starts at zero), so every margin is 0: the
accuracy is 0.5 by construction, the point a policy that learned nothing sits at.
``eval_reference_accuracy`` says how often the base alone already gives the chosen reply the
higher log-prob. Goal (default YAML): after >= 0.65. Writes OUTPUT_DIR/summary.json and curves.png.
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
from perl_plugins.training.heldout import before_after, mean_se, pair_wins
from perl_plugins.training.recipe_kit import dpo_trainer, load_base, save_policy, stage_args, take
from perl_plugins.training.reporting import plot_curves, write_summary
from perl_plugins.training.reward_metrics import dpo_logratios

GOAL_ACCURACY = 0.65  # held-out implicit-reward accuracy the default YAML must reach


@dataclass
class DPORecipeConfig:
    output_dir: str = field(default="outputs/dpo", metadata={"help": "Where the adapter, summary and curves go."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model; default: embedded."})
    model_size: str = field(default="demo", metadata={"help": "Embedded default size when no model is given."})
    taskmaster_file: str | None = field(default=None, metadata={"help": "Thumbs up/down file; default: coffee."})
    plugins: str = field(default="lora", metadata={"help": "Plugins on the DPO trainer (lora required; fp8...)."})
    plugin_options: str = field(default="{}", metadata={"help": "Plugin options (a mapping in YAML, JSON on the CLI)."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the leak-free train/test split (the embedded base saw split 0's train)."}
    )
    heldout_split: str = field(
        default="test",
        metadata={
            "help": "Pairs the summary scores: test, validation (carved from train: tuning) or fold:I/K (cross-validation)."
        },
    )
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
    model_path, tokenizer = load_base(cfg.model_name_or_path, cfg.model_size, cfg.heldout_split)
    data = default_dataset(
        "dpo", cfg.taskmaster_file, cfg.context_turns, seed=cfg.split_seed, heldout=cfg.heldout_split
    )
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
    trainer = dpo_trainer(model_path, tokenizer, train, test, args, lora, cfg.plugins, cfg.plugin_options)
    policy_before, reference = dpo_logratios(trainer)
    trainer.train()
    metrics, logs = trainer.evaluate(), trainer.state.log_history
    policy_after, _ = dpo_logratios(trainer)
    margin_before, margin_after = cfg.beta * (policy_before - reference), cfg.beta * (policy_after - reference)
    summary = {
        **before_after("eval_reward_accuracy", pair_wins(margin_before), pair_wins(margin_after)),
        **before_after("eval_reward_margin", margin_before, margin_after),
        "eval_reference_accuracy": mean_se(pair_wins(reference))[0],
        "eval_pairs": len(reference),
        "eval_loss": metrics["eval_loss"],
        "train_loss": next((log["train_loss"] for log in reversed(logs) if "train_loss" in log), math.nan),
    }
    summary["goal_met"] = summary["eval_reward_accuracy_after"] >= GOAL_ACCURACY
    save_policy(trainer, args.output_dir, summary, cfg.taskmaster_file)
    info = {"model": model_path, "plugins": cfg.plugins, "pairs": len(train), "heldout": cfg.heldout_split}
    info["goal"] = f"held-out implicit-reward accuracy after >= {GOAL_ACCURACY}"
    write_summary(cfg.output_dir, "dpo", summary, info)
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
