"""The float64 reference and the tolerance rules of the gated activation tests (test_activation.py on the
CPU, test_cuda_activation.py on the GPU and under the CUDA emulation).

h = [gate | up] is [M, 2F]; forward act(gate) * up -> [M, F]; backward d_gate = grad * up * act'(gate),
d_up = grad * act(gate). The reference is torch's own activation in float64 (torch.autograd for the
gradient). fp32 kernels are limited by their exp / erf (CPU: polynomial exp and Abramowitz-Stegun erf,
~1e-7; GPU: expf / erff), fp64 by libm, 16-bit by one rounding of an fp32 value.
"""
import torch
import torch.nn.functional as F

from conftest import TOL

ACTS = ["silu", "gelu", "gelu_tanh"]
REF_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}
MIN_NORMAL_EXP = {torch.float16: -14, torch.bfloat16: -126}


def _f64(t):
    return t.detach().cpu().double()


def ref_forward(h, act):
    """act(gate) * up in float64 on the host."""
    g, u = _f64(h).chunk(2, -1)
    return REF_ACT[act](g) * u


def ref_backward(grad, h, act):
    """d(act(gate) * up)/dh . grad through torch.autograd in float64: [M, 2F] on the host."""
    h64 = _f64(h).requires_grad_()
    g, u = h64.chunk(2, -1)
    (gh,) = torch.autograd.grad(REF_ACT[act](g) * u, h64, _f64(grad))
    return gh


def make_h(M, F_, dtype, seed=0, scale=3.0):
    """h [M, 2F] on the host."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(M, 2 * F_, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_grad(M, F_, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(M, F_, generator=gen, dtype=torch.float64).to(dtype)


def fwd_scale(h):
    """|gate * up| per output element: the fp32 maths' absolute error (A-S erf: 1.5e-7, the tanh through
    1 - 2 / (1 + exp(2u)): an ulp of 1) is that much times |gate * up| / 2."""
    g, u = _f64(h).chunk(2, -1)
    return (g * u).abs()


def bwd_scale(grad, h):
    """The same for [d_gate | d_up]: |grad * up| (1 + |gate|) and |grad * gate|."""
    g, u = _f64(h).chunk(2, -1)
    gr = _f64(grad)
    return torch.cat([(gr * u).abs() * (1 + g.abs()), (gr * g).abs()], -1)


def half_ulp(ref, dtype):
    """Half the spacing of `dtype` at each value of ref (float64): the error of one rounding."""
    _, e = torch.frexp(ref)
    e = torch.clamp(e.to(torch.float64) - 1, min=MIN_NORMAL_EXP[dtype])
    return 0.5 * torch.pow(2.0, e - MANTISSA_BITS[dtype])


def fp32_bound(ref, scale):
    """|err| allowed for an fp32 value: 1e-5 |ref| + 1e-6 (1 + scale) (scale: fwd_scale / bwd_scale)."""
    return 1e-5 * ref.abs() + 1e-6 * (1 + (torch.zeros_like(ref) if scale is None else scale))


def assert_close_ref(out, ref, dtype, scale=None, equal_nan=False):
    """out (any device, dtype) against the float64 reference.

    fp64: atol 1e-12, rtol 1e-10. fp32: within fp32_bound. 16-bit: the fp32 value rounded once, within half
    an ulp plus fp32_bound, and within conftest's TOL."""
    assert out.dtype == dtype and tuple(out.shape) == tuple(ref.shape)
    o = _f64(out)
    if dtype == torch.float64:
        torch.testing.assert_close(o, ref, atol=1e-12, rtol=1e-10, equal_nan=equal_nan)
        return
    if equal_nan:
        assert torch.equal(o.isnan(), ref.isnan())
        keep = ~ref.isnan()
    else:
        assert not o.isnan().any()
        keep = torch.ones_like(o, dtype=torch.bool)
    allowed = fp32_bound(ref, scale)
    if dtype != torch.float32:
        allowed = allowed + half_ulp(ref, dtype)
        torch.testing.assert_close(o, ref, **TOL[dtype], equal_nan=equal_nan)
    err = (o - ref).abs()[keep]
    bad = err > allowed[keep]
    assert not bad.any(), (f"{int(bad.sum())} of {err.numel()} elements off: worst error {err.max().item():.3g}, "
                           f"worst error / allowed {(err / allowed[keep]).max().item():.3g}")


def assert_matches_cpu(out_dev, out_cpu, dtype, ref, scale):
    """The CUDA kernel's output (on any device: the GPU's, or the emulation's) and the CPU kernel's agree:
    fp64 to libm's accuracy; fp32 within twice the reference bound of assert_close_ref (expf / erff and a
    2-ulp division on the device, the polynomial exp / A-S erf on the host); 16-bit within that
    plus one output ulp (both round an fp32 value once)."""
    assert out_dev.dtype == out_cpu.dtype == dtype and out_dev.shape == out_cpu.shape
    g, c = out_dev.cpu().double(), out_cpu.double()
    assert torch.equal(g.isnan(), c.isnan())
    if dtype == torch.float64:
        torch.testing.assert_close(g, c, atol=1e-12, rtol=1e-10, equal_nan=True)
        return
    allowed = 2 * fp32_bound(ref, scale)
    if dtype != torch.float32:
        allowed = allowed + 2 * half_ulp(ref, dtype)
    keep = ~c.isnan()
    err = (g - c).abs()[keep]
    bad = err > allowed[keep]
    assert not bad.any(), f"{int(bad.sum())} of {err.numel()} elements differ, worst {err.max().item():.3g}"
