"""moe_ext inside transformers: register() (experts_implementation="moe_ext") and replace_moe_blocks(),
compared with transformers' own eager implementation on tiny random models, logits and every gradient."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moe_ext  # noqa: E402
from moe_ext.integrations import transformers as mt  # noqa: E402

VOCAB = 64


def _configs():
    C = transformers
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, pad_token_id=0)
    return {
        "mixtral": lambda: C.MixtralConfig(**common, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
        "qwen2_moe": lambda: C.Qwen2MoeConfig(**common, intermediate_size=40, moe_intermediate_size=24,
                                              shared_expert_intermediate_size=20, num_experts=6,
                                              num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False),
        "qwen2_moe_norm": lambda: C.Qwen2MoeConfig(**common, intermediate_size=40, moe_intermediate_size=24,
                                                   shared_expert_intermediate_size=20, num_experts=6,
                                                   num_experts_per_tok=3, decoder_sparse_step=1, norm_topk_prob=True),
        "qwen3_moe": lambda: C.Qwen3MoeConfig(**common, intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                                              num_experts_per_tok=2, head_dim=8, decoder_sparse_step=1,
                                              norm_topk_prob=True),
        "olmoe": lambda: C.OlmoeConfig(**common, intermediate_size=24, num_experts=8, num_experts_per_tok=2),
        "deepseek_v3": lambda: C.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16,
                                                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                                                  n_group=4, topk_group=2, first_k_dense_replace=1,
                                                  kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                                  v_head_dim=8, qk_nope_head_dim=8, routed_scaling_factor=2.5),
        "deepseek_v2": lambda: C.DeepseekV2Config(**{**common, "num_key_value_heads": 4}, intermediate_size=48,
                                                  moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
                                                  num_experts_per_tok=3, n_group=4, topk_group=2,
                                                  topk_method="group_limited_greedy", first_k_dense_replace=1,
                                                  kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8,
                                                  qk_nope_head_dim=8, routed_scaling_factor=16.0),
        "deepseek_v2_greedy": lambda: C.DeepseekV2Config(**{**common, "num_key_value_heads": 4},
                                                         intermediate_size=48, moe_intermediate_size=16,
                                                         n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
                                                         topk_method="greedy", first_k_dense_replace=0,
                                                         kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                                         v_head_dim=8, qk_nope_head_dim=8),
        # layout flags: is_concatenated=False, is_transposed=True, has_bias=True, custom _apply_gate
        "gpt_oss": lambda: C.GptOssConfig(**{**common, "num_key_value_heads": 2}, intermediate_size=24,
                                          num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=8,
                                          layer_types=["sliding_attention", "full_attention"]),
    }


CONFIGS = _configs()
REPLACEABLE = ["mixtral", "qwen2_moe", "qwen2_moe_norm", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v2_greedy",
               "deepseek_v3", "gpt_oss"]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    mt.register()
    yield


def _randomize(model, seed=0):
    """Bigger-than-default router weights and biases, so routing is decisive and every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1:
                router = "gate.weight" in name or "router.weight" in name
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if router else 0.1))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.1)


def _build(family, impl, dtype, state=None):
    cfg = CONFIGS[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation=impl,
                                                          attn_implementation="eager")
    model = model.to(dtype)
    if state is None:
        _randomize(model)
    else:
        model.load_state_dict(state)
    return model


def _run(model, ids, train=False):
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids)
    g = torch.Generator().manual_seed(1)
    (out.logits * torch.randn(out.logits.shape, generator=g, dtype=out.logits.dtype)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _compare(a, b, tol):
    la, ga = a
    lb, gb = b
    torch.testing.assert_close(la, lb, **tol)
    assert set(ga) == set(gb), set(ga) ^ set(gb)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], **tol, msg=lambda m: f"{n}: {m}")


def _ids(B=2, S=12, seed=3):
    return torch.randint(1, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_register_matches_eager(family):
    ref = _build(family, "eager", torch.float64)
    state = ref.state_dict()
    ours = _build(family, "moe_ext", torch.float64, state)
    assert ours.config._experts_implementation == "moe_ext"
    ids = _ids()
    # Same router (transformers'), experts through moe_ext: float64 throughout, tight.
    _compare(_run(ours, ids), _run(ref, ids), dict(atol=1e-12, rtol=1e-10))


def test_register_runs_moe_ext_ops(monkeypatch):
    calls = []
    real = moe_ext.functional.grouped_gemm
    monkeypatch.setattr(moe_ext.functional, "grouped_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _build("qwen3_moe", "moe_ext", torch.float32)
    model(input_ids=_ids())
    assert len(calls) == 2 * model.config.num_hidden_layers


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])  # GPT-OSS: [E, in, out] weights, biases
def test_register_recompute_matches_and_saves_less(family):
    """register(name, recompute=True): the same logits and gradients, bit for bit, with less saved."""
    from test_checkpointing import _saved_bytes
    mt.register("moe_ext_recompute", recompute=True)
    try:
        ref = _build(family, "moe_ext", torch.float64)
        ours = _build(family, "moe_ext_recompute", torch.float64, ref.state_dict())
        ids = _ids()
        _compare(_run(ours, ids), _run(ref, ids), dict(atol=0, rtol=0))
        c = ours.config
        F_ = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
        per_layer = ids.numel() * c.num_experts_per_tok * (c.hidden_size + F_) * 8  # x_sorted and act(h), fp64
        saved = _saved_bytes(lambda: ref(input_ids=ids)) - _saved_bytes(lambda: ours(input_ids=ids))
        assert saved == c.num_hidden_layers * per_layer
    finally:
        mt.unregister("moe_ext_recompute")


