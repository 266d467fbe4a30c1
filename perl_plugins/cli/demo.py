"""``perl-plugins demo``: the PERL recipe at demo size on the embedded default, offline, ≤ 5 minutes
on 2 CPU cores; ends with a short human-readable summary."""

from __future__ import annotations

from collections.abc import Sequence

# Demo size: fewer reward-model rows, epochs and RL prompts than recipes/perl.yaml, its RL steps (held-out
# evaluation as in the YAML: every held-out row, 64 prompts x 4 samples); flags after `demo` override.
DEMO_ARGS = [
    "--output_dir",
    "outputs/demo",
    "--rm_train_samples",
    "1600",
    "--rm_epochs",
    "1",
    "--rl_prompts",
    "48",
]


def verdict(metrics: dict[str, float]) -> str:
    """The demo's closing lines: what the reward model and the RL stage achieved, in words."""
    gain, se = metrics["rl_gain"], metrics["rl_gain_se"]
    if gain > 2 * se:
        judged = "a gain that clears twice its standard error: the RL stage learned"
    elif gain > se:
        judged = "a gain that clears its standard error, though not twice over"
    else:
        judged = "no gain beyond its standard error: the RL stage did not raise the held-out reward"
    if metrics["rl_gain_in_std"] < 0.5:
        judged += " (a small shift: the goal is 0.5 standard deviations)"
    if not metrics["rm_eval_auc"] >= 0.6:  # NaN too (stage 1 skipped)
        judged += "; the reward model is near chance on held-out thumbs, so a higher reward is not yet a better reply"
    kl_ok = "below" if metrics["rl_final_kl"] < metrics["rl_kl_limit"] else "ABOVE"
    return (
        f"Reward model held-out ROC AUC {metrics['rm_eval_auc']:.3f} (0.5 is chance).\n"
        f"RL reward on held-out prompts {metrics['rl_reward_before']:.3f} ± {metrics['rl_reward_before_se']:.3f} -> "
        f"{metrics['rl_reward_after']:.3f} ± {metrics['rl_reward_after_se']:.3f}: "
        f"{gain:+.3f} ± {se:.3f} ({metrics['rl_gain_in_std']:+.2f} standard deviations), {judged}.\n"
        f"Final KL to the reference {metrics['rl_final_kl']:.4f}, {kl_ok} the documented limit {metrics['rl_kl_limit']}; "
        f"completions {metrics['rl_length_before']:.1f} -> {metrics['rl_length_after']:.1f} characters on average "
        "(samples.md shows them)."
    )


def main(argv: Sequence[str] = ()) -> int:
    import runpy

    from perl_plugins.cli.recipes import find_recipes

    # Run the shipped recipe file, as `tune run` does: the package never imports a recipe.
    recipe = find_recipes()["perl"]
    perl = runpy.run_path(str(recipe.script), run_name="perl_plugins_demo_recipe")
    metrics = perl["main"](["--config", str(recipe.config), *DEMO_ARGS, *argv])
    print(
        "\nPERL demo done: one frozen base served the reward model (LoRA + head), the policy (LoRA) and the\n"
        "reference (adapters off). summary.json, samples.md and curves.png are in the output directory above.\n"
        + verdict(metrics)
    )
    return 0
