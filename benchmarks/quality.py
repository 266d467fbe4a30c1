"""PERL's comparison, reproduced: do LoRA reward models learn, and are they on par with full fine-tuning?

On the leak-free Taskmaster coffee split (``load_splits``), for each seed, held-out ROC AUC and
balanced accuracy of:

- ``tfidf_logreg``: scikit-learn TF-IDF (words and character n-grams) + logistic regression on
  prompt + completion: the floor any reward model must beat;
- ``rm_lora``: the PERL recipe's stage 1 (``recipes/perl.py``: LoRA adapter + reward head, BCE on
  the reward logit);
- ``rm_full``: the same reward model fully fine-tuned, same data, steps and schedule;
- ``rm_lora_grm``: ``rm_lora`` with the ``grm`` plugin (text-generation regularizer).

Every reward model scores the evaluation rows in their order through ``score_texts`` (the path the
RL stage scores with: the training ids, oldest context cut at ``max_length``, pooled as in
training). ``Trainer.predict`` is not used: with the recipe's length-grouped sampler it returns
predictions in the sampler's order, which once paired scores with the wrong labels.

Balanced accuracy thresholds every model's score at the train split's prior (logit of the
thumbs-up rate; a calibrated scorer then calls a row positive when it is likelier than average):
86% of the rows are thumbs up, so plain accuracy only measures the majority class.

``--rl`` adds the RL stage (``recipes/perl.py``'s ``rl_stage``): per seed, the reward-adapter score of
policy samples on held-out prompts before and after RLOO, for a LoRA policy and a fully fine-tuned
one, as gains in standard deviations of the before-distribution.

Settings are chosen with ``--validate`` (evaluates on a validation split carved from train, leak-free
too), never on the test split.

``--folds K`` cross-validates instead: K leak-free folds of the whole file (``heldout: fold:I/K``), each
scored by models trained on the other folds, so every row (453 thumbs down, not the test split's 30)
is evaluated once. The embedded base has read the texts of every train row, so each fold gets a base
pre-trained without that fold (``recipes/pretrain_base.py --heldout fold:I/K``, built into
``--fold_bases`` when missing: ~15 min a fold on one core). One training seed (the first of
``--seeds``) per fold; means over folds with their standard errors, and each goal's difference
per fold, paired. Written to ``quality-cv.md``. Writes ``benchmarks/results/quality.md`` (``quality-<model>.md`` with
``--model``; ``-validation`` added with ``--validate``; nothing with ``--no_write``) and prints one
JSON object as its last line.

    python benchmarks/quality.py --rl                          # 3 seeds, embedded base
    python benchmarks/quality.py --jobs 3                      # the 3 seeds in 3 processes at once
    python benchmarks/quality.py --quick                       # smoke run: 1 seed, fewer rows and steps
    python benchmarks/quality.py --validate --methods rm_lora,rm_full --rm_full_learning_rate 3e-4
    python benchmarks/quality.py --model smollm2-135m-instruct --max_train_rows 1000
    python benchmarks/quality.py --folds 5 --jobs 2 --methods tfidf_logreg,rm_lora,rm_full   # ~70 min on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets
import numpy as np
import torch
from _common import StepTimer, median, peak_rss_mb, reset_peak_rss
from _folds import fold_base
from perl_plugins.recipes import perl
from transformers import set_seed

from perl_plugins.data import taskmaster
from perl_plugins.data.defaults import heldout_rows, trim_context
from perl_plugins.models.embedded import read_validation_texts, resolve_model
from perl_plugins.models.reward import save_reward_adapter, score_texts
from perl_plugins.training import recipe_kit
from perl_plugins.training.reward_metrics import grouped_bootstrap_se, roc_auc

METHODS = ("tfidf_logreg", "rm_lora", "rm_full", "rm_lora_grm")
RM_PLUGINS = {"rm_lora": "lora", "rm_full": "", "rm_lora_grm": "lora,grm"}
RESULTS = Path(__file__).resolve().parent / "results"


def results_path(model: str | None, validate: bool = False, cv: bool = False) -> Path:
    """quality.md for the embedded default; quality-<model>.md for any other base, so figures on
    different bases sit side by side; ``-validation`` before the suffix for a ``--validate`` run, so
    figures that chose settings never overwrite the test split's; ``-cv`` for ``--folds``."""
    name = "quality"
    if model is not None:
        name += "-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).name or model)
    return RESULTS / f"{name}{'-validation' if validate else ''}{'-cv' if cv else ''}.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="Base model: a path, hub id or alias (resolve_model); default: embedded."
    )
    p.add_argument("--model_size", default="demo", help="Embedded default size when --model is not given.")
    p.add_argument("--taskmaster_file", default=None, help="Thumbs up/down file; default: coffee.")
    p.add_argument("--config", default=str(Path(perl.__file__).with_suffix(".yaml")), help="PERL recipe YAML.")
    p.add_argument("--seeds", default="0,1,2", help="Comma-separated training seeds (the split stays seed 0).")
    p.add_argument("--methods", default=",".join(METHODS), help="Subset of " + ",".join(METHODS) + ".")
    p.add_argument("--max_train_rows", type=int, default=0, help="Use a seeded subset of the train rows (0: all).")
    p.add_argument("--max_eval_rows", type=int, default=0, help="Use a subset of the evaluation rows (0: all).")
    p.add_argument("--validate", action="store_true", help="Evaluate on a validation split carved from train.")
    p.add_argument("--rm_epochs", type=float, default=None, help="Override the YAML's rm_epochs.")
    p.add_argument("--rm_learning_rate", type=float, default=None, help="Override the YAML's LoRA learning rate.")
    p.add_argument(
        "--rm_full_learning_rate",
        type=float,
        default=None,
        help="rm_full's learning rate (YAML: rm_full_learning_rate).",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override any recipe YAML key.")
    p.add_argument(
        "--folds",
        type=int,
        default=0,
        help="K-fold cross-validation of the whole file instead of the test split; trains with the first of "
        "--seeds only (another seed: --seeds N --no_write).",
    )
    p.add_argument(
        "--fold_bases",
        default="outputs/fold-bases",
        help="With --folds and the embedded base: each fold's base (fold-I-of-K/), pre-trained when missing.",
    )
    p.add_argument("--fold", type=int, default=None, help=argparse.SUPPRESS)  # worker of --folds: this fold only
    p.add_argument("--rl", action="store_true", help="Also measure the RL stage (LoRA and full policies).")
    p.add_argument("--rl_policies", default="lora,full", help="RL policies to measure: lora, full or both.")
    p.add_argument("--jobs", type=int, default=1, help="Run the seeds in this many processes at once.")
    p.add_argument("--worker_result", default=None, help=argparse.SUPPRESS)  # worker of --jobs: write its results
    p.add_argument("--quick", action="store_true", help="Smoke run: seed 0, 600 train rows, short RL.")
    p.add_argument("--no_write", action="store_true", help="Do not write benchmarks/results/quality.md.")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = "0"
        args.max_train_rows = args.max_train_rows or 600
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.folds and (args.folds < 2 or args.validate or args.rl):
        p.error(
            f"--folds {args.folds}: need at least 2 folds, and neither --validate nor --rl (they use the test split)"
        )
    return args


def recipe_config(args: argparse.Namespace, seed: int, output_dir: str) -> perl.PerlConfig:
    """The PERL recipe's YAML with this run's overrides (the benchmark measures the recipe's defaults)."""
    from trl import TrlParser

    cli = ["--config", args.config, "--output_dir", output_dir, "--seed", str(seed)]
    for key in ("rm_epochs", "rm_learning_rate", "rm_full_learning_rate"):
        if getattr(args, key) is not None:
            cli += [f"--{key}", str(getattr(args, key))]
    for item in args.set:
        key, _, value = item.partition("=")
        cli += [f"--{key}", value]
    if args.quick:
        cli += ["--rm_epochs", "0.5", "--rl_max_steps", "4", "--rl_eval_prompts", "16"]
    (cfg,) = TrlParser([perl.PerlConfig]).parse_args_and_config(cli)
    return cfg


def load_rows(
    args: argparse.Namespace, name: str | None = None
) -> tuple[list[taskmaster.FeedbackRow], list[taskmaster.FeedbackRow], str]:
    """(train rows, evaluation rows, name of the evaluation split: ``name``, default test or
    validation as ``args`` say), contexts untrimmed."""
    name = name or ("validation" if args.validate else "test")
    splits = heldout_rows(args.taskmaster_file, name)
    train, evaluation = splits["train"], splits["test"]
    if args.max_train_rows and args.max_train_rows < len(train):
        pick = np.random.default_rng(0).choice(len(train), args.max_train_rows, replace=False)
        train = [train[i] for i in sorted(pick)]
    if args.max_eval_rows:
        evaluation = evaluation[: args.max_eval_rows]
    return train, evaluation, name


def classification_metrics(scores: np.ndarray, labels: np.ndarray, prior: float) -> dict[str, float]:
    """ROC AUC and balanced accuracy at the prior's logit (see the module docstring)."""
    predicted = scores > math.log(prior / (1 - prior))
    positive = labels > 0.5
    balanced = 0.5 * (predicted[positive].mean() + (~predicted[~positive]).mean())
    return {"auc": roc_auc(scores, labels), "balanced_accuracy": float(balanced)}


def tfidf_logreg(train, evaluation, seed: int) -> tuple[np.ndarray, dict[str, float]]:
    """Scores (log-odds) of TF-IDF + logistic regression; the floor a reward model must beat."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    model = make_pipeline(
        make_union(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True),
        ),
        LogisticRegression(C=4.0, max_iter=2000, random_state=seed),
    )
    start = time.perf_counter()
    model.fit([r.prompt + r.completion for r in train], [r.label for r in train])
    scores = model.decision_function([r.prompt + r.completion for r in evaluation])
    return scores, {"train_s": time.perf_counter() - start}


def reward_model(
    method: str,
    cfg: perl.PerlConfig,
    model_path: str,
    train,
    evaluation,
    save_to: str | None = None,
    groups: dict[str, str] | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Train the recipe's stage 1 (with ``method``'s plugins), score ``evaluation``, and save the
    reward adapter to ``save_to`` if given (LoRA methods only). ``groups``: each train row's dialog
    (conversation id -> group), for the head probe's cross-validation."""
    tokenizer = recipe_kit.padded_tokenizer(model_path)
    if method == "rm_full":
        cfg = dataclasses.replace(cfg, rm_learning_rate=cfg.rm_full_learning_rate)
    set_seed(cfg.seed)
    train_ds = taskmaster.pointwise(train, groups=groups).shuffle(seed=cfg.seed)
    trainer = recipe_kit.reward_trainer(
        cfg, model_path, tokenizer, train_ds, taskmaster.pointwise(evaluation), plugins=RM_PLUGINS[method]
    )
    timer = StepTimer()
    trainer.add_callback(timer)
    reset_peak_rss()
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    peak = peak_rss_mb()
    scores = score_rows(trainer.model, tokenizer, evaluation, cfg.max_length)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if save_to:
        save_reward_adapter(trainer.model, save_to, trainer.model.active_adapter)
    return scores, {
        "train_s": train_s,
        "step_s": median(timer.wall),
        "peak_rss_mb": peak,
        "trainable_params": trainable,
    }


def score_rows(model, tokenizer, rows, max_length: int) -> np.ndarray:
    """Rewards of ``rows``, in their order, through the path the RL stage scores with
    (``score_texts``: the training ids, oldest context cut, pooled as in training). Not
    ``Trainer.predict``: with the recipe's length-grouped sampler it returns the rows reordered."""
    model.eval()
    texts = [r.prompt + r.completion for r in rows]
    return score_texts(model, tokenizer, texts, batch_size=32, max_length=max_length).numpy()


def rl_both(
    cfg: perl.PerlConfig, model_path: str, reward_dir: str, train, evaluation, policies: list[str]
) -> dict[str, dict[str, float]]:
    """The recipe's RL stage from one reward adapter, with a LoRA policy and a fully fine-tuned one,
    on prompts of the benchmark's own split (validation prompts under ``--validate``)."""
    data = {
        "train": datasets.Dataset.from_dict({"prompt": list(dict.fromkeys(r.prompt for r in train))}),
        "test": datasets.Dataset.from_dict({"prompt": list(dict.fromkeys(r.prompt for r in evaluation))}),
    }
    out = {}
    for kind in policies:
        tokenizer = recipe_kit.padded_tokenizer(model_path)
        set_seed(cfg.seed)
        reset_peak_rss()
        start = time.perf_counter()
        metrics, _, _ = recipe_kit.rl_stage(cfg, model_path, tokenizer, reward_dir, data, policy=kind)
        metrics.update(wall_s=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(), rl_kl_limit=cfg.rl_kl_limit)
        out[kind] = metrics
    return out


def summarize(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def prepare(args: argparse.Namespace, train, evaluation, seed: int):
    """(trimmed train rows, trimmed evaluation rows, evaluation labels, conversation id -> dialog
    group, train prior of thumbs up): what :func:`run_seed` takes."""
    turns = recipe_config(args, seed, "unused").context_turns
    trim = lambda rows: [dataclasses.replace(r, prompt=trim_context(r.prompt, turns)) for r in rows]
    labels = np.asarray([r.label for r in evaluation])
    group_of = taskmaster.split_groups([*train, *evaluation])  # untrimmed: trimmed contexts hide their dialog
    return trim(train), trim(evaluation), labels, group_of, sum(r.label for r in train) / len(train)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    argv = argv if argv is not None else sys.argv[1:]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.folds:
        return cross_validate(args, argv)
    model_path = resolve_model(args.model, args.model_size)
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    train, evaluation, split_name = load_rows(args)
    recipe_kit.check_tuning_base(model_path, split_name)
    leaks = taskmaster.count_leaks(train, evaluation)
    train_t, eval_t, labels, group_of, prior = prepare(args, train, evaluation, seeds[0])
    print(
        f"[quality] {model_path}: {len(train)} train rows, {len(evaluation)} {split_name} rows "
        f"({int(labels.sum())} up / {int((1 - labels).sum())} down), leaks {leaks}",
        flush=True,
    )
    per_seed: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    rl_runs: list[dict[str, dict[str, float]]] = []
    if args.jobs > 1 and len(seeds) > 1:
        outcomes = in_workers(argv, [["--seeds", str(seed)] for seed in seeds], args.jobs)
    else:
        outcomes = [run_seed(args, seed, model_path, train_t, eval_t, labels, group_of, prior) for seed in seeds]
    if args.worker_result:  # a worker of --jobs: hand this seed's results back, nothing else
        Path(args.worker_result).write_text(json.dumps(outcomes[0]))
        return {}
    for results, rl_run in outcomes:
        for method in methods:
            per_seed[method].append(results[method])
        if rl_run is not None:
            rl_runs.append(rl_run)

    table = build_table(per_seed, rl_runs)
    table["goals"] = goals(table)
    table["setup"] = {
        "model": args.model or f"embedded ({args.model_size})",
        "seeds": seeds,
        "evaluated_on": split_name,
        "base_read_eval_texts": split_name == "validation" and read_validation_texts(model_path),
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "eval_negatives": int((1 - labels).sum()),
        "leaks": leaks,
        "threshold_prior": prior,
        **provenance(argv),
    }
    return finish(args, table, markdown(table))


def provenance(argv: list[str]) -> dict[str, str]:
    return {
        "command": "python benchmarks/quality.py " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def finish(args: argparse.Namespace, table: dict[str, Any], text: str) -> dict[str, Any]:
    """Write the results file (unless ``--no_write``) and print the JSON as the last line."""
    if not args.no_write:
        out = results_path(args.model, args.validate, cv=bool(args.folds))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"[quality] wrote {out}", flush=True)
    print(json.dumps(table))
    return table


def cross_validate(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """``--folds K``: every fold scored by models trained on the others (module docstring)."""
    folds = list(range(args.folds)) if args.fold is None else [args.fold]
    if args.jobs > 1 and len(folds) > 1:
        outcomes = in_workers(argv, [["--fold", str(i)] for i in folds], args.jobs)
    else:
        outcomes = [run_fold(args, i) for i in folds]
    if args.worker_result:
        Path(args.worker_result).write_text(json.dumps(outcomes[0]))
        return {}
    table = cv_table(outcomes, args.methods.split(","))
    table["goals"] = goals(table)
    table["setup"] = {
        "model": args.model or f"embedded ({args.model_size}), one base per fold",
        "folds": args.folds,
        "seed": int(args.seeds.split(",")[0]),
        "eval_rows": sum(o["eval_rows"] for o in outcomes),
        "eval_negatives": sum(o["eval_negatives"] for o in outcomes),
        "leaks": [o["leaks"] for o in outcomes],
        **provenance(argv),
    }
    return finish(args, table, cv_markdown(table))


def run_fold(args: argparse.Namespace, fold: int) -> dict[str, Any]:
    """One fold of ``--folds``: its base (built when missing), rows, and every method's metrics."""
    heldout = f"fold:{fold}/{args.folds}"
    model_path = (
        fold_base(args.fold_bases, heldout) if args.model is None else resolve_model(args.model, args.model_size)
    )
    train, evaluation, _ = load_rows(args, heldout)
    seed = int(args.seeds.split(",")[0])
    train_t, eval_t, labels, group_of, prior = prepare(args, train, evaluation, seed)
    leaks = taskmaster.count_leaks(train, evaluation)
    print(f"[quality] fold {heldout} on {model_path}: {len(train)} train, {len(evaluation)} held out, leaks {leaks}")
    results, _ = run_seed(args, seed, model_path, train_t, eval_t, labels, group_of, prior)
    return {
        "fold": fold,
        "eval_rows": len(evaluation),
        "eval_negatives": int((1 - labels).sum()),
        "leaks": leaks,
        "results": results,
    }


def run_seed(args, seed: int, model_path: str, train_t, eval_t, labels: np.ndarray, group_of: dict, prior: float):
    """One seed: ({method: metrics}, RL results or None); ``group_of``: conversation id -> dialog."""
    groups = [group_of[r.conversation_id] for r in eval_t]
    results: dict[str, dict[str, float]] = {}
    floor = None
    rl_run = None
    with tempfile.TemporaryDirectory(prefix="perl-quality-") as tmp:
        cfg = recipe_config(args, seed, tmp)
        for method in args.methods.split(","):
            if method == "tfidf_logreg":
                scores, extra = tfidf_logreg(train_t, eval_t, seed)
            else:
                save_to = os.path.join(tmp, "reward_adapter") if method == "rm_lora" else None
                scores, extra = reward_model(method, cfg, model_path, train_t, eval_t, save_to=save_to, groups=group_of)
            results[method] = {**classification_metrics(scores, labels, prior), **extra}
            results[method].update(sampling_errors(scores, floor, labels, groups))
            if method == "tfidf_logreg":
                floor = scores
            print(f"[quality] seed {seed} {method}: {json.dumps(results[method])}", flush=True)
        if args.rl:
            reward_dir = os.path.join(tmp, "reward_adapter")
            if not os.path.isdir(reward_dir):  # rm_lora not among the methods: train it for the RL
                reward_model("rm_lora", cfg, model_path, train_t, eval_t, save_to=reward_dir, groups=group_of)
            rl_run = rl_both(cfg, model_path, reward_dir, train_t, eval_t, args.rl_policies.split(","))
            print(f"[quality] seed {seed} rl: {json.dumps(rl_run)}", flush=True)
    return results, rl_run


def sampling_errors(scores: np.ndarray, floor: np.ndarray | None, labels: np.ndarray, groups: list[str]) -> dict:
    """How much the evaluation sample alone moves the AUC: its standard error, and that of the AUC's
    difference from the TF-IDF floor's on the same rows, by bootstrap over whole dialogs (a dialog's
    rows are rated together; few dialogs hold the thumbs down, so rows overstate the sample)."""
    out = {"auc_se": grouped_bootstrap_se(roc_auc, groups, scores, labels)}
    if floor is not None:
        diff = lambda s, f, y: roc_auc(s, y) - roc_auc(f, y)
        out["auc_minus_tfidf"] = diff(scores, floor, labels)
        out["auc_minus_tfidf_se"] = grouped_bootstrap_se(diff, groups, scores, floor, labels)
    return out


def in_workers(argv: list[str], units: list[list[str]], jobs: int) -> list:
    """Each unit of work (the arguments that pick one seed, or one fold) in its own process,
    ``jobs`` at a time (one thread each: cores, not threads, scale these small models); their
    outcomes (:func:`run_seed`'s, or :func:`run_fold`'s), in order."""
    from concurrent.futures import ThreadPoolExecutor

    with tempfile.TemporaryDirectory(prefix="perl-quality-workers-") as tmp:

        def one(i: int):
            out = os.path.join(tmp, f"unit{i}.json")
            cmd = [sys.executable, __file__, *argv, *units[i], "--jobs", "1", "--no_write"]
            subprocess.run([*cmd, "--worker_result", out], check=True)
            outcome = json.loads(Path(out).read_text())
            return tuple(outcome) if isinstance(outcome, list) else outcome

        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(one, range(len(units))))


def build_table(
    per_seed: dict[str, list[dict[str, float]]], rl_runs: list[dict[str, dict[str, float]]]
) -> dict[str, Any]:
    """The PERL table: per method mean/std over seeds; per-seed RL gains and KLs."""
    table: dict[str, Any] = {}
    for method, runs in per_seed.items():
        auc, bal = summarize([r["auc"] for r in runs]), summarize([r["balanced_accuracy"] for r in runs])
        table[method] = {
            "auc_mean": auc["mean"],
            "auc_std": auc["std"],
            "balanced_accuracy_mean": bal["mean"],
            "balanced_accuracy_std": bal["std"],
            "per_seed_auc": [r["auc"] for r in runs],
            **{
                k: float(np.mean([r[k] for r in runs]))
                for k in (
                    "auc_se",
                    "auc_minus_tfidf",
                    "auc_minus_tfidf_se",
                    "train_s",
                    "step_s",
                    "peak_rss_mb",
                    "trainable_params",
                )
                if k in runs[0]
            },
        }
    if rl_runs:
        table["rl"] = {"runs": rl_runs}
        for kind, prefix in (("lora", "rl"), ("full", "rl_full")):
            if kind in rl_runs[0]:
                table["rl"][prefix + "_gain_in_std"] = [r[kind][prefix + "_gain_in_std"] for r in rl_runs]
                table["rl"][prefix + "_final_kl"] = [r[kind][prefix + "_final_kl"] for r in rl_runs]
    return table


def cv_table(outcomes: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """``--folds``: per method the mean over folds and its standard error (fold-to-fold spread, which
    holds the evaluation sample's noise and training noise); per goal's pair of methods the
    difference fold by fold, paired, with its mean and standard error."""

    def mean_se(values: list[float]) -> dict[str, Any]:
        arr = np.asarray(values, dtype=np.float64)
        return {"mean": float(arr.mean()), "se": float(arr.std(ddof=1) / math.sqrt(len(arr))), "per_fold": values}

    table: dict[str, Any] = {}
    for method in methods:
        auc = mean_se([o["results"][method]["auc"] for o in outcomes])
        bal = mean_se([o["results"][method]["balanced_accuracy"] for o in outcomes])
        table[method] = {
            "auc_mean": auc["mean"],
            "auc_se": auc["se"],
            "per_fold_auc": auc["per_fold"],
            "balanced_accuracy_mean": bal["mean"],
            "balanced_accuracy_se": bal["se"],
        }
    table["differences"] = {
        f"{a}_minus_{b}": mean_se([o["results"][a]["auc"] - o["results"][b]["auc"] for o in outcomes])
        for a, b in (("rm_lora", "tfidf_logreg"), ("rm_lora", "rm_full"), ("rm_lora_grm", "rm_lora"))
        if a in methods and b in methods
    }
    return table


def cv_markdown(table: dict[str, Any]) -> str:
    setup = table["setup"]
    folds = setup["folds"]
    lines = [
        f"# PERL comparison on Taskmaster coffee, {folds}-fold cross-validation (leak-free folds)",
        "",
        (
            f"{setup['date']}; `{setup['command']}`; model `{setup['model']}`; training seed {setup['seed']}; every "
            f"row held out once: {setup['eval_rows']} rows ({setup['eval_negatives']} thumbs down); leaks per fold "
            f"{setup['leaks']}. Settings were chosen on the validation split (README), part of these folds."
        ),
        "",
        "| method | held-out AUC (mean ± SE over folds) | per fold | balanced accuracy (mean ± SE) |",
        "| --- | --- | --- | --- |",
    ]
    for method in METHODS:
        if method in table:
            r = table[method]
            lines.append(
                f"| {method} | {r['auc_mean']:.3f} ± {r['auc_se']:.3f} | "
                f"{', '.join(format(a, '.3f') for a in r['per_fold_auc'])} | "
                f"{r['balanced_accuracy_mean']:.3f} ± {r['balanced_accuracy_se']:.3f} |"
            )
    if table["differences"]:
        lines += ["", "| AUC difference, paired by fold | mean ± SE | per fold |", "| --- | --- | --- |"]
        for name, d in table["differences"].items():
            per_fold = ", ".join(format(x, "+.3f") for x in d["per_fold"])
            lines.append(f"| {name.replace('_minus_', ' − ')} | {d['mean']:+.3f} ± {d['se']:.3f} | {per_fold} |")
    goals_line = ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in table["goals"].items())
    lines += ["", f"Goals read on the folds' means: {goals_line}", ""]
    return "\n".join(lines)


def goals(table: dict[str, Any]) -> dict[str, bool]:
    """The issue's goals, where the methods they need were run."""
    out: dict[str, bool] = {}
    lora = table.get("rm_lora", {}).get("auc_mean")
    if lora is not None:
        out["rm_lora_auc_ge_0.72"] = lora >= 0.72
        if "tfidf_logreg" in table:
            out["rm_lora_beats_tfidf_by_0.03"] = lora >= table["tfidf_logreg"]["auc_mean"] + 0.03
        if "rm_full" in table:
            out["rm_lora_within_0.02_of_full"] = abs(lora - table["rm_full"]["auc_mean"]) <= 0.02
    rl = table.get("rl", {})
    if "rl_gain_in_std" in rl:
        out["rl_gain_ge_0.5_std_each_seed"] = all(g >= 0.5 for g in rl["rl_gain_in_std"])
        if all("rl_kl_limit" in r["lora"] for r in rl["runs"]):
            out["rl_final_kl_below_limit_each_seed"] = all(
                r["lora"]["rl_final_kl"] < r["lora"]["rl_kl_limit"] for r in rl["runs"]
            )
    if "rl_gain_in_std" in rl and "rl_full_gain_in_std" in rl:
        full = float(np.mean(rl["rl_full_gain_in_std"]))
        out["rl_lora_over_full_gain_ge_0.8"] = full > 0 and float(np.mean(rl["rl_gain_in_std"])) / full >= 0.8
    return out


def _fmt(row: dict[str, Any], key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "–"


def _vs_floor(row: dict[str, Any]) -> str:
    if "auc_minus_tfidf" not in row:
        return "–"
    return f"{row['auc_minus_tfidf']:+.3f} ± {row['auc_minus_tfidf_se']:.3f}"


def markdown(table: dict[str, Any]) -> str:
    setup = table["setup"]
    split = setup["evaluated_on"]
    lines = [
        "# PERL comparison on Taskmaster coffee (leak-free split)",
        "",
        (
            f"{setup['date']}; `{setup['command']}`; model `{setup['model']}`; seeds {setup['seeds']}; "
            f"{setup['train_rows']} train rows, evaluated on {setup['eval_rows']} {setup['evaluated_on']} rows "
            f"({setup['eval_negatives']} thumbs down); leaks {setup['leaks']}."
            + (
                " The base was pre-trained on these rows' texts (not their labels)."
                if setup["base_read_eval_texts"]
                else ""
            )
        ),
        "",
        f"| method | held-out AUC (mean ± std over seeds) | {split}-sample SE | AUC − floor (± SE) | balanced accuracy "
        "| trainable params | step time (s) | peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        if method in table:
            r = table[method]
            lines.append(
                f"| {method} | {r['auc_mean']:.3f} ± {r['auc_std']:.3f} | {_fmt(r, 'auc_se', '.3f')} | "
                f"{_vs_floor(r)} | {r['balanced_accuracy_mean']:.3f} ± "
                f"{r['balanced_accuracy_std']:.3f} | {_fmt(r, 'trainable_params', ',.0f')} | "
                f"{_fmt(r, 'step_s', '.3f')} | {_fmt(r, 'peak_rss_mb', '.0f')} |"
            )
    if "rl" in table:
        rl = table["rl"]
        lines += [
            "",
            "| RL policy | reward gain (in std of the before-distribution), per seed | final KL | peak RSS (MiB) | wall (s) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for kind, prefix in (("lora", "rl"), ("full", "rl_full")):
            if prefix + "_gain_in_std" not in rl:
                continue
            runs = [r[kind] for r in rl["runs"]]
            lines.append(
                f"| {kind} | {', '.join(format(g, '.2f') for g in rl[prefix + '_gain_in_std'])} | "
                f"{', '.join(format(r[prefix + '_final_kl'], '.4f') for r in runs)} | "
                f"{np.mean([r['peak_rss_mb'] for r in runs]):.0f} | {np.mean([r['wall_s'] for r in runs]):.0f} |"
            )
    lines += [
        "",
        f"{split.capitalize()}-sample SE: the AUC's standard error from the evaluation rows alone (bootstrap over "
        "whole dialogs, mean over seeds); the seeds' std above is training noise only.",
    ]
    # A validation run chooses settings; only the test split's figures answer the goals.
    heading = "Goals" if split == "test" else f"Goals as read on {split} rows (they are judged on the test split)"
    goals_line = ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in table["goals"].items())
    lines += ["", f"{heading}: {goals_line}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
