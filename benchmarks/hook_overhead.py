"""Overhead of the plugin host on a training step.

The same small SFT run is timed with a stock ``trl.SFTTrainer``, with ``attach(trainer,
plugins=[])`` and with one no-op plugin (a ``perl_compute_loss`` that does nothing, so the loss
and log methods are wrapped). The three trainers run in lockstep, one thread each, taking turns
step by step, so that consecutive steps of the three variants meet the same machine load (on a
shared machine, load swings far more between runs than the overhead being measured). Their
order rotates every round, after a discarded warm-up round. A callback times every optimizer
step (CPU time of the trainer's thread by default, or wall time); the first steps of each run
are warm-up and dropped.

The last line printed is JSON: ``{"ratio_no_plugins": ..., "ratio_noop_plugin": ...}``, the
median step time of each variant over the stock trainer's (goal: <= 1.02 each). The line before
also gives the host's own time per step with the no-op plugin, timed directly.

    python benchmarks/hook_overhead.py [--rounds 3] [--steps 40] [--threads 1] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import perl_plugins  # noqa: E402
from perl_plugins.models.embedded import build_tokenizer  # noqa: E402

WARMUP_STEPS = 5
VARIANTS = ("stock", "no_plugins", "noop_plugin")


def _noop_plugin() -> types.ModuleType:
    plugin = types.ModuleType("noop")
    plugin.perl_compute_loss = perl_plugins.hookimpl(lambda terms: None)
    return plugin


class Turns:
    """A token passed round-robin between trainer threads: one computes while the others wait."""

    TIMEOUT_S = 120.0

    def __init__(self, count: int) -> None:
        self.count = count
        self.turn = 0
        self.condition = threading.Condition()

    def wait(self, index: int) -> None:
        with self.condition:
            if not self.condition.wait_for(lambda: self.turn == index, timeout=self.TIMEOUT_S):
                raise RuntimeError("lockstep: a trainer thread never handed over its turn (did it fail?)")

    def pass_on(self, index: int) -> None:
        with self.condition:
            self.turn = (index + 1) % self.count
            self.condition.notify_all()


class LockstepTimer(TrainerCallback):
    """Times each optimizer step of one trainer, from getting the turn to ``on_step_end``, so that
    everything in a step counts (data, forward/backward, optimizer, logging); then hands over."""

    def __init__(self, turns: Turns, index: int, clock: Any) -> None:
        self.turns, self.index, self.clock = turns, index, clock
        self.times: list[float] = []
        self._start = 0.0

    def _take_turn(self) -> None:
        self.turns.wait(self.index)
        self._start = self.clock()

    def on_train_begin(self, args, state, control, **kwargs):
        self._take_turn()

    def on_step_end(self, args, state, control, **kwargs):
        # Last callback in line: the other callbacks' on_step_end ran; logging comes next turn.
        self.times.append(self.clock() - self._start)
        self.turns.pass_on(self.index)
        if state.global_step < state.max_steps:
            self._take_turn()


def _model(tokenizer) -> LlamaForCausalLM:
    # Sized so that a step takes roughly 50-100 ms on one CPU thread: overhead stays measurable.
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _dataset(steps: int, batch_size: int) -> Dataset:
    texts = [
        f"User: one {size} {drink} with {extra}, please\nAgent: Sure, one {size} {drink} with {extra} coming up."
        for size in ("small", "medium", "large")
        for drink in ("latte", "mocha", "flat white", "cappuccino")
        for extra in ("oat milk", "a double shot", "caramel", "no sugar")
    ]
    rows = steps * batch_size
    return Dataset.from_dict({"text": (texts * (rows // len(texts) + 1))[:rows]})


def _trainer(variant: str, tokenizer, dataset: Dataset, steps: int, batch_size: int, output_dir: str) -> SFTTrainer:
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        max_length=64,
        logging_steps=1,
        learning_rate=1e-4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # printing every log line would only add noise
    if variant == "no_plugins":
        perl_plugins.attach(trainer, plugins=[])
    elif variant == "noop_plugin":
        perl_plugins.attach(trainer, plugins=[_noop_plugin()])
        assert "compute_loss" in vars(trainer)  # the loss path really is wrapped
    return trainer


def lockstep_round(
    order: Sequence[str], tokenizer, dataset: Dataset, steps: int, batch_size: int, output_dir: str, clock: Any
) -> dict[str, list[float]]:
    """Train one fresh trainer per variant in lockstep; step times per variant, warm-up dropped."""
    turns = Turns(len(order))
    timers = {}
    trainers = {}
    for index, variant in enumerate(order):
        trainers[variant] = _trainer(variant, tokenizer, dataset, steps, batch_size, output_dir)
        timers[variant] = LockstepTimer(turns, index, clock)
        trainers[variant].add_callback(timers[variant])
    with ThreadPoolExecutor(len(order)) as pool:
        for future in [pool.submit(trainer.train) for trainer in trainers.values()]:
            future.result()
    return {variant: timer.times[WARMUP_STEPS:] for variant, timer in timers.items()}


def host_time_per_step(tokenizer, dataset: Dataset, steps: int, batch_size: int, output_dir: str, clock: Any) -> float:
    """Seconds per step spent in the host's own code for the no-op plugin: time inside the
    wrapped ``compute_loss``/``log`` minus time inside the stock methods they call. Timed
    directly, so unlike the ratios it does not drown in the noise of a shared machine."""
    trainer = _trainer("stock", tokenizer, dataset, steps, batch_size, output_dir)
    spent = {"stock": 0.0, "wrapped": 0.0}

    def timed(method, key):
        def call(*a, **k):
            start = clock()
            try:
                return method(*a, **k)
            finally:
                spent[key] += clock() - start

        return call

    for name in ("compute_loss", "log"):  # the stock methods, as attach() will find them
        setattr(trainer, name, timed(getattr(trainer, name), "stock"))
    perl_plugins.attach(trainer, plugins=[_noop_plugin()])
    for name in ("compute_loss", "log"):  # the host's wrappers around them
        setattr(trainer, name, timed(getattr(trainer, name), "wrapped"))
    trainer.train()
    return (spent["wrapped"] - spent["stock"]) / steps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="Lockstep runs of the three variants.")
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per run (first 5 dropped).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a busy box).")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: CPU time of the trainer's thread (with one torch thread, time lost to other processes "
        "preempting it does not count); wall: elapsed time.",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    tokenizer = build_tokenizer()
    dataset = _dataset(args.steps, args.batch_size)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as output_dir:
        # A discarded round first: the first trainers in a fresh process run slower (lazy imports,
        # allocator growth), which would count against whichever variant goes first.
        lockstep_round(VARIANTS, tokenizer, dataset, WARMUP_STEPS * 2, args.batch_size, output_dir, clock)
        for round_index in range(args.rounds):
            order = VARIANTS[round_index % 3 :] + VARIANTS[: round_index % 3]
            for variant, run_times in lockstep_round(
                order, tokenizer, dataset, args.steps, args.batch_size, output_dir, clock
            ).items():
                times[variant] += run_times
            print(
                f"round {round_index + 1}/{args.rounds}: median ms/step so far "
                + ", ".join(f"{v}={statistics.median(t) * 1000:.1f}" for v, t in times.items()),
                file=sys.stderr,
            )
        host = host_time_per_step(tokenizer, dataset, args.steps, args.batch_size, output_dir, clock)
    median = {v: statistics.median(t) for v, t in times.items()}
    result = {f"ratio_{v}": round(median[v] / median["stock"], 4) for v in VARIANTS[1:]}
    print(
        json.dumps(
            {
                "median_step_ms": {v: round(m * 1000, 2) for v, m in median.items()},
                "steps_timed_per_variant": len(times["stock"]),
                "noop_plugin_host_us_per_step": round(host * 1e6, 1),
                "noop_plugin_host_fraction_of_step": round(host / median["stock"], 5),
            }
        )
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
