"""Pre-train the embedded base model: the byte-level BPE tokenizer and a small Llama causal LM on the
Taskmaster coffee text, reproducibly, on CPU. Its output is what ships in
``perl_plugins/assets/base/`` and what every recipe loads by default (``resolve_model(None, "demo")``).

    python recipes/pretrain_base.py --config recipes/pretrain_base.yaml       # ~15 min on one idle CPU core
    python recipes/pretrain_base.py --config recipes/pretrain_base.yaml --output_dir outputs/base --max_steps 50

Corpus (``build_corpus``): all coffee dialogs, plus the *train split* (``load_splits``) of the
thumbs up/down feedback as prompt + completion texts, deduplicated (a text that is a prefix of
another is dropped: contexts of one dialog nest). Nothing of the held-out split the recipes evaluate
on is used: train texts that contain a held-out context (the same dialog, rated at a later turn
under another conversation id) are dropped too. A few dialogs are held out for the eval loss.
``heldout: validation`` also leaves out the validation split carved from train (``heldout_rows``):
the shipped base has read those texts (not their labels), so settings chosen on validation rows
with it are chosen on rows its features have memorised; tune on a base built this way instead.

Training: stock ``transformers.Trainer``, causal-LM loss on packed blocks (documents joined with
EOS, cut into ``block_size`` tokens), AdamW, cosine schedule, fixed seed, deterministic algorithms,
``num_threads`` intra-op threads (the same seed and thread count give the same weights).

Writes OUTPUT_DIR/: model.safetensors (float16 weights; config.json says float32, so that a plain
``from_pretrained`` computes in float32 on CPU), config.json, generation_config.json, tokenizer
files, curves.png (loss curve), card.json (machine-readable: sha256 of every shipped file and of
the data files, training config, final loss, samples) and CARD.md (the same, for people, with the
data attribution).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import tokenizers
import torch
import transformers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from trl import TrlParser

from perl_plugins.data.defaults import heldout_rows
from perl_plugins.data.taskmaster import (
    DEFAULT_DIALOGS_FILE,
    DEFAULT_REWARD_FILE,
    FeedbackRow,
    load_dialog_texts,
    load_feedback,
)
from perl_plugins.models.atomic import atomic_dir
from perl_plugins.models.embedded import MAX_POSITIONS, build_tokenizer
from perl_plugins.training.reporting import plot_curves


def heldout_note(heldout: str) -> str:
    """What the card says of the feedback rows read, for ``heldout``'s split."""
    if heldout == "validation":
        return "The train split minus the validation split carved from it (`heldout: validation`, for tuning)"
    if heldout.startswith("fold:"):
        return f"The rows outside cross-validation fold {heldout.removeprefix('fold:')} (`heldout: {heldout}`)"
    return "The train split"


SAMPLE_PROMPTS = (
    "User: hi, can i get a",
    "User: i'd like a large iced latte please\nAgent:",
    "Agent: Welcome to the Coffee Bar where you can order coffee, tea, espresso, and other drinks ahead of "
    "time. What can I get for you?\nUser: one hot chocolate please\nAgent:",
)
ATTRIBUTION = """\
Taskmaster coffee data (TM-4-2024, released with the PERL paper, Sidahmed et al. 2024,
arXiv:2403.10704) from https://github.com/google-research-datasets/Taskmaster, by Bill Byrne and
Saravanan Ganesh, Google LLC, licensed under Creative Commons Attribution 4.0 International
(CC BY 4.0, https://creativecommons.org/licenses/by/4.0/). Re-packed as gzip'd JSON lines, nothing
else changed (see perl_plugins/data/ATTRIBUTION.md). This model was trained on that data; keep this
attribution wherever it is redistributed."""


