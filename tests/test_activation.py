"""CPU gated activation: torch.ops.moe_ext.gated_activation / gated_activation_backward and the autograd
path moe_ext.functional.apply_activation (gated "silu", "gelu", "gelu_tanh").

h = [gate | up] is [M, 2F]; forward act(gate) * up -> [M, F]; backward d_gate = grad * up * act'(gate),
d_up = grad * act(gate). The reference is torch's own activation in float64 (and torch.autograd for the
gradient). fp32 runs a vectorised polynomial exp and an Abramowitz-Stegun erf (~1e-7), fp64 libm, 16-bit
inputs are computed in fp32 and rounded once.
"""
import math

import pytest
import torch

import moe_ext  # noqa: F401  (registers torch.ops.moe_ext)
from activation_ref import (ACTS, ALL_ACTS, REF_ACT, assert_close_ref, bwd_scale, check_oai_limits, fwd_scale, half_ulp,
                            make_grad, make_h, make_oai_limits, ref_backward, ref_forward)
from conftest import FLOAT_DTYPES, TOL, noncontig
from moe_ext.functional import apply_activation

ops = torch.ops.moe_ext
# Against the float64 reference at single points: fp32 is limited by the polynomial exp / A-S erf, fp64 by
# libm, 16-bit by one rounding of an fp32 value (conftest's TOL).
REF_TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: TOL[torch.float16],
    torch.bfloat16: TOL[torch.bfloat16],
}


SHAPES = [(7, 36), (5, 1), (1, 8), (33, 300), (4, 257)]  # F = 300 / 257: more than one 256-column chunk


# -------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ALL_ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_reference(dtype, act, shape):
    M, F_ = shape
    h = make_h(M, F_, dtype, seed=M * 1000 + F_)
    out = ops.gated_activation(h, act)
    assert out.shape == (M, F_)
    assert_close_ref(out, ref_forward(h, act), dtype, fwd_scale(h, act))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_default_activation_is_silu(dtype):
    h = make_h(7, 36, dtype)
    assert torch.equal(ops.gated_activation(h), ops.gated_activation(h, "silu"))
    grad = make_grad(7, 36, dtype)
    assert torch.equal(ops.gated_activation_backward(grad, h), ops.gated_activation_backward(grad, h, "silu"))


@pytest.mark.parametrize("act", ALL_ACTS)
def test_activations_differ(act):
    """Each activation name selects its own function (not silently the default)."""
    h = make_h(16, 64, torch.float64)
    out = ops.gated_activation(h, act)
    for other in ALL_ACTS:
        if other != act:
            assert not torch.allclose(out, ref_forward(h, other), atol=1e-6, rtol=0), other


# ------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ALL_ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_reference(dtype, act, shape):
    M, F_ = shape
    h = make_h(M, F_, dtype, seed=M * 1000 + F_)
    grad = make_grad(M, F_, dtype, seed=M + F_)
    grad_h = ops.gated_activation_backward(grad, h, act)
    assert grad_h.shape == (M, 2 * F_)
    assert_close_ref(grad_h, ref_backward(grad, h, act), dtype, bwd_scale(grad, h, act))


# ----------------------------------------------------------------------- 16-bit: fp32 maths, one rounding
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_16bit_rounded_once(dtype, act):
    """16-bit outputs are the fp32 result rounded once: within half an ulp of the float64 value (plus the
    fp32 maths' own ~1e-6 relative error), which rounding act(gate) and the product separately is not."""
    M, F_ = 64, 300
    h = make_h(M, F_, dtype, seed=5, scale=2.0)
    grad = make_grad(M, F_, dtype, seed=6)
    ref = ref_forward(h, act)
    out = ops.gated_activation(h, act).double()
    # slack: the fp32 maths' own error (see assert_close_ref), before the rounding to dtype
    slack = 1e-5 * ref.abs() + 1e-6 * (1 + fwd_scale(h))
    assert ((out - ref).abs() <= half_ulp(ref, dtype) + slack).all()
    ref_b = ref_backward(grad, h, act)
    out_b = ops.gated_activation_backward(grad, h, act).double()
    slack_b = 1e-5 * ref_b.abs() + 1e-6 * (1 + bwd_scale(grad, h))
    assert ((out_b - ref_b).abs() <= half_ulp(ref_b, dtype) + slack_b).all()
    # rounding act(gate) to dtype before the product (two roundings) is caught by the bound above
    g, u = h.chunk(2, -1)
    twice = (REF_ACT[act](g.double()).to(dtype).double() * u.double()).to(dtype).double()
    assert ((twice - ref).abs() > half_ulp(ref, dtype) + slack).any()


