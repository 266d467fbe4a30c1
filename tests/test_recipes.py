"""Every recipe end to end at a tiny size (tiny embedded base, a few steps), copied out of the package
with ``perl-plugins recipes cp`` into a temp dir and run there in a fresh interpreter that sees only
the installed ``perl_plugins`` (not the checkout, nor the other recipes): summary.json holds the
recipe's metrics, all present and finite, curves.png is written, and every saved adapter has a model
card. (PERL in-process: tests/test_perl_recipe.py.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from perl_plugins.cli.recipes import copy_recipe

CHECKOUT = Path(__file__).resolve().parents[1]

COMMON = "--model_size tiny --context_turns 2 --max_prompt_tokens 48 --max_length 96".split()
RM_TINY = "--rm_train_samples 32 --rm_eval_samples 32 --rm_max_steps 2 --rm_batch_size 8".split()
RL_TINY = (
    "--rl_max_steps 2 --rl_prompts 4 --rl_eval_prompts 4 --rl_batch_size 4 --rl_num_generations 2 "
    "--rl_max_completion_length 6"
).split()

# run name -> (flags after the recipe's own YAML, metrics its summary must hold)
RUNS = {
    "perl": (
        [*COMMON[:4], *RM_TINY, *RL_TINY],
        "rm_eval_accuracy rm_eval_auc rm_eval_loss rl_reward_before rl_reward_after rl_final_kl".split(),
    ),
    "dpo": (
        [*COMMON, *"--train_samples 8 --eval_samples 8 --max_steps 2 --batch_size 4".split()],
        "eval_reward_accuracy_before eval_reward_accuracy_after eval_reward_accuracy_gain eval_reward_accuracy_gain_se "
        "eval_reward_accuracy_after_se eval_reward_margin_before eval_reward_margin_after eval_reference_accuracy "
        "eval_pairs eval_loss train_loss goal_met".split(),
    ),
    "rrhf": (
        # every held-out group: few of them have differently-rated replies, and a standard error needs two
        [*COMMON, *"--train_groups 6 --eval_groups 0 --train_eval_groups 4 --max_steps 2".split()],
        "eval_ranking_accuracy_before eval_ranking_accuracy_after eval_ranking_accuracy_before_se "
        "eval_ranking_accuracy_after_se eval_ranking_accuracy_gain eval_ranking_accuracy_gain_se eval_groups "
        "eval_pairs goal_met train_ranking_accuracy_before train_ranking_accuracy_after train_loss".split(),
    ),
    "rrhf_policy_samples": (
        [
            *COMMON,
            *RM_TINY,
            *"--train_groups 4 --eval_groups 0 --train_eval_groups 2 --max_steps 2 --policy_samples 2".split(),
            *"--sample_max_new_tokens 6".split(),
        ],
        "rm_eval_accuracy rm_eval_auc eval_ranking_accuracy_before eval_ranking_accuracy_after".split(),
    ),
    "raft": (
        [
            *COMMON,
            *RM_TINY,
            *"--raft_iterations 2 --raft_prompts 4 --raft_k 2 --max_new_tokens 6 --eval_prompts 4 --eval_samples 2".split(),
            *"--sft_epochs 1 --raft_selection top".split(),
        ],
        "rm_eval_accuracy rm_eval_auc reward_iter_1 reward_iter_2 reward_first_iter reward_last_iter "
        "kept_reward_last_iter eval_reward_before eval_reward_after eval_reward_before_se eval_reward_after_se "
        "eval_gain eval_gain_se eval_gain_in_std eval_prompts goal_met".split(),
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
    script = run_copied_recipe(recipe, tmp_path, ["--output_dir", str(tmp_path), "--seed", "0", *argv])
    assert not str(script).startswith(str(CHECKOUT))

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["recipe"] == recipe
    metrics = summary["metrics"]
    missing = [key for key in expected if key not in metrics]
    assert not missing, f"{recipe} summary lacks {missing}"
    bad = {k: v for k, v in metrics.items() if v is None or not math.isfinite(v)}
    assert not bad, f"{recipe} summary has non-finite metrics {bad}"
    assert (tmp_path / "curves.png").stat().st_size > 0
    check_model_cards(tmp_path)
    if recipe == "rlaif":
        _check_labels_file(tmp_path / "rlaif_labels.jsonl", metrics["labelled_pairs"])


def run_copied_recipe(recipe: str, tmp_path: Path, argv: list[str]) -> Path:
    """``recipes cp`` the recipe into ``tmp_path/repo`` and run it there: ``python -I`` puts neither
    the checkout nor the script's own folder on the path, so only installed packages import."""
    written = copy_recipe(recipe, tmp_path / "repo")
    script, config = (next(p for p in written if p.suffix == suffix) for suffix in (".py", ".yaml"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-I", str(script), "--config", str(config), *argv],
        cwd=tmp_path / "repo",
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return script


def check_model_cards(out: Path) -> None:
    """Every adapter the run saved carries a README.md card with base, fingerprint, data, metrics."""
    # (peft also saves a policy's other adapters, e.g. the reward one, in sub-folders: copies, skipped)
    adapters = [
        p.parent
        for p in out.rglob("adapter_config.json")
        if "repo" not in p.parts and not (p.parent.parent / "adapter_config.json").is_file()
    ]
    assert adapters, f"no adapter saved under {out}"
    for adapter in adapters:
        card = (adapter / "README.md").read_text()
        assert card.startswith("---\n") and "library_name: peft" in card, adapter
        assert "Base fingerprint:** `not recorded" not in card and "**Plugins:** `lora`" in card, adapter
        assert "CC BY 4.0" in card and "## Held-out metrics" in card and "| metric | value |" in card, adapter


LABEL_KEYS = (
    "prompt response_1 response_2 p_1_preferred p_1_preferred_order_12 p_1_preferred_order_21 thumbs_1 thumbs_2"
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
