"""The handwritten CUDA kernels against the CPU kernels over random arguments (hypothesis, derandomized).

test_cuda_routing.py and test_cuda_activation.py pick each kernel path on purpose; these draw the
arguments together instead: expert counts on both sides of every warp-kernel boundary (32, 64, 128, 256,
512 experts) and past them, every k from 1 to E, each dtype, each score function and order, group-limited
selection (groups of 32 take the register-slot stage, other sizes the staged one), the selection bias,
routed scaling, and logits with many exact ties, infinities and NaN. permute, unpermute, their
backwards and capacity_reroute get random ids with drops, max_rows, odd widths and misaligned rows. The
gated activations get random widths (vectorised or not), every dtype and activation, misaligned inputs and
values across GPT-OSS's clamp limits.
They run through the `kern` fixture: under the CUDA emulation here, on the GPU where one is visible.
Each comparison expects what test_cuda_routing.py expects (bit-identical routing, lse and backward
within tolerance).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import moe_ext  # noqa: F401  (registers torch.ops.moe_ext)
from activation_ref import (ALL_ACTS, assert_close_ref, assert_matches_cpu, bwd_scale, fwd_scale, make_grad, make_h,
                            ref_backward, ref_forward)
from test_cuda_routing import TOL, _assert_gating_equal

ops = torch.ops.moe_ext
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Both sides of each warp kernel's limit (NPL = 1, 2, 4, 8, 16 slots per lane) and the generic kernel.
EXPERTS = [1, 2, 3, 7, 31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 160, 255, 256, 257, 384, 511, 512, 513, 777]

_EXAMPLES = int(os.environ.get("MOE_EXT_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=_EXAMPLES, derandomize="MOE_EXT_FUZZ_EXAMPLES" not in os.environ, deadline=None,
                database=None, suppress_health_check=list(HealthCheck))


@st.composite
def gating_args(draw):
    E = draw(st.sampled_from(EXPERTS))
    T = draw(st.integers(0, 40))
    dtype = draw(st.sampled_from(DTYPES))
    mode = draw(st.sampled_from(["softmax_topk", "topk_softmax", "sigmoid"]))
    score, order = ("sigmoid", "softmax_topk") if mode == "sigmoid" else ("softmax", mode)
    kw = dict(score_func=score, order=order, renormalize=draw(st.booleans()),
              routed_scaling=draw(st.sampled_from([1.0, 2.5, 0.125])))
    groups = [g for g in range(2, min(E, 64) + 1) if E % g == 0]
    if groups and draw(st.booleans()):
        g = draw(st.sampled_from(groups))
        kw.update(num_groups=g, topk_groups=draw(st.integers(1, g)),
                  group_score=draw(st.sampled_from(["top2_sum", "max"])))
        k = draw(st.integers(1, kw["topk_groups"] * (E // g)))
    else:
        k = draw(st.integers(1, E))
    if draw(st.booleans()):
        kw["expert_bias"] = draw(st.sampled_from([torch.float32, dtype]))
    values = draw(st.sampled_from(["normal", "ties", "special"]))
    return T, E, k, dtype, kw, values, draw(st.integers(0, 2**31 - 1))


def _logits(T, E, dtype, values, seed):
    g = torch.Generator().manual_seed(seed)
    if values == "ties":  # few distinct values: ties within tokens and within groups
        return (torch.randint(-3, 4, (T, E), generator=g) * 0.5).to(dtype)
    lg = torch.randn(T, E, generator=g) * 2
    if values == "special" and T * E:
        pick = torch.randint(0, T * E, (max(1, T * E // 10),), generator=g)
        lg.view(-1)[pick] = torch.tensor([float("inf"), -float("inf"), float("nan")])[
            torch.randint(0, 3, pick.shape, generator=g)]
    return lg.to(dtype)


@given(gating_args())
@FUZZ
def test_gating_fuzz(kern, args):
    T, E, k, dtype, kw, values, seed = args
    logits = _logits(T, E, dtype, values, seed)
    if "expert_bias" in kw:
        bias = torch.randn(E, generator=torch.Generator().manual_seed(seed + 1)) * 0.2
        kw["expert_bias"] = bias.to(kw["expert_bias"])
    cpu = ops.topk_gating(logits, k, **kw)
    dev = kern.topk_gating(logits, k, **kw)
    assert ((dev[1] >= 0) & (dev[1] < E)).all()
    _assert_gating_equal(cpu, dev, dtype)
    if values == "special" or T == 0:
        return
    # The backward of the chosen weights, the score sums and lse
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed + 2)
    gw, gss, glse = torch.randn(T, k, generator=g), torch.randn(E, generator=g), torch.randn(T, generator=g)
    args = (gw.to(acc), gss.to(acc), glse.to(acc), logits, cpu[1], kw["score_func"], kw["order"], kw["renormalize"],
            kw["routed_scaling"])
    ref = ops.topk_gating_backward(*args)
    out = kern.topk_gating_backward(*args)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@st.composite
def routed_rows(draw):
    T, E = draw(st.integers(0, 24)), draw(st.sampled_from([1, 2, 5, 8, 33]))
    k = draw(st.integers(1, min(E, 6)))
    H = draw(st.sampled_from([1, 3, 8, 72, 130]))
    dtype = draw(st.sampled_from(DTYPES))
    drop = draw(st.sampled_from([0.0, 0.3, 1.0]))
    max_rows = draw(st.sampled_from([-1, 0, 1, 7, T * k]))
    return T, E, k, H, dtype, drop, max_rows, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@given(routed_rows())
@FUZZ
def test_permute_unpermute_fuzz(kern, args):
    T, E, k, H, dtype, drop, max_rows, misaligned, seed = args
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32) if T else \
        torch.empty(0, k, dtype=torch.int32)
    ids = torch.where(torch.rand(ids.shape, generator=g) < drop, torch.full_like(ids, -1), ids)
    x = torch.randn(T, H, generator=g).to(dtype)
    want = ops.permute(x, ids, E, max_rows)
    got = kern.permute(x, ids, E, max_rows, misaligned=misaligned)
    for name, a, b in zip(("x_sorted", "expert_offsets", "row_map"), got, want):
        assert torch.equal(a, b), name
    x_sorted, _, row_map = want
    y_sorted = torch.randn(x_sorted.shape, generator=g).to(dtype)
    weights = torch.rand(T, k, generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32)
    for w in (weights, None):
        want_y = ops.unpermute(y_sorted, row_map, w)
        got_y = kern.unpermute(y_sorted, row_map, w, misaligned=misaligned)
        torch.testing.assert_close(got_y, want_y, rtol=0, atol=0)  # the same summation order
    grad_y = torch.randn(T, H, generator=g).to(dtype)
    want_b = ops.unpermute_backward(grad_y, y_sorted, row_map, weights)
    got_b = kern.unpermute_backward(grad_y, y_sorted, row_map, weights)
    for name, a, b in zip(("grad_y_sorted", "grad_weights"), got_b, want_b):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{name}: {m}")


@st.composite
def reroute_args(draw):
    T, E = draw(st.integers(0, 30)), draw(st.sampled_from([1, 2, 3, 5, 8, 33]))
    k = draw(st.integers(1, min(E, 6)))
    # Up to the mean load T * k / E: some expert overflows in most draws, so slots move.
    return T, E, k, draw(st.integers(0, max(1, T * k // E))), draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@given(reroute_args())
@FUZZ
def test_capacity_reroute_fuzz(kern, args):
    T, E, k, capacity, ties, seed = args
    g = torch.Generator().manual_seed(seed)
    keys = (torch.randint(-2, 3, (T, E), generator=g).float() if ties else torch.randn(T, E, generator=g))
    ids = ops.topk_gating(keys, k)[1]
    ids = torch.where(torch.rand(ids.shape, generator=g) < 0.1, torch.full_like(ids, -1), ids)
    assert torch.equal(kern.capacity_reroute(ids, keys, capacity), ops.capacity_reroute(ids, keys, capacity))


@st.composite
def grouped_problems(draw):
    E = draw(st.integers(1, 9))
    counts = draw(st.lists(st.sampled_from([0, 0, 1, 3, 8, 17, 64, 130]), min_size=E, max_size=E))
    K, N = (draw(st.sampled_from([1, 8, 24, 33, 72, 128, 136])) for _ in range(2))
    return (E, counts, K, N, draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64])),
            draw(st.booleans()), draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))


@given(grouped_problems())
@FUZZ
def test_grouped_gemm_fuzz(kern, args):
    """Forward (nn and nt, with and without bias) and the weight gradient, within the accuracy bound of
    test_cuda_grouped_gemm.py (twice torch's own error in the dtype, plus a slack)."""
    from test_cuda_grouped_gemm import assert_accurate, make_offsets, ref_forward, ref_wgrad
    E, counts, K, N, dtype, trans_b, with_bias, misaligned, seed = args
    g = torch.Generator().manual_seed(seed)
    offs = make_offsets(torch.tensor(counts, dtype=torch.int64))
    M = int(offs[-1])
    a = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(E, N, K, generator=g).to(dtype) if trans_b else torch.randn(E, K, N, generator=g).to(dtype)
    bias = torch.randn(E, N, generator=g).to(dtype) if with_bias else None
    ref = torch.float64 if dtype == torch.float64 else torch.float32
    out = kern.grouped_gemm(a, b, offs, trans_b, bias, misaligned=misaligned)
    assert out.shape == (M, N)
    if M:
            assert_accurate(out, ref_forward(a, b, offs, trans_b, bias, dtype=ref),
                        ref_forward(a, b, offs, trans_b, bias, dtype=dtype), dtype)
    y = torch.randn(M, N, generator=g).to(dtype)
    w = kern.grouped_gemm_wgrad(a, y, offs, misaligned=misaligned)
    assert w.shape == (E, K, N)
    assert_accurate(w, ref_wgrad(a, y, offs, dtype=ref), ref_wgrad(a, y, offs, dtype=dtype), dtype)


@given(st.integers(0, 70), st.integers(0, 70), st.sampled_from(DTYPES), st.sampled_from(ALL_ACTS), st.booleans(),
       st.sampled_from([1.0, 3.0, 8.0]), st.integers(0, 2**31 - 1))
@FUZZ
def test_gated_activation_fuzz(kern, M, F_, dtype, act, misaligned, scale, seed):
    """act over [M, 2F] forward and backward: the device kernel against the CPU kernel and the float64
    reference (scale 8 puts many swigluoai inputs past its clamp limits, and some exactly on them in 16-bit)."""
    h = make_h(M, F_, dtype, seed=seed, scale=scale)
    grad = make_grad(M, F_, dtype, seed=seed + 1)
    out = kern.gated_activation(h, act, misaligned=misaligned)
    grad_h = kern.gated_activation_backward(grad, h, act)
    ref, ref_b = ref_forward(h, act), ref_backward(grad, h, act)
    assert_close_ref(out, ref, dtype, fwd_scale(h, act))
    assert_close_ref(grad_h, ref_b, dtype, bwd_scale(grad, h, act))
    assert_matches_cpu(out, ops.gated_activation(h, act), dtype, ref, fwd_scale(h, act))
    assert_matches_cpu(grad_h, ops.gated_activation_backward(grad, h, act), dtype, ref_b, bwd_scale(grad, h, act))


@given(st.sampled_from(["permute", "unpermute", "unpermute_backward", "capacity_reroute", "topk_gating_backward"]),
       st.integers(1, 12), st.sampled_from([2, 5, 33]), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 2**31 - 1))
