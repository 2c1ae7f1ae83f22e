import math

import pytest
import torch

import moe_ext
from moe_ext import reference as R
from conftest import _NO_GPU


def make_weights(E, F, H, gated=True, dtype=torch.float64):
    w1 = (torch.randn(E, (2 if gated else 1) * F, H, dtype=dtype) / math.sqrt(H)).requires_grad_()
    w2 = (torch.randn(E, H, F, dtype=dtype) / math.sqrt(F)).requires_grad_()
    return w1, w2


@pytest.mark.parametrize("activation", ["silu", "gelu", "silu_no_mul", "gelu_no_mul", "relu_no_mul"])
@pytest.mark.parametrize("T,H,F,E,k", [(37, 72, 40, 7, 3), (16, 8, 8, 4, 4), (1, 72, 40, 7, 1), (0, 72, 40, 7, 3)])
def test_fused_moe_forward_backward_vs_reference(activation, T, H, F, E, k):
    gated = "no_mul" not in activation
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    lg = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    w1, w2 = make_weights(E, F, H, gated)
    y = moe_ext.fused_moe(x, w1, w2, lg, k, activation=activation)
    yr = R.moe(x, lg, w1, w2, k, activation=activation)
    torch.testing.assert_close(y, yr)
    if T == 0:
        return
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, lg, w1, w2), g)
    grads_ref = torch.autograd.grad(yr, (x, lg, w1, w2), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_fused_moe_gradcheck():
    T, H, F, E, k = 5, 6, 4, 4, 2
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    lg = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    w1, w2 = make_weights(E, F, H)
    assert torch.autograd.gradcheck(lambda *a: moe_ext.fused_moe(*a, k), (x, w1, w2, lg))


@pytest.mark.parametrize("split", [[4, 3], [2, 2, 2, 1], [7]])
def test_fused_moe_expert_map_partial_sums(split):
    """vLLM's expert parallelism: each rank holds a range of the E global experts and an expert_map;
    its partial result sums its own experts, and the partial results add up to the whole layer."""
    T, H, F, E, k = 23, 72, 40, 7, 3
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    lg = torch.randn(T, E, dtype=torch.float64)
    w1, w2 = make_weights(E, F, H)
    want = moe_ext.fused_moe(x, w1, w2, lg, k)
    total, lo = 0, 0
    for n in split:
        emap = torch.full((E,), -1, dtype=torch.int32)
        emap[lo:lo + n] = torch.arange(n, dtype=torch.int32)
        total = total + moe_ext.fused_moe(x, w1[lo:lo + n], w2[lo:lo + n], lg, k, global_num_experts=E, expert_map=emap)
        lo += n
    torch.testing.assert_close(total, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(total, (x, w1, w2), g), torch.autograd.grad(want, (x, w1, w2), g)):
        torch.testing.assert_close(a, b)


def test_fused_moe_vllm_options():
    T, H, F, E, k = 9, 16, 8, 8, 2
    x, lg = torch.randn(T, H, dtype=torch.float64), torch.randn(T, E, dtype=torch.float64)
    w1, w2 = (w.detach() for w in make_weights(E, F, H))
    want = moe_ext.fused_moe(x, w1, w2, lg, k)
    buf = x.clone()
    out = moe_ext.fused_moe(buf, w1, w2, lg, k, True, True)  # vLLM's positional renormalize, inplace
    assert out is buf and torch.equal(buf, want)
    grouped = moe_ext.fused_moe(x, w1, w2, lg, k, num_expert_group=4, topk_group=1)
    assert torch.equal(moe_ext.fused_moe(x, w1, w2, lg, k, use_grouped_topk=True, num_expert_group=4, topk_group=1),
                       grouped)
    assert torch.equal(moe_ext.fused_moe(x, w1, w2, lg, k, use_grouped_topk=False, num_expert_group=4, topk_group=1),
                       want)  # vLLM: groups only with use_grouped_topk
    assert torch.equal(moe_ext.fused_moe(x, w1, w2, lg, k, num_expert_group=None, topk_group=None), want)
    assert not torch.equal(grouped, want)
    with pytest.raises(ValueError, match="use_grouped_topk=True needs num_expert_group > 1"):
        moe_ext.fused_moe(x, w1, w2, lg, k, use_grouped_topk=True)
    with pytest.raises(ValueError, match="global_num_experts = 9 but gating_output has 8 columns"):
        moe_ext.fused_moe(x, w1, w2, lg, k, global_num_experts=9)
    with pytest.raises(ValueError, match=r"expert_map must be \[E_global\] = \[8\] int32 or int64, got \(7,\)"):
        moe_ext.fused_moe(x, w1, w2, lg, k, expert_map=torch.zeros(7, dtype=torch.int32))
    # vLLM's names for score_func and expert_bias
    bias = torch.linspace(-1, 1, E, dtype=torch.float64)
    sig = moe_ext.fused_moe(x, w1, w2, lg, k, score_func="sigmoid", expert_bias=bias)
    assert torch.equal(moe_ext.fused_moe(x, w1, w2, lg, k, scoring_func="sigmoid", e_score_correction_bias=bias), sig)
    assert not torch.equal(sig, want)
    with pytest.raises(ValueError, match="give score_func or scoring_func, not both"):
        moe_ext.fused_moe(x, w1, w2, lg, k, score_func="sigmoid", scoring_func="sigmoid")
    with pytest.raises(ValueError, match="give expert_bias or e_score_correction_bias, not both"):
        moe_ext.fused_moe(x, w1, w2, lg, k, expert_bias=bias, e_score_correction_bias=bias)


def test_layer_matches_textbook_naive_loop_seed_chapter_expert():
    # The seed chapter's layer: 8 experts, top-2, Linear-GELU-Linear experts with biases.
    layer = moe_ext.MoELayer(32, 64, 8, 2, activation="gelu_no_mul", bias=True).double()
    x = torch.randn(4, 10, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    e = layer.experts
    yr = R.naive_moe(x.reshape(-1, 32), layer.router.weight, e.w1, e.w2, 2, "gelu_no_mul", e.b1, e.b2)
    torch.testing.assert_close(y.reshape(-1, 32), yr)
    params = [x, layer.router.weight, e.w1, e.w2, e.b1, e.b2]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(yr, params, g.reshape(-1, 32))):
        torch.testing.assert_close(a.reshape(b.shape), b)


def test_layer_swiglu_matches_naive_loop_in_bf16():
    torch.manual_seed(1)
    layer = moe_ext.MoELayer(64, 96, 8, 2)
    x = torch.randn(50, 64)
    ref = R.naive_moe(x.double(), layer.router.weight.double(), layer.experts.w1.double(), layer.experts.w2.double(), 2)
    y16 = layer.bfloat16()(x.bfloat16()).double()
    y_pt = R.naive_moe(x.bfloat16(), layer.router.weight, layer.experts.w1, layer.experts.w2, 2).double()
    # flash-attention's rule: no worse than twice PyTorch's own error in the same precision
    assert (y16 - ref).abs().max() <= 2 * (y_pt - ref).abs().max() + 1e-6


def test_layer_parameter_names():
    layer = moe_ext.MoELayer(16, 24, 6, 2, bias=True, num_shared_experts=2)
    names = dict(layer.named_parameters())
    assert names["router.weight"].shape == (6, 16)
    assert names["experts.w1"].shape == (6, 48, 16) and names["experts.w2"].shape == (6, 16, 24)
    assert names["experts.b1"].shape == (6, 48) and names["experts.b2"].shape == (6, 16)
    assert names["shared_experts.w1"].shape == (2, 48, 16) and names["shared_experts.w2"].shape == (2, 16, 24)


def test_shared_experts_are_added_to_every_token():
    layer = moe_ext.MoELayer(16, 24, 6, 2, num_shared_experts=2).double()
    x = torch.randn(9, 16, dtype=torch.float64)
    y = layer(x)
    s = layer.shared_experts
    shared = sum(R.expert_forward(x, s.w1[i], s.w2[i]) for i in range(2))
    routed = R.naive_moe(x, layer.router.weight, layer.experts.w1, layer.experts.w2, 2)
    torch.testing.assert_close(y, routed + shared)


def test_aux_and_z_loss_formula_and_gradient():
    layer = moe_ext.MoELayer(16, 24, 6, 2, aux_loss_coef=0.1, z_loss_coef=0.01).double()
    x = torch.randn(40, 16, dtype=torch.float64)
    layer(x)
    logits = x @ layer.router.weight.t()
    p = torch.softmax(logits, -1)
    ids = p.topk(2, -1).indices
    f = torch.bincount(ids.reshape(-1), minlength=6).double() / (40 * 2)
    lb = 6 * (f * p.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(layer.aux_loss, 0.1 * lb + 0.01 * z)
    (g,) = torch.autograd.grad(layer.aux_loss, layer.router.weight)
    (gr,) = torch.autograd.grad(0.1 * lb + 0.01 * z, layer.router.weight)
    torch.testing.assert_close(g, gr)
    stats = layer.last_stats
    assert stats["tokens_per_expert"].sum() == 80 and float(stats["drop_fraction"]) == 0.0


def test_uniform_routing_gives_unit_load_balancing_loss():
    E, T, k = 4, 8, 2
    tpe = torch.full((E,), T * k // E, dtype=torch.int32)
    assert float(moe_ext.load_balancing_loss(tpe, torch.full((E,), T / E), T, k)) == pytest.approx(1.0)


def test_capacity_drop_keeps_priority_order():
    # 6 tokens, E=3, k=2; capacity = ceil(0.5 * 6 * 2 / 3) = 2
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0], [1, 2]], dtype=torch.int32)
    out = moe_ext.apply_capacity(ids, torch.zeros(6, 3), 3, 2, "drop")
    # first choices: expert 0 <- t0, t1 (t2 dropped); expert 1 <- t3, t5; expert 2 <- t4
    # second choices: t0->1 full, t1->2 ok (2 has t4 + t1), t2->1 full, t3->0 full, t4->0 full, t5->2 full
    assert out.tolist() == [[0, -1], [0, 2], [-1, -1], [1, -1], [2, -1], [1, -1]]


