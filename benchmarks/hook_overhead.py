"""Overhead of the plugin host on a training step.

The same small SFT run is timed with a stock ``trl.SFTTrainer``, with ``attach(trainer,
plugins=[])`` and with one no-op plugin (a ``perl_compute_loss`` that does nothing, so the loss
and log methods are wrapped), alternating the three variants for several rounds. A callback
times every optimizer step (CPU time of this process by default, steady on a shared machine; or
wall time); the first steps of each run are warm-up and dropped. The last line
printed is JSON: ``{"ratio_no_plugins": ..., "ratio_noop_plugin": ...}``, each variant's median
step time over the stock trainer's in the same round, median over rounds (goal: <= 1.02 each).

    python benchmarks/hook_overhead.py [--rounds 9] [--steps 20] [--threads 1] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import perl_plugins  # noqa: E402
from perl_plugins.embedded import build_tokenizer  # noqa: E402

WARMUP_STEPS = 5
VARIANTS = ("stock", "no_plugins", "noop_plugin")


def _noop_plugin() -> types.ModuleType:
    plugin = types.ModuleType("noop")
    plugin.perl_compute_loss = perl_plugins.hookimpl(lambda terms: None)
    return plugin


class StepTimer(TrainerCallback):
    """Time of every optimizer step, measured between consecutive ``on_step_end`` events so that
    everything in a step counts (data, forward/backward, optimizer, logging)."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.times: list[float] = []
        self._last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        self.times.append(now - self._last)
        self._last = now


def _model(tokenizer) -> LlamaForCausalLM:
    # Sized so that a step takes roughly 50-100 ms on one CPU thread: overhead stays measurable.
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _dataset(steps: int, batch_size: int) -> Dataset:
    texts = [
        f"User: one {size} {drink} with {extra}, please\nAgent: Sure, one {size} {drink} with {extra} coming up."
        for size in ("small", "medium", "large") for drink in ("latte", "mocha", "flat white", "cappuccino")
        for extra in ("oat milk", "a double shot", "caramel", "no sugar")
    ]
    rows = steps * batch_size
    return Dataset.from_dict({"text": (texts * (rows // len(texts) + 1))[:rows]})


def time_run(
    variant: str, tokenizer, dataset: Dataset, steps: int, batch_size: int, output_dir: str, clock: Any
) -> list[float]:
    """Step times (warm-up dropped) of one fresh run of ``variant``."""
    args = SFTConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, max_length=64,
        logging_steps=1, learning_rate=1e-4, report_to="none", use_cpu=True, save_strategy="no", seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    if variant == "no_plugins":
        perl_plugins.attach(trainer, plugins=[])
    elif variant == "noop_plugin":
        perl_plugins.attach(trainer, plugins=[_noop_plugin()])
        assert "compute_loss" in vars(trainer)  # the loss path really is wrapped
    trainer.remove_callback(PrinterCallback)  # printing every log line would only add noise
    timer = StepTimer(clock)
    trainer.add_callback(timer)
    trainer.train()
    return timer.times[WARMUP_STEPS:]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="Runs of each variant, alternated.")
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per run (first 5 dropped).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a busy box).")
    parser.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu",
        help="cpu: CPU time of the training thread (with one torch thread, other processes sharing the "
        "cores cannot inflate it by preempting us); wall: elapsed time (use on an idle machine).",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    tokenizer = build_tokenizer()
    dataset = _dataset(args.steps, args.batch_size)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    rounds: list[dict[str, float]] = []  # median step time per variant, per round
    with tempfile.TemporaryDirectory() as output_dir:
        for round_index in range(args.rounds):
            # Rotate the order too, so no variant always runs first (or last) in a round.
            order = VARIANTS[round_index % 3:] + VARIANTS[: round_index % 3]
            rounds.append({
                v: statistics.median(time_run(v, tokenizer, dataset, args.steps, args.batch_size, output_dir, clock))
                for v in order
            })
            print(f"round {round_index + 1}/{args.rounds}: median ms/step "
                  + ", ".join(f"{v}={rounds[-1][v] * 1000:.1f}" for v in VARIANTS), file=sys.stderr)
    # Ratios within a round compare runs made close together (same load on a shared machine);
    # the median over rounds drops the rounds a neighbour's burst disturbed.
    result = {
        f"ratio_{v}": round(statistics.median(r[v] / r["stock"] for r in rounds), 4) for v in VARIANTS[1:]
    }
    print(json.dumps({"median_step_ms": {v: round(statistics.median(r[v] for r in rounds) * 1000, 2) for v in VARIANTS}}))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
