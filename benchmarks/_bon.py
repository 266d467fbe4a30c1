"""Best-of-n numerics for benchmarks/grm_eval.py: the paper's KL_bon x-axis and the unbiased
estimate of best-of-n scores from m >= n samples per prompt drawn once."""

from __future__ import annotations

import math

import numpy as np


def kl_bon(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020; GRM's x-axis)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    return math.log(n) - (n - 1) / n


def bon_weights(m: int, n: int) -> np.ndarray:
    """P(the i-th lowest of m samples is the proxy's best of a uniformly drawn n-subset), i = 1..m:
    C(i - 1, n - 1) / C(m, n). Averaging over all n-subsets of the m draws is the unbiased way to
    reuse one set of m samples for every n <= m."""
    if not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= m, got n={n}, m={m}.")
    return np.asarray([math.comb(i - 1, n - 1) for i in range(1, m + 1)], dtype=np.float64) / math.comb(m, n)


def best_of_n(proxy: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per prompt (rows), the expected ``values`` of the completion the proxy ranks best among n
    drawn without replacement from the row's m samples. ``proxy`` and ``values``: (prompts, m)."""
    proxy, values = np.asarray(proxy, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if proxy.shape != values.shape or proxy.ndim != 2:
        raise ValueError(f"proxy and values must be (prompts, m) arrays of one shape, got {proxy.shape} and {values.shape}.")
    order = np.argsort(proxy, axis=1, kind="stable")
    return np.take_along_axis(values, order, axis=1) @ bon_weights(proxy.shape[1], n)
