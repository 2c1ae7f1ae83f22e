"""CUDA gated activation (torch.ops.moe_ext.gated_activation / gated_activation_backward) against the CPU
kernels and a float64 reference.

h = [gate | up] is [M, 2F]; forward act(gate) * up -> [M, F]; backward d_gate = grad * up * act'(gate),
d_up = grad * act(gate), for "silu", "gelu" (erf) and "gelu_tanh"; "swigluoai" (GPT-OSS) interleaves gate and
up and clamps them (tests/activation_ref.py). The device computes 16-bit inputs in fp32
with expf / erff and rounds once, fp64 in fp64. Covers every dtype and activation, F odd (no vectorised
loads) and a multiple of 8, misaligned and non-contiguous inputs, more than 65535 rows (grid striding),
empty inputs, NaN and extreme values, determinism, no host sync, CUDA-graph capture, autograd,
torch.compile and opcheck. The tests that take `kern` (tests/kernel_backends.py) run on the GPU where
one is visible and under the CUDA emulation on every machine; the rest only on a GPU.
"""
import pytest
import torch

import moe_ext  # noqa: F401  (registers torch.ops.moe_ext)
from activation_ref import (ACTS, ALL_ACTS, assert_close_ref, assert_matches_cpu, bwd_scale, check_oai_limits,
                            fwd_scale, make_grad, make_h, make_oai_limits, ref_backward, ref_forward)
from conftest import TOL, gpu_only, has_fake_kernel, noncontig
from moe_ext.functional import apply_activation

ops = torch.ops.moe_ext
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# ------------------------------------------------------------------------------------------ helpers


