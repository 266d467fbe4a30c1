"""The FP8 format both halves of the fp8 plugin share: E4M3 / fp16 ranges, power-of-two scales, and
the conversions into a scaled, saturated code (the optimizer's states, the gradients it exchanges)."""

from __future__ import annotations

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
FP16_MAX = 65504.0
# Smallest positive codes: a positive second moment is clamped up to these instead of flushing to 0.
E4M3_TINY = 2.0**-9
FP16_TINY = 2.0**-24


def pow2_scale(amax: Tensor, fmax: float, old: Tensor) -> Tensor:
    """Largest power of two s with amax * s <= fmax (exponent within [-126, 126]); ``old`` where
    amax is 0 or not finite. Exact: a rounded log2 can be one off next to a power of two, and the
    two checks (products with powers of two are exact) correct it, as the C++ kernel's frexp does."""
    exp = torch.floor(torch.log2(fmax / amax)).clamp(-126.0, 126.0)
    exp = exp - ((amax * torch.exp2(exp) > fmax) & (exp > -126.0)).float()
    exp = exp + ((amax * torch.exp2(exp + 1) <= fmax) & (exp < 126.0)).float()
    return torch.where((amax > 0) & torch.isfinite(amax), torch.exp2(exp), old)


def saturate(x: Tensor, scale: Tensor, fmax: float, tiny: float = 0.0) -> Tensor:
    """x * scale clamped to the format's range (and up to ``tiny`` for positive x); still fp32,
    the optimizer casts it to the storage dtype."""
    y = (x * scale).clamp(-fmax, fmax)
    if tiny:
        y = torch.where(x > 0, y.clamp_min(tiny), y)
    return y


def quantize_e4m3(x: Tensor, scale: float | Tensor) -> Tensor:
    """``x * scale`` in E4M3, saturating at +-448; non-finite values become NaN (E4M3 has no inf),
    so a receiver sees an overflow instead of a clamped value."""
    scaled = x.float() * scale
    return torch.where(torch.isfinite(scaled), scaled.clamp(-E4M3_MAX, E4M3_MAX), float("nan")).to(E4M3)
