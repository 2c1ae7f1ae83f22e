"""End to end on CUDA: fused_moe and MoELayer (with its routing toolbox) against the same computation
on the CPU, output and every gradient; no host synchronisation in forward or backward; CUDA graph
capture; torch.compile. The op-level CUDA tests are in test_cuda_routing.py, test_cuda_grouped_gemm.py
and test_cuda_activation.py. Runs only where a CUDA GPU is visible.
"""
import copy
import math
import zlib

import pytest
import torch

import moe_ext

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _inputs(T, H, F, E, gated, dtype, gen):
    """x [T,H], logits [T,E] (always fp32 or fp64: routing ties are not what these tests are about),
    w1 [E,(2)F,H], w2 [E,H,F], on the CPU."""
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    lg = torch.randn(T, E, generator=gen, dtype=torch.float64) * 2
    w1 = torch.randn(E, (2 if gated else 1) * F, H, generator=gen, dtype=torch.float64) / math.sqrt(H)
    w2 = torch.randn(E, H, F, generator=gen, dtype=torch.float64) / math.sqrt(F)
    lg_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return x.to(dtype), lg.to(lg_dtype), w1.to(dtype), w2.to(dtype)


def _forward_backward(args, k, activation, device, grad_out):
    leaves = [a.to(device).requires_grad_() for a in args]
    x, lg, w1, w2 = leaves
    y = moe_ext.fused_moe(x, w1, w2, lg, k, activation=activation)
    if y.numel() == 0:
        return y, [None] * 4
    return y, torch.autograd.grad(y, leaves, grad_out.to(device=device, dtype=y.dtype))


