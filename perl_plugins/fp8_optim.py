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

Stored values are *scaled*: ``stored = value * scale`` and ``value = stored / scale``. Scales are
powers of two, ``2**floor(log2(fmax / amax))`` (fmax 448 for E4M3, 65504 for fp16), recomputed
from the fresh amax at every step, so scaling itself is exact. A zero (or non-finite) amax keeps
the previous scale. A positive second moment never quantizes to zero (it is clamped to the
smallest positive code): a zero ``v`` under a non-zero ``m`` would turn ``m / (sqrt(v) + eps)``
into a huge step.

The per-tensor update is one function (:func:`_adamw_update`) that runs eagerly or under
``torch.compile``; both run the same fp32 arithmetic. On CPU the compiled one is ~15x faster
because eager fp8 casts are not vectorized there.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["FP8AdamW", "describe"]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
FP16_MAX = 65504.0
# Smallest positive codes: a positive second moment is clamped up to these instead of flushing to 0.
E4M3_TINY = 2.0**-9
FP16_TINY = 2.0**-24
BLOCK = 256  # values per scale in the 2-byte mode (torchao / bitsandbytes layout)
_HALF = (torch.float16, torch.bfloat16)


def _pow2_scale(amax: Tensor, fmax: float, old: Tensor) -> Tensor:
    """Largest power of two s with amax * s <= fmax; ``old`` where amax is 0 or not finite."""
    exp = torch.floor(torch.log2(fmax / amax)).clamp(-126.0, 126.0)
    return torch.where((amax > 0) & torch.isfinite(amax), torch.exp2(exp), old)


def _scaled(x: Tensor, scale: Tensor, fmax: float, tiny: float = 0.0) -> Tensor:
    """x * scale clamped to the format's range (and up to ``tiny`` for positive x), still fp32.

    The cast to the storage dtype comes last, in _write: inductor cannot ``torch.where`` on fp8.
    """
    y = (x * scale).clamp(-fmax, fmax)
    if tiny:
        y = torch.where(x > 0, y.clamp_min(tiny), y)
    return y


def _deferred(dst: Tensor) -> bool:
    """Whether ``dst``'s new value is returned for an eager ``copy_`` instead of written in the kernel.

    Inductor's CPU kernels load and store 16-bit values with masked half-vector instructions; doing
    both on the same buffer stalls (2x slower step, measured on AMD EPYC), a plain copy is cheap.
    """
    return dst.device.type == "cpu" and dst.element_size() == 2


def _write(dst: Tensor, ok: Tensor, new: Tensor, deferred: list[Tensor]) -> None:
    """dst = new if ok else dst, cast to dst's dtype (the round trip of an unchanged fp8/fp16 value is exact)."""
    value = torch.where(ok, new, dst.float())
    if _deferred(dst):
        deferred.append(value.to(dst.dtype))
    else:
        dst.copy_(value)


