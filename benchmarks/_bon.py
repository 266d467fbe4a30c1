"""Numerics of benchmarks/grm_eval.py: the paper's KL_bon x-axis, the unbiased estimate of
best-of-n scores from m >= n samples per prompt drawn once, and the completion log-probabilities
its RL probes estimate KL(policy || reference) from."""

from __future__ import annotations

import math

import numpy as np
import torch


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
        raise ValueError(
            f"proxy and values must be (prompts, m) arrays of one shape, got {proxy.shape} and {values.shape}."
        )
    order = np.argsort(proxy, axis=1, kind="stable")
    return np.take_along_axis(values, order, axis=1) @ bon_weights(proxy.shape[1], n)


def completion_mask(generated: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on generated tokens up to and including the first EOS, 0 after it (generate's padding)."""
    is_eos = (generated == eos_id).long()
    return (is_eos.cumsum(-1) - is_eos == 0).long()


def completion_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    """Per row, the sum of log p(token | prefix) over positions >= ``start`` that ``mask`` keeps.
    Rows are left-padded prompts followed by completions; positions count attended tokens only, as
    ``generate`` numbered them, so a row scores as it would unpadded (rotary models are blind to
    the shift anyway; absolute-position models are not)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1].float()
    token = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    keep = mask[:, 1:].clone()
    keep[:, : start - 1] = 0
    return (token * keep).sum(-1)
