"""Shared recipe plumbing (``perl_plugins.training.recipe_kit``): base + tokenizer, stage
arguments, taking N rows."""

from __future__ import annotations

import copy
from types import SimpleNamespace

from datasets import Dataset
from transformers import TrainingArguments
from trl import DPOConfig, RewardConfig

from perl_plugins.models.embedded import resolve_model
from perl_plugins.training.device import cpu_settings
from perl_plugins.training.recipe_kit import load_base, padded_tokenizer, reward_stage_args, stage_args, take


def test_load_base_resolves_the_model_and_pads(tokenizer):
    path, loaded = load_base(None, "tiny")
    assert path == resolve_model(None, "tiny")
    assert loaded.get_vocab() == tokenizer.get_vocab() and loaded.pad_token == tokenizer.pad_token


def test_a_tokenizer_without_pad_token_pads_with_eos(tokenizer, tmp_path):
    bare = copy.deepcopy(tokenizer)
    bare.pad_token = None
    bare.save_pretrained(tmp_path)
    loaded = padded_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == tokenizer.eos_token


def test_stage_args_defaults_and_overrides(tmp_path):
    args = stage_args(TrainingArguments, str(tmp_path), 3, learning_rate=0.5)
    assert (args.output_dir, args.seed, args.learning_rate) == (str(tmp_path), 3, 0.5)
    assert args.logging_steps == 5 and args.save_strategy == "no" and args.report_to in ([], "none", ["none"])
    for key, value in cpu_settings().items():  # CPU and fp32 where there is no accelerator
        assert getattr(args, key) == value
    dpo = stage_args(DPOConfig, str(tmp_path), 0, logging_steps=1, beta=0.2)
    assert isinstance(dpo, DPOConfig) and dpo.logging_steps == 1 and dpo.beta == 0.2


def test_take():
    rows = Dataset.from_dict({"x": list(range(5))})
    assert take(rows, 0)["x"] == rows["x"]
    assert take(rows, 2)["x"] == [0, 1]
    assert take(rows, 9)["x"] == rows["x"]


def test_reward_stage_args_read_the_rm_keys(tmp_path):
    cfg = SimpleNamespace(
        output_dir=str(tmp_path), seed=4, rm_epochs=2.0, rm_max_steps=7, rm_batch_size=3, rm_learning_rate=0.01
    )
    args = reward_stage_args(cfg, RewardConfig, max_length=64)
    assert isinstance(args, RewardConfig) and args.output_dir == str(tmp_path / "reward_model")
    assert (args.seed, args.num_train_epochs, args.max_steps, args.learning_rate, args.max_length) == (
        4,
        2.0,
        7,
        0.01,
        64,
    )
    assert args.per_device_train_batch_size == args.per_device_eval_batch_size == 3
