"""Linear probe, then fine-tune (LP-FT, Kumar et al. 2022, arXiv 2202.10054) for reward heads.

A freshly initialised reward head is noise, and the first steps of fine-tuning spend the body's
features on fitting it. Fitting the head first (L2-regularised logistic regression on the frozen
model's features for the train rows) gives fine-tuning a head that already ranks, so it distorts
the features less. On the coffee validation split a probe on the embedded base's frozen features
ranks held-out thumbs better than the fine-tuned reward model did (see README, "Does it learn?").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from perl_plugins.models.reward import HEAD_ATTR, decoder, pool_last_token, unwrap

logger = logging.getLogger(__name__)

# Regularisation strengths tried (sklearn's C, on features scaled to unit std), chosen by
# cross-validated ROC AUC on the train rows (whole dialogs per fold where they are known).
PROBE_CS = tuple(np.logspace(-4, 1, 11))


def head_layers(model: nn.Module) -> tuple[nn.Module, list[nn.Linear]]:
    """(the part of the reward head before its last linear layer, every copy of that layer that
    scores: the head itself, or peft's trainable ``modules_to_save`` copies of it)."""
    head = getattr(unwrap(model), HEAD_ATTR)
    copies = list(head.modules_to_save.values()) if hasattr(head, "modules_to_save") else [head]
    last = [c[-1] if isinstance(c, nn.Sequential) else c for c in copies]
    front = copies[0][:-1] if isinstance(copies[0], nn.Sequential) else nn.Identity()
    return front, last


def head_features(model: nn.Module, dataset: Any, collator: Any, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(features the reward head's last linear layer reads at the pooled token, labels) for every
    row of a tokenized pointwise ``dataset``, computed without grad in eval mode."""
    front, _ = head_layers(model)
    pad = unwrap(model).config.get_text_config().pad_token_id
    device = unwrap(model).get_input_embeddings().weight.device
    columns = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    feats, labels = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in DataLoader(dataset.select_columns(columns), batch_size=batch_size, collate_fn=collator):
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                hidden = decoder(model)(input_ids=ids, attention_mask=mask).last_hidden_state
                feats.append(front(pool_last_token(hidden, ids, mask, pad)).float().cpu())
                labels.append(batch["labels"].reshape(-1).float())
    finally:
        model.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def fit_probe(
    features: np.ndarray, labels: np.ndarray, intercept: bool, groups: Sequence[str] | None = None, seed: int = 0
) -> tuple[np.ndarray, float, dict]:
    """(weight, bias, report) of an L2 logistic regression on ``features``, on the features' scale.

    Features are divided by their std (not centred: a head without bias can then still carry the
    offset through the features' mean), the strength is chosen from :data:`PROBE_CS` by 4-fold
    cross-validated ROC AUC, and the weights are mapped back to the raw features. ``groups`` keep
    each dialog in one fold: rows of one dialog share their context, and folds that split dialogs
    reward memorising them (on coffee, a far weaker penalty, and a probe near chance on held-out
    dialogs)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = labels > 0.5
    if groups is None:
        folds = StratifiedKFold(4, shuffle=True, random_state=seed).split(features, y)
    else:
        folds = StratifiedGroupKFold(4, shuffle=True, random_state=seed).split(features, y, list(groups))
    scale = features.std(axis=0) + 1e-6
    probe = LogisticRegressionCV(
        Cs=list(PROBE_CS), cv=list(folds), scoring="roc_auc", fit_intercept=intercept, max_iter=3000
    )
    probe.fit(features / scale, y)
    weight = probe.coef_[0] / scale
    bias = float(probe.intercept_[0]) if intercept else 0.0
    return weight, bias, {"probe_C": float(probe.C_[0]), "probe_cv_auc": float(probe.scores_[True].mean(0).max())}


def probe_reward_head(trainer: Any, groups: Sequence[str] | None = None, batch_size: int = 32) -> dict[str, float]:
    """Set ``trainer``'s reward head's last linear layer to a logistic-regression probe on the
    frozen model's features for its train rows (every process fits the same rows: same head).
    ``groups``: each train row's dialog (see :func:`fit_probe`); without them a warning says that
    the folds may split dialogs. Returns the chosen strength and the probe's cross-validated AUC."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "rm_head_init: probe reads the whole model on each process before training, which ZeRO-3's "
            "partitioned weights do not allow; set rm_head_init: random under ZeRO-3."
        )
    model = trainer.model
    features, labels = head_features(model, trainer.train_dataset, trainer.data_collator, batch_size)
    _, layers = head_layers(model)
    intercept = layers[0].bias is not None
    if groups is None:
        logger.warning("rm_head_init probe: no dialog of each train row: cross-validation folds may split dialogs")
    elif len(groups) != len(labels):
        raise ValueError(f"probe_reward_head: {len(groups)} groups for {len(labels)} train rows.")
    weight, bias, report = fit_probe(features, labels, intercept, groups, seed=trainer.args.seed)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype).reshape_as(layer.weight))
            if intercept:
                layer.bias.fill_(bias)
    return report