# ----------------------------------------------------------------------------------- forward, backward
SHAPES = [
    (7, 36),
    (5, 1),
    (64, 37),     # odd F: no vectorised loads
    (33, 64),     # F a multiple of 8
    (17, 4096),   # wide rows
    (3, 1000),
    (257, 8),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ALL_ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_cpu_and_reference(kern, dtype, act, shape):
    M, F_ = shape
    h = make_h(M, F_, dtype, seed=M * 1000 + F_)
    grad = make_grad(M, F_, dtype, seed=M + F_)
    kern.poison()
    for misaligned in (False, True):  # one element off 16 bytes: no vectorised accesses
        out = kern.gated_activation(h, act, misaligned=misaligned)
        assert out.shape == (M, F_)
        assert_close_ref(out, ref_forward(h, act), dtype, fwd_scale(h, act))
        assert_matches_cpu(out, ops.gated_activation(h, act), dtype, ref_forward(h, act), fwd_scale(h, act))
    grad_h = kern.gated_activation_backward(grad, h, act)
    assert grad_h.shape == (M, 2 * F_)
    assert_close_ref(grad_h, ref_backward(grad, h, act), dtype, bwd_scale(grad, h, act))
    assert_matches_cpu(grad_h, ops.gated_activation_backward(grad, h, act), dtype, ref_backward(grad, h, act),
                       bwd_scale(grad, h, act))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swigluoai_limits_and_nan(kern, dtype):
    """GPT-OSS's clamps on the device: values and gradients at, beyond and inside the limits, and NaN."""
    h, grad = make_oai_limits(dtype)
    out = kern.gated_activation(h, "swigluoai")
    grad_h = kern.gated_activation_backward(grad, h, "swigluoai")
    ref, ref_b = ref_forward(h, "swigluoai"), ref_backward(grad, h, "swigluoai")
    assert_close_ref(out, ref, dtype, fwd_scale(h, "swigluoai"), equal_nan=True)
    assert_close_ref(grad_h, ref_b, dtype, bwd_scale(grad, h, "swigluoai"), equal_nan=True)
    check_oai_limits(h, out, grad_h)
    assert_matches_cpu(out, ops.gated_activation(h, "swigluoai"), dtype, ref, fwd_scale(h, "swigluoai"))
    assert_matches_cpu(grad_h, ops.gated_activation_backward(grad, h, "swigluoai"), dtype, ref_b,
                       bwd_scale(grad, h, "swigluoai"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(70000, 8), (66000, 37)], ids=lambda s: "x".join(map(str, s)))
def test_more_rows_than_a_grid_dimension(kern, dtype, shape):
    """M > 65535 rows: the kernels must stride over rows, not launch one block row per grid y index."""
    M, F_ = shape
    h = make_h(M, F_, dtype, seed=3)
    grad = make_grad(M, F_, dtype, seed=4)
    kern.poison()
    out = kern.gated_activation(h, "silu")
    grad_h = kern.gated_activation_backward(grad, h, "gelu")
    assert_close_ref(out, ref_forward(h, "silu"), dtype, fwd_scale(h))
    assert_close_ref(grad_h, ref_backward(grad, h, "gelu"), dtype, bwd_scale(grad, h))
    assert_matches_cpu(out, ops.gated_activation(h, "silu"), dtype, ref_forward(h, "silu"), fwd_scale(h))
    assert_matches_cpu(grad_h, ops.gated_activation_backward(grad, h, "gelu"), dtype, ref_backward(grad, h, "gelu"),
                       bwd_scale(grad, h))


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_activation_is_silu(dtype):
    h = make_h(9, 40, dtype).to(DEV)
    grad = make_grad(9, 40, dtype).to(DEV)
    assert torch.equal(ops.gated_activation(h), ops.gated_activation(h, "silu"))
    assert torch.equal(ops.gated_activation_backward(grad, h), ops.gated_activation_backward(grad, h, "silu"))


# ------------------------------------------------------------------------------ layouts and empty sizes
@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ALL_ACTS)
@pytest.mark.parametrize("F_", [36, 37, 64])
def test_noncontiguous_and_misaligned(dtype, act, F_):
    M = 19
    h = make_h(M, F_, dtype, seed=5).to(DEV)
    grad = make_grad(M, F_, dtype, seed=6).to(DEV)
    out = ops.gated_activation(h, act)
    grad_h = ops.gated_activation_backward(grad, h, act)
    assert out.is_contiguous() and grad_h.is_contiguous()
    # strided views: every other column of a wider buffer, a transposed buffer
    h_t = h.t().contiguous().t()
    assert not h_t.is_contiguous()
    # contiguous but one element past an aligned address (no vectorised loads from it)
    buf = torch.empty(M * 2 * F_ + 1, dtype=dtype, device=DEV)
    h_off = buf[1:].view(M, 2 * F_)
    h_off.copy_(h)
    gbuf = torch.empty(M * F_ + 3, dtype=dtype, device=DEV)
    g_off = gbuf[3:].view(M, F_)
    g_off.copy_(grad)
    for hv in (noncontig(h), h_t, h_off):
        assert torch.equal(ops.gated_activation(hv, act), out)
        assert torch.equal(ops.gated_activation_backward(grad, hv, act), grad_h)
    assert torch.equal(ops.gated_activation_backward(noncontig(grad), noncontig(h), act), grad_h)
    assert torch.equal(ops.gated_activation_backward(g_off, h_off, act), grad_h)
    expanded = grad[:1].expand(M, F_)  # stride 0
    assert torch.equal(ops.gated_activation_backward(expanded, h, act),
                       ops.gated_activation_backward(expanded.contiguous(), h, act))


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty(dtype):
    for act in ALL_ACTS:
        out = ops.gated_activation(torch.empty(0, 72, dtype=dtype, device=DEV), act)
        assert out.shape == (0, 36) and out.dtype == dtype and out.is_cuda
        gh = ops.gated_activation_backward(torch.empty(0, 36, dtype=dtype, device=DEV),
                                           torch.empty(0, 72, dtype=dtype, device=DEV), act)
        assert gh.shape == (0, 72) and gh.dtype == dtype and gh.is_cuda
        out = ops.gated_activation(torch.empty(4, 0, dtype=dtype, device=DEV), act)
        assert out.shape == (4, 0)
        gh = ops.gated_activation_backward(torch.empty(4, 0, dtype=dtype, device=DEV),
                                           torch.empty(4, 0, dtype=dtype, device=DEV), act)
        assert gh.shape == (4, 0)
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------- NaN and extreme values
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_nan_propagates(kern, dtype, act):
    M, F_ = 6, 40
    h = make_h(M, F_, dtype, seed=7)
    grad = make_grad(M, F_, dtype, seed=8)
    nan_gate = [(0, 0), (2, 7), (5, 39)]
    nan_up = [(1, 3), (2, 8), (4, 39)]
    for r, c in nan_gate:
        h[r, c] = float("nan")
    for r, c in nan_up:
        h[r, F_ + c] = float("nan")
    out = kern.gated_activation(h, act)
    expect_nan = torch.zeros(M, F_, dtype=torch.bool)
    for r, c in nan_gate + nan_up:
        expect_nan[r, c] = True
    assert torch.equal(out.isnan(), expect_nan)
    assert_close_ref(out, ref_forward(h, act), dtype, fwd_scale(h), equal_nan=True)
    grad_h = kern.gated_activation_backward(grad, h, act)
    for r, c in nan_gate:
        assert grad_h[r, c].isnan() and grad_h[r, F_ + c].isnan()
    for r, c in nan_up:  # d_up = grad * act(gate) does not read up
        assert grad_h[r, c].isnan() and not grad_h[r, F_ + c].isnan()
    assert int(grad_h.isnan().sum()) == 2 * len(nan_gate) + len(nan_up)
    assert_close_ref(grad_h, ref_backward(grad, h, act), dtype, bwd_scale(grad, h), equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_large_values(kern, dtype, act):
    big = [100.0, -100.0, 1e4, -1e4, 30.0, -30.0, 88.0, -88.0, 90.0, -90.0, 0.0, -0.0]
    gate = torch.tensor(big, dtype=torch.float64).to(dtype)
    F_ = gate.numel()
    h = torch.cat([gate, torch.ones(F_, dtype=dtype)]).reshape(1, 2 * F_).repeat(3, 1)
    h[1, F_:] = -2.5
    h[2, F_:] = torch.linspace(-3, 3, F_, dtype=torch.float64).to(dtype)
    grad = torch.ones(3, F_, dtype=dtype)
    out = kern.gated_activation(h, act)
    grad_h = kern.gated_activation_backward(grad, h, act)
    assert torch.isfinite(out).all() and torch.isfinite(grad_h).all()
    assert_close_ref(out, ref_forward(h, act), dtype, fwd_scale(h))
    assert_close_ref(grad_h, ref_backward(grad, h, act), dtype, bwd_scale(grad, h))
    g64 = gate.double()
    row, d_gate = out[0].double(), grad_h[0, :F_].double()
    pos, neg = g64 >= 30, g64 <= -30
    torch.testing.assert_close(row[pos], g64[pos], **TOL[dtype])          # act(x) = x for large x
    assert (row[neg].abs() <= 1e-6).all()                                   # and ~0 for large negative x
    torch.testing.assert_close(d_gate[pos], torch.ones_like(d_gate[pos]), **TOL[dtype])
    assert (d_gate[neg].abs() <= 1e-6).all()
    assert_matches_cpu(out, ops.gated_activation(h, act), dtype, ref_forward(h, act), fwd_scale(h))
    assert_matches_cpu(grad_h, ops.gated_activation_backward(grad, h, act), dtype, ref_backward(grad, h, act),
                       bwd_scale(grad, h))


# ------------------------------------------------------------------------------------- errors, devices
@gpu_only
def test_errors():
    h = torch.randn(3, 8, device=DEV)
    with pytest.raises(RuntimeError, match=r'^moe_ext\.gated_activation: activation must be "silu", "gelu", '
                                           r'"gelu_tanh" or "swigluoai", got "relu"'):
        ops.gated_activation(h, "relu")
    with pytest.raises(RuntimeError, match=r"^moe_ext\.gated_activation: h must be \[M, 2F\] .*whose last dim is odd"):
        ops.gated_activation(torch.randn(3, 5, device=DEV))
    with pytest.raises(RuntimeError, match=r"^moe_ext\.gated_activation: h must be 2-D"):
        ops.gated_activation(torch.randn(2, 3, 8, device=DEV))
    with pytest.raises(RuntimeError, match=r"^moe_ext\.gated_activation: h must be float32, float16, bfloat16 or "
                                           r"float64, got Long"):
        ops.gated_activation(torch.ones(3, 8, dtype=torch.long, device=DEV))
    with pytest.raises(RuntimeError, match=r"^moe_ext\.gated_activation_backward: grad\.size\(1\) must equal "
                                           r"h\.size\(1\) / 2 \(F\) = 4, got shape \[3, 5\]"):
        ops.gated_activation_backward(torch.randn(3, 5, device=DEV), h)
    with pytest.raises(RuntimeError, match=r"^moe_ext\.gated_activation_backward: grad must have the dtype of h"):
        ops.gated_activation_backward(torch.randn(3, 4, device=DEV, dtype=torch.float64), h)
    with pytest.raises(RuntimeError, match=r"^moe_ext\.gated_activation_backward: grad must be on h's device"):
        ops.gated_activation_backward(torch.randn(3, 4), h)


# ------------------------------------------------------------------------------ determinism, host sync
@gpu_only
def test_deterministic():
    h = make_h(5000, 1000, torch.bfloat16, seed=9).to(DEV)
    grad = make_grad(5000, 1000, torch.bfloat16, seed=10).to(DEV)
    for act in ALL_ACTS:
        assert torch.equal(ops.gated_activation(h, act), ops.gated_activation(h, act))
        assert torch.equal(ops.gated_activation_backward(grad, h, act), ops.gated_activation_backward(grad, h, act))
    h32 = make_h(70000, 8, torch.float32, seed=11).to(DEV)
    assert torch.equal(ops.gated_activation(h32, "gelu"), ops.gated_activation(h32, "gelu"))


@gpu_only
def test_no_host_sync():
    h = make_h(1024, 256, torch.bfloat16).to(DEV)
    grad = make_grad(1024, 256, torch.bfloat16).to(DEV)
    h64 = make_h(33, 37, torch.float64).to(DEV)
    hr = make_h(64, 128, torch.float32).to(DEV).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for act in ALL_ACTS:
            ops.gated_activation(h, act)
            ops.gated_activation_backward(grad, h, act)
        ops.gated_activation(h64, "gelu")
        ops.gated_activation_backward(torch.ones(33, 37, dtype=torch.float64, device=DEV), h64, "gelu_tanh")
        ops.gated_activation(h[:0])
        y = apply_activation(hr, "silu")
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ CUDA graphs
@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_capture_replay(dtype):
    M, F_ = 2048, 352
    h = make_h(M, F_, dtype, seed=12).to(DEV)
    grad = make_grad(M, F_, dtype, seed=13).to(DEV)

    def step():
        return ops.gated_activation(h, "silu"), ops.gated_activation_backward(grad, h, "silu")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, grad_h = step()
    for seed in range(3):
        h.copy_(make_h(M, F_, dtype, seed=100 + seed).to(DEV))
        grad.copy_(make_grad(M, F_, dtype, seed=200 + seed).to(DEV))
        g.replay()
        torch.cuda.synchronize()
        eager_out, eager_grad_h = step()
        assert torch.equal(out, eager_out)
        assert torch.equal(grad_h, eager_grad_h)
        assert_close_ref(out, ref_forward(h, "silu"), dtype, fwd_scale(h))


# --------------------------------------------------------------------------- autograd, compile, opcheck
@gpu_only
@pytest.mark.parametrize("act", ALL_ACTS)
def test_apply_activation_gradcheck(act):
    h = torch.randn(2, 3, 10, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: apply_activation(x, act), (h,))


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_apply_activation_matches_ops(dtype):
    h = make_h(12, 36, dtype).reshape(3, 4, 72).to(DEV)
    grad = make_grad(12, 36, dtype).to(DEV)
    hr = h.clone().requires_grad_()
    y = apply_activation(hr, "gelu_tanh")
    assert y.shape == (3, 4, 36) and y.is_cuda
    assert torch.equal(y.detach().reshape(12, 36), ops.gated_activation(h.reshape(12, 72), "gelu_tanh"))
    y.backward(grad.reshape(3, 4, 36))
    assert torch.equal(hr.grad.reshape(12, 72), ops.gated_activation_backward(grad, h.reshape(12, 72), "gelu_tanh"))


@gpu_only
def test_compile_aot_eager():
    torch._dynamo.reset()
    fn = torch.compile(lambda x: apply_activation(x, "silu"), fullgraph=True, backend="aot_eager")
    h = torch.randn(2, 5, 48, device=DEV)
    hc, he = h.clone().requires_grad_(), h.clone().requires_grad_()
    y, ye = fn(hc), apply_activation(he, "silu")
    assert torch.equal(y, ye)
    g = torch.randn(2, 5, 24, device=DEV)
    y.backward(g)
    ye.backward(g)
    assert torch.equal(hc.grad, he.grad)
    assert_close_ref(y.reshape(10, 24), ref_forward(h.reshape(10, 48), "silu"), torch.float32,
                     fwd_scale(h.reshape(10, 48)))


@gpu_only
def test_opcheck():
    # Autograd lives in moe_ext/functional.py (autograd.Function), not on the ops, so
    # test_autograd_registration does not apply.
    T = 32
    cases = [
        (ops.gated_activation.default, (torch.randn(T, 72, device=DEV), "silu"), {}),
        (ops.gated_activation.default, (torch.randn(T, 74, device=DEV, dtype=torch.bfloat16), "gelu_tanh"), {}),
        (ops.gated_activation_backward.default,
         (torch.randn(T, 36, device=DEV), torch.randn(T, 72, device=DEV), "gelu"), {}),
        (ops.gated_activation.default, (torch.randn(T, 74, device=DEV, dtype=torch.float16) * 8, "swigluoai"), {}),
        (ops.gated_activation_backward.default,
         (torch.randn(T, 36, device=DEV), torch.randn(T, 72, device=DEV) * 8, "swigluoai"), {}),
    ]
    for op, args, kwargs in cases:
        utils = ["test_schema"]
        if has_fake_kernel(op, args, kwargs):
            utils += ["test_faketensor", "test_aot_dispatch_dynamic"]
        torch.library.opcheck(op, args, kwargs, test_utils=utils)
