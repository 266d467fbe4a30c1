"""The PERL recipe and `perl-plugins demo` end to end, at a tiny size."""

from __future__ import annotations

import json
import math

from perl_plugins.cli import main as cli_main

TINY = [
    "--model_size", "tiny", "--rm_train_samples", "48", "--rm_eval_samples", "48", "--rm_max_steps", "3",
    "--rl_max_steps", "2", "--rl_prompts", "8", "--rl_eval_prompts", "4", "--rl_batch_size", "4",
    "--rl_num_generations", "2", "--rl_max_completion_length", "8",
]
KEYS = ("rm_eval_accuracy", "rm_eval_auc", "rl_reward_before", "rl_reward_after", "rl_final_kl")


def test_demo_runs_the_perl_recipe_and_writes_summary_and_curves(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--output_dir", str(out), "--rm_plugins", "lora,grm", *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "perl"
    assert all(math.isfinite(summary["metrics"][key]) for key in KEYS)
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "reward_adapter" / "perl_reward_head.json").is_file()
    assert "PERL demo done" in capsys.readouterr().out
