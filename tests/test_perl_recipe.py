"""The PERL recipe and `perl-plugins demo` end to end, at a tiny size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from perl_plugins.cli import main as cli_main
from perl_plugins.training import recipe_kit

TINY = [
    "--model_size",
    "tiny",
    "--rm_train_samples",
    "48",
    "--rm_eval_samples",
    "48",
    "--rm_max_steps",
    "3",
    "--rl_max_steps",
    "2",
    "--rl_prompts",
    "8",
    "--rl_eval_prompts",
    "4",
    "--rl_batch_size",
    "4",
    "--rl_num_generations",
    "2",
    "--rl_max_completion_length",
    "8",
]
KEYS = (
    "rm_eval_accuracy",
    "rm_eval_auc",
    "rl_reward_before",
    "rl_reward_after",
    "rl_reward_before_se",
    "rl_reward_after_se",
    "rl_gain_in_std",
    "rl_gain_se",
    "rl_final_kl",
    "rl_length_before",
    "rl_length_after",
)


def test_demo_runs_the_perl_recipe_and_writes_summary_and_curves(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--output_dir", str(out), "--rm_plugins", "lora,grm", *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "perl"
    assert all(math.isfinite(summary["metrics"][key]) for key in KEYS)
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "reward_adapter" / "perl_reward_head.json").is_file()
    assert "Mean completion length" in (out / "samples.md").read_text()
    printed = capsys.readouterr().out
    assert "PERL demo done" in printed and "standard error" in "\n".join(printed.splitlines()[-3:])


def test_demo_compares_a_full_fine_tuning_policy(tmp_path):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--output_dir", str(out), "--rl_compare_full", "true", *TINY]) == 0
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    for key in ("rl_full_reward_before", "rl_full_reward_after", "rl_full_gain_in_std", "rl_full_final_kl"):
        assert math.isfinite(metrics[key]), key


def test_rl_report_matches_its_formulas():
    rng = np.random.default_rng(0)
    n, k = 6, 3
    before_r = rng.normal(size=(n, k))
    after_r = before_r + rng.normal(0.5, 0.3, size=(n, k))

    def side(r):
        return {
            "mean": r.mean(),
            "std": r.std(ddof=1),
            "per_prompt": r.mean(1),
            "mean_length": 5.0,
            "se": r.mean(1).std(ddof=1) / math.sqrt(n),
        }

    report = recipe_kit.rl_report(side(before_r), side(after_r))
    gain = after_r.mean() - before_r.mean()
    assert report["rl_gain"] == pytest.approx(gain)
    assert report["rl_gain_in_std"] == pytest.approx(gain / np.std(before_r.ravel(), ddof=1))
    diffs = after_r.mean(1) - before_r.mean(1)
    assert report["rl_gain_se"] == pytest.approx(np.sqrt(np.sum((diffs - diffs.mean()) ** 2) / (n - 1) / n))
    assert report["rl_reward_after_se"] == pytest.approx(side(after_r)["se"])
