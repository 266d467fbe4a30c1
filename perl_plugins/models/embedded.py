"""The embedded default model and tokenizer: everything a run needs, with no network access.

- Tokenizer: byte-level BPE trained at first use, deterministically, on the shipped Taskmaster
  coffee text (all dialogs plus the train split of the feedback), then cached in
  ``$PERL_PLUGINS_CACHE`` or the user's cache dir (``platformdirs.user_cache_dir("perl-plugins")``).
- Model, ``size="demo"`` (the default of ``resolve_model(None)``, the CLI and the recipes): the
  pre-trained base shipped in ``perl_plugins/assets/base/`` (a ~5M-parameter Llama and the same
  tokenizer, trained on the coffee text by ``recipes/pretrain_base.py``; see its ``CARD.md``).
  Weights are stored in float16; its config says float32, so ``load_default`` and a plain
  ``from_pretrained`` of the path ``resolve_model(None)`` returns both compute in float32.
- Model, other sizes (``"tiny"`` for fast tests, ``"bench20m"``, ...), or ``"demo"`` when the assets
  are absent: a small Llama (``tiny_config``) with *random* weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import platformdirs
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from perl_plugins.data.taskmaster import (
    DEFAULT_DIALOGS_FILE,
    DEFAULT_REWARD_FILE,
    load_dialog_texts,
    load_splits,
)
from perl_plugins.models.atomic import atomic_dir

DEFAULT_MODEL_ID = "perl-plugins/embedded-default"
ASSETS_BASE_DIR = Path(__file__).resolve().parent.parent / "assets" / "base"

VOCAB_SIZE = 4096
MAX_POSITIONS = 2048  # the longest coffee prompt is well under this
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
# Listed first to the BPE trainer, so their ids are fixed and tiny_config needs no tokenizer.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Same "User: ... / Agent: ..." lines as perl_plugins.data.taskmaster. Assistant turns end with
# EOS (like <|im_end|> in other templates) so conversational SFT learns to stop; the generation
# prompt is "Agent:" and the model continues with " reply", exactly as in prompt/completion data.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Agent: ' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Agent:' }}{% endif %}"
)

_TOKENIZER_SETTINGS = {
    "recipe": 1,  # bump when the training code below changes in a way the settings do not show
    "vocab_size": VOCAB_SIZE,
    "min_frequency": 2,
    "special_tokens": [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
    "chat_template": CHAT_TEMPLATE,
    "tokenizers": tokenizers.__version__,  # another trainer version may merge differently
}

_SIZES = {
    # Unit tests: a forward pass in milliseconds.
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
    ),
    # Demos on CPU: ~1.8M parameters.
    "demo": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384
    ),
    # Benchmarks: ~20.5M and ~99.5M parameters with the 4,096-token vocabulary.
    "bench20m": dict(
        hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2, intermediate_size=1536
    ),
    "bench100m": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2688
    ),
    # Memory benchmark where weights, gradients and optimizer states dominate: ~0.5B parameters.
    "bench500m": dict(
        hidden_size=1536, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4, intermediate_size=4096
    ),
}


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$PERL_PLUGINS_CACHE``, else the user's cache dir."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("PERL_PLUGINS_CACHE") or platformdirs.user_cache_dir("perl-plugins"))


def _materialize(final: Path, write: Callable[[Path], None]) -> Path:
    """Create directory ``final`` by ``write(tmp)`` then one rename, so that no process ever sees
    a half-written directory and two processes racing both end up with one complete copy."""
    if not final.is_dir():
        with atomic_dir(final, replace=False) as tmp:
            write(tmp)
    return final


def _tokenizer_corpus() -> list[str]:
    """Tokenizer training text. Train split only, so held-out feedback stays unseen."""
    train = load_splits(DEFAULT_REWARD_FILE)["train"]
    return load_dialog_texts(DEFAULT_DIALOGS_FILE) + [r.prompt + r.completion for r in train]


def _train_tokenizer(corpus: list[str]) -> tokenizers.Tokenizer:
    # Plain byte-level BPE (no continuing-subword prefix): the trainer then assigns ids in a
    # sorted, hash-order-free way, so the same corpus gives the same vocabulary on every run.
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_SETTINGS["vocab_size"],
        min_frequency=_TOKENIZER_SETTINGS["min_frequency"],
        special_tokens=_TOKENIZER_SETTINGS["special_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """The cached tokenizer directory, trained and written on first use."""
    corpus = _tokenizer_corpus()
    digest = hashlib.sha256(json.dumps([_TOKENIZER_SETTINGS, corpus]).encode()).hexdigest()

    def write(tmp: Path) -> None:
        PreTrainedTokenizerFast(
            tokenizer_object=_train_tokenizer(corpus),
            pad_token=PAD_TOKEN,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            # trl pads prompts on the left itself; left is also what batched generate() needs.
            padding_side="left",
            model_max_length=MAX_POSITIONS,
            chat_template=CHAT_TEMPLATE,
        ).save_pretrained(tmp)

    return _materialize(cache_root(cache_dir) / f"tokenizer-{digest[:16]}", write)


def build_tokenizer(cache_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The embedded tokenizer: byte-level BPE, 4,096 tokens, ``<|pad|>``/``<|bos|>``/``<|eos|>``
    (ids 0/1/2; none is added automatically), left padding, "User:/Agent:" chat template.

    Trained on first use (a few seconds) and cached under ``cache_root(cache_dir)``, keyed by a
    hash of the training text and settings; later calls load the cached files.
    """
    return AutoTokenizer.from_pretrained(_tokenizer_dir(cache_dir), local_files_only=True)


