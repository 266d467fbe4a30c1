"""Held-out figures every recipe reports the same way: the mean of a per-item score before and
after training, their standard errors, and the gain with its *paired* standard error (both sides
score the same items, so item-to-item spread cancels out of the gain).

Standard errors are analytic, not bootstrapped. An item is an independent unit (a preference
pair, a group of replies, a prompt); an item that holds several correlated observations (the
ranked pairs of one group, the samples of one prompt) carries its mean and, where counts differ,
its count as weight: the pooled mean is then the ratio estimator sum(w x) / sum(w), and its
standard error the ratio estimator's, clustered by item. With equal weights that is the familiar
std(ddof=1) / sqrt(n)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def mean_se(values: ArrayLike, weights: ArrayLike | None = None) -> tuple[float, float]:
    """(weighted mean, its standard error clustered by item) of per-item ``values``."""
    x = np.asarray(values, dtype=np.float64).ravel()
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if x.shape != w.shape:
        raise ValueError(f"values and weights differ in length: {x.size} vs {w.size}.")
    if x.size == 0 or w.sum() <= 0:
        return math.nan, math.nan
    mean = float((w * x).sum() / w.sum())
    if x.size < 2:
        return mean, math.nan
    n = x.size
    return mean, float(math.sqrt(n / (n - 1) * ((w * (x - mean)) ** 2).sum()) / w.sum())


def before_after(
    prefix: str,
    before: ArrayLike,
    after: ArrayLike,
    weights: ArrayLike | None = None,
    before_std: float | None = None,
) -> dict[str, float]:
    """``{prefix}_before`` / ``_after`` (with ``_se``), ``_gain`` and its paired ``_gain_se``, from
    per-item scores on the same items; with ``before_std`` (the spread of the before-distribution
    of single observations) also ``_gain_in_std`` = gain / before_std."""
    b, a = np.asarray(before, dtype=np.float64).ravel(), np.asarray(after, dtype=np.float64).ravel()
    if b.shape != a.shape:
        raise ValueError(f"{prefix}: before and after score different items ({b.size} vs {a.size}).")
    mean_b, se_b = mean_se(b, weights)
    mean_a, se_a = mean_se(a, weights)
    gain, gain_se = mean_se(a - b, weights)
    report = {
        f"{prefix}_before": mean_b,
        f"{prefix}_before_se": se_b,
        f"{prefix}_after": mean_a,
        f"{prefix}_after_se": se_a,
        f"{prefix}_gain": gain,
        f"{prefix}_gain_se": gain_se,
    }
    if before_std is not None:
        report[f"{prefix}_gain_in_std"] = gain / before_std if before_std > 0 else math.nan
    return report


def pair_wins(margins: ArrayLike) -> np.ndarray:
    """Per pair, 1 where the margin (score of the better reply minus the worse one's) is positive,
    1/2 on a tie, 0 otherwise: its mean is the pairwise accuracy, with ties at chance."""
    m = np.asarray(margins, dtype=np.float64)
    return (m > 0) + 0.5 * (m == 0)
