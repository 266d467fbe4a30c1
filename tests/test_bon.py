"""Best-of-n helpers of benchmarks/grm_eval.py against direct recomputations."""

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _bon import best_of_n, bon_weights, completion_logps, completion_mask, kl_bon


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


def test_completion_mask_keeps_tokens_up_to_the_first_eos():
    generated = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(completion_mask(generated, eos_id=2), expected)


def test_completion_logps_of_a_left_padded_batch_equal_each_row_scored_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    prompts, completions = [[3, 4, 5], [7, 8]], [[9, 10, 11, 2], [12, 2, 0, 0]]  # row 2: EOS, then padding
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p + c for p, c in zip(prompts, completions)])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    mask = torch.cat([prompt_mask, completion_mask(ids[:, width:], eos_id=2)], dim=1)
    with torch.no_grad():
        got = completion_logps(model, ids, mask, width)
        for row, (p, c) in enumerate(zip(prompts, completions)):
            kept = c[: c.index(2) + 1]
            alone = torch.tensor([p + kept])
            logp = model(input_ids=alone).logits[0, :-1].log_softmax(-1)
            direct = sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(kept))
            assert got[row].item() == pytest.approx(direct.item(), abs=1e-5)
