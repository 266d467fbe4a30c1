"""RLAIF's AI labeller against the human thumbs on the coffee preference pairs: agreement (95% Wilson
interval) and position bias of SmolLM2-135M-Instruct judge variants, beside the embedded 5M base
with the plain ``Preferred response=`` cue, in the same run.

Pairs: ``taskmaster.preference_pairs`` of the leak-free ``load_splits`` train and test splits
(every thumbs-up x thumbs-down reply to one context, contexts as the recipe trims them; 552 train,
67 test), each shown in a seeded random order. Judges (the recipe's code, see JUDGES): ``pmi`` is
the likelihood judge (per-token pointwise mutual information of each reply with the conversation),
``pmi_sqrt`` / ``pmi_sum`` divide by the square root of the tokens / nothing, ``pmi_Nshot`` reads
each pair after N thumbs-up train examples (never the judged pair's), ``chat_ab`` asks "A or B"
through the chat template (both orders averaged). Variants are chosen on train pairs only:
the candidates are scored on the pairs of ``--select_prompts`` train contexts (seeded), the one
that agrees most there is chosen, and only then are the chosen judge and the previous default
(``pmi``) reported, once, on all pairs and per split (scores of the selection pairs are reused).

    python benchmarks/rlaif_labeller.py                 # select on 60 train contexts, report on all 619 pairs
    python benchmarks/rlaif_labeller.py --select_only   # the selection alone
    python benchmarks/rlaif_labeller.py --quick         # pmi vs pmi_1shot on 8 train contexts, no report
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable

import torch
from perl_plugins.recipes.rlaif import (
    PREAMBLE,
    LikelihoodJudge,
    few_shot_pool,
    judged_context,
    labeller_metrics,
    likelihood_labels,
    make_labels,
)
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


def selected_prompts(train_prompts: list[str], count: int, seed: int = 0) -> set[str]:
    """``count`` train contexts in a seeded shuffle: the selection subset."""
    prompts = sorted(set(train_prompts))
    random.Random(seed).shuffle(prompts)
    return set(prompts[:count])


def human_pairs(split: str, max_prompt_tokens: int, tokenizer, select_prompts: int | None) -> list[dict]:
    """The preference pairs of ``split`` (train, test or all), response 1 chosen or rejected at random."""
    data = default_dataset("dpo", None, context_turns=4, seed=0)
    keep = selected_prompts(data["train"]["prompt"], select_prompts) if select_prompts else None
    rng, pairs = random.Random(0), []
    for name in ["train", "test"] if split == "all" else [split]:
        for prompt, chosen, rejected in zip(data[name]["prompt"], data[name]["chosen"], data[name]["rejected"]):
            if keep is not None and prompt not in keep:
                continue
            flip = rng.random() < 0.5
            pairs.append(
                {
                    "split": name,
                    "prompt": trim_prompt(tokenizer, prompt, max_prompt_tokens),
                    "response_1": rejected if flip else chosen,
                    "response_2": chosen if flip else rejected,
                    "thumbs_1": 0.0 if flip else 1.0,
                    "thumbs_2": 1.0 if flip else 0.0,
                }
            )
    return pairs


class MemoJudge:
    """A likelihood judge that scores each (prefix, reply) once across the judge variants of a run."""

    def __init__(self, judge: LikelihoodJudge) -> None:
        self.judge, self.scores = judge, {}

    def __call__(self, items: list[tuple[str, str]], lead: str) -> torch.Tensor:
        todo = [item for item in dict.fromkeys(items) if (lead, *item) not in self.scores]
        if todo:
            self.scores.update(((lead, *item), score) for item, score in zip(todo, self.judge(todo, lead)))
        return torch.stack([self.scores[(lead, *item)] for item in items])


Labeller = Callable[[list[tuple[str, str, str]]], list[dict[str, float]]]


def smollm2_judges(model, tokenizer, batch_size: int, examples: list[tuple[str, str]]) -> dict[str, Labeller]:
    """The judge variants, each the recipe's code with its options (``pmi``: the previous default)."""
    memo = MemoJudge(LikelihoodJudge(model, tokenizer, batch_size))

    def pmi(shots: int = 0, norm: str = "tokens") -> Labeller:
        return lambda contexts: likelihood_labels(memo, contexts, examples, shots, norm)

    judges = {"pmi": pmi(), "pmi_sqrt": pmi(norm="sqrt"), "pmi_sum": pmi(norm="none")}
    judges.update({f"pmi_{k}shot": pmi(k) for k in (1, 2)})
    judges.update({f"pmi_{k}shot_sqrt": pmi(k, "sqrt") for k in (1, 2)})
    judges["chat_ab"] = lambda contexts: make_labels("chat", model, tokenizer, contexts, PREAMBLE, batch_size)
    return judges


def label(labeller: Labeller, pairs: list[dict]) -> list[dict]:
    contexts = [(judged_context(p["prompt"]), p["response_1"], p["response_2"]) for p in pairs]
    return [{**p, **lab} for p, lab in zip(pairs, labeller(contexts))]


