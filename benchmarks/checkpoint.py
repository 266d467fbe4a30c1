"""Checkpoint benchmark: ``adapter_ckpt`` (LoRA r=16) against the stock full fine-tuning checkpoint.

Model: the ~100M-parameter Llama ``perl_plugins.models.embedded.tiny_config("bench100m")``, random init,
trained as a causal LM on Taskmaster coffee dialogs with the stock transformers ``Trainer`` (CPU,
fp32). Measures:

* ``size_ratio``: bytes of an adapter_ckpt checkpoint / bytes of the stock full fine-tuning
  checkpoint (model + optimizer + scheduler + RNG + trainer state), both at step SAVE_STEPS;
* ``save_time_ratio``: wall time of one adapter_ckpt save / one stock full save (mean over saves);
* ``resume_max_abs_loss_diff``: max |loss| difference between an uninterrupted LoRA run and one
  resumed from its checkpoint at SAVE_STEPS.

Usage: ``python benchmarks/checkpoint.py [--out DIR]``; the last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

SAVE_STEPS, MAX_STEPS, LORA_R = 2, 4, 16
GOALS = {"size_ratio": 0.01, "resume_max_abs_loss_diff": 1e-6}


def dataset(tokenizer: Any, rows: int = 32, max_length: int = 64) -> Any:
    from datasets import Dataset

    from perl_plugins.data.taskmaster import DEFAULT_DIALOGS_FILE, load_dialog_texts

    texts = load_dialog_texts(DEFAULT_DIALOGS_FILE)[:rows]
    return Dataset.from_dict({"text": texts}).map(
        lambda e: tokenizer(e["text"], truncation=True, max_length=max_length), remove_columns=["text"]
    )


def build(output_dir: Path, lora: bool, max_steps: int) -> Any:
    """A stock Trainer on a fresh bench100m model (same seed: same weights); LoRA through plugins."""
    from transformers import DataCollatorForLanguageModeling, LlamaForCausalLM, Trainer, TrainingArguments

    import perl_plugins
    from perl_plugins.models.embedded import build_tokenizer, tiny_config

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("bench100m", vocab_size=len(tokenizer)))
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=SAVE_STEPS,
        save_strategy="steps",
        per_device_train_batch_size=2,
        logging_steps=1,
        learning_rate=1e-4,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(tokenizer), data_collator=collator)
    if lora:
        perl_plugins.attach(trainer, plugins="lora,adapter_ckpt", lora_r=LORA_R, lora_alpha=2 * LORA_R)
    return trainer


def timed_saves(trainer: Any) -> list[float]:
    """Record the wall time of each checkpoint save the trainer makes."""
    times: list[float] = []
    save = trainer._save_checkpoint

    def _save_checkpoint(model: Any, trial: Any) -> None:
        start = time.perf_counter()
        save(model, trial)
        times.append(time.perf_counter() - start)

    trainer._save_checkpoint = _save_checkpoint
    return times


def train(trainer: Any, resume: str | None = None) -> dict[int, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(out: Path) -> dict[str, Any]:
    full = build(out / "full", lora=False, max_steps=SAVE_STEPS)
    full_times = timed_saves(full)
    train(full)
    full_ckpt = out / "full" / f"checkpoint-{SAVE_STEPS}"
    n_params = sum(p.numel() for p in full.model.parameters())
    del full

    lora = build(out / "lora", lora=True, max_steps=MAX_STEPS)
    lora_times = timed_saves(lora)
    uninterrupted = train(lora)
    lora_ckpt = out / "lora" / f"checkpoint-{SAVE_STEPS}"
    trainable = sum(p.numel() for p in lora.model.parameters() if p.requires_grad)
    del lora

    resumed = train(build(out / "resumed", lora=True, max_steps=MAX_STEPS), str(lora_ckpt))
    diffs = [abs(uninterrupted[s] - resumed[s]) for s in uninterrupted if s > SAVE_STEPS]

    full_bytes, lora_bytes = dir_bytes(full_ckpt), dir_bytes(lora_ckpt)
    full_save_s, lora_save_s = sum(full_times) / len(full_times), sum(lora_times) / len(lora_times)
    result = {
        "model": "bench100m",
        "params": n_params,
        "lora_r": LORA_R,
        "trainable_params": trainable,
        "full_ckpt_bytes": full_bytes,
        "adapter_ckpt_bytes": lora_bytes,
        "size_ratio": lora_bytes / full_bytes,
        "full_save_s": round(full_save_s, 4),
        "adapter_ckpt_save_s": round(lora_save_s, 4),
        "save_time_ratio": lora_save_s / full_save_s,
        "resume_steps_compared": len(diffs),
        "resume_max_abs_loss_diff": max(diffs),
        "device": "cpu",
    }
    result["goals_met"] = all(result[key] <= goal for key, goal in GOALS.items()) and len(diffs) > 0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="where to write the checkpoints (default: a temp dir, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="perl_ckpt_bench_") as tmp:
        result = run(Path(args.out or tmp))
    for key, value in result.items():
        print(f"{key:>26}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
