"""CUDA grouped GEMM (torch.ops.moe_ext.grouped_gemm / grouped_gemm_wgrad) against an fp32 reference.

Covers the three forms (forward NN, forward NT = trans_b, wgrad TN), bias,
group sizes uniform / Zipf-skewed / all on one expert / most experts empty, rows outside the offsets,
sizes that are and are not multiples of 8 (CUTLASS path and the CUDA-core fallback), fp32 and fp64,
sync-debug "error" mode, CUDA-graph capture and replay with new group sizes, and opcheck.
Accuracy rule (flash-attention's): the kernel's error against the fp32 reference is at most twice the
error of per-expert torch.matmul in the same dtype, plus a small absolute slack.

The tests that take `kern` (tests/kernel_backends.py) check the handwritten kernels of
gemm/grouped_gemm_aux.cu (the CUDA-core GEMM, the prologue and the empty-expert zeroing) on the GPU
where one is visible and under the CUDA emulation on every machine; the rest (CUTLASS) only on a GPU.
"""
import contextlib
import math
import zlib

import pytest
import torch

import moe_ext

import kernel_backends
from conftest import gpu_only, poison_cuda_allocator

ops = torch.ops.moe_ext
DEV = "cuda"
ATOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4, torch.float64: 1e-10}


# ---------------------------------------------------------------------------------------------- inputs
def group_sizes(kind, rows, E, gen):
    """Rows per expert summing to `rows`."""
    if kind == "uniform":
        counts = torch.full((E,), rows // E, dtype=torch.int64)
        counts[: rows % E] += 1
    elif kind == "zipf":
        w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        w = w[torch.randperm(E, generator=gen)]
        counts = torch.bincount(torch.multinomial(w, rows, replacement=True, generator=gen), minlength=E)
    elif kind == "one":
        counts = torch.zeros(E, dtype=torch.int64)
        counts[E // 2] = rows
    elif kind == "most_empty":
        counts = torch.zeros(E, dtype=torch.int64)
        live = torch.randperm(E, generator=gen)[: min(3, E)]
        counts[live] = rows // len(live)
        counts[live[0]] += rows - counts.sum()
    else:
        raise ValueError(kind)
    assert int(counts.sum()) == rows
    return counts


def make_offsets(counts, front=0):
    """Host offsets [E+1] starting at `front` (rows before it belong to no expert)."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]) + front


def randn(*shape, dtype, gen, scale=1.0, device=DEV):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype).to(device)


# ------------------------------------------------------------------------------------------ reference
def ref_forward(a, b, offs_host, trans_b, bias=None, dtype=torch.float32):
    """Per-expert torch.matmul in `dtype` (fp32: the reference; a, b's dtype: torch's own error)."""
    M = a.shape[0]
    E = b.shape[0]
    N = b.shape[1] if trans_b else b.shape[2]
    out = torch.zeros(M, N, device=a.device, dtype=dtype)
    for e in range(E):
        lo, hi = int(offs_host[e]), int(offs_host[e + 1])
        if hi == lo:
            continue
        be = b[e].to(dtype)
        be = be.t() if trans_b else be
        r = a[lo:hi].to(dtype) @ be
        if bias is not None:
            r = r + bias[e].to(dtype)
        out[lo:hi] = r
    return out


def ref_wgrad(x, y, offs_host, dtype=torch.float32):
    E = offs_host.numel() - 1
    out = torch.zeros(E, x.shape[1], y.shape[1], device=x.device, dtype=dtype)
    for e in range(E):
        lo, hi = int(offs_host[e]), int(offs_host[e + 1])
        if hi > lo:
            out[e] = x[lo:hi].to(dtype).t() @ y[lo:hi].to(dtype)
    return out


def assert_accurate(out, ref32, out_torch, dtype):
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), "non-finite values in the output"
    err = (out.double() - ref32.double()).abs().max().item()
    err_torch = (out_torch.double() - ref32.double()).abs().max().item()
    tol = 2 * err_torch + ATOL[dtype] * max(1.0, ref32.abs().max().item())
    assert err <= tol, f"max abs error {err:.3g} > 2 x torch's {err_torch:.3g} + slack (tol {tol:.3g})"


# ------------------------------------------------------------------------------------------- forward
FWD_SHAPES = [  # (M, E, K, N)
    (256, 4, 128, 256),
    (1000, 16, 72, 40),     # not multiples of 128
    (3000, 8, 200, 136),
    (517, 5, 33, 17),       # not multiples of 8: CUDA-core fallback for 16-bit
    (4096, 64, 256, 384),
]


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["uniform", "zipf", "one", "most_empty"])
@pytest.mark.parametrize("shape", FWD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("trans_b", [False, True], ids=["nn", "nt"])
def test_forward(dtype, kind, shape, trans_b):
    M, E, K, N = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((M, E, K, N, kind, trans_b)).encode()))
    front, back = 3, 5  # rows outside [offsets[0], offsets[E]) must come out zero
    counts = group_sizes(kind, M - front - back, E, gen)
    offs_host = make_offsets(counts, front)
    a = randn(M, K, dtype=dtype, gen=gen)
    b = randn(E, N, K, dtype=dtype, gen=gen, scale=K ** -0.5) if trans_b else randn(E, K, N, dtype=dtype, gen=gen, scale=K ** -0.5)
    poison_cuda_allocator()
    out = ops.grouped_gemm(a, b, offs_host.to(DEV), trans_b)
    ref = ref_forward(a, b, offs_host, trans_b)
    assert_accurate(out, ref, ref_forward(a, b, offs_host, trans_b, dtype=dtype), dtype)
    assert (out[:front] == 0).all() and (out[M - back:] == 0).all()


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("trans_b", [False, True], ids=["nn", "nt"])
@pytest.mark.parametrize("shape", [(777, 8, 128, 264), (300, 6, 40, 9)], ids=["aligned", "fallback"])
def test_forward_bias(dtype, trans_b, shape):
    M, E, K, N = shape
    gen = torch.Generator().manual_seed(7)
    counts = group_sizes("zipf", M - 10, E, gen)
    counts[1] = 0  # an empty expert between non-empty ones
    counts[0] += M - 10 - counts.sum()
    offs_host = make_offsets(counts, 4)
    a = randn(M, K, dtype=dtype, gen=gen)
    b = randn(E, N, K, dtype=dtype, gen=gen, scale=K ** -0.5) if trans_b else randn(E, K, N, dtype=dtype, gen=gen, scale=K ** -0.5)
    bias = randn(E, N, dtype=dtype, gen=gen)
    poison_cuda_allocator()
    out = ops.grouped_gemm(a, b, offs_host.to(DEV), trans_b, bias)
    ref = ref_forward(a, b, offs_host, trans_b, bias)
    assert_accurate(out, ref, ref_forward(a, b, offs_host, trans_b, bias, dtype=dtype), dtype)
    assert (out[:4] == 0).all() and (out[M - 6:] == 0).all()


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_large(dtype):
    """M = 65536 rows over E = 256 experts, Zipf-skewed, K/N not multiples of 128."""
    M, E, K, N = 65536, 256, 200, 328
    gen = torch.Generator().manual_seed(3)
    offs_host = make_offsets(group_sizes("zipf", M, E, gen))
    a = randn(M, K, dtype=dtype, gen=gen)
    b = randn(E, K, N, dtype=dtype, gen=gen, scale=K ** -0.5)
    out = ops.grouped_gemm(a, b, offs_host.to(DEV), False)
    assert_accurate(out, ref_forward(a, b, offs_host, False), ref_forward(a, b, offs_host, False, dtype=dtype), dtype)


@gpu_only
def test_forward_edge_cases():
    gen = torch.Generator().manual_seed(11)
    E, K, N = 4, 64, 32
    b = randn(E, K, N, dtype=torch.bfloat16, gen=gen)
    bias = randn(E, N, dtype=torch.bfloat16, gen=gen)
    # all rows outside the experts
    a = randn(10, K, dtype=torch.bfloat16, gen=gen)
    offs = torch.full((E + 1,), 4, dtype=torch.int64)
    poison_cuda_allocator()
    assert (ops.grouped_gemm(a, b, offs.to(DEV)) == 0).all()
    # no rows
    assert ops.grouped_gemm(a[:0], b, torch.zeros(E + 1, dtype=torch.int64, device=DEV)).shape == (0, N)
    # K = 0: bias rows (or zeros)
    a0 = torch.empty(6, 0, dtype=torch.bfloat16, device=DEV)
    b0 = torch.empty(E, 0, N, dtype=torch.bfloat16, device=DEV)
    offs = torch.tensor([0, 2, 2, 5, 6], device=DEV)
    out = ops.grouped_gemm(a0, b0, offs, False, bias)
    expect = bias[torch.tensor([0, 0, 2, 2, 2, 3], device=DEV)]
    assert torch.equal(out, expect)
    assert (ops.grouped_gemm(a0, b0, offs) == 0).all()


@gpu_only
def test_forward_fp64_and_noncontiguous():
    gen = torch.Generator().manual_seed(5)
    M, E, K, N = 200, 3, 24, 16
    offs_host = make_offsets(group_sizes("zipf", M, E, gen))
    a = randn(M, K, dtype=torch.float64, gen=gen)
    b = randn(E, K, N, dtype=torch.float64, gen=gen)
    out = ops.grouped_gemm(a, b, offs_host.to(DEV))
    torch.testing.assert_close(out, ref_forward(a, b, offs_host, False, dtype=torch.float64))
    # a transposed view of b: the op makes it contiguous
    a16 = randn(M, K, dtype=torch.bfloat16, gen=gen)
    bt = randn(E, N, K, dtype=torch.bfloat16, gen=gen).transpose(1, 2)  # [E, K, N], non-contiguous
    out = ops.grouped_gemm(a16, bt, offs_host.to(DEV))
    assert_accurate(out, ref_forward(a16, bt, offs_host, False), ref_forward(a16, bt, offs_host, False, dtype=torch.bfloat16), torch.bfloat16)


# --------------------------------------------------------------------------------------------- wgrad
WGRAD_SHAPES = [  # (M, E, P, Q)
    (256, 4, 128, 256),
    (1000, 16, 72, 40),
    (517, 5, 33, 17),      # fallback
    (8192, 32, 256, 136),
]


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["uniform", "zipf", "one", "most_empty"])
@pytest.mark.parametrize("shape", WGRAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_wgrad(dtype, kind, shape):
    M, E, P, Q = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((M, E, P, Q, kind)).encode()))
    counts = group_sizes(kind, M - 7, E, gen)
    offs_host = make_offsets(counts, 2)  # rows outside the experts do not contribute
    x = randn(M, P, dtype=dtype, gen=gen)
    y = randn(M, Q, dtype=dtype, gen=gen, scale=1.0 / math.sqrt(max(1, M // E)))
    poison_cuda_allocator()
    out = ops.grouped_gemm_wgrad(x, y, offs_host.to(DEV))
    assert out.shape == (E, P, Q)
    ref = ref_wgrad(x, y, offs_host)
    assert_accurate(out, ref, ref_wgrad(x, y, offs_host, dtype=dtype), dtype)
    empty = (counts == 0).nonzero().flatten().tolist()
    for e in empty:
        assert (out[e] == 0).all(), f"expert {e} has no rows, its gradient must be zero"


@gpu_only
def test_wgrad_large_many_empty():
    M, E, P, Q = 65536, 256, 128, 96
    gen = torch.Generator().manual_seed(9)
    counts = group_sizes("zipf", M, E, gen)
    counts[::3] = 0
    counts[1] += M - counts.sum()
    offs_host = make_offsets(counts)
    x = randn(M, P, dtype=torch.bfloat16, gen=gen)
    y = randn(M, Q, dtype=torch.bfloat16, gen=gen, scale=0.05)
    poison_cuda_allocator()
    out = ops.grouped_gemm_wgrad(x, y, offs_host.to(DEV))
    assert_accurate(out, ref_wgrad(x, y, offs_host), ref_wgrad(x, y, offs_host, dtype=torch.bfloat16), torch.bfloat16)
    assert (out[::3][counts[::3] == 0] == 0).all()


@gpu_only
def test_wgrad_no_rows():
    x = torch.empty(0, 16, dtype=torch.bfloat16, device=DEV)
    y = torch.empty(0, 8, dtype=torch.bfloat16, device=DEV)
    poison_cuda_allocator()
    out = ops.grouped_gemm_wgrad(x, y, torch.zeros(5, dtype=torch.int64, device=DEV))
    assert out.shape == (4, 16, 8) and (out == 0).all()


# ------------------------------------------------------------------------------------------ fp32 / TF32
@contextlib.contextmanager
def allow_tf32(on, api="allow_tf32"):
    """TF32 for CUDA matmuls on/off through torch's legacy flag, its fp32_precision API, or the float32
    matmul precision ("high" / "highest")."""
    m = torch.backends.cuda.matmul
    if api == "allow_tf32":
        old, restore = m.allow_tf32, lambda v: setattr(m, "allow_tf32", v)
        m.allow_tf32 = on
    elif api == "fp32_precision":
        old, restore = m.fp32_precision, lambda v: setattr(m, "fp32_precision", v)
        m.fp32_precision = "tf32" if on else "ieee"
    else:
        old, restore = torch.get_float32_matmul_precision(), torch.set_float32_matmul_precision
        torch.set_float32_matmul_precision("high" if on else "highest")
    try:
        yield
    finally:
        restore(old)


def tf32_kernel_for_this_device():
    """Whether this build has a TF32 grouped GEMM that runs on the current device (grouped_gemm.md)."""
    info = moe_ext.build_info()
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) == (9, 0):
        return info["grouped_gemm"]["tf32_sm90"]
    return major == 8 and info["grouped_gemm"]["tf32_sm80"] and any(
        a[0] == "8" and int(a[1]) <= minor for a in info["cuda_archs"])


def run_form(form, a, b, offs):
    if form == "wgrad":
        return ops.grouped_gemm_wgrad(a, b, offs)
    return ops.grouped_gemm(a, b, offs, form == "nt")


def abs_reference(form, a, b, offs_host):
    """float64 result and sum_k |a||b| per output element (what rounding the inputs can move it by)."""
    if form == "wgrad":
        return ref_wgrad(a, b, offs_host, torch.float64), ref_wgrad(a.abs(), b.abs(), offs_host, torch.float64)
    nt = form == "nt"
    return (ref_forward(a, b, offs_host, nt, dtype=torch.float64),
            ref_forward(a.abs(), b.abs(), offs_host, nt, dtype=torch.float64))


TF32_SHAPES = [(1000, 16, 72, 40), (3000, 8, 200, 136), (4096, 64, 256, 384), (300, 6, 36, 20)]  # K, N % 4 == 0


@gpu_only
@pytest.mark.parametrize("shape", TF32_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("form", ["nn", "nt", "wgrad"])
def test_fp32_runs_as_tf32_when_torch_allows_it(shape, form):
    """fp32 takes the TF32 tensor-core kernel exactly when torch.backends.cuda.matmul.allow_tf32 is on.
    TF32 keeps 10 mantissa bits (CUTLASS rounds to them), so each product may be off by about 2^-10 of
    |a||b|; the bound allows twice that, plus fp32 accumulation."""
    if not tf32_kernel_for_this_device():
        pytest.skip("this build has no TF32 grouped GEMM for this device (fp32 runs exact)")
    M, E, K, N = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, form, "tf32")).encode()))
    counts = group_sizes("zipf", M, E, gen)
    offs_host = make_offsets(counts)
    offs = offs_host.to(DEV)
    a = randn(M, K, dtype=torch.float32, gen=gen)
    if form == "wgrad":
        b = randn(M, N, dtype=torch.float32, gen=gen)
        depth = counts.max().item()
    else:
        b = randn(E, *((N, K) if form == "nt" else (K, N)), dtype=torch.float32, gen=gen, scale=K ** -0.5)
        depth = K
    with allow_tf32(False):
        exact = run_form(form, a, b, offs)
    poison_cuda_allocator()
    with allow_tf32(True):
        fast = run_form(form, a, b, offs)
    ref, mag = abs_reference(form, a, b, offs_host)
    bound = (2.0 ** -9 + depth * 2.0 ** -23) * mag + 1e-30
    assert torch.isfinite(fast).all()
    assert ((fast.double() - ref).abs() <= bound).all(), \
        f"TF32 error {(fast.double() - ref).abs().max().item():.3g} beyond the bound"
    assert ((exact.double() - ref).abs() <= depth * 2.0 ** -22 * mag + 1e-30).all()  # exact fp32 stays exact
    # Random fp32 data has low mantissa bits set: the TF32 kernel really ran.
    assert not torch.equal(fast, exact)


@gpu_only
@pytest.mark.parametrize("api", ["fp32_precision", "matmul_precision"])
def test_fp32_follows_every_tf32_api(api):
    """torch's newer fp32_precision API and set_float32_matmul_precision switch TF32 on and off too (the
    legacy flag throws once the two APIs are mixed; the op must not)."""
    gen = torch.Generator().manual_seed(11)
    offs = make_offsets(group_sizes("uniform", 300, 6, gen)).to(DEV)
    a = randn(300, 72, dtype=torch.float32, gen=gen)
    b = randn(6, 72, 40, dtype=torch.float32, gen=gen)
    with allow_tf32(False, api):
        exact = ops.grouped_gemm(a, b, offs)
    with allow_tf32(True, api):
        fast = ops.grouped_gemm(a, b, offs)
    with allow_tf32(False, api):
        assert torch.equal(ops.grouped_gemm(a, b, offs), exact)
    assert torch.equal(fast, exact) != tf32_kernel_for_this_device()


@gpu_only
@pytest.mark.parametrize("form", ["nn", "nt", "wgrad"])
def test_fp32_misaligned_stays_exact_with_tf32_allowed(form):
    """Rows that break 16-byte alignment (K = 33, N = 17) take the exact CUDA-core kernel either way."""
    M, E, K, N = 517, 5, 33, 17
    gen = torch.Generator().manual_seed(7)
    offs = make_offsets(group_sizes("uniform", M, E, gen)).to(DEV)
    a = randn(M, K, dtype=torch.float32, gen=gen)
    b = randn(M, N, dtype=torch.float32, gen=gen) if form == "wgrad" else \
        randn(E, *((N, K) if form == "nt" else (K, N)), dtype=torch.float32, gen=gen)
    with allow_tf32(False):
        exact = run_form(form, a, b, offs)
    with allow_tf32(True):
        assert torch.equal(run_form(form, a, b, offs), exact)


# ---------------------------------------------------------------------- backward built from the forms
@gpu_only
@pytest.mark.parametrize("trans_b", [False, True], ids=["nn", "nt"])
def test_backward_forms_match_autograd(trans_b):
    """dgrad = grouped_gemm with trans_b flipped, wgrad = grouped_gemm_wgrad (b's layout)."""
    gen = torch.Generator().manual_seed(21)
    M, E, K, N = 640, 8, 128, 192
    offs_host = make_offsets(group_sizes("zipf", M, E, gen))
    offs = offs_host.to(DEV)
    a = randn(M, K, dtype=torch.bfloat16, gen=gen)
    b = randn(E, N, K, dtype=torch.bfloat16, gen=gen) if trans_b else randn(E, K, N, dtype=torch.bfloat16, gen=gen)
    dc = randn(M, N, dtype=torch.bfloat16, gen=gen)
    da = ops.grouped_gemm(dc, b, offs, not trans_b)
    db = ops.grouped_gemm_wgrad(dc, a, offs) if trans_b else ops.grouped_gemm_wgrad(a, dc, offs)
    a32, b32 = a.float().requires_grad_(), b.float().requires_grad_()
    ref = ref_forward(a32, b32, offs_host, trans_b)
    ref.backward(dc.float())
    da_t = ref_forward(dc, b, offs_host, not trans_b, dtype=torch.bfloat16)
    assert_accurate(da, a32.grad, da_t, torch.bfloat16)
    db_t = ref_wgrad(dc, a, offs_host, torch.bfloat16) if trans_b else ref_wgrad(a, dc, offs_host, torch.bfloat16)
    assert_accurate(db, b32.grad, db_t, torch.bfloat16)


# ------------------------------------------------------------------------------------ sm_90a tiles
def sm90_gemm_built():
    return torch.cuda.get_device_capability() == (9, 0) and moe_ext.build_info()["grouped_gemm"]["sm90"]


needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or not sm90_gemm_built(),
                                reason="needs an sm_90 GPU and a build with the sm_90a grouped GEMM")


@contextlib.contextmanager
def sm90_tile(tile):
    previous = moe_ext.set_sm90_gemm_tile(tile)
    try:
        yield
    finally:
        moe_ext.set_sm90_gemm_tile(previous)


TILE_SHAPES = [  # (M, E, K, N): rows per expert not a multiple of 128 (odd M tiles under the 2x1
    (3000, 8, 200, 136),     # cluster), N below and not a multiple of the 256-wide tile
    (2600, 3, 264, 520),
    (256, 4, 128, 256),      # small: in the sanitizer selection
]


@gpu_only
@needs_sm90
@pytest.mark.parametrize("tile", ["128x128", "128x256"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["uniform", "zipf", "one", "most_empty"])
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("form", ["nn", "nt_bias", "wgrad"])
def test_sm90_tile(tile, dtype, kind, shape, form):
    """Each sm_90a tile, forced, on every form: ragged experts, empty experts, rows outside them."""
    M, E, K, N = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((M, E, K, N, kind, form, str(dtype))).encode()))
    front, back = 3, 5
    counts = group_sizes(kind, M - front - back, E, gen)
    offs_host = make_offsets(counts, front)
    a = randn(M, K, dtype=dtype, gen=gen)
    with sm90_tile(tile):
        if form == "wgrad":
            y = randn(M, N, dtype=dtype, gen=gen, scale=1.0 / math.sqrt(max(1, M // E)))
            poison_cuda_allocator()
            out = ops.grouped_gemm_wgrad(a, y, offs_host.to(DEV))
            assert_accurate(out, ref_wgrad(a, y, offs_host), ref_wgrad(a, y, offs_host, dtype=dtype), dtype)
            for e in (counts == 0).nonzero().flatten().tolist():
                assert (out[e] == 0).all(), f"expert {e} has no rows, its gradient must be zero"
            return
        trans_b = form == "nt_bias"
        b = randn(E, N, K, dtype=dtype, gen=gen, scale=K ** -0.5) if trans_b else \
            randn(E, K, N, dtype=dtype, gen=gen, scale=K ** -0.5)
        bias = randn(E, N, dtype=dtype, gen=gen) if trans_b else None
        poison_cuda_allocator()
        out = ops.grouped_gemm(a, b, offs_host.to(DEV), trans_b, bias)
    ref = ref_forward(a, b, offs_host, trans_b, bias)
    assert_accurate(out, ref, ref_forward(a, b, offs_host, trans_b, bias, dtype=dtype), dtype)
    assert (out[:front] == 0).all() and (out[M - back:] == 0).all()


def gemm_tile_launched(fn):
    """The N extent of the sm_90a tile of the grouped GEMM kernel `fn` launched: 128 or 256."""
    fn()
    name = moe_ext._C.last_grouped_gemm_kernel()
    assert name.startswith("sm90_"), f"expected an sm_90a CUTLASS kernel, got {name!r}"
    return 256 if name.endswith("_t256") else 128


WIDE_MIN_ROWS = 256  # grouped_gemm_cuda.cpp kWideTileMinRowsPerExpert


@gpu_only
@needs_sm90
def test_sm90_auto_tile_choice():
    """auto: 128x256 when experts average >= WIDE_MIN_ROWS rows and the problem has >= 2 such tiles
    per SM; 128x128 otherwise. Both choices give the same answer as the forced tiles."""
    gen = torch.Generator().manual_seed(61)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    E, K = 8, 256
    over, under = WIDE_MIN_ROWS + 44, WIDE_MIN_ROWS - 6
    m_tiles = math.ceil(over / 128)
    N = 256 * math.ceil(2 * sms / (E * m_tiles))   # >= 2 wide tiles per SM at `over` rows per expert
    cases = [(over * E, "wide"), (under * E, f"narrow: < {WIDE_MIN_ROWS} rows per expert")]
    for M, why in cases:
        offs = make_offsets(group_sizes("uniform", M, E, gen)).to(DEV)
        a = randn(M, K, dtype=torch.bfloat16, gen=gen)
        b = randn(E, K, N, dtype=torch.bfloat16, gen=gen, scale=K ** -0.5)
        with sm90_tile("auto"):
            tile = gemm_tile_launched(lambda: ops.grouped_gemm(a, b, offs))
            out = ops.grouped_gemm(a, b, offs)
        assert tile == (256 if why == "wide" else 128), f"M={M}: expected {why}, launched 128x{tile}"
        with sm90_tile(f"128x{tile}"):
            assert torch.equal(ops.grouped_gemm(a, b, offs), out)
    # many rows per expert but too few wide tiles to fill the GPU twice: the 128x128 tile
    M, N = over * 2, 256
    offs = make_offsets(group_sizes("uniform", M, 2, gen)).to(DEV)
    a = randn(M, K, dtype=torch.bfloat16, gen=gen)
    b = randn(2, K, N, dtype=torch.bfloat16, gen=gen, scale=K ** -0.5)
    with sm90_tile("auto"):
        assert gemm_tile_launched(lambda: ops.grouped_gemm(a, b, offs)) == 128
    with sm90_tile("128x256"):  # forced, whatever the size
        assert gemm_tile_launched(lambda: ops.grouped_gemm(a, b, offs)) == 256
    # wgrad: the tiles cover out[e] [P, Q]; the rows per expert are its depth
    M, P, Q = over * E, 2048, 1024   # 8 x 16 x 4 = 512 wide tiles
    offs = make_offsets(group_sizes("uniform", M, E, gen)).to(DEV)
    x = randn(M, P, dtype=torch.bfloat16, gen=gen)
    y = randn(M, Q, dtype=torch.bfloat16, gen=gen)
    with sm90_tile("auto"):
        assert gemm_tile_launched(lambda: ops.grouped_gemm_wgrad(x, y, offs)) == 256
        n = under * E  # fewer than WIDE_MIN_ROWS rows per expert on average
        assert gemm_tile_launched(lambda: ops.grouped_gemm_wgrad(x[:n], y[:n], offs.clamp(max=n))) == 128


# ------------------------------------------------ the handwritten kernels, on the GPU and emulated
# What CUTLASS does not take: fp64, and 16-bit rows or data off 16-byte alignment. With these shapes
# (K or N not a multiple of 8, or data one element off) a GPU runs the CUDA-core kernels too, so both
# back ends run the same code. (M, E, K, N); for wgrad (M, E, P, Q).
SIMT_SHAPES = [(517, 5, 33, 17), (300, 6, 40, 9), (64, 3, 7, 130), (90, 9, 16, 24), (40, 70, 24, 8)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
@pytest.mark.parametrize("kind", ["zipf", "one", "most_empty"])
@pytest.mark.parametrize("shape", SIMT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("form", ["nn", "nt_bias", "wgrad"])
def test_cuda_core_kernels(kern, dtype, kind, shape, form):
    M, E, K, N = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, kind, form, str(dtype))).encode()))
    front, back = 3, 5  # rows outside [offsets[0], offsets[E]): zero in the forward, ignored by wgrad
    counts = group_sizes(kind, M - front - back, E, gen)
    offs = make_offsets(counts, front)
    elem = torch.empty((), dtype=dtype).element_size()
    misaligned = dtype != torch.float64 and (K * elem) % 16 == 0 and (N * elem) % 16 == 0
    a = randn(M, K, dtype=dtype, gen=gen, device="cpu")
    if form == "wgrad":
        y = randn(M, N, dtype=dtype, gen=gen, scale=M ** -0.5, device="cpu")
        out = kern.grouped_gemm_wgrad(a, y, offs, misaligned=misaligned)
        assert out.shape == (E, K, N)
        assert_accurate(out, ref_wgrad(a, y, offs, dtype=torch.float64), ref_wgrad(a, y, offs, dtype=dtype), dtype)
        assert (out[counts == 0] == 0).all(), "experts without rows have a zero gradient"
        return
    trans_b = form == "nt_bias"
    b = randn(E, *((N, K) if trans_b else (K, N)), dtype=dtype, gen=gen, scale=K ** -0.5, device="cpu")
    bias = randn(E, N, dtype=dtype, gen=gen, device="cpu") if trans_b else None
    out = kern.grouped_gemm(a, b, offs, trans_b, bias, misaligned=misaligned)
    assert_accurate(out, ref_forward(a, b, offs, trans_b, bias, dtype=torch.float64),
                    ref_forward(a, b, offs, trans_b, bias, dtype=dtype), dtype)
    assert (out[:front] == 0).all() and (out[M - back:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_cuda_core_edge_cases(kern, dtype):
    gen = torch.Generator().manual_seed(11)
    E, K, N = 4, 20, 12
    b = randn(E, K, N, dtype=dtype, gen=gen, device="cpu")
    bias = randn(E, N, dtype=dtype, gen=gen, device="cpu")
    a = randn(10, K, dtype=dtype, gen=gen, device="cpu")
    # every row outside the experts: zeros, with or without bias
    outside = torch.full((E + 1,), 4, dtype=torch.int64)
    assert (kern.grouped_gemm(a, b, outside) == 0).all()
    assert (kern.grouped_gemm(a, b, outside, False, bias) == 0).all()
    # no rows; no experts
    assert kern.grouped_gemm(a[:0], b, torch.zeros(E + 1, dtype=torch.int64)).shape == (0, N)
    assert (kern.grouped_gemm(a, b[:0], torch.zeros(1, dtype=torch.int64)) == 0).all()
    # K = 0: the bias rows of each row's expert (the prologue kernel alone), or zeros
    a0, b0 = a[:6, :0], b[:, :0]
    offs = torch.tensor([0, 2, 2, 5, 6])
    assert torch.equal(kern.grouped_gemm(a0, b0, offs, False, bias), bias[torch.tensor([0, 0, 2, 2, 2, 3])])
    assert (kern.grouped_gemm(a0, b0, offs) == 0).all()
    # wgrad: no rows (zeros), and an expert with no rows between others
    y = randn(10, N, dtype=dtype, gen=gen, device="cpu")
    assert (kern.grouped_gemm_wgrad(a[:0], y[:0], torch.zeros(E + 1, dtype=torch.int64)) == 0).all()
    offs = torch.tensor([0, 3, 3, 10, 10])
    out = kern.grouped_gemm_wgrad(a, y, offs)
    assert (out[1] == 0).all() and (out[3] == 0).all()
    assert_accurate(out, ref_wgrad(a, y, offs, dtype=torch.float64), ref_wgrad(a, y, offs, dtype=dtype), dtype)


@pytest.mark.emu
def test_bad_offsets_stay_in_bounds_emulated():
    """CUDA cannot check offsets' values without a sync: the kernels clamp each expert's rows to [0, M]
    (an empty range where they decrease), so bad offsets give wrong numbers but never an access out of
    bounds (the emulation's guard bytes and protected pages would fail the call)."""
    emu = kernel_backends.emulated_kernels()
    gen = torch.Generator().manual_seed(12)
    M, E, K, N = 10, 5, 20, 12
    a = randn(M, K, dtype=torch.float64, gen=gen, device="cpu")
    b = randn(E, K, N, dtype=torch.float64, gen=gen, device="cpu")
    bias = randn(E, N, dtype=torch.float64, gen=gen, device="cpu")
    y = randn(M, N, dtype=torch.float64, gen=gen, device="cpu")
    past = torch.tensor([-7, 4, 4, 8, 99, 1 << 40])   # negative, past M: each range clamps to
    clamped = torch.tensor([0, 4, 4, 8, 10, 10])      # these, which stay disjoint
    for trans_b in (False, True):
        bb = b.transpose(1, 2).contiguous() if trans_b else b
        torch.testing.assert_close(emu.grouped_gemm(a, bb, past, trans_b, bias),
                                   ref_forward(a, bb, clamped, trans_b, bias, dtype=torch.float64))
        emu.grouped_gemm(a, bb, torch.tensor([0, 6, 2, 8, 3, 10]), trans_b, bias)  # decreasing: runs in bounds
    torch.testing.assert_close(emu.grouped_gemm_wgrad(a, y, past), ref_wgrad(a, y, clamped, dtype=torch.float64))
    emu.grouped_gemm_wgrad(a, y, torch.tensor([5, 6, 2, 8, -3, 10]))


@pytest.mark.emu
def test_zero_empty_experts_kernel_emulated():
    """The zeroing that follows a CUTLASS wgrad (CUTLASS gets 0x0x0 problems for experts without rows),
    alone: only those experts change, for every element size and unaligned expert sizes. On a GPU,
    test_wgrad checks it behind the CUTLASS kernels."""
    emu = kernel_backends.emulated_kernels()
    offs = torch.tensor([0, 0, 5, 5, 5, 9, 12, 12])  # experts 0, 2, 3, 6 own no rows
    for dtype, (P, Q) in ((torch.float16, (3, 5)), (torch.float32, (8, 16)), (torch.float64, (7, 1)),
                          (torch.bfloat16, (64, 100))):
        out = torch.randn(7, P, Q).to(dtype) + 1
        res = emu.grouped_gemm_zero_empty_experts(out, offs, rows=12)
        empty = torch.tensor([True, False, True, True, False, False, True])
        assert (res[empty] == 0).all() and torch.equal(res[~empty], out[~empty])
        res = emu.grouped_gemm_zero_empty_experts(out, offs, rows=7)  # clamped: experts 5 and 6 are empty too
        empty[5] = True
        assert (res[empty] == 0).all() and torch.equal(res[~empty], out[~empty])


# ----------------------------------------------------------------------- no host sync, CUDA graphs
@gpu_only
def test_no_host_sync():
    gen = torch.Generator().manual_seed(31)
    M, E, K, N = 1024, 16, 128, 256
    offs = make_offsets(group_sizes("zipf", M, E, gen)).to(DEV)
    a = randn(M, K, dtype=torch.bfloat16, gen=gen)
    b = randn(E, K, N, dtype=torch.bfloat16, gen=gen)
    bias = randn(E, N, dtype=torch.bfloat16, gen=gen)
    a32 = a.float()
    b32 = b.float()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        c = ops.grouped_gemm(a, b, offs, False, bias)
        ops.grouped_gemm(c, b, offs, True)
        ops.grouped_gemm_wgrad(a, c, offs)
        ops.grouped_gemm(a32, b32, offs)       # fallback path
        ops.grouped_gemm_wgrad(a32, a32, offs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_capture_replay(dtype):
    gen = torch.Generator().manual_seed(41)
    M, E, K, N = 2048, 8, 128, 256
    a = randn(M, K, dtype=dtype, gen=gen)
    b = randn(E, K, N, dtype=dtype, gen=gen, scale=K ** -0.5)
    offs = make_offsets(group_sizes("uniform", M, E, gen)).to(DEV)
    # warm up outside the capture (workspace allocation, kernel attributes)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            ops.grouped_gemm(a, b, offs)
            ops.grouped_gemm_wgrad(a, a, offs)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        c = ops.grouped_gemm(a, b, offs)
        w = ops.grouped_gemm_wgrad(a, a, offs)
    for kind in ["zipf", "one", "most_empty"]:
        offs_host = make_offsets(group_sizes(kind, M - 16, E, gen), 8)
        offs.copy_(offs_host)   # new group sizes, same graph
        a.copy_(randn(M, K, dtype=dtype, gen=gen))
        g.replay()
        torch.cuda.synchronize()
        assert_accurate(c, ref_forward(a, b, offs_host, False), ref_forward(a, b, offs_host, False, dtype=dtype), dtype)
        assert (c[:8] == 0).all() and (c[M - 8:] == 0).all()
        assert_accurate(w, ref_wgrad(a, a, offs_host), ref_wgrad(a, a, offs_host, dtype=dtype), dtype)


# ------------------------------------------------------------------------------------------- opcheck
@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_opcheck(dtype):
    gen = torch.Generator().manual_seed(51)
    M, E, K, N = 96, 4, 64, 48
    offs = make_offsets(group_sizes("zipf", M, E, gen)).to(DEV)
    a = randn(M, K, dtype=dtype, gen=gen)
    b = randn(E, K, N, dtype=dtype, gen=gen)
    bt = randn(E, N, K, dtype=dtype, gen=gen)
    bias = randn(E, N, dtype=dtype, gen=gen)
    torch.library.opcheck(ops.grouped_gemm.default, (a, b, offs), {"trans_b": False})
    torch.library.opcheck(ops.grouped_gemm.default, (a, bt, offs), {"trans_b": True, "bias": bias})
    torch.library.opcheck(ops.grouped_gemm_wgrad.default, (a, randn(M, N, dtype=dtype, gen=gen), offs))


@gpu_only
def test_errors_match_cpu():
    a = torch.randn(8, 16, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(2, 15, 4, device=DEV, dtype=torch.bfloat16)
    offs = torch.tensor([0, 4, 8], device=DEV)
    with pytest.raises(RuntimeError, match="moe_ext.grouped_gemm: b.size"):
        ops.grouped_gemm(a, b, offs)
    with pytest.raises(RuntimeError, match="expert_offsets must be int64"):
        ops.grouped_gemm_wgrad(a, a, offs.int())
