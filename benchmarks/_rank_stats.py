"""Local plugin for benchmarks/scaling_out.py: each process writes what it holds and how fast it
steps to ``<output_dir>/rank_stats_<rank>.json`` at the last step."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from perl_plugins import hookimpl
from perl_plugins.plugins.fp8 import innermost_optimizer


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _held(trainer: Any) -> dict[str, int]:
    params = list(trainer.model.parameters())
    # ZeRO-3 keeps this process's slice in ds_tensor and an empty placeholder in the parameter.
    local = [getattr(p, "ds_tensor", p) for p in params]
    basic = innermost_optimizer(trainer.optimizer)
    state = [v for s in basic.state.values() for v in s.values() if hasattr(v, "numel")]
    # ZeRO's fp32 master partitions: stage 1/2 and stage 3 name them differently; DDP has none.
    engine_optimizer = getattr(trainer.model_wrapped, "optimizer", None)
    zero = getattr(engine_optimizer, "single_partition_of_fp32_groups", None)
    zero = zero or getattr(engine_optimizer, "fp32_partitioned_groups_flat", [])
    return {"param_bytes": _bytes(local), "optimizer_state_bytes": _bytes(state), "fp32_master_bytes": _bytes(zero)}


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(float(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


@hookimpl
def perl_on_train_begin(trainer: Any) -> None:
    trainer.rank_stats_step_ends = []


@hookimpl
def perl_on_step_end(trainer: Any, state: Any) -> None:
    ends = trainer.rank_stats_step_ends
    ends.append(time.perf_counter())
    if state.global_step < state.max_steps:
        return
    steps = [b - a for a, b in zip(ends[1:], ends[2:])]  # the first two steps warm up
    stats = {**_held(trainer), "peak_rss_mb": _peak_rss_mb(), "step_s": statistics.median(steps) if steps else None}
    out = Path(trainer.args.output_dir) / f"rank_stats_{trainer.args.process_index}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stats))
