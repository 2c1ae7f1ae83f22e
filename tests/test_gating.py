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


def test_signed_zero_keys_tie():
    # A -0 key (-0 logit plus -0 bias) equals +0: ties go to the lower id, not to +0 first.
    logits = torch.tensor([[0.0, -0.0, -0.0, 0.0, -1.0, -0.0], [-0.0, 0.0, -1.0, -0.0, 0.0, 0.0]])
    out = moe_ext.topk_gating(logits, 3, order="topk_softmax", expert_bias=torch.full((6,), -0.0))
    assert out.expert_ids.tolist() == [[0, 1, 2], [0, 1, 3]]
    torch.testing.assert_close(out.weights, torch.full((2, 3), 1 / 3))


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


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
@pytest.mark.parametrize("groups,topk_groups,k", [(4, 2, 3), (8, 3, 6), (16, 1, 1)])
def test_group_score_modes(group_score, groups, topk_groups, k):
    """group_score="max" is DeepSeek-V2's group_limited_greedy (and vLLM's grouped_topk without a bias):
    a group scores its best expert; "top2_sum" its two best (DeepSeek-V3). Written out here as those
    models do it, on softmax scores without ties."""
    E, T = 16, 40
    logits = torch.randn(T, E, dtype=torch.float64)
    out = check_against_reference(logits, k, num_groups=groups, topk_groups=topk_groups, renormalize=False,
                                  group_score=group_score)
    scores = torch.softmax(logits, -1)
    grouped = scores.view(T, groups, E // groups)
    gscore = grouped.max(-1).values if group_score == "max" else grouped.topk(min(2, E // groups), -1).values.sum(-1)
    keep = torch.zeros(T, groups, dtype=torch.bool).scatter_(1, gscore.topk(topk_groups, -1).indices, True)
    masked = scores.masked_fill(~keep.repeat_interleave(E // groups, 1), 0.0)
    w, ids = masked.topk(k, -1)
    assert torch.equal(out.expert_ids.long(), ids)
    torch.testing.assert_close(out.weights, w)


def test_group_score_is_checked():
    with pytest.raises(RuntimeError, match=r'topk_gating: group_score must be "top2_sum" or "max", got "mean"'):
        moe_ext.topk_gating(torch.randn(3, 8), 2, num_groups=2, topk_groups=1, group_score="mean")


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


# ---- routed_scaling and the renormalisation epsilon in the compute type (fp64 stays fp64) ----
def _weights_and_grad(fn, logits, coef, **kw):
    lg = logits.detach().clone().requires_grad_(True)
    w = fn(lg, **kw)
    (g,) = torch.autograd.grad((w * coef).sum(), lg)
    return w.detach(), g


def _ours(lg, k, **kw):
    return moe_ext.topk_gating(lg, k, **kw).weights


def _ref(lg, k, **kw):
    return R.topk_gating(lg, k, **kw)[0]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("scaling", [1.1, 0.3, 2.5, 1e300, 1e-50, 1e-300])
def test_fp64_routed_scaling_matches_reference(cfg, scaling):
    """fp64 logits: the factor is applied in fp64 (not rounded to fp32), for ordinary and extreme values,
    and the backward never divides by it (0 or inf from w / s would be NaN)."""
    logits = torch.randn(23, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    coef = torch.randn(23, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    w, g = _weights_and_grad(_ours, logits, coef, k=3, routed_scaling=scaling, **cfg)
    wr, gr = _weights_and_grad(_ref, logits, coef, k=3, routed_scaling=scaling, **cfg)
    torch.testing.assert_close(w / scaling, wr / scaling, rtol=1e-14, atol=0)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g / scaling, gr / scaling, rtol=1e-12, atol=1e-14)


def test_fp64_renorm_epsilon_is_fp64():
    """Chosen sigmoid scores near 1e-18: 1e-20 rounded to fp32 (1.00000001e-20) moves the weight by 2e-10."""
    logits = torch.tensor([[-41.0065, -49.9778], [-44.5, -43.25]], dtype=torch.float64)
    for k in (1, 2):
        out = moe_ext.topk_gating(logits, k, score_func="sigmoid")
        torch.testing.assert_close(out.weights, R.topk_gating(logits, k, score_func="sigmoid")[0], rtol=1e-15, atol=0)


def test_fp32_subnormal_routed_scaling_gradients_finite():
    """A factor that is subnormal in fp32 (1e-40) is accepted: weights and gradients then carry only the
    few bits of a subnormal, but must stay finite (the backward never divides by the factor)."""
    logits = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    coef = torch.randn(8, 2, generator=torch.Generator().manual_seed(6))
    for cfg in CONFIGS:
        w, g = _weights_and_grad(_ours, logits, coef, k=2, routed_scaling=1e-40, **cfg)
        assert torch.isfinite(g).all(), cfg
        _, gr = _weights_and_grad(_ref, logits.double(), coef.double(), k=2, routed_scaling=1e-40, **cfg)
        torch.testing.assert_close(g.double() * 1e40, gr * 1e40, rtol=1e-3, atol=1e-4)


# ---- lse of rows with infinite / NaN logits: torch.logsumexp's value ----
INF, NAN = float("inf"), float("nan")
SPECIAL_ROWS = [
    [-INF] * 5,                    # fully masked token: -inf
    [INF, 0.0, 1.0, 2.0, 3.0],     # +inf
    [INF, -INF, 0.0, 1.0, -INF],   # +inf and -inf: +inf
    [INF, INF, 0.0, 1.0, 2.0],
    [-INF, 0.5, -INF, -INF, 1.0],  # finite max
    [NAN, INF, 0.0, 1.0, 2.0],     # NaN wins over +inf
    [NAN, -INF, -INF, -INF, -INF],
    [NAN] * 5,
    [0.25, -1.0, 2.0, 0.5, 1.5],
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_lse_of_infinite_and_nan_rows(dtype, cfg):
    logits = torch.tensor(SPECIAL_ROWS, dtype=torch.float64).to(dtype)
    out = moe_ext.topk_gating(logits, 2, **cfg)
    ref = torch.logsumexp(logits.double(), -1)
    assert torch.equal(torch.isnan(out.lse), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    tol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    torch.testing.assert_close(out.lse.double()[fin], ref[fin], **tol)


@pytest.mark.parametrize("renormalize", [True, False])
def test_sigmoid_backward_of_infinite_rows(renormalize):
    """Sigmoid routing of a row with +-inf logits is well defined, and so is its gradient: the NaN softmax
    statistics of such a row must not leak in through the (absent or zero) lse gradient."""
    rows = [r for r in SPECIAL_ROWS if not any(v != v for v in r)]
    logits = torch.tensor(rows, dtype=torch.float64)
    kw = dict(score_func="sigmoid", renormalize=renormalize, routed_scaling=1.5)
    coef = torch.randn(len(rows), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    gss = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    lg = logits.clone().requires_grad_(True)
    out = moe_ext.topk_gating(lg, 2, **kw)
    (g_w,) = torch.autograd.grad((out.weights * coef).sum(), lg, retain_graph=True)
    (g_ss,) = torch.autograd.grad((out.weights * coef).sum() + (out.score_sum * gss).sum(), lg, retain_graph=True)
    # an lse gradient that is present but zero for these rows (another token's lse is in the loss)
    (g_z,) = torch.autograd.grad((out.weights * coef).sum() + out.lse[4], lg)
    lr = logits.clone().requires_grad_(True)
    w, _, _, ss, _ = R.topk_gating(lr, 2, **kw)
    (r_w,) = torch.autograd.grad((w * coef).sum(), lr, retain_graph=True)
    (r_ss,) = torch.autograd.grad((w * coef).sum() + (ss * gss).sum(), lr)
    assert torch.isfinite(r_w).all() and torch.isfinite(r_ss).all()
    torch.testing.assert_close(g_w, r_w, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(g_ss, r_ss, rtol=1e-14, atol=1e-15)
    # torch's logsumexp backward gives 0 * NaN = NaN on the infinite rows here; ours skips a zero gradient
    others = [i for i in range(len(rows)) if i != 4]
    assert torch.equal(g_z[others], g_w[others])


def test_backward_zero_or_absent_lse_gradient_is_exact():
    """No lse gradient and an all-zero one give the same bits (no 0 * prob term added), NaN-free."""
    logits = torch.tensor(SPECIAL_ROWS[:5], dtype=torch.float64)
    ids = moe_ext.topk_gating(logits, 2, score_func="sigmoid").expert_ids
    gw = torch.randn(5, 2, dtype=torch.float64)
    ops = torch.ops.moe_ext
    for dtype in (torch.float64, torch.float32):
        lg, g = logits.to(dtype), gw.to(dtype)
        a = ops.topk_gating_backward(g, None, None, lg, ids, "sigmoid", "softmax_topk", True, 1.0)
        b = ops.topk_gating_backward(g, None, torch.zeros(5, dtype=dtype), lg, ids, "sigmoid", "softmax_topk", True,
                                     1.0)
        assert torch.isfinite(a).all()
        assert torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))
