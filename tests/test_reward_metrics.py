"""Grouped bootstrap standard errors against direct re-computation."""

import numpy as np
import pytest

from perl_plugins.training.reward_metrics import grouped_bootstrap_se, roc_auc


def test_grouped_bootstrap_se_resamples_whole_groups_as_a_direct_recomputation():
    scores = np.array([0.1, 0.9, 0.4, 0.8, 0.3, 0.7, 0.2])
    labels = np.array([0, 1, 0, 1, 1, 0, 1])
    groups = ["a", "a", "b", "b", "c", "d", "d"]
    got = grouped_bootstrap_se(roc_auc, groups, scores, labels, reps=200, seed=3)

    members = {"a": [0, 1], "b": [2, 3], "c": [4], "d": [5, 6]}
    keys = sorted(members)
    rng = np.random.default_rng(3)
    values = []
    for _ in range(200):
        rows = [i for k in rng.integers(0, 4, 4) for i in members[keys[k]]]
        values.append(roc_auc(scores[rows], labels[rows]))
    assert got == pytest.approx(np.nanstd(values, ddof=1))


def test_grouped_bootstrap_se_of_a_mean_with_singleton_groups_is_the_textbook_se():
    x = np.random.default_rng(0).normal(size=400)
    se = grouped_bootstrap_se(np.mean, range(400), x, reps=2000)
    assert se == pytest.approx(x.std(ddof=1) / np.sqrt(400), rel=0.1)


def test_grouped_bootstrap_se_grows_when_rows_are_copies_within_groups():
    # 100 groups of 4 identical rows: the sample holds 100 independent values, not 400
    x = np.repeat(np.random.default_rng(1).normal(size=100), 4)
    grouped = grouped_bootstrap_se(np.mean, np.repeat(np.arange(100), 4), x, reps=2000)
    rows = grouped_bootstrap_se(np.mean, np.arange(400), x, reps=2000)
    assert grouped == pytest.approx(2 * rows, rel=0.15)
