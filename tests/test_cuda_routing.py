"""The CUDA routing kernels (topk_gating, permute, unpermute and their backwards) against the CPU kernels.

The CPU kernels are the definition. Expert ids, tokens_per_expert, expert_offsets and row maps must be
bit-identical; the routing maths shares common/routing.h and a fixed summation order, so weights,
score_sum and unpermute's output are expected bit-identical too for fp32/fp16/bf16 (see
docs/kernels.md); lse and the backward values within per-dtype tolerance.

The comparisons take the `kern` fixture (tests/kernel_backends.py) and run twice: on the GPU where
one is visible, and on every machine under the CUDA emulation (tests/emu), which also fails a kernel
on an out-of-bounds access, a partial-warp collective or a deadlock, leaves unwritten outputs as
poison, and runs the kernels whose threads share memory under several scheduling orders
(kern.schedules()). The tests of the torch glue itself (strides, empty tensors on the device, no host
sync, graph capture, opcheck, 2^31 offsets) run only on a GPU.
"""
import math

import pytest
import torch

import moe_ext  # noqa: F401  (registers torch.ops.moe_ext)
from conftest import gpu_only, has_fake_kernel

ops = torch.ops.moe_ext
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# value tolerances for quantities that are not bit-identical by design (lse, backward)
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _logits(T, E, dtype, seed=0, scale=2.0):
    return (torch.randn(T, E, generator=_gen(seed)) * scale).to(dtype)


def _gating_both(kern, logits, k, **kw):
    return ops.topk_gating(logits, k, **kw), kern.topk_gating(logits, k, **kw)


def _assert_gating_equal(cpu, dev, dtype):
    w_c, id_c, tpe_c, ss_c, lse_c = cpu
    w_d, id_d, tpe_d, ss_d, lse_d = dev
    assert torch.equal(id_c, id_d), "expert_ids"
    assert torch.equal(tpe_c, tpe_d), "tokens_per_expert"
    if dtype != torch.float64:  # bit-identical by design; NaN where the CPU has NaN
        torch.testing.assert_close(w_d, w_c, rtol=0, atol=0, equal_nan=True, msg="weights")
        torch.testing.assert_close(ss_d, ss_c, rtol=0, atol=0, equal_nan=True, msg="score_sum")
    tol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(w_d, w_c, **tol, equal_nan=True)
    torch.testing.assert_close(ss_d, ss_c, **tol, equal_nan=True)
    torch.testing.assert_close(lse_d, lse_c, **tol, equal_nan=True)


