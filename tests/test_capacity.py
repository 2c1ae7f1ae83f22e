import pytest
import torch

import moe_ext
from conftest import gpu_only
from moe_ext import reference as R

ops = torch.ops.moe_ext


@pytest.mark.parametrize("T,E,k,cap", [(37, 7, 3, 10), (16, 8, 2, 3), (5, 7, 7, 4), (40, 4, 2, 0), (9, 60, 8, 1),
                                       (0, 7, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_reroute_matches_reference(T, E, k, cap, dtype):
    keys = torch.randn(T, E)
    keys[: T // 3] = torch.round(keys[: T // 3])  # ties: lower expert id preferred
    ids = keys.topk(k, dim=-1).indices if T else torch.empty(0, k, dtype=torch.long)
    ids = ids.to(dtype)
    if T:
        ids[torch.rand(T, k) < 0.1] = -1
    out = ops.capacity_reroute(ids, keys, cap)
    assert out.dtype == dtype
    assert torch.equal(out, R.capacity_reroute(ids, keys, cap))
    load = torch.bincount(out[out >= 0].long(), minlength=E)
    assert (load <= cap).all()
    for row in out.tolist():  # a token never holds an expert twice
        kept = [e for e in row if e >= 0]
        assert len(kept) == len(set(kept))


def test_reroute_keeps_everything_when_capacity_suffices():
    ids = torch.tensor([[0, 1], [0, 1], [0, 1]], dtype=torch.int32)
    assert torch.equal(ops.capacity_reroute(ids, torch.randn(3, 4), 3), ids)


def test_reroute_opcheck_and_errors():
    ids = torch.tensor([[0, 1], [0, 1], [0, 1]], dtype=torch.int32)
    torch.library.opcheck(ops.capacity_reroute.default, (ids, torch.randn(3, 4), 2))
    with pytest.raises(RuntimeError, match=r"capacity_reroute: expert_ids holds 4 at flat index 1"):
        ops.capacity_reroute(torch.tensor([[0, 4]]), torch.randn(1, 4), 2)
    with pytest.raises(RuntimeError, match=r"capacity_reroute: capacity must be >= 0, got -1"):
        ops.capacity_reroute(ids, torch.randn(3, 4), -1)
    with pytest.raises(RuntimeError, match=r"capacity_reroute: expert_ids.size\(0\) must equal keys.size\(0\) \(T\) = 2"):
        ops.capacity_reroute(ids, torch.randn(2, 4), 2)


def test_capacity_rank_is_priority_order():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]], dtype=torch.int32)
    # expert 2: (t0, j0), (t1, j0), then (t2, j1); expert 0: (t2, j0) then (t0, j1)
    assert moe_ext.capacity_rank(ids, 3).tolist() == [[0, 1], [1, 0], [0, 2]]


@pytest.mark.parametrize("T,E,k,cap", [(37, 7, 3, 10), (200, 16, 4, 9), (33, 5, 5, 4), (0, 8, 2, 1), (12, 4, 2, 0)])
@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_drop_matches_reference(T, E, k, cap, policy, dtype):
    ids, keys = _reroute_case(T, E, k, dtype)
    w = torch.softmax(keys.nan_to_num(-1.0), -1).gather(1, ids.clamp_min(0).long()) if T else torch.empty(0, k)
    if T:
        w[: T // 4] = torch.round(w[: T // 4] * 4) / 4  # ties: position order decides
        w[T // 2 + 1, 0] = float("nan")  # NaN weights rank last
    out = moe_ext.apply_capacity(ids, keys, E, cap, "drop", drop_policy=policy, weights=w)
    want = R.capacity_drop(ids, cap, w if policy == "probs" else None)
    assert out.dtype == dtype and torch.equal(out, want)


def test_drop_policy_probs_keeps_the_largest_weights():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]], dtype=torch.int32)
    w = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.7, 0.3], [0.6, 0.4]])
    out = moe_ext.apply_capacity(ids, torch.zeros(4, 3), 3, 2, "drop", drop_policy="probs", weights=w)
    # expert 0: t1 (0.9), t2 (0.7) kept, t0 (0.5) and t3's second choice (0.4) dropped; expert 1: t3 (0.6),
    # t0 (0.5) kept, t2 (0.3) dropped; expert 2: t1 (0.1) kept. position order would keep t0 and t1 on 0.
    assert out.tolist() == [[-1, 1], [0, 2], [0, -1], [1, -1]]


