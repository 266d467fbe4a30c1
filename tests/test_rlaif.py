"""RLAIF pieces: soft labels from a labeller whose log-probs the test fixes, position-swap
averaging, the labeller's token choice and padding, and the soft-label reward loss."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_lm, tiny_reward_model, train_quietly
from perl_plugins.recipes.rlaif import (
    CUE,
    FEW_SHOT_HEADER,
    CausalLMLabeller,
    LikelihoodJudge,
    RLAIFRecipeConfig,
    SoftLabelLoss,
    candidate_pairs,
    few_shot_lead,
    few_shot_pool,
    label_with_ai,
    labeller_format,
    labeller_metrics,
    labelling_prompt,
    likelihood_labels,
    make_labels,
    option_token_ids,
    soft_label_pairs,
    soft_labels,
)

from perl_plugins import attach

PREAMBLE = "Which reply is better?"
PAIRS = [
    ("User: a latte please", " Sure, one latte.", " No."),
    ("User: tea?", " Coffee only.", " We have green tea."),
]


class FixedLabeller:
    """Log-probs of ("1", "2") looked up by (reply shown first, reply shown second)."""

    def __init__(self, table: dict[tuple[str, str], tuple[float, float]]) -> None:
        self.table = table
        self.seen: list[str] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.seen.extend(texts)
        out = []
        for text in texts:
            key = next(k for k in self.table if f"Response 1: {k[0].strip()}\nResponse 2: {k[1].strip()}\n" in text)
            out.append(self.table[key])
        return torch.tensor(out)


def test_soft_label_is_the_mean_of_both_orders_log_odds():
    a, b = (math.log(0.7), math.log(0.1)), (-1.0, -3.0)  # order (r1, r2): "1" vs "2"; order (r2, r1)
    c, d = (-0.5, -0.2), (-2.0, -2.5)
    labeller = FixedLabeller({PAIRS[0][1:]: a, PAIRS[0][:0:-1]: b, PAIRS[1][1:]: c, PAIRS[1][:0:-1]: d})
    labels = soft_labels(labeller, PAIRS, PREAMBLE)
    for label, first, swapped in zip(labels, (a, c), (b, d)):
        p_first = torch.tensor(first).softmax(-1)[0].item()  # response 1 shown first: labeller says "1"
        p_second = torch.tensor(swapped).softmax(-1)[1].item()  # shown second: labeller says "2"
        assert label["p_1_preferred_order_12"] == pytest.approx(p_first)
        assert label["p_1_preferred_order_21"] == pytest.approx(p_second)
        log_odds = (math.log(p_first / (1 - p_first)) + math.log(p_second / (1 - p_second))) / 2
        assert label["p_1_preferred"] == pytest.approx(1 / (1 + math.exp(-log_odds)))
    # The first pair: softmax over just "1" and "2" (0.7 vs 0.1 -> 7/8), not the raw probability 0.7.
    assert labels[0]["p_1_preferred_order_12"] == pytest.approx(7 / 8)
    assert len(labeller.seen) == 4 and all(text.startswith(PREAMBLE) and text.endswith(CUE) for text in labeller.seen)


def test_position_bias_cancels():
    always_first = (math.log(0.8), math.log(0.2))  # prefers whatever is shown first
    labeller = FixedLabeller({k: always_first for _, *r in PAIRS for k in (tuple(r), tuple(r[::-1]))})
    labels = soft_labels(labeller, PAIRS, PREAMBLE)
    assert [label["p_1_preferred"] for label in labels] == pytest.approx([0.5, 0.5])
    rows = [{**label, "thumbs_1": 1.0, "thumbs_2": 0.0} for label in labels]
    metrics = labeller_metrics(rows)
    assert metrics["labeller_position_bias"] == pytest.approx(0.3)
    assert metrics["labeller_confidence"] == pytest.approx(0.0, abs=1e-6)


def test_a_real_preference_survives_position_bias():
    # Prefers the longer reply by 2 nats and the first position by 1 nat.
    def logps(first: str, second: str) -> tuple[float, float]:
        return (1.0 + 2.0 * (len(first) > len(second)), 2.0 * (len(second) > len(first)))

    labeller = FixedLabeller({k: logps(*k) for _, *r in PAIRS for k in (tuple(r), tuple(r[::-1]))})
    labels = soft_labels(labeller, PAIRS, PREAMBLE)
    # Log-odds 3 (longer first) and 1 (longer second) average to the 2 nats of the real preference.
    assert labels[0]["p_1_preferred"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert labels[0]["p_1_preferred"] > 0.5 > labels[1]["p_1_preferred"]  # the longer reply wins in both pairs
    rows = [{**label, "thumbs_1": t1, "thumbs_2": t2} for label, (t1, t2) in zip(labels, [(1, 0), (1, 0)])]
    assert labeller_metrics(rows)["labeller_human_agreement"] == pytest.approx(0.5)


def test_a_constant_position_bias_cancels_exactly_in_log_odds():
    # The labeller adds `bias` nats to whatever is shown first and `pref` nats to response 1; a
    # saturating bias (P(first) ~ 0.95, as SmolLM2 shows) must not squash the label towards 1/2:
    # averaging the two orders' log-odds gives back sigmoid(pref) exactly, the mean of the
    # probabilities does not ((sigmoid(4) + sigmoid(-2)) / 2 = 0.55 here).
    bias, pref = 3.0, 1.0
    table = {}
    for _, r1, r2 in PAIRS:
        table[(r1, r2)] = (bias + pref, 0.0)  # response 1 first
        table[(r2, r1)] = (bias, pref)  # response 1 second
    labels = soft_labels(FixedLabeller(table), PAIRS, PREAMBLE)
    for label in labels:
        assert label["p_1_preferred_order_12"] == pytest.approx(1 / (1 + math.exp(-(bias + pref))))
        assert label["p_1_preferred_order_21"] == pytest.approx(1 / (1 + math.exp(-(pref - bias))))
        assert label["p_1_preferred"] == pytest.approx(1 / (1 + math.exp(-pref)))


def test_option_tokens_of_the_embedded_tokenizer(tokenizer):
    one, two = option_token_ids(tokenizer)
    assert one != two and tokenizer.decode([one]) == "1" and tokenizer.decode([two]) == "2"
    with pytest.raises(ValueError, match="change the cue"):
        option_token_ids(tokenizer, cue="Response ")  # " 1" is one token: the cue's space merges with it


def test_labeller_reads_the_last_token_despite_padding(tokenizer):
    model = tiny_lm(tokenizer).eval()
    texts = [labelling_prompt(PREAMBLE, c, r1, r2) for c, r1, r2 in PAIRS] + ["short " + CUE]
    labeller = CausalLMLabeller(model, tokenizer, batch_size=3)
    got = labeller(texts)
    ids = option_token_ids(tokenizer)
    for text, row in zip(texts, got):
        single = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            expected = model(**single).logits[0, -1].log_softmax(-1)[ids]
        assert torch.allclose(row, expected, atol=1e-5)


@pytest.mark.parametrize("lead", ["", "User: one mocha\nAgent: A mocha.\n\n"])
def test_likelihood_judge_sums_the_reply_log_probs_despite_padding(tokenizer, lead):
    """Direct re-computation: one unpadded forward over lead + prefix + reply, each tokenized apart
    (the judge pads items in batches and runs a lead once, reusing its keys and values)."""
    model = tiny_lm(tokenizer).eval()
    items = [
        ("User: a latte please\nAgent:", " Sure, one latte."),
        ("Agent:", " No."),
        ("User: tea?\nAgent:", " Coffee."),
    ]
    got = LikelihoodJudge(model, tokenizer, batch_size=2)(items, lead)  # sorted by length, padded in pairs
    lead_ids = tokenizer(lead, add_special_tokens=False)["input_ids"]
    for (prefix, reply), (total, count) in zip(items, got):
        prefix_ids = lead_ids + tokenizer(prefix, add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prefix_ids + reply_ids])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0].log_softmax(-1)
        expected = sum(logps[len(prefix_ids) + k - 1, token].item() for k, token in enumerate(reply_ids))
        assert count == len(reply_ids) and total.item() == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="non-empty prefix"):
        LikelihoodJudge(model, tokenizer)([("", " x")])


def test_likelihood_label_is_the_per_token_pmi_difference():
    # (summed log-prob, tokens) of each reply with the conversation and alone, after "Agent:".
    table = {
        ("User: a latte please\nAgent:", " Sure, one latte."): (-6.0, 4),
        ("Agent:", " Sure, one latte."): (-14.0, 4),  # PMI 8 nats over 4 tokens: 2 per token
        ("User: a latte please\nAgent:", " No."): (-2.0, 2),
        ("Agent:", " No."): (-3.0, 2),  # more likely with the context (0.5 per token), but less than the first
        ("User: tea?\nAgent:", " Coffee only."): (-5.0, 3),
        ("Agent:", " Coffee only."): (-5.0, 3),  # the context does not help
        ("User: tea?\nAgent:", " We have green tea."): (-9.0, 5),
        ("Agent:", " We have green tea."): (-14.0, 5),  # 1 per token
    }
    seen = []

    def judge(items, lead):
        assert lead == ""  # no few-shot examples
        seen.extend(items)
        return torch.tensor([table[item] for item in items])

    labels = likelihood_labels(judge, [*PAIRS, PAIRS[0]])
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    assert [label["p_1_preferred"] for label in labels] == pytest.approx([sigmoid(1.5), sigmoid(-1.0), sigmoid(1.5)])
    assert all(
        label["p_1_preferred_order_12"] == label["p_1_preferred_order_21"] == label["p_1_preferred"] for label in labels
    )  # no order shown, no position bias
    assert sorted(seen) == sorted(table)  # each text scored once, the repeated pair included


EXAMPLES = [
    ("User: a latte please", "Sure, one latte."),  # the first judged pair's context: never its example
    ("User: one mocha", "We have green tea."),  # one of the second pair's replies: not its example
    ("User: one mocha", "A mocha, coming up."),  # a second reply to a context already taken
    ("User: iced, please", "Iced it is."),
    ("User: a cortado", "One cortado."),
]


def test_few_shot_lead_never_shows_the_judged_pair():
    lead = few_shot_lead(EXAMPLES, 2, *PAIRS[0][:1], PAIRS[0][1:])
    assert (
        lead
        == FEW_SHOT_HEADER + "User: one mocha\nAgent: We have green tea.\n\nUser: iced, please\nAgent: Iced it is.\n\n"
    )
    lead = few_shot_lead(EXAMPLES, 2, PAIRS[1][0], PAIRS[1][1:])  # " We have green tea." is judged here
    assert (
        lead
        == FEW_SHOT_HEADER
        + "User: a latte please\nAgent: Sure, one latte.\n\nUser: one mocha\nAgent: A mocha, coming up.\n\n"
    )
    for context, *replies in PAIRS:
        lead = few_shot_lead(EXAMPLES, 3, context, tuple(replies))
        assert f"{context}\n" not in lead and not any(reply.strip() in lead for reply in replies)
    assert few_shot_lead(EXAMPLES, 0, *PAIRS[0][:1], PAIRS[0][1:]) == ""
    with pytest.raises(ValueError, match="labeller_shots=5, but only 3"):
        few_shot_lead(EXAMPLES, 5, *PAIRS[0][:1], PAIRS[0][1:])


def test_few_shot_pool_holds_distinct_thumbs_up_rows_with_trimmed_contexts(tokenizer):
    rows = datasets.Dataset.from_dict(
        {
            "prompt": ["User: hi\nAgent: Hello.\nUser: a latte please\nAgent:"] * 3 + ["User: tea?\nAgent:"],
            "completion": [" Sure.", " Sure. ", " No.", " Green tea."],
            "label": [1, 1, 0, 1],
        }
    )
    last_turn = len(tokenizer("User: a latte please\nAgent:", add_special_tokens=False)["input_ids"])
    pool = few_shot_pool(rows, tokenizer, last_turn, seed=0)
    assert sorted(pool) == [("User: a latte please", "Sure."), ("User: tea?", "Green tea.")]
    assert pool == few_shot_pool(rows, tokenizer, last_turn, seed=0)


def test_few_shot_likelihood_label_equals_a_direct_recomputation(tokenizer):
    """The PMI label after a one-example lead, recomputed on a tiny random Llama from its forward pass."""
    model = tiny_lm(tokenizer).eval()
    judge = LikelihoodJudge(model, tokenizer, batch_size=3)
    labels = likelihood_labels(judge, PAIRS, EXAMPLES, shots=1)

    def logp(lead, prefix, reply):
        prefix_ids = [t for text in (lead, prefix) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logps = model(input_ids=torch.tensor([prefix_ids + reply_ids])).logits[0].log_softmax(-1)
        return sum(logps[len(prefix_ids) + k - 1, t].item() for k, t in enumerate(reply_ids)), len(reply_ids)

    leads = [
        FEW_SHOT_HEADER + "User: one mocha\nAgent: We have green tea.\n\n",
        FEW_SHOT_HEADER + "User: a latte please\nAgent: Sure, one latte.\n\n",
    ]
    for label, lead, (context, *replies) in zip(labels, leads, PAIRS):
        pmi = []
        for reply in replies:
            (given, count), (alone, _) = logp(lead, f"{context}\nAgent:", reply), logp(lead, "Agent:", reply)
            pmi.append((given - alone) / count)
        assert label["p_1_preferred"] == pytest.approx(torch.sigmoid(torch.tensor(pmi[0] - pmi[1])).item(), abs=1e-5)


@pytest.mark.parametrize(("norm", "divide"), [("sqrt", math.sqrt), ("none", lambda n: 1.0)])
def test_likelihood_label_length_norms(norm, divide):
    table = {
        ("User: a latte please\nAgent:", " Sure, one latte."): (-6.0, 4),
        ("Agent:", " Sure, one latte."): (-14.0, 4),
        ("User: a latte please\nAgent:", " No."): (-2.0, 2),
        ("Agent:", " No."): (-3.0, 2),
    }
    (label,) = likelihood_labels(lambda items, _: torch.tensor([table[i] for i in items]), PAIRS[:1], length_norm=norm)
    expected = 8.0 / divide(4) - 1.0 / divide(2)
    assert label["p_1_preferred"] == pytest.approx(1 / (1 + math.exp(-expected)))


def test_shots_need_the_likelihood_format_and_are_not_negative(tokenizer):
    with pytest.raises(ValueError, match="labeller_shots=2 needs labeller_format likelihood, not 'cue'"):
        make_labels("cue", tiny_lm(tokenizer), tokenizer, PAIRS, PREAMBLE, 2, EXAMPLES, 2)
    with pytest.raises(ValueError, match="labeller_shots must be >= 0"):
        RLAIFRecipeConfig(labeller_shots=-1)
    with pytest.raises(ValueError, match="labeller_length_norm must be one of"):
        RLAIFRecipeConfig(labeller_length_norm="chars")


def test_auto_labeller_format():
    from types import SimpleNamespace

    from perl_plugins.models.embedded import CHAT_TEMPLATE

    cfg, instruct, base = (
        RLAIFRecipeConfig(),
        SimpleNamespace(chat_template="{{ x }}"),
        SimpleNamespace(chat_template=CHAT_TEMPLATE),
    )
    assert labeller_format(cfg, instruct, "/cache/smollm2-135m-instruct-0123abcd") == "likelihood"
    assert labeller_format(cfg, instruct, "Qwen/Qwen2.5-1.5B-Instruct") == "chat"
    assert labeller_format(cfg, base, "/cache/base") == "cue"
    assert labeller_format(RLAIFRecipeConfig(labeller_format="chat"), instruct, "/c/smollm2-135m-instruct-0") == "chat"


@pytest.mark.parametrize("fmt", ["auto", "likelihood"])
def test_the_embedded_base_labels_pairs_in_either_format(fmt, tmp_path):
    from transformers import AutoTokenizer

    from perl_plugins.models.embedded import resolve_model

    base = resolve_model(None, "demo")
    replies = [" Sure.", " No.", " A latte."]
    prompts = ["User: a latte please\nAgent:"] * 3
    rows = datasets.Dataset.from_dict({"prompt": prompts, "completion": replies, "label": [1, 0, 1]})
    cfg = RLAIFRecipeConfig(output_dir=str(tmp_path), labeller_model_name_or_path="base", labeller_format=fmt)
    labelled = label_with_ai(cfg, base, AutoTokenizer.from_pretrained(base), rows)
    assert [json.loads(line) for line in (tmp_path / "rlaif_labels.jsonl").read_text().splitlines()] == labelled
    assert len(labelled) == 3 and all(0.0 < row["p_1_preferred"] < 1.0 for row in labelled)
    same_in_both_orders = [row["p_1_preferred_order_12"] == row["p_1_preferred_order_21"] for row in labelled]
    assert all(same_in_both_orders) == (fmt == "likelihood")  # auto: the base is asked with the cue, both orders


def test_candidate_pairs_come_from_one_context():
    rows = datasets.Dataset.from_dict(
        {
            "prompt": ["A", "A", "A", "B", "C", "C"],
            "completion": [" x", " y", " z", " solo", " u", " u"],
            "label": [1, 0, 1, 1, 1, 0],
        }
    )
    pairs = candidate_pairs(rows, per_context=2, limit=10, seed=0)
    assert sorted((p["prompt"], p["response_1"], p["response_2"]) for p in pairs) == [
        ("A", " x", " y"),
        ("A", " x", " z"),
    ]
    assert {(p["thumbs_1"], p["thumbs_2"]) for p in pairs} == {(1.0, 0.0), (1.0, 1.0)}


def test_soft_label_loss_replaces_bradley_terry(tokenizer, tmp_path):
    from trl import RewardConfig, RewardTrainer

    ids = [
        tokenizer(f"User: hi\nAgent: {w}{tokenizer.eos_token}", add_special_tokens=False)["input_ids"]
        for w in ("Sure thing", "No", "Hello there", "What")
    ]
    data = datasets.Dataset.from_dict({"chosen_ids": ids[:2], "rejected_ids": ids[2:], "soft_label": [0.9, 0.2]})
    args = RewardConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = RewardTrainer(
        model=tiny_reward_model(tokenizer), args=args, train_dataset=data, processing_class=tokenizer
    )
    attach(trainer, plugins=[SoftLabelLoss()])
    batch = trainer.data_collator([data[0], data[1]])
    assert batch["soft_label"].tolist() == pytest.approx([0.9, 0.2])
    model = trainer.model.eval()
    with torch.no_grad():
        total = trainer.compute_loss(model, dict(batch))
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    d = rewards[:2] - rewards[2:]
    p = torch.tensor([0.9, 0.2])
    expected = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d)).mean()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    # With hard labels (p = 1) it is the stock Bradley-Terry loss.
    batch["soft_label"] = torch.ones(2)
    with torch.no_grad():
        assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(
            -F.logsigmoid(d).mean().item(), rel=1e-5
        )


def test_soft_label_loss_keeps_grms_weighting(tokenizer, tmp_path):
    """With ``grm`` the soft-label loss takes the reward loss's place at weight 1 - alpha."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from perl_plugins.models.embedded import resolve_model

    ids = [
        tokenizer(f"User: hi\nAgent: {w}{tokenizer.eos_token}", add_special_tokens=False)["input_ids"]
        for w in ("Sure thing", "No", "Hello there", "What")
    ]
    data = datasets.Dataset.from_dict({"chosen_ids": ids[:2], "rejected_ids": ids[2:], "soft_label": [0.9, 0.2]})
    args = RewardConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    # A checkpoint with an LM head, which GRM's regularizer reads.
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(None, "tiny"), num_labels=1)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    attach(trainer, plugins=["grm", SoftLabelLoss()], grm_alpha=0.25, grm_head="linear")
    logs = train_quietly(trainer)
    assert len(logs) == 2
    for entry in logs:
        expected = 0.75 * entry["soft_label_loss"] + 0.25 * entry["grm_reg_loss"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-4)


