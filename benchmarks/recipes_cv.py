"""The DPO and RRHF recipes' held-out objectives by K-fold cross-validation of the coffee file.

The test split holds 67 preference pairs from 19 contexts, so one recipe's held-out accuracy
carries a standard error of about 0.06, as large as the gaps its goals ask about. Here every
pair of the file is held out once: for each fold I of K (``heldout_split: fold:I/K``, leak-free
folds of whole dialogs), the recipe runs with its default YAML on the other folds, on a base
pre-trained without fold I (``_folds.fold_base``, the same bases as ``quality.py --folds``). The
folds' before/after figures from each ``summary.json`` are pooled, weighted by the fold's pairs,
with standard errors combined as independent folds'.

Goals, read on the pooled figures: DPO accuracy after >= 0.65 (``recipes/dpo.py``); RRHF gain
> 2 standard errors (``recipes/rrhf.py``). Writes ``benchmarks/results/recipes-cv.md`` (unless
``--no_write``) and prints one JSON object as its last line.

    python benchmarks/recipes_cv.py --jobs 2                       # DPO and RRHF, 5 folds
    python benchmarks/recipes_cv.py --recipes dpo --set beta=0.1   # any recipe key, every fold
    python benchmarks/recipes_cv.py --work_dir outputs/recipes-cv   # keep runs; a rerun reuses finished ones
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _folds import fold_base

from perl_plugins import recipes

# recipe -> (its held-out objective's key prefix, the count that weighs a fold, the goal)
OBJECTIVES = {
    "dpo": ("eval_reward_accuracy", "eval_pairs", "after >= 0.65"),
    "rrhf": ("eval_ranking_accuracy", "eval_pairs", "gain > 2 SE"),
}
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="dpo,rrhf", help="Comma-separated subset of " + ",".join(OBJECTIVES) + ".")
    p.add_argument("--folds", type=int, default=5, help="Number of folds (at least 2).")
    p.add_argument(
        "--fold_bases", default="outputs/fold-bases", help="Each fold's base (fold-I-of-K/), built if missing."
    )
    p.add_argument(
        "--model", default=None, help="One model for every fold instead of the fold bases (no feedback read)."
    )
    p.add_argument("--seed", type=int, default=0, help="Training seed of every run.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a recipe YAML key.")
    p.add_argument("--jobs", type=int, default=1, help="Runs at once, one thread each.")
    p.add_argument(
        "--work_dir",
        default=None,
        help="Keep each run's output here and reuse runs of the same command (default: temp).",
    )
    p.add_argument("--no_write", action="store_true", help="Do not write benchmarks/results/recipes-cv.md.")
    args = p.parse_args(argv)
    unknown = set(args.recipes.split(",")) - set(OBJECTIVES)
    if unknown:
        p.error(f"unknown recipe(s) {sorted(unknown)}; choose from {', '.join(OBJECTIVES)}")
    if args.folds < 2:
        p.error(f"--folds {args.folds}: need at least 2")
    return args


def run_recipe(args: argparse.Namespace, recipe: str, fold: int, out: Path) -> dict[str, Any]:
    """One recipe on one fold, in its own process; its summary.json's metrics (those of an earlier
    run of the very same command in ``out``, if there is one)."""
    heldout = f"fold:{fold}/{args.folds}"
    model = args.model or fold_base(args.fold_bases, heldout)
    script = Path(recipes.__file__).with_name(f"{recipe}.py")
    cmd = [sys.executable, str(script), "--config", str(script.with_suffix(".yaml")), "--output_dir", str(out)]
    cmd += ["--heldout_split", heldout, "--model_name_or_path", model, "--seed", str(args.seed)]
    for item in args.set:
        key, _, value = item.partition("=")
        cmd += [f"--{key}", value]
    done = out / "command.json"
    if not (done.is_file() and json.loads(done.read_text()) == cmd[1:]):
        print(f"[recipes_cv] {recipe} {heldout}: {shlex.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        done.write_text(json.dumps(cmd[1:]))
    return json.loads((out / "summary.json").read_text())["metrics"]


def pooled(folds: list[dict[str, Any]], prefix: str, weight: str) -> dict[str, Any]:
    """Before / after / gain pooled over folds: the weighted mean of the folds' figures, its
    standard error sqrt(sum (w_i SE_i)^2) with w_i the fold's share of ``weight``."""
    total = sum(f[weight] for f in folds)
    out: dict[str, Any] = {weight: total}
    for part in ("before", "after", "gain"):
        key = f"{prefix}_{part}"
        shares = [f[weight] / total for f in folds]
        out[part] = sum(w * f[key] for w, f in zip(shares, folds))
        out[part + "_se"] = math.sqrt(sum((w * f[key + "_se"]) ** 2 for w, f in zip(shares, folds)))
        out[part + "_per_fold"] = [f[key] for f in folds]
    return out


def goal_met(recipe: str, pooled: dict[str, Any]) -> bool:
    if recipe == "dpo":
        return pooled["after"] >= 0.65
    return pooled["gain"] > 2 * pooled["gain_se"]


def markdown(table: dict[str, Any]) -> str:
    setup = table["setup"]
    lines = [
        f"# Recipes on Taskmaster coffee, {setup['folds']}-fold cross-validation (leak-free folds)",
        "",
        f"{setup['date']}; `{setup['command']}`; model `{setup['model']}`; seed {setup['seed']}; every "
        "preference pair held out once; each recipe's default YAML.",
        "",
        "| recipe | held-out objective | held-out pairs | before (± SE) | after (± SE) | gain (± SE) | after, per fold | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for recipe, r in table.items():
        if recipe in OBJECTIVES:
            prefix, weight, goal = OBJECTIVES[recipe]
            lines.append(
                f"| {recipe} | `{prefix}` | {r[weight]:.0f} | {r['before']:.3f} ± {r['before_se']:.3f} | "
                f"{r['after']:.3f} ± {r['after_se']:.3f} | {r['gain']:+.3f} ± {r['gain_se']:.3f} | "
                f"{', '.join(format(a, '.3f') for a in r['after_per_fold'])} | {goal} | "
                f"{'yes' if r['goal_met'] else 'no'} |"
            )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    argv = argv if argv is not None else sys.argv[1:]
    runs = [(recipe, fold) for recipe in args.recipes.split(",") for fold in range(args.folds)]
    with tempfile.TemporaryDirectory(prefix="perl-recipes-cv-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        work = Path(args.work_dir or tmp)
        if args.model is None:  # missing bases first, one per fold, so that no two runs build one
            list(pool.map(lambda fold: fold_base(args.fold_bases, f"fold:{fold}/{args.folds}"), range(args.folds)))
        metrics = list(pool.map(lambda rf: run_recipe(args, *rf, work / f"{rf[0]}-{rf[1]}"), runs))
    table: dict[str, Any] = {}
    for recipe in args.recipes.split(","):
        prefix, weight, _ = OBJECTIVES[recipe]
        folds = [m for (r, _), m in zip(runs, metrics) if r == recipe]
        table[recipe] = pooled(folds, prefix, weight)
        table[recipe]["goal_met"] = goal_met(recipe, table[recipe])
    table["setup"] = {
        "folds": args.folds,
        "seed": args.seed,
        "model": args.model or "embedded, one base per fold",
        "command": "python benchmarks/recipes_cv.py " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "recipes-cv.md").write_text(markdown(table))
    print(json.dumps(table))
    return table


if __name__ == "__main__":
    main()
