"""Fake (meta) kernels for every torch.ops.moe_ext operator.

Every output shape is known from the input shapes (permute returns the static upper bound of rows),
so torch.compile and torch.export trace the ops without data-dependent shapes.
"""
import torch

__all__ = []


def _same_device(op, name, t, ref_name, ref):
    # Same wording as csrc/common/checks.cpp check_same_device: meta/fake tensors get the same error.
    if t is not None:
        torch._check(t.device == ref.device, lambda: f"moe_ext.{op}: {name} must be on {ref_name}'s device "
                                                     f"({ref.device}), got {t.device}")


def _routing_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.register_fake("moe_ext::topk_gating")
def _topk_gating_fake(logits, k, score_func="softmax", order="softmax_topk", renormalize=True,
                      expert_bias=None, num_groups=1, topk_groups=1, routed_scaling=1.0, group_score="top2_sum"):
    torch._check(logits.dim() == 2, lambda: f"moe_ext.topk_gating: logits must be 2-D [T, E], got {logits.dim()}-D")
    _same_device("topk_gating", "expert_bias", expert_bias, "logits", logits)
    T, E = logits.shape
    torch._check(1 <= k <= E, lambda: f"moe_ext.topk_gating: k must be in [1, E] = [1, {E}], got {k}")
    fd = _routing_dtype(logits)
    return (logits.new_empty((T, k), dtype=fd), logits.new_empty((T, k), dtype=torch.int32),
            logits.new_empty((E,), dtype=torch.int32), logits.new_empty((E,), dtype=fd),
            logits.new_empty((T,), dtype=fd))


@torch.library.register_fake("moe_ext::topk_gating_backward")
def _topk_gating_backward_fake(grad_weights, grad_score_sum, grad_lse, logits, expert_ids, score_func, order,
                               renormalize, routed_scaling):
    return logits.new_empty(logits.shape)  # contiguous, like the kernels' outputs (not empty_like's strides)


@torch.library.register_fake("moe_ext::permute")
def _permute_fake(x, expert_ids, num_experts, max_rows=-1):
    torch._check(x.dim() == 2 and expert_ids.dim() == 2, lambda: "moe_ext.permute: x [T, H] and expert_ids [T, k]")
    _same_device("permute", "expert_ids", expert_ids, "x", x)
    T, H = x.shape
    rows = max_rows if max_rows >= 0 else T * expert_ids.shape[1]
    return (x.new_empty((rows, H)), x.new_empty((num_experts + 1,), dtype=torch.int64),
            x.new_empty(tuple(expert_ids.shape), dtype=torch.int64))


@torch.library.register_fake("moe_ext::unpermute")
def _unpermute_fake(y_sorted, row_map, weights=None):
    _same_device("unpermute", "row_map", row_map, "y_sorted", y_sorted)
    _same_device("unpermute", "weights", weights, "y_sorted", y_sorted)
    return y_sorted.new_empty((row_map.shape[0], y_sorted.shape[1]))


@torch.library.register_fake("moe_ext::unpermute_backward")
def _unpermute_backward_fake(grad_y, y_sorted, row_map, weights):
    # Contiguous, like the kernels' outputs: empty_like would keep a transposed input's strides.
    grad_w = weights.new_empty(weights.shape) if weights is not None else y_sorted.new_empty((0,))
    return y_sorted.new_empty(y_sorted.shape), grad_w


@torch.library.register_fake("moe_ext::grouped_gemm")
def _grouped_gemm_fake(a, b, expert_offsets, trans_b=False, bias=None):
    for name, t in (("b", b), ("expert_offsets", expert_offsets), ("bias", bias)):
        _same_device("grouped_gemm", name, t, "a", a)
    n = b.shape[1] if trans_b else b.shape[2]
    return a.new_empty((a.shape[0], n))


@torch.library.register_fake("moe_ext::grouped_gemm_wgrad")
def _grouped_gemm_wgrad_fake(x, y, expert_offsets):
    return x.new_empty((expert_offsets.shape[0] - 1, x.shape[1], y.shape[1]))


@torch.library.register_fake("moe_ext::capacity_reroute")
def _capacity_reroute_fake(expert_ids, keys, capacity):
    _same_device("capacity_reroute", "expert_ids", expert_ids, "keys", keys)
    return expert_ids.new_empty(expert_ids.shape)  # contiguous, like the kernels' outputs


@torch.library.register_fake("moe_ext::gated_activation")
def _gated_activation_fake(h, activation="silu"):
    torch._check(h.dim() == 2 and h.shape[1] % 2 == 0,
                 lambda: f"moe_ext.gated_activation: h must be [M, 2F] (gate columns, then up columns), got "
                         f"{tuple(h.shape)}")
    return h.new_empty((h.shape[0], h.shape[1] // 2))


@torch.library.register_fake("moe_ext::gated_activation_backward")
def _gated_activation_backward_fake(grad, h, activation="silu"):
    _same_device("gated_activation_backward", "grad", grad, "h", h)
    torch._check(h.dim() == 2 and h.shape[1] % 2 == 0 and tuple(grad.shape) == (h.shape[0], h.shape[1] // 2),
                 lambda: f"moe_ext.gated_activation_backward: h must be [M, 2F] and grad [M, F], got h "
                         f"{tuple(h.shape)} and grad {tuple(grad.shape)}")
    return h.new_empty(h.shape)