@dataclass
class PretrainConfig:
    output_dir: str = field(default="outputs/pretrain_base", metadata={"help": "Where the model, card and curves go."})
    dialogs_file: str | None = field(default=None, metadata={"help": "Coffee dialogs; default: the shipped file."})
    feedback_file: str | None = field(default=None, metadata={"help": "Thumbs up/down file; default: coffee."})
    feedback_texts: bool = field(
        default=True,
        metadata={"help": "Add the feedback rows' texts to the dialogs (false: dialogs only, no rated row read)."},
    )
    heldout: str = field(
        default="test",
        metadata={
            "help": "Feedback left out of the corpus: test (the shipped base), validation (the validation split "
            "too: a base that has not read the rows settings are chosen on), or fold:I/K (fold I of the K-fold "
            "cross-validation of benchmarks/quality.py --folds K)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of everything (document order, init, batches)."})
    num_threads: int = field(default=1, metadata={"help": "Torch intra-op threads (part of what fixes the result)."})
    fresh_tokenizer: bool = field(default=True, metadata={"help": "Train the BPE afresh (else reuse the cached copy)."})
    # model (LlamaConfig fields)
    hidden_size: int = field(default=256, metadata={"help": "Model width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Transformer layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    num_key_value_heads: int = field(default=2, metadata={"help": "Key/value heads (grouped-query attention)."})
    intermediate_size: int = field(default=768, metadata={"help": "MLP width."})
    # data
    block_size: int = field(default=256, metadata={"help": "Tokens per packed training block."})
    eval_fraction: float = field(default=0.03, metadata={"help": "Share of dialogs held out for the eval loss."})
    max_documents: int = field(default=0, metadata={"help": "Use only the first N documents (0: all; for tests)."})
    # optimisation
    max_steps: int = field(default=500, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Blocks per step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate."})
    min_lr_rate: float = field(default=0.1, metadata={"help": "Final learning rate as a share of the peak (cosine)."})
    warmup_steps: int = field(default=30, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N steps."})
    eval_steps: int = field(
        default=100, metadata={"help": "Eval loss on held-out dialogs every N steps (0: end only)."}
    )
    sample_tokens: int = field(default=40, metadata={"help": "New tokens per greedy sample written to the card."})


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def feedback_documents(train: list[FeedbackRow], test: list[FeedbackRow]) -> tuple[list[str], dict[str, int]]:
    """Train-split prompt + completion texts, deduplicated, none touching the held-out split.

    Contexts nest (each rated turn of a dialog repeats the turns before it), so a text that is a
    prefix of another adds nothing and is dropped. A train text that contains a held-out context
    comes from a held-out dialog (rated at a later turn under another id) and is dropped as well:
    it would show the model held-out contexts and often their rated completions. An empty context
    (a row rated at the dialog's first turn) shows nothing and would match every text: skipped.
    """
    texts = sorted({r.prompt + r.completion for r in train})
    # In sorted order a string that is a prefix of any other is a prefix of the next one.
    maximal = [t for i, t in enumerate(texts) if not (i + 1 < len(texts) and texts[i + 1].startswith(t))]
    blob = "\0".join(maximal)
    starts = list(itertools.accumulate((len(t) + 1 for t in maximal[:-1]), initial=0))
    touched = set()
    for context in {r.prompt.removesuffix("Agent:") for r in test} - {""}:
        i = blob.find(context)
        while i != -1:
            touched.add(bisect.bisect_right(starts, i) - 1)
            i = blob.find(context, i + 1)
    clean = [t for i, t in enumerate(maximal) if i not in touched]
    stats = {
        "train_rows": len(train),
        "test_rows": len(test),
        "distinct_texts": len(texts),
        "after_prefix_dedup": len(maximal),
        "dropped_held_out_overlap": len(maximal) - len(clean),
        "documents": len(clean),
    }
    return clean, stats


@functools.lru_cache(maxsize=2)
def _load(dialogs_file: str, feedback_file: str, heldout: str) -> tuple[list[str], list[str], dict[str, int]]:
    train = heldout_rows(feedback_file, heldout)["train"]
    kept = set(train)
    held = [r for r in load_feedback(feedback_file) if r not in kept]  # test, and validation if held out
    return load_dialog_texts(dialogs_file), *feedback_documents(train, held)


def build_corpus(cfg: PretrainConfig) -> tuple[list[str], list[str], dict]:
    """(train documents, eval documents, stats). Eval: a seeded share of the dialogs."""
    dialogs, feedback, stats = _load(
        str(cfg.dialogs_file or DEFAULT_DIALOGS_FILE), str(cfg.feedback_file or DEFAULT_REWARD_FILE), cfg.heldout
    )
    rng = random.Random(cfg.seed)
    dialogs, feedback, stats = list(dialogs), list(feedback), dict(stats)
    if not cfg.feedback_texts:
        feedback, stats["documents"] = [], 0
    order = list(range(len(dialogs)))
    rng.shuffle(order)
    n_eval = round(len(dialogs) * cfg.eval_fraction)
    eval_docs = [dialogs[i] for i in sorted(order[:n_eval])]
    train_docs = [dialogs[i] for i in sorted(order[n_eval:])] + feedback
    rng.shuffle(train_docs)
    if cfg.max_documents:
        train_docs, eval_docs = train_docs[: cfg.max_documents], eval_docs[: max(1, cfg.max_documents // 10)]
    stats = {"dialogs": len(dialogs), "eval_dialogs": n_eval, "heldout": cfg.heldout, "feedback": stats}
    return train_docs, eval_docs, stats


def pack(tokenizer: PreTrainedTokenizerFast, docs: list[str], block_size: int) -> datasets.Dataset:
    """Documents joined with EOS and cut into full blocks (the remainder is dropped)."""
    ids: list[int] = []
    for doc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(doc)
        ids.append(tokenizer.eos_token_id)
    blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def model_config(cfg: PretrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def greedy_samples(model, tokenizer, prompts, max_new_tokens: int) -> list[dict[str, str]]:
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            batch = tokenizer(prompt, return_tensors="pt")
            gen = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            text = tokenizer.decode(gen[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            out.append({"prompt": prompt, "completion": text})
    return out


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_card(out: Path, card: dict) -> None:
    (out / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    t, m = card["training"], card["model"]
    lines = [
        "# perl-plugins embedded base model",
        "",
        f"A {m['parameters'] / 1e6:.2f}M-parameter Llama-family causal LM and its byte-level BPE tokenizer "
        f"({m['vocab_size']} tokens), pre-trained from scratch on CPU by `recipes/pretrain_base.py` on Taskmaster "
        'coffee text. It is the default base of every perl-plugins recipe (`resolve_model(None, "demo")`). '
        "A tiny domain model for demos and tests: it writes coffee-ordering dialog, nothing else.",
        "",
        "## Data",
        "",
        f"- All {card['data']['dialogs']} coffee dialogs except {card['data']['eval_dialogs']} held out for the eval loss.",
        "- No feedback text (`feedback_texts: false`): no rated row of either split was read."
        if not card["data"]["feedback"]["documents"]
        else f"- {heldout_note(card['data']['heldout'])} "
        "(`heldout_rows`, seed 0: leak-free, i.e. no held-out conversation id or prompt in train and "
        "no held-out context equal to the first four or more turns of a train context) of the coffee thumbs up/down "
        f"feedback, as prompt + completion "
        f"texts: {card['data']['feedback']['documents']} documents from {card['data']['feedback']['train_rows']} rows "
        f"(texts that are a prefix of another dropped; {card['data']['feedback']['dropped_held_out_overlap']} "
        "dropped because they contain a held-out context). Nothing of the held-out split is used; labels are not used.",
        f"- {t['train_blocks']} blocks of {t['block_size']} tokens ({t['train_tokens']:,} tokens).",
        "",
        "| data file | sha256 |",
        "| --- | --- |",
        *[f"| `{name}` | `{digest}` |" for name, digest in card["data_files"].items()],
        "",
        "## Training",
        "",
        f"{t['steps']} steps of {t['batch_size']} blocks ({t['epochs']:.2f} epochs), seed {t['seed']}, "
        f"{t['num_threads']} CPU threads, {t['wall_time_s'] / 60:.1f} min wall. "
        f"Final training loss {t['final_train_loss']:.4f}, held-out dialog loss {t['final_eval_loss']:.4f}.",
        "Loss curve: `curves.png`. Full configuration: `card.json` (`config`).",
        "",
        "Weights are stored in float16; `config.json` says float32, so a plain `from_pretrained` loads them as "
        "float32 (what CPU training wants).",
        "",
        "## Greedy samples",
        "",
        *[f"- `{s['prompt']!r}` → `{s['completion']!r}`" for s in card["samples"]],
        "",
        "## Files",
        "",
        "| file | sha256 |",
        "| --- | --- |",
        *[f"| `{name}` | `{digest}` |" for name, digest in card["files"].items()],
        "",
        "## Attribution",
        "",
        card["attribution"],
        "",
    ]
    (out / "CARD.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = TrlParser([PretrainConfig]).parse_args_and_config(argv)
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not (out / "card.json").is_file():
        raise SystemExit(f"{out} is not empty and holds no earlier pretrain_base output (card.json); not replacing it.")
    start = time.time()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    environ = dict(os.environ)  # full_determinism sets CUDA/cuBLAS variables
    torch.set_num_threads(cfg.num_threads)
    try:
        with atomic_dir(out) as stage:  # an earlier output is replaced only by a complete one
            card = _run(cfg, stage, start)
            for path in stage.iterdir():
                path.chmod(0o644)  # safetensors writes its file private
    finally:  # leave the process as we found it (tests call main() in-process)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
    print(f"[pretrain_base] wrote {out}", flush=True)
    return card


def _run(cfg: PretrainConfig, out: Path, start: float) -> dict:
    """Train and write everything into ``out`` (a fresh staging directory)."""
    if cfg.fresh_tokenizer:
        with tempfile.TemporaryDirectory() as tmp:  # train the BPE now, not from the cache
            tokenizer = build_tokenizer(cache_dir=tmp)
    else:
        tokenizer = build_tokenizer()
    train_docs, eval_docs, data_stats = build_corpus(cfg)
    train_ds = pack(tokenizer, train_docs, cfg.block_size)
    eval_ds = pack(tokenizer, eval_docs, cfg.block_size)
    print(
        f"[pretrain_base] {len(train_docs)} documents -> {len(train_ds)} blocks of {cfg.block_size} tokens; "
        f"eval {len(eval_ds)} blocks",
        flush=True,
    )

    transformers.set_seed(cfg.seed)
    model = LlamaForCausalLM(model_config(cfg, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[pretrain_base] {n_params / 1e6:.2f}M parameters, {cfg.max_steps} steps", flush=True)

    work = tempfile.TemporaryDirectory()  # the Trainer's own output_dir: nothing in it ships
    args = TrainingArguments(
        output_dir=work.name,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=2 * cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_rate},
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=cfg.seed,
        full_determinism=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=default_data_collator
    )
    trainer.train()
    final_eval = trainer.evaluate()["eval_loss"]
    work.cleanup()
    logs = trainer.state.log_history
    train_losses = [log["loss"] for log in logs if "loss" in log]
    samples = greedy_samples(model, tokenizer, SAMPLE_PROMPTS, cfg.sample_tokens)
    for s in samples:
        print(f"[pretrain_base] sample {s['prompt'][-40:]!r} -> {s['completion']!r}", flush=True)

    # Ship float16 weights (half the size); config.json says float32 so that loading computes in float32.
    model.config.use_cache = True  # the Trainer switched it off for training
    model.to(torch.float16).save_pretrained(out)
    _edit_json(out / "config.json", lambda c: c.update(dtype="float32"))
    tokenizer.save_pretrained(out)
    # Drop load-time flags the tokenizer picked up from the cache it was loaded from.
    _edit_json(out / "tokenizer_config.json", lambda c: [c.pop(k, None) for k in ("is_local", "local_files_only")])
    plot_curves(out, {"pre-training: causal LM loss": (logs, ["loss", "eval_loss"])})

    wall = time.time() - start
    data_files = {
        Path(cfg.dialogs_file or DEFAULT_DIALOGS_FILE).name: sha256_file(cfg.dialogs_file or DEFAULT_DIALOGS_FILE),
        Path(cfg.feedback_file or DEFAULT_REWARD_FILE).name: sha256_file(cfg.feedback_file or DEFAULT_REWARD_FILE),
    }
    shipped = sorted(p.name for p in out.iterdir() if p.is_file() and p.name not in ("card.json", "CARD.md"))
    card = {
        "model": {
            "architecture": "LlamaForCausalLM",
            "parameters": n_params,
            "vocab_size": len(tokenizer),
            "weights_dtype": "float16",
        },
        "data": data_stats,
        "data_files": data_files,
        "training": {
            "seed": cfg.seed,
            "num_threads": cfg.num_threads,
            "steps": trainer.state.global_step,
            "batch_size": cfg.batch_size,
            "block_size": cfg.block_size,
            "train_blocks": len(train_ds),
            "train_tokens": len(train_ds) * cfg.block_size,
            "epochs": trainer.state.global_step * cfg.batch_size / max(1, len(train_ds)),
            "final_train_loss": train_losses[-1] if train_losses else math.nan,
            "final_eval_loss": final_eval,
            "wall_time_s": round(wall, 1),
            "corpus_sha256": hashlib.sha256(json.dumps(train_docs).encode()).hexdigest(),
        },
        "config": asdict(cfg),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "samples": samples,
        "files": {name: sha256_file(out / name) for name in shipped},
        "attribution": ATTRIBUTION,
    }
    write_card(out, card)
    print(
        f"[pretrain_base] done in {wall / 60:.1f} min: final loss {card['training']['final_train_loss']:.4f} "
        f"(eval {final_eval:.4f})",
        flush=True,
    )
    return card


if __name__ == "__main__":
    main(sys.argv[1:])
