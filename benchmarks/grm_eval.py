"""Does GRM's text-generation regularizer make a LoRA reward model generalize better?

Four LoRA reward models are trained with stock ``trl.RewardTrainer`` on the Taskmaster coffee
preference pairs (train split), same seed, data, head and budget; only the regularizer differs:

- ``baseline``: ``plugins="lora,grm", grm_alpha=0``: GRM's MLP head and the LM head are in place
  but the regularizer has weight 0, so the loss is the stock Bradley-Terry loss (head kind and
  initialisation match the GRM runs exactly; only the regularizer is switched off).
- ``sft`` / ``dpo`` / ``dpo_noref``: ``plugins="lora,grm", grm_reg=...`` at ``--grm_alpha``.

Each is evaluated on the held-out conversations: (a) preference pairs: pair accuracy
(r(chosen) > r(rejected)) and ROC AUC (chosen = positive); (b) pointwise thumbs up/down rows:
ROC AUC, and accuracy at the threshold that is best on a fixed sample of *train* rows (a pairwise
reward has no natural zero). The last line printed is JSON ``{"baseline": {...}, "sft": {...},
"dpo": {...}, "dpo_noref": {...}, "delta_vs_baseline": {...}, ...}`` with metrics averaged over
``--seeds``. Goal: GRM >= baseline.

    python benchmarks/grm_eval.py [--seeds 0,1] [--epochs 1] [--model_size demo | --model_name_or_path DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, set_seed  # noqa: E402
from trl import RewardConfig, RewardTrainer  # noqa: E402

from perl_plugins import attach  # noqa: E402
from perl_plugins.data.defaults import default_dataset  # noqa: E402
from perl_plugins.models.embedded import resolve_model  # noqa: E402
from perl_plugins.training.pointwise import reward_classifier  # noqa: E402
from perl_plugins.training.reward_metrics import evaluate_pairs, roc_auc  # noqa: E402
from perl_plugins.models.reward import score_texts  # noqa: E402

VARIANTS = ("baseline", "sft", "dpo", "dpo_noref")
COMPARED = ("pair_accuracy", "pair_auc", "pointwise_auc")
METRICS = ("pair_accuracy", "pair_auc", "pointwise_accuracy", "pointwise_auc", "train_loss", "train_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0", help="Comma-separated training seeds; metrics are averaged.")
    parser.add_argument("--model_name_or_path", default=None, help="Base model; default: the embedded one.")
    parser.add_argument("--model_size", default="demo", help="Embedded default size when no model is given.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Subset of " + ",".join(VARIANTS) + ".")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max_steps", type=int, default=-1, help="Overrides --epochs if > 0 (smoke runs).")
    parser.add_argument("--batch_size", type=int, default=8, help="Pairs per step.")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_length", type=int, default=512, help="RewardTrainer drops longer pairs.")
    parser.add_argument("--context_turns", type=int, default=4, help="Dialog turns kept in each prompt.")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=int, default=32)
    parser.add_argument("--grm_alpha", type=float, default=0.01, help="Regularizer weight of the GRM runs.")
    parser.add_argument("--grm_beta", type=float, default=0.1)
    parser.add_argument(
        "--threshold_rows", type=int, default=512, help="Train thumbs rows (a fixed sample) to fit the threshold on."
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 stays steady on a shared machine).")
    return parser.parse_args(argv)


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold with the highest accuracy (score > threshold means thumbs up)."""
    candidates = np.concatenate([[-np.inf], np.unique(scores)])
    accuracies = [((scores > t) == labels).mean() for t in candidates]
    return float(candidates[int(np.argmax(accuracies))])


def pointwise_scores(model: Any, tokenizer: Any, rows: Any) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    texts = [p + c for p, c in zip(rows["prompt"], rows["completion"])]
    return score_texts(model, tokenizer, texts).numpy(), np.asarray(rows["label"]) > 0