def test_register_float32_and_set_experts_implementation():
    ref = _build("mixtral", "eager", torch.float32)
    ours = copy.deepcopy(ref)
    ours.set_experts_implementation("moe_ext")
    ids = _ids()
    _compare(_run(ours, ids), _run(ref, ids), dict(atol=2e-5, rtol=2e-5))


def test_register_matches_grouped_mm_bfloat16():
    ref = _build("qwen3_moe", "grouped_mm", torch.bfloat16)
    ours = _build("qwen3_moe", "moe_ext", torch.bfloat16, ref.state_dict())
    ids = _ids()
    la, _ = _run(ours, ids)
    lb, _ = _run(ref, ids)
    torch.testing.assert_close(la.float(), lb.float(), atol=0.1, rtol=0.05)


def test_register_under_autocast_runs_experts_in_bfloat16(monkeypatch):
    """An fp32 model under torch.autocast: the experts run in bf16, as transformers' eager experts
    (nn.functional.linear) do, and the logits agree with eager's to bf16 precision."""
    dtypes = []
    real = moe_ext.functional.grouped_gemm
    monkeypatch.setattr(moe_ext.functional, "grouped_gemm",
                        lambda *a, **k: (lambda out: dtypes.append(out.dtype) or out)(real(*a, **k)))
    ref = _build("qwen3_moe", "eager", torch.float32)
    ours = _build("qwen3_moe", "moe_ext", torch.float32, ref.state_dict())
    ids = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la, ga = _run(ours, ids)
        lb, gb = _run(ref, ids)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    torch.testing.assert_close(la.float(), lb.float(), atol=0.1, rtol=0.05)
    assert set(ga) == set(gb) and all(g.dtype == torch.float32 for g in ga.values())


# Routing in the replaced blocks is moe_ext.topk_gating in fp32 (transformers routes in fp32 too, even for
# float64 models): the scores can differ from torch.softmax/sigmoid by an ulp of fp32, so the comparison is at
# fp32 precision even in float64; the selections are identical.
REPLACE_TOL = dict(atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", REPLACEABLE)
def test_replace_moe_blocks_matches_eager(family):
    ref = _build(family, "eager", torch.float64)
    ours = _build(family, "eager", torch.float64, ref.state_dict())
    before = {n: p for n, p in ours.named_parameters()}
    keys = set(ours.state_dict())
    replaced = mt.replace_moe_blocks(ours)
    expected = ours.config.num_hidden_layers - getattr(ours.config, "first_k_dense_replace", 0)
    assert len(replaced) == expected and all(isinstance(ours.get_submodule(n), mt.MoEBlock) for n in replaced)
    after = dict(ours.named_parameters())
    assert set(after) == set(before) and all(after[n] is before[n] for n in before)  # shared, not copied
    assert set(ours.state_dict()) == keys
    ids = _ids()
    _compare(_run(ours, ids), _run(ref, ids), REPLACE_TOL)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_replace_moe_blocks_float32_and_router_logits(family):
    ref = _build(family, "eager", torch.float32)
    ours = _build(family, "eager", torch.float32, ref.state_dict())
    mt.replace_moe_blocks(ours)
    ids = _ids()
    _compare(_run(ours, ids), _run(ref, ids), dict(atol=2e-5, rtol=2e-5))
    ref.eval(), ours.eval()
    a = ref(input_ids=ids, output_router_logits=True)
    b = ours(input_ids=ids, output_router_logits=True)
    assert len(b.router_logits) == ours.config.num_hidden_layers
    for x, y in zip(a.router_logits, b.router_logits):
        torch.testing.assert_close(x, y)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)


def test_replace_moe_blocks_mixtral_jitter_in_training():
    ref = _build("mixtral", "eager", torch.float64)
    ref.config.router_jitter_noise = 0.1
    for m in ref.modules():
        if hasattr(m, "jitter_noise"):
            m.jitter_noise = 0.1
    ours = copy.deepcopy(ref)
    mt.replace_moe_blocks(ours)
    ids = _ids()
    torch.manual_seed(7)
    a = _run(ours, ids, train=True)
    torch.manual_seed(7)
    b = _run(ref, ids, train=True)
    _compare(a, b, REPLACE_TOL)


def test_replace_and_register_together():
    ref = _build("deepseek_v3", "eager", torch.float64)
    ours = _build("deepseek_v3", "moe_ext", torch.float64, ref.state_dict())
    mt.replace_moe_blocks(ours)
    ids = _ids()
    _compare(_run(ours, ids), _run(ref, ids), REPLACE_TOL)


