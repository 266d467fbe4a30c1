"""FP8AdamW: AdamW with FP8/FP16 optimizer states (FP8-LM, arXiv 2310.18313; MS-AMP level O2).

State layout per parameter with at least ``min_numel`` values (smaller ones keep fp32 states):

* ``exp_avg``: float8_e4m3fn, one fp32 scale per tensor (``exp_avg_scale``).
* ``exp_avg_sq``, ``second_moment="fp16"`` (default, ~3 bytes/param in total): float16, one
  fp32 scale per tensor (``exp_avg_sq_scale``).
* ``exp_avg_sq``, ``second_moment="fp8"`` (the "2-byte mode", ~2.02 bytes/param): float8_e4m3fn
  holding ``sqrt(v)`` with one fp32 scale per block of 256 values (the torchao layout). The
  square root halves the dynamic range in log space: squares of small gradients would otherwise
  fall below E4M3's range, which is why an fp8 ``v`` diverged in the FP8-LM ablation.
* ``master`` / ``master_scale`` (only with ``master_weights=True`` and a half-precision
  parameter): float16 master weights with a per-tensor scale.

Under DeepSpeed ZeRO the optimizer steps one flat partition holding pieces of many tensors; one
scale for all of them would flush a small tensor's moments next to a large one's (values below
~amax * 4e-6 of the partition). :meth:`FP8AdamW.set_segments` gives such a flat parameter the
boundaries of its pieces: each piece then keeps its own scales, as it would as a parameter of its
own (in the 2-byte mode ``exp_avg`` gets one scale per 256-value block, like ``sqrt(v)``: finer
than per piece, and independent of where pieces start). Every piece is compressed, small ones too
(``min_numel`` applies to the flat parameter).

Stored values are *scaled*: ``stored = value * scale`` and ``value = stored / scale``. Scales are
powers of two, ``2**floor(log2(fmax / amax))`` (fmax 448 for E4M3, 65504 for fp16), so scaling
itself is exact. A zero (or non-finite) amax keeps the previous scale. A positive second moment
never quantizes to zero (it is clamped to the smallest positive code): a zero ``v`` under a
non-zero ``m`` would turn ``m / (sqrt(v) + eps)`` into a huge step.

The default layout (per-tensor or per-piece scales, no master weights) steps in one pass,
:func:`_one_pass`: delayed scaling, as in Transformer Engine, but bounded so that nothing
saturates. The scale of step t comes from the amax the pass of step t-1 recorded and this step's
gradient amax (the only value read before the loop that writes): ``|m_t| <= b1 * amax|m_{t-1}| +
(1 - b1) * amax|g_t|``, and for ``v`` a running envelope ``b2 * env + (1 - b2) * amax(g_t)**2``.
A non-finite bound (NaN/inf gradient, square overflowing fp32) writes every value back unchanged.
The first step starts from zero amaxes, where the bound is exact (``m_1 = (1 - b1) g``). The bound
is never below the new amax, so no value saturates; what it costs is that it can be above it (m's
and the gradient's largest values in different places or of opposite signs): the scale is then up
to that factor lower than a fresh one, stored values sit lower in E4M3's range, and the flush
threshold (E4M3's smallest subnormal, 2**-9 / scale) rises by the same factor. The relative
rounding of the other values (2**-4 for E4M3, 2**-11 for fp16) does not change.
The 2-byte mode's blocks and master weights keep two passes with fresh scales:
:func:`_amax_pass` reads the gradient and states and returns the amaxes of the new values;
:func:`_apply_pass` then recomputes the moments, updates the weights and requantizes. Each pass is
one function that runs eagerly or under ``torch.compile`` (the same fp32 arithmetic either way;
compiled is much faster on CPU, where eager fp8 casts are not vectorized).

On CPU (``kernel="cpp"``, the default there) the single pass is a C++ kernel (``adamw_cpu.cpp``,
built on the first step, see :mod:`cpu_kernel`): one call per parameter group reads every gradient
for its amax, then updates all tensors of the group in one vectorized, multi-threaded loop, with
the same fp32 operations in the same order as the eager pass (bit-identical results). Inductor's
loop for the same arithmetic runs 1.4-1.9x slower than ATen's fused AdamW; this one runs at
memory speed. The 2-byte mode and master weights keep the compiled two passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor

import perl_plugins
from perl_plugins.plugins.fp8 import cpu_kernel
from perl_plugins.plugins.fp8.codec import (
    E4M3,
    E4M3_MAX,
    E4M3_TINY,
    FP16_MAX,
    FP16_TINY,
    pow2_scale,
    saturate,
)

__all__ = ["FP8AdamW", "describe"]

BLOCK = 256  # values per scale in the 2-byte mode (torchao / bitsandbytes layout)
_HALF = (torch.float16, torch.bfloat16)


def _deferred(dst: Tensor) -> bool:
    """Whether ``dst``'s new value is returned for an eager ``copy_`` instead of written in the kernel.

    Inductor's CPU kernels load and store 16-bit values with masked half-vector instructions; doing
    both on the same buffer stalls (a 2x slower loop, measured on AMD EPYC); a plain copy is cheap.
    """
    return dst.device.type == "cpu" and dst.element_size() == 2


def _write(dst: Tensor, new: Tensor, deferred: list[Tensor]) -> None:
    """dst = new, cast to dst's dtype in the kernel, or deferred (see _deferred)."""
    if _deferred(dst):
        deferred.append(new.to(dst.dtype))
    else:
        dst.copy_(new)


