"""Bad input raises a clear error naming the argument, the expected and the actual value."""
import pytest
import torch

import moe_ext

ops = torch.ops.moe_ext


def test_gating_rank():
    with pytest.raises(RuntimeError, match=r"topk_gating: logits must be 2-D \[T, E\], got a 3-D tensor of shape \[2, 3, 4\]"):
        moe_ext.topk_gating(torch.randn(2, 3, 4), 2)


@pytest.mark.parametrize("k", [0, 8, -1])
def test_gating_k_out_of_range(k):
    with pytest.raises(RuntimeError, match=rf"topk_gating: k must be in \[1, E\] = \[1, 7\], got {k}"):
        moe_ext.topk_gating(torch.randn(3, 7), k)


def test_gating_dtype():
    with pytest.raises(RuntimeError, match="topk_gating: logits must be float32, float16, bfloat16 or float64, got Long"):
        moe_ext.topk_gating(torch.ones(3, 7, dtype=torch.long), 2)


def test_gating_bad_strings():
    with pytest.raises(RuntimeError, match='score_func must be "softmax" or "sigmoid", got "tanh"'):
        moe_ext.topk_gating(torch.randn(3, 7), 2, score_func="tanh")
    with pytest.raises(RuntimeError, match='order must be "softmax_topk" or "topk_softmax", got "x"'):
        moe_ext.topk_gating(torch.randn(3, 7), 2, order="x")


def test_gating_bias_shape_and_groups():
    with pytest.raises(RuntimeError, match=r"expert_bias.size\(0\) must equal logits.size\(1\) \(E\) = 7, got shape \[6\]"):
        moe_ext.topk_gating(torch.randn(3, 7), 2, expert_bias=torch.zeros(6))
    with pytest.raises(RuntimeError, match="num_groups must be in \\[1, 64\\] and divide E = 7, got 2"):
        moe_ext.topk_gating(torch.randn(3, 7), 2, num_groups=2, topk_groups=1)
    with pytest.raises(RuntimeError, match=r"k = 5 exceeds the experts in the kept groups"):
        moe_ext.topk_gating(torch.randn(3, 8), 5, num_groups=4, topk_groups=2)


def test_permute_expert_ids_out_of_range():
    with pytest.raises(RuntimeError, match=r"permute: expert_ids holds 7 at flat index 3, expected -1 \(dropped\) or a value in \[0, 7\)"):
        moe_ext.permute(torch.randn(2, 4), torch.tensor([[0, 1], [2, 7]], dtype=torch.int32), 7)
    with pytest.raises(RuntimeError, match=r"expert_ids holds -2"):
        moe_ext.permute(torch.randn(2, 4), torch.tensor([[0, 1], [-2, 3]], dtype=torch.int32), 7)


def test_permute_shapes_and_dtypes():
    with pytest.raises(RuntimeError, match=r"permute: expert_ids.size\(0\) must equal x.size\(0\) \(T\) = 3, got shape \[2, 2\]"):
        moe_ext.permute(torch.randn(3, 4), torch.zeros(2, 2, dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="permute: expert_ids must be int32 or int64, got Float"):
        moe_ext.permute(torch.randn(3, 4), torch.zeros(3, 2), 4)
    with pytest.raises(RuntimeError, match=r"permute: x must be 2-D \[T, H\], got a 1-D tensor"):
        moe_ext.permute(torch.randn(3), torch.zeros(3, 2, dtype=torch.int32), 4)


def test_unpermute_row_map_and_weights():
    ys = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match=r"unpermute: row_map holds 6 at flat index 1, expected -1 \(dropped\) or a value in \[0, 6\)"):
        moe_ext.unpermute(ys, torch.tensor([[0, 6]]))
    with pytest.raises(RuntimeError, match=r"unpermute: weights.size\(1\) must equal row_map.size\(1\) \(k\) = 2, got shape \[1, 3\]"):
        moe_ext.unpermute(ys, torch.tensor([[0, 1]]), torch.ones(1, 3))
    with pytest.raises(RuntimeError, match="unpermute: row_map must be int64, got Int"):
        moe_ext.unpermute(ys, torch.tensor([[0, 1]], dtype=torch.int32))


def test_grouped_gemm_offsets():
    a, b = torch.randn(6, 4), torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match=r"expert_offsets must be non-decreasing, got offsets\[0\] = 4 > offsets\[1\] = 2"):
        moe_ext.grouped_gemm(a, b, torch.tensor([4, 2, 6]))
    with pytest.raises(RuntimeError, match=r"expert_offsets must lie in \[0, 6\] \(the rows of a\), got offsets\[0\] = 0 and offsets\[2\] = 9"):
        moe_ext.grouped_gemm(a, b, torch.tensor([0, 2, 9]))
    with pytest.raises(RuntimeError, match=r"expert_offsets.size\(0\) must equal E \+ 1 = 3, got shape \[4\]"):
        moe_ext.grouped_gemm(a, b, torch.tensor([0, 2, 4, 6]))
    with pytest.raises(RuntimeError, match="expert_offsets must be int64, got Int"):
        moe_ext.grouped_gemm(a, b, torch.tensor([0, 2, 6], dtype=torch.int32))


