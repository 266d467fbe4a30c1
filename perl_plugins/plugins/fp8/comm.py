"""FP8 gradient communication for DDP (FP8-LM level O1, arXiv 2310.18313).

Each gradient tensor in a DDP bucket is multiplied by its scale ``mu``, cast to float8_e4m3fn and
exchanged; the receivers sum in fp32, divide by ``mu`` and by the world size. Scales are powers of
two, per parameter, and identical on all ranks: every rank proposes one and the minimum wins (a
tiny all_reduce MIN). A proposal is the current ``mu``, halved as often as needed so that at most
``overflow_fraction`` of the values (FP8-LM: 0.001%) saturate at the E4M3 maximum — in the same
step, so nothing clipped beyond that is ever sent. After ``growth_interval`` steps without a
halving ``mu`` doubles, to keep small gradients out of E4M3's subnormal range.

gloo cannot all-reduce float8 tensors, so the payload travels as uint8 through ``all_gather`` and
every rank sums all payloads in fp32 (which also means the sum cannot overflow fp8). Note that an
all-gather moves ``world_size - 1`` payloads into each rank, while a ring all-reduce moves about
two: the 4x saving over fp32 holds on the wire for small world sizes only; ``bytes_sent`` counts
what each rank contributes (its fp8 payload and its scales), against ``bytes_fp32_equivalent``,
the fp32 gradient it replaces. Non-finite gradients are sent as NaN (E4M3 has no inf), so
downstream checks still see them; they never shrink ``mu``.
"""

import math
from collections.abc import Hashable, Mapping
from itertools import accumulate
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from perl_plugins.plugins.fp8.codec import E4M3, E4M3_MAX, quantize_e4m3

__all__ = ["FP8CommState", "fp8_allreduce_hook", "register_fp8_comm_hook"]


class FP8CommState:
    """Scales and byte counters for :func:`fp8_allreduce_hook`.

    Args:
        process_group: group to communicate in; default: the world group.
        init_scale: first ``mu`` of every parameter (a power of two; halved at once if too large).
        growth_interval: steps without a halving before a parameter's ``mu`` doubles.
        overflow_fraction: largest fraction of a tensor's values allowed to saturate.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        init_scale: float = 2.0**16,
        growth_interval: int = 200,
        overflow_fraction: float = 1e-5,
    ) -> None:
        if init_scale <= 0 or math.log2(init_scale) != round(math.log2(init_scale)):
            raise ValueError(f"init_scale must be a positive power of two, got {init_scale}")
        self.process_group = process_group
        self.init_scale = init_scale
        self.growth_interval = growth_interval
        self.overflow_fraction = overflow_fraction
        self.scales: dict[int, float] = {}  # id(parameter) -> mu
        self.good_steps: dict[int, int] = {}  # id(parameter) -> steps since the last halving
        self.halvings = 0
        self.bytes_sent = 0
        self.bytes_fp32_equivalent = 0

    @property
    def scale(self) -> float:
        """The smallest mu in use (``init_scale`` before the first step), for logs."""
        return min(self.scales.values(), default=self.init_scale)

    def propose(self, key: int, grad: Tensor) -> float:
        """This rank's scale for ``grad``: the current mu, halved until few enough values saturate."""
        mu = self.scales.get(key, self.init_scale)
        allowed = int(self.overflow_fraction * grad.numel())
        if grad.numel() <= allowed:
            return mu
        # (allowed+1)-th largest magnitude: below fmax / mu, at most `allowed` values saturate.
        top = float(grad.detach().abs().flatten().float().topk(allowed + 1).values[-1])
        if math.isfinite(top) and top * mu > E4M3_MAX:
            mu *= 2.0 ** -(math.floor(math.log2(top * mu / E4M3_MAX)) + 1)
        return mu

    def commit(self, key: int, agreed: float) -> None:
        """Record the scale all ranks agreed on; grow it after ``growth_interval`` quiet steps."""
        if agreed < self.scales.get(key, self.init_scale):
            self.halvings += 1
            self.good_steps[key] = 0
        else:
            self.good_steps[key] = self.good_steps.get(key, 0) + 1
        if self.good_steps[key] >= self.growth_interval:
            agreed *= 2.0
            self.good_steps[key] = 0
        self.scales[key] = agreed

    def state_dict(self, keys: Mapping[int, Hashable]) -> dict[str, Any]:
        """Scales, step counts and counters, each parameter's ``id`` replaced by ``keys[id]``: a key
        that names the same parameter in a resumed run (ids do not survive a restart)."""
        return {
            "scales": {keys[k]: mu for k, mu in self.scales.items()},
            "good_steps": {keys[k]: n for k, n in self.good_steps.items()},
            "halvings": self.halvings,
            "bytes_sent": self.bytes_sent,
            "bytes_fp32_equivalent": self.bytes_fp32_equivalent,
        }

    def load_state_dict(self, state: Mapping[str, Any], ids: Mapping[Hashable, int]) -> None:
        """Restore :meth:`state_dict`'s output; ``ids`` maps its keys to this run's parameter ids."""
        unknown = set(state["scales"]) - set(ids)
        if unknown:
            raise ValueError(f"fp8_comm state names parameters this run does not have: {sorted(unknown)[:5]}")
        self.scales = {ids[k]: float(mu) for k, mu in state["scales"].items()}
        self.good_steps = {ids[k]: int(n) for k, n in state["good_steps"].items()}
        self.halvings = int(state["halvings"])
        self.bytes_sent = int(state["bytes_sent"])
        self.bytes_fp32_equivalent = int(state["bytes_fp32_equivalent"])