def _scale_kind(state: dict[str, Any], scale_key: str) -> str:
    """How ``state[scale_key]`` applies: ``tensor`` (one scale), ``blocks`` (per BLOCK values: the
    2-byte mode's sqrt(v), and its m in a ZeRO partition) or ``pieces`` (per set_segments piece)."""
    scale = state[scale_key]
    if scale.dim() == 0:
        return "tensor"
    return "blocks" if state["exp_avg_sq"].dtype == E4M3 and scale_key != "master_scale" else "pieces"


def _per_value(scale: Tensor, state: dict[str, Any], kind: str) -> Tensor:
    """A scale tensor broadcast to one scale per stored value (flat), or kept 0-d."""
    if kind == "tensor":
        return scale
    if kind == "blocks":
        return scale.repeat_interleave(BLOCK)
    cuts = state["segment_bounds"]
    return scale.repeat_interleave(cuts[1:] - cuts[:-1])


def _dequantize(state: dict[str, Any], key: str) -> Tensor:
    """``state[key]`` in fp32, flat (``exp_avg_sq`` squared back where it stores sqrt(v))."""
    stored = state[key].float()
    if f"{key}_scale" not in state:
        return stored
    kind = _scale_kind(state, f"{key}_scale")
    value = stored * (1 / _per_value(state[f"{key}_scale"], state, kind))
    return value * value if key == "exp_avg_sq" and kind == "blocks" else value


def _quantize_into(
    state: dict[str, Any], key: str, scale_key: str, x: Tensor, fmax: float, positive: bool = False
) -> None:
    """Store flat fp32 ``x`` in ``state[key]`` with fresh power-of-two scales of its layout."""
    kind = _scale_kind(state, scale_key)
    tiny = (FP16_TINY if fmax == FP16_MAX else E4M3_TINY) if positive else 0.0
    if key == "exp_avg_sq" and kind == "blocks":
        x = x.sqrt()
    old = state[scale_key]
    if kind == "tensor":
        amax = x.abs().amax()
    elif kind == "blocks":
        amax = x.abs().view(-1, BLOCK).amax(dim=1)
    else:
        cuts = state["segment_bounds"].tolist()
        amax = torch.stack([x[a:b].abs().amax() if b > a else x.new_zeros(()) for a, b in zip(cuts[:-1], cuts[1:])])
    scale = pow2_scale(amax, fmax, old)
    state[key].copy_(saturate(x, _per_value(scale, state, kind), fmax, tiny))
    old.copy_(scale)
    if f"{key}_amax" in state:  # bounds the stored values before rounding, as the single pass records it
        state[f"{key}_amax"].copy_(amax)


def _piece(args: tuple, index: int, start: int, numel: int) -> tuple:
    """The pass arguments for one piece of a flat parameter: narrowed values, that piece's scales."""
    p, g, m, m_scale, v, v_scale, w, w_scale, hp = args

    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.narrow(0, start, numel)

    def own(scale: Tensor | None) -> Tensor | None:
        return None if scale is None else scale[index]  # a 0-d view: the pass writes the piece's new scale

    return (cut(p), cut(g), cut(m), own(m_scale), cut(v), own(v_scale), cut(w), own(w_scale), hp)


