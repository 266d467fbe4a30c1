"""``rrhf``: RRHF (Yuan et al. 2023) — rank k scored responses per prompt by their length-normalised
log-probability, plus cross-entropy on the best one, on a *stock* ``transformers.Trainer``.

Data: one row per prompt with k responses and their scores (:func:`tokenize_groups`). The plugin
installs :class:`RRHFCollator`: every response becomes one row ``prompt + response``, and
``labels`` hold only the tokens of the best-scored response of each group (everything else
-100), so the stock causal-LM loss *is* L_ft. The plugin adds the ranking term from the logits of
that same forward pass (no second pass):

    p_i    = (sum over tokens of y_i of log pi(token | prefix)) / |y_i|
    L_rank = sum over pairs (i, j) of one group with r_i < r_j of max(0, p_i - p_j)
    L      = w * L_rank + L_ft

Ties give no pair. With several groups in a batch L_rank is averaged over groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from perl_plugins import hookimpl, trainer_family
from perl_plugins.errors import PluginIncompatibleError
from perl_plugins.lazy import lazy_import

# Imported when a hook or loss first runs: listing this plugin's options needs no torch.
torch = lazy_import("torch")
datasets = lazy_import("datasets")

# Columns of a tokenized group (tokenize_groups) and the batch keys the model must not see.
GROUP_COLUMNS = ("prompt_ids", "response_ids", "scores")
PRIVATE_INPUTS = ("rrhf_response_mask", "rrhf_scores", "rrhf_groups")


@dataclass
class RRHFOptions:
    rrhf_weight: float = field(
        default=1.0, metadata={"help": "Weight w of the ranking loss: L = w * L_rank + L_ft (RRHF's scripts: 1)."}
    )

    def __post_init__(self) -> None:
        if self.rrhf_weight < 0:
            raise ValueError(f"rrhf_weight must be >= 0, got {self.rrhf_weight}.")


def _group_index(groups: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long, device=device) if groups is None else groups


def rrhf_rank_loss(
    logps_sum: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """L_rank: hinge on length-normalised log-probs over every pair of one group whose scores
    differ (the worse response must not be more likely); summed per group, averaged over groups.

    All arguments have shape ``(n,)``; ``groups`` (default: one group) says which prompt each
    response belongs to.
    """
    p = logps_sum / lengths.to(logps_sum.dtype)
    groups = _group_index(groups, p.shape[0], p.device)
    # pair[i, j]: same prompt and r_i < r_j, so p_i should stay below p_j.
    pair = (groups[:, None] == groups[None, :]) & (scores[:, None] < scores[None, :])
    hinge = (p[:, None] - p[None, :]).clamp(min=0)
    return (hinge * pair).sum() / groups.unique().numel()


def best_of_groups(scores: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the best-scored response of each group (the first one on ties)."""
    groups = _group_index(groups, scores.shape[0], scores.device)
    best = torch.zeros_like(scores, dtype=torch.bool)
    for group in groups.unique():
        members = (groups == group).nonzero().squeeze(-1)
        best[members[scores[members].argmax()]] = True
    return best


def rrhf_loss(
    logps_sum: torch.Tensor,
    lengths: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor | None = None,
    *,
    weight: float = 1.0,
) -> torch.Tensor:
    """RRHF's total loss ``w * L_rank + L_ft`` from summed response log-probs.

    L_ft is the cross-entropy over the tokens of the best response of each group, pooled (what
    the stock causal-LM loss computes when ``labels`` hold just those tokens).
    """
    best = best_of_groups(scores, groups)
    ft = -logps_sum[best].sum() / lengths[best].sum().to(logps_sum.dtype)
    return weight * rrhf_rank_loss(logps_sum, lengths, scores, groups) + ft


def response_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of log p(token | prefix) over the tokens where ``response_mask`` is set;
    only those positions go through the log-softmax."""
    targets = response_mask[:, 1:].bool()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(targets)[targets]
    token_logps = logits[:, :-1][targets].float().log_softmax(-1)
    token_logps = token_logps.gather(-1, input_ids[:, 1:][targets][:, None]).squeeze(-1)
    return torch.zeros(input_ids.shape[0], device=logits.device).index_add(0, rows, token_logps)


def tokenize_groups(
    dataset: datasets.Dataset, tokenizer: Any, max_length: int | None = None, desc: str = "Tokenizing RRHF groups"
) -> datasets.Dataset:
    """``prompt`` / ``responses`` (list of str) / ``scores`` (list of float) rows -> token ids.

    EOS ends each response (so ranking also covers stopping). Over ``max_length`` the oldest
    prompt tokens go first; a response alone over the limit is cut at its end.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        if len(row["responses"]) != len(row["scores"]) or len(row["responses"]) < 1:
            raise ValueError(
                f"RRHF group needs one score per response, got {len(row['responses'])} responses "
                f"and {len(row['scores'])} scores."
            )
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        responses = [tokenizer(r, add_special_tokens=False)["input_ids"] + eos for r in row["responses"]]
        if max_length is not None:
            responses = [r[: max_length - 1] for r in responses]
            keep = max_length - max(len(r) for r in responses)
            prompt = prompt[-keep:] if keep < len(prompt) else prompt
        return {"prompt_ids": prompt, "response_ids": responses, "scores": [float(s) for s in row["scores"]]}

    return dataset.map(encode, remove_columns=dataset.column_names, desc=desc)


