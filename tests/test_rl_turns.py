"""The PERL RL stage samples and scores one agent turn as the reward model was trained on it: a
completion ends at its line's end, and the reward reads at most the reward model's max_length tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from perl_plugins.recipes import perl
from transformers import AutoModelForCausalLM, AutoTokenizer

from perl_plugins.data.defaults import default_dataset
from perl_plugins.models.embedded import resolve_model
from perl_plugins.models.reward import load_reward_adapter, score_texts
from perl_plugins.training import recipe_kit
from perl_plugins.training.sampling import (
    TurnReward,
    first_line,
    line_end_ids,
    sample_completions,
    stop_at_line_end,
)


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model(None, "tiny")


def newline_lm(model_path: str, tokenizer) -> torch.nn.Module:
    """A causal LM that always says a newline (its head: zero weights, bias on the newline token)."""
    model = AutoModelForCausalLM.from_pretrained(model_path)
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[line_end_ids(tokenizer)[0]] = 50.0
    model.lm_head = head
    return model


def test_generation_stops_at_the_end_of_the_line(model_path):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = newline_lm(model_path, tokenizer)
    prompts = ["User: a latte please\nAgent:"]
    assert sample_completions(model, tokenizer, prompts, 2, max_new_tokens=6) == [["\n" * 6] * 2]
    stop_at_line_end(model, tokenizer)
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
    assert sample_completions(model, tokenizer, prompts, 2, max_new_tokens=6) == [["\n"] * 2]


def test_turn_reward_rates_the_first_line_only():
    reward = TurnReward("unused: texts only")
    assert first_line(" Sure.\nUser: and a tea") == " Sure."
    texts = reward.texts(["User: hi\nAgent:"] * 2, [" Sure.\nUser: more", " Ok."])
    assert texts == ["User: hi\nAgent: Sure.", "User: hi\nAgent: Ok."]


def test_rl_stage_scores_at_most_max_length_tokens(model_path, tmp_path):
    """Held-out rewards are the reward adapter's scores of the last ``max_length`` tokens, as in
    training (tokenize_pointwise cuts the oldest context), not of the whole, longer text."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cfg = dataclasses.replace(
        perl.PerlConfig(),
        output_dir=str(tmp_path),
        model_size="tiny",
        max_length=24,
        rm_max_steps=1,
        rm_train_samples=16,
        rm_eval_samples=8,
        rl_max_steps=1,
        rl_prompts=4,
        rl_eval_prompts=4,
        rl_eval_samples=2,
        rl_batch_size=4,
        rl_num_generations=2,
        rl_max_completion_length=6,
        rl_stop_at_newline=True,
    )
    data = default_dataset("reward", None, cfg.context_turns)
    reward_dir, _, _ = recipe_kit.train_reward_model(cfg, model_path, tokenizer, data)
    _, _, evals = recipe_kit.rl_stage(cfg, model_path, tokenizer, reward_dir)
    prompts, completions, rewards = zip(*evals["before"]["samples"])
    texts = [p + c for p, c in zip(prompts, completions)]
    assert all(len(tokenizer(t)["input_ids"]) > cfg.max_length for t in texts)  # every text gets cut
    assert all("\n" not in c for c in completions)
    scorer = load_reward_adapter(AutoModelForCausalLM.from_pretrained(model_path), reward_dir).eval()
    cut = score_texts(scorer, tokenizer, texts, max_length=cfg.max_length).numpy()
    whole = score_texts(scorer, tokenizer, texts).numpy()
    np.testing.assert_allclose(rewards, cut, rtol=1e-4, atol=1e-5)
    assert not np.allclose(cut, whole, rtol=1e-4, atol=1e-5)