def _dequantized(m: Tensor, m_scale: Tensor | None, v: Tensor, v_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """The stored moments in fp32 (``v`` as (blocks, BLOCK) in the 2-byte mode)."""
    if m_scale is None:
        return m.float(), v.float()
    m32 = m.float() * (1 / m_scale if m_scale.dim() == 0 else (1 / m_scale)[:, None])
    if v_scale.dim() == 0:
        return m32, v.float() * (1 / v_scale)
    r = v.float() * (1 / v_scale)[:, None]
    return m32, r * r


def _moments(
    g: Tensor, m: Tensor, m_scale: Tensor | None, v: Tensor, v_scale: Tensor | None, hp: Tensor
) -> tuple[Tensor, Tensor]:
    """The new fp32 moments from the stored ones (dequantized) and the gradient."""
    b1, one_minus_b1, b2, one_minus_b2 = hp[2:6].unbind()
    g32 = g.float()
    m32, v32 = _dequantized(m, m_scale, v, v_scale)
    return b1 * m32 + one_minus_b1 * g32, b2 * v32 + one_minus_b2 * (g32 * g32)


def _master(p: Tensor, w: Tensor | None, w_scale: Tensor | None) -> Tensor:
    if w is None:
        return p.float()
    return w if w_scale is None else w.float() * (1 / w_scale)


def _new_weights(
    p: Tensor, w: Tensor | None, w_scale: Tensor | None, m_new: Tensor, v_new: Tensor, hp: Tensor
) -> Tensor:
    lr, decay = hp[0], hp[1]
    inv_bc1, inv_bc2, eps = hp[6:].unbind()
    return _master(p, w, w_scale) * decay - lr * (m_new * inv_bc1) / (torch.sqrt(v_new * inv_bc2) + eps)


def _amax_pass(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    m_scale: Tensor | None,
    v: Tensor,
    v_scale: Tensor | None,
    w: Tensor | None,
    w_scale: Tensor | None,
    hp: Tensor,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Pass 1 (reads only): amax of the new m, of the new v (per block: of sqrt(v)) and, with
    master weights, of the new weights; and whether all of them are finite."""
    m_new, v_new = _moments(g, m, m_scale, v, v_scale, hp)
    if v_scale is not None and v_scale.dim() == 1:  # per-block reductions for both: one loop
        m_amax, v_amax = m_new.abs().amax(dim=1), v_new.amax(dim=1).sqrt()
        if m_scale.dim() == 0:
            m_amax = m_amax.amax()
    else:
        m_amax, v_amax = m_new.abs().amax(), v_new.amax()
    ok = torch.isfinite(m_amax).all() & torch.isfinite(v_amax).all()
    w_amax = None
    if w is not None:
        w_amax = _new_weights(p, w, w_scale, m_new, v_new, hp).abs().amax()
        ok = ok & torch.isfinite(w_amax)
    return m_amax, v_amax, w_amax, ok


def _apply_pass(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    m_scale: Tensor | None,
    v: Tensor,
    v_scale: Tensor | None,
    w: Tensor | None,
    w_scale: Tensor | None,
    hp: Tensor,
    m_amax: Tensor,
    v_amax: Tensor,
    w_amax: Tensor | None,
) -> list[Tensor]:
    """Pass 2 (one elementwise loop): recompute the moments, update the weights, requantize.

    Returns the new values of the 16-bit tensors among (v, w, p), in that order (see _deferred).
    """
    m_new, v_new = _moments(g, m, m_scale, v, v_scale, hp)
    w_new = _new_weights(p, w, w_scale, m_new, v_new, hp)
    deferred: list[Tensor] = []
    if m_scale is None:
        _write(m, m_new, deferred)
        _write(v, v_new, deferred)
    else:
        new_m_scale = pow2_scale(m_amax, E4M3_MAX, m_scale)
        _write(m, saturate(m_new, new_m_scale if m_scale.dim() == 0 else new_m_scale[:, None], E4M3_MAX), deferred)
        m_scale.copy_(new_m_scale)
        if v_scale.dim() == 0:
            new_v_scale = pow2_scale(v_amax, FP16_MAX, v_scale)
            _write(v, saturate(v_new, new_v_scale, FP16_MAX, FP16_TINY), deferred)
        else:
            new_v_scale = pow2_scale(v_amax, E4M3_MAX, v_scale)
            _write(v, saturate(torch.sqrt(v_new), new_v_scale[:, None], E4M3_MAX, E4M3_TINY), deferred)
        v_scale.copy_(new_v_scale)
    if w is not None and w_scale is None:
        _write(w, w_new, deferred)
    elif w is not None:
        new_w_scale = pow2_scale(w_amax, FP16_MAX, w_scale)
        _write(w, saturate(w_new, new_w_scale, FP16_MAX), deferred)
        w_scale.copy_(new_w_scale)
    _write(p, w_new, deferred)
    return deferred


# Relative rounding bound of a stored value (half an ulp): 3 mantissa bits for E4M3, 10 for fp16.
E4M3_ROUND = 1 + 2.0**-4
FP16_ROUND = 1 + 2.0**-11


def _one_pass(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    m_scale: Tensor | None,
    m_amax: Tensor | None,
    v: Tensor,
    v_scale: Tensor | None,
    v_amax: Tensor | None,
    hp: Tensor,
) -> list[Tensor]:
    """The whole update of per-tensor (or per-piece) scaled states in one read of p, m, v.

    Delayed scaling with a bound: the new scales come from ``bound_m = b1 * amax(m_prev) *
    E4M3_ROUND + (1 - b1) * amax|g|`` (``bound_v`` likewise with g**2), where ``amax(m_prev)`` is
    the amax of the stored values recorded by the previous step's pass. ``|m_new| <= bound_m``,
    so nothing saturates, and only the gradient is read before the loop that writes. A
    non-finite bound (NaN/inf gradient, or a square overflowing fp32) writes every value back
    unchanged. fp32 states (``m_scale`` None) check the new moments instead (small tensors).
    Returns whether the update was applied, then the new values of the 16-bit states to copy (see
    _deferred).
    """
    lr, decay, b1, c1, b2, c2, inv_bc1, inv_bc2, eps = hp.unbind()
    g32 = g.float()
    if m_scale is None:
        m_new, v_new = b1 * m + c1 * g32, b2 * v + c2 * (g32 * g32)
        ok = torch.isfinite(m_new.abs().amax()) & torch.isfinite(v_new.amax())
    else:
        g_amax = g32.abs().amax()
        bound_m = b1 * m_amax * E4M3_ROUND + c1 * g_amax
        bound_v = b2 * v_amax + c2 * (g_amax * g_amax)
        ok = torch.isfinite(bound_m) & torch.isfinite(bound_v)
        new_m_scale = pow2_scale(bound_m, E4M3_MAX, m_scale)
        new_v_scale = pow2_scale(bound_v, FP16_MAX, v_scale)
        m_new = b1 * (m.float() * (1 / m_scale)) + c1 * g32
        v_new = b2 * (v.float() * (1 / v_scale)) + c2 * (g32 * g32)
    p_new = p.float() * decay - lr * (m_new * inv_bc1) / (torch.sqrt(v_new * inv_bc2) + eps)
    deferred = [ok]
    _write(p, torch.where(ok, p_new, p.float()), deferred)
    if m_scale is None:
        m.copy_(torch.where(ok, m_new, m))
        v.copy_(torch.where(ok, v_new, v))
        return deferred
    m_stored = saturate(m_new, new_m_scale, E4M3_MAX)
    v_stored = saturate(v_new, new_v_scale, FP16_MAX, FP16_TINY)
    m.copy_(torch.where(ok, m_stored, m.float()))
    _write(v, torch.where(ok, v_stored, v.float()), deferred)
    # Recorded from the scaled values, so these reductions run in the writing loop.
    m_amax.copy_(torch.where(ok, m_stored.abs().amax() / new_m_scale, m_amax))
    v_amax.copy_(torch.where(ok, bound_v, v_amax))
    m_scale.copy_(torch.where(ok, new_m_scale, m_scale))
    v_scale.copy_(torch.where(ok, new_v_scale, v_scale))
    return deferred


_Passes = tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]
_compiled_passes: _Passes | None = None


def _compiled() -> _Passes:
    # Shared by all optimizers; dynamic shapes avoid one compile per parameter shape.
    global _compiled_passes
    if _compiled_passes is None:
        _compiled_passes = tuple(
            torch.compile(f, fullgraph=True, dynamic=True) for f in (_amax_pass, _apply_pass, _one_pass)
        )
    return _compiled_passes


class FP8AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with compact optimizer states; see the module docstring.

    Args:
        second_moment: "fp16" (per-tensor scale) or "fp8" (sqrt(v) in E4M3, per-256-block scales).
        min_numel: tensors with fewer values keep fp32 states (and fp32 master weights, if any).
        master_weights: keep scaled fp16 master weights for bf16/fp16 parameters, so that
            full fine-tuning of a half-precision model does not lose small updates to bf16
            rounding. fp32 parameters are their own master copy.
        nonfinite: "skip" leaves a parameter whose update is non-finite (NaN/inf gradient, or a
            square overflowing fp32) untouched, weights and states, without advancing its step,
            and counts it in ``nonfinite_skips``; "raise" raises FloatingPointError instead.
        kernel: "cpp" (CPU parameters only: the C++ single pass, see the module docstring),
            "compile" (the passes under ``torch.compile``) or "eager" (the same passes in plain
            torch ops); default: "cpp" for CPU parameters, else "compile" where inductor has a
            compiler for the devices, else "eager". A kernel that fails to build raises and
            names the other choices: nothing falls back silently.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        second_moment: Literal["fp16", "fp8"] = "fp16",
        min_numel: int = 4096,
        master_weights: bool = False,
        nonfinite: Literal["skip", "raise"] = "skip",
        kernel: Literal["cpp", "compile", "eager"] | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps, weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if second_moment not in ("fp16", "fp8"):
            raise ValueError(f"second_moment must be 'fp16' or 'fp8', got {second_moment!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.second_moment = second_moment
        self.min_numel = min_numel
        self.master_weights = master_weights
        self.nonfinite = nonfinite
        devices = {p.device for p in self._params()}
        if kernel is None:
            if all(d.type == "cpu" for d in devices):
                kernel = "cpp"
            else:
                kernel = "compile" if all(perl_plugins.compile_available(d) for d in devices) else "eager"
        if kernel not in ("cpp", "compile", "eager"):
            raise ValueError(f"kernel must be 'cpp', 'compile' or 'eager', got {kernel!r}")
        if kernel == "cpp" and any(d.type != "cpu" for d in devices):
            raise ValueError(
                f"kernel='cpp' steps CPU parameters only, got parameters on {sorted(map(str, devices))}; "
                "use kernel='compile' or 'eager'"
            )
        self.kernel = kernel
        self.nonfinite_skips = 0
        self._segments: dict[Tensor, list[int]] = {}  # flat parameter -> piece boundaries (see set_segments)

    def _params(self) -> Iterable[Tensor]:
        return chain.from_iterable(g["params"] for g in self.param_groups)

    def set_segments(self, p: Tensor, bounds: Iterable[tuple[int, int]]) -> None:
        """Give the flat parameter ``p`` (a ZeRO partition) the ``(start, numel)`` of the pieces it
        holds: each piece keeps its own scales. Values outside every piece (alignment padding)
        form pieces of their own. A state ``p`` already has is re-laid out, losing only rounding."""
        n = p.numel()
        cuts = {0, n}
        for start, numel in bounds:
            if start < 0 or numel < 0 or start + numel > n:
                raise ValueError(f"set_segments: piece ({start}, {numel}) lies outside the {n} values of the parameter")
            cuts |= {start, start + numel}
        cuts = sorted(cuts)
        state = self.state.get(p, {})
        laid_out = "segment_bounds" in state and state["segment_bounds"].tolist() == cuts  # e.g. a resumed state
        values = {} if laid_out else self.dequantized_state(p)
        self._segments[p] = cuts
        if values:
            self.load_dequantized_state(p, values)

    def _segment_count(self, p: Tensor) -> int | None:
        cuts = self._segments.get(p)
        return len(cuts) - 1 if cuts is not None else None

    def _layout(self, p: Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """State tensors (shape, dtype) for ``p``: single source for allocation and summary()."""
        n = p.numel()
        master = self.master_weights and p.dtype in _HALF
        if n < self.min_numel:
            layout = {"exp_avg": ((n,), torch.float32), "exp_avg_sq": ((n,), torch.float32)}
            return layout | {"master": ((n,), torch.float32)} if master else layout
        pieces = self._segment_count(p)
        per_piece = () if pieces is None else (pieces,)
        blocks = self.second_moment == "fp8" and n % BLOCK == 0
        if not blocks:
            layout = {"exp_avg": ((n,), E4M3), "exp_avg_scale": (per_piece, torch.float32)}
            layout |= {"exp_avg_sq": ((n,), torch.float16), "exp_avg_sq_scale": (per_piece, torch.float32)}
            if not master:  # the single pass's delayed scaling: amaxes recorded by the previous step
                layout |= {"exp_avg_amax": (per_piece, torch.float32), "exp_avg_sq_amax": (per_piece, torch.float32)}
        else:
            m_scale = () if pieces is None else (n // BLOCK,)  # pieces: m gets block scales, as sqrt(v)
            layout = {"exp_avg": ((n,), E4M3), "exp_avg_scale": (m_scale, torch.float32)}
            layout |= {"exp_avg_sq": ((n,), E4M3), "exp_avg_sq_scale": ((n // BLOCK,), torch.float32)}
        if master:
            # Block-scaled parameters step in one call: one master scale (ZeRO's fp32 partitions have no master).
            layout |= {"master": ((n,), torch.float16), "master_scale": (() if blocks else per_piece, torch.float32)}
        if pieces is not None:
            layout["segment_bounds"] = ((pieces + 1,), torch.int64)
        return layout

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        state: dict[str, Any] = {"step": 0}
        for key, (shape, dtype) in self._layout(p).items():
            state[key] = (torch.ones if key.endswith("scale") else torch.zeros)(shape, dtype=dtype, device=p.device)
        if "segment_bounds" in state:
            state["segment_bounds"].copy_(torch.tensor(self._segments[p]))
        w = p.detach().float().flatten()
        if "master_scale" in state:
            _quantize_into(state, "master", "master_scale", w, FP16_MAX)
        elif "master" in state:
            state["master"].copy_(w)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        passes: _Passes | None = None  # built on first need: the C++ kernel's steps never import dynamo
        index = -1
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr = float(group["lr"])
            hps: dict[int, tuple[float, ...]] = {}  # per step count: the hyper-parameters of all its tensors
            batch: list[tuple[int, Tensor, dict[str, Any], tuple[float, ...]]] = []  # for the C++ kernel
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FP8AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                t = state["step"] + 1
                if t not in hps:
                    decay = 1 - lr * group["weight_decay"]
                    hps[t] = (lr, decay, b1, 1 - b1, b2, 1 - b2, 1 / (1 - b1**t), 1 / (1 - b2**t), group["eps"])
                if self.kernel == "cpp" and _single_pass_layout(state):
                    batch.append((index, p, state, hps[t]))
                    continue
                hp = torch.tensor(hps[t], dtype=torch.float32, device=p.device)
                if passes is None:
                    passes = _compiled() if self.kernel != "eager" else (_amax_pass, _apply_pass, _one_pass)
                self._record(self._update(passes, p, state, hp), index, p, state)
            if batch:
                for ok, (i, p, state, _) in zip(self._cpu_step(batch), batch, strict=True):
                    self._record(ok, i, p, state)
        return loss

    def _record(self, ok: bool, index: int, p: Tensor, state: dict[str, Any]) -> None:
        """Advance p's step count, or count (or raise on) a skipped non-finite update."""
        if ok:
            state["step"] += 1
        elif self.nonfinite == "raise":
            raise FloatingPointError(
                f"FP8AdamW: non-finite update for parameter {index} of shape {tuple(p.shape)} "
                "(NaN/inf gradient); weights and states were left unchanged"
            )
        else:
            self.nonfinite_skips += 1

    def _cpu_step(self, batch: list[tuple[int, Tensor, dict[str, Any], tuple[float, ...]]]) -> list[bool]:
        """One call of the C++ kernel for the batch's parameters (fp32 work copies of others)."""
        try:
            cpu_kernel.load()
        except cpu_kernel.KernelBuildError as e:
            raise RuntimeError(
                f"FP8AdamW: the C++ CPU kernel could not be built ({e}); pass kernel='compile' "
                "(torch.compile) or kernel='eager' to step without it"
            ) from e

        def fp32(t: Tensor) -> Tensor:  # the kernel reads flat contiguous fp32 values
            return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()

        keys = ("exp_avg_scale", "exp_avg_amax", "exp_avg_sq_scale", "exp_avg_sq_amax")
        works = [fp32(p) for _, p, _, _ in batch]
        oks = cpu_kernel.step(
            works,
            [fp32(p.grad) for _, p, _, _ in batch],
            [s["exp_avg"] for _, _, s, _ in batch],
            [s["exp_avg_sq"] for _, _, s, _ in batch],
            [tuple(s[k] for k in keys) if "exp_avg_scale" in s else None for _, _, s, _ in batch],
            [s.get("segment_bounds") for _, _, s, _ in batch],
            [hp for *_, hp in batch],
        )
        for ok, work, (_, p, _, _) in zip(oks, works, batch):
            if ok and work is not p:
                p.copy_(work)
        return oks

    def _update(self, passes: _Passes, p: Tensor, state: dict[str, Any], hp: Tensor) -> bool:
        """Both passes on flat views ((blocks, BLOCK) views in the 2-byte mode), or the single pass
        (per-tensor or per-piece scales, no master weights).

        Returns False, having written nothing, when the update is not finite."""
        v_scale = state.get("exp_avg_sq_scale")
        blocks = v_scale is not None and v_scale.dim() == 1 and state["exp_avg_sq"].dtype == E4M3
        if not blocks and "master" not in state:
            return self._single_pass(passes[2], p, state, hp)
        shape = (-1, BLOCK) if blocks else (-1,)
        work = p if p.is_contiguous() else p.contiguous()
        m, v, w = (state[k].view(shape) if k in state else None for k in ("exp_avg", "exp_avg_sq", "master"))
        pw = work.view(shape)
        args = (pw, p.grad.reshape(shape), m, state.get("exp_avg_scale"), v, v_scale, w, state.get("master_scale"), hp)
        if "segment_bounds" in state and not blocks:  # one call per piece, each with its own scales
            cuts = state["segment_bounds"].tolist()
            pieces = [_piece(args, i, a, b - a) for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
        else:
            pieces = [args]
        try:
            results = [passes[0](*piece) for piece in pieces]
            if not all(bool(ok) for *_, ok in results):
                return False
            deferred = []
            for piece, (*amaxes, _) in zip(pieces, results):
                p_piece, v_piece, w_piece = piece[0], piece[4], piece[6]  # _apply_pass returns (v, w, p) values
                targets = [t for t in (v_piece, w_piece, p_piece) if t is not None and _deferred(t)]
                deferred.extend(zip(targets, passes[1](*piece, *amaxes), strict=True))
        except Exception as e:
            if self.kernel == "eager":
                raise
            raise RuntimeError(  # compile errors surface at the first call with a new signature
                "FP8AdamW: torch.compile of the optimizer step failed; pass kernel='eager' to run "
                "the same arithmetic eagerly (slower on CPU)"
            ) from e
        for dst, value in deferred:
            dst.copy_(value)
        if work is not p:
            p.copy_(work)
        return True

    def _single_pass(self, one_pass: Callable[..., Any], p: Tensor, state: dict[str, Any], hp: Tensor) -> bool:
        work = p if p.is_contiguous() else p.contiguous()
        flat, g = work.view(-1), p.grad.reshape(-1)
        keys = ("exp_avg", "exp_avg_scale", "exp_avg_amax", "exp_avg_sq", "exp_avg_sq_scale", "exp_avg_sq_amax")
        m, m_scale, m_amax, v, v_scale, v_amax = (state.get(k) for k in keys)
        if "segment_bounds" in state:
            # All pieces or none: one read of the gradient decides before any piece is written.
            g_amax = g.abs().amax()
            if not torch.isfinite(g_amax * g_amax):
                return False
            cuts = state["segment_bounds"].tolist()
            calls = [
                (
                    *(t.narrow(0, a, b - a) for t in (flat, g, m)),
                    m_scale[i],
                    m_amax[i],
                    v.narrow(0, a, b - a),
                    v_scale[i],
                    v_amax[i],
                    hp,
                )
                for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))
                if b > a
            ]
        else:
            calls = [(flat, g, m, m_scale, m_amax, v, v_scale, v_amax, hp)]
        try:
            results = [one_pass(*args) for args in calls]
        except Exception as e:
            if self.kernel == "eager":
                raise
            raise RuntimeError(
                "FP8AdamW: torch.compile of the optimizer step failed; pass kernel='eager' to run "
                "the same arithmetic eagerly (slower on CPU)"
            ) from e
        if not all(bool(ok) for ok, *_ in results):  # only pieces of a finite gradient: all or none
            return False
        for (p_piece, _, _, _, _, v_piece, *_), (_, *values) in zip(calls, results):
            for dst, value in zip([t for t in (p_piece, v_piece) if _deferred(t)], values, strict=True):
                dst.copy_(value)
        if work is not p:
            p.copy_(work)
        return True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like torch's, but keeps the saved state dtypes: torch casts state tensors to the param dtype."""
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for pid, p in zip(saved_ids, self._params()):
            saved = state_dict["state"].get(pid)
            if saved is not None:
                self.state[p] = {
                    k: v.to(device=p.device, copy=True) if isinstance(v, Tensor) else v for k, v in saved.items()
                }

    def dequantized_state(self, p: Tensor) -> dict[str, Any]:
        """``p``'s state in full precision: ``step`` and flat fp32 ``exp_avg`` / ``exp_avg_sq`` (and
        ``master``), whatever their stored format; empty before p's first step. With
        :meth:`load_dequantized_state` it moves states between layouts (e.g. out of a ZeRO partition)."""
        state = self.state.get(p)
        if not state:
            return {}
        out = {"step": state["step"]}
        for key in ("exp_avg", "exp_avg_sq", "master"):
            if key in state:
                out[key] = _dequantize(state, key)
        return out

    def load_dequantized_state(self, p: Tensor, values: dict[str, Any]) -> None:
        """Set ``p``'s state from full-precision ``values`` (as :meth:`dequantized_state` returns them),
        quantized into p's own layout with fresh scales, as a step would store them."""
        state = self._init_state(p)
        state["step"] = int(values["step"])
        keys = ["exp_avg", "exp_avg_sq"] + (["master"] if "master" in values and "master" in state else [])
        for key in keys:
            x = values[key].float().flatten()
            if f"{key}_scale" not in state:
                state[key].copy_(x)
            else:
                fmax = FP16_MAX if state[key].dtype == torch.float16 else E4M3_MAX
                _quantize_into(state, key, f"{key}_scale", x, fmax, key == "exp_avg_sq")
        self.state[p] = state

    def summary(self) -> dict[str, Any]:
        """State formats and sizes for all parameters (as they are, or will be after the first step)."""
        formats: dict[str, int] = {}
        state_bytes = params = 0
        for p in self._params():
            layout = self._layout(p)
            fmt = "/".join(
                _format_name(layout[k][1], layout.get(f"{k}_scale"), layout["exp_avg_sq"][1] == E4M3 and k != "master")
                for k in ("exp_avg", "exp_avg_sq", "master")
                if k in layout
            )
            formats[fmt] = formats.get(fmt, 0) + 1
            state_bytes += sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())
            params += p.numel()
        return {
            "optimizer": "FP8AdamW",
            "tensors_by_format": formats,
            "params": params,
            "state_bytes": state_bytes,
            "bytes_per_param": state_bytes / max(params, 1),
            "fp32_adamw_state_bytes": 8 * params,
            "kernel": self.kernel,
        }