def test_grouped_gemm_shapes_dtypes():
    off = torch.tensor([0, 3, 6])
    with pytest.raises(RuntimeError, match=r"grouped_gemm: b.size\(1\) must equal a.size\(1\) \(K\) = 4, got shape \[2, 5, 3\]"):
        moe_ext.grouped_gemm(torch.randn(6, 4), torch.randn(2, 5, 3), off)
    with pytest.raises(RuntimeError, match=r"b must be 3-D \[E, N, K\] \(trans_b=True\)"):
        moe_ext.grouped_gemm(torch.randn(6, 4), torch.randn(5, 3), off, trans_b=True)
    with pytest.raises(RuntimeError, match=r"grouped_gemm: b must have the dtype of a \(Float\), got Double"):
        moe_ext.grouped_gemm(torch.randn(6, 4), torch.randn(2, 4, 3, dtype=torch.float64), off)
    with pytest.raises(RuntimeError, match=r"bias.size\(1\) must equal b's output columns \(N\) = 3, got shape \[2, 4\]"):
        moe_ext.grouped_gemm(torch.randn(6, 4), torch.randn(2, 4, 3), off, bias=torch.randn(2, 4))


def test_device_mismatch_is_named_by_fake_kernels():
    meta = torch.empty(3, 2, dtype=torch.int32, device="meta")
    with pytest.raises(RuntimeError, match=r"permute: expert_ids must be on x's device \(cpu\), got meta"):
        ops.permute(torch.randn(3, 4), meta, 4)


def test_fused_moe_weight_shapes():
    x, lg = torch.randn(5, 8), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"activation='silu' is gated and needs w1 \[E, 2F, H\].*got w1 \(4, 7, 8\)"):
        moe_ext.fused_moe(x, torch.randn(4, 7, 8), torch.randn(4, 8, 3), lg, 2)
    with pytest.raises(ValueError, match=r"w2 must be \[E, H, F\] = \[4, 8, 6\] for w1 \(4, 6, 8\) and activation='silu_no_mul', got w2 \(4, 8, 3\)"):
        moe_ext.fused_moe(x, torch.randn(4, 6, 8), torch.randn(4, 8, 3), lg, 2, activation="silu_no_mul")
    with pytest.raises(ValueError, match="activation must be one of"):
        moe_ext.fused_moe(x, torch.randn(4, 6, 8), torch.randn(4, 8, 3), lg, 2, activation="swish")
    with pytest.raises(ValueError, match=r"w1 must hold E = 4 experts \(the router's width\)"):
        moe_ext.fused_moe(x, torch.randn(3, 6, 8), torch.randn(3, 8, 3), lg, 2)


@pytest.mark.parametrize("recompute", [False, True])
def test_permute_expert_ffn_weight_shapes(recompute):
    x, ids = torch.randn(5, 8, requires_grad=True), torch.zeros(5, 2, dtype=torch.int32)
    w1 = torch.randn(4, 12, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"w2 must be \[E, H, F\] = \[4, 8, 6\] .* got w2 \(4, 8, 5\)"):
        moe_ext.functional.permute_expert_ffn(x, ids, 4, w1, torch.randn(4, 8, 5), recompute=recompute)
    with pytest.raises(ValueError, match=r"w1 must hold E = 3 experts"):
        moe_ext.functional.permute_expert_ffn(x, ids, 3, w1, torch.randn(4, 8, 6), recompute=recompute)