def test_deepseek_group_masking():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    assert mt._group_fill_of(DeepseekV3TopkRouter) == float("-inf")  # this transformers version

    class ZeroFill:
        def forward(self, x):
            s = x
            return s.masked_fill(~score_mask.bool(), 0.0)  # noqa: F821

    assert mt._group_fill_of(ZeroFill) == 0.0
    torch.manual_seed(0)
    T, E, k, G, TG = 50, 16, 4, 4, 2
    scores = torch.rand(T, E)
    bias = torch.randn(E) * 0.8  # many biased scores negative
    # -inf masking: the op (exclusion of dropped groups) selects exactly what transformers selects
    ref_ids = mt.grouped_topk_python(scores, bias, k, G, TG, float("-inf")).sort(-1).values
    logits = torch.logit(scores)
    g = moe_ext.topk_gating(logits, k, score_func="sigmoid", expert_bias=bias, num_groups=G, topk_groups=TG)
    assert torch.equal(g.expert_ids.long().sort(-1).values, ref_ids)
    # 0.0 masking (older transformers / DeepSeek-V2): dropped groups' experts outrank negative kept ones
    zero_ids = mt.grouped_topk_python(scores, bias, k, G, TG, 0.0).sort(-1).values
    assert not torch.equal(zero_ids, ref_ids)
    router = DeepseekV3TopkRouter(CONFIGS["deepseek_v3"]())
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.copy_(torch.randn(router.num_experts))
    x = torch.randn(20, router.hidden_dim)
    for fill in (float("-inf"), 0.0):
        ours = mt._moe_ext_router(router, "sigmoid_group")
        type(ours)._moe_ext_group_fill = fill
        lo, w, ids = ours(x)
        s = lo.sigmoid()
        exp = mt.grouped_topk_python(s, router.e_score_correction_bias, router.top_k, router.num_group,
                                     router.topk_group, fill)
        assert torch.equal(ids.long().sort(-1).values, exp.sort(-1).values)
    type(ours)._moe_ext_group_fill = float("-inf")


def test_load_balancing_loss_is_k_times_smaller_than_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    torch.manual_seed(0)
    T, E = 40, 8
    logits = torch.randn(T, E)
    for k in (1, 2, 3):
        g = moe_ext.topk_gating(logits, k)
        ours = moe_ext.load_balancing_loss(g.tokens_per_expert, g.score_sum, T, k)
        hf = load_balancing_loss_func((logits,), E, k)
        torch.testing.assert_close(hf, k * ours, atol=1e-6, rtol=1e-5)


def test_unsupported_block_class_is_an_error():
    with pytest.raises(ValueError, match="unsupported"):
        mt.replace_moe_blocks(torch.nn.Linear(2, 2), classes=["NoSuchBlock"])


def test_bench_runs_tiny():
    from moe_ext.integrations import bench_transformers as bt
    res = bt.bench(hidden=32, ffn=48, experts=4, top_k=2, tokens=16, reps=1, warmup=0,
                   impls=("moe_ext", "grouped_mm", "eager"))
    assert set(res) == {"moe_ext", "grouped_mm", "eager"} and all(v["fwd"] > 0 and v["fwd_bwd"] > 0
                                                                    for v in res.values())


@pytest.mark.parametrize("family", ["llama4", "gpt_oss"])
def test_bench_block_runs_tiny(family):
    from moe_ext.integrations import bench_transformers as bt
    res = bt.bench_block(family, hidden=32, ffn=16, experts=4, top_k=2, tokens=12, reps=1, warmup=0)
    impls = {"eager", "moe_ext"} | ({"grouped_mm"} if family == "gpt_oss" else set())
    assert impls <= set(res) and all(res[i]["fwd"] > 0 and res[i]["fwd_bwd"] > 0 for i in impls)
    assert res["max_abs_diff"] < 1e-4


def test_fused_silu_and_mul_only_for_default_silu_gate():
    mix = _build("mixtral", "moe_ext", torch.float64)
    oss = _build("gpt_oss", "moe_ext", torch.float64)
    assert mt._silu_and_mul_applies(mix.model.layers[0].mlp.experts)
    assert not mt._silu_and_mul_applies(oss.model.layers[0].mlp.experts)  # its own clamped, interleaved gate
    assert mt._fused_gate(mix.model.layers[0].mlp.experts) == "silu"
    assert mt._fused_gate(oss.model.layers[0].mlp.experts) == "swigluoai"
    h = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    for act, fn in (("silu", torch.nn.functional.silu), ("gelu", torch.nn.functional.gelu),
                    ("gelu_tanh", lambda v: torch.nn.functional.gelu(v, approximate="tanh"))):
        torch.autograd.gradcheck(lambda x: moe_ext.functional.apply_activation(x, act), (h,))
        gate, up = h.chunk(2, -1)
        torch.testing.assert_close(moe_ext.functional.apply_activation(h, act), fn(gate) * up, atol=1e-14, rtol=1e-12)


def _clamping_gpt_oss(impl):
    """A float64 GPT-OSS whose expert biases push about half of the gate / up pre-activations past the clamp
    limit (+-7), so both clamps and their zero gradients are exercised."""
    model = _build("gpt_oss", impl, torch.float64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            b = layer.mlp.experts.gate_up_proj_bias
            b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 8)
    return model