# ------------------------------------------------------------------------------------------ fused_moe
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_no_mul"])
@pytest.mark.parametrize("T,H,F,E,k", [(37, 72, 40, 7, 3), (64, 64, 48, 8, 8), (1, 72, 40, 7, 1), (0, 72, 40, 7, 3)])
def test_fused_moe_float64_matches_cpu(activation, T, H, F, E, k):
    """float64 throughout: the CUDA and CPU paths agree to float64 rounding, output and gradients."""
    gen = _gen(T, H, F, E, k, activation)
    args = _inputs(T, H, F, E, "no_mul" not in activation, torch.float64, gen)
    g = torch.randn(T, H, generator=gen, dtype=torch.float64)
    yc, gc = _forward_backward(args, k, activation, "cpu", g)
    yg, gg = _forward_backward(args, k, activation, DEV, g)
    assert yg.is_cuda and yg.shape == (T, H)
    torch.testing.assert_close(yg.cpu(), yc)
    for name, a, b in zip(("x", "logits", "w1", "w2"), gg, gc):
        if b is not None:
            torch.testing.assert_close(a.cpu(), b, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,H,F,E,k", [(300, 128, 96, 8, 2), (37, 36, 20, 7, 3)])  # CUTLASS; 16-bit fallback (K % 8)
def test_fused_moe_low_precision_no_worse_than_cpu(dtype, T, H, F, E, k):
    """In fp32/bf16/fp16, the CUDA result's error against a float64 reference is at most twice the CPU
    path's own error in the same dtype (plus a little), for the output and every gradient."""
    gen = _gen(T, H, F, E, k, str(dtype))
    args = _inputs(T, H, F, E, True, dtype, gen)
    g = torch.randn(T, H, generator=gen, dtype=torch.float64)
    y64, g64 = _forward_backward([a.double() for a in args], k, "silu", "cpu", g)
    yc, gc = _forward_backward(args, k, "silu", "cpu", g)
    yg, gg = _forward_backward(args, k, "silu", DEV, g)
    slack = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for name, a, b, ref in zip(("y", "x", "logits", "w1", "w2"), [yg, *gg], [yc, *gc], [y64, *g64]):
        assert a.dtype == b.dtype and a.is_cuda
        err_gpu = (a.cpu().double() - ref).abs().max().item()
        err_cpu = (b.double() - ref).abs().max().item()
        tol = 2 * err_cpu + slack * max(1.0, ref.abs().max().item())
        assert err_gpu <= tol, f"{name}: CUDA error {err_gpu:.3g} > 2 x CPU's {err_cpu:.3g} + slack"


def test_fused_moe_gradcheck_cuda():
    gen = _gen("gradcheck")
    x, lg, w1, w2 = (a.to(DEV).requires_grad_() for a in _inputs(6, 8, 4, 5, True, torch.float64, gen))
    assert torch.autograd.gradcheck(lambda *a: moe_ext.fused_moe(*a, 2), (x, w1, w2, lg))


def _vllm_halves(x, lg, w1, w2, bias, emap):
    """grouped_topk, then fused_experts on this "rank's" experts (expert_map), output and gradients."""
    leaves = [x.requires_grad_(), lg.requires_grad_(), w1.requires_grad_(), w2.requires_grad_()]
    w, ids = moe_ext.grouped_topk(x, lg, 3, True, 4, 2, "sigmoid", 2.5, bias)
    y = moe_ext.fused_experts(x, w1, w2, w, ids, global_num_experts=lg.shape[1], expert_map=emap)
    return y, torch.autograd.grad(y.sum(), leaves)


@pytest.mark.parametrize("with_bias", [False, True])
def test_vllm_halves_match_cpu_without_sync(with_bias):
    """grouped_topk (DeepSeek-V2's group max without a bias, V3's top-2 sum with one) and fused_experts with
    an expert_map on CUDA: the CPU's output and gradients in float64, and no host synchronisation."""
    gen = _gen("vllm", with_bias)
    x, lg, w1, w2 = _inputs(29, 24, 16, 8, True, torch.float64, gen)
    bias = torch.randn(8, generator=gen, dtype=torch.float64) * 0.1 if with_bias else None
    emap = torch.tensor([-1, -1, 0, 1, 2, -1, 3, 4], dtype=torch.int32)  # this rank holds experts 2-4, 6, 7
    local = [2, 3, 4, 6, 7]
    yc, gc = _vllm_halves(x.clone(), lg.clone(), w1[local].clone(), w2[local].clone(), bias, emap)
    dev = [t.to(DEV) for t in (x, lg, w1[local], w2[local])]
    yg, gg = _vllm_halves(*dev, None if bias is None else bias.to(DEV), emap.to(DEV))
    torch.testing.assert_close(yg.cpu(), yc)
    for a, b in zip(gg, gc):
        torch.testing.assert_close(a.cpu(), b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _vllm_halves(*(t.detach() for t in dev), None if bias is None else bias.to(DEV), emap.to(DEV))
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_fused_experts_out_of_range_global_ids_are_dropped_on_cuda():
    """The CPU refuses a global id outside the expert_map; CUDA, which cannot check without a sync, drops
    it (a clamped gather: no out-of-bounds index, no device assert), as the CPU does -1."""
    gen = _gen("oob")
    x, lg, w1, w2 = _inputs(9, 16, 8, 6, True, torch.float64, gen)
    w, ids = moe_ext.topk_gating(lg, 2)[:2]
    emap = torch.tensor([0, -1, 1, 2, -1, 3], dtype=torch.int32)
    local = [0, 2, 3, 5]
    bad, clean = ids.clone(), ids.clone()
    bad[1, 0], bad[4, 1] = 6, 1000
    clean[1, 0], clean[4, 1] = -1, -1
    want = moe_ext.fused_experts(x, w1[local], w2[local], w, clean, expert_map=emap)
    got = moe_ext.fused_experts(x.to(DEV), w1[local].to(DEV), w2[local].to(DEV), w.to(DEV), bad.to(DEV),
                                expert_map=emap.to(DEV))
    torch.testing.assert_close(got.cpu(), want)


# ------------------------------------------------------------------------------------------- MoELayer
LAYERS = {  # (d_model, d_ff, E, k, kwargs): every routing feature of MoELayer
    "losses": (72, 40, 7, 3, dict(aux_loss_coef=0.01, z_loss_coef=1e-3)),
    "k_equals_E": (24, 16, 4, 4, dict(aux_loss_coef=0.01)),
    "capacity_drop": (72, 40, 7, 2, dict(capacity_factor=0.8, overflow="drop", aux_loss_coef=0.01)),
    "capacity_reroute": (72, 40, 7, 2, dict(capacity_factor=0.8, overflow="reroute")),
    "expert_choice": (72, 40, 7, 2, dict(routing="expert_choice", capacity_factor=1.0, z_loss_coef=1e-3)),
    "deepseek": (64, 32, 8, 3, dict(score_func="sigmoid", n_group=4, topk_group=2, expert_bias=True,
                                    routed_scaling_factor=2.5, num_shared_experts=1)),
    "deepseek_v2": (64, 32, 8, 3, dict(n_group=4, topk_group=2, group_score="max", renormalize=False,
                                       routed_scaling_factor=16.0, num_shared_experts=2, aux_loss_coef=3e-3)),
    "shared_gate": (72, 40, 7, 2, dict(num_shared_experts=2, shared_expert_gate=True)),
    "bias_gelu": (72, 40, 7, 3, dict(activation="gelu_no_mul", bias=True)),
    "probs_drop": (72, 40, 7, 2, dict(capacity_factor=0.8, drop_policy="probs", aux_loss_coef=0.01)),
    "sequence_loss": (64, 32, 8, 3, dict(score_func="sigmoid", aux_loss_coef=0.01, aux_loss_scope="sequence")),
    "recompute": (72, 40, 7, 3, dict(recompute=True, bias=True, aux_loss_coef=0.01)),
    "attach": (72, 40, 7, 3, dict(attach_aux_loss=True, aux_loss_coef=0.1, z_loss_coef=1e-3)),
}
PADDING = torch.arange(19) < torch.tensor([19, 11]).unsqueeze(1)  # token_mask of x [2, 19, H]


def _layer_step(layer, x, g, token_mask=None):
    x = x.clone().requires_grad_()
    y = layer(x, token_mask=token_mask)
    loss = (y * g).sum() + layer.aux_loss
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return y.detach(), layer.aux_loss.detach(), dict(layer.last_stats), grads


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_float64_matches_cpu(name, padded):
    H, F_, E, k, kw = LAYERS[name]
    torch.manual_seed(zlib.crc32(name.encode()))
    layer = moe_ext.MoELayer(H, F_, E, k, **kw).double()
    with torch.no_grad():  # a decisive router, and a non-zero selection bias where there is one
        layer.router.weight.mul_(4)
        if getattr(layer.router, "expert_bias", None) is not None:
            layer.router.expert_bias.copy_(torch.randn(E, dtype=torch.float64) * 0.1)
    gpu_layer = copy.deepcopy(layer).to(DEV)
    x = torch.randn(2, 19, H, dtype=torch.float64)
    g = torch.randn(2, 19, H, dtype=torch.float64)
    mask = PADDING if padded else None
    yc, ac, sc, gc = _layer_step(layer, x, g, mask)
    yg, ag, sg, gg = _layer_step(gpu_layer, x.to(DEV), g.to(DEV), None if mask is None else mask.to(DEV))
    torch.testing.assert_close(yg.cpu(), yc)
    torch.testing.assert_close(ag.cpu(), ac)
    assert torch.equal(sg["tokens_per_expert"].cpu(), sc["tokens_per_expert"])
    torch.testing.assert_close(sg["drop_fraction"].cpu(), sc["drop_fraction"])
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for n, a, b in zip(names, gg, gc):
        assert (a is None) == (b is None), n
        if b is not None:
            torch.testing.assert_close(a.cpu(), b, msg=lambda m: f"grad {n}: {m}")


# --------------------------------------------------------------------- no sync, graphs, torch.compile
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", ["losses", "capacity_drop", "capacity_reroute", "expert_choice", "deepseek",
                                  "deepseek_v2", "probs_drop", "sequence_loss", "recompute"])
