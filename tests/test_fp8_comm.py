"""FP8 gradient all-reduce: scale bookkeeping in-process, and real 2-rank DDP training over gloo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_multiprocess

from perl_plugins.plugins.fp8.codec import E4M3_MAX, quantize_e4m3
from perl_plugins.plugins.fp8.comm import FP8CommState


def test_propose_halves_until_few_enough_values_saturate():
    state = FP8CommState(init_scale=2.0**16, overflow_fraction=1e-5)
    grad = torch.full((1000,), 0.01)
    grad[0] = 1.0  # the only large value: with 1000 values, none may saturate
    mu = state.propose(0, grad)
    assert mu * 1.0 <= E4M3_MAX < 2 * mu * 1.0  # the largest power of two that fits
    big = torch.full((300_000,), 0.01)
    big[:3] = 1.0  # 3 outliers of 300k: 1e-5 * 300k = 3 may saturate
    assert state.propose(1, big) == 2.0**15  # bounded by 0.01 only: 0.01 * 2^15 < 448


def test_commit_grows_after_quiet_steps_and_resets_on_halving():
    state = FP8CommState(init_scale=1024.0, growth_interval=3)
    for _ in range(2):
        state.commit(0, 1024.0)
    assert state.scales[0] == 1024.0
    state.commit(0, 1024.0)
    assert state.scales[0] == 2048.0  # third quiet step: grow
    state.commit(0, 512.0)  # some rank had to halve
    assert state.scales[0] == 512.0 and state.good_steps[0] == 0 and state.halvings == 1
    assert state.scale == 512.0


def test_nonfinite_gradients_travel_as_nan_and_keep_the_scale():
    state = FP8CommState(init_scale=256.0)
    grad = torch.tensor([1.0, float("inf"), float("nan"), -1e9])
    assert state.propose(0, grad) == 256.0
    q = quantize_e4m3(grad, 256.0).float()
    assert q[0] == 256.0 and q[1].isnan() and q[2].isnan() and q[3] == -E4M3_MAX


def test_bad_init_scale():
    with pytest.raises(ValueError, match="power of two"):
        FP8CommState(init_scale=3.0)


@pytest.mark.slow
def test_two_rank_ddp_training_matches_fp32_allreduce(tmp_path):
    out = tmp_path / "result.json"
    root = Path(__file__).resolve().parents[1]
    proc = run_multiprocess(
        [sys.executable, str(root / "tests" / "dist_fp8_comm_worker.py"), str(out)],
        out,
        timeout=300,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(out.read_text())
    fp32, fp8 = result["fp32"], result["fp8"]
    assert abs(fp8["eval_loss"] - fp32["eval_loss"]) / fp32["eval_loss"] < 0.02
    assert fp8["bytes_sent"] <= 0.27 * fp8["bytes_fp32"]
    assert fp8["rank_param_diff"] == 0.0  # every rank applied the same averaged gradient


def test_every_collective_gets_tensors_on_the_buckets_device(monkeypatch):
    """NCCL (accelerate's default on GPUs) refuses CPU tensors: the scale vote must travel on the
    bucket's device. A bucket on the meta device stands in for a GPU bucket on a CPU-only machine;
    the fake collective records the devices it is handed and stops the hook (meta holds no values)."""
    import torch.distributed as dist

    from perl_plugins.plugins.fp8.comm import fp8_allreduce_hook

    buffer = torch.zeros(6, device="meta")

    class Bucket:
        def buffer(self):
            return buffer

        def gradients(self):
            return [buffer[:4], buffer[4:]]

        def parameters(self):
            return [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2))]

    class Handed(Exception):
        pass

    def collective(tensors, *args, **kwargs):
        raise Handed({t.device for t in (tensors if isinstance(tensors, list) else [tensors])})

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", collective)
    monkeypatch.setattr(dist, "all_gather", collective)
    state = FP8CommState()
    monkeypatch.setattr(state, "propose", lambda key, grad: 256.0)
    with pytest.raises(Handed) as handed:
        fp8_allreduce_hook(state, Bucket())
    assert handed.value.args[0] == {buffer.device}