def train_one(variant: str, seed: int, model_path: str, tokenizer: Any, data: dict, args: argparse.Namespace, out: str):
    # With RewardConfig(seed=seed), which reseeds before attach() builds the MLP head and the LoRA
    # weights, every variant of a seed starts from identical weights.
    set_seed(seed)
    config = RewardConfig(
        output_dir=os.path.join(out, f"{variant}-{seed}"), num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, max_length=args.max_length,
        gradient_checkpointing=False, seed=seed, use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True,
    )
    trainer = RewardTrainer(
        model=reward_classifier(model_path), args=config, train_dataset=data["pairs"]["train"],
        processing_class=tokenizer,
    )
    attach(
        trainer, plugins="lora,grm", lora_r=args.lora_r, lora_alpha=args.lora_alpha, grm_head="mlp",
        grm_reg="sft" if variant == "baseline" else variant, grm_alpha=0.0 if variant == "baseline" else args.grm_alpha,
        grm_beta=args.grm_beta,
    )
    started = time.perf_counter()
    train_loss = trainer.train().training_loss
    train_s = time.perf_counter() - started
    model = trainer.model
    pairs = evaluate_pairs(model, tokenizer, data["pairs"]["test"])
    train_scores, train_labels = pointwise_scores(model, tokenizer, data["rows"]["train"])
    test_scores, test_labels = pointwise_scores(model, tokenizer, data["rows"]["test"])
    threshold = best_threshold(train_scores, train_labels)
    return {
        "pair_accuracy": pairs["eval_pair_accuracy"],
        "pair_auc": pairs["eval_auc"],
        "pointwise_accuracy": float(((test_scores > threshold) == test_labels).mean()),
        "pointwise_auc": roc_auc(test_scores, test_labels),
        "train_loss": train_loss,
        "train_s": train_s,
    }, len(trainer.train_dataset)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"Unknown variants {sorted(unknown)}; choose from {VARIANTS}.")
    model_path = resolve_model(args.model_name_or_path, args.model_size)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # The held-out split is fixed (seed 0, by conversation); --seeds vary only the training.
    data = {
        "pairs": default_dataset("reward", feedback="pairs", context_turns=args.context_turns),
        "rows": default_dataset("reward", context_turns=args.context_turns),
    }
    train_rows = data["rows"]["train"]
    data["rows"]["train"] = train_rows.shuffle(seed=0).select(range(min(args.threshold_rows, len(train_rows))))
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    kept = None
    with tempfile.TemporaryDirectory(prefix="grm_eval_") as out:
        for seed in seeds:
            for variant in variants:
                metrics, kept = train_one(variant, seed, model_path, tokenizer, data, args, out)
                runs[variant].append(metrics)
                print(f"[grm_eval] seed {seed} {variant}: {json.dumps(metrics)}", file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        variant: {
            **{k: round(float(np.mean([r[k] for r in rs])), 4) for k in METRICS},
            "per_seed": [{k: round(r[k], 4) for k in METRICS} for r in rs],
        }
        for variant, rs in runs.items()
    }
    if "baseline" in result:  # differences, not verdicts: read them against the noise (see README)
        result["delta_vs_baseline"] = {
            v: {k: round(result[v][k] - result["baseline"][k], 4) for k in COMPARED}
            for v in variants
            if v != "baseline"
        }
    result["settings"] = {
        "model": model_path, "seeds": seeds, "epochs": args.epochs, "max_steps": args.max_steps,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate, "max_length": args.max_length,
        "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "grm_head": "mlp", "grm_alpha": args.grm_alpha,
        "grm_beta": args.grm_beta, "threads": args.threads,
        "baseline": "lora,grm with grm_alpha=0 (same mlp head, no regularizer)",
        "train_pairs": len(data["pairs"]["train"]), "train_pairs_kept": kept, "test_pairs": len(data["pairs"]["test"]),
        "test_rows": len(data["rows"]["test"]), "threshold_rows": len(data["rows"]["train"]),
        "test_rows_majority_accuracy": round(float(max(np.mean(data["rows"]["test"]["label"]),
                                                        1 - np.mean(data["rows"]["test"]["label"]))), 4),
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