# ---------------------------------------------------------------- topk_gating forward
# E <= 64 / 128 / 256 / 512: the NPL = 2 / 4 / 8 / 16 warp kernels; 600: the generic kernel
@pytest.mark.parametrize("E", [7, 8, 60, 144, 160, 256, 384, 512, 600])
@pytest.mark.parametrize("k", [1, 2, 3, 8, 16, "E"])
@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "sigmoid"])
def test_gating_matches_cpu(kern, E, k, mode):
    k = E if k == "E" else k
    if k > E or (k == E and E > 16):
        pytest.skip("k > E, or k = E only for small E")
    score, order = ("sigmoid", "softmax_topk") if mode == "sigmoid" else ("softmax", mode)
    logits = _logits(67, E, torch.float32, seed=E * 100 + k)
    _assert_gating_equal(*_gating_both(kern, logits, k, score_func=score, order=order, renormalize=k > 1),
                         torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,k", [(8, 2), (64, 8), (160, 6), (256, 8), (512, 16), (1024, 8), (64, 40)])
@pytest.mark.parametrize("T", [16, 300])  # one token block (it writes the final sums), and many
def test_gating_dtypes(kern, dtype, E, k, T):
    logits = _logits(T, E, dtype, seed=E + k)
    for renorm in (True, False):
        _assert_gating_equal(*_gating_both(kern, logits, k, renormalize=renorm, routed_scaling=2.5), dtype)


# E = 32 * groups (groups of 32, one register slot each: 64/2, 128/4, 256/8, 512/16) takes the
# warp-reduction group stage; the others stage keys in shared memory.
@pytest.mark.parametrize("E,groups,topk_groups,k", [(256, 8, 4, 8), (160, 8, 3, 6), (64, 64, 8, 8), (384, 16, 2, 16),
                                                    (64, 2, 1, 4), (128, 4, 2, 6), (512, 16, 3, 12)])
@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("T", [7, 129])  # one token block (writes the final sums itself), and several
@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_gating_bias_and_groups(kern, E, groups, topk_groups, k, score, T, group_score):
    logits = _logits(T, E, torch.float32, seed=E)
    bias = torch.randn(E, generator=_gen(1)) * 0.1
    for _ in kern.schedules():
        _assert_gating_equal(*_gating_both(kern, logits, k, score_func=score, expert_bias=bias, num_groups=groups,
                                           topk_groups=topk_groups, routed_scaling=2.5, group_score=group_score),
                             torch.float32)


def test_gating_bias_dtype_half(kern):
    logits = _logits(50, 128, torch.bfloat16)
    bias = (torch.randn(128, generator=_gen(2)) * 0.1).to(torch.bfloat16)
    _assert_gating_equal(*_gating_both(kern, logits, 8, score_func="sigmoid", expert_bias=bias), torch.bfloat16)


def test_gating_empty_batch(kern):
    w, ids, tpe, ss, lse = kern.topk_gating(torch.empty(0, 64), 4)
    assert w.shape == (0, 4) and ids.shape == (0, 4) and lse.shape == (0,)
    assert torch.equal(tpe, torch.zeros(64, dtype=torch.int32))
    assert torch.equal(ss, torch.zeros(64))


def test_gating_experts_without_tokens(kern):
    logits = torch.full((40, 64), -5.0)
    logits[:, 3] = 5.0
    logits[:, 9] = 4.0
    cpu, dev = _gating_both(kern, logits, 2)
    _assert_gating_equal(cpu, dev, torch.float32)
    assert (dev[2] == 0).sum() == 62


INF, NAN = float("inf"), float("nan")


def _special_rows(T, E, seed):
    """Rows 0-7 with infinite / NaN logits (as torch.logsumexp: -inf, +inf, +inf, +inf, finite, NaN, NaN,
    NaN), rows 8-9 with some NaN."""
    logits = _logits(T, E, torch.float32, seed=seed)
    logits[0] = -INF                               # fully masked token
    logits[1, 3] = INF
    logits[2, ::2] = -INF
    logits[2, 1] = INF
    logits[3, 5] = INF
    logits[3, 7] = INF
    logits[4, 1:] = -INF                           # finite max
    logits[5, 0] = NAN
    logits[5, 2] = INF
    logits[6] = -INF
    logits[6, E - 1] = NAN
    logits[7] = NAN
    logits[8, 1] = NAN
    logits[9, ::3] = NAN
    return logits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [8, 100, 256, 512, 600])
def test_gating_infinite_and_nan_rows(kern, dtype, E):
    """Ids in range and as the CPU's; lse is torch.logsumexp's value (an infinite max, NaN if any NaN)
    on the warp and generic paths; weights NaN where the CPU's are."""
    logits = _special_rows(12, E, seed=E).to(dtype)
    ref = torch.logsumexp(logits.double(), -1)
    for score, order in (("softmax", "softmax_topk"), ("softmax", "topk_softmax"), ("sigmoid", "softmax_topk")):
        cpu, dev = _gating_both(kern, logits, 4, score_func=score, order=order)
        assert ((dev[1] >= 0) & (dev[1] < E)).all()
        for lse in (cpu[4].double(), dev[4].double()):
            assert torch.equal(torch.isnan(lse), torch.isnan(ref))
            inf = torch.isinf(ref)
            assert torch.equal(torch.isinf(lse), inf) and torch.equal(lse[inf], ref[inf])
        _assert_gating_equal(cpu, dev, dtype)
    if E == 256:  # NaN keys in both group stages: groups of 32 (register slots) and of 16 (staged)
        for groups in (8, 16):
            for group_score in ("top2_sum", "max"):
                _assert_gating_equal(*_gating_both(kern, logits, 4, score_func="sigmoid", num_groups=groups,
                                                   topk_groups=2, group_score=group_score), dtype)


# 1e300 and 1e-50 are not representable in float32: refused there (test_gating_routed_scaling_refused_cuda).
@pytest.mark.parametrize("dtype,scaling", [(torch.float32, s) for s in (1.1, 1e-30, 1e30)] +
                         [(torch.float64, s) for s in (1.1, 1e-30, 1e30, 1e300, 1e-50)])
