"""Training stages several recipes share, in the package so that a recipe copied out with
``perl-plugins recipes cp`` runs alone (recipes never import each other): the PERL reward model
(stage 1) and RLOO stage (stage 2) with held-out reward before/after, and DPO with a LoRA policy. ``cfg`` is any recipe config with
the keys of ``recipes/perl.yaml`` that the stage reads."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, TypeVar

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
from trl import DPOConfig, DPOTrainer, RLOOConfig, RLOOTrainer

from perl_plugins import attach
from perl_plugins.data.defaults import default_dataset
from perl_plugins.host.arguments import options_for
from perl_plugins.models.adapters import AdapterReward, LoraOptions, lora_config
from perl_plugins.models.card import training_data, write_model_card
from perl_plugins.models.embedded import TUNE_BASE_COMMAND, read_validation_texts, resolve_model
from perl_plugins.models.reward import save_reward_adapter
from perl_plugins.models.roles import roles
from perl_plugins.training.device import cpu_settings
from perl_plugins.training.head_probe import probe_reward_head
from perl_plugins.training.pointwise import balance_labels, pointwise_trainer, reward_classifier
from perl_plugins.training.progress import quiet_progress
from perl_plugins.training.sampling import (
    TurnReward,
    policy_with_reward,
    sampled_rewards,
    stop_at_line_end,
)

logger = logging.getLogger(__name__)

ArgsT = TypeVar("ArgsT", bound=TrainingArguments)

# Stage settings recipes other than PERL's may lack (PERL's YAML declares each with this default).
STAGE_DEFAULTS: dict[str, Any] = {
    "rm_lr_scheduler": "linear",
    "rm_warmup_ratio": 0.0,
    "split_seed": 0,
    "rl_eval_samples": 4,
    "rl_full_learning_rate": 5e-5,
    "rl_stop_at_newline": False,
    "rm_balance_classes": False,
    "rm_head_init": "random",
}
RM_HEAD_INITS = ("random", "probe")


def reward_trainer(cfg: Any, model_path: str, tokenizer, train, test, plugins: str | None = None):
    """Stage 1's stock ``Trainer`` (BCE on the reward logit), plugins attached, not yet trained.

    ``plugins`` defaults to ``cfg.rm_plugins``; ``""`` fine-tunes the whole model (the comparison
    PERL draws: LoRA reward models on par with full fine-tuning at the same budget)."""
    plugins = cfg.rm_plugins if plugins is None else plugins
    head_init = check_head_init(cfg)  # refused before the model loads
    if _setting(cfg, "rm_balance_classes"):
        train = balance_labels(train, cfg.seed)
    args = reward_stage_args(
        cfg,
        TrainingArguments,
        lr_scheduler_type=_setting(cfg, "rm_lr_scheduler"),
        warmup_steps=_setting(cfg, "rm_warmup_ratio"),  # a float below 1 is a share of the steps
        train_sampling_strategy="group_by_length",  # batches of like lengths: far less padding to compute
    )
    trainer = pointwise_trainer(reward_classifier(model_path), tokenizer, args, train, test, max_length=cfg.max_length)
    names = [name for name in plugins.split(",") if name]
    options = options_for(names, cfg.plugin_options)
    if "lora" in names:
        options.update(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
    trainer = quiet_progress(attach(trainer, plugins=names, **options))
    if head_init == "probe":  # after attach: the head the plugins leave (GRM's MLP, LoRA's trainable copy)
        report = probe_reward_head(trainer, train["dialog"] if "dialog" in train.column_names else None)
        logger.info("reward head probed: C %.3g, cross-validated AUC %.3f", report["probe_C"], report["probe_cv_auc"])
    return trainer


def check_head_init(cfg: Any) -> str:
    """``cfg``'s reward-head initialisation, refused before any training if unknown."""
    head_init = _setting(cfg, "rm_head_init")
    if head_init not in RM_HEAD_INITS:
        raise ValueError(f"rm_head_init must be one of {RM_HEAD_INITS}, got {head_init!r}.")
    return head_init


def train_reward_model(cfg: Any, model_path: str, tokenizer, data) -> tuple[str, dict, list]:
    """Stage 1: LoRA reward model on pointwise thumbs up/down; returns (adapter dir, metrics, logs)."""
    train, test = data["train"].shuffle(seed=cfg.seed), data["test"]
    train, test = take(train, cfg.rm_train_samples), take(test, cfg.rm_eval_samples)
    trainer = reward_trainer(cfg, model_path, tokenizer, train, test)
    trainer.train()
    metrics = trainer.evaluate()
    adapter_dir = os.path.join(cfg.output_dir, "reward_adapter")
    save_reward_adapter(trainer.model, adapter_dir, trainer.model.active_adapter)
    write_model_card(adapter_dir, trainer=trainer, metrics=metrics, data=training_data(cfg.taskmaster_file))
    return adapter_dir, metrics, trainer.state.log_history


