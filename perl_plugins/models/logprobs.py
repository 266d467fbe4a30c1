"""Response log-probabilities: the sum of log p(token | prefix) over a response's tokens, the
quantity GRM's regularizer and RRHF's ranking read."""

from __future__ import annotations

from perl_plugins.lazy import lazy_import

# Imported on first call: plugins import this module while they are only listed.
torch = lazy_import("torch")


def response_logps(
    states: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, head: torch.nn.Module | None = None
) -> torch.Tensor:
    """Per row, the sum of log p(token | prefix) over the tokens where ``mask`` is set.

    ``states`` are the model's logits ``(rows, tokens, vocab)``, or, with ``head`` (an LM head),
    the final hidden states it turns into logits. Only masked positions go through the head and
    the log-softmax, so the (tokens x vocab) logits are never built for prompt or padding."""
    targets = mask[:, 1:].bool()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(targets)[targets]
    logits = states[:, :-1][targets]
    if head is not None:
        logits = head(logits)
    token_logps = logits.float().log_softmax(-1).gather(-1, input_ids[:, 1:][targets][:, None]).squeeze(-1)
    return torch.zeros(input_ids.shape[0], device=token_logps.device).index_add(0, rows, token_logps)
