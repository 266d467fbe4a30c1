"""FP8AdamW's C++ CPU kernel: its conversions against torch's casts (the codec's reference), its step
against the eager pass and a direct re-computation, thread-count independence, build errors."""

from __future__ import annotations

import pytest
import torch

from perl_plugins.plugins.fp8 import cpu_kernel
from perl_plugins.plugins.fp8.codec import E4M3, E4M3_MAX, quantize_e4m3
from perl_plugins.plugins.fp8.optim import FP8AdamW


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _e4m3_grid() -> torch.Tensor:
    """Every finite E4M3 value, the midpoints between neighbours (ties: round to even), points a
    hair off each midpoint, and values below the smallest subnormal."""
    codes = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    pos = codes[torch.isfinite(codes) & (codes >= 0)].unique().sort().values
    mid = (pos[1:] + pos[:-1]) / 2
    off = torch.cat([mid * (1 + 2.0**-20), mid * (1 - 2.0**-20)])
    tiny = torch.tensor([2.0**-11, 2.0**-10, 3 * 2.0**-11, 1e-30, 0.0])
    values = torch.cat([pos, mid, off, tiny])
    return torch.cat([values, -values[values > 0]])  # no -0: 0 * m + 1 * -0 is +0


def test_first_moment_codes_are_torchs_e4m3_rounding():
    """With b1 = 0 the stored first moment is the gradient times its power-of-two scale (1 here: the
    gradient's amax is 448), so the kernel's E4M3 codes must be torch's round-to-nearest-even cast,
    ties and subnormals included; the 7 extra values exercise the kernel's scalar tail."""
    g = _e4m3_grid()
    g = torch.cat([g, g[:7]])
    p = torch.nn.Parameter(torch.zeros_like(g))
    opt = FP8AdamW([p], betas=(0.0, 0.999), min_numel=0, kernel="cpp")
    p.grad = g.clone()
    opt.step()
    state = opt.state[p]
    assert state["exp_avg_scale"] == 1.0
    assert torch.equal(_bits(state["exp_avg"]), _bits(quantize_e4m3(g, 1.0)))
    assert state["exp_avg_amax"] == E4M3_MAX


def test_second_moment_is_torchs_fp16_rounding_with_the_tiny_floor():
    """With b2 = 0, v = g**2 times its scale: torch's fp16 cast, a positive value below fp16's
    smallest subnormal lifted to it, zero kept zero."""
    torch.manual_seed(0)
    g = torch.cat([torch.randn(1000) * torch.logspace(-12, 0, 1000), torch.tensor([0.0, 2.0**-22, 2.0**-13])])
    p = torch.nn.Parameter(torch.zeros_like(g))
    opt = FP8AdamW([p], betas=(0.9, 0.0), min_numel=0, kernel="cpp")
    p.grad = g.clone()
    opt.step()
    state = opt.state[p]
    scale = state["exp_avg_sq_scale"]
    scaled = (g * g * scale).clamp(max=65504.0)
    expected = torch.where(g * g > 0, scaled.clamp_min(2.0**-24), scaled).half()
    assert torch.equal(state["exp_avg_sq"], expected)
    assert (state["exp_avg_sq"][-2:] > 0).all() and state["exp_avg_sq"][-3] == 0


def _pair(kernels: tuple[str, str], steps: int = 4, **kwargs):
    """Two optimizers with the given kernels on the same parameters (odd sizes, fp32 small
    tensors, a bf16 one, per-piece scales) and gradients (one NaN, one spike)."""
    out = []
    for kernel in kernels:
        torch.manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(37, 129)),
            torch.nn.Parameter(torch.randn(100)),  # fp32 states (under min_numel)
            torch.nn.Parameter(torch.randn(3001).to(torch.bfloat16)),
            torch.nn.Parameter(torch.randn(40_000) * 1e-3),
        ]
        opt = FP8AdamW(params, lr=1e-2, weight_decay=0.1, min_numel=1000, kernel=kernel, **kwargs)
        opt.set_segments(params[3], [(0, 1001), (1001, 20_000), (25_000, 15_000)])
        gen = torch.Generator().manual_seed(1)
        for step in range(steps):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * (1000.0 if step == 2 else 1e-2)).to(p.dtype)
            if step == 1:
                params[0].grad[3, 5] = float("nan")
            opt.step()
        out.append((params, opt))
    return out


def test_kernel_equals_the_eager_pass():
    """States bit for bit; weights within an ulp (torch's vectorized sqrt is not always the
    correctly rounded one the kernel computes); the same skipped step."""
    (eager_params, eager), (cpp_params, cpp) = _pair(("eager", "cpp"))
    assert eager.nonfinite_skips == cpp.nonfinite_skips == 1
    for p, q in zip(eager_params, cpp_params):
        if p.dtype == torch.bfloat16:
            torch.testing.assert_close(p, q, rtol=2.0**-8, atol=0.0)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key, value in eager.state[p].items():
            other = cpp.state[q][key]
            if not torch.is_tensor(value):
                assert value == other, key
            elif p.dtype == torch.bfloat16:  # its weights' rounding can differ by an ulp, and so its states
                torch.testing.assert_close(value.float(), other.float(), rtol=0.07, atol=0.0)
            else:
                assert value.dtype == other.dtype and torch.equal(_bits(value), _bits(other)), key


def test_kernel_result_does_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        (one, opt_one), _ = _pair(("cpp", "cpp"), steps=2)
        torch.set_num_threads(2)
        (two, opt_two), _ = _pair(("cpp", "cpp"), steps=2)
    finally:
        torch.set_num_threads(threads)
    for p, q in zip(one, two):
        assert torch.equal(p, q)
        for key, value in opt_one.state[p].items():
            if torch.is_tensor(value):
                assert torch.equal(_bits(value), _bits(opt_two.state[q][key])), key


def test_a_kernel_that_cannot_build_raises_and_names_the_other_kernels(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    p = torch.nn.Parameter(torch.randn(64, 64))
    before = p.detach().clone()
    opt = FP8AdamW([p], min_numel=0)
    assert opt.kernel == "cpp"  # the default on CPU
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match=r"kernel='compile'.*kernel='eager'") as info:
        opt.step()
    assert "no-such-compiler-xyz" in str(info.value)
    assert torch.equal(p, before)


def test_kernel_choice_is_checked():
    with pytest.raises(ValueError, match="kernel"):
        FP8AdamW([torch.nn.Parameter(torch.randn(3))], kernel="triton")
    with pytest.raises(ValueError, match="CPU parameters only"):
        FP8AdamW([torch.nn.Parameter(torch.randn(3, device="meta"))], kernel="cpp")