def test_capacity_reroute_moves_to_next_preferred_expert():
    ids = torch.tensor([[0, 1], [0, 1], [0, 1]], dtype=torch.int32)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    out = moe_ext.apply_capacity(ids, logits, 4, 2, "reroute")
    # t2's first choice (0) is full -> its next preferred unchosen expert with room is 2; then its
    # second choice (1) is full (t0, t1) -> 3.
    assert out.tolist() == [[0, 1], [0, 1], [2, 3]]


@pytest.mark.parametrize("overflow,policy", [("drop", "position"), ("reroute", "position"), ("drop", "probs")])
def test_layer_with_capacity(overflow, policy):
    layer = moe_ext.MoELayer(16, 24, 4, 2, capacity_factor=0.75, overflow=overflow, drop_policy=policy).double()
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    cap = math.ceil(0.75 * 20 * 2 / 4)
    kept = layer.last_stats["tokens_per_expert"]
    assert (kept <= cap).all()
    assert float(layer.last_stats["drop_fraction"]) == pytest.approx(1 - int(kept.sum()) / 40)
    # the reference: the same dropped ids through the sort-based path
    g = moe_ext.topk_gating(x.detach() @ layer.router.weight.t(), 2)
    if overflow == "drop":
        ids = R.capacity_drop(g.expert_ids, cap, g.weights if policy == "probs" else None)
    else:
        ids = R.capacity_reroute(g.expert_ids, x.detach() @ layer.router.weight.t(), cap)
    ref = torch.zeros_like(x)
    for t in range(20):
        for j in range(2):
            e = int(ids[t, j])
            if e >= 0:
                ref[t] += g.weights[t, j] * R.expert_forward(x[t:t + 1], layer.experts.w1[e], layer.experts.w2[e])[0]
    torch.testing.assert_close(y, ref.detach())
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_expert_choice_routing():
    layer = moe_ext.MoELayer(16, 24, 4, 2, routing="expert_choice", score_func="softmax").double()
    x = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    C = math.ceil(10 * 2 / 4)
    assert layer.last_stats["tokens_per_expert"].tolist() == [C] * 4
    scores = torch.softmax(x @ layer.router.weight.t(), -1)
    ref = torch.zeros_like(x)
    for e in range(4):
        top = torch.sort(-scores[:, e], stable=True).indices[:C]
        ref[top] += scores[top, e].unsqueeze(1) * R.expert_forward(x[top], layer.experts.w1[e], layer.experts.w2[e])
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert layer.router.weight.grad is not None


