"""RRHF recipe (Yuan et al. 2023): rank k scored responses per prompt by length-normalised
log-probability, plus cross-entropy on the best one. A stock ``transformers.Trainer`` on the causal
LM with the ``lora`` and ``rrhf`` plugins: the stock causal-LM loss is L_ft (labels = the best
response), the ``rrhf`` plugin adds w * L_rank from the same logits. No forked trainer.

    python recipes/rrhf.py --config recipes/rrhf.yaml                       # embedded default, CPU, <10 min
    python recipes/rrhf.py --config recipes/rrhf.yaml --rrhf_weight 2       # any key can be overridden
    python recipes/rrhf.py --config recipes/rrhf.yaml --policy_samples 2    # + replies sampled, scored by a reward adapter
    python recipes/rrhf.py --config recipes/rrhf.yaml --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct

Groups: every Taskmaster coffee context with at least two distinct rated replies; score = the
thumbs label (1 up, 0 down; ties give no ranking pair). With ``policy_samples > 0`` a LoRA reward
model is trained first (as PERL stage 1, ``rm_*`` keys) and each training group gets that many
replies sampled from the initial policy, scored sigmoid(reward) = the reward model's P(thumbs up),
which sits on the thumbs' 0..1 scale. Summary: on held-out groups (the leak-free test split;
``heldout_split: validation`` carves one out of train instead, for tuning) and a slice of training
groups, the share of differently-scored pairs whose better reply has the higher length-normalised
log-prob (ties 1/2), before and after training; held-out standard errors are clustered by group
(its pairs share replies), and the gain's is paired (the same pairs before and after). Goal
(default YAML): held-out gain > 2 standard errors. Writes OUTPUT_DIR/summary.json, curves.png.
"""

from __future__ import annotations

import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed
from trl import TrlParser

from perl_plugins import attach
from perl_plugins.data.defaults import default_dataset
from perl_plugins.data.text import trim_prompt
from perl_plugins.host.arguments import check_options, options_for, parse_plugin_options
from perl_plugins.models.adapters import AdapterReward
from perl_plugins.models.card import training_data, write_model_card
from perl_plugins.models.logprobs import response_logps
from perl_plugins.models.reward import load_reward_adapter
from perl_plugins.models.roles import Roles
from perl_plugins.plugins.rrhf import RRHFCollator, tokenize_groups
from perl_plugins.training.heldout import before_after
from perl_plugins.training.recipe_kit import load_base, stage_args, take, train_reward_model
from perl_plugins.training.reporting import plot_curves, write_summary
from perl_plugins.training.sampling import sample_completions

GOAL_GAIN_IN_SE = 2.0  # the held-out ranking-accuracy gain must exceed this many standard errors