def test_grm_regularizes_the_response_the_ai_preferred(tokenizer, tmp_path):
    """Pairs are oriented by the AI label (chosen = preferred, soft label max(p, 1 - p)), so GRM's sft
    regularizer raises the likelihood of the preferred response, whichever slot it came in."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from perl_plugins.models.embedded import resolve_model
    from perl_plugins.models.reward import reward_ids

    rows = [
        {"prompt": "User: tea?\nAgent:", "response_1": " No.", "response_2": " Green or black?", "p_1_preferred": 0.2},
        {
            "prompt": "User: a latte\nAgent:",
            "response_1": " Sure, one latte.",
            "response_2": " What?",
            "p_1_preferred": 0.9,
        },
    ]
    pairs = soft_label_pairs(tokenizer, rows, max_length=64)
    preferred = [" Green or black?", " Sure, one latte."]
    assert pairs["chosen_ids"] == [reward_ids(tokenizer, r["prompt"] + c) for r, c in zip(rows, preferred)]
    assert pairs["soft_label"] == pytest.approx([0.8, 0.9]) and pairs["prompt"] == [r["prompt"] for r in rows]

    path = resolve_model(None, "tiny")
    args = RewardConfig(str(tmp_path), per_device_train_batch_size=2, report_to="none", use_cpu=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    attach(trainer, plugins=["grm", SoftLabelLoss()], grm_alpha=0.5, grm_head="linear", grm_beta=0.1)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(batch))
    got = trainer.perl_plugins.recorder._values["eval"]["grm_reg_loss"][-1]
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    expected = []
    for row, response in zip(rows, preferred):
        ids, start = reward_ids(tokenizer, row["prompt"] + response), len(tokenizer(row["prompt"])["input_ids"])
        with torch.no_grad():
            logp = lm(torch.tensor([ids])).logits[0].log_softmax(-1)
        expected.append(-F.logsigmoid(0.1 * sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))))
    assert got == pytest.approx(torch.stack(expected).mean().item(), rel=1e-4)