@FUZZ
def test_out_of_range_indices_are_skipped(kern, op, T, E, k, n_bad, seed):
    """The CPU ops refuse an expert id or row out of range; the CUDA kernels, which never read index
    values on the host, must neither crash nor touch memory out of bounds (the emulation faults on a read
    past a buffer and reports a write next to one). They treat such an entry as dropped, as the CPU does
    -1 (topk_gating_backward: that token's gradient row is unspecified, NaN or not; the other rows exact)."""
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    ids = ops.topk_gating(logits, k)[1]
    x = torch.randn(T, 8, generator=g)
    x_sorted, _, row_map = ops.permute(x, ids, E)
    R = x_sorted.shape[0]
    w = torch.rand(T, k, generator=g)
    pos = torch.randint(0, T * k, (n_bad,), generator=g)
    if op in ("permute", "capacity_reroute", "topk_gating_backward"):
        bad, clean = ids.clone(), ids.clone()
        bad.view(-1)[pos] = torch.tensor([E, E + 1, -2, 2**31 - 1], dtype=ids.dtype)[
            torch.randint(0, 4, (n_bad,), generator=g)]
        clean.view(-1)[pos] = -1
    else:
        bad, clean = row_map.clone(), row_map.clone()
        bad.view(-1)[pos] = torch.tensor([R, R + 1, -2, 2**40])[torch.randint(0, 4, (n_bad,), generator=g)]
        clean.view(-1)[pos] = -1
    if op == "permute":
        for a, b in zip(kern.permute(x, bad, E), ops.permute(x, clean, E)):
            assert torch.equal(a, b)
    elif op == "capacity_reroute":
        assert torch.equal(kern.capacity_reroute(bad, logits, 1), ops.capacity_reroute(clean, logits, 1))
    elif op == "unpermute":
        assert torch.equal(kern.unpermute(x_sorted, bad, w), ops.unpermute(x_sorted, clean, w))
    elif op == "unpermute_backward":
        gy = torch.randn(T, 8, generator=g)
        for a, b in zip(kern.unpermute_backward(gy, x_sorted, bad, w), ops.unpermute_backward(gy, x_sorted, clean, w)):
            torch.testing.assert_close(a, b, **TOL[torch.float32])
    else:
        gw = torch.randn(T, k, generator=g)
        out = kern.topk_gating_backward(gw, None, None, logits, bad, "softmax", "softmax_topk", True, 1.0)
        ok = (bad == clean).all(1)
        ref = ops.topk_gating_backward(gw[ok], None, None, logits[ok], ids[ok], "softmax", "softmax_topk", True, 1.0)
        assert out.shape == logits.shape
        torch.testing.assert_close(out[ok], ref, **TOL[torch.float32])


