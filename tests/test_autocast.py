"""torch.autocast: the grouped GEMMs take the autocast dtype (csrc/autocast.cpp), the router stays fp32,
and the layers equal the same computation written with explicit casts, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

import moe_ext
from moe_ext import functional as MF
from conftest import _NO_GPU

LOW = [torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, _NO_GPU])]


def _offsets(counts, device):
    return torch.tensor([0] + counts, device=device).cumsum(0)


def _leaf(*shape, device, dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()


def _grads(out, *leaves):
    g = torch.randn_like(out)
    return torch.autograd.grad(out, leaves, g.to(out.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_runs_in_the_autocast_dtype(device, dtype, trans_b):
    counts = [5, 0, 7, 3]  # an expert without rows among them
    E, K, N = len(counts), 24, 40
    offs = _offsets(counts, device)
    a = _leaf(sum(counts), K, device=device)
    b = _leaf(*((E, N, K) if trans_b else (E, K, N)), device=device)
    bias = _leaf(E, N, device=device)
    with torch.autocast(device, dtype=dtype):
        out = MF.grouped_gemm(a, b, offs, trans_b, bias)
    assert out.dtype == dtype
    ref = MF.grouped_gemm(a.to(dtype), b.to(dtype), offs, trans_b, bias.to(dtype))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)

    torch.manual_seed(1)
    got = _grads(out, a, b, bias)
    torch.manual_seed(1)
    want = _grads(ref, a, b, bias)
    for g, w, leaf in zip(got, want, (a, b, bias)):
        assert g.dtype == torch.float32  # fp32 leaves get fp32 gradients through the cast
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_wgrad_runs_in_the_autocast_dtype(device):
    offs = _offsets([4, 0, 9], device)
    x, y = torch.randn(13, 16, device=device), torch.randn(13, 24, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = torch.ops.moe_ext.grouped_gemm_wgrad(x, y, offs)
    assert out.dtype == torch.bfloat16
    want = torch.ops.moe_ext.grouped_gemm_wgrad(x.bfloat16(), y.bfloat16(), offs)
    torch.testing.assert_close(out, want, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_leaves_fp64_alone(device):
    offs = _offsets([3, 2], device)
    a, b = torch.randn(5, 8, device=device, dtype=torch.float64), torch.randn(2, 8, 8, device=device, dtype=torch.float64)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = MF.grouped_gemm(a, b, offs)
    assert out.dtype == torch.float64  # autocast never lowers fp64, as for torch.matmul
    with torch.autocast(device, dtype=torch.bfloat16, enabled=False):
        assert MF.grouped_gemm(a.float(), b.float(), offs).dtype == torch.float32


def _explicit_layer(layer, x, dtype):
    """MoELayer.forward written out with explicit casts: what autocast should run."""
    logits = F.linear(x.float(), layer.router.weight.float())
    g = MF.topk_gating(logits, layer.top_k)
    xs, offs, row_map = MF.permute(x.to(dtype), g.expert_ids, layer.num_experts)
    ex = layer.experts
    y = MF.expert_ffn(xs, offs, ex.w1.to(dtype), ex.w2.to(dtype), ex.activation)
    return MF.unpermute(y, row_map, g.weights), logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_layer_under_autocast_equals_explicit_casts(device, dtype):
    E, H = 7, 72
    layer = moe_ext.MoELayer(H, 40, E, 3, z_loss_coef=1e-3).to(device)
    x = torch.randn(2, 11, H, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        y = layer(x)
        logits = layer.router(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert logits.dtype == torch.float32  # the router keeps fp32 under autocast
    want, want_logits = _explicit_layer(layer, x.reshape(-1, H), dtype)
    torch.testing.assert_close(logits.reshape(-1, E), want_logits, atol=0, rtol=0)
    torch.testing.assert_close(y.reshape(-1, H), want, atol=0, rtol=0)
    # And it is the fp32 layer, to the autocast dtype's precision.
    torch.testing.assert_close(y.float(), layer(x), atol=3e-2, rtol=3e-2)

    params = [x, layer.router.weight, layer.experts.w1, layer.experts.w2]
    torch.manual_seed(2)
    got = _grads(y.reshape(-1, H), *params)
    torch.manual_seed(2)
    expect = _grads(want, *params)
    for g, w in zip(got, expect):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_moe_under_autocast(device):
    T, H, Fd, E, k = 10, 24, 16, 5, 2
    x = torch.randn(T, H, device=device)
    w1, w2 = torch.randn(E, 2 * Fd, H, device=device), torch.randn(E, H, Fd, device=device)
    logits = torch.randn(T, E, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = moe_ext.fused_moe(x, w1, w2, logits, k)
    assert y.dtype == torch.bfloat16
    want = moe_ext.fused_moe(x.bfloat16(), w1.bfloat16(), w2.bfloat16(), logits, k)
    torch.testing.assert_close(y, want, atol=0, rtol=0)


def test_shared_experts_and_capacity_under_autocast():
    layer = moe_ext.MoELayer(32, 24, 6, 2, num_shared_experts=1, shared_expert_gate=True, capacity_factor=1.0)
    x = torch.randn(20, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=5e-2, rtol=5e-2)
    y.float().sum().backward()
    assert layer.experts.w1.grad.dtype == torch.float32 and layer.router.weight.grad.abs().sum() > 0


def test_compiled_layer_under_autocast():
    torch._dynamo.reset()
    layer = moe_ext.MoELayer(16, 24, 4, 2, aux_loss_coef=0.01)
    x = torch.randn(12, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compiled(x)
        want = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, atol=0, rtol=0)
    (gx,) = torch.autograd.grad(y.float().square().sum(), x)
    (wx,) = torch.autograd.grad(want.float().square().sum(), x)
    # Not bit-equal: torch.compile differentiates the router's autocast-disabled fp32 region under the
    # forward's autocast state (plain torch.nn.Linear does the same), so its backward matmuls round to
    # bf16 where eager's stay fp32. The experts' part is identical.
    torch.testing.assert_close(gx, wx, atol=1.6e-2, rtol=1.6e-2)
