"""``response_logps`` (GRM's and RRHF's response log-probs) against a direct re-computation."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from perl_plugins.models.logprobs import response_logps

MASK = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]).bool()


def _direct(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over t with mask[b, t] of log softmax(logits[b, t - 1])[ids[b, t]], the whole vocabulary."""
    logp = F.log_softmax(logits.double(), -1)
    return torch.tensor(
        [
            sum((logp[b, t - 1, ids[b, t]] for t in range(1, ids.shape[1]) if mask[b, t]), torch.tensor(0.0)).item()
            for b in range(ids.shape[0])
        ],
        dtype=torch.float64,
    )


def test_from_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    ids = torch.randint(0, 11, (3, 6))
    out = response_logps(logits, ids, MASK)
    assert out.dtype == torch.float32 and out[2] == 0  # a row without response tokens sums to 0
    torch.testing.assert_close(out.double(), _direct(logits, ids, MASK))


def test_from_hidden_states_through_the_head():
    torch.manual_seed(1)
    head = nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 6, 8)
    ids = torch.randint(0, 11, (3, 6))
    with torch.no_grad():
        expected = _direct(head(hidden), ids, MASK)
    torch.testing.assert_close(response_logps(hidden, ids, MASK, head).detach().double(), expected)


def test_low_precision_logits_are_summed_in_float32():
    torch.manual_seed(2)
    logits = torch.randn(3, 6, 11).bfloat16()
    ids = torch.randint(0, 11, (3, 6))
    out = response_logps(logits, ids, MASK)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _direct(logits.float(), ids, MASK))


def test_gradient_reaches_only_masked_positions():
    torch.manual_seed(3)
    logits = torch.randn(3, 6, 11, requires_grad=True)
    ids = torch.randint(0, 11, (3, 6))
    response_logps(logits, ids, MASK).sum().backward()
    touched = logits.grad.abs().sum(-1) > 0  # position t - 1 predicts token t
    assert torch.equal(touched[:, :-1], MASK[:, 1:]) and not touched[:, -1].any()