@dataclass
class RRHFRecipeConfig:
    output_dir: str = field(default="outputs/rrhf", metadata={"help": "Where the adapter, summary and curves go."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model; default: embedded."})
    model_size: str = field(default="demo", metadata={"help": "Embedded default size when no model is given."})
    taskmaster_file: str | None = field(default=None, metadata={"help": "Thumbs up/down file; default: coffee."})
    plugins: str = field(default="lora,rrhf", metadata={"help": "Plugins on the trainer (rrhf required; fp8...)."})
    plugin_options: str = field(default="{}", metadata={"help": "Plugin options (a mapping in YAML, JSON on the CLI)."})
    rrhf_weight: float = field(default=1.0, metadata={"help": "Weight w of the ranking loss (L = w*L_rank + L_ft)."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the leak-free train/test split (the embedded base saw split 0's train)."}
    )
    heldout_split: str = field(
        default="test",
        metadata={
            "help": "Groups the summary scores: test, validation (carved from train: tuning) or fold:I/K (cross-validation)."
        },
    )
    context_turns: int = field(default=4, metadata={"help": "Keep the last N dialog turns of each context."})
    max_prompt_tokens: int = field(default=128, metadata={"help": "Keep the latest prompt tokens up to this."})
    max_length: int = field(default=192, metadata={"help": "Max tokens of prompt + response."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (policy and reward adapters)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    max_responses: int = field(default=4, metadata={"help": "Training responses per group: best and worst rated kept."})
    train_groups: int = field(default=0, metadata={"help": "Training groups (0: all)."})
    eval_groups: int = field(default=0, metadata={"help": "Held-out groups (0: all)."})
    train_eval_groups: int = field(default=64, metadata={"help": "Training groups also scored before/after."})
    epochs: float = field(default=3.0, metadata={"help": "Epochs (RRHF's scripts: 3)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps (overrides epochs if > 0)."})
    batch_size: int = field(default=2, metadata={"help": "Groups per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the LoRA adapter."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations (large models)."})
    # Optional policy samples scored by a reward adapter (PERL stage 1 keys).
    policy_samples: int = field(default=0, metadata={"help": "Replies sampled per training group (0: thumbs only)."})
    sample_max_new_tokens: int = field(default=24, metadata={"help": "Max new tokens per sampled reply."})
    sample_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    rm_plugins: str = field(default="lora", metadata={"help": "Reward-model plugins (lora required; grm...)."})
    rm_train_samples: int = field(default=800, metadata={"help": "Reward-model training rows (0: all)."})
    rm_eval_samples: int = field(default=0, metadata={"help": "Reward-model held-out rows (0: all)."})
    rm_epochs: float = field(default=1.0, metadata={"help": "Reward-model epochs."})
    rm_max_steps: int = field(default=-1, metadata={"help": "Reward-model steps (overrides epochs if > 0)."})
    rm_batch_size: int = field(default=16, metadata={"help": "Reward-model batch size."})
    rm_learning_rate: float = field(default=1e-3, metadata={"help": "Reward-model learning rate."})


def scored_groups(
    rows: datasets.Dataset, max_responses: int, tokenizer: Any, max_prompt_tokens: int
) -> datasets.Dataset:
    """Pointwise thumbs rows -> one group per context with >= 2 distinct replies (score = mean
    thumbs of that reply). Over ``max_responses``, the best and the worst rated are kept, which
    keeps the pairs that carry a ranking signal."""
    labels: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for prompt, completion, label in zip(rows["prompt"], rows["completion"], rows["label"]):
        labels[prompt][completion].append(label)
    groups = {"prompt": [], "responses": [], "scores": []}
    for prompt, replies in labels.items():
        if len(replies) < 2:
            continue
        ranked = sorted(replies.items(), key=lambda item: -sum(item[1]) / len(item[1]))  # stable: data order on ties
        if len(ranked) > max_responses:
            ranked = ranked[: (max_responses + 1) // 2] + ranked[len(ranked) - max_responses // 2 :]
        groups["prompt"].append(trim_prompt(tokenizer, prompt, max_prompt_tokens))
        groups["responses"].append([reply for reply, _ in ranked])
        groups["scores"].append([sum(votes) / len(votes) for _, votes in ranked])
    return datasets.Dataset.from_dict(groups)


def add_policy_samples(
    cfg: RRHFRecipeConfig, model_path: str, tokenizer: Any, groups: datasets.Dataset
) -> tuple[datasets.Dataset, dict, list]:
    """Train a reward adapter (PERL stage 1), then add ``policy_samples`` replies per group sampled
    from the initial policy (the base), scored sigmoid(reward) = the reward model's P(thumbs up)."""
    rm_data = default_dataset(
        "reward", cfg.taskmaster_file, cfg.context_turns, seed=cfg.split_seed, heldout=cfg.heldout_split
    )
    reward_dir, rm_metrics, rm_logs = train_reward_model(cfg, model_path, tokenizer, rm_data)
    model = load_reward_adapter(AutoModelForCausalLM.from_pretrained(model_path), reward_dir, adapter_name="reward")
    roles = Roles(model, {"policy": None, "reward": "reward"})  # the initial policy is the bare base
    with roles.use("policy"):
        samples = sample_completions(
            model,
            tokenizer,
            groups["prompt"],
            cfg.policy_samples,
            cfg.sample_max_new_tokens,
            cfg.sample_temperature,
            desc="Sampling policy replies",
        )
    reward = AdapterReward(reward_dir)
    reward.bind(roles, tokenizer)
    rows = groups.to_dict()
    for i, (prompt, extra) in enumerate(zip(rows["prompt"], tqdm(samples, desc="Scoring policy replies"))):
        scores = torch.tensor(reward(prompts=[prompt] * len(extra), completions=extra)).sigmoid().tolist()
        rows["responses"][i] = rows["responses"][i] + extra
        rows["scores"][i] = rows["scores"][i] + scores
    metrics = {"rm_eval_accuracy": rm_metrics["eval_accuracy"], "rm_eval_auc": rm_metrics["eval_auc"]}
    return datasets.Dataset.from_dict(rows), metrics, rm_logs


def ranking_accuracy(
    model: torch.nn.Module, collator: RRHFCollator, groups: datasets.Dataset, batch_size: int
) -> float:
    """Share of differently-scored pairs (within a group) whose better reply has the higher
    length-normalised log-prob (ties count one half)."""
    wins, pairs = group_ranking(model, collator, groups, batch_size)
    return float(wins.sum() / pairs.sum()) if pairs.sum() else math.nan


def group_ranking(
    model: torch.nn.Module, collator: RRHFCollator, groups: datasets.Dataset, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per group: (differently-scored pairs whose better reply has the higher length-normalised
    log-prob, ties 1/2; differently-scored pairs)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    wins: list[float] = []
    pairs: list[int] = []
    with torch.no_grad():
        for start in range(0, len(groups), batch_size):
            batch = collator([groups[i] for i in range(start, min(start + batch_size, len(groups)))])
            ids, mask = batch["input_ids"].to(device), batch["rrhf_response_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
            p = (response_logps(logits, ids, mask) / mask[:, 1:].sum(-1)).cpu()
            scores, group = batch["rrhf_scores"], batch["rrhf_groups"]
            pair = (group[:, None] == group[None, :]) & (scores[:, None] > scores[None, :])  # i better than j
            diff = p[:, None] - p[None, :]
            won = (diff > 0) + 0.5 * (diff == 0)
            for g in range(int(group.max()) + 1):
                mine = pair & (group[:, None] == g)
                wins.append(float(won[mine].sum()))
                pairs.append(int(mine.sum()))
    model.train(was_training)
    return np.asarray(wins), np.asarray(pairs)


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = TrlParser([RRHFRecipeConfig]).parse_args_and_config(argv)
    check_options(cfg.plugin_options, cfg.rm_plugins, cfg.plugins)  # before anything loads
    if "rrhf" not in cfg.plugins.split(","):
        raise SystemExit("The RRHF loss is the 'rrhf' plugin: keep it in plugins.")
    set_seed(cfg.seed)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    model_path, tokenizer = load_base(cfg.model_name_or_path, cfg.model_size, cfg.heldout_split)
    data = default_dataset(
        "reward", cfg.taskmaster_file, cfg.context_turns, seed=cfg.split_seed, heldout=cfg.heldout_split
    )
    train = scored_groups(data["train"], cfg.max_responses, tokenizer, cfg.max_prompt_tokens).shuffle(seed=cfg.seed)
    test = scored_groups(data["test"], len(data["test"]), tokenizer, cfg.max_prompt_tokens)  # every held-out pair
    train, test = take(train, cfg.train_groups), take(test, cfg.eval_groups)
    metrics: dict[str, float] = {}
    rm_logs: list = []
    if cfg.policy_samples:
        print(f"[rrhf] reward adapter, then {cfg.policy_samples} policy replies per group", flush=True)
        train, rm_metrics, rm_logs = add_policy_samples(cfg, model_path, tokenizer, train)
        metrics.update(rm_metrics)
    print(f"[rrhf] {len(train)} training groups, {len(test)} held out; stock Trainer + {cfg.plugins}", flush=True)

    train_tok = tokenize_groups(train, tokenizer, cfg.max_length)
    test_tok = tokenize_groups(test, tokenizer, cfg.max_length)
    train_probe = train_tok.select(range(min(cfg.train_eval_groups, len(train_tok))))
    args = stage_args(
        TrainingArguments,
        os.path.join(cfg.output_dir, "policy"),
        cfg.seed,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    collator = RRHFCollator(tokenizer.pad_token_id)
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model_path),
        args=args,
        train_dataset=train_tok,
        data_collator=collator,
        processing_class=tokenizer,
    )
    options = {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "rrhf_weight": cfg.rrhf_weight}
    attach(
        trainer,
        plugins=cfg.plugins,
        **options_for(cfg.plugins, {**parse_plugin_options(cfg.plugin_options), **options}),
    )
    wins_before, pairs = group_ranking(trainer.model, collator, test_tok, cfg.batch_size)
    train_before = ranking_accuracy(trainer.model, collator, train_probe, cfg.batch_size)
    trainer.train()
    trainer.save_model(args.output_dir)
    logs = trainer.state.log_history
    wins_after, _ = group_ranking(trainer.model, collator, test_tok, cfg.batch_size)
    rated = pairs > 0  # a group of equal scores has no pair to rank
    per_group = [wins[rated] / pairs[rated] for wins in (wins_before, wins_after)]
    held_out = before_after("eval_ranking_accuracy", *per_group, weights=pairs[rated])
    metrics.update(
        {
            **held_out,
            "eval_groups": int(rated.sum()),
            "eval_pairs": int(pairs.sum()),
            "goal_met": held_out["eval_ranking_accuracy_gain"]
            > GOAL_GAIN_IN_SE * held_out["eval_ranking_accuracy_gain_se"],
            "train_ranking_accuracy_before": train_before,
            "train_ranking_accuracy_after": ranking_accuracy(trainer.model, collator, train_probe, cfg.batch_size),
            "train_loss": next((log["train_loss"] for log in reversed(logs) if "train_loss" in log), math.nan),
        }
    )
    write_model_card(args.output_dir, trainer=trainer, metrics=metrics, data=training_data(cfg.taskmaster_file))
    info = {"model": model_path, "plugins": cfg.plugins, "groups": len(train), "heldout": cfg.heldout_split}
    info["goal"] = f"held-out ranking-accuracy gain > {GOAL_GAIN_IN_SE:g} standard errors (paired)"
    write_summary(cfg.output_dir, "rrhf", metrics, info)
    panels = {"RRHF: loss": (logs, ["loss", "base_loss", "rrhf_rank_loss"])}
    if rm_logs:
        panels["reward model: loss"] = (rm_logs, ["loss"])
    plot_curves(cfg.output_dir, panels)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