def test_layer_forward_backward_never_synchronise(name, padded):
    """No host synchronisation anywhere in a training step of the layer: sizes stay on the device (with
    padding too: the count of real tokens stays a device tensor)."""
    H, F_, E, k, kw = LAYERS[name]
    layer = moe_ext.MoELayer(H, F_, E, k, **kw).to(DEV)
    x = torch.randn(2, 32, H, device=DEV, requires_grad=True)
    mask = torch.arange(32, device=DEV) < torch.tensor([[32], [20]], device=DEV) if padded else None
    (layer(x, token_mask=mask).sum() + layer.aux_loss).backward()  # warm-up: lazy CUDA / cuBLAS initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x, token_mask=mask)
        (y.sum() + layer.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x.grad).all()


def test_layer_forward_in_a_cuda_graph():
    """A captured forward replays on new inputs and gives the eager result (no host-side sizes)."""
    layer = moe_ext.MoELayer(64, 48, 8, 2).to(DEV, torch.bfloat16).eval()
    static_x = torch.randn(96, 64, device=DEV, dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = layer(static_x)
    for seed in range(3):
        new_x = torch.randn(96, 64, device=DEV, dtype=torch.bfloat16, generator=torch.Generator(DEV).manual_seed(seed))
        static_x.copy_(new_x)
        graph.replay()
        with torch.no_grad():
            assert torch.equal(static_y, layer(new_x))


def test_layer_torch_compile_aot_eager():
    """Fake kernels and autograd under torch.compile(fullgraph) on CUDA tensors (aot_eager: no Triton
    compile time)."""
    torch._dynamo.reset()
    layer = moe_ext.MoELayer(64, 48, 8, 2, aux_loss_coef=0.01).to(DEV)
    x = torch.randn(40, 64, device=DEV, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
