"""MoELayer routing features: expert_bias (DeepSeek-V3) with update_expert_bias, the sigmoid-gated shared
expert (Qwen2-MoE), presets, routing statistics."""
import math

import pytest
import torch

import moe_ext
from moe_ext import reference as R
from moe_ext.routing import update_expert_bias


def test_expert_bias_buffer_is_fp32_and_used_for_selection_only():
    layer = moe_ext.MoELayer(16, 8, 8, 2, score_func="sigmoid", expert_bias=True).double()
    b = layer.router.expert_bias
    assert b.shape == (8,) and b.dtype == torch.float32 and not b.requires_grad
    assert "router.expert_bias" in layer.state_dict()
    assert "router.expert_bias" not in dict(layer.named_parameters())
    with torch.no_grad():
        b.copy_(torch.linspace(-0.5, 0.5, 8))
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    logits = layer.router(x)
    w_ref, ids_ref, *_ = R.topk_gating(logits, 2, score_func="sigmoid", expert_bias=b)
    ids_nobias = R.topk_gating(logits, 2, score_func="sigmoid")[1]
    assert not torch.equal(ids_ref, ids_nobias)  # the bias changes the selection
    # weights are the unbiased scores (renormalised)
    scores = torch.sigmoid(logits.gather(1, ids_ref))
    torch.testing.assert_close(w_ref, scores / scores.sum(-1, keepdim=True))
    yr = R.moe(x, logits, layer.experts.w1, layer.experts.w2, 2, score_func="sigmoid", expert_bias=b)
    ys = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(2):
            e = ids_ref[t, j]
            h = layer.experts.w1[e] @ x[t]
            F_ = h.shape[0] // 2
            ys[t] += w_ref[t, j] * (layer.experts.w2[e] @ (torch.nn.functional.silu(h[:F_]) * h[F_:]))
    torch.testing.assert_close(y, ys)
    torch.testing.assert_close(y, yr)
    y.sum().backward()
    assert layer.router.weight.grad is not None and b.grad is None


def test_expert_bias_survives_dtype_casts():
    layer = moe_ext.MoELayer(8, 8, 4, 1, expert_bias=True)
    with torch.no_grad():
        layer.router.expert_bias.fill_(1e-4 + 1.0)
    layer = layer.bfloat16()
    assert layer.router.weight.dtype == torch.bfloat16
    assert layer.router.expert_bias.dtype == torch.float32 and layer.router.expert_bias[0].item() == pytest.approx(
        1.0001, abs=1e-7)
    layer(torch.randn(5, 8, dtype=torch.bfloat16))


def test_update_expert_bias():
    layer = moe_ext.presets.deepseek_v3(d_model=16, d_ff=8, num_experts=8, top_k=2, n_group=4, topk_group=2)
    layer(torch.randn(30, 16))
    load = layer.last_stats["tokens_per_expert"]
    before = layer.router.expert_bias.clone()
    update_expert_bias(layer, rate=0.01)
    delta = layer.router.expert_bias - before
    mean = load.double().mean()
    expected = 0.01 * torch.sign(mean - load.double())
    torch.testing.assert_close(delta, expected.float())
    # a bare tensor, an explicit load, a list of loads (micro-batches)
    b = torch.zeros(4)
    update_expert_bias(b, torch.tensor([4, 0, 2, 2]), rate=0.5)
    assert b.tolist() == [-0.5, 0.5, 0.0, 0.0]
    update_expert_bias(b, [torch.tensor([1, 0, 0, 3]), torch.tensor([1, 0, 0, 3])], rate=0.5)
    assert b.tolist() == [-0.5, 1.0, 0.5, -0.5]  # load [2, 0, 0, 6], mean 2: expert 0 at the mean stays
    with pytest.raises(ValueError, match="expert bias"):
        update_expert_bias(moe_ext.MoELayer(8, 8, 4, 1), torch.ones(4))


def test_expert_bias_balances_load():
    torch.manual_seed(0)
    layer = moe_ext.MoELayer(16, 8, 8, 2, score_func="sigmoid", expert_bias=True)
    with torch.no_grad():
        layer.router.weight[0] += 2.0  # expert 0 hogs tokens
    x = torch.randn(256, 16)
    with torch.no_grad():
        layer(x)
        start = layer.last_stats["tokens_per_expert"].max().item()
        for _ in range(200):
            layer(x)
            update_expert_bias(layer, rate=0.01)
        layer(x)
    assert layer.last_stats["tokens_per_expert"].max().item() < start