def fp8_allreduce_hook(state: FP8CommState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: average the bucket's gradients, exchanging them in FP8."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    grads = bucket.gradients()
    keys = [id(p) for p in bucket.parameters()]
    sizes = [g.numel() for g in grads]
    starts = accumulate([0, *sizes[:-1]])
    if sum(sizes) != buffer.numel() or any(g.data_ptr() != buffer[i:].data_ptr() for g, i in zip(grads, starts)):
        raise RuntimeError("fp8_allreduce_hook: the bucket's gradients are not consecutive views of its buffer")

    # On the bucket's device: NCCL (accelerate's default on GPUs) cannot reduce a CPU tensor.
    proposals = [state.propose(k, g) for k, g in zip(keys, grads)]
    scales = torch.tensor(proposals, dtype=torch.float32, device=buffer.device)
    dist.all_reduce(scales, op=dist.ReduceOp.MIN, group=group)
    mus = scales.tolist()
    for k, mu in zip(keys, mus):
        state.commit(k, mu)

    payload = torch.cat([quantize_e4m3(g, mu).flatten() for g, mu in zip(grads, mus)]).view(torch.uint8)
    state.bytes_sent += payload.numel() + 4 * len(mus)
    state.bytes_fp32_equivalent += 4 * buffer.numel()
    gathered = [torch.empty_like(payload) for _ in range(world)]
    work = dist.all_gather(gathered, payload, group=group, async_op=True)

    def average(_: torch.futures.Future) -> Tensor:
        total = torch.stack(gathered).view(E4M3).float().sum(dim=0)
        for piece, mu in zip(total.split(sizes), mus):
            piece.div_(mu * world)
        buffer.copy_(total)
        return buffer

    return work.get_future().then(average)


def register_fp8_comm_hook(
    ddp_model: torch.nn.parallel.DistributedDataParallel, state: FP8CommState | None = None
) -> FP8CommState:
    """Register :func:`fp8_allreduce_hook` on ``ddp_model``; returns the state (to read its counters)."""
    state = state if state is not None else FP8CommState()
    ddp_model.register_comm_hook(state, fp8_allreduce_hook)
    return state