def held_out_rewards(model, tokenizer, reward: AdapterReward, prompts: list[str], cfg: Any) -> dict[str, Any]:
    """``rl_eval_samples`` sampled completions per held-out prompt from the model's active policy,
    scored by the reward adapter: :func:`sampled_rewards` with the RL stage's settings."""
    return sampled_rewards(
        model,
        tokenizer,
        reward,
        prompts,
        _setting(cfg, "rl_eval_samples"),
        cfg.rl_max_completion_length,
        seed=cfg.seed,
        stop_at_newline=_setting(cfg, "rl_stop_at_newline"),
    )


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
    cfg: Any,
    model_path: str,
    tokenizer,
    reward_dir: str,
    data: Any = None,
    policy: str = "lora",
    callbacks: list | None = None,
) -> tuple[dict, list, dict]:
    """Stage 2: RLOO from ``model_path`` scored by the reward adapter at ``reward_dir``; returns
    (metrics, logs, {"before": ..., "after": ...} held-out rewards and samples).

    ``policy="lora"`` is PERL: a LoRA policy on the same base object as the reward adapter and the
    reference (adapters off). ``policy="full"`` fine-tunes every weight (the comparison PERL draws):
    the reward adapter then sits on a separate frozen copy of the base. ``callbacks``: extra
    ``TrainerCallback`` s (e.g. a benchmark's probes at checkpoints)."""
    if data is None:
        data = default_dataset("rloo", cfg.taskmaster_file, cfg.context_turns, seed=_setting(cfg, "split_seed"))
    prompts = list(dict.fromkeys(data["train"]["prompt"]))[: cfg.rl_prompts]
    eval_prompts = list(dict.fromkeys(data["test"]["prompt"]))[: cfg.rl_eval_prompts]
    args = stage_args(
        RLOOConfig,
        os.path.join(cfg.output_dir, "policy" if policy == "lora" else "policy_full"),
        cfg.seed,
        max_steps=cfg.rl_max_steps,
        per_device_train_batch_size=cfg.rl_batch_size,
        num_generations=cfg.rl_num_generations,
        max_completion_length=cfg.rl_max_completion_length,
        learning_rate=cfg.rl_learning_rate if policy == "lora" else _setting(cfg, "rl_full_learning_rate"),
        beta=cfg.rl_beta,
        logging_steps=1,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path)
    # Scored as trained: texts cut to the reward model's max_length, oldest context first.
    if _setting(cfg, "rl_stop_at_newline"):
        stop_at_line_end(model, tokenizer)
        reward = TurnReward(reward_dir, max_length=cfg.max_length)
    else:
        reward = AdapterReward(reward_dir, max_length=cfg.max_length)
    if policy == "lora":
        peft_config = lora_config(model, LoraOptions(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha))
    else:
        frozen_base = AutoModelForCausalLM.from_pretrained(model_path)
        policy_with_reward(frozen_base, tokenizer, reward_dir, LoraOptions(lora_r=cfg.lora_r), reward)
        peft_config = None
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if policy == "lora":
        quiet_progress(attach(trainer, plugins=cfg.rl_plugins, **options_for(cfg.rl_plugins, cfg.plugin_options)))
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
    write_model_card(args.output_dir, trainer=trainer, metrics=metrics, data=training_data(cfg.taskmaster_file))
    return metrics, logs, {"before": before, "after": after}


def run_rl(cfg, model_path: str, tokenizer, reward_dir: str, data: Any = None) -> tuple[dict, list]:
    """Stage 2 with a LoRA policy, as other recipes reuse it: (metrics, logs); see :func:`rl_stage`."""
    metrics, logs, _ = rl_stage(cfg, model_path, tokenizer, reward_dir, data)
    return metrics, logs


def _setting(cfg: Any, name: str) -> Any:
    """``cfg.name``, or the stage default where a recipe reusing these stages has no such key."""
    return getattr(cfg, name, STAGE_DEFAULTS[name])