def test_gpt_oss_fused_gate_and_clamps_match_eager():
    """GPT-OSS's experts run moe_ext's "swigluoai" kernel (not their _apply_gate), and equal eager in float64
    with many inputs beyond the clamp limits; with another limit the module's own _apply_gate runs."""
    ref = _clamping_gpt_oss("eager")
    ours = _build("gpt_oss", "moe_ext", torch.float64, ref.state_dict())
    experts = ours.model.layers[0].mlp.experts
    assert mt._fused_gate(experts) == "swigluoai"
    calls = []
    experts._apply_gate = lambda h: calls.append(1) or type(experts)._apply_gate(experts, h)
    assert mt._fused_gate(experts) is None  # an instance override runs as written
    del experts._apply_gate
    ids = _ids()
    _compare(_run(ours, ids), _run(ref, ids), dict(atol=1e-12, rtol=1e-10))
    replaced = _build("gpt_oss", "eager", torch.float64, ref.state_dict())
    mt.replace_moe_blocks(replaced)
    _compare(_run(replaced, ids), _run(ref, ids), REPLACE_TOL)
    for m in (ref, ours):
        for layer in m.model.layers:
            layer.mlp.experts.limit = 5.0
    assert mt._fused_gate(ours.model.layers[0].mlp.experts) is None
    _compare(_run(ours, ids), _run(ref, ids), dict(atol=1e-12, rtol=1e-10))


def _gpt_oss_block(gate_up_bias_scale=1.0):
    """A float64 GptOssMLP of the tiny config, parameters N(0, 0.5^2) (the experts' gate_up bias scaled)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    cfg = CONFIGS["gpt_oss"]()
    torch.manual_seed(0)
    block = GptOssMLP(cfg).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
        block.experts.gate_up_proj_bias.mul_(gate_up_bias_scale)
    return block, cfg


def test_gpt_oss_replaced_block_returns_what_transformers_returns():
    block, cfg = _gpt_oss_block()
    wrapper = torch.nn.Module()
    wrapper.mlp = orig = copy.deepcopy(block)
    assert mt.replace_moe_blocks(wrapper) == ["mlp"]
    router = wrapper.mlp.router  # the block's attribute name, so the same state_dict keys
    assert isinstance(router, type(block.router)) and type(router) is not type(block.router)
    assert router.weight is orig.router.weight and router.bias is orig.router.bias
    assert set(wrapper.mlp.state_dict()) == set(block.state_dict())
    x = torch.randn(2, 9, cfg.hidden_size, dtype=torch.float64)
    y_ref, scores_ref = block(x)
    y, scores = wrapper.mlp(x)
    torch.testing.assert_close(y, y_ref, **REPLACE_TOL)
    torch.testing.assert_close(scores, scores_ref, **REPLACE_TOL)


def test_gpt_oss_router_bf16_weights_bit_identical():
    """In bf16 the replaced GPT-OSS router's weights are transformers' bit for bit wherever it selects the same
    experts (all rows but exact ties, which the op gives to the lower id)."""
    block, _ = _gpt_oss_block()
    router = block.router.to(torch.bfloat16)
    ours = mt._moe_ext_router(router, "gpt_oss")
    x = torch.randn(200, router.weight.shape[1], dtype=torch.bfloat16)
    with torch.no_grad():
        logits, scores, ids = router(x)
        logits2, w, ids2 = ours(x)
    assert torch.equal(logits, logits2)
    same = (ids == ids2.long()).all(-1)
    assert same.float().mean() > 0.9
    assert torch.equal(w[same], scores[same])
    top = logits.float().topk(3, -1).values  # k = 2: a row that differs has a tie among its 3 largest logits
    assert ((top[:, 0] == top[:, 1]) | (top[:, 1] == top[:, 2]) | same).all()


def test_gpt_oss_preset_is_the_transformers_block():
    """moe_ext.presets.gpt_oss with GptOssMLP's weights (w1 = gate_up_proj^T, interleaved rows; the router's
    bias) computes the block's output and gradients."""
    block, cfg = _gpt_oss_block(gate_up_bias_scale=16.0)  # past the clamp limits
    H, E, k = cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok
    layer = moe_ext.presets.gpt_oss(d_model=H, d_ff=cfg.intermediate_size, num_experts=E, top_k=k,
                                    dtype=torch.float64)
    ex, r = block.experts, block.router
    with torch.no_grad():
        layer.router.weight.copy_(r.weight)
        layer.router.bias.copy_(r.bias)
        layer.experts.w1.copy_(ex.gate_up_proj.transpose(1, 2))
        layer.experts.b1.copy_(ex.gate_up_proj_bias)
        layer.experts.w2.copy_(ex.down_proj.transpose(1, 2))
        layer.experts.b2.copy_(ex.down_proj_bias)
    x = torch.randn(2, 9, H, dtype=torch.float64)
    gy = torch.randn(2, 9, H, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, _ = block(x1)
    y = layer(x2)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    y_ref.backward(gy)
    y.backward(gy)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-12, rtol=1e-10)
    pairs = [(layer.router.weight, r.weight), (layer.router.bias, r.bias),
             (layer.experts.w1, ex.gate_up_proj, True), (layer.experts.b1, ex.gate_up_proj_bias),
             (layer.experts.w2, ex.down_proj, True), (layer.experts.b2, ex.down_proj_bias)]
    for ours, theirs, *t in pairs:
        want = theirs.grad.transpose(1, 2) if t else theirs.grad
        torch.testing.assert_close(ours.grad, want, atol=1e-12, rtol=1e-10)


