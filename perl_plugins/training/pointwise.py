"""Pointwise (thumbs up/down) reward-model training on a *stock* ``transformers.Trainer``.

PERL's Taskmaster feedback is pointwise. A one-label sequence-classification model configured
with ``problem_type="multi_label_classification"`` already computes binary cross-entropy of
sigmoid(r(x, y)) against the 0/1 label, so no custom loss is needed: this module only tokenizes,
pads, and scores (accuracy, ROC AUC).
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)
from trl.data_utils import common_prefix_length

from perl_plugins.models.reward import APPEND_EOS_KEY, RewardEncoding, reward_ids
from perl_plugins.training.reward_metrics import reward_metrics


def reward_classifier(model_name_or_path: str, **kwargs: Any) -> PreTrainedModel:
    """A one-label classifier whose stock loss is BCE on the reward logit (pointwise feedback)."""
    return AutoModelForSequenceClassification.from_pretrained(
        model_name_or_path, num_labels=1, problem_type="multi_label_classification", **kwargs
    )


def balance_labels(dataset: datasets.Dataset, seed: int = 0) -> datasets.Dataset:
    """``dataset`` with rows of its rarer ``label`` repeated (all of them, then a seeded draw
    without replacement) until both labels count as many rows: thumbs-down rows are few (14% of
    the coffee rows), and a balanced gradient asks the head to tell them apart rather than say "up"."""
    labels = np.asarray(dataset["label"], dtype=float) > 0.5
    rare = np.flatnonzero(labels) if labels.sum() < (~labels).sum() else np.flatnonzero(~labels)
    missing = len(labels) - 2 * len(rare)
    if len(rare) == 0 or missing <= 0:
        return dataset
    rng = np.random.default_rng(seed)
    extra = np.concatenate([rng.permutation(rare) for _ in range(missing // len(rare) + 1)])[:missing]
    return datasets.concatenate_datasets([dataset, dataset.select(extra.tolist())]).shuffle(seed=seed)


def tokenize_pointwise(
    dataset: datasets.Dataset, tokenizer: Any, max_length: int | None = None, append_eos: bool = False
) -> datasets.Dataset:
    """``prompt``/``completion``/``label`` rows -> ``input_ids``, float ``labels`` and ``prompt_len``
    (prompt tokens, for regularizers that score the completion only). Ids are made by
    :func:`~perl_plugins.models.reward.reward_ids` (the tokenizer's special tokens; EOS appended only
    with ``append_eos``: by default the reward is read at the completion's last token)."""
    encoding = RewardEncoding(pad_token_id=tokenizer.pad_token_id, append_eos=append_eos)

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        ids = reward_ids(tokenizer, row["prompt"] + row["completion"], encoding=encoding)
        prompt_len = common_prefix_length(tokenizer(text=row["prompt"])["input_ids"], ids)
        if max_length is not None and len(ids) > max_length:
            # Cut the oldest context: the reward reads the last token, the completion must stay whole.
            prompt_len = max(0, prompt_len - (len(ids) - max_length))
            ids = ids[-max_length:]
        return {"input_ids": ids, "labels": [float(row["label"])], "prompt_len": prompt_len}

    return dataset.map(encode, remove_columns=dataset.column_names, desc="Tokenizing pointwise rows")


class PointwiseCollator:
    """Right-pads ``input_ids``; ``labels`` become a float ``(batch, 1)`` tensor."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[i, :n] = torch.tensor(example["input_ids"])
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.float32).view(-1, 1)
        return batch


def pointwise_trainer(
    model: PreTrainedModel,
    tokenizer: Any,
    args: TrainingArguments,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset | None = None,
    max_length: int | None = None,
    append_eos: bool = False,
    **trainer_kwargs: Any,
) -> Trainer:
    """A stock ``Trainer`` for thumbs up/down rows (``prompt``, ``completion``, ``label``).
    ``append_eos``: see :func:`tokenize_pointwise`; recorded on the model's config, so scoring
    (and a saved reward adapter's ``perl_reward_head.json``) encodes texts the same way."""
    # As trl's RewardTrainer: the classifier pools at the last token that is not the collator's pad.
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    setattr(model.config, APPEND_EOS_KEY, append_eos)
    train_dataset, eval_dataset = (
        tokenize_pointwise(d, tokenizer, max_length, append_eos) if d is not None else None
        for d in (train_dataset, eval_dataset)
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PointwiseCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        compute_metrics=reward_metrics,
        **trainer_kwargs,
    )
    # The BCE ignores num_items_in_batch: the Trainer must divide it by the accumulation steps itself.
    trainer.model_accepts_loss_kwargs = False
    return trainer
