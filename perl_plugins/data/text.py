"""Text helpers for prompts. (The common prefix of two token lists is trl's
``trl.data_utils.common_prefix_length``.)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets


def trim_prompt(tokenizer: Any, prompt: str, max_tokens: int | None) -> str:
    """Keep the latest lines (dialog turns) of ``prompt`` that fit in ``max_tokens`` tokens; a last
    line longer than that keeps its last ``max_tokens`` tokens.

    trl's SFT and DPO trainers truncate the *end* of long sequences, which would cut the response;
    the latest turns are what the reply depends on.
    """
    if not max_tokens:
        return prompt

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    lines = prompt.split("\n")
    while len(lines) > 1 and length("\n".join(lines)) > max_tokens:
        lines.pop(0)
    text = "\n".join(lines)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[-max_tokens:])


def trim_prompts(dataset: datasets.Dataset, tokenizer: Any, max_tokens: int | None) -> datasets.Dataset:
    """:func:`trim_prompt` on the ``prompt`` column."""
    if not max_tokens:
        return dataset
    return dataset.map(
        lambda row: {"prompt": trim_prompt(tokenizer, row["prompt"], max_tokens)}, desc="Trimming prompts"
    )
