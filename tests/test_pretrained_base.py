"""The shipped pre-trained base (perl_plugins/assets/base/, made by recipes/pretrain_base.py): files
match the card's hashes, it loads offline as the embedded default, it writes coffee-domain text, its
corpus holds nothing of the held-out split, and the recipe is deterministic given its seed."""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
from pathlib import Path

import pytest
import tokenizers
import torch
from perl_plugins.recipes import pretrain_base as P
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from perl_plugins.data.defaults import heldout_rows
from perl_plugins.data.taskmaster import (
    DEFAULT_DIALOGS_FILE,
    DEFAULT_REWARD_FILE,
    FeedbackRow,
    count_leaks,
    load_dialog_texts,
    load_splits,
)
from perl_plugins.models import embedded as E

BASE = E.ASSETS_BASE_DIR
COFFEE_WORDS = {
    "coffee",
    "latte",
    "espresso",
    "mocha",
    "cappuccino",
    "americano",
    "macchiato",
    "tea",
    "chai",
    "cortado",
    "milk",
    "oat",
    "almond",
    "soy",
    "whole",
    "iced",
    "hot",
    "size",
    "small",
    "medium",
    "large",
    "grande",
    "tall",
    "venti",
    "shot",
    "shots",
    "sugar",
    "syrup",
    "vanilla",
    "caramel",
    "order",
    "drink",
    "cup",
    "decaf",
    "whipped",
    "cream",
    "pickup",
    "name",
    "bar",
    "menu",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((BASE / "card.json").read_text())


def test_shipped_files_match_the_card(card):
    shipped = {p.name for p in BASE.iterdir() if p.is_file()} - {"card.json", "CARD.md"}
    assert shipped == set(card["files"]), "every shipped file is listed in the card, and only those"
    for name, digest in card["files"].items():
        assert sha256(BASE / name) == digest, f"{name} differs from the card"
    card_md = (BASE / "CARD.md").read_text()
    assert all(digest in card_md for digest in card["files"].values())
    assert "CC BY 4.0" in card_md and "Taskmaster" in card_md
    # The data it was trained on is the data the package ships.
    assert card["data_files"] == {
        DEFAULT_DIALOGS_FILE.name: sha256(DEFAULT_DIALOGS_FILE),
        DEFAULT_REWARD_FILE.name: sha256(DEFAULT_REWARD_FILE),
    }
    assert {"final_train_loss", "final_eval_loss", "steps"} <= set(card["training"])
    assert card["config"]["seed"] == card["training"]["seed"]
    # Small: fp16 weights, at most 20 MB and 10M parameters.
    weights = BASE / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    with safe_open(weights, "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert dtypes == {"F16"}
    assert n_params == card["model"]["parameters"] <= 10_000_000


def test_loads_offline_as_the_embedded_default(monkeypatch, card):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert E.default_model_source("demo") == BASE and E.default_model_source("tiny") is None
    assert E.resolve_model(None, "demo") == str(BASE)
    model, tok = E.load_default("demo")
    assert model.dtype == torch.float32  # stored fp16, computed in fp32 on CPU
    assert sum(p.numel() for p in model.parameters()) == card["model"]["parameters"]
    # What the recipes do with the resolved path: a plain from_pretrained also gives float32.
    assert AutoModelForCausalLM.from_pretrained(BASE, local_files_only=True).dtype == torch.float32
    assert tok.pad_token_id == E.PAD_ID and tok.eos_token_id == E.EOS_ID and tok.chat_template == E.CHAT_TEMPLATE
    if card["versions"]["tokenizers"] == tokenizers.__version__:  # another trainer version may merge differently
        assert tok.get_vocab() == E.build_tokenizer().get_vocab(), "shipped tokenizer = embedded tokenizer"
    # The random default stays available for fast tests.
    tiny, _ = E.load_default("tiny")
    assert tiny.config.hidden_size == E.tiny_config("tiny").hidden_size


def test_generates_coffee_domain_text():
    model, tok = E.load_default("demo")
    prompts = ["User: hi, can i get a", "User: i'd like a large iced latte please\nAgent:", "Agent: what size"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    words = [w for t in texts for w in re.findall(r"[a-z]+", t.lower())]
    assert len(words) >= 10, texts
    assert COFFEE_WORDS & set(words), texts
    corpus_words = {w for d in load_dialog_texts() for w in re.findall(r"[a-z]+", d.lower())}
    known = sum(w in corpus_words for w in words) / len(words)
    assert known >= 0.8, (known, texts)  # words of the coffee dialogs, not byte soup


def test_corpus_holds_nothing_of_the_held_out_split(card):
    splits = load_splits()
    train, test = splits["train"], splits["test"]
    assert not {r.conversation_id for r in train} & {r.conversation_id for r in test}
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    assert count_leaks(train, test) == {"prefix_rows": 0, "shared_ids": 0, "shared_prompts": 0}
    cfg = P.PretrainConfig(**card["config"])
    train_docs, eval_docs, _ = P.build_corpus(cfg)
    # The shipped model was trained on exactly this corpus.
    assert hashlib.sha256(json.dumps(train_docs).encode()).hexdigest() == card["training"]["corpus_sha256"]
    docs = set(train_docs)
    held_out_contexts = {r.prompt.removesuffix("Agent:") for r in test}
    for r in test:
        assert r.prompt not in docs and r.prompt + r.completion not in docs
    blob = "\0".join(train_docs)
    assert not [c for c in held_out_contexts if c in blob], "a held-out context is in the pre-training text"
    assert eval_docs and not set(eval_docs) <= docs  # the eval loss is on dialogs mostly unseen


def test_a_validation_base_has_read_neither_the_validation_nor_the_test_rows(card):
    """``heldout: validation`` is the base to tune on: the shipped one has read the validation rows'
    texts (their contexts are in its corpus), this one has read no held-out row of either split."""
    validation = heldout_rows(heldout="validation")["test"]
    held = [*validation, *load_splits()["test"]]
    contexts = lambda rows: {r.prompt.removesuffix("Agent:") for r in rows}  # noqa: E731
    shipped, _, _ = P.build_corpus(P.PretrainConfig(**card["config"]))
    assert [c for c in contexts(validation) if c in "\0".join(shipped)]
    cfg = P.PretrainConfig(**{**card["config"], "heldout": "validation"})
    docs, _, stats = P.build_corpus(cfg)
    blob = "\0".join(docs)
    assert stats["heldout"] == "validation" and len(docs) < len(shipped)
    assert not [c for c in contexts(held) if c in blob]
    with pytest.raises(ValueError, match="heldout must be one of"):
        P.build_corpus(P.PretrainConfig(**{**card["config"], "heldout": "dev"}))


def test_a_fold_base_has_read_no_row_of_its_fold(card):
    """``heldout: fold:I/K`` (``benchmarks/quality.py --folds``): the fold's contexts are nowhere in
    the corpus, the other folds' are, and the card names the fold. Fold 1 holds rows rated at their
    dialog's first turn (empty context): the other folds' texts are kept all the same."""
    fold = heldout_rows(heldout="fold:1/5")
    contexts = lambda rows: {r.prompt.removesuffix("Agent:") for r in rows} - {""}  # noqa: E731
    docs, _, stats = P.build_corpus(P.PretrainConfig(**{**card["config"], "heldout": "fold:1/5"}))
    blob = "\0".join(docs)
    assert stats["heldout"] == "fold:1/5" and not [c for c in contexts(fold["test"]) if c in blob]
    assert [c for c in contexts(fold["train"]) if c in blob]
    assert stats["feedback"]["documents"] > 0.8 * card["data"]["feedback"]["documents"]
    assert "fold 1/5" in P.heldout_note("fold:1/5") and P.heldout_note("test") == "The train split"


def test_feedback_documents_drop_texts_of_held_out_dialogs_only():
    """A train text is dropped when it contains a held-out context; an empty held-out context (a
    first-turn rating) matches every text and is no evidence of a shared dialog."""
    row = lambda prompt, completion: FeedbackRow("c", prompt, completion, 1)  # noqa: E731
    train = [
        row("User: hi\nAgent:", " Hello, what can I get you?"),
        row("User: a latte\nAgent:", " Sure, what size?"),
        row("User: a latte\nAgent: Sure, what size?\nUser: large\nAgent:", " Done."),
    ]
    held = [row("Agent:", " Welcome."), row("User: a latte\nAgent: Sure, what size?\nUser: large\nAgent:", " Ok.")]
    docs, stats = P.feedback_documents(train, held)
    assert docs == ["User: hi\nAgent: Hello, what can I get you?"]
    assert stats["after_prefix_dedup"] == 2 and stats["dropped_held_out_overlap"] == 1


TINY_RUN = [
    "--hidden_size",
    "32",
    "--num_hidden_layers",
    "2",
    "--intermediate_size",
    "64",
    "--max_steps",
    "3",
    "--batch_size",
    "4",
    "--block_size",
    "64",
    "--max_documents",
    "60",
    "--warmup_steps",
    "1",
    "--eval_steps",
    "0",
    "--logging_steps",
    "1",
    "--sample_tokens",
    "4",
    "--fresh_tokenizer",
    "false",
]


def test_recipe_is_deterministic(tmp_path):
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cards = [
        P.main(
            [
                "--config",
                str(Path(P.__file__).with_suffix(".yaml")),
                "--output_dir",
                str(tmp_path / f"run{i}"),
                *TINY_RUN,
            ]
        )
        for i in range(2)
    ]
    assert cards[0]["files"]["model.safetensors"] == cards[1]["files"]["model.safetensors"]
    assert cards[0]["training"]["final_train_loss"] == cards[1]["training"]["final_train_loss"]
    out = tmp_path / "run0"
    assert all(sha256(out / name) == digest for name, digest in cards[0]["files"].items())
    assert (out / "curves.png").stat().st_size > 0 and (out / "CARD.md").is_file()
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).pad_token == E.PAD_TOKEN
    assert AutoModelForCausalLM.from_pretrained(out, local_files_only=True).dtype == torch.float32
    # The process is left as it was (the recipe switches deterministic algorithms on).
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    # It replaces an earlier output of its own, never an unrelated folder.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="not replacing"):
        P.main(["--output_dir", str(tmp_path / "other"), *TINY_RUN])


def test_tuning_on_validation_rows_the_base_has_read_is_flagged(tmp_path, caplog):
    from perl_plugins.training.recipe_kit import check_tuning_base

    shipped = E.resolve_model(None, "demo")
    assert E.read_validation_texts(shipped)  # the shipped base read the whole train side

    def card(name: str, data: dict) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "card.json").write_text(json.dumps({"data": data}))
        return tmp_path / name

    assert not E.read_validation_texts(card("tune", {"heldout": "validation", "feedback": {"documents": 5}}))
    assert not E.read_validation_texts(card("dialogs", {"heldout": "test", "feedback": {"documents": 0}}))
    assert not E.read_validation_texts(tmp_path)  # no card: not a base of ours
    with caplog.at_level("WARNING"):
        check_tuning_base(shipped, "test")
        assert not caplog.records
        check_tuning_base(shipped, "validation")
    assert "--heldout validation" in caplog.text and shipped in caplog.text
