"""benchmarks/recipes_cv.py: recipes' held-out figures pooled over leak-free folds."""

from __future__ import annotations

import json
import math

import pytest
from conftest import load_benchmark

from perl_plugins.models.embedded import resolve_model


@pytest.fixture(scope="module")
def recipes_cv():
    return load_benchmark("recipes_cv.py")


def test_folds_pool_by_their_pairs_with_independent_standard_errors(recipes_cv):
    folds = [
        {"eval_pairs": 10, "x_before": 0.5, "x_before_se": 0.1, "x_after": 0.7, "x_after_se": 0.1},
        {"eval_pairs": 30, "x_before": 0.5, "x_before_se": 0.05, "x_after": 0.6, "x_after_se": 0.08},
    ]
    for f in folds:
        f.update(x_gain=f["x_after"] - f["x_before"], x_gain_se=0.02)
    got = recipes_cv.pooled(folds, "x", "eval_pairs")
    assert got["eval_pairs"] == 40
    assert got["after"] == pytest.approx(0.25 * 0.7 + 0.75 * 0.6)
    assert got["after_se"] == pytest.approx(math.sqrt((0.25 * 0.1) ** 2 + (0.75 * 0.08) ** 2))
    assert got["gain"] == pytest.approx(0.125) and got["after_per_fold"] == [0.7, 0.6]
    assert recipes_cv.goal_met("dpo", got) is False  # 0.625 < 0.65
    assert recipes_cv.goal_met("rrhf", got) is True  # 0.125 > 2 x 0.0158
    with pytest.raises(SystemExit):
        recipes_cv.parse_args(["--recipes", "dpo,ppo"])


def test_every_fold_runs_the_recipe_on_its_own_split(recipes_cv, capsys):
    """DPO on 2 folds with a tiny model: each fold's summary is read back and pooled."""
    argv = ["--recipes", "dpo", "--folds", "2", "--model", resolve_model(None, "tiny"), "--no_write"]
    for item in ("max_prompt_tokens=48", "train_samples=8", "eval_samples=8", "max_steps=1", "batch_size=4"):
        argv += ["--set", item]
    table = recipes_cv.main(argv)
    assert table["dpo"]["eval_pairs"] == 16 and len(table["dpo"]["after_per_fold"]) == 2
    assert table["dpo"]["before"] == 0.5  # policy = reference before training: every margin ties
    assert "fold:1/2" in capsys.readouterr().out
    assert json.loads(json.dumps(table))["setup"]["folds"] == 2
    assert "| dpo | `eval_reward_accuracy` | 16 |" in recipes_cv.markdown(table)


def test_a_work_dir_reuses_a_run_only_for_the_same_command(recipes_cv, tmp_path, monkeypatch):
    """``--work_dir``: a finished run of the very same command is read back, not run again; another
    setting runs afresh."""
    calls = []

    def fake_run(cmd, **_):
        calls.append(cmd)
        out = tmp_path / "dpo-0"
        out.mkdir(exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"metrics": {"eval_pairs": len(calls)}}))

    monkeypatch.setattr(recipes_cv.subprocess, "run", fake_run)
    args = recipes_cv.parse_args(["--model", "m", "--work_dir", str(tmp_path)])
    assert recipes_cv.run_recipe(args, "dpo", 0, tmp_path / "dpo-0") == {"eval_pairs": 1}
    assert recipes_cv.run_recipe(args, "dpo", 0, tmp_path / "dpo-0") == {"eval_pairs": 1} and len(calls) == 1
    args = recipes_cv.parse_args(["--model", "m", "--work_dir", str(tmp_path), "--set", "beta=0.1"])
    assert recipes_cv.run_recipe(args, "dpo", 0, tmp_path / "dpo-0") == {"eval_pairs": 2}