def _block_families():
    """Sparse MoE blocks checked one block at a time (their whole models need more than a tiny config):
    name -> (modeling module, block class, config)."""
    C = transformers
    common = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    return {
        "qwen3_next": ("qwen3_next", "Qwen3NextSparseMoeBlock", lambda: C.Qwen3NextConfig(
            **common, moe_intermediate_size=16, shared_expert_intermediate_size=20, num_experts=6,
            num_experts_per_tok=2, norm_topk_prob=False)),
        "qwen3_next_norm": ("qwen3_next", "Qwen3NextSparseMoeBlock", lambda: C.Qwen3NextConfig(
            **common, moe_intermediate_size=16, shared_expert_intermediate_size=20, num_experts=6,
            num_experts_per_tok=3, norm_topk_prob=True)),
        "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock", lambda: C.Qwen3_5MoeTextConfig(
            **common, moe_intermediate_size=16, shared_expert_intermediate_size=20, num_experts=6,
            num_experts_per_tok=3)),
        "glm4_moe": ("glm4_moe", "Glm4MoeMoE", lambda: C.Glm4MoeConfig(
            **common, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
            n_group=4, topk_group=2, routed_scaling_factor=2.5)),
        "dots1": ("dots1", "Dots1MoE", lambda: C.Dots1Config(
            **common, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
            n_group=4, topk_group=2, routed_scaling_factor=2.5)),
        "minimax_m2": ("minimax_m2", "MiniMaxM2SparseMoeBlock", lambda: C.MiniMaxM2Config(
            **common, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, router_jitter_noise=0.1)),
        # three of the blocks mt.SAME_CODE_AS and the Qwen3-VL entry add, run as well as compared by source
        "qwen3_vl_moe": ("qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock", lambda: C.Qwen3VLMoeTextConfig(
            **common, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=3)),
        "minimax": ("minimax", "MiniMaxSparseMoeBlock", lambda: C.MiniMaxConfig(
            **common, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, router_jitter_noise=0.1)),
        "deepseek_v32": ("deepseek_v32", "DeepseekV32MoE", lambda: C.DeepseekV32Config(
            **common, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
            n_group=4, topk_group=2, routed_scaling_factor=2.5)),
        "ernie4_5_moe": ("ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock", lambda: C.Ernie4_5_MoeConfig(
            **common, moe_intermediate_size=16, moe_num_experts=8, moe_k=3, moe_num_shared_experts=1)),
        "ernie4_5_moe_unshared": ("ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock", lambda: C.Ernie4_5_MoeConfig(
            **common, moe_intermediate_size=16, moe_num_experts=6, moe_k=2, moe_num_shared_experts=0)),
        "granitemoe": ("granitemoe", "GraniteMoeMoE", lambda: C.GraniteMoeConfig(
            **common, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2)),
        "granitemoe_swa": ("granitemoe_swa", "GraniteMoeSWAMoE", lambda: C.GraniteMoeSWAConfig(
            **common, intermediate_size=16, num_local_experts=6, num_experts_per_tok=3)),
        "llama4": ("llama4", "Llama4TextMoe", lambda: C.Llama4TextConfig(
            **common, intermediate_size=16, intermediate_size_mlp=24, num_local_experts=4, num_experts_per_tok=1)),
        "llama4_top2": ("llama4", "Llama4TextMoe", lambda: C.Llama4TextConfig(
            **common, intermediate_size=16, intermediate_size_mlp=24, num_local_experts=5, num_experts_per_tok=2)),
    }


BLOCK_FAMILIES = _block_families()


@pytest.mark.parametrize("family", list(BLOCK_FAMILIES))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_replace_block_matches_the_block(family, train):
    """One replaced block against the installed block in float64: output, the input's and every parameter's
    gradient, the same state_dict keys and shared parameters (MiniMax-M2 in training: the same jitter draw)."""
    block = _family_block(family)
    assert type(block).__name__ in mt.SUPPORTED_BLOCKS
    g = torch.Generator().manual_seed(3)
    wrapper = torch.nn.Module()
    wrapper.mlp = copy.deepcopy(block)
    before = dict(wrapper.named_parameters())
    assert mt.replace_moe_blocks(wrapper) == ["mlp"] and isinstance(wrapper.mlp, mt.MoEBlock)
    assert mt.replace_moe_blocks(wrapper) == []  # a replaced block is left alone
    after = dict(wrapper.named_parameters())
    assert set(after) == set(before) and all(after[n] is before[n] for n in before)
    assert set(wrapper.mlp.state_dict()) == set(block.state_dict())
    block.train(train), wrapper.train(train)
    x = torch.randn(2, 9, 32, generator=g, dtype=torch.float64)
    gy = torch.randn(2, 9, 32, generator=g, dtype=torch.float64)
    results = []
    for m in (block, wrapper.mlp):
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        out = m(xi.clone())  # a copy: MiniMax-M2's jitter scales its input in place
        y, second = out if isinstance(out, tuple) else (out, None)  # Llama 4: ([T, H], router_logits)
        y.backward(gy.reshape(y.shape))
        results.append((y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}, second))
    (y_ref, gx_ref, gp_ref, second_ref), (y, gx, gp, second) = results
    assert (second is None) == (second_ref is None)
    if second is not None:
        torch.testing.assert_close(second.detach(), second_ref.detach(), atol=1e-12, rtol=1e-10)

    def close(a, b, what):  # fp32 routing (both sides): its rounding, relative to the tensor's scale
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5, msg=lambda m: f"{what}: {m}")
    close(y, y_ref, "output")
    close(gx, gx_ref, "d x")
    assert set(gp) == set(gp_ref)
    for n in gp_ref:
        if gp_ref[n] is None:
            assert gp[n] is None, n
        else:
            close(gp[n], gp_ref[n], n)


