"""Embedded default: cached deterministic tokenizer, chat template, Llama sizes, offline model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from perl_plugins.data import load_feedback
from perl_plugins.models import embedded as E


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One isolated cache (and one tokenizer training) for the whole session."""
    path = tmp_path_factory.mktemp("perl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERL_PLUGINS_CACHE", str(path))
        E.build_tokenizer()
        yield path


@pytest.fixture(scope="session")
def tokenizer(cache):
    return E.build_tokenizer()


def test_tokenizer_basics(tokenizer):
    assert len(tokenizer) == E.VOCAB_SIZE
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        E.PAD_ID,
        E.BOS_ID,
        E.EOS_ID,
    )
    assert tokenizer.padding_side == "left"
    rows = load_feedback()
    prompts = tokenizer([r.prompt for r in rows]).input_ids
    full = tokenizer([r.prompt + r.completion for r in rows]).input_ids
    # The prompt/completion boundary never splits a token, and everything fits the model.
    assert all(f[: len(p)] == p for p, f in zip(prompts, full))
    assert max(map(len, full)) < E.MAX_POSITIONS
    text = rows[1].prompt + rows[1].completion + " ünïcode ☕"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_tokenizer_cache_is_reused(cache, monkeypatch):
    (directory,) = cache.glob("tokenizer-*")
    mtime = (directory / "tokenizer.json").stat().st_mtime_ns

    def no_training(corpus):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(E, "_train_tokenizer", no_training)
    E.build_tokenizer()
    assert (directory / "tokenizer.json").stat().st_mtime_ns == mtime
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_tokenizer_is_deterministic(cache, tokenizer, tmp_path):
    again = E.build_tokenizer(cache_dir=tmp_path)  # trained afresh in another cache dir
    assert again.get_vocab() == tokenizer.get_vocab()
    (a,) = cache.glob("tokenizer-*/tokenizer.json")
    (b,) = tmp_path.glob("tokenizer-*/tokenizer.json")
    assert a.read_bytes() == b.read_bytes()


def test_materialize_is_atomic(tmp_path):
    final = tmp_path / "thing"

    def broken(tmp):
        (tmp / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        E._materialize(final, broken)
    assert list(tmp_path.iterdir()) == []

    def lose_race(tmp):  # another process renames its complete copy in first
        final.mkdir()
        (final / "theirs").write_text("x")
        (tmp / "ours").write_text("x")

    assert E._materialize(final, lose_race) == final
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]
    assert [p.name for p in final.iterdir()] == ["theirs"]


def test_chat_template(tokenizer):
    messages = [
        {"role": "user", "content": "one latte"},
        {"role": "assistant", "content": "Hot or iced?"},
        {"role": "user", "content": "hot"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "User: one latte\nAgent: Hot or iced?<|eos|>\nUser: hot\nAgent:"
    )
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False) == "User: one latte\n"


@pytest.mark.parametrize(
    "size, low, high",
    [
        ("tiny", 0.1e6, 1e6),
        ("demo", 1e6, 3e6),
        ("bench20m", 18e6, 22e6),
        ("bench100m", 90e6, 110e6),
    ],
)
def test_config_sizes(size, low, high):
    config = E.tiny_config(size)
    assert not config.tie_word_embeddings
    assert (config.pad_token_id, config.eos_token_id) == (E.PAD_ID, E.EOS_ID)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert low < sum(p.numel() for p in model.parameters()) < high


def test_unknown_size():
    with pytest.raises(ValueError, match="unknown size"):
        E.tiny_config("huge")


def test_load_default_forward(cache, tokenizer):
    state = torch.random.get_rng_state()
    model, tok = E.load_default("tiny", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    batch = tok(["User: a mocha please\nAgent:", "Agent:"], return_tensors="pt", padding=True)
    assert batch.input_ids[1, 0] == E.PAD_ID  # left padding
    logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    same, _ = E.load_default("tiny", seed=1)
    other, _ = E.load_default("tiny", seed=2)
    assert torch.equal(same.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    assert E.load_default("tiny", torch_dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_resolve_model(cache):
    assert E.resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    path = E.resolve_model(None, "tiny")
    assert path.startswith(str(cache)) and E.resolve_model(E.DEFAULT_MODEL_ID, "tiny") == path
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert model.config.hidden_size == E.tiny_config("tiny").hidden_size
    assert tok.pad_token == E.PAD_TOKEN and tok.chat_template == E.CHAT_TEMPLATE
    # A reward model (trl RewardTrainer) loads from the same directory.
    reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, local_files_only=True)
    assert reward(**tok(["Agent: hi"], return_tensors="pt")).logits.shape == (1, 1)


def test_shipped_base_seam(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "ASSETS_BASE_DIR", tmp_path / "absent")
    assert E.default_model_source("demo") is None  # no shipped base: random init
    base = E.save_default(tmp_path / "base", size="tiny")  # stands in for a pre-trained base
    monkeypatch.setattr(E, "ASSETS_BASE_DIR", base)
    assert E.default_model_source("demo") == base and E.default_model_source("tiny") is None
    model, tok = E.load_default(size="demo")
    assert model.config.hidden_size == E.tiny_config("tiny").hidden_size  # loaded, not built
    assert E.resolve_model(None, size="demo") == str(base)
