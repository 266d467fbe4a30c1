"""benchmarks/grm_eval.py: proxies train on the data their regularizer needs, save adapters that
score as trained, and the aggregation and goals are the formulas the issue states."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from conftest import load_benchmark
from transformers import AutoModelForCausalLM, AutoTokenizer

from perl_plugins.data.defaults import default_dataset
from perl_plugins.models.embedded import resolve_model
from perl_plugins.models.reward import load_reward_adapter, score_texts


@pytest.fixture(scope="module")
def grm_eval():
    return load_benchmark("grm_eval.py")


def test_dpo_proxies_bring_their_pairs_baseline_and_unknown_names_are_refused(grm_eval):
    chosen = grm_eval.chosen_variants(grm_eval.parse_args(["--proxies", "dpo"]))
    assert chosen == {
        "baseline": ("rows", "sft", 0.0),
        "pairs_baseline": ("pairs", "sft", 0.0),
        "dpo": ("pairs", "dpo", 0.01),
    }
    assert set(grm_eval.chosen_variants(grm_eval.parse_args(["--quick"]))) == {"baseline", "sft"}
    assert {d for d, _, _ in grm_eval.chosen_variants(grm_eval.parse_args([])).values()} == {"rows", "pairs"}
    with pytest.raises(SystemExit, match="sft_a7"):
        grm_eval.chosen_variants(grm_eval.parse_args(["--proxies", "sft_a7"]))


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_a_proxy_trains_on_its_data_and_its_saved_adapter_scores_as_trained(grm_eval, tmp_path, name):
    args = grm_eval.parse_args(["--proxy_epochs", "1", "--proxies", name])
    cfg = dataclasses.replace(grm_eval.recipe_config(args, 0, str(tmp_path)), max_length=96)
    model_path = resolve_model(None, "tiny")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = default_dataset("reward", context_turns=2)
    pairs = default_dataset("reward", feedback="pairs", context_turns=2)
    data = {
        "rows": rows["train"].select(range(24)),
        "pairs": pairs["train"].select(range(12)),
        "test_pairs": pairs["test"].select(range(6)),
        "test_rows": rows["test"].select(range(20)),
    }
    variant = grm_eval.chosen_variants(args)[name]
    trainer, loss = grm_eval.train_proxy(name, variant, args, cfg, model_path, data)
    metrics = grm_eval.proxy_metrics(trainer, loss, tokenizer, data, str(tmp_path / "adapter"), 0.0)
    # RewardTrainer drops pairs longer than max_length; the rows are truncated instead
    assert metrics["train_examples"] == 24 if variant[0] == "rows" else 0 < metrics["train_examples"] <= 12
    assert 0.0 <= metrics["auc"] <= 1.0 and math.isfinite(metrics["train_loss"])
    texts = [p + c for p, c in zip(data["test_rows"]["prompt"], data["test_rows"]["completion"])]
    trained = score_texts(trainer.model.eval(), tokenizer, texts)
    reloaded = load_reward_adapter(AutoModelForCausalLM.from_pretrained(model_path), str(tmp_path / "adapter"))
    np.testing.assert_allclose(score_texts(reloaded.eval(), tokenizer, texts), trained, atol=1e-5)


def test_aggregate_is_best_of_n_and_mean_with_standard_error_over_seeds(grm_eval):
    rng = np.random.default_rng(0)
    samples = {"prompts": ["a", "b", "c"], "completions": [[f"{p}{i}" for i in range(32)] for p in "abc"]}
    gold_table = {p + c: rng.normal() for p, cs in zip(samples["prompts"], samples["completions"]) for c in cs}
    gold = lambda texts: np.asarray([gold_table[t] for t in texts])  # noqa: E731
    runs = [
        {"proxies": {"baseline": {"auc": auc, "pair_accuracy": 0.5, "bon_proxy_scores": rng.normal(size=96).tolist()}}}
        | {"rl": {}}
        for auc in (0.6, 0.7)
    ]
    row = grm_eval.aggregate(samples, runs, gold)["baseline"]
    assert row["auc"] == pytest.approx(0.65) and row["auc_se"] == pytest.approx(np.std([0.6, 0.7], ddof=1) / 2**0.5)
    golds = gold([p + c for p, cs in zip(samples["prompts"], samples["completions"]) for c in cs]).reshape(3, 32)
    per_seed = []
    for run in runs:
        proxy = np.asarray(run["proxies"]["baseline"]["bon_proxy_scores"]).reshape(3, 32)
        per_seed.append(np.mean([golds[p, proxy[p].argmax()] for p in range(3)]))  # best of all 32
    assert row["bon_gold"]["32"] == pytest.approx(np.mean(per_seed))
    assert row["bon_gold"]["1"] == pytest.approx(golds.mean())


def test_goals_need_sft_ahead_by_more_than_the_sum_of_standard_errors(grm_eval):
    def proxy(auc, bon, se):
        return {"auc": auc, "bon_gold": {"32": bon}, "bon_gold_se": {"32": se}}

    assert grm_eval.goals({"baseline": proxy(0.6, 1.0, 0.1), "sft": proxy(0.61, 1.25, 0.1)}) == {
        "sft_bon_gold_32_beats_baseline": True,
        "sft_auc_ge_baseline": True,
    }
    assert not grm_eval.goals({"baseline": proxy(0.6, 1.0, 0.1), "sft": proxy(0.5, 1.15, 0.1)})[
        "sft_bon_gold_32_beats_baseline"
    ]
