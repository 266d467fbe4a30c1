"""Every recipe end to end at a tiny size (tiny embedded base, a few steps): summary.json holds the
recipe's metrics, all present and finite, and curves.png is written. (PERL: tests/test_perl_recipe.py.)"""

from __future__ import annotations

import importlib
import json
import math
from importlib.resources import files
from pathlib import Path

import pytest
import torch

COMMON = "--model_size tiny --context_turns 2 --max_prompt_tokens 48 --max_length 96".split()
RM_TINY = "--rm_train_samples 32 --rm_eval_samples 32 --rm_max_steps 2 --rm_batch_size 8".split()
RL_TINY = (
    "--rl_max_steps 2 --rl_prompts 4 --rl_eval_prompts 4 --rl_batch_size 4 --rl_num_generations 2 "
    "--rl_max_completion_length 6"
).split()

# run name -> (flags after the recipe's own YAML, metrics its summary must hold)
RUNS = {
    "dpo": (
        [*COMMON, *"--train_samples 8 --eval_samples 8 --max_steps 2 --batch_size 4".split()],
        "eval_reward_accuracy eval_reward_margin eval_loss train_loss".split(),
    ),
    "rrhf": (
        [*COMMON, *"--train_groups 6 --eval_groups 8 --train_eval_groups 4 --max_steps 2".split()],
        "eval_ranking_accuracy_before eval_ranking_accuracy_after train_ranking_accuracy_before "
        "train_ranking_accuracy_after train_loss".split(),
    ),
    "rrhf_policy_samples": (
        [
            *COMMON,
            *RM_TINY,
            *"--train_groups 4 --eval_groups 8 --train_eval_groups 2 --max_steps 2 --policy_samples 2".split(),
            *"--sample_max_new_tokens 6".split(),
        ],
        "rm_eval_accuracy rm_eval_auc eval_ranking_accuracy_before eval_ranking_accuracy_after".split(),
    ),
    "raft": (
        [
            *COMMON,
            *RM_TINY,
            *"--raft_iterations 2 --raft_prompts 4 --raft_k 2 --max_new_tokens 6 --eval_prompts 4".split(),
            *"--sft_epochs 1 --raft_selection top".split(),
        ],
        "rm_eval_accuracy rm_eval_auc reward_iter_1 reward_iter_2 reward_first_iter reward_last_iter "
        "kept_reward_last_iter eval_reward_before eval_reward_after".split(),
    ),
    "rlaif": (
        [*COMMON, *"--label_pairs 8 --eval_pairs 8 --rm_max_steps 2".split(), *RL_TINY],
        "labelled_pairs labeller_position_bias labeller_confidence labeller_human_agreement rm_eval_accuracy "
        "rm_eval_margin rl_reward_before rl_reward_after rl_final_kl".split(),
    ),
    "rlaif_dpo": (
        [*COMMON, *"--label_pairs 8 --eval_pairs 8 --preference_learning dpo --dpo_max_steps 2".split()],
        "labelled_pairs labeller_position_bias dpo_eval_reward_accuracy dpo_eval_reward_margin".split(),
    ),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("run", list(RUNS))
def test_recipe_end_to_end(run, tmp_path):
    recipe = run.split("_")[0]
    argv, expected = RUNS[run]
    config = files("perl_plugins.recipes").joinpath(f"{recipe}.yaml")
    module = importlib.import_module(f"perl_plugins.recipes.{recipe}")
    returned = module.main(["--config", str(config), "--output_dir", str(tmp_path), "--seed", "0", *argv])

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["recipe"] == recipe
    metrics = summary["metrics"]
    missing = [key for key in expected if key not in metrics]
    assert not missing, f"{recipe} summary lacks {missing}"
    bad = {k: v for k, v in metrics.items() if v is None or not math.isfinite(v)}
    assert not bad, f"{recipe} summary has non-finite metrics {bad}"
    assert returned.keys() == metrics.keys()
    assert (tmp_path / "curves.png").stat().st_size > 0
    if recipe == "rlaif":
        _check_labels_file(tmp_path / "rlaif_labels.jsonl", metrics["labelled_pairs"])


LABEL_KEYS = (
    "prompt response_1 response_2 p_1_preferred p_1_preferred_order_12 p_1_preferred_order_21 "
    "thumbs_1 thumbs_2"
)


def _check_labels_file(path: Path, count: float) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == count
    for row in rows:
        assert set(LABEL_KEYS.split()) <= row.keys()
        assert row["response_1"] != row["response_2"]
        assert 0.0 <= row["p_1_preferred"] <= 1.0
        assert row["p_1_preferred"] == pytest.approx(
            (row["p_1_preferred_order_12"] + row["p_1_preferred_order_21"]) / 2
        )


def test_every_recipe_ships_a_yaml_with_a_launch_header():
    root = files("perl_plugins.recipes")
    for recipe in ("perl", "dpo", "rrhf", "raft", "rlaif"):
        text = root.joinpath(f"{recipe}.yaml").read_text()
        assert text.startswith("#")
        assert f"python recipes/{recipe}.py --config recipes/{recipe}.yaml" in text