# ------------------------------------------------------------------------------ layouts and empty sizes
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ALL_ACTS)
def test_noncontiguous_inputs(dtype, act):
    M, F_ = 9, 36
    h = make_h(M, F_, dtype, seed=2)
    grad = make_grad(M, F_, dtype, seed=3)
    out = ops.gated_activation(h, act)
    grad_h = ops.gated_activation_backward(grad, h, act)
    assert out.is_contiguous() and grad_h.is_contiguous()
    # every other column of a wider buffer, and a transposed buffer
    h_t = h.t().contiguous().t()
    assert not h_t.is_contiguous()
    # contiguous, but starting one element past the buffer's (aligned) start
    h_off = torch.empty(M * 2 * F_ + 1, dtype=dtype)[1:].view(M, 2 * F_).copy_(h)
    g_off = torch.empty(M * F_ + 1, dtype=dtype)[1:].view(M, F_).copy_(grad)
    for hv in (noncontig(h), h_t, h_off):
        assert torch.equal(ops.gated_activation(hv, act), out)
        assert torch.equal(ops.gated_activation_backward(grad, hv, act), grad_h)
    assert torch.equal(ops.gated_activation_backward(noncontig(grad), noncontig(h), act), grad_h)
    assert torch.equal(ops.gated_activation_backward(g_off, h_off, act), grad_h)
    # a broadcast (stride-0) gradient
    g_row = grad[:1]
    expanded = g_row.expand(M, F_)
    assert torch.equal(ops.gated_activation_backward(expanded, h, act),
                       ops.gated_activation_backward(expanded.contiguous(), h, act))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ALL_ACTS)
def test_empty(dtype, act):
    out = ops.gated_activation(torch.empty(0, 72, dtype=dtype), act)
    assert out.shape == (0, 36) and out.dtype == dtype
    gh = ops.gated_activation_backward(torch.empty(0, 36, dtype=dtype), torch.empty(0, 72, dtype=dtype), act)
    assert gh.shape == (0, 72) and gh.dtype == dtype
    out = ops.gated_activation(torch.empty(5, 0, dtype=dtype), act)
    assert out.shape == (5, 0) and out.dtype == dtype
    gh = ops.gated_activation_backward(torch.empty(5, 0, dtype=dtype), torch.empty(5, 0, dtype=dtype), act)
    assert gh.shape == (5, 0) and gh.dtype == dtype


