"""benchmarks/quality.py: the scores it rates are each row's own, as the RL stage reads them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import load_benchmark
from transformers import AutoModelForCausalLM, AutoTokenizer

from perl_plugins.data import taskmaster
from perl_plugins.data.defaults import heldout_rows, trim_context
from perl_plugins.models.embedded import resolve_model
from perl_plugins.models.reward import load_reward_adapter, score_texts


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality.py")


def test_reward_model_scores_follow_the_evaluation_rows(quality, tmp_path):
    """Each score belongs to its row: the saved reward adapter, scoring one row at a time, gives the
    same value (a length-grouped eval sampler once reordered them, so AUCs compared shuffled scores)."""
    rows = [dataclasses.replace(r, prompt=trim_context(r.prompt, 2)) for r in taskmaster.load_splits()["train"][:60]]
    train, evaluation = rows[:24], rows[24:]
    assert len({len(r.prompt + r.completion) for r in evaluation}) > 10  # lengths vary: a length sampler reorders
    args = quality.parse_args(["--set", "rm_max_steps=1", "--set", "rm_batch_size=8", "--set", "max_length=96"])
    cfg = quality.recipe_config(args, 0, str(tmp_path))
    model_path = resolve_model(None, "tiny")
    scores, _ = quality.reward_model("rm_lora", cfg, model_path, train, evaluation, save_to=str(tmp_path / "rm"))

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = load_reward_adapter(AutoModelForCausalLM.from_pretrained(model_path), tmp_path / "rm")
    one_by_one = [
        score_texts(model, tokenizer, [r.prompt + r.completion], max_length=cfg.max_length).item() for r in evaluation
    ]
    assert np.std(one_by_one) > 0
    np.testing.assert_allclose(scores, one_by_one, rtol=1e-4, atol=1e-5)


def test_goals_read_each_seeds_rl_gain_and_kl_against_the_yamls_limit(quality):
    def run(gain: float, kl: float, full_gain: float) -> dict:
        lora = {"rl_gain_in_std": gain, "rl_final_kl": kl, "rl_kl_limit": 0.5}
        return {"lora": lora, "full": {"rl_full_gain_in_std": full_gain, "rl_full_final_kl": 0.1}}

    runs = [run(1.0, 0.2, 1.1), run(0.6, 0.49, 0.9)]
    table = quality.build_table({}, runs)
    assert table["rl"]["rl_gain_in_std"] == [1.0, 0.6]
    assert quality.goals(table) == {
        "rl_gain_ge_0.5_std_each_seed": True,
        "rl_final_kl_below_limit_each_seed": True,
        "rl_lora_over_full_gain_ge_0.8": True,  # 0.8 / 1.0
    }
    worse = quality.goals(quality.build_table({}, [run(1.0, 0.2, 1.1), run(0.4, 0.51, 2.0)]))
    assert worse == {
        "rl_gain_ge_0.5_std_each_seed": False,
        "rl_final_kl_below_limit_each_seed": False,
        "rl_lora_over_full_gain_ge_0.8": False,  # 0.7 / 1.55
    }


def test_a_validation_run_writes_its_own_table_and_does_not_claim_the_goals(quality):
    """Figures that chose settings never overwrite the test split's, and their goals read as such."""
    assert quality.results_path(None).name == "quality.md"
    assert quality.results_path(None, validate=True).name == "quality-validation.md"
    assert quality.results_path("org/Some Model", validate=True).name == "quality-Some-Model-validation.md"
    row = {"auc_mean": 0.7, "auc_std": 0.0, "balanced_accuracy_mean": 0.6, "balanced_accuracy_std": 0.0}
    setup = {"date": "d", "command": "c", "model": "m", "seeds": [0], "train_rows": 1, "eval_rows": 1}
    for split, heading, se in (
        ("test", "Goals: ", "test-sample SE"),
        ("validation", "judged on the test", "validation-sample SE"),
    ):
        table = {"rm_lora": row, "goals": {"rm_lora_auc_ge_0.72": False}}
        read = split == "validation"
        table["setup"] = {
            **setup,
            "evaluated_on": split,
            "eval_negatives": 1,
            "leaks": {},
            "base_read_eval_texts": read,
        }
        text = quality.markdown(table)
        assert heading in text and se in text and "rm_lora_auc_ge_0.72: NOT met" in text
        assert ("pre-trained on these rows' texts" in text) == read