def test_drop_policy_errors():
    ids, w = torch.zeros(3, 2, dtype=torch.int32), torch.rand(3, 2)
    with pytest.raises(ValueError, match="drop_policy must be 'position' or 'probs', got 'prob'"):
        moe_ext.apply_capacity(ids, torch.zeros(3, 4), 4, 1, drop_policy="prob", weights=w)
    with pytest.raises(ValueError, match="drop_policy='probs' needs overflow='drop'"):
        moe_ext.apply_capacity(ids, torch.zeros(3, 4), 4, 1, "reroute", drop_policy="probs", weights=w)
    with pytest.raises(ValueError, match=r"needs weights shaped like expert_ids \(3, 2\), got None"):
        moe_ext.apply_capacity(ids, torch.zeros(3, 4), 4, 1, drop_policy="probs")
    with pytest.raises(ValueError, match="drop_policy='probs' needs overflow='drop'"):
        moe_ext.MoELayer(8, 8, 4, 2, capacity_factor=1.0, overflow="reroute", drop_policy="probs")


@gpu_only
def test_drop_policy_probs_cuda_matches_cpu():
    ids, keys = _reroute_case(500, 16, 4, torch.int32)
    w = torch.rand(500, 4)
    w[:100] = 0.5  # ties
    want = moe_ext.apply_capacity(ids, keys, 16, 60, drop_policy="probs", weights=w)
    got = moe_ext.apply_capacity(ids.cuda(), keys.cuda(), 16, 60, drop_policy="probs", weights=w.cuda())
    assert torch.equal(got.cpu(), want)


def _reroute_case(T, E, k, dtype):
    keys = torch.randn(T, E)
    keys[: T // 3] = torch.round(keys[: T // 3])  # ties: the lower expert id wins on both sides
    if T:
        keys[T // 2, : E // 2] = float("nan")  # NaN keys rank last
    ids = (keys.topk(k, dim=-1).indices if T else torch.empty(0, k, dtype=torch.long)).to(dtype)
    if T:
        ids[torch.rand(T, k) < 0.1] = -1  # dropped slots stay dropped
    return ids, keys


# The CUDA kernel, on the GPU and under the emulation (the `kern` fixture, tests/kernel_backends.py).
@pytest.mark.parametrize("T,E,k,cap", [(37, 7, 3, 10), (1000, 64, 8, 100), (300, 160, 6, 9), (0, 8, 2, 1),
                                       (33, 5, 5, 4), (70, 13000, 2, 1)])  # k = E; E past shared memory
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_reroute_cuda_matches_cpu(kern, T, E, k, cap, dtype):
    ids, keys = _reroute_case(T, E, k, dtype)
    out = kern.capacity_reroute(ids, keys, cap)
    assert out.dtype == dtype and torch.equal(out, ops.capacity_reroute(ids, keys, cap))


@gpu_only
def test_reroute_cuda_no_host_sync_and_opcheck():
    ids, keys = _reroute_case(300, 160, 6, torch.int32)
    ids_d, keys_d = ids.cuda(), keys.cuda()  # host-to-device copies synchronise: before error mode
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.capacity_reroute(ids_d, keys_d, 9)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(out.cpu(), ops.capacity_reroute(ids, keys, 9))
    torch.library.opcheck(ops.capacity_reroute.default, (ids_d, keys_d, 9))


def test_reroute_follows_the_biased_selection_key():
    # expert 0 takes two slots; the third token's slot overflows. By logits alone its next choice is 1,
    # but the selection bias (DeepSeek-V3) makes expert 3 the preferred one, as topk_gating would rank it.
    ids = torch.tensor([[0], [0], [0]], dtype=torch.int32)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    assert moe_ext.apply_capacity(ids, logits, 4, 2, "reroute", "sigmoid").tolist() == [[0], [0], [1]]
    assert moe_ext.apply_capacity(ids, logits, 4, 2, "reroute", "sigmoid", expert_bias=bias).tolist() == [[0], [0], [3]]


@pytest.mark.parametrize("overflow", ["drop", "reroute"])
def test_apply_capacity_rejects_bad_arguments_on_both_paths(overflow):
    """The drop path checks what the reroute op checks: an id outside [-1, E) and a negative capacity
    raise errors that name the argument (before: drop let id 9 of E = 4 through and dropped every
    slot at capacity -1)."""
    logits = torch.randn(1, 4)
    with pytest.raises((ValueError, RuntimeError), match=r"expert_ids holds 9 at flat index 1.*\[0, 4\)"):
        moe_ext.apply_capacity(torch.tensor([[0, 9]], dtype=torch.int32), logits, 4, 1, overflow)
    with pytest.raises((ValueError, RuntimeError), match="capacity must be >= 0, got -1"):
        moe_ext.apply_capacity(torch.tensor([[0, 1]], dtype=torch.int32), logits, 4, -1, overflow)


@pytest.mark.parametrize("cf", [float("nan"), float("inf"), 0.0, -1.0])
def test_layer_rejects_capacity_factor_that_is_not_finite_and_positive(cf):
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        moe_ext.MoELayer(8, 16, 4, 2, capacity_factor=cf)