def _adamw_update(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    m_scale: Tensor | None,
    v: Tensor,
    v_scale: Tensor | None,
    w: Tensor | None,
    w_scale: Tensor | None,
    hp: Tensor,
) -> tuple[Tensor, list[Tensor]]:
    """One AdamW step for one tensor; returns (ok, deferred).

    ``ok`` is a 0-d bool, False when the update is not finite: then nothing changes. ``deferred``
    holds the new values of the 16-bit tensors among (m, v, w, p), in that order (see _deferred).
    ``hp`` = [lr, 1 - lr*wd, beta1, beta2, 1 / bias_correction1, 1 / bias_correction2, eps] (fp32).
    ``m_scale is None``: fp32 states. ``v_scale`` 1-D: 2-byte mode, all tensors are (blocks, BLOCK)
    views. ``w``: fp16 master weights (else ``p`` itself is the master copy). Scales are powers of
    two, so multiplying by their reciprocal is exact.
    """
    lr, decay, b1, b2, inv_bc1, inv_bc2, eps = hp.unbind()
    g32 = g.float()
    if m_scale is None:
        m32, v32 = m, v
    else:
        m32 = m.float() * (1 / m_scale)
        if v_scale.dim() == 0:
            v32 = v.float() * (1 / v_scale)
        else:
            r = v.float() * (1 / v_scale)[:, None]
            v32 = r * r
    w32 = p.float() if w is None else w.float() * (1 / w_scale)

    m_new = b1 * m32 + (1 - b1) * g32
    v_new = b2 * v32 + (1 - b2) * g32 * g32
    w_new = w32 * decay - lr * (m_new * inv_bc1) / (torch.sqrt(v_new * inv_bc2) + eps)

    deferred: list[Tensor] = []
    if m_scale is None:
        ok = torch.isfinite(m_new.abs().amax()) & torch.isfinite(v_new.amax())
        _write(m, ok, m_new, deferred)
        _write(v, ok, v_new, deferred)
    else:
        m_amax = m_new.abs().amax()
        if v_scale.dim() == 0:
            v_amax = v_new.amax()
            ok = torch.isfinite(m_amax) & torch.isfinite(v_amax)
            new_v_scale = _pow2_scale(v_amax, FP16_MAX, v_scale)
            v_q = _scaled(v_new, new_v_scale, FP16_MAX, FP16_TINY)
        else:
            r_new = torch.sqrt(v_new)
            r_amax = r_new.amax(dim=1)
            ok = torch.isfinite(m_amax) & torch.isfinite(r_amax).all()
            new_v_scale = _pow2_scale(r_amax, E4M3_MAX, v_scale)
            v_q = _scaled(r_new, new_v_scale[:, None], E4M3_MAX, E4M3_TINY)
        new_m_scale = _pow2_scale(m_amax, E4M3_MAX, m_scale)
        _write(m, ok, _scaled(m_new, new_m_scale, E4M3_MAX), deferred)
        _write(m_scale, ok, new_m_scale, deferred)
        _write(v, ok, v_q, deferred)
        _write(v_scale, ok, new_v_scale, deferred)
    if w is not None:
        new_w_scale = _pow2_scale(w_new.abs().amax(), FP16_MAX, w_scale)
        _write(w, ok, _scaled(w_new, new_w_scale, FP16_MAX), deferred)
        _write(w_scale, ok, new_w_scale, deferred)
    _write(p, ok, w_new, deferred)
    return ok, deferred


_compiled_update: Callable[..., tuple[Tensor, list[Tensor]]] | None = None


def _compiled() -> Callable[..., tuple[Tensor, list[Tensor]]]:
    # One compiled function shared by all optimizers; dynamic shapes avoid one compile per shape.
    global _compiled_update
    if _compiled_update is None:
        _compiled_update = torch.compile(_adamw_update, fullgraph=True, dynamic=True)
    return _compiled_update


def compile_available(device: torch.device | str = "cpu") -> bool:
    """Whether inductor has a backend compiler for ``device`` (C++ on CPU, Triton on GPUs)."""
    if torch.device(device).type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            return shutil.which(get_cpp_compiler()) is not None
        except Exception:  # no or broken compiler: inductor cannot build CPU kernels
            return False
    from torch.utils._triton import has_triton

    return has_triton()


