"""The float64 reference and the tolerance rules of the gated activation tests (test_activation.py on the
CPU, test_cuda_activation.py on the GPU and under the CUDA emulation).

h = [gate | up] is [M, 2F]; forward act(gate) * up -> [M, F]; backward d_gate = grad * up * act'(gate),
d_up = grad * act(gate). The reference is torch's own activation in float64 (torch.autograd for the
gradient). "swigluoai" (GPT-OSS) interleaves gate and up (columns 2j, 2j + 1) and clamps them:
gc * sigmoid(1.702 gc) * (uc + 1), gc = min(gate, 7), uc = clamp(up, -7, 7); its reference is written out,
backward included, with torch 2.14's clamp gradient (none at a limit itself, nor at NaN). fp32 kernels are limited by their exp / erf (CPU: polynomial exp and Abramowitz-Stegun erf,
~1e-7; GPU: expf / erff), fp64 by libm, 16-bit by one rounding of an fp32 value.
"""
import torch
import torch.nn.functional as F

from conftest import TOL

ACTS = ["silu", "gelu", "gelu_tanh"]  # act(gate) * up over [gate | up]
ALL_ACTS = ACTS + ["swigluoai"]
REF_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}
MIN_NORMAL_EXP = {torch.float16: -14, torch.bfloat16: -126}


def _f64(t):
    return t.detach().cpu().double()


def split(h, act):
    """(gate, up) views of h [..., 2F]."""
    return (h[..., ::2], h[..., 1::2]) if act == "swigluoai" else h.chunk(2, -1)


def join(g, u, act):
    """[..., 2F] from gate and up parts [..., F] laid out as h."""
    return torch.stack([g, u], -1).flatten(-2) if act == "swigluoai" else torch.cat([g, u], -1)


OAI_ALPHA, OAI_LIMIT = 1.702, 7.0


def _oai_parts(g, u):
    """GPT-OSS: gc * sigmoid(alpha gc), its derivative in gc, and uc + 1."""
    gc = g.clamp(max=OAI_LIMIT)
    s = torch.sigmoid(OAI_ALPHA * gc)
    return gc * s, s * (1 + OAI_ALPHA * gc * (1 - s)), u.clamp(-OAI_LIMIT, OAI_LIMIT) + 1


def ref_forward(h, act):
    """The activation in float64 on the host."""
    g, u = split(_f64(h), act)
    if act == "swigluoai":
        value, _, up = _oai_parts(g, u)
        return value * up
    return REF_ACT[act](g) * u


def ref_backward(grad, h, act):
    """d act(h) / dh . grad in float64: [M, 2F] on the host (torch.autograd, or written out for swigluoai)."""
    if act == "swigluoai":
        g, u = split(_f64(h), act)
        gr = _f64(grad)
        value, dvalue, up = _oai_parts(g, u)
        zero = torch.zeros_like(g)
        return join(torch.where(g < OAI_LIMIT, gr * up * dvalue, zero),
                    torch.where((u > -OAI_LIMIT) & (u < OAI_LIMIT), gr * value, zero), act)
    h64 = _f64(h).requires_grad_()
    g, u = split(h64, act)
    (gh,) = torch.autograd.grad(REF_ACT[act](g) * u, h64, _f64(grad))
    return gh


def make_oai_limits(dtype):
    """h [4, 32] and grad [4, 16] for swigluoai at and around its limits: row 0 gates 7, 7.5, 100, -100, 6.96875
    and NaN; row 1 ups 7, -7, 7.5, -7.5, 100, -100, 6.96875 and NaN; row 2 a NaN gate and up; row 3 gates 7,
    7.5 and 100 with the same up (equal outputs)."""
    h = make_h(4, 16, dtype, seed=13)
    for j, v in enumerate([7.0, 7.5, 100.0, -100.0, 6.96875, float("nan")]):
        h[0, 2 * j] = v
    for j, v in enumerate([7.0, -7.0, 7.5, -7.5, 100.0, -100.0, 6.96875, float("nan")]):
        h[1, 2 * j + 1] = v
    h[2, 6], h[2, 7] = float("nan"), float("nan")
    h[3, 0:6] = torch.tensor([7.0, 0.5, 7.5, 0.5, 100.0, 0.5], dtype=torch.float64).to(dtype)
    return h, make_grad(4, 16, dtype, seed=14)


def check_oai_limits(h, out, grad_h):
    """What make_oai_limits' rows must give, beyond the reference (see test_swigluoai_limits_and_nan)."""
    assert torch.equal(out.isnan(), h[:, ::2].isnan() | h[:, 1::2].isnan())
    d_gate, d_up = grad_h[:, ::2].double(), grad_h[:, 1::2].double()
    assert (d_gate[0, :3] == 0).all() and d_gate[0, 4] != 0 and d_gate[0, 5] == 0 and d_up[0, 5].isnan()
    assert (d_up[1, :6] == 0).all() and d_up[1, 6] != 0 and d_up[1, 7] == 0 and d_gate[1, 7].isnan()
    assert d_gate[2, 3] == 0 and d_up[2, 3] == 0
    assert out[3, 0] == out[3, 1] == out[3, 2]


def make_h(M, F_, dtype, seed=0, scale=3.0):
    """h [M, 2F] on the host."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(M, 2 * F_, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_grad(M, F_, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(M, F_, generator=gen, dtype=torch.float64).to(dtype)


def _magnitudes(h, act):
    """|gate| and |up| as the maths sees them (GPT-OSS: clamped, up + 1)."""
    g, u = split(_f64(h), act)
    if act == "swigluoai":
        return g.clamp(max=OAI_LIMIT).abs(), (u.clamp(-OAI_LIMIT, OAI_LIMIT) + 1).abs()
    return g.abs(), u.abs()


def fwd_scale(h, act="silu"):
    """|gate * up| per output element: the fp32 maths' absolute error (A-S erf: 1.5e-7, the tanh through
    1 - 2 / (1 + exp(2u)): an ulp of 1) is that much times |gate * up| / 2."""
    g, u = _magnitudes(h, act)
    return g * u


def bwd_scale(grad, h, act="silu"):
    """The same for [d_gate | d_up] (laid out as h): |grad * up| (1 + |gate|) and |grad * gate|."""
    g, u = _magnitudes(h, act)
    gr = _f64(grad).abs()
    return join(gr * u * (1 + g), gr * g, act)


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
