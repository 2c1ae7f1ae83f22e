"""vLLM's fused-MoE API (moe_ext.fused): fused_topk, grouped_topk and fused_experts against vLLM's
semantics written out in PyTorch here (its torch reference paths), and fused_moe as their composition."""
import pytest
import torch
from torch.autograd import gradcheck

import moe_ext
from moe_ext import reference as R

T, H, F, E = 11, 12, 6, 8


def _weights(E=E, gated=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    w1 = torch.randn(E, (2 if gated else 1) * F, H, generator=g, dtype=dtype) * 0.3
    w2 = torch.randn(E, H, F, generator=g, dtype=dtype) * 0.3
    return w1, w2


def _vllm_grouped_topk(logits, topk, renormalize, groups, topk_group, scoring, scale, bias):
    """vLLM's grouped_topk, as its PyTorch path computes it."""
    scores = torch.softmax(logits, -1) if scoring == "softmax" else logits.sigmoid()
    n = scores.shape[0]
    original = scores
    if bias is not None:
        scores = scores + bias
        gscores = scores.view(n, groups, -1).topk(2, dim=-1)[0].sum(-1)
    else:
        gscores = scores.view(n, groups, -1).max(-1).values
    keep = torch.zeros_like(gscores).scatter_(1, gscores.topk(topk_group, -1)[1], 1).bool()
    masked = scores.masked_fill(~keep.repeat_interleave(scores.shape[1] // groups, 1), float("-inf"))
    ids = masked.topk(topk, -1)[1]
    w = original.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w * scale, ids


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_topk(scoring, renormalize):
    x = torch.randn(T, H)
    logits = torch.randn(T, E)
    w, ids, slots = moe_ext.fused_topk(x, logits, 3, renormalize, scoring_func=scoring)
    scores = torch.softmax(logits, -1) if scoring == "softmax" else logits.sigmoid()
    want_w, want_ids = scores.topk(3, -1)
    if renormalize:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and slots.dtype == torch.int32
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(w, want_w)
    assert slots.tolist() == [[j * T + t for j in range(3)] for t in range(T)]
    assert moe_ext.fused_topk(x, logits, 3, renormalize, torch.int64)[1].dtype == torch.int64


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups,topk_group,k", [(4, 2, 3), (8, 3, 6), (2, 1, 2)])
def test_grouped_topk_matches_vllm(bias, scoring, groups, topk_group, k):
    E_ = 16
    logits = torch.randn(40, E_, dtype=torch.float64)
    b = torch.randn(E_, dtype=torch.float64) * 0.2 if bias else None
    w, ids = moe_ext.grouped_topk(torch.randn(40, H), logits, k, True, groups, topk_group, scoring, 2.5, b)
    want_w, want_ids = _vllm_grouped_topk(logits, k, True, groups, topk_group, scoring, 2.5, b)
    assert torch.equal(ids.long(), want_ids)  # both best first: vLLM's sorted=False order aside
    torch.testing.assert_close(w, want_w)


def test_fused_moe_grouped_routing_follows_vllm():
    """Grouped routing without a selection bias scores each group by its best expert, as vLLM does; with a
    bias by its two best. fused_moe = grouped_topk + fused_experts."""
    E_ = 16
    x = torch.randn(T, H, dtype=torch.float64)
    logits = torch.randn(T, E_, dtype=torch.float64)
    w1, w2 = _weights(E_)
    for bias in (None, torch.randn(E_, dtype=torch.float64) * 0.2):
        got = moe_ext.fused_moe(x, w1, w2, logits, 3, use_grouped_topk=True, num_expert_group=4, topk_group=2,
                                e_score_correction_bias=bias)
        w, ids = moe_ext.grouped_topk(x, logits, 3, True, 4, 2, e_score_correction_bias=bias)
        torch.testing.assert_close(got, moe_ext.fused_experts(x, w1, w2, w, ids), atol=0, rtol=0)
    # group_score overrides the rule
    a = moe_ext.fused_moe(x, w1, w2, logits, 3, num_expert_group=4, topk_group=1, group_score="top2_sum")
    g = moe_ext.topk_gating(logits, 3, num_groups=4, topk_groups=1)
    torch.testing.assert_close(a, moe_ext.fused_experts(x, w1, w2, g.weights, g.expert_ids), atol=0, rtol=0)


@pytest.mark.parametrize("activation", ["silu", "gelu_no_mul"])
def test_fused_experts_matches_reference_and_gradcheck(activation):
    gated = activation == "silu"
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    w1, w2 = (w.requires_grad_() for w in _weights(gated=gated))
    logits = torch.randn(T, E, dtype=torch.float64)
    w, ids, _ = moe_ext.fused_topk(x, logits, 2, False)
    w = w.detach().requires_grad_()
    y = moe_ext.fused_experts(x, w1, w2, w, ids, activation=activation)
    want = R.moe(x, logits, w1, w2, 2, activation=activation, renormalize=False)
    torch.testing.assert_close(y, want)
    assert gradcheck(lambda *a: moe_ext.fused_experts(a[0], a[1], a[2], a[3], ids, activation=activation),
                     (x, w1, w2, w))


def test_fused_moe_gpt_oss_swigluoai():
    """vLLM's GPT-OSS call: fused_moe(activation="swigluoai", w1 rows gate/up interleaved, expert biases,
    renormalize=True), against vLLM's semantics written out: the k best logits, softmax over them,
    gate = min(g, 7), up = clamp(u, -7, 7), (up + 1) * gate * sigmoid(1.702 gate)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, H, dtype=torch.float64, generator=g)
    w1, w2 = _weights()
    b1 = torch.randn(E, 2 * F, dtype=torch.float64, generator=g) * 6  # past the limits
    b2 = torch.randn(E, H, dtype=torch.float64, generator=g)
    logits = torch.randn(T, E, dtype=torch.float64, generator=g)
    y = moe_ext.fused_moe(x, w1, w2, logits, 3, True, activation="swigluoai", w1_bias=b1, w2_bias=b2)
    want = torch.zeros(T, H, dtype=torch.float64)
    top, ids = logits.topk(3, -1)
    w = torch.softmax(top, -1)
    for t in range(T):
        for j in range(3):
            e = int(ids[t, j])
            h = x[t] @ w1[e].t() + b1[e]
            gate, up = h[::2].clamp(max=7.0), h[1::2].clamp(-7.0, 7.0)
            want[t] += w[t, j] * (((up + 1) * gate * torch.sigmoid(1.702 * gate)) @ w2[e].t() + b2[e])
    torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-10)
    args = [t.clone().requires_grad_() for t in (x[:4], w1, w2, b1, b2)]
    assert gradcheck(lambda a, p, q, c, d: moe_ext.fused_moe(a, p, q, logits[:4], 3, True, activation="swigluoai",
                                                             w1_bias=c, w2_bias=d), args)


def test_fused_experts_dropped_slots_and_expert_map():
    x = torch.randn(T, H, dtype=torch.float64)
    w1, w2 = _weights()
    logits = torch.randn(T, E, dtype=torch.float64)
    w, ids, _ = moe_ext.fused_topk(x, logits, 3, True)
    full = moe_ext.fused_experts(x, w1, w2, w, ids)
    # -1: no expert (a dropped slot)
    dropped = ids.clone()
    dropped[:, 2] = -1
    kept = moe_ext.fused_experts(x, w1, w2, w[:, :2].contiguous(), ids[:, :2].contiguous())
    torch.testing.assert_close(moe_ext.fused_experts(x, w1, w2, w, dropped), kept)
    # expert parallelism: each rank's partial sum over its experts; they add up to the whole
    total = 0
    for lo, hi in ((0, 3), (3, 8)):
        emap = torch.full((E,), -1, dtype=torch.int32)
        emap[lo:hi] = torch.arange(hi - lo, dtype=torch.int32)
        total = total + moe_ext.fused_experts(x, w1[lo:hi], w2[lo:hi], w, ids, global_num_experts=E, expert_map=emap)
    torch.testing.assert_close(total, full)


def test_apply_router_weight_on_input():
    x = torch.randn(T, H, dtype=torch.float64)
    w1, w2 = _weights()
    logits = torch.randn(T, E, dtype=torch.float64)
    w, ids, _ = moe_ext.fused_topk(x, logits, 1, False, scoring_func="sigmoid")
    y = moe_ext.fused_experts(x, w1, w2, w, ids, apply_router_weight_on_input=True)
    want = torch.stack([R.expert_forward(x[t:t + 1] * w[t], w1[ids[t, 0]], w2[ids[t, 0]])[0] for t in range(T)])
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(moe_ext.fused_moe(x, w1, w2, logits, 1, False, scoring_func="sigmoid",
                                                 apply_router_weight_on_input=True), y)
    w2_, ids2, _ = moe_ext.fused_topk(x, logits, 2, True)
    with pytest.raises(ValueError, match="apply_router_weight_on_input needs topk = 1, got 2"):
        moe_ext.fused_experts(x, w1, w2, w2_, ids2, apply_router_weight_on_input=True)


def test_errors_name_the_function_and_argument():
    x = torch.randn(T, H)
    w1, w2 = _weights(dtype=torch.float32)
    w, ids, _ = moe_ext.fused_topk(x, torch.randn(T, E), 2, True)
    with pytest.raises(ValueError, match=r"moe_ext.fused_experts: topk_ids must be \[T, k\] = \[11, k\] int32 or "
                                         r"int64 and topk_weights a float tensor of its shape"):
        moe_ext.fused_experts(x, w1, w2, w, ids.float())
    with pytest.raises(ValueError, match=r"moe_ext.fused_experts: global_num_experts = 9, but there are 8 experts"):
        moe_ext.fused_experts(x, w1, w2, w, ids, global_num_experts=9)
    emap = torch.arange(E, dtype=torch.int32)
    bad = ids.clone()
    bad[3, 1] = E
    with pytest.raises(ValueError, match=r"moe_ext.fused_experts: topk_ids holds 8 at flat index 7, expected -1 or a "
                                         r"global expert id in \[0, 8\)"):
        moe_ext.fused_experts(x, w1, w2, w, bad, expert_map=emap)
    with pytest.raises(ValueError, match=r"moe_ext.fused_topk: gating_output must have one row per token \(11\)"):
        moe_ext.fused_topk(x, torch.randn(T + 1, E), 2, True)
    with pytest.raises(ValueError, match="moe_ext.grouped_topk: hidden_states must be a floating-point tensor"):
        moe_ext.grouped_topk(torch.zeros(T, H, dtype=torch.long), torch.randn(T, E), 2, True, 2, 1)


def test_compiles_fullgraph():
    x = torch.randn(T, H)
    w1, w2 = _weights(dtype=torch.float32)
    logits = torch.randn(T, E)

    def f(x, logits):
        w, ids = moe_ext.grouped_topk(x, logits, 2, True, 4, 2)
        return moe_ext.fused_experts(x, w1, w2, w, ids)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, logits), f(x, logits))