class RRHFCollator:
    """Groups -> one row per response (right-padded ``prompt + response``), ``labels`` on the best
    response of each group, and the private ``rrhf_*`` tensors the ranking loss reads."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows, prompt_lens, scores, groups = [], [], [], []
        for g, example in enumerate(examples):
            for response in example["response_ids"]:
                rows.append(list(example["prompt_ids"]) + list(response))
                prompt_lens.append(len(example["prompt_ids"]))
                groups.append(g)
            scores.extend(example["scores"])
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, start) in enumerate(zip(rows, prompt_lens)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            response_mask[i, start : len(row)] = True
        scores_t = torch.tensor(scores, dtype=torch.float32)
        groups_t = torch.tensor(groups, dtype=torch.long)
        best = best_of_groups(scores_t, groups_t)
        labels = torch.where(response_mask & best[:, None], input_ids, torch.full_like(input_ids, -100))
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "rrhf_response_mask": response_mask,
            "rrhf_scores": scores_t,
            "rrhf_groups": groups_t,
        }


def _pad_token_id(trainer: Any) -> int:
    tokenizer = getattr(trainer, "processing_class", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        pad = trainer.model.config.get_text_config().pad_token_id
    if pad is None:
        raise PluginIncompatibleError(
            "rrhf: no pad token: give the trainer a processing_class with a pad or eos token."
        )
    return pad


@hookimpl
def perl_plugin_options() -> type:
    return RRHFOptions


@hookimpl
def perl_check_trainer(trainer: Any, options: dict[str, Any]) -> None:
    family = trainer_family(trainer)
    if family != "Trainer":
        raise PluginIncompatibleError(
            "rrhf adds its ranking loss to a stock transformers.Trainer on a causal LM, not to "
            f"{type(trainer).__name__} (its data are groups of scored responses: see perl_plugins.plugins.rrhf.tokenize_groups)."
        )
    if trainer.model.get_output_embeddings() is None:
        raise PluginIncompatibleError(f"rrhf needs a causal LM with an LM head, got {type(trainer.model).__name__}.")
    columns = getattr(trainer.train_dataset, "column_names", None) or []
    missing = [c for c in GROUP_COLUMNS if c not in columns]
    if missing:
        raise PluginIncompatibleError(
            f"rrhf: the train dataset lacks {missing}; build it with perl_plugins.plugins.rrhf.tokenize_groups "
            "from prompt/responses/scores rows."
        )


@hookimpl
def perl_configure(trainer: Any, options: dict[str, Any]) -> None:
    if not isinstance(trainer.data_collator, RRHFCollator):
        trainer.data_collator = RRHFCollator(_pad_token_id(trainer))
    # The group columns are not forward() arguments: keep them past remove_unused_columns.
    trainer._set_signature_columns_if_needed()
    trainer._signature_columns = [*trainer._signature_columns, *GROUP_COLUMNS]
    trainer.perl_plugins.private_inputs.update(PRIVATE_INPUTS)


@hookimpl
def perl_compute_loss(
    trainer: Any, model: Any, inputs: dict[str, Any], outputs: Any, terms: Any, options: dict[str, Any]
) -> None:
    opts: RRHFOptions = options["rrhf"]
    missing = [k for k in PRIVATE_INPUTS if k not in inputs]
    if missing:
        raise PluginIncompatibleError(f"rrhf: the batch lacks {missing}: batch the data with RRHFCollator.")
    mask = inputs["rrhf_response_mask"]
    logps = response_logps(outputs.logits, inputs["input_ids"], mask)
    rank = rrhf_rank_loss(logps, mask[:, 1:].sum(-1), inputs["rrhf_scores"], inputs["rrhf_groups"])
    terms.add("rrhf_rank_loss", rank, opts.rrhf_weight)  # the host scales it for gradient accumulation
