"""FP8AdamW: the step against a direct fp32 re-computation, trajectories, state formats, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

import perl_plugins
from perl_plugins.plugins.fp8.optim import BLOCK, E4M3, FP8AdamW, describe

LR, WD, B1, B2, EPS = 1e-2, 0.1, 0.9, 0.999, 1e-8


def _pow2(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(fmax / amax)))


def _reference_step(p, g, state, t, second_moment):
    """The FP8-LM step written out: dequantize, AdamW in fp32, requantize.

    fp16 mode: delayed scaling with a bound. The scales come from the amaxes recorded by the previous
    step and this gradient's amax G: m's from b1 * amax(m_prev) * (1 + 2**-4) + (1 - b1) * G (the
    recorded amax is of the stored values before rounding; half an E4M3 ulp bounds the rounding),
    v's from the envelope b2 * env_prev + (1 - b2) * G**2, which is also what v records.
    2-byte mode: fresh scales from the new values (m per tensor, sqrt(v) per block)."""
    m = state["exp_avg"].float() / state["exp_avg_scale"]
    if second_moment == "fp16":
        v = state["exp_avg_sq"].float() / state["exp_avg_sq_scale"]
    else:
        v = ((state["exp_avg_sq"].float().view(-1, BLOCK) / state["exp_avg_sq_scale"][:, None]) ** 2).flatten()
    # The optimizer's fp32 hyper-parameters and operation order; sqrt correctly rounded (in float64,
    # which rounds to the same fp32 result): the C++ kernel matches this bit for bit.
    lr, decay, b1, c1, b2, c2, bc1, bc2, eps = (
        torch.tensor(x, dtype=torch.float32)
        for x in (LR, 1 - LR * WD, B1, 1 - B1, B2, 1 - B2, 1 / (1 - B1**t), 1 / (1 - B2**t), EPS)
    )
    g = g.flatten()
    m, v = b1 * m + c1 * g, b2 * v + c2 * (g * g)
    p = p.flatten() * decay - lr * (m * bc1) / (torch.sqrt((v * bc2).double()).float() + eps)
    if second_moment == "fp16":
        big_g = g.abs().amax()
        bound_m = B1 * state["exp_avg_amax"] * (1 + 2.0**-4) + (1 - B1) * big_g
        bound_v = B2 * state["exp_avg_sq_amax"] + (1 - B2) * big_g**2
        m_scale = _pow2(bound_m, 448.0)
        assert (m * m_scale).abs().amax() <= 448  # the bound holds: nothing saturates
        m_stored = (m * m_scale).clamp(-448, 448)
        out = {"exp_avg": m_stored.to(E4M3), "exp_avg_scale": m_scale, "exp_avg_amax": m_stored.abs().amax() / m_scale}
    else:
        m_scale = _pow2(m.abs().amax(), 448.0)
        out = {"exp_avg": (m * m_scale).to(E4M3), "exp_avg_scale": m_scale}
    # A positive second moment never rounds to 0: it is clamped to the smallest positive code.
    if second_moment == "fp16":
        v_scale = _pow2(bound_v, 65504.0)
        assert v.amax() * v_scale <= 65504
        v_q = torch.where(v > 0, (v * v_scale).clamp_min(2.0**-24), 0.0).half()
        out |= {"exp_avg_sq": v_q, "exp_avg_sq_scale": v_scale, "exp_avg_sq_amax": bound_v}
    else:
        r = v.sqrt().view(-1, BLOCK)
        v_scale = _pow2(r.amax(dim=1), 448.0)
        r_q = torch.where(r > 0, (r * v_scale[:, None]).clamp_min(2.0**-9), 0.0).flatten().to(E4M3)
        out |= {"exp_avg_sq": r_q, "exp_avg_sq_scale": v_scale}
    return p, out


@pytest.mark.parametrize(("second_moment", "kernel"), [("fp16", "eager"), ("fp16", "cpp"), ("fp8", "eager")])
def test_step_matches_fp32_recomputation(second_moment, kernel):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 512))
    opt = FP8AdamW([p], lr=LR, weight_decay=WD, eps=EPS, second_moment=second_moment, min_numel=0, kernel=kernel)
    # Steps 4 and 5: a 1000x gradient spike, then a 1000x drop: delayed scales must follow both.
    for t, factor in zip(range(1, 7), [1, 1, 1, 1000, 1, 1e-3]):
        p.grad = torch.randn_like(p) * torch.logspace(-4, 0, 512) * factor  # several binades per block
        state = opt.state[p] or opt._init_state(p)  # the zero states a first step starts from
        opt.state[p] = state
        before = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
        expected_p, expected = _reference_step(p.detach().clone(), p.grad, before, t, second_moment)
        opt.step()
        assert state["step"] == t
        if kernel == "cpp":  # IEEE fp32 operations in the reference's order
            assert torch.equal(p.detach().flatten(), expected_p)
        else:  # torch's vectorized CPU sqrt is within an ulp of the correctly rounded one
            torch.testing.assert_close(p.detach().flatten(), expected_p, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg_scale", "exp_avg_sq_scale", "exp_avg_amax", "exp_avg_sq_amax"):
            if key in expected:
                assert torch.equal(state[key], expected[key]), key
        for key in ("exp_avg", "exp_avg_sq"):
            got, want = state[key].float(), expected[key].float()
            assert state[key].dtype == expected[key].dtype
            assert torch.equal(got, want), key


def _train(make_optimizer, steps: int = 300, dtype=torch.float32) -> float:
    """Fit a noisy teacher on fresh batches; held-out loss (noise floor 0.01)."""
    teacher = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)) / 8
    data = torch.Generator().manual_seed(2)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 64, generator=data)
        return x, torch.tanh(x @ teacher) + 0.1 * torch.randn(n, 8, generator=data)

    x_eval, y_eval = batch(2048)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8)).to(dtype)
    opt = make_optimizer(model.parameters())
    for _ in range(steps):
        x, y = batch(64)
        loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x_eval.to(dtype)).float(), y_eval).item()


@pytest.mark.parametrize("second_moment", ["fp16", "fp8"])
def test_trajectory_tracks_torch_adamw(second_moment):
    reference = _train(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=WD))
    kwargs = dict(lr=1e-3, weight_decay=WD, second_moment=second_moment, min_numel=0, kernel="eager")
    fp8 = _train(lambda ps: FP8AdamW(ps, **kwargs))
    assert reference < 0.05  # it learned (the target's variance is ~0.4, its noise 0.01)
    assert abs(fp8 - reference) / reference < 0.02


def test_master_weights_keep_small_bf16_updates():
    """At a small lr, bf16 rounding swallows most updates; fp16 master weights keep them."""
    kwargs = dict(lr=3e-4, weight_decay=0.0, min_numel=0, kernel="eager")
    reference = _train(lambda ps: torch.optim.AdamW(ps, lr=3e-4, weight_decay=0.0), steps=200)
    plain = _train(lambda ps: FP8AdamW(ps, **kwargs), steps=200, dtype=torch.bfloat16)
    master = _train(lambda ps: FP8AdamW(ps, master_weights=True, **kwargs), steps=200, dtype=torch.bfloat16)
    assert abs(master - reference) / reference < 0.05
    assert abs(master - reference) < 0.5 * abs(plain - reference)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _model_params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 256)), torch.nn.Parameter(torch.randn(100))]


def _step(opt, params):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


@pytest.mark.parametrize(
    ("second_moment", "v_dtype", "bytes_per_param"), [("fp16", torch.float16, 3.0), ("fp8", E4M3, 2.0 + 4 / BLOCK)]
)
def test_state_formats_and_bytes(second_moment, v_dtype, bytes_per_param):
    big, small = _model_params()
    opt = FP8AdamW([big, small], second_moment=second_moment, kernel="eager")
    planned = opt.summary()
    _step(opt, [big, small])
    s_big, s_small = opt.state[big], opt.state[small]
    assert s_big["exp_avg"].dtype == E4M3 and s_big["exp_avg_sq"].dtype == v_dtype
    assert s_small["exp_avg"].dtype == s_small["exp_avg_sq"].dtype == torch.float32  # under min_numel
    big_bytes = sum(t.nbytes for t in s_big.values() if torch.is_tensor(t))
    assert math.isclose(big_bytes / big.numel(), bytes_per_param, abs_tol=1e-3)
    actual = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    assert planned["state_bytes"] == actual
    assert sum(planned["tensors_by_format"].values()) == 2
    line = describe(planned)
    assert "bytes/param" in line and "\n" not in line


def test_block_mode_falls_back_for_sizes_off_the_block_grid():
    p = torch.nn.Parameter(torch.randn(4099))
    opt = FP8AdamW([p], second_moment="fp8", kernel="eager")
    _step(opt, [p])
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float16
    assert "fp8/fp16" in opt.summary()["tensors_by_format"]


@pytest.mark.parametrize(("second_moment", "kernel"), [("fp16", "eager"), ("fp16", "cpp"), ("fp8", "eager")])
def test_state_dict_round_trip_is_bit_exact(tmp_path, second_moment, kernel):
    params = _model_params()
    opt = FP8AdamW(params, second_moment=second_moment, min_numel=1000, kernel=kernel)
    for _ in range(3):
        _step(opt, params)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert saved["state"][0]["exp_avg"].dtype == E4M3  # compact on disk, not upcast
    assert saved["state"][0]["exp_avg_sq"].dtype == (torch.float16 if second_moment == "fp16" else E4M3)

    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = FP8AdamW(clones, second_moment=second_moment, min_numel=1000, kernel=kernel)
    restored.load_state_dict(saved)
    for p, q in zip(params, clones):
        a, b = opt.state[p], restored.state[q]
        assert a.keys() == b.keys()
        for key in a:
            if torch.is_tensor(a[key]):
                assert a[key].dtype == b[key].dtype and torch.equal(_bits(a[key]), _bits(b[key])), key
            else:
                assert a[key] == b[key]
    torch.manual_seed(5)
    _step(opt, params)
    torch.manual_seed(5)
    _step(restored, clones)
    for p, q in zip(params, clones):
        assert torch.equal(p, q)


def test_master_weights_formats_and_round_trip(tmp_path):
    big = torch.nn.Parameter(torch.randn(64, 64, dtype=torch.bfloat16))
    small = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    full = torch.nn.Parameter(torch.randn(64, 64))
    opt = FP8AdamW([big, small, full], master_weights=True, min_numel=100, kernel="eager")
    _step(opt, [big, small, full])
    assert opt.state[big]["master"].dtype == torch.float16  # scaled fp16 for compact tensors
    assert opt.state[small]["master"].dtype == torch.float32  # fp32 under min_numel
    assert "master" not in opt.state[full]  # an fp32 parameter is its own master copy
    master = opt.state[big]["master"].view_as(big).float() / opt.state[big]["master_scale"]
    torch.testing.assert_close(big.detach().float(), master, rtol=2.0**-8, atol=0.0)  # p = bf16(new weights)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    clones = [torch.nn.Parameter(p.detach().clone()) for p in (big, small, full)]
    restored = FP8AdamW(clones, master_weights=True, min_numel=100, kernel="eager")
    restored.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for p, q in zip((big, small), clones):
        assert torch.equal(restored.state[q]["master"], opt.state[p]["master"])


@pytest.mark.parametrize("kernel", ["eager", "cpp"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_that_tensor_only(bad, kernel):
    a, b = (torch.nn.Parameter(torch.randn(64, 128)) for _ in range(2))
    opt = FP8AdamW([a, b], min_numel=0, kernel=kernel)
    _step(opt, [a, b])
    a_before, b_before = a.detach().clone(), b.detach().clone()
    states_before = {k: v.clone() for k, v in opt.state[a].items() if torch.is_tensor(v)}
    a.grad = torch.randn_like(a)
    a.grad[3, 7] = bad
    b.grad = torch.randn_like(b)
    opt.step()
    assert torch.equal(a, a_before) and not torch.equal(b, b_before)
    for key, value in states_before.items():
        assert torch.equal(_bits(opt.state[a][key]), _bits(value)), key
    assert opt.state[a]["step"] == 1 and opt.state[b]["step"] == 2
    assert opt.nonfinite_skips == 1
    assert torch.isfinite(b).all()


@pytest.mark.parametrize("kernel", ["eager", "cpp"])
def test_nonfinite_gradient_raises_when_asked(kernel):
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(32, 32))
    opt = FP8AdamW([a, b], nonfinite="raise", min_numel=0, kernel=kernel)
    a.grad, b.grad = torch.randn(10), torch.full((32, 32), float("nan"))
    before = b.detach().clone()
    with pytest.raises(FloatingPointError, match=r"parameter 1 of shape \(32, 32\)"):
        opt.step()
    assert torch.equal(b, before)


@pytest.mark.parametrize(("second_moment", "kernel"), [("fp16", "eager"), ("fp16", "cpp"), ("fp8", "eager")])
def test_zero_gradient_keeps_the_previous_scale(second_moment, kernel):
    p = torch.nn.Parameter(torch.randn(4, BLOCK))
    opt = FP8AdamW([p], weight_decay=0.0, second_moment=second_moment, min_numel=0, kernel=kernel)
    p.grad = torch.zeros_like(p)
    before = p.detach().clone()
    opt.step()
    state = opt.state[p]
    assert torch.equal(p, before)  # no decay, no moment: nothing moves
    assert (state["exp_avg_scale"] == 1).all() and (state["exp_avg_sq_scale"] == 1).all()
    if second_moment == "fp8":  # blockwise: a zero block keeps its scale, the others get fresh ones
        p.grad = torch.randn_like(p)
        p.grad[0] = 0
        opt.step()
        scales = state["exp_avg_sq_scale"]
        assert scales[0] == 1 and (scales[1:] > 1).all()
    assert all(torch.isfinite(v.float()).all() for v in state.values() if torch.is_tensor(v))


def test_compiled_step_equals_eager():
    results = []
    for kernel in ("eager", "compile"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(16, BLOCK)), torch.nn.Parameter(torch.randn(16, BLOCK))]
        opts = [
            FP8AdamW(params[:1], second_moment="fp16", min_numel=0, kernel=kernel),
            FP8AdamW(params[1:], second_moment="fp8", min_numel=0, kernel=kernel),
        ]
        for step in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            params[0].grad[0, 0] = float("nan") if step == 1 else params[0].grad[0, 0]
            for opt in opts:
                opt.step()
        assert opts[0].nonfinite_skips == 1 and opts[0].state[params[0]]["step"] == 2
        results.append((params, opts))
    (eager_params, eager_opts), (comp_params, comp_opts) = results
    for p, q in zip(eager_params, comp_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    for eo, co, p, q in zip(eager_opts, comp_opts, eager_params, comp_params):
        for key, value in eo.state[p].items():
            if torch.is_tensor(value):
                assert (value.float() == co.state[q][key].float()).float().mean() > 0.999, key


def test_bad_arguments():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="second_moment"):
        FP8AdamW(p, second_moment="fp4")
    with pytest.raises(ValueError, match="nonfinite"):
        FP8AdamW(p, nonfinite="ignore")


@pytest.mark.parametrize(("second_moment", "min_numel"), [("fp16", 0), ("fp8", 0), ("fp16", 10**9)])
def test_dequantized_state_is_the_stored_values_over_their_scales(second_moment, min_numel):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 512))
    opt = FP8AdamW([p], second_moment=second_moment, min_numel=min_numel, kernel="eager")
    for _ in range(2):
        p.grad = torch.randn_like(p) * torch.logspace(-4, 0, 512)
        opt.step()
    state, full = opt.state[p], opt.dequantized_state(p)
    assert full["step"] == 2 and full["exp_avg"].dtype == full["exp_avg_sq"].dtype == torch.float32
    if min_numel:  # fp32 states are their own full precision
        assert torch.equal(full["exp_avg"], state["exp_avg"]) and torch.equal(full["exp_avg_sq"], state["exp_avg_sq"])
        return
    assert torch.equal(full["exp_avg"], state["exp_avg"].float() / state["exp_avg_scale"])
    if second_moment == "fp16":
        expected_v = state["exp_avg_sq"].float() / state["exp_avg_sq_scale"]
    else:  # sqrt(v) per 256-value block
        expected_v = ((state["exp_avg_sq"].float().view(-1, BLOCK) / state["exp_avg_sq_scale"][:, None]) ** 2).flatten()
    assert torch.equal(full["exp_avg_sq"], expected_v)


@pytest.mark.parametrize("second_moment", ["fp16", "fp8"])
def test_load_dequantized_state_requantizes_like_a_step(second_moment):
    """Loading a state's own full-precision values reproduces those values (a scale may double where
    rounding lowered a block's stored maximum: a fresh scale is derived from the values as stored),
    and fresh values get power-of-two scales from their amax, as a step would store them."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(2, 512))
    opt = FP8AdamW([p], second_moment=second_moment, min_numel=0, kernel="eager")
    for _ in range(3):
        p.grad = torch.randn_like(p) * torch.logspace(-3, 0, 512)
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    other = FP8AdamW([q], second_moment=second_moment, min_numel=0, kernel="eager")
    other.load_dequantized_state(q, opt.dequantized_state(p))
    assert other.state[q].keys() == opt.state[p].keys() and other.state[q]["step"] == 3
    assert all(other.state[q][k].dtype == v.dtype for k, v in opt.state[p].items() if torch.is_tensor(v))
    before, after = opt.dequantized_state(p), other.dequantized_state(q)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(after[key], before[key], rtol=1e-6, atol=0.0)
    m = torch.randn(1024) * 1e-3
    other.load_dequantized_state(q, {"step": 7, "exp_avg": m, "exp_avg_sq": m.square()})
    scale = other.state[q]["exp_avg_scale"]
    assert torch.equal(scale, torch.exp2(torch.floor(torch.log2(448.0 / m.abs().amax()))))
    torch.testing.assert_close(other.dequantized_state(q)["exp_avg"], m, rtol=2.0**-3, atol=0.0)


