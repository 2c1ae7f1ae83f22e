import pytest
import torch
from torch.autograd import gradcheck

import moe_ext
from moe_ext import reference as R
from conftest import FLOAT_DTYPES, TOL, noncontig

CONFIGS = [
    dict(score_func="softmax", order="softmax_topk", renormalize=True),
    dict(score_func="softmax", order="softmax_topk", renormalize=False),
    dict(score_func="softmax", order="topk_softmax", renormalize=True),
    dict(score_func="sigmoid", order="softmax_topk", renormalize=True),
    dict(score_func="sigmoid", order="softmax_topk", renormalize=False),
]


def check_against_reference(logits, k, **kw):
    out = moe_ext.topk_gating(logits, k, **kw)
    ref = R.topk_gating(logits.double() if logits.dtype != torch.float64 else logits, k, **kw)
    assert out.expert_ids.dtype == torch.int32
    assert torch.equal(out.expert_ids.long(), ref[1])
    assert torch.equal(out.tokens_per_expert, ref[2])
    tol = TOL[torch.float64] if logits.dtype == torch.float64 else TOL[torch.float32]
    torch.testing.assert_close(out.weights.double(), ref[0], **tol, equal_nan=True)
    torch.testing.assert_close(out.score_sum.double(), ref[3].double(), atol=1e-4, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(out.lse.double(), ref[4].double(), **tol, equal_nan=True)
    return out


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("T,E,k", [(37, 7, 3), (16, 8, 2), (5, 7, 7), (9, 60, 8), (3, 1, 1), (64, 144, 16)])
def test_matches_reference(cfg, T, E, k):
    logits = torch.randn(T, E, dtype=torch.float64)
    check_against_reference(logits, k, **cfg)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes_rank_like_fp32_of_same_values(dtype):
    logits = torch.randn(41, 7).to(dtype)
    out = moe_ext.topk_gating(logits, 3)
    assert out.weights.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = R.topk_gating(logits.double(), 3)
    assert torch.equal(out.expert_ids.long(), ref[1])
    torch.testing.assert_close(out.weights.double(), ref[0], atol=1e-6, rtol=1e-6)


def test_empty_batch():
    out = moe_ext.topk_gating(torch.randn(0, 7), 3)
    assert out.weights.shape == (0, 3) and out.expert_ids.shape == (0, 3)
    assert out.tokens_per_expert.tolist() == [0] * 7
    assert out.score_sum.abs().sum() == 0 and out.lse.shape == (0,)


def test_ties_go_to_lower_expert_id():
    logits = torch.zeros(4, 9)
    logits[1, [2, 5, 7]] = 1.0
    out = moe_ext.topk_gating(logits, 3)
    assert out.expert_ids[0].tolist() == [0, 1, 2]
    assert out.expert_ids[1].tolist() == [2, 5, 7]
    torch.testing.assert_close(out.weights[0], torch.full((3,), 1 / 3))


def test_nan_logits_give_in_range_ids():
    logits = torch.randn(6, 10)
    logits[0] = float("nan")
    logits[1, 3] = float("nan")
    for cfg in CONFIGS:
        out = moe_ext.topk_gating(logits, 4, **cfg)
        assert ((out.expert_ids >= 0) & (out.expert_ids < 10)).all()
        assert sorted(out.expert_ids[0].tolist()) == [0, 1, 2, 3]  # all NaN: ties, lower ids
        check_against_reference(logits.double(), 4, **cfg)
    # Ranking raw logits or sigmoid scores, a lone NaN ranks after every number (a softmax row with
    # one NaN is NaN everywhere, so there it is a tie).
    for cfg in (CONFIGS[2], CONFIGS[3]):
        assert 3 not in moe_ext.topk_gating(logits, 4, **cfg).expert_ids[1].tolist()


def test_all_tokens_on_one_expert():
    logits = torch.randn(20, 7)
    logits[:, 4] += 100
    out = moe_ext.topk_gating(logits, 1)
    assert out.tokens_per_expert.tolist() == [0, 0, 0, 0, 20, 0, 0]


def test_k_equals_e_weights_are_probabilities():
    logits = torch.randn(11, 7, dtype=torch.float64)
    out = check_against_reference(logits, 7)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(11, dtype=torch.float64))


def test_bias_selects_but_does_not_weigh():
    logits = torch.randn(30, 8, dtype=torch.float64)
    bias = torch.zeros(8, dtype=torch.float64)
    bias[6] = 10.0
    out = check_against_reference(logits, 2, score_func="sigmoid", expert_bias=bias)
    assert (out.expert_ids[:, 0] == 6).all()
    s = torch.sigmoid(logits)
    chosen = torch.gather(s, 1, out.expert_ids.long())
    torch.testing.assert_close(out.weights, chosen / chosen.sum(-1, keepdim=True))


@pytest.mark.parametrize("groups,topk_groups,k", [(4, 2, 3), (8, 4, 8), (2, 1, 2)])
def test_group_limited_routing(groups, topk_groups, k):
    E = 16
    logits = torch.randn(25, E, dtype=torch.float64)
    bias = torch.randn(E, dtype=torch.float64) * 0.1
    out = check_against_reference(logits, k, score_func="sigmoid", expert_bias=bias, num_groups=groups,
                                  topk_groups=topk_groups, routed_scaling=2.5)
    gs = E // groups
    used_groups = (out.expert_ids.long() // gs)
    for row in used_groups.tolist():
        assert len(set(row)) <= topk_groups


def test_noncontiguous_logits():
    logits = torch.randn(13, 7, dtype=torch.float64)
    a = moe_ext.topk_gating(logits, 3)
    b = moe_ext.topk_gating(noncontig(logits), 3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_deterministic_independent_of_threads():
    logits = torch.randn(1000, 64)
    n = torch.get_num_threads()
    a = moe_ext.topk_gating(logits, 8)
    torch.set_num_threads(1)
    try:
        b = moe_ext.topk_gating(logits, 8)
    finally:
        torch.set_num_threads(n)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_gradcheck(cfg):
    logits = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    gw = torch.randn(6, 3, dtype=torch.float64)
    gss = torch.randn(7, dtype=torch.float64)
    glse = torch.randn(6, dtype=torch.float64)

    def f(lg):
        out = moe_ext.topk_gating(lg, 3, routed_scaling=1.5, **cfg)
        return (out.weights * gw).sum() + (out.score_sum * gss).sum() + (out.lse * glse).sum()

    assert gradcheck(f, (logits,))


def test_backward_matches_reference_autograd():
    logits = torch.randn(12, 9, dtype=torch.float64, requires_grad=True)
    out = moe_ext.topk_gating(logits, 2, score_func="sigmoid", routed_scaling=2.0)
    loss = (out.weights ** 2).sum() + out.score_sum.pow(2).sum() + out.lse.sum()
    (g,) = torch.autograd.grad(loss, logits)
    lg = logits.detach().clone().requires_grad_(True)
    w, ids, _, ss, lse = R.topk_gating(lg, 2, score_func="sigmoid", routed_scaling=2.0)
    (gr,) = torch.autograd.grad((w ** 2).sum() + ss.pow(2).sum() + lse.sum(), lg)
    torch.testing.assert_close(g, gr)


def test_only_weights_used_in_loss():
    logits = torch.randn(5, 7, requires_grad=True)
    moe_ext.topk_gating(logits, 2).weights.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