@pytest.mark.parametrize("op", ["unpermute", "unpermute_backward"])
def test_out_of_range_rows_many_tokens(kern, op):
    """As above with 4100 tokens: unpermute's one-warp-per-row kernel (fewer tokens take the sliced one)."""
    T, E, k = 4100, 5, 2
    g = torch.Generator().manual_seed(0)
    ids = ops.topk_gating(torch.randn(T, E, generator=g), k)[1]
    x = torch.randn(T, 8, generator=g)
    x_sorted, _, row_map = ops.permute(x, ids, E)
    R = x_sorted.shape[0]
    w = torch.rand(T, k, generator=g)
    bad, clean = row_map.clone(), row_map.clone()
    pos = torch.tensor([0, 7, 4099 * k + 1, 5000])
    bad.view(-1)[pos] = torch.tensor([R, R + 1, 2**40, -2])
    clean.view(-1)[pos] = -1
    if op == "unpermute":
        assert torch.equal(kern.unpermute(x_sorted, bad, w), ops.unpermute(x_sorted, clean, w))
    else:
        gy = torch.randn(T, 8, generator=g)
        for a, b in zip(kern.unpermute_backward(gy, x_sorted, bad, w), ops.unpermute_backward(gy, x_sorted, clean, w)):
            torch.testing.assert_close(a, b, **TOL[torch.float32])