# ----------------------------------------------------------------------------- NaN and extreme values
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_nan_propagates(dtype, act):
    M, F_ = 6, 20
    h = make_h(M, F_, dtype, seed=4)
    grad = make_grad(M, F_, dtype, seed=5)
    nan_gate = [(0, 0), (2, 7), (5, 19)]
    nan_up = [(1, 3), (2, 8), (4, 19)]
    for r, c in nan_gate:
        h[r, c] = float("nan")
    for r, c in nan_up:
        h[r, F_ + c] = float("nan")
    out = ops.gated_activation(h, act)
    expect_nan = torch.zeros(M, F_, dtype=torch.bool)
    for r, c in nan_gate + nan_up:
        expect_nan[r, c] = True
    assert torch.equal(out.isnan(), expect_nan)
    assert_close_ref(out, ref_forward(h, act), dtype, fwd_scale(h), equal_nan=True)

    grad_h = ops.gated_activation_backward(grad, h, act)
    d_gate, d_up = grad_h[:, :F_], grad_h[:, F_:]
    for r, c in nan_gate:  # act(NaN) and act'(NaN): both gradients
        assert d_gate[r, c].isnan() and d_up[r, c].isnan()
    for r, c in nan_up:  # d_gate = grad * up * act'(gate); d_up = grad * act(gate) does not read up
        assert d_gate[r, c].isnan() and not d_up[r, c].isnan()
    assert int(grad_h.isnan().sum()) == 2 * len(nan_gate) + len(nan_up)
    assert_close_ref(grad_h, ref_backward(grad, h, act), dtype, bwd_scale(grad, h), equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_large_values(dtype, act):
    big = [100.0, -100.0, 1e4, -1e4, 30.0, -30.0, 88.0, -88.0, 90.0, -90.0, 0.0, -0.0]
    gate = torch.tensor(big, dtype=torch.float64).to(dtype)
    F_ = gate.numel()
    up = torch.ones(F_, dtype=dtype)
    h = torch.cat([gate, up]).reshape(1, 2 * F_).repeat(3, 1)
    h[1, F_:] = -2.5  # a negative, non-unit up
    h[2, F_:] = torch.linspace(-3, 3, F_, dtype=torch.float64).to(dtype)
    out = ops.gated_activation(h, act)
    assert torch.isfinite(out).all()
    assert_close_ref(out, ref_forward(h, act), dtype, fwd_scale(h))
    # act(x) = x for large positive x, ~0 for large negative x
    row = out[0].double()
    g64 = gate.double()
    pos, neg = g64 >= 30, g64 <= -30
    torch.testing.assert_close(row[pos], g64[pos], **REF_TOL[dtype])
    assert (row[neg].abs() <= 1e-6).all()

    grad = torch.ones(3, F_, dtype=dtype)
    grad_h = ops.gated_activation_backward(grad, h, act)
    assert torch.isfinite(grad_h).all()
    assert_close_ref(grad_h, ref_backward(grad, h, act), dtype, bwd_scale(grad, h))
    # act'(x) -> 1 for large positive, -> 0 for large negative x (up = 1 in row 0)
    d_gate = grad_h[0, :F_].double()
    torch.testing.assert_close(d_gate[pos], torch.ones_like(d_gate[pos]), **REF_TOL[dtype])
    assert (d_gate[neg].abs() <= 1e-6).all()


def test_large_values_exact_points():
    h = torch.tensor([[100.0, -100.0, 1.0, 1.0]])
    torch.testing.assert_close(ops.gated_activation(h, "silu"), torch.tensor([[100.0, 0.0]]), atol=1e-30, rtol=1e-7)
    torch.testing.assert_close(ops.gated_activation(h, "gelu"), torch.tensor([[100.0, 0.0]]), atol=1e-30, rtol=1e-7)
    torch.testing.assert_close(ops.gated_activation(h, "gelu_tanh"), torch.tensor([[100.0, 0.0]]),
                               atol=1e-30, rtol=1e-7)


# ------------------------------------------------------------------------------- swigluoai (GPT-OSS)
def _gpt_oss_apply_gate(gate_up, alpha=1.702, limit=7.0):
    """transformers' GptOssExperts._apply_gate, as written there."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu


def test_swigluoai_is_gpt_oss():
    """The op is GPT-OSS's activation, forward and (away from the clamp limits, where torch versions differ)
    backward: h of scale 5 puts many inputs beyond the limits."""
    h = make_h(40, 50, torch.float64, seed=11, scale=5.0)
    assert (h.abs() > 7).any() and not ((h.abs() - 7).abs() < 1e-6).any()
    grad = make_grad(40, 50, torch.float64, seed=12)
    hr = h.clone().requires_grad_()
    ref = _gpt_oss_apply_gate(hr)
    (ref_grad,) = torch.autograd.grad(ref, hr, grad)
    torch.testing.assert_close(ops.gated_activation(h, "swigluoai"), ref.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ops.gated_activation_backward(grad, h, "swigluoai"), ref_grad, atol=1e-12, rtol=1e-10)
    y = apply_activation(hr, "swigluoai")
    (g2,) = torch.autograd.grad(y, hr, grad)
    torch.testing.assert_close(g2, ref_grad, atol=1e-12, rtol=1e-10)


def test_swigluoai_hand_values():
    """[g0, u0, g1, u1] = [1, 2, 8, -9]: out0 = 1 * sigmoid(1.702) * 3, out1 = 7 * sigmoid(7 * 1.702) * -6."""
    h = torch.tensor([[1.0, 2.0, 8.0, -9.0]], dtype=torch.float64)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expect = torch.tensor([[3 * sig(1.702), -42 * sig(7 * 1.702)]], dtype=torch.float64)
    torch.testing.assert_close(ops.gated_activation(h, "swigluoai"), expect, atol=1e-14, rtol=1e-13)
    # the gradient: gate 8 and up -9 are clamped (none), gate 1 and up 2 are not
    gh = ops.gated_activation_backward(torch.ones(1, 2, dtype=torch.float64), h, "swigluoai")
    s = sig(1.702)
    expect_g = torch.tensor([[3 * s * (1 + 1.702 * (1 - s)), s, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(gh, expect_g, atol=1e-14, rtol=1e-13)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_swigluoai_limits_and_nan(dtype):
    """At and beyond the limits and at NaN: the clamped values forward, no gradient through a clamped input, one
    exactly at a limit (torch 2.14's clamp) or a NaN one; a NaN anywhere makes its output NaN."""
    h, grad = make_oai_limits(dtype)
    out = ops.gated_activation(h, "swigluoai")
    gh = ops.gated_activation_backward(grad, h, "swigluoai")
    assert_close_ref(out, ref_forward(h, "swigluoai"), dtype, fwd_scale(h, "swigluoai"), equal_nan=True)
    assert_close_ref(gh, ref_backward(grad, h, "swigluoai"), dtype, bwd_scale(grad, h, "swigluoai"), equal_nan=True)
    check_oai_limits(h, out, gh)


# --------------------------------------------------------------------------------------------- errors
ERRORS = [
    ("gated_activation", lambda: (torch.randn(3, 8), "relu"),
     r'^moe_ext\.gated_activation: activation must be "silu", "gelu", "gelu_tanh" or "swigluoai", got "relu"'),
    ("gated_activation_backward", lambda: (torch.randn(3, 4), torch.randn(3, 8), "relu"),
     r'^moe_ext\.gated_activation_backward: activation must be "silu", "gelu", "gelu_tanh" or "swigluoai", '
     r'got "relu"'),
    ("gated_activation", lambda: (torch.randn(2, 3, 8),),
     r"^moe_ext\.gated_activation: h must be 2-D \[M, 2F\] \(gate columns, then up columns\), got a 3-D tensor "
     r"of shape \[2, 3, 8\]"),
    ("gated_activation", lambda: (torch.randn(8),),
     r"^moe_ext\.gated_activation: h must be 2-D \[M, 2F\] .*got a 1-D tensor of shape \[8\]"),
    ("gated_activation", lambda: (torch.randn(3, 5),),
     r"^moe_ext\.gated_activation: h must be \[M, 2F\] \(gate columns, then up columns\), got shape \[3, 5\] "
     r"whose last dim is odd"),
    ("gated_activation", lambda: (torch.randn(3, 5), "swigluoai"),
     r"^moe_ext\.gated_activation: h must be \[M, 2F\] \(gate and up columns interleaved\), got shape \[3, 5\] "
     r"whose last dim is odd"),
    ("gated_activation", lambda: (torch.ones(3, 8, dtype=torch.long),),
     r"^moe_ext\.gated_activation: h must be float32, float16, bfloat16 or float64, got Long"),
    ("gated_activation", lambda: (torch.ones(3, 8, dtype=torch.int32),),
     r"^moe_ext\.gated_activation: h must be float32, float16, bfloat16 or float64, got Int"),
    ("gated_activation_backward", lambda: (torch.randn(3, 5), torch.randn(3, 8)),
     r"^moe_ext\.gated_activation_backward: grad\.size\(1\) must equal h\.size\(1\) / 2 \(F\) = 4, got shape "
     r"\[3, 5\]"),
    ("gated_activation_backward", lambda: (torch.randn(2, 4), torch.randn(3, 8)),
     r"^moe_ext\.gated_activation_backward: grad\.size\(0\) must equal h\.size\(0\) \(M\) = 3, got shape \[2, 4\]"),
    ("gated_activation_backward", lambda: (torch.randn(3, 4, 1), torch.randn(3, 8)),
     r"^moe_ext\.gated_activation_backward: grad must be 2-D \[M, F\], got a 3-D tensor of shape \[3, 4, 1\]"),
    ("gated_activation_backward", lambda: (torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 8)),
     r"^moe_ext\.gated_activation_backward: grad must have the dtype of h \(Float\), got Double"),
    ("gated_activation_backward", lambda: (torch.randn(3, 4).bfloat16(), torch.randn(3, 8).half()),
     r"^moe_ext\.gated_activation_backward: grad must have the dtype of h \(Half\), got BFloat16"),
    ("gated_activation_backward", lambda: (torch.randn(3, 4), torch.randn(3, 5)),
     r"^moe_ext\.gated_activation_backward: h must be \[M, 2F\] .*got shape \[3, 5\] whose last dim is odd"),
    ("gated_activation_backward", lambda: (torch.ones(3, 4, dtype=torch.long), torch.ones(3, 8, dtype=torch.long)),
     r"^moe_ext\.gated_activation_backward: h must be float32, float16, bfloat16 or float64, got Long"),
]


@pytest.mark.parametrize("op,make_args,msg", ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)])
def test_errors(op, make_args, msg):
    with pytest.raises(RuntimeError, match=msg):
        getattr(ops, op)(*make_args())


