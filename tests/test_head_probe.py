"""LP-FT for reward heads: the probe is sklearn's logistic regression on scaled features, mapped
back to raw features, and it lands in the layer that scores (plain, LoRA's trainable copy, MLP)."""

import numpy as np
import pytest
import torch
from conftest import tiny_reward_model

from perl_plugins.models.reward import score, set_reward_head
from perl_plugins.training.head_probe import PROBE_CS, fit_probe, head_features, probe_reward_head


@pytest.mark.parametrize("intercept", [True, False])
def test_fit_probe_is_sklearn_on_std_scaled_features_mapped_back(intercept):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedGroupKFold

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5)) * [1.0, 10.0, 0.1, 3.0, 1.0] + 2.0
    y = (x[:, 0] + 0.1 * x[:, 1] + rng.normal(size=80) > 2.5).astype(float)
    groups = [str(i // 4) for i in range(80)]  # dialogs of 4 rows
    weight, bias, report = fit_probe(x, y, intercept, groups)

    scale = x.std(axis=0) + 1e-6
    folds = StratifiedGroupKFold(4, shuffle=True, random_state=0).split(x, y > 0.5, groups)
    direct = LogisticRegressionCV(
        Cs=list(PROBE_CS), cv=list(folds), scoring="roc_auc", fit_intercept=intercept, max_iter=3000
    ).fit(x / scale, y > 0.5)
    np.testing.assert_allclose(x @ weight + bias, direct.decision_function(x / scale), rtol=1e-6, atol=1e-8)
    assert report["probe_C"] == direct.C_[0]
    assert (bias != 0.0) == intercept


def _pointwise_rows(n: int = 24):
    from datasets import Dataset

    good = [" Sure, one latte.", " One espresso, coming up.", " Iced mocha it is."]
    bad = [" No.", " What?", " Bye."]
    prompts = [f"User: order {i}\nAgent:" for i in range(n)]
    completions = [(good if i % 2 else bad)[i % 3] for i in range(n)]
    return Dataset.from_dict({"prompt": prompts, "completion": completions, "label": [i % 2 for i in range(n)]})


@pytest.mark.parametrize("head", ["linear", "lora", "mlp"])
def test_probe_reward_head_sets_the_scoring_layer_to_the_probe(tokenizer, tmp_path, head):
    from transformers import TrainingArguments

    from perl_plugins import attach
    from perl_plugins.training.pointwise import pointwise_trainer

    model = tiny_reward_model(tokenizer)
    if head == "mlp":
        set_reward_head(model, "mlp")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1, seed=0)
    trainer = pointwise_trainer(model, tokenizer, args, _pointwise_rows())
    if head == "lora":
        attach(trainer, plugins=["lora"], lora_r=4, lora_alpha=8)
    features, labels = head_features(trainer.model, trainer.train_dataset, trainer.data_collator)
    weight, bias, _ = fit_probe(features, labels, intercept=head == "mlp", seed=0)  # no groups: as the call below

    report = probe_reward_head(trainer)

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    trainer.model.eval()
    with torch.no_grad():
        rewards = score(trainer.model, batch["input_ids"], batch["attention_mask"]).numpy()
    np.testing.assert_allclose(rewards, features @ weight + bias, rtol=1e-4, atol=1e-4)
    assert 0.0 <= report["probe_cv_auc"] <= 1.0


def test_recipe_refuses_an_unknown_head_init():
    from types import SimpleNamespace

    from perl_plugins.training import recipe_kit

    cfg = SimpleNamespace(rm_head_init="zeros")
    with pytest.raises(ValueError, match="rm_head_init must be one of"):
        recipe_kit.check_head_init(cfg)


def test_grouped_folds_keep_each_dialog_in_one_fold():
    from sklearn.model_selection import StratifiedGroupKFold

    groups = [str(i // 5) for i in range(60)]
    y = np.arange(60) % 3 == 0
    for train_idx, test_idx in StratifiedGroupKFold(4, shuffle=True, random_state=0).split(np.zeros(60), y, groups):
        assert not {groups[i] for i in train_idx} & {groups[i] for i in test_idx}


def test_pointwise_rows_carry_their_dialog_for_the_probe():
    from perl_plugins.data import taskmaster

    rows = taskmaster.load_feedback()[:50]
    group_of = taskmaster.split_groups(rows)
    ds = taskmaster.pointwise(rows, groups=group_of)
    assert ds["dialog"] == [group_of[r.conversation_id] for r in rows]
    assert "dialog" not in taskmaster.pointwise(rows).column_names