def test_llama4_model_replaced_matches_eager():
    """A whole tiny Llama 4 (every layer a MoE block): logits and every gradient against eager, float64."""
    cfg = transformers.Llama4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16,
                                        intermediate_size_mlp=24, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
                                        interleave_moe_layer_step=1, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").double()
    _randomize(ref)
    ours = copy.deepcopy(ref)
    assert len(mt.replace_moe_blocks(ours)) == 2
    ids = _ids()
    _compare(_run(ours, ids), _run(ref, ids), REPLACE_TOL)


@pytest.mark.parametrize("family", ["qwen3_5_moe", "minimax_m2", "llama4_top2"])
def test_replaced_block_compiles_fullgraph(family):
    """torch.compile(fullgraph=True) of a replaced block: no graph break, the eager block's output."""
    wrapper = torch.nn.Module()
    wrapper.mlp = _family_block(family).float()
    mt.replace_moe_blocks(wrapper)
    wrapper.eval()  # no jitter: the same output from both
    x = torch.randn(2, 5, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(wrapper.mlp, fullgraph=True, backend="aot_eager")
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    y, y_eager = first(compiled(x)), first(wrapper.mlp(x))
    torch.testing.assert_close(y, y_eager)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_eager,) = torch.autograd.grad(y_eager.sum(), x)
    torch.testing.assert_close(gx, gx_eager)


# The module of each block in mt.SAME_CODE_AS and of the blocks they name.
_BLOCK_MODULES = {
    "MixtralSparseMoeBlock": "mixtral", "OlmoeSparseMoeBlock": "olmoe", "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "Qwen3NextSparseMoeBlock": "qwen3_next", "DeepseekV2Moe": "deepseek_v2", "DeepseekV3MoE": "deepseek_v3",
    "Glm4MoeMoE": "glm4_moe", "MiniMaxSparseMoeBlock": "minimax", "FlexOlmoSparseMoeBlock": "flex_olmo",
    "MellumSparseMoeBlock": "mellum", "Qwen3OmniMoeThinkerTextSparseMoeBlock": "qwen3_omni_moe",
    "Qwen4ExpTextSparseMoeBlock": "qwen4_exp", "DeepseekOcr2TextMoe": "deepseek_ocr2",
    "Glm5NextTextMoE": "glm5_next", "KimiLinearMoE": "kimi_linear", "DeepseekV32MoE": "deepseek_v32",
    "Glm4MoeLiteMoE": "glm4_moe_lite", "Glm4vMoeTextMoE": "glm4v_moe", "GlmMoeDsaMoE": "glm_moe_dsa",
    "HYV4MoE": "hy_v4", "SolarOpenMoE": "solar_open", "GraniteMoeMoE": "granitemoe",
    "GraniteMoeSharedMoE": "granitemoeshared", "GraniteMoeHybridMoE": "granitemoehybrid",
}


def _block_code(name):
    """The block's forward and __init__ and its router class's, without comments and docstrings and with the
    model prefix of its helper classes (XConfig, XMLP, XExperts, XTopkRouter, ...) removed."""
    import importlib
    import inspect
    import re
    mod = importlib.import_module(f"transformers.models.{_BLOCK_MODULES[name]}.modeling_{_BLOCK_MODULES[name]}")
    cls = getattr(mod, name)

    def norm(fn):
        src = re.sub(r'"""[\s\S]*?"""', "", re.sub(r"#.*", "", inspect.getsource(fn)))
        src = re.sub(r"\b[A-Z]\w*?(Config|RMSNorm|MLP|Experts|Router|TopkRouter|TopKRouter)\b", r"X\1", src)
        return re.sub(r"\s+", " ", src).strip()
    router = re.search(r"self\.(?:gate|router) = (\w+)\(", inspect.getsource(cls.__init__)).group(1)
    rcls = getattr(mod, router)
    return [norm(cls.forward), norm(cls.__init__), norm(rcls.forward), norm(rcls.__init__)]


@pytest.mark.parametrize("name", sorted(mt.SAME_CODE_AS))
def test_same_code_blocks_match_their_model(name):
    """Each block replace_moe_blocks handles as another family's is that family's code, in the installed
    transformers (a change there fails here instead of silently changing the maths)."""
    same = mt.SAME_CODE_AS[name]
    assert mt.SUPPORTED_BLOCKS[name] == mt.SUPPORTED_BLOCKS[same]
    assert _block_code(name) == _block_code(same)


