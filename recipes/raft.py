"""RAFT recipe (reward-ranked fine-tuning, Dong et al. 2023): sample, rank by reward, fine-tune on
the best, repeat. The policy and the reward model are two LoRA adapters on one frozen base.

    python recipes/raft.py --config recipes/raft.yaml                          # embedded default, CPU, <10 min
    python recipes/raft.py --config recipes/raft.yaml --raft_selection top     # any key can be overridden
    python recipes/raft.py --config recipes/raft.yaml --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct

Stage 1 (as PERL stage 1): a LoRA reward model on Taskmaster coffee thumbs up/down, stock
``transformers.Trainer`` (``rm_plugins``: lora, + grm / fp8 / adapter_ckpt). Stage 2, each
iteration: take the next ``raft_prompts`` training prompts; sample ``raft_k`` replies per prompt
with the current policy adapter; score them with the reward adapter loaded onto the same base;
keep the best reply per prompt (``local``) or the global top 1/K of all samples (``top``); then
stock ``trl.SFTTrainer`` (``sft_plugins``) fine-tunes the same policy adapter on the kept pairs.
Summary: the mean reward of each iteration's samples (expected to rise; on training prompts), and
on held-out prompts (the leak-free test split; ``heldout_split: validation`` carves one out of train
instead, for tuning) the mean reward of ``eval_samples`` policy samples per prompt before and after,
with the same sampling seed both times; standard errors count prompts (a prompt's samples are
correlated), the gain's is paired by prompt, and ``eval_gain_in_std`` divides the gain by the
standard deviation of single before-rewards. Goal (default YAML): ``eval_gain_in_std`` >= 0.5.
Writes OUTPUT_DIR/summary.json and curves.png.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import AutoModelForCausalLM, set_seed
from trl import SFTConfig, SFTTrainer, TrlParser

from perl_plugins import attach
from perl_plugins.data.defaults import default_dataset
from perl_plugins.data.text import trim_prompt
from perl_plugins.host.arguments import check_options, options_for
from perl_plugins.models.adapters import AdapterReward, LoraOptions
from perl_plugins.models.card import training_data, write_model_card
from perl_plugins.training.recipe_kit import load_base, rl_report, stage_args, train_reward_model
from perl_plugins.training.reporting import plot_curves, write_summary
from perl_plugins.training.sampling import iteration_log, policy_with_reward, sample_completions, sampled_rewards

SELECTIONS = ("local", "top")
GOAL_GAIN_IN_STD = 0.5  # held-out reward gain, in standard deviations of the before-rewards


@dataclass
class RAFTRecipeConfig:
    output_dir: str = field(default="outputs/raft", metadata={"help": "Where adapters, summary and curves go."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model; default: embedded."})
    model_size: str = field(default="demo", metadata={"help": "Embedded default size when no model is given."})
    taskmaster_file: str | None = field(default=None, metadata={"help": "Thumbs up/down file; default: coffee."})
    rm_plugins: str = field(default="lora", metadata={"help": "Reward-model plugins (lora required; grm...)."})
    sft_plugins: str = field(default="lora", metadata={"help": "SFT plugins (lora required; fp8...)."})
    plugin_options: str = field(default="{}", metadata={"help": "Plugin options (a mapping in YAML, JSON on the CLI)."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the leak-free train/test split (the embedded base saw split 0's train)."}
    )
    heldout_split: str = field(
        default="test",
        metadata={
            "help": "Prompts the summary scores: test, validation (carved from train: tuning) or fold:I/K (cross-validation)."
        },
    )
    context_turns: int = field(default=4, metadata={"help": "Keep the last N dialog turns of each context."})
    max_prompt_tokens: int = field(default=128, metadata={"help": "Keep the latest prompt tokens up to this."})
    max_length: int = field(default=192, metadata={"help": "Max tokens of prompt + reply (reward model, SFT)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of both adapters."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of both adapters."})
    # stage 1: reward model (the keys of recipes/perl.py)
    rm_train_samples: int = field(default=1600, metadata={"help": "Reward-model training rows (0: all)."})
    rm_eval_samples: int = field(default=0, metadata={"help": "Reward-model held-out rows (0: all)."})
    rm_epochs: float = field(default=1.0, metadata={"help": "Reward-model epochs."})
    rm_max_steps: int = field(default=-1, metadata={"help": "Reward-model steps (overrides epochs if > 0)."})
    rm_batch_size: int = field(default=16, metadata={"help": "Reward-model batch size."})
    rm_learning_rate: float = field(default=1e-3, metadata={"help": "Reward-model learning rate."})
    # stage 2: RAFT
    raft_iterations: int = field(default=8, metadata={"help": "Sample / rank / fine-tune rounds."})
    raft_prompts: int = field(default=32, metadata={"help": "Prompts per iteration (the paper's b)."})
    raft_k: int = field(default=8, metadata={"help": "Replies sampled per prompt (the paper's K)."})
    raft_selection: str = field(default="local", metadata={"help": f"Which samples to keep: one of {SELECTIONS}."})
    temperature: float = field(default=0.85, metadata={"help": "Sampling temperature."})
    max_new_tokens: int = field(default=24, metadata={"help": "Max new tokens per reply."})
    sft_epochs: float = field(default=3.0, metadata={"help": "SFT epochs on each iteration's kept pairs."})
    sft_batch_size: int = field(default=8, metadata={"help": "SFT batch size."})
    sft_learning_rate: float = field(default=1e-3, metadata={"help": "SFT learning rate of the policy adapter."})
    eval_prompts: int = field(default=64, metadata={"help": "Held-out prompts scored before/after."})
    eval_samples: int = field(default=4, metadata={"help": "Sampled replies per held-out prompt."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations (large models)."})

    def __post_init__(self) -> None:
        if self.raft_selection not in SELECTIONS:
            raise ValueError(f"raft_selection must be one of {SELECTIONS}, got {self.raft_selection!r}.")
        if self.eval_prompts < 2 or self.eval_samples < 1:
            raise ValueError(
                f"eval_prompts must be >= 2 and eval_samples >= 1 (a standard error over prompts), "
                f"got {self.eval_prompts} and {self.eval_samples}."
            )


def select(
    prompts: list[str], samples: list[list[str]], rewards: list[list[float]], how: str
) -> list[tuple[str, str, float]]:
    """The kept (prompt, reply, reward): the best reply of each prompt (``local``) or the best
    len(prompts) of all samples (``top``: the global top 1/K)."""
    scored = [[(p, reply, r) for reply, r in zip(s, rs)] for p, s, rs in zip(prompts, samples, rewards)]
    if how == "local":
        return [max(group, key=lambda item: item[2]) for group in scored]
    return sorted((item for group in scored for item in group), key=lambda item: -item[2])[: len(prompts)]


def sample_and_score(
    policy: Any, reward: AdapterReward, tokenizer: Any, prompts: list[str], k: int, cfg: RAFTRecipeConfig, desc: str
) -> tuple[list[list[str]], list[list[float]]]:
    """``k`` replies per prompt from the policy adapter and their rewards from the reward adapter."""
    samples = sample_completions(policy, tokenizer, prompts, k, cfg.max_new_tokens, cfg.temperature, desc=desc)
    flat = reward(prompts=[p for p, s in zip(prompts, samples) for _ in s], completions=[c for s in samples for c in s])
    return samples, [flat[i * k : (i + 1) * k] for i in range(len(prompts))]


def fine_tune(
    policy: Any, tokenizer: Any, pairs: list[tuple[str, str, float]], cfg: RAFTRecipeConfig, iteration: int
) -> list[dict]:
    """Stock SFTTrainer on the kept pairs, training the same policy adapter further."""
    args = stage_args(
        SFTConfig,
        os.path.join(cfg.output_dir, "policy"),
        cfg.seed + iteration,
        num_train_epochs=cfg.sft_epochs,
        per_device_train_batch_size=cfg.sft_batch_size,
        learning_rate=cfg.sft_learning_rate,
        max_length=cfg.max_length,
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=1,
    )
    data = datasets.Dataset.from_dict({"prompt": [p for p, _, _ in pairs], "completion": [c for _, c, _ in pairs]})
    trainer = SFTTrainer(model=policy, args=args, train_dataset=data, processing_class=tokenizer)
    attach(trainer, plugins=cfg.sft_plugins, **options_for(cfg.sft_plugins, cfg.plugin_options))
    trainer.train()
    return trainer.state.log_history


def mean(values: list[list[float]]) -> float:
    flat = [v for row in values for v in row]
    return sum(flat) / len(flat)


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = TrlParser([RAFTRecipeConfig]).parse_args_and_config(argv)
    check_options(cfg.plugin_options, cfg.rm_plugins, cfg.sft_plugins)  # before anything loads
    if "lora" not in cfg.rm_plugins.split(",") or "lora" not in cfg.sft_plugins.split(","):
        raise SystemExit("RAFT trains both adapters through LoRA: keep 'lora' in rm_plugins and sft_plugins.")
    set_seed(cfg.seed)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    model_path, tokenizer = load_base(cfg.model_name_or_path, cfg.model_size, cfg.heldout_split)

    split = {"seed": cfg.split_seed, "heldout": cfg.heldout_split}
    rm_data = default_dataset("reward", cfg.taskmaster_file, cfg.context_turns, **split)
    print(f"[raft] stage 1: LoRA reward model on thumbs up/down ({cfg.rm_train_samples or 'all'} rows)", flush=True)
    reward_dir, rm_metrics, rm_logs = train_reward_model(cfg, model_path, tokenizer, rm_data)

    prompts = default_dataset("rloo", cfg.taskmaster_file, cfg.context_turns, **split)
    train_prompts = [
        trim_prompt(tokenizer, p, cfg.max_prompt_tokens) for p in prompts["train"].shuffle(seed=cfg.seed)["prompt"]
    ]
    eval_prompts = [
        trim_prompt(tokenizer, p, cfg.max_prompt_tokens) for p in prompts["test"]["prompt"][: cfg.eval_prompts]
    ]
    lora = LoraOptions(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
    policy, _, reward = policy_with_reward(
        AutoModelForCausalLM.from_pretrained(model_path), tokenizer, reward_dir, lora
    )

    def held_out() -> dict:
        return sampled_rewards(
            policy, tokenizer, reward, eval_prompts, cfg.eval_samples, cfg.max_new_tokens, cfg.seed, cfg.temperature
        )

    eval_before = held_out()
    iteration_rewards, kept_rewards, sft_logs = [], [], []
    for it in range(cfg.raft_iterations):
        start = (it * cfg.raft_prompts) % len(train_prompts)
        batch = (train_prompts * 2)[start : start + cfg.raft_prompts]
        samples, rewards = sample_and_score(
            policy, reward, tokenizer, batch, cfg.raft_k, cfg, f"RAFT {it + 1}: sampling"
        )
        kept = select(batch, samples, rewards, cfg.raft_selection)
        iteration_rewards.append(mean(rewards))
        kept_rewards.append(sum(r for _, _, r in kept) / len(kept))
        print(
            f"[raft] iteration {it + 1}: mean sample reward {iteration_rewards[-1]:.3f}, kept {kept_rewards[-1]:.3f}",
            flush=True,
        )
        offset = sft_logs[-1]["step"] if sft_logs else 0
        sft_logs += [
            {**log, "step": log["step"] + offset}
            for log in fine_tune(policy, tokenizer, kept, cfg, it)
            if "loss" in log
        ]
    eval_after = held_out()
    policy.save_pretrained(os.path.join(cfg.output_dir, "policy"), selected_adapters=[policy.active_adapter])

    metrics = {
        "rm_eval_accuracy": rm_metrics["eval_accuracy"],
        "rm_eval_auc": rm_metrics["eval_auc"],
        **{f"reward_iter_{i + 1}": r for i, r in enumerate(iteration_rewards)},
        "reward_first_iter": iteration_rewards[0],
        "reward_last_iter": iteration_rewards[-1],
        "kept_reward_last_iter": kept_rewards[-1],
        **rl_report(eval_before, eval_after, prefix="eval"),
        "eval_prompts": len(eval_prompts),
    }
    metrics["goal_met"] = metrics["eval_gain_in_std"] >= GOAL_GAIN_IN_STD
    write_model_card(
        os.path.join(cfg.output_dir, "policy"),
        model=policy,
        plugins=cfg.sft_plugins.split(","),
        options=options_for(cfg.sft_plugins, cfg.plugin_options),
        data=training_data(cfg.taskmaster_file),
        metrics={k: v for k, v in metrics.items() if not k.startswith("rm_")},
    )
    info = {"model": model_path, "selection": cfg.raft_selection, "heldout": cfg.heldout_split}
    info["goal"] = f"held-out reward gain >= {GOAL_GAIN_IN_STD} standard deviations of the before-rewards"
    write_summary(cfg.output_dir, "raft", metrics, info)
    plot_curves(
        cfg.output_dir,
        {
            "reward model: loss": (rm_logs, ["loss"]),
            "RAFT: reward per iteration": (
                iteration_log(iteration_rewards, "mean sample reward") + iteration_log(kept_rewards, "kept reward"),
                ["mean sample reward", "kept reward"],
            ),
            "RAFT: SFT loss": (sft_logs, ["loss"]),
        },
    )
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