@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "sigmoid"])
def test_gating_routed_scaling_in_compute_type(kern, dtype, scaling, mode):
    """routed_scaling is applied in fp64 for fp64 logits (not rounded to fp32), in fp32 otherwise, and
    the backward never divides by it; forward and backward as the CPU kernels'."""
    score, order = ("sigmoid", "softmax_topk") if mode == "sigmoid" else ("softmax", mode)
    T, E, k = 50, 64, 4
    logits = _logits(T, E, dtype, seed=7)
    cpu, dev = _gating_both(kern, logits, k, score_func=score, order=order, routed_scaling=scaling)
    _assert_gating_equal(cpu, dev, dtype)
    torch.testing.assert_close(dev[0] / scaling, cpu[0] / scaling, **TOL[dtype])
    gw = torch.randn(T, k, generator=_gen(4)).to(dtype)
    for renorm in (True, False):
        args = (gw, None, None, logits, cpu[1], score, order, renorm, scaling)
        ref = ops.topk_gating_backward(*args)
        out = kern.topk_gating_backward(*args)
        assert torch.isfinite(out).all()
        if dtype == torch.float32:
            assert torch.equal(out, ref)
        torch.testing.assert_close(out / scaling, ref / scaling, **TOL[dtype])


@pytest.mark.parametrize("E", [8, 64, 256, 512])
def test_gating_ties_lower_id_wins(kern, E):
    logits = torch.zeros(5, E)
    logits[1, :] = 1.5
    logits[2, E // 2:] = 3.0  # ties in the upper half: its lowest ids win
    logits[3, ::2] = 2.0
    cpu, dev = _gating_both(kern, logits, 4)
    assert torch.equal(dev[1][0], torch.arange(4, dtype=torch.int32))
    assert torch.equal(dev[1][2], torch.arange(E // 2, E // 2 + 4, dtype=torch.int32))
    assert torch.equal(dev[1][3], torch.arange(0, 8, 2, dtype=torch.int32))
    _assert_gating_equal(cpu, dev, torch.float32)
    lb = torch.randint(-3, 3, (64, E), generator=_gen(3)).to(torch.bfloat16)  # many exact ties
    _assert_gating_equal(*_gating_both(kern, lb, 8), torch.bfloat16)
    if E >= 64:  # tied keys and tied group scores, in both group stages (groups of 32, and of 16)
        for groups in (E // 32, E // 16):
            for score, group_score in (("sigmoid", "top2_sum"), ("softmax", "top2_sum"), ("softmax", "max")):
                _assert_gating_equal(*_gating_both(kern, lb, 8, score_func=score, num_groups=groups,
                                                   topk_groups=max(1, groups // 2), group_score=group_score),
                                     torch.bfloat16)


def test_gating_signed_zero_keys_tie(kern):
    # -0 + -0 keeps a -0 key; it ties with +0, so the lower id wins on both back ends
    logits = torch.tensor([[0.0, -0.0, -0.0, 0.0, -1.0, -0.0]] * 3)
    cpu, dev = _gating_both(kern, logits, 3, order="topk_softmax", expert_bias=torch.full((6,), -0.0))
    assert dev[1].tolist() == [[0, 1, 2]] * 3
    _assert_gating_equal(cpu, dev, torch.float32)


def test_gating_many_tokens(kern):
    logits = _logits(20000, 128, torch.bfloat16)
    _assert_gating_equal(*_gating_both(kern, logits, 8), torch.bfloat16)


@gpu_only
def test_gating_routed_scaling_refused_cuda():
    """The shared check: a factor that is inf or 0 in the compute type is refused with the CPU's message."""
    for dtype, scaling, shown in ((torch.bfloat16, 1e300, r"1e\+300"), (torch.float32, 1e-46, "1e-46")):
        name = {torch.bfloat16: "BFloat16", torch.float32: "Float"}[dtype]
        with pytest.raises(RuntimeError, match=rf"topk_gating: routed_scaling must be a positive finite number in "
                                               rf"float32 \(the compute type of {name} logits\), got {shown}"):
            ops.topk_gating(torch.randn(4, 8, device=DEV).to(dtype), 2, routed_scaling=scaling)
    ops.topk_gating(torch.randn(4, 8, device=DEV, dtype=torch.float64), 2, routed_scaling=1e300)


@gpu_only
def test_gating_noncontiguous():
    base = _logits(64, 256, torch.float32)
    cpu = ops.topk_gating(base[::2, ::2].contiguous(), 8)
    gpu = ops.topk_gating(base.to(DEV)[::2, ::2], 8)  # [32, 128], strided
    _assert_gating_equal(cpu, [t.cpu() for t in gpu], torch.float32)


# ---------------------------------------------------------------- topk_gating backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,k", [(8, 2), (60, 4), (256, 8), (512, 16), (800, 8)])
@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "sigmoid"])
def test_gating_backward_matches_cpu(kern, dtype, E, k, mode):
    score, order = ("sigmoid", "softmax_topk") if mode == "sigmoid" else ("softmax", mode)
    T = 70
    logits = _logits(T, E, dtype, seed=E)
    _, ids, *_ = ops.topk_gating(logits, k, score_func=score, order=order)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gw = torch.randn(T, k, generator=_gen(4)).to(acc)
    gss = torch.randn(E, generator=_gen(5)).to(acc)
    glse = torch.randn(T, generator=_gen(6)).to(acc)
    for g_ss, g_lse in ((None, None), (gss, glse), (None, torch.zeros(T, dtype=acc))):
        for renorm in (True, False):
            args = (gw, g_ss, g_lse, logits, ids, score, order, renorm, 1.5)
            ref = ops.topk_gating_backward(*args)
            out = kern.topk_gating_backward(*args)
            assert out.dtype == logits.dtype
            if dtype != torch.float64:
                assert torch.equal(out, ref)
            torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [8, 256, 600])
def test_gating_backward_infinite_rows(kern, dtype, E):
    """Rows with +-inf logits. Sigmoid: finite gradients when the lse gradient is absent or zero (no
    0 * NaN softmax probability), the same bits for both. Both scores: the CPU kernel's values."""
    T = 5
    logits = _special_rows(10, E, seed=E + 1)[:T].to(dtype)  # the rows without NaN
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gw = torch.randn(T, 2, generator=_gen(4)).to(acc)
    gss = torch.randn(E, generator=_gen(5)).to(acc)
    for score in ("sigmoid", "softmax"):
        _, ids, *_ = ops.topk_gating(logits, 2, score_func=score)
        for renorm in (True, False):
            for g_ss in (None, gss):
                outs = []
                for g_lse in (None, torch.zeros(T, dtype=acc)):
                    args = (gw, g_ss, g_lse, logits, ids, score, "softmax_topk", renorm, 1.5)
                    ref = ops.topk_gating_backward(*args)
                    out = kern.topk_gating_backward(*args)
                    if dtype != torch.float64:
                        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
                    torch.testing.assert_close(out, ref, **TOL[dtype], equal_nan=True)
                    outs.append(out)
                if score == "sigmoid":
                    assert torch.isfinite(outs[0].double()).all()
                    assert torch.equal(outs[0], outs[1])


def test_gating_backward_empty(kern):
    out = kern.topk_gating_backward(torch.empty(0, 2), None, None, torch.empty(0, 16),
                                    torch.empty(0, 2, dtype=torch.int32), "softmax", "softmax_topk", True, 1.0)
    assert out.shape == (0, 16)


# ---------------------------------------------------------------- permute
def _ids(T, k, E, dtype=torch.int32, drop=0.0, seed=0):
    g = _gen(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.empty(0, k)
    ids = ids.to(dtype)
    if drop:
        ids[torch.rand(T, k, generator=g) < drop] = -1
    return ids


def _assert_permute_equal(kern, x, ids, E, max_rows=-1, misaligned=False):
    cpu = ops.permute(x, ids, E, max_rows)
    dev = kern.permute(x, ids, E, max_rows, misaligned=misaligned)
    assert torch.equal(cpu[1], dev[1]), "expert_offsets"
    assert torch.equal(cpu[2], dev[2]), "row_map"
    assert torch.equal(cpu[0], dev[0]), "x_sorted"
    return dev


@pytest.mark.parametrize("E", [7, 8, 60, 144, 160, 256, 384, 512, 4000])
@pytest.mark.parametrize("k", [1, 2, 3, 8, 40])  # k > 32: the scatter reads each token's rows from global memory
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_permute_matches_cpu(kern, E, k, id_dtype):
    if k > E:
        pytest.skip("k > E")
    T, H = 333, 72
    x = torch.randn(T, H, generator=_gen(7)).to(torch.bfloat16)
    _assert_permute_equal(kern, x, _ids(T, k, E, id_dtype, drop=0.1, seed=E + k), E)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [1, 7, 64, 1000, 4096])
@pytest.mark.parametrize("misaligned", [False, True])  # one element off 16 bytes: narrower accesses
def test_permute_dtypes_and_alignment(kern, dtype, H, misaligned):
    T, k, E = 65, 2, 16
    x = torch.randn(T, H, generator=_gen(8)).to(dtype)
    _assert_permute_equal(kern, x, _ids(T, k, E), E, misaligned=misaligned)


@pytest.mark.parametrize("max_rows", [0, 1, 50, 127, 128, 129, 1000])
def test_permute_max_rows(kern, max_rows):
    T, k, E = 64, 2, 8
    x = torch.randn(T, 32, generator=_gen(9))
    dev = _assert_permute_equal(kern, x, _ids(T, k, E, drop=0.05), E, max_rows)
    assert (dev[0][int(dev[1][-1]):] == 0).all()


# Up to 4096 slots (and E <= 3072) one block routes them all (permute.cu kBlockSlots); past it, four
# kernels over many blocks. Both sides of both boundaries, with drops and a max_rows cut.
@pytest.mark.parametrize("T,k", [(4096, 1), (4097, 1), (512, 8), (513, 8)])
@pytest.mark.parametrize("E", [7, 256, 3000, 3100])
def test_permute_block_and_grid_routing(kern, T, k, E):
    if k > E:
        pytest.skip("k > E")
    x = torch.randn(T, 40, generator=_gen(15)).to(torch.float16)
    ids = _ids(T, k, E, drop=0.1, seed=T + E)
    for _ in kern.schedules():
        _assert_permute_equal(kern, x, ids, E)
        _assert_permute_equal(kern, x, ids, E, T * k // 3)


@pytest.mark.parametrize("T,max_rows", [(1, -1), (3, -1), (3, 5000), (16, 7)])
def test_permute_few_tokens_wide_rows(kern, T, max_rows):
    # decode: each token's row split over many warps; few tokens zeroing many padding rows, or most
    # slots dropped by max_rows
    k, H, E = 8, 7168, 64
    x = torch.randn(T, H, generator=_gen(14)).to(torch.bfloat16)
    dev = _assert_permute_equal(kern, x, _ids(T, k, E, drop=0.2, seed=T), E, max_rows)
    assert (dev[0][int(dev[1][-1]):] == 0).all()


def test_permute_all_one_expert_and_empty_experts(kern):
    T, k, E = 5000, 1, 64
    x = torch.randn(T, 16, generator=_gen(10))
    _assert_permute_equal(kern, x, torch.full((T, k), 17, dtype=torch.int64), E)
    _assert_permute_equal(kern, x, torch.full((T, k), -1, dtype=torch.int32), E)  # everything dropped


def test_permute_many_chunks(kern):
    T, k, E = 12000, 8, 256  # 96000 slots: hundreds of count/rank chunks
    x = torch.randn(T, 8, generator=_gen(11)).to(torch.float16)
    _assert_permute_equal(kern, x, _ids(T, k, E, drop=0.02), E)


def test_permute_empty_batch(kern):
    x, ids = torch.empty(0, 32), torch.empty(0, 2, dtype=torch.int32)
    xs, off, rm = kern.permute(x, ids, 8)
    assert xs.shape == (0, 32) and rm.shape == (0, 2)
    assert torch.equal(off, torch.zeros(9, dtype=torch.int64))
    xs, off, rm = kern.permute(x, ids, 8, 16)
    assert xs.shape == (16, 32) and (xs == 0).all()


@gpu_only
def test_permute_noncontiguous():
    T, k, E = 100, 4, 32
    xb = torch.randn(T, 128, generator=_gen(12))
    idb = _ids(T, 2 * k, E, torch.int64)
    cpu = ops.permute(xb[:, ::2].contiguous(), idb[:, ::2].contiguous(), E)
    gpu = ops.permute(xb.to(DEV)[:, ::2], idb.to(DEV)[:, ::2], E)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


@gpu_only
def test_permute_int64_offsets():
    """T*k*H passes 2^31: rows at the end of x_sorted must be right (needs ~17 GB of GPU memory)."""
    T, k, H, E = 65536, 8, 7168, 64
    x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    ids = _ids(T, k, E, torch.int32, seed=13)
    _, off_ref, rm_ref = ops.permute(torch.zeros(T, 1), ids, E)
    xs, off, rm = ops.permute(x, ids.to(DEV), E)
    assert torch.equal(off.cpu(), off_ref) and torch.equal(rm.cpu(), rm_ref)
    for t in (T - 1, T - 2, T // 2):
        for j in range(k):
            assert torch.equal(xs[rm_ref[t, j]], x[t])
    last = rm.view(-1).argmax()  # the slot holding the last row
    assert torch.equal(xs[-1], x[last // k])
    w = torch.rand(T, k, device=DEV)
    y = ops.unpermute(xs, rm, w)
    for t in (T - 1, T - 2):
        ref = (w[t].sum() * x[t].float()).to(torch.bfloat16)
        torch.testing.assert_close(y[t], ref, **TOL[torch.bfloat16])
    del xs, y


# ---------------------------------------------------------------- unpermute
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [1, 7, 64, 1000])
@pytest.mark.parametrize("weights", ["none", "fp32", "bf16"])
@pytest.mark.parametrize("T", [77, 4099], ids=["sliced", "rows"])  # the two CUDA kernels (unpermute.cu)
def test_unpermute_matches_cpu(kern, dtype, H, weights, T):
    k, E = 3, 16
    ids = _ids(T, k, E, drop=0.1)
    x = torch.randn(T, H, generator=_gen(14)).to(dtype)
    ys, _, rm = ops.permute(x, ids, E)
    ys = torch.randn(ys.shape, generator=_gen(15)).to(dtype)
    w = None if weights == "none" else torch.rand(T, k, generator=_gen(16)).to(
        torch.float32 if weights == "fp32" else torch.bfloat16)
    ref = ops.unpermute(ys, rm, w)
    for misaligned in (False, True):  # one element off 16 bytes: scalar accesses
        out = kern.unpermute(ys, rm, w, misaligned=misaligned)
        if dtype != torch.float64:
            assert torch.equal(out, ref)
        torch.testing.assert_close(out, ref, **TOL[dtype])

    gy = torch.randn(T, H, generator=_gen(17)).to(dtype)
    gys_ref, gw_ref = ops.unpermute_backward(gy, ys, rm, w)
    gys, gw = kern.unpermute_backward(gy, ys, rm, w)
    assert torch.equal(gys, gys_ref)
    assert gw.shape == gw_ref.shape and gw.dtype == gw_ref.dtype
    if w is not None:
        tol = dict(rtol=1e-4, atol=1e-4 * math.sqrt(H)) if w.dtype == torch.float32 else TOL[torch.bfloat16]
        torch.testing.assert_close(gw, gw_ref, **tol)


def test_unpermute_wide_rows_many_slots(kern):
    T, k, H = 5, 40, 2048  # k > 32: the sliced kernel reads the slots from global memory
    rm = torch.stack([torch.randperm(T * k, generator=_gen(t))[:k] for t in range(T)])
    rm[0, 3] = -1
    ys = torch.randn(T * k, H, generator=_gen(18)).to(torch.bfloat16)
    w = torch.rand(T, k, generator=_gen(19))
    assert torch.equal(kern.unpermute(ys, rm, w), ops.unpermute(ys, rm, w))


def test_unpermute_unreferenced_rows_and_empty(kern):
    T, k, H = 10, 2, 32
    rm = torch.tensor([[0, -1]] * T, dtype=torch.int64)
    rm[:, 0] = torch.arange(T) * 2  # odd rows unreferenced: zeroed, not left as they were
    ys = torch.randn(2 * T + 3, H)
    gy = torch.randn(T, H)
    gys, gw = kern.unpermute_backward(gy, ys, rm, None)
    assert gw.numel() == 0
    ref, _ = ops.unpermute_backward(gy, ys, rm, None)
    assert torch.equal(gys, ref)
    assert (gys[1::2] == 0).all()
    y = kern.unpermute(torch.empty(0, H), torch.empty(0, k, dtype=torch.int64), None)
    assert y.shape == (0, H)


# ---------------------------------------------------------------- whole path
def _router_path(logits, x, k, E):
    w, ids, tpe, ss, lse = ops.topk_gating(logits, k)
    xs, off, rm = ops.permute(x, ids, E)
    y = ops.unpermute(xs * 2, rm, w)
    return y, w, ids, tpe, ss, lse, xs, off, rm


@gpu_only
def test_no_host_sync():
    T, E, k, H = 256, 64, 4, 128
    logits = torch.randn(T, E, device=DEV)
    x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _router_path(logits, x, k, E)
        w, ids, *_ = ops.topk_gating(logits, k, score_func="sigmoid", expert_bias=torch.zeros(E, device=DEV),
                                     num_groups=8, topk_groups=2)
        ops.topk_gating_backward(torch.ones_like(w), None, None, logits, ids, "sigmoid", "softmax_topk", True, 1.0)
        xs, off, rm = ops.permute(x, ids.long(), E, 100)
        ops.unpermute_backward(x, xs, rm, w)
        ops.topk_gating(logits.double(), k)
        ops.topk_gating(torch.randn(8, 1000, device=DEV), k)
        _router_path(logits[:10], x[:10], k, E)  # one token block: the gating kernel writes the sums
        xb = torch.randn(2100, H, device=DEV, dtype=torch.bfloat16)  # 8400 slots: permute's many-block path
        _router_path(torch.randn(2100, E, device=DEV), xb, k, E)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# T=10: one gating block, one permute routing block; T=600: several of each (4800 slots: permute's
# many-block path)
@gpu_only
@pytest.mark.parametrize("T", [10, 600])
def test_cuda_graph_capture(T):
    E, k, H = 64, 8, 256
    logits = torch.randn(T, E, device=DEV)
    x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            _router_path(logits, x, k, E)  # warm up the allocator outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = _router_path(logits, x, k, E)
    for seed in range(3):
        logits.copy_(torch.randn(T, E, generator=_gen(seed)).to(DEV))
        x.copy_(torch.randn(T, H, generator=_gen(seed + 10)).to(DEV, torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        eager = _router_path(logits, x, k, E)
        for a, b in zip(outs, eager):
            assert torch.equal(a, b)


def test_deterministic(kern):
    """Bit-identical results run after run (no float atomics) and, emulated, under every thread order."""
    T, E, k, H = 3000, 256, 8, 64
    logits = torch.randn(T, E, generator=_gen(20))
    x = torch.randn(T, H, generator=_gen(21))
    gy = torch.randn(T, H, generator=_gen(22))
    gw = torch.randn(T, k, generator=_gen(23))

    def run():
        w, ids, tpe, ss, lse = kern.topk_gating(logits, k)
        xs, off, rm = kern.permute(x, ids, E)
        y = kern.unpermute(xs * 2, rm, w)
        grads = kern.unpermute_backward(gy, xs, rm, w)
        g = kern.topk_gating_backward(gw, ss, lse, logits, ids, "softmax", "softmax_topk", True, 1.0)
        return [w, ids, tpe, ss, lse, xs, off, rm, y, *grads, g]

    runs = [run() for _ in range(2) for _ in kern.schedules()]
    for other in runs[1:]:
        assert all(torch.equal(u, v) for u, v in zip(runs[0], other))


@gpu_only
def test_opcheck():
    # Autograd lives in moe_ext/functional.py (autograd.Function), not on the ops, so
    # test_autograd_registration does not apply; the fake-tensor checks run where a fake kernel exists.
    T, E, k, H = 32, 16, 2, 64
    logits = torch.randn(T, E, device=DEV)
    w, ids, *_ = ops.topk_gating(logits, k)
    x = torch.randn(T, H, device=DEV)
    xs, off, rm = ops.permute(x, ids, E)
    cases = [
        (ops.topk_gating.default, (logits, k), {}),
        (ops.topk_gating.default, (logits, k), dict(score_func="sigmoid", num_groups=4, topk_groups=2)),
        (ops.topk_gating_backward.default,
         (torch.randn(T, k, device=DEV), None, torch.randn(T, device=DEV), logits, ids, "softmax", "softmax_topk",
          True, 1.0), {}),
        (ops.permute.default, (x, ids, E), {}),
        (ops.permute.default, (x, ids.long(), E, 20), {}),
        (ops.unpermute.default, (xs, rm, w), {}),
        (ops.unpermute_backward.default, (torch.randn(T, H, device=DEV), xs, rm, w), {}),
    ]
    for op, args, kwargs in cases:
        utils = ["test_schema"]
        if has_fake_kernel(op, args, kwargs):
            utils += ["test_faketensor", "test_aot_dispatch_dynamic"]
        torch.library.opcheck(op, args, kwargs, test_utils=utils)
