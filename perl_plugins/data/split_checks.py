"""Refusing splits too small to train on or to measure: a train split with no rows ends in a bare
``StopIteration`` inside trl, a held-out split of one row or of one label gives a NaN AUC."""

from __future__ import annotations

from typing import Any

MIN_EVAL_ROWS = 2


class SplitTooSmallError(ValueError):
    """A train or held-out split too small for the run; the message gives the counts."""


def check_splits(train: Any, test: Any | None, source: str, hint: str = "use a larger file") -> None:
    """Refuse an empty ``train`` split, and a ``test`` split (when given) with fewer than
    ``MIN_EVAL_ROWS`` rows or, for labelled rows, without both labels (its AUC would be undefined)."""
    columns = train.column_names
    unit = "pairs" if any(c.startswith("chosen") for c in columns) else "prompts" if columns == ["prompt"] else "rows"
    counts = f"{source} gives {len(train)} training {unit} and {0 if test is None else len(test)} held-out {unit}"
    if len(train) == 0:
        raise SplitTooSmallError(f"Too little data: {counts}; training needs at least 1. Hint: {hint}.")
    if test is None:
        return
    if len(test) < MIN_EVAL_ROWS:
        raise SplitTooSmallError(
            f"Too little held-out data: {counts}; evaluation needs at least {MIN_EVAL_ROWS}. Hint: {hint}."
        )
    if "label" in test.column_names and len({bool(label) for label in test["label"]}) < 2:
        raise SplitTooSmallError(
            f"Held-out data with one label only: {counts}, all {'positive' if test['label'][0] else 'negative'}; "
            f"accuracy and AUC need both thumbs up and down. Hint: {hint}."
        )
