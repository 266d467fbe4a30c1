"""RLAIF's AI labeller against the human thumbs on the coffee pairs: agreement (95% Wilson interval)
and position bias, for SmolLM2-135M-Instruct as the recipe's default ``likelihood`` judge (per-token
pointwise mutual information of each reply with the conversation) and as the previous ``chat``
judge (asked "A or B" through its chat template, both orders averaged), beside the embedded 5M base
with the plain ``Preferred response=`` cue, in the same run.

Pairs are the recipe's candidate pairs (two distinct rated replies to one context, at most 3 per
context) from every coffee conversation, train and test; only pairs whose thumbs differ can agree
or disagree, so only those are labelled. The likelihood judge and its reading rule were chosen on
train pairs only (``--split train``); the figures are then reported once on all pairs and per split.

    python benchmarks/rlaif_labeller.py                     # all coffee pairs, both judges: ~40 min on 2 busy cores
    python benchmarks/rlaif_labeller.py --formats likelihood   # the default judge only: ~9 min
    python benchmarks/rlaif_labeller.py --quick             # 48 train pairs
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from perl_plugins.recipes.rlaif import PREAMBLE, candidate_pairs, labeller_metrics, make_labels
from transformers import AutoModelForCausalLM, AutoTokenizer

from perl_plugins.data.defaults import default_dataset
from perl_plugins.data.text import trim_prompt
from perl_plugins.models import smollm2
from perl_plugins.models.embedded import resolve_model

Z95 = 1.959964


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def decided_pairs(split: str, max_prompt_tokens: int, tokenizer, limit: int | None) -> list[dict]:
    rows = default_dataset("reward", None, context_turns=4, seed=0)
    names = ["train", "test"] if split == "all" else [split]
    pairs = []
    for name in names:
        for pair in candidate_pairs(rows[name], per_context=3, limit=10**9, seed=0):
            if pair["thumbs_1"] != pair["thumbs_2"]:
                pairs.append(
                    {**pair, "split": name, "prompt": trim_prompt(tokenizer, pair["prompt"], max_prompt_tokens)}
                )
    return pairs[:limit] if limit else pairs


def label(fmt: str, model, tokenizer, pairs: list[dict], preamble: str, batch_size: int) -> list[dict]:
    contexts = [(p["prompt"].removesuffix("Agent:").rstrip(), p["response_1"], p["response_2"]) for p in pairs]
    return [{**p, **lab} for p, lab in zip(pairs, make_labels(fmt, model, tokenizer, contexts, preamble, batch_size))]


def report(labelled: list[dict]) -> dict[str, float]:
    metrics = labeller_metrics(labelled)
    agree = round(metrics["labeller_human_agreement"] * len(labelled))
    low, high = wilson(agree, len(labelled))
    first_slot = [r["p_1_preferred_order_12"] for r in labelled] + [1 - r["p_1_preferred_order_21"] for r in labelled]
    return {
        "pairs": len(labelled),
        "agreement": metrics["labeller_human_agreement"],
        "agreement_ci95": [low, high],
        "position_bias": metrics["labeller_position_bias"],  # mean P(first slot wins) - 1/2
        "p_first_slot_ge_half": sum(p >= 0.5 for p in first_slot) / len(first_slot),
        "confidence": metrics["labeller_confidence"],
    }


def by_split(labelled: list[dict]) -> dict[str, dict]:
    out = {"all": report(labelled)}
    for name in ("train", "test"):
        rows = [r for r in labelled if r["split"] == name]
        if rows:
            out[name] = report(rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="48 train pairs")
    parser.add_argument("--split", default="all", choices=["all", "train", "test"])
    parser.add_argument("--formats", default="likelihood,chat", help="SmolLM2 judges to run: likelihood, chat")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="SmolLM2's weights")
    parser.add_argument("--max_prompt_tokens", type=int, default=128, help="context kept (the recipe's default)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--preamble", default=PREAMBLE)
    args = parser.parse_args()
    split, limit = ("train", 48) if args.quick else (args.split, None)
    torch.manual_seed(0)

    judge_path = str(smollm2.materialize())
    judge_tok = AutoTokenizer.from_pretrained(judge_path)
    judge = AutoModelForCausalLM.from_pretrained(judge_path, dtype=getattr(torch, args.dtype))
    pairs = decided_pairs(split, args.max_prompt_tokens, judge_tok, limit)
    judges, seconds = {}, {}
    for fmt in args.formats.split(","):
        start = time.perf_counter()
        judges[f"smollm2_{fmt}_judge"] = by_split(label(fmt, judge, judge_tok, pairs, args.preamble, args.batch_size))
        seconds[fmt] = time.perf_counter() - start

    base_path = resolve_model(None, "demo")
    base_tok = AutoTokenizer.from_pretrained(base_path)
    base_pairs = decided_pairs(split, args.max_prompt_tokens, base_tok, limit)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    baseline = by_split(label("cue", base, base_tok, base_pairs, args.preamble, args.batch_size))

    print(
        json.dumps(
            {
                "benchmark": "rlaif_labeller",
                "pairs_from": f"coffee {split} candidate pairs whose thumbs differ"
                + (" (quick: first 48)" if limit else ""),
                **judges,
                "embedded_base_cue_baseline": baseline,
                "agreement_ratio_vs_baseline": {
                    name: judge["all"]["agreement"] / baseline["all"]["agreement"] for name, judge in judges.items()
                },
                "judge_seconds": seconds,
                "settings": {
                    "max_prompt_tokens": args.max_prompt_tokens,
                    "preamble": args.preamble,
                    "smollm2_dtype": args.dtype,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