def test_validate_evaluates_on_the_one_validation_split_every_tuning_tool_carves(quality):
    """The recipes' ``heldout_split: validation`` and a base pre-trained with ``heldout: validation``
    leave out these same rows, so a setting chosen here is chosen on rows none of them trained on."""
    train, evaluation, name = quality.load_rows(quality.parse_args(["--validate"]))
    carved = heldout_rows(heldout="validation")
    assert name == "validation"
    assert (train, evaluation) == (carved["train"], carved["test"])
    assert set(evaluation).isdisjoint(taskmaster.load_splits()["test"])


def test_cross_validation_table_pairs_each_goals_difference_by_fold(quality):
    """``--folds``: means over folds with the standard error of the fold-to-fold spread, and every
    goal's difference taken fold by fold (the same rows) before averaging."""
    aucs = {"tfidf_logreg": [0.70, 0.74, 0.72], "rm_lora": [0.75, 0.76, 0.80], "rm_full": [0.74, 0.77, 0.78]}
    outcomes = [
        {"results": {m: {"auc": a[i], "balanced_accuracy": a[i] - 0.1} for m, a in aucs.items()}} for i in range(3)
    ]
    table = quality.cv_table(outcomes, list(aucs))
    lora = np.asarray(aucs["rm_lora"])
    assert table["rm_lora"]["auc_mean"] == pytest.approx(lora.mean())
    assert table["rm_lora"]["auc_se"] == pytest.approx(lora.std(ddof=1) / np.sqrt(3))
    diff = lora - np.asarray(aucs["tfidf_logreg"])
    got = table["differences"]["rm_lora_minus_tfidf_logreg"]
    assert got["mean"] == pytest.approx(diff.mean()) and got["se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(3))
    assert quality.goals(table) == {
        "rm_lora_auc_ge_0.72": True,
        "rm_lora_beats_tfidf_by_0.03": True,  # 0.770 vs 0.720
        "rm_lora_within_0.02_of_full": True,  # 0.770 vs 0.763
    }
    table["goals"] = quality.goals(table)
    table["setup"] = {"folds": 3, "date": "d", "command": "c", "model": "m", "seed": 0}
    table["setup"].update(eval_rows=9, eval_negatives=3, leaks=[{}] * 3)
    text = quality.cv_markdown(table)
    assert "3-fold cross-validation" in text and "| rm_lora − tfidf_logreg | +0.050 ± 0.017 |" in text
    assert quality.results_path(None, cv=True).name == "quality-cv.md"


def test_cross_validation_runs_every_fold_end_to_end(quality, tmp_path, capsys):
    """A tiny run: each fold trains on the others and scores its own rows; the JSON is the last line."""
    tiny = resolve_model(None, "tiny")
    argv = ["--folds", "2", "--model", tiny, "--methods", "tfidf_logreg,rm_lora", "--no_write"]
    argv += ["--max_train_rows", "48", "--max_eval_rows", "120", "--set", "rm_max_steps=2", "--set", "max_length=64"]
    table = quality.main(argv)
    assert table["setup"]["eval_rows"] == 240 and [len(table[m]["per_fold_auc"]) for m in ("rm_lora",)] == [2]
    assert table["setup"]["leaks"] == [{"prefix_rows": 0, "shared_ids": 0, "shared_prompts": 0}] * 2
    assert set(table["differences"]) == {"rm_lora_minus_tfidf_logreg"}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["setup"]["folds"] == 2
    with pytest.raises(SystemExit):
        quality.parse_args(["--folds", "5", "--rl"])


def test_a_fold_base_built_for_another_fold_is_refused(tmp_path):
    """A fold's base must not have read that fold: a directory holding another fold's base is an error."""
    folds = load_benchmark("_folds.py")
    base = tmp_path / "fold-1-of-5"
    base.mkdir()
    (base / "card.json").write_text(json.dumps({"data": {"heldout": "fold:2/5"}}))
    with pytest.raises(SystemExit, match=r"heldout 'fold:2/5', not 'fold:1/5'"):
        folds.fold_base(tmp_path, "fold:1/5")
    (base / "card.json").write_text(json.dumps({"data": {"heldout": "fold:1/5"}}))
    assert folds.fold_base(tmp_path, "fold:1/5") == str(base)