def write_samples(output_dir: str, evals: dict[str, dict[str, Any]], per_side: int = 6) -> Path:
    """OUTPUT_DIR/samples.md: held-out completions before and after RL, side by side, with mean
    lengths, so that what the RL did to the text (reward hacking included) is visible."""
    before, after = evals["before"], evals["after"]
    lines = [
        "# Held-out samples before and after RL",
        "",
        (
            f"Mean completion length (characters): before {before['mean_length']:.1f}, after {after['mean_length']:.1f}. "
            f"Mean reward: before {before['mean']:.3f} ± {before['se']:.3f}, after {after['mean']:.3f} ± {after['se']:.3f}."
        ),
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


def train_dpo(
    model_path: str,
    tokenizer: Any,
    train: datasets.Dataset,
    test: datasets.Dataset,
    args: DPOConfig,
    lora: LoraOptions,
    plugins: str = "lora",
    plugin_options: dict | str | None = None,
) -> tuple[dict[str, float], list[dict[str, float]], DPOTrainer]:
    """DPO with a LoRA policy (reference = adapters off); returns (eval metrics, logs, trainer)."""
    trainer = dpo_trainer(model_path, tokenizer, train, test, args, lora, plugins, plugin_options)
    trainer.train()
    return trainer.evaluate(), trainer.state.log_history, trainer


def dpo_trainer(
    model_path: str,
    tokenizer: Any,
    train: datasets.Dataset,
    test: datasets.Dataset,
    args: DPOConfig,
    lora: LoraOptions,
    plugins: str = "lora",
    plugin_options: dict | str | None = None,
) -> DPOTrainer:
    """The stock ``DPOTrainer`` of :func:`train_dpo`, plugins attached, not yet trained."""
    model = AutoModelForCausalLM.from_pretrained(model_path)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=lora_config(model, lora),
    )
    attach(trainer, plugins=plugins, **options_for(plugins, plugin_options))
    return quiet_progress(trainer)


def save_policy(trainer: Any, output_dir: str, metrics: dict[str, Any], taskmaster_file: str | None) -> str:
    """``trainer.save_model`` plus its model card (base fingerprint, plugins, options, data, metrics)."""
    trainer.save_model(output_dir)
    write_model_card(output_dir, trainer=trainer, metrics=metrics, data=training_data(taskmaster_file))
    return output_dir


def load_base(name_or_path: str | None, size: str = "demo", heldout: str = "test") -> tuple[str, Any]:
    """The base model's path (:func:`~perl_plugins.models.embedded.resolve_model`: a path, hub id
    or alias; ``None``: the embedded default of ``size``) and its :func:`padded_tokenizer`. Warns
    when a run scored on ``heldout="validation"`` uses a base pre-trained on those rows' texts."""
    model_path = resolve_model(name_or_path, size)
    check_tuning_base(model_path, heldout)
    return model_path, padded_tokenizer(model_path)


def check_tuning_base(model_path: str, heldout: str) -> None:
    """Warn (see :func:`~perl_plugins.models.embedded.read_validation_texts`) when validation
    scores would come from a base that has read the validation rows."""
    if heldout == "validation" and read_validation_texts(model_path):
        logger.warning(
            "scoring the validation split with %s, pre-trained on these rows' texts: its scores run high "
            "(README: 'Does it learn?'). To choose settings, build a base that has not read them (%s) "
            "and pass that directory as the model.",
            model_path,
            TUNE_BASE_COMMAND,
        )


def padded_tokenizer(model_path: str) -> Any:
    """The model's tokenizer, padding with EOS where it declares no pad token (batches pad)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stage_args(config_class: type[ArgsT], output_dir: str, seed: int, **settings: Any) -> ArgsT:
    """``config_class`` (``TrainingArguments`` or a trl config) as a recipe stage runs it: no
    checkpoints (the recipe saves what it keeps), no report backend, a log line every 5 steps,
    CPU and fp32 without an accelerator; ``settings`` add to or override these."""
    defaults = {"logging_steps": 5, "save_strategy": "no", "report_to": "none", **cpu_settings()}
    return config_class(output_dir=output_dir, seed=seed, **{**defaults, **settings})


def take(dataset: datasets.Dataset, n: int) -> datasets.Dataset:
    """The first ``n`` rows of ``dataset`` (all of them when ``n`` is 0 or more than it has)."""
    return dataset.select(range(min(n, len(dataset)))) if n else dataset


def reward_stage_args(cfg: Any, config_class: type[ArgsT], **settings: Any) -> ArgsT:
    """:func:`stage_args` of a reward-model stage from the recipe's ``rm_*`` keys (epochs, steps,
    batch size, learning rate), writing to OUTPUT_DIR/reward_model."""
    return stage_args(
        config_class,
        os.path.join(cfg.output_dir, "reward_model"),
        cfg.seed,
        num_train_epochs=cfg.rm_epochs,
        max_steps=cfg.rm_max_steps,
        per_device_train_batch_size=cfg.rm_batch_size,
        per_device_eval_batch_size=cfg.rm_batch_size,
        learning_rate=cfg.rm_learning_rate,
        **settings,
    )