def test_shared_expert_gate_qwen2_semantics():
    layer = moe_ext.MoELayer(16, 12, 6, 2, renormalize=False, num_shared_experts=1, shared_d_ff=20,
                             shared_expert_gate=True).double()
    assert layer.shared_expert_gate.weight.shape == (1, 16)
    assert layer.shared_experts.w1.shape == (1, 40, 16)
    x = torch.randn(9, 16, dtype=torch.float64)
    y = layer(x)
    routed = R.moe(x, layer.router(x), layer.experts.w1, layer.experts.w2, 2, renormalize=False)
    se = layer.shared_experts
    h = x @ se.w1[0].t()
    shared = (torch.nn.functional.silu(h[:, :20]) * h[:, 20:]) @ se.w2[0].t()
    torch.testing.assert_close(y, routed + torch.sigmoid(x @ layer.shared_expert_gate.weight.t()) * shared)
    y.sum().backward()
    assert layer.shared_expert_gate.weight.grad is not None
    with pytest.raises(ValueError, match="shared_expert_gate"):
        moe_ext.MoELayer(16, 12, 6, 2, shared_expert_gate=True)


def test_offload_keeps_shared_expert_gate_and_bias():
    layer = moe_ext.MoELayer(16, 12, 6, 2, num_shared_experts=1, shared_expert_gate=True, expert_bias=True).eval()
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.randn(6))
    off = moe_ext.offload.offload_experts(layer, cache_experts=2, device="cpu")
    x = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(off(x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["switch", "mixtral_8x7b", "deepseek_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"])
def test_presets_tiny(name):
    small = dict(switch=dict(d_model=16, d_ff=24, num_experts=4),
                 mixtral_8x7b=dict(d_model=16, d_ff=24),
                 deepseek_moe=dict(d_model=16, d_ff=8, num_experts=16),
                 deepseek_v2=dict(d_model=16, d_ff=8, num_experts=16),
                 deepseek_v3=dict(d_model=16, d_ff=8, num_experts=16),
                 gpt_oss=dict(d_model=16, d_ff=8, num_experts=8))[name]
    layer = getattr(moe_ext.presets, name)(**small)
    x = torch.randn(2, 10, 16)
    y = layer(x)
    assert y.shape == x.shape
    (y.sum() + layer.aux_loss).backward()
    st = layer.last_stats
    assert st["tokens_per_expert"].shape == (layer.num_experts,)
    if name == "switch":
        assert layer.top_k == 1 and layer.capacity_factor == 1.25 and layer.aux_loss_coef == 1e-2
        assert layer.capacity(20) == math.ceil(1.25 * 20 / 4)
        assert int(st["tokens_per_expert"].sum()) <= 20 and 0.0 <= float(st["drop_fraction"]) < 1.0
    if name == "deepseek_v3":
        assert layer.router.expert_bias is not None and layer.routed_scaling_factor == 2.5
        assert layer.n_group == 8 and layer.topk_group == 4 and layer.top_k == 8 and layer.score_func == "sigmoid"
        assert layer.aux_loss_coef == 1e-4 and layer.aux_loss_scope == "sequence" and float(layer.aux_loss.detach()) > 0
    if name == "deepseek_moe":
        assert layer.shared_experts.w1.shape[0] == 2 and layer.top_k == 6
    if name == "deepseek_v2":
        assert layer.group_score == "max" and layer.n_group == 8 and layer.topk_group == 3 and not layer.renormalize
        r = layer.route(x.reshape(-1, 16).detach())
        assert ((r.expert_ids.long() // 2).sort(-1).values.diff(dim=-1) != 0).sum(-1).le(2).all()  # <= 3 groups
    if name == "gpt_oss":
        assert layer.top_k == 4 and layer.experts.activation == "swigluoai" and layer.experts.b1.shape == (8, 16)
        assert layer.router.bias.shape == (8,) and layer.router.bias.grad is not None


def test_preset_default_sizes():
    # The real sizes, on the meta device (no memory).
    m = moe_ext.presets.mixtral_8x7b(device="meta")
    assert m.experts.w1.shape == (8, 2 * 14336, 4096) and m.top_k == 2
    v2 = moe_ext.presets.deepseek_v2(device="meta")
    assert v2.experts.w1.shape == (160, 2 * 1536, 5120) and v2.shared_experts.w1.shape == (2, 2 * 1536, 5120)
    d = moe_ext.presets.deepseek_v3(device="meta")
    assert d.experts.w1.shape == (256, 4096, 7168) and d.shared_experts.w1.shape == (1, 4096, 7168)
    o = moe_ext.presets.gpt_oss(device="meta")
    assert o.experts.w1.shape == (128, 2 * 2880, 2880) and o.experts.b2.shape == (128, 2880) and o.top_k == 4


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_seqs,S,E,k", [(3, 11, 7, 3), (1, 20, 8, 2), (4, 5, 6, 6), (2, 1, 4, 1)])
def test_sequence_load_balancing_loss_matches_reference(score_func, num_seqs, S, E, k):
    logits = torch.randn(num_seqs * S, E, dtype=torch.float64, requires_grad=True)
    ids = logits.detach().topk(k, dim=-1).indices.to(torch.int32)
    ids[0, 0] = -1  # a dropped slot counts nowhere
    got = moe_ext.losses.sequence_load_balancing_loss(logits, ids, num_seqs, k, score_func)
    want = R.sequence_load_balancing_loss(logits, ids, num_seqs, k, score_func)
    torch.testing.assert_close(got, want)
    (g,) = torch.autograd.grad(got, logits)
    (w,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g, w)


def test_sequence_loss_of_one_sequence_is_the_batch_loss():
    logits = torch.randn(30, 8, dtype=torch.float64)
    g = moe_ext.topk_gating(logits, 2, renormalize=False)
    seq = moe_ext.losses.sequence_load_balancing_loss(logits, g.expert_ids, 1, 2)
    torch.testing.assert_close(seq, moe_ext.load_balancing_loss(g.tokens_per_expert, g.score_sum, 30, 2))
    empty = moe_ext.losses.sequence_load_balancing_loss(torch.zeros(0, 8, requires_grad=True),
                                                        torch.zeros(0, 2, dtype=torch.int32), 1, 2)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


@pytest.mark.parametrize("kw", [{}, {"capacity_factor": 0.5}, {"score_func": "sigmoid", "expert_bias": True}])
def test_layer_sequence_scope(kw):
    """aux_loss_scope="sequence": the rows of x [B, S, H] are the sequences; the counts are the chosen
    experts before capacity drops (as for the batch loss); x [S, H] is one sequence."""
    layer = moe_ext.MoELayer(16, 8, 7, 3, aux_loss_coef=0.1, aux_loss_scope="sequence", **kw).double()
    x = torch.randn(4, 9, 16, dtype=torch.float64)
    layer(x)
    r = layer.route(x.view(-1, 16))
    want = 0.1 * R.sequence_load_balancing_loss(r.logits, r.chosen_ids, 4, 3, layer.score_func)
    torch.testing.assert_close(layer.aux_loss, want)
    layer(x[0])
    torch.testing.assert_close(layer.aux_loss, 0.1 * R.sequence_load_balancing_loss(
        layer.router(x[0]), layer.route(x[0]).chosen_ids, 1, 3, layer.score_func))
    with pytest.raises(ValueError, match="aux_loss_scope must be 'batch', 'sequence' or 'global', got 'seq'"):
        moe_ext.MoELayer(16, 8, 7, 3, aux_loss_scope="seq")


def test_global_scope_without_a_process_group_is_the_batch_loss():
    torch.manual_seed(0)
    batch = moe_ext.MoELayer(16, 8, 6, 2, aux_loss_coef=0.1).double()
    glob = moe_ext.MoELayer(16, 8, 6, 2, aux_loss_coef=0.1, aux_loss_scope="global").double()
    glob.load_state_dict(batch.state_dict())
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    batch(x), glob(x)
    torch.testing.assert_close(glob.aux_loss, batch.aux_loss)


# ------------------------------------------------------------------------------------ token_mask (padding)
def _padded(B=3, S=8, H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, H, generator=g, dtype=torch.float64)
    lengths = torch.tensor([S, S // 2, 1])[:B]
    mask = torch.arange(S).unsqueeze(0) < lengths.unsqueeze(1)
    return x, mask


@pytest.mark.parametrize("kw", [dict(aux_loss_coef=0.1, z_loss_coef=0.01),
                                dict(aux_loss_coef=0.1, score_func="sigmoid", expert_bias=True, n_group=2, topk_group=1),
                                dict(aux_loss_coef=0.1, aux_loss_scope="global")])
def test_token_mask_equals_the_layer_on_the_real_tokens(kw):
    """Dropless token choice: masked tokens get zero, and the real tokens' outputs, aux loss, statistics
    and gradients are those of the layer run on the real tokens alone."""
    torch.manual_seed(0)
    layer = moe_ext.MoELayer(16, 8, 6, 2, **kw).double()
    x, mask = _padded()
    y = layer(x, token_mask=mask)
    got_aux, got_stats = layer.aux_loss, dict(layer.last_stats)
    real = x[mask]
    y_ref = layer(real)
    torch.testing.assert_close(y[mask], y_ref)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    torch.testing.assert_close(got_aux, layer.aux_loss)
    assert torch.equal(got_stats["tokens_per_expert"], layer.last_stats["tokens_per_expert"])
    torch.testing.assert_close(got_stats["router_entropy"], layer.last_stats["router_entropy"])
    params = list(layer.parameters())
    got = torch.autograd.grad(y.square().sum() + got_aux, params)
    want = torch.autograd.grad(y_ref.square().sum() + layer.aux_loss, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_token_mask_sequence_scope():
    layer = moe_ext.MoELayer(16, 8, 6, 2, aux_loss_coef=1.0, aux_loss_scope="sequence").double()
    x, mask = _padded()
    layer(x, token_mask=mask)
    per_seq = []
    for b in range(3):
        xb = x[b][mask[b]]
        r = layer.route(xb)
        per_seq.append(R.sequence_load_balancing_loss(r.logits, r.chosen_ids, 1, 2))
    torch.testing.assert_close(layer.aux_loss, torch.stack(per_seq).mean())


@pytest.mark.parametrize("kw,S", [(dict(capacity_factor=0.5), 20), (dict(capacity_factor=0.5, drop_policy="probs"), 20),
                                  (dict(capacity_factor=0.5, overflow="reroute"), 20),
                                  (dict(routing="expert_choice"), 20),
                                  (dict(routing="expert_choice", capacity_factor=4.0), 4)])  # capacity > real tokens
def test_token_mask_takes_no_capacity(kw, S):
    layer = moe_ext.MoELayer(16, 8, 6, 2, aux_loss_coef=0.1, **kw).double()
    x, mask = _padded(B=3, S=S)
    T = 3 * S
    flat = mask.reshape(-1)
    r = layer.route(x.reshape(-1, 16), flat)
    assert (r.expert_ids[~flat] == -1).all()
    if kw.get("routing") != "expert_choice" and kw.get("overflow") != "reroute":
        g = moe_ext.topk_gating(r.logits, 2)
        masked = torch.where(flat.unsqueeze(1), g.expert_ids, torch.full_like(g.expert_ids, -1))
        want = R.capacity_drop(masked, layer.capacity(T), g.weights if kw.get("drop_policy") == "probs" else None)
        assert torch.equal(r.expert_ids, want)
    if kw.get("routing") == "expert_choice":
        assert ((r.expert_ids >= 0).sum(0) == min(layer.capacity(T), int(flat.sum()))).all()
    y = layer(x, token_mask=mask)
    assert torch.isfinite(y).all() and torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    assert layer.last_stats["tokens_per_expert"].sum() == (r.expert_ids >= 0).sum()


def test_token_mask_all_padding_and_errors():
    layer = moe_ext.MoELayer(16, 8, 6, 2, aux_loss_coef=0.1, z_loss_coef=0.1, aux_loss_scope="sequence")
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = layer(x, token_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert torch.equal(y, torch.zeros_like(y)) and float(layer.aux_loss.detach()) == 0.0
    assert float(layer.last_stats["drop_fraction"]) == 0.0 and torch.isfinite(layer.last_stats["router_entropy"])
    (y.sum() + layer.aux_loss).backward()
    with pytest.raises(ValueError, match=r"token_mask must be a bool tensor of x's shape without the hidden dim, "
                                         r"\(2, 5\), got torch.int64 \(2, 5\)"):
        layer(x, token_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(2, 5\), got torch.bool \(10,\)"):
        layer(x, token_mask=torch.ones(10, dtype=torch.bool))


def test_token_mask_compiles():
    torch._dynamo.reset()
    layer = moe_ext.MoELayer(16, 8, 6, 2, aux_loss_coef=0.1, z_loss_coef=0.01)
    x, mask = _padded()
    x = x.float()
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, token_mask=mask)
    torch.testing.assert_close(y, layer(x, token_mask=mask))