def _first_block(family):
    """The first sparse MoE block of a tiny float64 model of CONFIGS[family] (randomized)."""
    model = _build(family, "eager", torch.float64)
    return next(m for m in model.modules() if type(m).__name__ in mt.SUPPORTED_BLOCKS)


def _family_block(family):
    """A float64 block of a whole-model family (CONFIGS) or of a block family (BLOCK_FAMILIES)."""
    if family in CONFIGS:
        return _first_block(family)
    import importlib
    module, cls_name, make_cfg = BLOCK_FAMILIES[family]
    torch.manual_seed(0)
    block = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls_name)(make_cfg())
    block = block.double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in block.named_parameters():  # as _randomize: decisive routing, moderate experts
            router = name in ("gate.weight", "router.weight")
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if router else 0.2))
        for name, b in block.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.3)
    return block


LAYER_FAMILIES = [f for f in list(CONFIGS) + list(BLOCK_FAMILIES) if not f.startswith("llama4")]


@pytest.mark.parametrize("family", LAYER_FAMILIES)
def test_to_moe_layer_matches_the_block(family):
    """to_moe_layer(block) computes the block (eval, float64): output, d x and every parameter's gradient,
    through the Parameters it shares and the shared expert / transposed weights it copies."""
    block = _family_block(family).eval()
    layer = mt.to_moe_layer(block)
    assert isinstance(layer, moe_ext.MoELayer) and layer.router.weight is next(
        p for n, p in block.named_parameters() if n.endswith(("gate.weight", "router.weight")))
    H = layer.router.weight.shape[1]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, H, generator=g, dtype=torch.float64)
    gy = torch.randn(2, 9, H, generator=g, dtype=torch.float64)

    def run(m):
        block.zero_grad(set_to_none=True), layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = m(xi)
        y = (out[0] if isinstance(out, tuple) else out).reshape(x.shape)
        y.backward(gy)
        return y.detach(), xi.grad
    y_ref, gx_ref = run(block)
    ref = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    y, gx = run(layer)

    def close(a, b, what):  # fp32 routing in transformers, float64 in the layer
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5, msg=lambda m: f"{what}: {m}")
    close(y, y_ref, "output")
    close(gx, gx_ref, "d x")
    by_id = {id(p): n for n, p in block.named_parameters()}
    grads = dict(ref)
    for name, p in layer.named_parameters():
        if id(p) in by_id:  # shared
            close(p.grad, grads.pop(by_id[id(p)]), name)
    mlp = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if mlp is not None:
        prefix = "shared_expert." if hasattr(block, "shared_expert") else "shared_experts."
        close(layer.shared_experts.w1.grad[0],
              torch.cat([grads.pop(prefix + "gate_proj.weight"), grads.pop(prefix + "up_proj.weight")]), "shared w1")
        close(layer.shared_experts.w2.grad[0], grads.pop(prefix + "down_proj.weight"), "shared w2")
    if getattr(block.experts, "is_transposed", False):
        close(layer.experts.w1.grad, grads.pop("experts.gate_up_proj").transpose(1, 2), "w1 (transposed)")
        close(layer.experts.w2.grad, grads.pop("experts.down_proj").transpose(1, 2), "w2 (transposed)")
    assert not grads, f"gradients not compared: {sorted(grads)}"


@pytest.mark.parametrize("family", ["qwen2_moe", "minimax_m2", "gpt_oss"])
def test_to_moe_layer_of_a_replaced_block(family):
    """A block already swapped by replace_moe_blocks converts as the original does (same parameters)."""
    block = _family_block(family).eval()
    wrapper = torch.nn.Module()
    wrapper.mlp = block
    mt.replace_moe_blocks(wrapper)
    a, b = mt.to_moe_layer(block), mt.to_moe_layer(wrapper.mlp)
    assert a.router.weight is b.router.weight
    x = torch.randn(3, 4, a.router.weight.shape[1], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)


def test_to_moe_layer_refuses_what_it_cannot_express():
    with pytest.raises(ValueError, match=r"Llama 4 scales each expert's input by its routing weight"):
        mt.to_moe_layer(_family_block("llama4"))
    with pytest.raises(ValueError, match=r"unsupported block class Linear"):
        mt.to_moe_layer(torch.nn.Linear(2, 2))
    block = _family_block("gpt_oss")
    block.experts.limit = 5.0  # not moe_ext's swigluoai any more
    with pytest.raises(ValueError, match=r"the experts' gate is neither SiLU-and-multiply nor GPT-OSS's"):
        mt.to_moe_layer(block)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_offload_moe_blocks_matches_eager(family):
    """A whole tiny model with every block's experts offloaded (2 of them cached per layer): eager's logits."""
    ref = _build(family, "eager", torch.float64).eval()
    ours = copy.deepcopy(ref)
    names = mt.offload_moe_blocks(ours, cache_experts=2, device="cpu")
    assert names and all(isinstance(ours.get_submodule(n), mt.LayerBlock) for n in names)
    ids = _ids()
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5)
    stats = ours.get_submodule(names[0]).layer.stats()
    assert stats["misses"] > 0 and stats["forwards"] == 1