# ---------------------------------------------------------------- pieces of a ZeRO partition

SIZES, MAGNITUDES = [1024, 512, 768, 256], [1.0, 1e-4, 3e-2, 1e-6]  # tensors of very different scales
PAD = 256  # ZeRO pads partitions for alignment: values that belong to no tensor


def _fp32_adamw_moments(grads_per_step: list[list[torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exact AdamW moments after the given steps (moments do not depend on the weights)."""
    out = []
    for i in range(len(SIZES)):
        m = v = 0.0
        for grads in grads_per_step:
            m, v = B1 * m + (1 - B1) * grads[i], B2 * v + (1 - B2) * grads[i] ** 2
        out.append((m, v))
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _flat_and_separate(second_moment: str, kernel: str, pieces: bool, steps: int = 3):
    torch.manual_seed(0)
    parts = [torch.randn(n) for n in SIZES]
    separate = [torch.nn.Parameter(p.clone()) for p in parts]
    flat = torch.nn.Parameter(torch.cat([*parts, torch.zeros(PAD)]))
    kwargs = dict(lr=LR, weight_decay=WD, second_moment=second_moment, min_numel=0, kernel=kernel)
    opt_separate, opt_flat = FP8AdamW(separate, **kwargs), FP8AdamW([flat], **kwargs)
    starts = [sum(SIZES[:i]) for i in range(len(SIZES))]
    if pieces:
        opt_flat.set_segments(flat, list(zip(starts, SIZES)))
    history = []
    for _ in range(steps):
        grads = [torch.randn(n) * m for n, m in zip(SIZES, MAGNITUDES)]
        history.append(grads)
        for p, g in zip(separate, grads):
            p.grad = g
        flat.grad = torch.cat([*grads, torch.zeros(PAD)])
        opt_separate.step()
        opt_flat.step()
    full = opt_flat.dequantized_state(flat)
    pieces_of = lambda t: [t[a : a + n] for a, n in zip(starts, SIZES)]  # noqa: E731
    return opt_separate, separate, flat, full, pieces_of, history


@pytest.mark.parametrize(
    "kernel",
    [
        "eager",
        "cpp",
        pytest.param(
            "compile", marks=pytest.mark.skipif(not perl_plugins.compile_available(), reason="no inductor compiler")
        ),
    ],
)
def test_pieces_of_a_flat_partition_step_as_parameters_of_their_own(kernel):
    """fp16 mode: with set_segments, each piece of a flat ZeRO-like partition gets exactly the
    weights and states it gets as a separate parameter."""
    opt_separate, separate, flat, full, pieces_of, _ = _flat_and_separate("fp16", kernel, pieces=True)
    for p, weights, m, v in zip(
        separate, pieces_of(flat.detach()), pieces_of(full["exp_avg"]), pieces_of(full["exp_avg_sq"])
    ):
        own = opt_separate.dequantized_state(p)
        assert torch.equal(weights, p.detach())
        assert torch.equal(m, own["exp_avg"]) and torch.equal(v, own["exp_avg_sq"])
    assert opt_separate.summary()["state_bytes"] < FP8AdamW([flat], min_numel=0).summary()["state_bytes"] + 64


@pytest.mark.parametrize("second_moment", ["fp16", "fp8"])
def test_per_piece_scales_keep_small_tensors_moments_next_to_large_ones(second_moment):
    """One scale for the whole partition flushes the 1e-6-scaled piece's first moment to zero;
    per-piece (fp16 mode) or per-block (2-byte mode) scales keep every piece within fp8 rounding."""
    *_, exact_history = _flat_and_separate(second_moment, "eager", pieces=True)
    exact = _fp32_adamw_moments(exact_history)
    # fp8 rounding (3 mantissa bits): ~4% on m; on v ~4% in fp16 mode, ~7% in the 2-byte mode (v = r**2).
    bound_v = 0.05 if second_moment == "fp16" else 0.1
    for pieces, bound in ((True, 0.05), (False, None)):
        *_, full, pieces_of, _ = _flat_and_separate(second_moment, "eager", pieces=pieces)
        errors = [_relative(m, m_exact) for m, (m_exact, _) in zip(pieces_of(full["exp_avg"]), exact)]
        errors_v = [_relative(v, v_exact) for v, (_, v_exact) in zip(pieces_of(full["exp_avg_sq"]), exact)]
        if pieces:
            assert max(errors) < bound and max(errors_v) < bound_v, (errors, errors_v)
        else:
            assert errors[-1] > 0.5  # the smallest piece's m is (nearly) all flushed without pieces


def test_set_segments_relays_out_an_existing_state():
    """DeepSpeed may build states before the plugin registers the pieces (and restores saved ones):
    the state is re-quantized into the per-piece layout, and a second identical call changes nothing."""
    opt, separate, flat, full, pieces_of, _ = _flat_and_separate("fp16", "eager", pieces=False, steps=2)
    starts = [sum(SIZES[:i]) for i in range(len(SIZES))]
    opt_flat = FP8AdamW([flat], lr=LR, weight_decay=WD, min_numel=0, kernel="eager")
    opt_flat.load_dequantized_state(flat, full)
    opt_flat.set_segments(flat, list(zip(starts, SIZES)))
    state = opt_flat.state[flat]
    assert state["exp_avg_scale"].shape == (len(SIZES) + 1,)  # the padding is a piece of its own
    assert state["segment_bounds"].tolist() == [*starts, sum(SIZES), sum(SIZES) + PAD]
    again = opt_flat.dequantized_state(flat)
    torch.testing.assert_close(again["exp_avg"], full["exp_avg"], rtol=0.07, atol=0)
    opt_flat.set_segments(flat, list(zip(starts, SIZES)))
    assert torch.equal(opt_flat.dequantized_state(flat)["exp_avg"], again["exp_avg"])
    with pytest.raises(ValueError, match="outside"):
        opt_flat.set_segments(flat, [(0, flat.numel() + 1)])


@pytest.mark.parametrize("kernel", ["eager", "cpp"])
def test_nonfinite_gradient_in_one_piece_skips_the_whole_partition(kernel):
    """Pieces step in one pass each: a NaN in the last piece must stop the first ones too."""
    opt, separate, flat, full, pieces_of, _ = _flat_and_separate("fp16", "eager", pieces=True, steps=1)
    opt_flat = FP8AdamW([flat], lr=LR, weight_decay=WD, min_numel=0, kernel=kernel)
    opt_flat.set_segments(flat, [(sum(SIZES[:i]), n) for i, n in enumerate(SIZES)])
    flat.grad = torch.randn_like(flat)
    opt_flat.step()
    before = flat.detach().clone()
    state_before = {k: v.clone() for k, v in opt_flat.state[flat].items() if torch.is_tensor(v)}
    flat.grad = torch.randn_like(flat)
    flat.grad[sum(SIZES) - 1] = float("nan")
    opt_flat.step()
    assert torch.equal(flat, before) and opt_flat.state[flat]["step"] == 1 and opt_flat.nonfinite_skips == 1
    for key, value in state_before.items():
        assert torch.equal(_bits(opt_flat.state[flat][key]), _bits(value)), key
