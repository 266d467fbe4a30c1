"""Training stages several recipes share, in the package so that a recipe copied out with
``perl-plugins recipes cp`` runs alone (recipes never import each other): the PERL reward model
(stage 1) and RLOO stage (stage 2), and DPO with a LoRA policy. ``cfg`` is any recipe config with
the keys of ``recipes/perl.yaml`` that the stage reads."""

from __future__ import annotations

import os
from typing import Any

import datasets
import torch
from transformers import AutoModelForCausalLM, TrainingArguments
from trl import DPOConfig, DPOTrainer, RLOOConfig, RLOOTrainer

from perl_plugins import attach
from perl_plugins.arguments import options_for
from perl_plugins.device import cpu_settings
from perl_plugins.model_card import training_data, write_model_card
from perl_plugins.plugins.lora import AdapterReward, LoraOptions, lora_config, roles
from perl_plugins.pointwise import pointwise_trainer, reward_classifier
from perl_plugins.progress import quiet_progress
from perl_plugins.reward_model import save_reward_adapter


def train_reward_model(cfg: Any, model_path: str, tokenizer: Any, data: Any) -> tuple[str, dict, list]:
    """Stage 1: LoRA reward model on pointwise thumbs up/down; returns (adapter dir, metrics, logs)."""
    train, test = data["train"].shuffle(seed=cfg.seed), data["test"]
    if cfg.rm_train_samples:
        train = train.select(range(min(cfg.rm_train_samples, len(train))))
    if cfg.rm_eval_samples:
        test = test.select(range(min(cfg.rm_eval_samples, len(test))))
    args = TrainingArguments(
        output_dir=os.path.join(cfg.output_dir, "reward_model"),
        num_train_epochs=cfg.rm_epochs,
        max_steps=cfg.rm_max_steps,
        per_device_train_batch_size=cfg.rm_batch_size,
        per_device_eval_batch_size=cfg.rm_batch_size,
        learning_rate=cfg.rm_learning_rate,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        **cpu_settings(),  # CPU and fp32 without an accelerator
        seed=cfg.seed,
    )
    trainer = pointwise_trainer(reward_classifier(model_path), tokenizer, args, train, test, max_length=cfg.max_length)
    options = {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, **options_for(cfg.rm_plugins, cfg.plugin_options)}
    attach(trainer, plugins=cfg.rm_plugins, **options)
    quiet_progress(trainer)
    trainer.train()
    metrics = trainer.evaluate()
    adapter_dir = os.path.join(cfg.output_dir, "reward_adapter")
    save_reward_adapter(trainer.model, adapter_dir, trainer.model.active_adapter)
    write_model_card(adapter_dir, trainer=trainer, metrics=metrics, data=training_data(cfg.taskmaster_file))
    return adapter_dir, metrics, trainer.state.log_history


def sample_rewards(trainer: RLOOTrainer, reward: AdapterReward, prompts: list[str], cfg: Any) -> float:
    """Mean reward of completions the current policy samples for ``prompts`` (held out)."""
    tokenizer = trainer.processing_class
    model = trainer.model
    rewards = []
    with roles(trainer).use("policy"), torch.no_grad():
        for start in range(0, len(prompts), 8):
            chunk = prompts[start : start + 8]
            batch = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left").to(model.device)
            out = model.generate(
                **batch,
                max_new_tokens=cfg.rl_max_completion_length,
                do_sample=True,
                temperature=1.0,
                pad_token_id=tokenizer.pad_token_id,
            )
            completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            rewards.extend(reward(prompts=chunk, completions=completions))
    return sum(rewards) / len(rewards)


def run_rl(cfg: Any, model_path: str, tokenizer: Any, reward_dir: str, data: Any) -> tuple[dict, list]:
    """Stage 2: RLOO with a LoRA policy; the reward adapter lives on the same base object."""
    prompts = list(dict.fromkeys(data["train"]["prompt"]))[: cfg.rl_prompts]
    eval_prompts = list(dict.fromkeys(data["test"]["prompt"]))[: cfg.rl_eval_prompts]
    args = RLOOConfig(
        output_dir=os.path.join(cfg.output_dir, "policy"),
        max_steps=cfg.rl_max_steps,
        per_device_train_batch_size=cfg.rl_batch_size,
        num_generations=cfg.rl_num_generations,
        max_completion_length=cfg.rl_max_completion_length,
        learning_rate=cfg.rl_learning_rate,
        beta=cfg.rl_beta,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        **cpu_settings(),  # CPU and fp32 without an accelerator
        seed=cfg.seed,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path)
    reward = AdapterReward(reward_dir)
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        peft_config=lora_config(model, LoraOptions(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)),
    )
    attach(trainer, plugins=cfg.rl_plugins, **options_for(cfg.rl_plugins, cfg.plugin_options))
    quiet_progress(trainer)
    before = sample_rewards(trainer, reward, eval_prompts, cfg)
    trainer.train()
    after = sample_rewards(trainer, reward, eval_prompts, cfg)
    trainer.save_model(args.output_dir)
    metrics = {"rl_reward_before": before, "rl_reward_after": after}
    write_model_card(args.output_dir, trainer=trainer, metrics=metrics, data=training_data(cfg.taskmaster_file))
    return metrics, trainer.state.log_history


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
    quiet_progress(trainer)
    trainer.train()
    return trainer.evaluate(), trainer.state.log_history, trainer


def save_policy(trainer: Any, output_dir: str, metrics: dict[str, Any], taskmaster_file: str | None) -> str:
    """``trainer.save_model`` plus its model card (base fingerprint, plugins, options, data, metrics)."""
    trainer.save_model(output_dir)
    write_model_card(output_dir, trainer=trainer, metrics=metrics, data=training_data(taskmaster_file))
    return output_dir
