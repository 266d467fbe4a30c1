"""Prompt trimming (``perl_plugins.data.text``): the latest turns that fit are kept."""

from __future__ import annotations

from datasets import Dataset

from perl_plugins.data.text import trim_prompt, trim_prompts

PROMPT = "User: hello there\nAgent: hi, what can I get you?\nUser: a large oat latte please\nAgent:"


def _length(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_keeps_the_latest_whole_lines_that_fit(tokenizer):
    lines = PROMPT.split("\n")
    last_two = "\n".join(lines[-2:])
    budget = _length(tokenizer, last_two)
    assert budget < _length(tokenizer, "\n".join(lines[-3:]))
    assert trim_prompt(tokenizer, PROMPT, budget) == last_two


def test_no_budget_or_a_fitting_prompt_is_unchanged(tokenizer):
    assert trim_prompt(tokenizer, PROMPT, None) == PROMPT
    assert trim_prompt(tokenizer, PROMPT, 0) == PROMPT
    assert trim_prompt(tokenizer, PROMPT, _length(tokenizer, PROMPT)) == PROMPT


def test_a_last_line_over_the_budget_keeps_its_last_tokens(tokenizer):
    line = "User: a large oat latte please with an extra shot and caramel"
    ids = tokenizer(line, add_special_tokens=False)["input_ids"]
    assert trim_prompt(tokenizer, line, 5) == tokenizer.decode(ids[-5:])


def test_trim_prompts_maps_the_prompt_column(tokenizer):
    data = Dataset.from_dict({"prompt": [PROMPT, "User: hi\nAgent:"], "completion": [" x", " y"]})
    budget = _length(tokenizer, "\n".join(PROMPT.split("\n")[-2:]))
    out = trim_prompts(data, tokenizer, budget)
    assert out["prompt"] == [trim_prompt(tokenizer, p, budget) for p in data["prompt"]]
    assert out["completion"] == data["completion"]
    assert trim_prompts(data, tokenizer, None) is data
