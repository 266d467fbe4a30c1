"""``perl-plugins demo``: the PERL recipe at demo size on the embedded default, offline, ≤ 5 minutes
on 2 CPU cores; ends with a short human-readable summary."""

from __future__ import annotations

from collections.abc import Sequence

# Demo size: fewer reward-model rows and RL steps than recipes/perl.yaml; flags after `demo` override.
DEMO_ARGS = [
    "--output_dir", "outputs/demo",
    "--rm_train_samples", "1600",
    "--rm_eval_samples", "336",
    "--rl_max_steps", "15",
    "--rl_prompts", "48",
    "--rl_eval_prompts", "24",
]


def main(argv: Sequence[str] = ()) -> int:
    from importlib.resources import files

    from perl_plugins.recipes import perl

    config = files("perl_plugins.recipes").joinpath("perl.yaml")
    metrics = perl.main(["--config", str(config), *DEMO_ARGS, *argv])
    auc, before, after = metrics["rm_eval_auc"], metrics["rl_reward_before"], metrics["rl_reward_after"]
    print(
        "\nPERL demo done: one frozen base served the reward model (LoRA + head), the policy (LoRA) and the\n"
        f"reference (adapters off). Reward model held-out AUC {auc:.3f}; RL reward on held-out prompts "
        f"{before:.3f} -> {after:.3f}.\nsummary.json and curves.png are in the output directory printed above."
    )
    return 0
