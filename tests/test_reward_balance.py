"""balance_labels: the rarer thumb's rows repeated until both thumbs count alike, nothing lost."""

from __future__ import annotations

import collections

from datasets import Dataset

from perl_plugins.training.pointwise import balance_labels


def test_rare_label_is_repeated_until_both_count_alike():
    rows = Dataset.from_dict({"completion": [f"c{i}" for i in range(11)], "label": [1] * 8 + [0] * 3})
    out = balance_labels(rows, seed=0)
    counts = collections.Counter(zip(out["completion"], out["label"]))
    assert sum(n for (_, label), n in counts.items() if label == 0) == 8
    assert sum(n for (_, label), n in counts.items() if label == 1) == 8
    assert set(counts) == set(zip(rows["completion"], rows["label"]))  # every row kept
    repeats = [n for (_, label), n in counts.items() if label == 0]
    assert max(repeats) - min(repeats) <= 1  # spread evenly over the rare rows
    assert out["completion"] == balance_labels(rows, seed=0)["completion"]  # deterministic


def test_balanced_or_one_label_data_is_unchanged():
    balanced = Dataset.from_dict({"completion": ["a", "b"], "label": [1, 0]})
    assert balance_labels(balanced)["completion"] == ["a", "b"]
    one = Dataset.from_dict({"completion": ["a", "b"], "label": [1, 1]})
    assert balance_labels(one)["completion"] == ["a", "b"]