def _single_pass_layout(state: dict[str, Any]) -> bool:
    """Whether ``state`` steps in one pass: fp32 states, or fp8 m and fp16 v with per-tensor or
    per-piece scales, and no master weights."""
    return "master" not in state and state["exp_avg_sq"].dtype != E4M3


def _format_name(dtype: torch.dtype, scale: tuple[tuple[int, ...], torch.dtype] | None, blocks: bool) -> str:
    name = {E4M3: "fp8", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    if scale is not None and scale[0]:
        name += f"[block{BLOCK}]" if blocks else "[per piece]"
    return name


def describe(summary: dict[str, Any]) -> str:
    """One line for start-up logs, from :meth:`FP8AdamW.summary`."""
    formats = ", ".join(
        f"{n} tensors m/v{'/master' if f.count('/') == 2 else ''}={f}" for f, n in summary["tensors_by_format"].items()
    )
    return (
        f"{summary['optimizer']}: {summary['params'] / 1e6:.2f}M params, optimizer states "
        f"{summary['state_bytes'] / 2**20:.1f} MiB = {summary['bytes_per_param']:.2f} bytes/param "
        f"(fp32 AdamW: {summary['fp32_adamw_state_bytes'] / 2**20:.1f} MiB); {formats}; "
        f"step kernel: {summary['kernel']}"
    )
