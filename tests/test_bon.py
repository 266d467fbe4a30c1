"""Best-of-n helpers of benchmarks/grm_eval.py against direct recomputations."""

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _bon import best_of_n, bon_weights, kl_bon


def test_best_of_n_equals_the_mean_over_all_subsets():
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    for n in range(1, 8):
        direct = [
            np.mean([gold[p, max(s, key=lambda i: proxy[p, i])] for s in itertools.combinations(range(7), n)])
            for p in range(3)
        ]
        np.testing.assert_allclose(best_of_n(proxy, gold, n), direct, rtol=1e-12)
    np.testing.assert_allclose(best_of_n(proxy, gold, 1), gold.mean(axis=1))
    np.testing.assert_allclose(best_of_n(proxy, proxy, 7), proxy.max(axis=1))
    assert bon_weights(7, 3).sum() == pytest.approx(1.0)


def test_kl_bon_is_the_limit_of_the_exact_kl_over_many_outcomes():
    # Best-of-n over M equally likely ranked outcomes picks outcome i with (i/M)^n - ((i-1)/M)^n.
    m = 200_000
    i = np.arange(1, m + 1)
    for n in (1, 2, 4, 32):
        p = (i / m) ** n - ((i - 1) / m) ** n
        exact = float(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) * m), 0.0)))
        assert kl_bon(n) == pytest.approx(exact, abs=1e-3)
    assert kl_bon(1) == 0.0 and kl_bon(2) == pytest.approx(math.log(2) - 0.5)
    with pytest.raises(ValueError, match="n must be"):
        kl_bon(0)
    with pytest.raises(ValueError, match="same shape|one shape"):
        best_of_n(np.zeros((2, 3)), np.zeros((2, 4)), 1)
