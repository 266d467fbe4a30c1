"""Held-out reward-model metrics: accuracy and ROC AUC, for pointwise rows and for pairs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties 1/2
    (the Mann-Whitney statistic, with average ranks for ties)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel() > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort(kind="mergesort")
    ranks = np.empty_like(scores)
    sorted_scores = scores[order]
    # average rank for ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def reward_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for a pointwise reward trainer: accuracy (logit > 0 vs label) and ROC AUC."""
    scores = np.asarray(eval_pred.predictions).reshape(-1)
    labels = np.asarray(eval_pred.label_ids).reshape(-1)
    return {"accuracy": float(((scores > 0) == (labels > 0.5)).mean()), "auc": roc_auc(scores, labels)}


def evaluate_pairs(model: Any, tokenizer: Any, pairs: Any, max_length: int | None = None) -> dict[str, float]:
    """Pairwise held-out metrics: accuracy (r(chosen) > r(rejected)) and ROC AUC with chosen
    responses as positives and rejected ones as negatives."""
    from perl_plugins.models.reward import score_texts

    was_training = model.training
    model.eval()
    try:
        chosen = score_texts(
            model, tokenizer, [p + c for p, c in zip(pairs["prompt"], pairs["chosen"])], max_length=max_length
        )
        rejected = score_texts(
            model, tokenizer, [p + r for p, r in zip(pairs["prompt"], pairs["rejected"])], max_length=max_length
        )
    finally:
        model.train(was_training)
    scores = np.concatenate([chosen.numpy(), rejected.numpy()])
    labels = np.concatenate([np.ones(len(chosen)), np.zeros(len(rejected))])
    return {"eval_pair_accuracy": float((chosen > rejected).float().mean()), "eval_auc": roc_auc(scores, labels)}


def evaluate_trainer_pairs(trainer: Any) -> dict[str, float]:
    """Pairwise held-out metrics of a stock ``RewardTrainer`` on exactly what it trains on: its
    eval dataset as the trainer prepared it (``prompt`` already joined into ``chosen``/``rejected``,
    EOS added, tokenized), batched by its own collator, scored by the model's forward pass. Rewards
    are gathered across processes, so every process returns the same metrics."""
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        with torch.no_grad():
            for batch in trainer.get_eval_dataloader():
                rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                # the collator stacks the chosen rows, then the rejected ones
                c, r = torch.chunk(rewards.logits.squeeze(-1).float(), chunks=2)
                chosen.append(trainer.accelerator.gather_for_metrics(c).cpu())
                rejected.append(trainer.accelerator.gather_for_metrics(r).cpu())
    finally:
        model.train(was_training)
    chosen_t, rejected_t = torch.cat(chosen), torch.cat(rejected)
    scores = np.concatenate([chosen_t.numpy(), rejected_t.numpy()])
    labels = np.concatenate([np.ones(len(chosen_t)), np.zeros(len(rejected_t))])
    return {"eval_pair_accuracy": float((chosen_t > rejected_t).float().mean()), "eval_auc": roc_auc(scores, labels)}


def grouped_bootstrap_se(
    metric: Any,
    groups: Sequence[Any],
    *columns: Sequence[float] | np.ndarray,
    reps: int = 1000,
    seed: int = 0,
) -> float:
    """Standard error of ``metric(*columns)`` over the evaluation sample, resampling whole groups.

    Held-out rows of one dialog are not independent (one dialog is rated at several turns), so the
    spread of a test-set AUC comes from how many dialogs, not rows, it holds: each replicate draws
    the groups with replacement and keeps every row of a drawn group. Replicates where the metric
    is undefined (NaN: e.g. no negative drawn) are left out."""
    cols = [np.asarray(c) for c in columns]
    keys, index = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    members = [np.flatnonzero(index == k) for k in range(len(keys))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(reps):
        rows = np.concatenate([members[k] for k in rng.integers(0, len(keys), len(keys))])
        values.append(metric(*(c[rows] for c in cols)))
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanstd(values, ddof=1))


def dpo_logratios(trainer: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per pair of a LoRA ``DPOTrainer``'s eval dataset, as the trainer prepared and batches it:
    (policy log p(chosen) - log p(rejected), the same under the reference = adapters off), each
    log p summed over the reply's tokens. DPO's implicit-reward margin of a pair is
    beta * (policy - reference)."""
    import torch

    from perl_plugins.models.logprobs import response_logps
    from perl_plugins.models.roles import roles

    model = trainer.model
    was_training = model.training
    model.eval()
    sides: dict[str, list] = {"policy": [], "reference": []}
    try:
        with torch.no_grad():
            for batch in trainer.get_eval_dataloader():
                ids, mask = batch["input_ids"], batch["completion_mask"]
                for role, out in sides.items():
                    with roles(trainer).use(role):
                        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
                    chosen, rejected = torch.chunk(response_logps(logits, ids, mask), chunks=2)  # [chosen; rejected]
                    out.append(trainer.accelerator.gather_for_metrics(chosen - rejected).cpu())
    finally:
        model.train(was_training)
    return torch.cat(sides["policy"]).numpy(), torch.cat(sides["reference"]).numpy()