def test_apply_activation_rejects_odd_last_dim():
    with pytest.raises(RuntimeError, match=r"last dim is odd"):
        apply_activation(torch.randn(3, 5), "silu")


# ---------------------------------------------------------------------------- autograd: apply_activation
@pytest.mark.parametrize("act", ALL_ACTS)
def test_apply_activation_gradcheck(act):
    h = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)  # leading dims are flattened
    assert torch.autograd.gradcheck(lambda x: apply_activation(x, act), (h,))
    h2 = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)  # F = 1
    assert torch.autograd.gradcheck(lambda x: apply_activation(x, act), (h2,))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ALL_ACTS)
def test_apply_activation_uses_the_ops(dtype, act):
    """apply_activation on [..., 2F] is the op on the flattened rows, forward and backward."""
    h = make_h(12, 36, dtype, seed=9).reshape(3, 4, 72)
    grad = make_grad(12, 36, dtype, seed=10)
    hr = h.clone().requires_grad_()
    y = apply_activation(hr, act)
    assert y.shape == (3, 4, 36) and y.dtype == dtype
    assert torch.equal(y.detach().reshape(12, 36), ops.gated_activation(h.reshape(12, 72), act))
    y.backward(grad.reshape(3, 4, 36))
    assert hr.grad.shape == h.shape and hr.grad.dtype == dtype
    assert torch.equal(hr.grad.reshape(12, 72), ops.gated_activation_backward(grad, h.reshape(12, 72), act))
    assert_close_ref(hr.grad.reshape(12, 72), ref_backward(grad, h.reshape(12, 72), act), dtype,
                     bwd_scale(grad, h.reshape(12, 72), act))


