"""The default training data of each command when no dataset is named: the shipped Taskmaster
coffee feedback (CC BY 4.0, see ATTRIBUTION.md), split by conversation, in the format each trl
trainer expects."""

from __future__ import annotations

from pathlib import Path

import datasets

from perl_plugins.data import taskmaster
from perl_plugins.data.split_checks import check_splits

FORMATS = {
    "sft": "prompt/completion (thumbs-up rows)",
    "reward": "prompt/completion/label (pointwise) or prompt/chosen/rejected (pairs)",
    "dpo": "prompt/chosen/rejected",
    "kto": "prompt/completion/label (bool)",
    "grpo": "prompt",
    "rloo": "prompt",
}

HELDOUT = ("test", "validation", "fold:I/K")
VALIDATION_FRACTION = 0.2  # of train's groups: enough held-out pairs to compare settings on


def trim_context(prompt: str, turns: int | None) -> str:
    """Keep the last ``turns`` rendered context lines (plus the final ``Agent:`` cue): small models
    on CPU cannot afford whole dialogs, and the latest turns decide the reply."""
    if not turns:
        return prompt
    lines = prompt.split("\n")
    return "\n".join(lines[-(turns + 1) :])


def _rows(split: list[taskmaster.FeedbackRow], turns: int | None) -> list[taskmaster.FeedbackRow]:
    return [
        taskmaster.FeedbackRow(r.conversation_id, trim_context(r.prompt, turns), r.completion, r.label) for r in split
    ]


def parse_fold(heldout: str) -> tuple[int, int] | None:
    """(I, K) of a ``"fold:I/K"`` held-out name, None for any other name."""
    if not heldout.startswith("fold:"):
        return None
    fold, _, folds = heldout.removeprefix("fold:").partition("/")
    if not (fold.isdigit() and folds.isdigit() and int(fold) < int(folds) and int(folds) >= 2):
        raise ValueError(f"heldout {heldout!r}: expected fold:I/K with 0 <= I < K and K >= 2, e.g. fold:0/5.")
    return int(fold), int(folds)


def heldout_rows(
    path: str | Path | None = None, heldout: str = "test", seed: int = 0
) -> dict[str, list[taskmaster.FeedbackRow]]:
    """{"train": rows, "test": rows} of the leak-free split (``load_splits``), contexts untrimmed.

    ``heldout="validation"``: ``test`` is a validation split carved out of train the same leak-free
    way (``VALIDATION_FRACTION`` of its groups) and ``train`` the rest; the test split is in neither.
    Every tool that tunes on validation (recipes, ``benchmarks/quality.py``, a base pre-trained
    with ``heldout: validation``) carves this same one.

    ``heldout="fold:I/K"`` (0 <= I < K): ``test`` is fold I of a K-fold cross-validation of the whole
    file (``taskmaster.fold_rows``), ``train`` the other folds."""
    fold = parse_fold(heldout)
    if fold is not None:
        return taskmaster.fold_rows(taskmaster.load_feedback(path), *fold, seed=seed)
    if heldout not in HELDOUT:
        raise ValueError(f"heldout must be one of {HELDOUT}, got {heldout!r}.")
    splits = taskmaster.load_splits(path, seed=seed)
    if heldout == "validation":
        # split seed + 1: under the same seed no train group would hash to the held-out side
        splits = taskmaster.split_rows(splits["train"], VALIDATION_FRACTION, seed=seed + 1)
    return splits


def default_dataset(
    command: str,
    path: str | Path | None = None,
    context_turns: int | None = 4,
    feedback: str = "pointwise",
    seed: int = 0,
    heldout: str = "test",
) -> datasets.DatasetDict:
    """``DatasetDict(train=..., test=...)`` for ``command`` from a Taskmaster feedback file.

    ``heldout="validation"`` makes ``test`` a validation split carved out of train the same
    leak-free way (``VALIDATION_FRACTION`` of its groups; ``train`` the rest), for choosing
    settings without looking at the test split."""
    if command not in FORMATS:
        raise ValueError(f"No default dataset for {command!r}; commands: {sorted(FORMATS)}.")
    splits = heldout_rows(path, heldout, seed)
    out = {}
    for name, split in splits.items():
        rows = _rows(split, context_turns)
        if command == "sft":
            ds = taskmaster.pointwise([r for r in rows if r.label]).remove_columns("label")
        elif command == "dpo" or (command == "reward" and feedback == "pairs"):
            ds = taskmaster.preference_pairs(rows)
        elif command == "reward":  # grouped before trimming: a trimmed context no longer shows its dialog
            ds = taskmaster.pointwise(rows, groups=taskmaster.split_groups(split))
        elif command == "kto":
            ds = taskmaster.pointwise(rows)
            ds = ds.cast_column("label", datasets.Value("bool"))
        else:  # RL: distinct prompts
            ds = datasets.Dataset.from_dict({"prompt": list(dict.fromkeys(r.prompt for r in rows))})
        out[name] = ds
    check_splits(out["train"], out["test"], str(path or "the shipped coffee feedback"))
    return datasets.DatasetDict(out)