def report(labelled: list[dict]) -> dict[str, float]:
    metrics = labeller_metrics(labelled)
    agree = round(metrics["labeller_human_agreement"] * len(labelled))
    low, high = wilson(agree, len(labelled))
    first_slot = [r["p_1_preferred_order_12"] for r in labelled] + [1 - r["p_1_preferred_order_21"] for r in labelled]
    return {
        "pairs": len(labelled),
        "agreed": agree,
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


CANDIDATES = "pmi,pmi_sqrt,pmi_sum,pmi_1shot,pmi_1shot_sqrt,pmi_2shot,pmi_2shot_sqrt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="select among pmi, pmi_1shot on 8 train contexts, stop")
    parser.add_argument("--split", default="all", choices=["all", "train", "test"], help="pairs of the report")
    parser.add_argument("--select_prompts", type=int, default=60, help="select on the pairs of N train contexts")
    parser.add_argument("--candidates", default=CANDIDATES, help="SmolLM2 judge variants to select from")
    parser.add_argument("--previous", default="pmi", help="the previous default judge, reported beside the chosen")
    parser.add_argument("--select_only", action="store_true", help="stop after the selection")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="SmolLM2's weights")
    parser.add_argument("--max_prompt_tokens", type=int, default=128, help="context kept (the recipe's default)")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    if args.quick:
        args.select_prompts, args.candidates, args.select_only = 8, "pmi,pmi_1shot", True
    torch.manual_seed(0)

    judge_path = str(smollm2.materialize())
    judge_tok = AutoTokenizer.from_pretrained(judge_path)
    judge = AutoModelForCausalLM.from_pretrained(judge_path, dtype=getattr(torch, args.dtype))
    examples = few_shot_pool(default_dataset("reward", None, 4, seed=0)["train"], judge_tok, args.max_prompt_tokens, 0)
    variants = smollm2_judges(judge, judge_tok, args.batch_size, examples)
    candidates = args.candidates.split(",")
    unknown = [name for name in [*candidates, args.previous] if name not in variants]
    if unknown:
        parser.error(f"unknown judges {unknown}; known: {sorted(variants)}")

    # 1. selection, on train pairs only (ties go to the candidate listed first)
    subset = human_pairs("train", args.max_prompt_tokens, judge_tok, args.select_prompts)
    selection, seconds = {}, {}
    for name in candidates:
        start = time.perf_counter()
        selection[name] = report(label(variants[name], subset))
        seconds[f"select_{name}"] = time.perf_counter() - start
        print(json.dumps({"selection": name, **selection[name]}), file=sys.stderr, flush=True)
    chosen = max(candidates, key=lambda name: selection[name]["agreement"])
    # 2. the report: the chosen judge and the previous default, once, on the report's pairs
    judges, baseline = {}, None
    if not args.select_only:
        pairs = human_pairs(args.split, args.max_prompt_tokens, judge_tok, None)
        for name in dict.fromkeys([args.previous, chosen]):
            start = time.perf_counter()
            judges[name] = by_split(label(variants[name], pairs))
            seconds[name] = time.perf_counter() - start
        base_path = resolve_model(None, "demo")
        base_tok = AutoTokenizer.from_pretrained(base_path)
        base = AutoModelForCausalLM.from_pretrained(base_path)
        base_labeller = lambda contexts: make_labels("cue", base, base_tok, contexts, PREAMBLE, args.batch_size)  # noqa: E731
        baseline = by_split(label(base_labeller, human_pairs(args.split, args.max_prompt_tokens, base_tok, None)))
    print(
        json.dumps(
            {
                "benchmark": "rlaif_labeller",
                "selection": {
                    "pairs_from": f"coffee train preference pairs of {args.select_prompts} train contexts (seeded)",
                    "agreement": selection,
                    "chosen": chosen,
                },
                "report_pairs_from": None
                if args.select_only
                else f"coffee {args.split} preference pairs (load_splits, preference_pairs)",
                "previous_default": args.previous,
                "smollm2_judges": judges,
                "embedded_base_cue_baseline": baseline,
                "agreement_ratio_vs_baseline": {
                    name: judge["all"]["agreement"] / baseline["all"]["agreement"] for name, judge in judges.items()
                },
                "chosen_minus_previous_agreement": {
                    split: judges[chosen][split]["agreement"] - judges[args.previous][split]["agreement"]
                    for split in judges[chosen]
                }
                if judges
                else None,
                "judge_seconds": seconds,
                "settings": {
                    "max_prompt_tokens": args.max_prompt_tokens,
                    "preamble": PREAMBLE,
                    "smollm2_dtype": args.dtype,
                    "few_shot_pool": f"{len(examples)} thumbs-up train (conversation, reply), seeded shuffle",
                },
            }
        )
    )


if __name__ == "__main__":
    main()