def test_apply_activation_noncontiguous_input():
    base = torch.randn(6, 40, dtype=torch.float64)
    h = base[:, :36].clone().requires_grad_()   # contiguous copy
    hv = base[:, :36].detach().requires_grad_()  # same values, a strided view
    assert not hv.is_contiguous()
    y, yv = apply_activation(h, "gelu"), apply_activation(hv, "gelu")
    assert torch.equal(y, yv)
    g = torch.randn(6, 18, dtype=torch.float64)
    y.backward(g)
    yv.backward(g)
    assert torch.equal(h.grad, hv.grad)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)], ids=["M0", "lead0"])
def test_apply_activation_no_rows(shape):
    h = torch.randn(*shape, requires_grad=True)
    y = apply_activation(h, "silu")
    assert y.shape == (*shape[:-1], shape[-1] // 2)
    y.sum().backward()
    assert h.grad.shape == h.shape


def test_apply_activation_zero_width():
    h = torch.randn(3, 0, requires_grad=True)
    y = apply_activation(h, "silu")
    assert y.shape == (3, 0)
    y.sum().backward()
    assert h.grad.shape == (3, 0)


# ----------------------------------------------------------------------------------------- torch.compile
def test_compile_aot_eager_forward_backward():
    torch._dynamo.reset()
    fn = torch.compile(lambda h: apply_activation(h, "silu"), fullgraph=True, backend="aot_eager")
    h = torch.randn(2, 5, 24, dtype=torch.float32)
    hc = h.clone().requires_grad_()
    he = h.clone().requires_grad_()
    y = fn(hc)
    ye = apply_activation(he, "silu")
    assert y.shape == (2, 5, 12)
    assert torch.equal(y, ye)
    assert_close_ref(y.detach().reshape(10, 12), ref_forward(h.reshape(10, 24), "silu"), torch.float32,
                     fwd_scale(h.reshape(10, 24)))
    g = torch.randn(2, 5, 12)
    y.backward(g)
    ye.backward(g)
    assert torch.equal(hc.grad, he.grad)
    assert_close_ref(hc.grad.reshape(10, 24), ref_backward(g.reshape(10, 12), h.reshape(10, 24), "silu"),
                     torch.float32, bwd_scale(g.reshape(10, 12), h.reshape(10, 24)))