def test_layer_arguments():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts\] = \[1, 4\], got 5"):
        moe_ext.MoELayer(8, 16, 4, 5)
    with pytest.raises(ValueError, match="overflow must be 'drop' or 'reroute'"):
        moe_ext.MoELayer(8, 16, 4, 2, overflow="spill")
    with pytest.raises(ValueError, match="routing must be 'token_choice' or 'expert_choice'"):
        moe_ext.MoELayer(8, 16, 4, 2, routing="hash")
    with pytest.raises(ValueError, match="d_model must be an int >= 1, got 0"):
        moe_ext.MoELayer(0, 16, 4, 2)
    with pytest.raises(ValueError, match="d_ff must be an int >= 1, got -3"):
        moe_ext.MoELayer(8, -3, 4, 2)
    with pytest.raises(ValueError, match="num_experts must be an int >= 1, got 0"):
        moe_ext.MoELayer(8, 16, 0, 1)
    with pytest.raises(ValueError, match="num_shared_experts must be an int >= 0, got -1"):
        moe_ext.MoELayer(8, 16, 4, 2, num_shared_experts=-1)
    with pytest.raises(ValueError, match=r"jitter_eps must be in \[0, 1\), got 1.5"):
        moe_ext.MoELayer(8, 16, 4, 2, jitter_eps=1.5)
    # Group settings topk_gating would refuse fail when the layer is built, not at its first forward.
    with pytest.raises(ValueError, match=r"n_group must be in \[1, 64\] and divide num_experts = 6, got 4"):
        moe_ext.MoELayer(8, 16, 6, 2, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match=r"topk_group must be in \[1, n_group\] = \[1, 3\], got 4"):
        moe_ext.MoELayer(8, 16, 6, 2, n_group=3, topk_group=4)
    with pytest.raises(ValueError, match=r"top_k = 3 exceeds the experts in the kept groups \(.* = 2\)"):
        moe_ext.MoELayer(8, 16, 6, 3, n_group=3, topk_group=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_cuda_mismatch_is_named():
    with pytest.raises(RuntimeError, match=r"permute: expert_ids must be on x's device \(cuda:0\), got cpu"):
        ops.permute(torch.randn(3, 4, device="cuda"), torch.zeros(3, 2, dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match=r"grouped_gemm: expert_offsets must be on a's device \(cuda:0\), got cpu"):
        ops.grouped_gemm(torch.randn(6, 4, device="cuda").bfloat16(), torch.randn(2, 4, 3, device="cuda").bfloat16(),
                         torch.tensor([0, 3, 6]))


@pytest.mark.parametrize("dtype,scaling,shown", [
    (torch.float32, 1e300, r"1e\+300"), (torch.bfloat16, 1e39, r"1e\+39"), (torch.float16, 3.5e38, r"3.5e\+38"),
    (torch.float32, 1e-46, "1e-46"),  # inf or 0 in float32
    (torch.float64, float("inf"), "inf"), (torch.float64, 0.0, "0"), (torch.float64, -1.0, "-1"),
    (torch.float64, float("nan"), "nan"),
])
def test_gating_routed_scaling_not_representable(dtype, scaling, shown):
    """The factor must be finite and > 0 in the compute type: float32 unless the logits are float64."""
    compute = "float64" if dtype == torch.float64 else "float32"
    name = {torch.float32: "Float", torch.bfloat16: "BFloat16", torch.float16: "Half", torch.float64: "Double"}[dtype]
    msg = rf"routed_scaling must be a positive finite number in {compute} \(the compute type of {name} logits\), got {shown}$"
    with pytest.raises(RuntimeError, match="topk_gating: " + msg):
        moe_ext.topk_gating(torch.randn(3, 7).to(dtype), 2, routed_scaling=scaling)
    ids = torch.tensor([[0, 1]] * 3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="topk_gating_backward: " + msg):
        ops.topk_gating_backward(torch.randn(3, 2), None, None, torch.randn(3, 7).to(dtype), ids, "softmax",
                                 "softmax_topk", True, scaling)


def test_gating_routed_scaling_extremes_accepted():
    moe_ext.topk_gating(torch.randn(3, 7, dtype=torch.float64), 2, routed_scaling=1e300)
    moe_ext.topk_gating(torch.randn(3, 7, dtype=torch.float64), 2, routed_scaling=1e-300)
    moe_ext.topk_gating(torch.randn(3, 7), 2, routed_scaling=3.4e38)
    moe_ext.topk_gating(torch.randn(3, 7), 2, routed_scaling=1e-40)  # subnormal in float32, still > 0


def test_layer_input_errors_name_the_layer():
    layer = moe_ext.MoELayer(8, 16, 4, 2)
    with pytest.raises(ValueError, match=r"moe_ext.MoELayer: x must be a floating-point tensor \[..., d_model = 8\], "
                                         r"got torch.float32 \(3, 7\)"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="moe_ext.MoELayer: x must be a floating-point tensor .* got torch.int64"):
        layer(torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="moe_ext.MoELayer: x is torch.float64 but the layer's parameters are "
                                         "torch.float32"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: accepted
        assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).shape == (3, 8)


def test_functional_errors_name_the_function():
    with pytest.raises(ValueError, match=r"moe_ext.load_balancing_loss: tokens_per_expert must be an integer tensor "
                                         r"\[E\] and score_sum a float tensor \[E\], got torch.int64 \(0,\) and "
                                         r"torch.float32 \(5,\)"):
        moe_ext.load_balancing_loss(torch.zeros(0, dtype=torch.long), torch.rand(5), 4, 2)
    with pytest.raises(ValueError, match="moe_ext.fused_moe: gating_output must be a floating-point tensor"):
        moe_ext.fused_moe(torch.randn(3, 8), torch.randn(4, 6, 8), torch.randn(4, 8, 3), torch.zeros(3, 4).long(), 2)
    ids = torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"moe_ext.apply_capacity: logits must be a float tensor \[T, num_experts\]"):
        moe_ext.routing.apply_capacity(ids, torch.randn(3, 5), 4, 1)
