"""The FP8 codec shared by FP8AdamW and fp8_comm, against direct re-computations on small tensors."""

from __future__ import annotations

import math

import torch

from perl_plugins.plugins.fp8.codec import E4M3, E4M3_MAX, FP16_MAX, pow2_scale, quantize_e4m3, saturate


def test_pow2_scale_is_the_largest_power_of_two_that_fits_and_keeps_the_old_one_otherwise():
    amax = torch.tensor([1.0, 3.0, 448.0, 1e-3, 0.0, float("inf"), float("nan")])
    old = torch.full_like(amax, 0.5)
    got = pow2_scale(amax, E4M3_MAX, old)
    for a, s in zip(amax.tolist(), got.tolist(), strict=True):
        if a > 0 and math.isfinite(a):
            expected = 2.0 ** math.floor(math.log2(E4M3_MAX / a))
            assert s == expected and a * s <= E4M3_MAX < a * 2 * s
        else:
            assert s == 0.5


def test_saturate_clamps_to_the_range_and_lifts_small_positives_to_tiny():
    x = torch.tensor([1e6, -1e6, 1e-12, -1e-12, 0.0, 2.0])
    got = saturate(x, torch.tensor(4.0), FP16_MAX, tiny=2.0**-24)
    expected = [FP16_MAX, -FP16_MAX, 2.0**-24, -4e-12, 0.0, 8.0]
    assert got.tolist() == [torch.tensor(e, dtype=torch.float32).item() for e in expected]


def test_quantize_e4m3_scales_saturates_and_sends_non_finite_values_as_nan():
    x = torch.tensor([0.5, 1000.0, -1000.0, float("inf"), float("nan"), 0.013])
    got = quantize_e4m3(x, 4.0)
    assert got.dtype == E4M3
    direct = (x * 4.0).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float()
    assert got.float()[[0, 1, 2, 5]].tolist() == direct[[0, 1, 2, 5]].tolist()
    assert got.float()[3].isnan() and got.float()[4].isnan()


def test_pow2_scale_is_exact_next_to_a_power_of_two():
    """amax a few ulps around fmax / 2**k: a rounded log2(fmax / amax) can land on the wrong side
    of an integer there; the scale must still be the largest power of two that fits."""
    for fmax in (E4M3_MAX, FP16_MAX):
        exact = fmax * 2.0 ** torch.arange(-20, 20).float()
        amax = torch.cat([exact * (1 + k * 2.0**-23) for k in range(-4, 5)])
        got = pow2_scale(amax, fmax, torch.ones_like(amax))
        assert (amax * got <= fmax).all() and (amax * got * 2 > fmax).all()