def _ep_block_worker(rank, world, family):
    """Rank `rank` of an expert-parallel to_moe_layer(block): its own tokens against the block itself."""
    from moe_ext.parallel import shard_experts
    block = _family_block(family).eval()
    ep = shard_experts(mt.to_moe_layer(block))
    H = ep.router.weight.shape[1]
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(1, 5 + 4 * rank, H, generator=g, dtype=torch.float64)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    xr, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = block(xr)
    y_ref = (out[0] if isinstance(out, tuple) else out).reshape(x.shape)
    (y_ref * gy).sum().backward()
    y = ep(xe)
    (y * gy).sum().backward()
    for a, b, what in ((y, y_ref, "output"), (xe.grad, xr.grad, "d x")):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5, msg=lambda m: f"{what}: {m}")
    return ep.local_expert_ids


@pytest.mark.parametrize("family", ["glm4_moe", "gpt_oss"])
def test_to_moe_layer_expert_parallel(family):
    """moe_ext.parallel.shard_experts(to_moe_layer(block)) on 2 gloo ranks, each with its own tokens: the
    block's output and input gradient (experts split between the ranks)."""
    from moe_ext._dist_launch import launch
    ranges = launch(_ep_block_worker, 2, family, timeout_s=150)
    assert ranges[0] and ranges[1] and not set(ranges[0]) & set(ranges[1])


def _ep_model_worker(rank, world, family):
    """Rank `rank` of a tiny model whose blocks shard_moe_blocks split over the ranks: its logits on its own
    tokens, and after all_reduce_gradients every gradient, against the unsplit model run on every rank's tokens."""
    from moe_ext.parallel import all_reduce_gradients
    ref = _build(family, "eager", torch.float64).eval()
    ours = copy.deepcopy(ref)
    names = mt.shard_moe_blocks(ours)

    def tokens(r):
        ids = _ids(B=1, S=5 + 3 * r, seed=10 + r)
        g = torch.Generator().manual_seed(20 + r)
        return ids, torch.randn(1, ids.shape[1], VOCAB, generator=g, dtype=torch.float64)
    want = {}
    for r in range(world):
        ids, w = tokens(r)
        ref.zero_grad(set_to_none=True)
        logits = ref(input_ids=ids).logits
        (logits * w).sum().backward()
        for n, p in ref.named_parameters():
            if p.grad is not None:
                want[n] = want.get(n, 0) + p.grad
        if r == rank:
            logits_ref = logits.detach()
    ids, w = tokens(rank)
    logits = ours(input_ids=ids).logits
    (logits * w).sum().backward()
    all_reduce_gradients(ours)

    def close(a, b, what):  # fp32 routing in transformers, float64 in the layer
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5, msg=lambda m: f"{what}: {m}")
    close(logits.detach(), logits_ref, "logits")
    compared = 0
    for n, p in ours.named_parameters():  # the dense model: the same names
        if n in want:
            close(p.grad, want[n], n)
            compared += 1
    for n in names:
        ep = ours.get_submodule(n).layer
        lo, hi = ep.local_expert_ids[0], ep.local_expert_ids[-1] + 1
        close(ep.router.weight.grad, want[n + ".gate.weight"], n + " router")
        close(ep.experts.w1.grad, want[n + ".experts.gate_up_proj"][lo:hi], n + " w1")
        close(ep.experts.w2.grad, want[n + ".experts.down_proj"][lo:hi], n + " w2")
        compared += 3
    return compared


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_shard_moe_blocks_two_ranks(family):
    """shard_moe_blocks on two gloo ranks, each with its own tokens: each rank's logits and, after
    all_reduce_gradients, the gradients of the dense model, the routers and the local experts equal the
    unsplit model's (its gradients summed over both ranks' tokens)."""
    from moe_ext._dist_launch import launch
    compared = launch(_ep_model_worker, 2, family, timeout_s=200)
    assert compared[0] == compared[1] > 10


def test_update_expert_bias_on_replaced_minimax_block():
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2SparseMoeBlock
    wrapper = torch.nn.Module()
    wrapper.mlp = MiniMaxM2SparseMoeBlock(BLOCK_FAMILIES["minimax_m2"][2]())
    bias = wrapper.mlp.e_score_correction_bias
    mt.replace_moe_blocks(wrapper)
    assert wrapper.mlp.e_score_correction_bias is bias  # the block's own buffer
    wrapper.mlp(torch.randn(1, 20, 32))
    load = wrapper.mlp.last_stats["tokens_per_expert"]
    before = bias.clone()
    moe_ext.routing.update_expert_bias(wrapper.mlp, rate=0.01)
    torch.testing.assert_close(bias - before, (0.01 * torch.sign(load.double().mean() - load.double())).float())


def test_update_expert_bias_on_replaced_deepseek_block():
    model = _build("deepseek_v3", "eager", torch.float32)
    name = mt.replace_moe_blocks(model)[0]
    block = model.get_submodule(name)
    model(input_ids=_ids())
    load = block.last_stats["tokens_per_expert"]
    assert int(load.sum()) == _ids().numel() * model.config.num_experts_per_tok
    bias = block.gate.e_score_correction_bias
    before = bias.clone()
    moe_ext.routing.update_expert_bias(block, rate=0.01)
    torch.testing.assert_close(bias - before, (0.01 * torch.sign(load.double().mean() - load.double())).float())
