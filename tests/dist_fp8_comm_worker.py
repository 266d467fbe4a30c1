"""Two-rank gloo training run for tests/test_fp8_comm.py: DDP with and without the FP8 hook.

Usage: python tests/dist_fp8_comm_worker.py OUT.json [--world 2] [--steps 150]
Writes, from rank 0: final eval loss of both runs, the hook's byte counters, and the largest
parameter difference between ranks (must be 0: every rank applies the same averaged gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from perl_plugins.plugins.fp8.comm import FP8CommState, register_fp8_comm_hook


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 1)
    )


def _data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=gen)
    teacher = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(32, 16, generator=teacher), torch.randn(16, 1, generator=teacher)
    y = torch.tanh(x @ w1 / 4) @ w2 / 4 + 0.05 * torch.randn(n, 1, generator=gen)
    return x, y


def _train(rank: int, steps: int, hook: bool) -> dict:
    ddp = DDP(_model())
    state = register_fp8_comm_hook(ddp, FP8CommState()) if hook else None
    opt = torch.optim.Adam(ddp.parameters(), lr=3e-3)
    x, y = _data(seed=100 + rank, n=steps * 32)
    for i in range(steps):
        xb, yb = x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]
        loss = torch.nn.functional.mse_loss(ddp(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_eval, y_eval = _data(seed=7, n=2048)
    with torch.no_grad():
        eval_loss = torch.nn.functional.mse_loss(ddp(x_eval), y_eval).item()
    flat = torch.cat([p.detach().flatten() for p in ddp.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    out = {"eval_loss": eval_loss, "rank_param_diff": max((g - flat).abs().max().item() for g in gathered)}
    if state is not None:
        out |= {"bytes_sent": state.bytes_sent, "bytes_fp32": state.bytes_fp32_equivalent, "halvings": state.halvings}
    return out


def _worker(rank: int, world: int, port: int, steps: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {"fp32": _train(rank, steps, hook=False), "fp8": _train(rank, steps, hook=True)}
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.world, port, args.steps, args.out), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
