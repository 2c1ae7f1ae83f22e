"""MoELayer against reference.moe_layer over random combinations of every routing and expert option.

The per-feature tests fix all options but one; these draw them together (hypothesis, derandomized so CI
sees the same examples every run): token or expert choice, softmax or sigmoid scores, renormalisation,
group-limited selection, the selection bias, routed scaling, capacity with drop (position or probs) or
reroute, every activation with and without biases, shared experts with and without their gate, the
batch, sequence and global balance losses and the z-loss (added to the loss or attached to the output),
padding masks, recompute, batched and non-contiguous inputs, and empty batches. In float64 the layer
must give the reference's output, aux loss, statistics and gradients.
"""
import math
import os

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import moe_ext
import moe_ext.offload
from moe_ext import reference as R
from moe_ext.functional import ACTIVATIONS

# MOE_EXT_FUZZ_EXAMPLES=5000 searches further (not derandomized then: a new search each run).
_EXAMPLES = int(os.environ.get("MOE_EXT_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=_EXAMPLES, derandomize="MOE_EXT_FUZZ_EXAMPLES" not in os.environ, deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def layer_configs(draw):
    E = draw(st.integers(1, 9))
    routing = draw(st.sampled_from(["token_choice", "token_choice", "expert_choice"]))
    kw = dict(routing=routing, activation=draw(st.sampled_from(sorted(ACTIVATIONS))), bias=draw(st.booleans()),
              score_func=draw(st.sampled_from(["softmax", "sigmoid"])), router_bias=draw(st.booleans()))
    groups = [g for g in range(2, E + 1) if E % g == 0]
    if routing == "token_choice" and groups and draw(st.booleans()):
        g = draw(st.sampled_from(groups))
        kw.update(n_group=g, topk_group=draw(st.integers(1, g)), group_score=draw(st.sampled_from(["top2_sum", "max"])))
        k = draw(st.integers(1, kw["topk_group"] * (E // g)))
    else:
        k = draw(st.integers(1, E))
    if routing == "token_choice":
        kw.update(renormalize=draw(st.booleans()), routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
                  expert_bias=draw(st.booleans()))
        if draw(st.booleans()):
            kw["capacity_factor"] = draw(st.sampled_from([0.25, 0.5, 1.0, 1.5]))
            kw["overflow"] = draw(st.sampled_from(["drop", "reroute"]))
            if kw["overflow"] == "drop":
                kw["drop_policy"] = draw(st.sampled_from(["position", "probs"]))
        kw["aux_loss_coef"] = draw(st.sampled_from([0.0, 0.1]))
        kw["aux_loss_scope"] = draw(st.sampled_from(["batch", "sequence", "global"]))
    elif draw(st.booleans()):
        kw["capacity_factor"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
    kw["z_loss_coef"] = draw(st.sampled_from([0.0, 0.01]))
    shared = draw(st.integers(0, 2))
    if shared:
        kw.update(num_shared_experts=shared, shared_expert_gate=draw(st.booleans()))
    kw["recompute"] = draw(st.booleans())
    kw["attach_aux_loss"] = draw(st.booleans())  # the aux gradient rides on y; .aux_loss is then detached
    B, S = draw(st.integers(1, 3)), draw(st.integers(0, 7))
    return dict(E=E, k=k, H=draw(st.integers(1, 12)), F=draw(st.integers(1, 8)), B=B, S=S,
                batched=draw(st.booleans()), masked=draw(st.booleans()), noncontig=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)), kw=kw)


def _build(c):
    torch.manual_seed(c["seed"])
    layer = moe_ext.MoELayer(c["H"], c["F"], c["E"], c["k"], dtype=torch.float64, **c["kw"])
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.uniform_(-0.3, 0.3)
    with torch.no_grad():
        if layer.router.bias is not None:
            layer.router.bias.uniform_(-0.5, 0.5)
        if layer.experts.b1 is not None and layer.experts.activation == "swigluoai":
            layer.experts.b1.mul_(20)  # GPT-OSS's clamps at +-7 then cut some of the gradients
    if layer.shared_experts is None and "num_shared_experts" in c["kw"]:
        raise AssertionError("shared experts were not built")
    B, S, H = c["B"], c["S"], c["H"]
    x = torch.randn(H, B, S, dtype=torch.float64).permute(1, 2, 0) if c["noncontig"] else \
        torch.randn(B, S, H, dtype=torch.float64)
    mask = torch.rand(B, S) < 0.7 if c["masked"] else None
    if not c["batched"]:  # one sequence of B * S tokens
        x, mask = x.reshape(B * S, H), None if mask is None else mask.reshape(B * S)
    return layer, x.requires_grad_(), mask


def _grads(loss, inputs):
    """d loss / d inputs, None for an input the loss does not use (the reference of an empty batch uses
    none of them)."""
    if not loss.requires_grad:
        return [None] * len(inputs)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _assert_grads_close(names, got, want):
    for name, g, w in zip(names, got, want):
        if w is None:  # the reference never used it (e.g. no token reached any expert)
            assert g is None or not g.any(), name
            continue
        assert g is not None, name
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8, msg=lambda m: f"grad of {name}: {m}")


@given(layer_configs())
@FUZZ
def test_layer_matches_reference_layer(c):
    layer, x, mask = _build(c)
    y = layer(x, token_mask=mask)
    y_ref, aux_ref, stats_ref = R.moe_layer(layer, x, mask)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(layer.aux_loss, aux_ref.to(layer.aux_loss.dtype), atol=1e-10, rtol=1e-9)
    st_ = layer.last_stats
    assert st_["tokens_per_expert"].tolist() == stats_ref["tokens_per_expert"].tolist()
    assert math.isclose(float(st_["drop_fraction"]), stats_ref["drop_fraction"], abs_tol=1e-12)
    assert math.isclose(float(st_["router_entropy"]), stats_ref["router_entropy"], rel_tol=1e-5, abs_tol=1e-6)

    dy = torch.randn_like(y)
    names, params = zip(*[("x", x)] + list(layer.named_parameters()))
    if layer.attach_aux_loss:
        assert not layer.aux_loss.requires_grad  # its gradient comes through y's backward instead
    _assert_grads_close(names, _grads((y * dy).sum() + layer.aux_loss, params),
                        _grads((y_ref * dy).sum() + aux_ref, params))


@given(st.integers(1, 9), st.integers(1, 12), st.integers(0, 20), st.booleans(), st.booleans(),
       st.sampled_from(sorted(ACTIVATIONS)), st.integers(0, 2**31 - 1))
@FUZZ
def test_fused_moe_matches_reference(E, H, T, sigmoid, renormalize, activation, seed):
    torch.manual_seed(seed)
    k = 1 + seed % E
    gated = ACTIVATIONS[activation][1]
    F_ = 1 + seed % 7
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(E, (2 if gated else 1) * F_, H, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, H, F_, dtype=torch.float64, requires_grad=True)
    lg = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    score = "sigmoid" if sigmoid else "softmax"
    y = moe_ext.fused_moe(x, w1, w2, lg, k, renormalize=renormalize, activation=activation, score_func=score)
    y_ref = R.moe(x, lg, w1, w2, k, activation=activation, renormalize=renormalize, score_func=score)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-9)
    dy = torch.randn_like(y)
    inputs = [x, w1, w2, lg]
    _assert_grads_close(["x", "w1", "w2", "gating_output"], _grads((y * dy).sum(), inputs),
                        _grads((y_ref * dy).sum(), inputs))


@given(st.integers(-2, 10), st.integers(-2, 10), st.integers(-1, 12), st.integers(-1, 9),
       st.sampled_from([None, -1.0, 0.0, float("nan"), 0.5, float("inf")]),
       st.sampled_from(["silu", "swish", ""]), st.sampled_from(["softmax", "sigmoid", "relu"]),
       st.sampled_from([(None, None), (2, 1), (3, 2), (2, 3), (0, 1), (4, None)]))
@FUZZ
def test_bad_layer_arguments_raise_clear_errors(E, k, H, F, cf, activation, score_func, groups):
    """Any argument combination builds a layer whose forward works, or raises ValueError naming moe_ext and
    the argument: never another exception, and never a layer that fails in its first forward."""
    n_group, topk_group = groups
    try:
        layer = moe_ext.MoELayer(H, F, E, k, capacity_factor=cf, activation=activation, score_func=score_func,
                                 n_group=n_group, topk_group=topk_group)
    except ValueError as e:
        assert str(e).startswith("moe_ext"), str(e)
        return
    x = torch.randn(5, H)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@given(layer_configs(), st.integers(1, 9))
@FUZZ
def test_offloaded_layer_matches_reference_layer(c, cache_experts):
    layer, x, mask = _build(c)
    layer.eval()
    off = moe_ext.offload.offload_experts(layer, cache_experts=min(cache_experts, c["E"]))
    with torch.no_grad():
        y = off(x.detach(), token_mask=mask)
        y_ref, aux_ref, stats_ref = R.moe_layer(layer, x.detach(), mask)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-9)
    assert off.last_stats["tokens_per_expert"].tolist() == stats_ref["tokens_per_expert"].tolist()
    assert math.isclose(float(off.last_stats["drop_fraction"]), stats_ref["drop_fraction"], abs_tol=1e-12)
    torch.testing.assert_close(off.aux_loss, aux_ref.to(off.aux_loss.dtype), atol=1e-10, rtol=1e-9)
    assert off.num_resident() <= cache_experts


@given(layer_configs())
@settings(max_examples=int(os.environ.get("MOE_EXT_FUZZ_COMPILE_EXAMPLES", "10")), deadline=None, database=None,
          derandomize="MOE_EXT_FUZZ_COMPILE_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_layer_compiles_fullgraph(c):
    """torch.compile(fullgraph=True) traces every option combination (fake kernels, no graph break, no
    data-dependent branch) and gives the eager output, aux loss and input gradient (aot_eager: dynamo and
    AOTAutograd, no inductor codegen)."""
    layer, x, mask = _build(c)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x, token_mask=mask)
    aux = layer.aux_loss
    (gx,) = torch.autograd.grad((y.sum() + aux), x)
    y_ref = layer(x, token_mask=mask)
    (gx_ref,) = torch.autograd.grad((y_ref.sum() + layer.aux_loss), x)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(aux, layer.aux_loss, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gx, gx_ref, atol=1e-12, rtol=1e-10)