class FP8AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with compact optimizer states; see the module docstring.

    Args:
        second_moment: "fp16" (per-tensor scale) or "fp8" (sqrt(v) in E4M3, per-256-block scales).
        min_numel: tensors with fewer values keep fp32 states (and fp32 master weights).
        master_weights: keep scaled fp16 master weights for bf16/fp16 parameters, so that
            full fine-tuning of a half-precision model does not lose small updates to bf16
            rounding. fp32 parameters are their own master copy.
        nonfinite: "skip" leaves a parameter whose update is non-finite (NaN/inf gradient, or a
            square overflowing fp32) untouched, weights and states, without advancing its step,
            and counts it in ``nonfinite_skips``; "raise" raises FloatingPointError instead.
        compile: run the update under ``torch.compile``; default: when inductor has a compiler
            for the parameters' device. A compile failure raises and names ``compile=False``.
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
        compile: bool | None = None,
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
        if compile is None:
            devices = {p.device for p in self._params()}
            compile = all(compile_available(d) for d in devices)
        self.compile = compile
        self.nonfinite_skips = 0

    def _params(self) -> Iterable[Tensor]:
        return chain.from_iterable(g["params"] for g in self.param_groups)

    def _layout(self, p: Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """State tensors (shape, dtype) for ``p``: single source for allocation and summary()."""
        n = p.numel()
        if n < self.min_numel:
            return {"exp_avg": ((n,), torch.float32), "exp_avg_sq": ((n,), torch.float32)}
        layout = {"exp_avg": ((n,), E4M3), "exp_avg_scale": ((), torch.float32)}
        if self.second_moment == "fp16" or n % BLOCK:
            layout |= {"exp_avg_sq": ((n,), torch.float16), "exp_avg_sq_scale": ((), torch.float32)}
        else:
            layout |= {"exp_avg_sq": ((n,), E4M3), "exp_avg_sq_scale": ((n // BLOCK,), torch.float32)}
        if self.master_weights and p.dtype in _HALF:
            layout |= {"master": ((n,), torch.float16), "master_scale": ((), torch.float32)}
        return layout

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        state: dict[str, Any] = {"step": 0}
        for key, (shape, dtype) in self._layout(p).items():
            state[key] = (torch.ones if key.endswith("scale") else torch.zeros)(shape, dtype=dtype, device=p.device)
        if "master" in state:
            w = p.detach().float().flatten()
            scale = _pow2_scale(w.abs().amax(), FP16_MAX, state["master_scale"])
            state["master_scale"].copy_(scale)
            state["master"].copy_(_scaled(w, scale, FP16_MAX))
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        update = _compiled() if self.compile else _adamw_update
        index = -1
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr = float(group["lr"])
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
                hp = (lr, 1 - lr * group["weight_decay"], b1, b2, 1 / (1 - b1**t), 1 / (1 - b2**t), group["eps"])
                ok = self._update(update, p, state, torch.tensor(hp, dtype=torch.float32, device=p.device))
                if ok:
                    state["step"] = t
                elif self.nonfinite == "raise":
                    raise FloatingPointError(
                        f"FP8AdamW: non-finite update for parameter {index} of shape {tuple(p.shape)} "
                        "(NaN/inf gradient); weights and states were left unchanged"
                    )
                else:
                    self.nonfinite_skips += 1
        return loss

    def _update(self, update: Callable[..., tuple[Tensor, list[Tensor]]], p: Tensor, state: dict, hp: Tensor) -> bool:
        """Run the update on flat views, (blocks, BLOCK) views in the 2-byte mode; True if applied."""
        v_scale = state.get("exp_avg_sq_scale")
        shape = (-1, BLOCK) if v_scale is not None and v_scale.dim() == 1 else (-1,)
        work = p if p.is_contiguous() else p.contiguous()
        m, v, w = (state[k].view(shape) if k in state else None for k in ("exp_avg", "exp_avg_sq", "master"))
        pw = work.view(shape)
        args = (pw, p.grad.reshape(shape), m, state.get("exp_avg_scale"), v, v_scale, w, state.get("master_scale"), hp)
        if self.compile:
            try:
                ok, deferred = update(*args)
            except Exception as e:  # compile errors surface at the first call for a new signature
                raise RuntimeError(
                    "FP8AdamW: torch.compile of the optimizer step failed; pass compile=False to run "
                    "the same arithmetic eagerly (slower on CPU)"
                ) from e
        else:
            ok, deferred = update(*args)
        for dst, value in zip([t for t in (m, v, w, pw) if t is not None and _deferred(t)], deferred, strict=True):
            dst.copy_(value)
        if work is not p:
            p.copy_(work)
        return bool(ok)

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

    def summary(self) -> dict[str, Any]:
        """State formats and sizes for all parameters (as they are, or will be after the first step)."""
        formats: dict[str, int] = {}
        state_bytes = params = 0
        for p in self._params():
            layout = self._layout(p)
            fmt = "/".join(
                _format_name(layout[k][1], layout.get(f"{k}_scale")) for k in ("exp_avg", "exp_avg_sq", "master") if k in layout
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
            "compile": self.compile,
        }


def _format_name(dtype: torch.dtype, scale: tuple[tuple[int, ...], torch.dtype] | None) -> str:
    name = {E4M3: "fp8", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    if scale is not None and scale[0]:
        name += f"[block{BLOCK}]"
    return name


def describe(summary: dict[str, Any]) -> str:
    """One line for start-up logs, from :meth:`FP8AdamW.summary`."""
    formats = ", ".join(f"{n} tensors m/v{'/master' if f.count('/') == 2 else ''}={f}" for f, n in summary["tensors_by_format"].items())
    return (
        f"{summary['optimizer']}: {summary['params'] / 1e6:.2f}M params, optimizer states "
        f"{summary['state_bytes'] / 2**20:.1f} MiB = {summary['bytes_per_param']:.2f} bytes/param "
        f"(fp32 AdamW: {summary['fp32_adamw_state_bytes'] / 2**20:.1f} MiB); {formats}; "
        f"compiled step: {'on' if summary['compile'] else 'off'}"
    )
