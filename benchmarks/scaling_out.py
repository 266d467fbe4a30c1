"""Scaling out: what each of 2 processes holds, and how fast it steps, under DDP, DeepSpeed ZeRO-2
and ZeRO-3, on a full fine-tune (where ZeRO's partitions matter) with ``fp8`` and ``adapter_ckpt``.

    python benchmarks/scaling_out.py [--size bench20m] [--steps 8] [--engines ddp,zero2,zero3]

Each engine runs ``perl-plugins sft --plugins fp8,adapter_ckpt,benchmarks/_rank_stats.py`` with
``accelerate launch --num_processes 2`` on CPU (gloo, fp32, one thread per process), saving one
checkpoint at the end. ``_rank_stats.py`` (a local plugin) records per process: parameter bytes it
holds, FP8AdamW state bytes, ZeRO's fp32 master partitions, peak RSS and median step time. ZeRO-3
uses ``tests/ds_zero3_partition_all.json`` (every tensor partitioned). Last line: one JSON object
with each engine's per-process means and their ratios to DDP, plus checkpoint sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = {
    "ddp": ["--config_file", str(ROOT / "recipes/accelerate/ddp.yaml")],
    "zero2": ["--config_file", str(ROOT / "recipes/accelerate/deepspeed_zero2.yaml")],
    "zero3": ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "tests/ds_zero3_partition_all.json")],
}


def run(engine: str, out: Path, args: argparse.Namespace) -> dict:
    argv = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        *LAUNCH[engine],
        "-m",
        "perl_plugins.cli",
        "sft",
        "--plugins",
        f"fp8,adapter_ckpt,{ROOT / 'benchmarks/_rank_stats.py'}",
        "--model_size",
        args.size,
        "--use_cpu",
        "true",
        "--bf16",
        "false",
        "--max_steps",
        str(args.steps),
        "--save_steps",
        str(args.steps),
        "--per_device_train_batch_size",
        "4",
        "--max_length",
        "128",
        "--logging_steps",
        "1",
        "--max_train_samples",
        "256",
        "--eval_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    ranks = [json.loads((out / f"rank_stats_{r}.json").read_text()) for r in range(2)]
    checkpoint = out / f"checkpoint-{args.steps}"
    mean = {k: sum(r[k] for r in ranks) / len(ranks) for k in ranks[0]}
    return {
        **mean,
        "checkpoint_mb": sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) / 2**20,
        "wall_s": time.perf_counter() - start,
    }


def _held(r: dict) -> float:
    """Parameters, optimizer state and ZeRO's fp32 master partitions a process holds."""
    return r["param_bytes"] + r["optimizer_state_bytes"] + r["fp32_master_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", default="bench20m", help="embedded model size (perl_plugins.models.embedded.tiny_config)"
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--engines", default="ddp,zero2,zero3")
    args = parser.parse_args()
    os.environ.setdefault("PERL_PLUGINS_CACHE", tempfile.mkdtemp(prefix="perl_plugins_cache_"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines.split(","):
            print(f"[scaling_out] {engine} ...", file=sys.stderr)
            results[engine] = run(engine, Path(tmp) / engine, args)
    ddp = results.get("ddp")
    summary = {"model_size": args.size, "processes": 2, "per_process": results}
    if ddp:
        for engine, r in results.items():
            if engine == "ddp":
                continue
            summary[f"{engine}_vs_ddp"] = {
                "held_bytes": _held(r) / _held(ddp),
                "param_bytes": r["param_bytes"] / ddp["param_bytes"],
                "optimizer_state_bytes": r["optimizer_state_bytes"] / ddp["optimizer_state_bytes"],
                "peak_rss": r["peak_rss_mb"] / ddp["peak_rss_mb"],
                "step_time": r["step_s"] / ddp["step_s"],
            }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