def tiny_config(size: str = "tiny", vocab_size: int = VOCAB_SIZE) -> LlamaConfig:
    """A small Llama config: "tiny" (tests, ~0.3M params), "demo" (~1.8M; only used for random init
    when the pre-trained base is absent), "bench20m", "bench100m", "bench500m".

    The LM head is untied from the embeddings (its own module, e.g. for LoRA targeting).
    """
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(_SIZES)}")
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        **_SIZES[size],
    )


def default_model_source(size: str = "demo") -> Path | None:
    """Where the default weights come from: the shipped pre-trained base for ``size="demo"``
    (``perl_plugins/assets/base/``, when its config.json exists), else None, meaning random init."""
    if size == "demo" and (ASSETS_BASE_DIR / "config.json").is_file():
        return ASSETS_BASE_DIR
    return None


TUNE_BASE_COMMAND = (
    "python recipes/pretrain_base.py --config recipes/pretrain_base.yaml "
    "--heldout validation --output_dir outputs/tune-base"
)


def read_validation_texts(model_path: str | Path) -> bool:
    """Whether a base from ``recipes/pretrain_base.py`` (its ``card.json`` says) was pre-trained on
    the texts of the validation rows: the shipped one was (they are train rows of the test split's
    train side). Scores on those rows then come from features of text the base has memorised, and
    run high (measured in the README), so settings are better tuned on a base built with
    ``TUNE_BASE_COMMAND``. False for any other model."""
    card = Path(model_path) / "card.json"
    if not card.is_file():
        return False
    data = json.loads(card.read_text()).get("data", {})
    return bool(data.get("feedback", {}).get("documents")) and data.get("heldout", "test") != "validation"


def load_default(
    size: str = "demo", seed: int = 0, torch_dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The embedded default (model, tokenizer), offline: by default the pre-trained ``demo`` base
    (see ``default_model_source``); ``size="tiny"`` etc. give random weights.

    Random init is seeded with ``seed`` without touching the caller's global RNG state.
    """
    source = default_model_source(size)
    if source is not None:
        model = LlamaForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=True)
        return model, AutoTokenizer.from_pretrained(source, local_files_only=True)
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(size, vocab_size=len(tokenizer)))
    return model.to(torch_dtype), tokenizer


def save_default(
    directory: str | Path,
    size: str = "tiny",
    seed: int = 0,
    torch_dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the embedded default (model + tokenizer) with ``save_pretrained``, so that any
    ``from_pretrained`` or trl CLI ``--model_name_or_path DIR`` can load it."""
    directory = Path(directory)
    model, tokenizer = load_default(size, seed=seed, torch_dtype=torch_dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def resolve_model(name_or_path: str | None = None, size: str = "demo") -> str:
    """A loadable model path: None or DEFAULT_MODEL_ID become the embedded default, the one the CLI
    and the recipes use: the pre-trained ``demo`` base shipped in the package (other sizes, e.g.
    ``"tiny"``, are random-initialised and written once, atomically, into the cache dir); anything
    else: an alias of ``perl_plugins.models.aliases`` (``smollm2-135m-instruct``, ``embedded``, ``tiny``)
    gives its directory, and hub ids and local paths are returned unchanged."""
    if name_or_path is not None and name_or_path != DEFAULT_MODEL_ID:
        from perl_plugins.models.aliases import resolve_alias  # it imports this module

        return resolve_alias(name_or_path) or name_or_path
    config = tiny_config(size)  # fails fast on an unknown size
    source = default_model_source(size)
    if source is not None:
        return str(source)
    # In a multi-process launch only the first process of each node writes the cache (elsewhere
    # save_pretrained writes no weights); the others find the finished copy.
    with _local_main_process_first():
        key = json.dumps([_tokenizer_dir().name, config.to_json_string()])
        final = cache_root() / f"model-{size}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        return str(_materialize(final, lambda tmp: save_default(tmp, size)))


def _local_main_process_first() -> contextlib.AbstractContextManager:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState().local_main_process_first()