def test_jitter_only_in_training():
    layer = moe_ext.MoELayer(16, 24, 4, 2, jitter_eps=0.5).double()
    x = torch.randn(30, 16, dtype=torch.float64)
    layer.eval()
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_sigmoid_grouped_routing_layer_runs():
    layer = moe_ext.MoELayer(16, 8, 16, 4, score_func="sigmoid", n_group=4, topk_group=2,
                             routed_scaling_factor=2.5).double()
    x = torch.randn(12, 16, dtype=torch.float64)
    lg = x @ layer.router.weight.t()
    w, ids, *_ = R.topk_gating(lg, 4, score_func="sigmoid", num_groups=4, topk_groups=2, routed_scaling=2.5)
    ref = torch.zeros_like(x)
    for t in range(12):
        for j in range(4):
            e = int(ids[t, j])
            ref[t] += w[t, j] * R.expert_forward(x[t:t + 1], layer.experts.w1[e], layer.experts.w2[e])[0]
    torch.testing.assert_close(layer(x), ref)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    layer = moe_ext.MoELayer(16, 24, 4, 2, aux_loss_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(12, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)  # inductor: the real CPU path
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("kwargs", [{"capacity_factor": 0.75}, {"capacity_factor": 0.75, "overflow": "reroute"},
                                    {"capacity_factor": 0.75, "drop_policy": "probs"},
                                    {"routing": "expert_choice"}])
def test_torch_compile_fullgraph_routing_policies(kwargs):
    """Capacity and expert choice trace without a graph break (aot_eager: dynamo and AOTAutograd, no
    inductor codegen). A data-dependent check in apply_capacity once broke the drop path here."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = moe_ext.MoELayer(16, 24, 4, 2, aux_loss_coef=0.01, **kwargs)
    x = torch.randn(12, 16, requires_grad=True)
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, layer(x))
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (rx,) = torch.autograd.grad(layer(x).square().sum(), x)
    torch.testing.assert_close(gx, rx)


def test_build_info():
    info = moe_ext.build_info()
    assert isinstance(info["cuda"], bool) and isinstance(info["cuda_archs"], list)
    assert info["cutlass"] is None or isinstance(info["cutlass"], str)
    assert info["cxx"].split()[0] in ("GNU", "Clang", "AppleClang", "IntelLLVM"), info["cxx"]
    if info["cuda"]:
        assert info["cuda_archs"], info
    gemm = info["grouped_gemm"]
    assert set(gemm) == {"sm80", "sm90", "fp16", "tf32_sm80", "tf32_sm90", "f32_sm80", "f32_sm90"}
    assert all(isinstance(v, bool) for v in gemm.values())
    if info["cutlass"] is None:  # every CUTLASS kernel family needs it
        assert not any(gemm.values()), info
    archs = info["cuda_archs"]
    assert gemm["sm90"] <= ("90a" in archs) and gemm["tf32_sm90"] <= ("90a" in archs)
    assert gemm["tf32_sm80"] <= any(a.startswith("8") for a in archs)
    assert gemm["f32_sm80"] == (info["cutlass"] is not None and any(a.startswith("8") for a in archs))
    assert gemm["f32_sm90"] == (info["cutlass"] is not None and "90a" in archs)


def test_cpu_results_do_not_depend_on_thread_count():
    """Every CPU kernel splits work with at::parallel_for (OpenMP); fixed summation orders make the
    forward and all gradients bitwise the same on 1 thread and on several."""
    import moe_ext.functional as MF
    T, E, k, H, F_ = 600, 16, 3, 40, 24
    x = torch.randn(T, H, requires_grad=True)
    lg = torch.randn(T, E, requires_grad=True)
    w1 = torch.randn(E, 2 * F_, H, requires_grad=True)
    w2 = torch.randn(E, H, F_, requires_grad=True)

    def run(threads):
        torch.set_num_threads(threads)
        for t in (x, lg, w1, w2):
            t.grad = None
        y = MF.fused_moe(x, w1, w2, lg, k, activation="gelu_tanh")
        g = MF.topk_gating(lg, k, score_func="sigmoid", num_groups=4, topk_groups=2)
        (y.square().sum() + g.score_sum.sum() + g.weights.sum()).backward()
        return [y.detach(), *(t.grad for t in (x, lg, w1, w2)), *g]

    before = torch.get_num_threads()
    try:
        one, many = run(1), run(max(2, before))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, _NO_GPU])])
@pytest.mark.parametrize("kw", [{}, {"capacity_factor": 0.75, "overflow": "reroute", "num_shared_experts": 1},
                                {"routing": "expert_choice"}, {"recompute": True, "bias": True}])
def test_layer_under_use_deterministic_algorithms(device, kw, monkeypatch):
    """torch.use_deterministic_algorithms(True) raises on any op with a nondeterministic kernel: none is
    on the layer's path, forward or backward, and two runs give the same bits."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what torch asks of its own CUDA matmuls
    torch.manual_seed(0)
    layer = moe_ext.MoELayer(72, 40, 7, 3, aux_loss_coef=0.01, z_loss_coef=0.001, **kw).to(device)
    x = torch.randn(2, 50, 72, device=device, requires_grad=True)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            y = layer(x)
            loss = y.square().sum() + layer.aux_loss
            runs.append([y, *torch.autograd.grad(loss, [x, *layer.parameters()])])
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
