"""Differentiable MoE ops: autograd Functions over torch.ops.moe_ext.* and the public functions.

Shapes: T tokens, H hidden, F expert FFN size, E experts, k choices per token, S = T * k slots.
Forward and backward call only registered ops, so torch.compile traces them without graph breaks,
and no function here reads a device value back to the host.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_ops = torch.ops.moe_ext

__all__ = ["GatingOutput", "topk_gating", "permute", "unpermute", "grouped_gemm", "fused_moe",
           "expert_ffn", "apply_activation", "ACTIVATIONS"]


def _records_graph(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records an op on these inputs. When it does not (inference, torch.no_grad,
    frozen inputs), the public functions call the op directly: an autograd Function's Python costs
    about 6 us a call, as much as a decode-sized kernel launch."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class GatingOutput(NamedTuple):
    """weights [T, k] fp32 (fp64 for fp64 logits), expert_ids [T, k] int32 (best first),
    tokens_per_expert [E] int32, score_sum [E] (sum over tokens of each expert's full score: softmax
    probability or sigmoid), lse [T] (logsumexp of each token's logits, for the z-loss)."""
    weights: Tensor
    expert_ids: Tensor
    tokens_per_expert: Tensor
    score_sum: Tensor
    lse: Tensor


class _TopkGating(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k, score_func, order, renormalize, expert_bias, num_groups, topk_groups,
                routed_scaling):
        out = _ops.topk_gating(logits, k, score_func, order, renormalize, expert_bias, num_groups, topk_groups,
                               routed_scaling)
        ctx.save_for_backward(logits, out[1])
        ctx.params = (score_func, order, renormalize, routed_scaling)
        ctx.mark_non_differentiable(out[1], out[2])
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_w, _g_ids, _g_tpe, grad_score_sum, grad_lse):
        logits, ids = ctx.saved_tensors
        if grad_w is None:
            grad_w = torch.zeros(ids.shape, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32,
                                 device=logits.device)
        grad = _ops.topk_gating_backward(grad_w, grad_score_sum, grad_lse, logits, ids, *ctx.params)
        return grad, None, None, None, None, None, None, None, None


def topk_gating(logits: Tensor, k: int, *, score_func: str = "softmax", order: str = "softmax_topk",
                renormalize: bool = True, expert_bias: Optional[Tensor] = None, num_groups: int = 1,
                topk_groups: int = 1, routed_scaling: float = 1.0) -> GatingOutput:
    """Top-k routing of logits [T, E] in one pass.

    score_func: "softmax" or "sigmoid". order: "softmax_topk" (scores over all E, pick the k best;
    Mixtral, Qwen, DeepSeek) or "topk_softmax" (pick the k largest logits, softmax over them).
    renormalize divides the k chosen scores by their sum. expert_bias [E] is added to the scores for
    the selection only (DeepSeek-V3). num_groups/topk_groups: group-limited routing (a group scores the
    sum of its two best experts; the topk_groups best groups stay eligible). The weights are multiplied
    by routed_scaling. Ties go to the lower expert id; NaN logits rank last.
    Differentiable w.r.t. logits through weights, score_sum and lse.
    """
    args = (logits, k, score_func, order, renormalize, expert_bias, num_groups, topk_groups, float(routed_scaling))
    return GatingOutput(*(_TopkGating.apply(*args) if _records_graph(logits) else _ops.topk_gating(*args)))


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, expert_ids, num_experts, max_rows):
        x_sorted, offsets, row_map = _ops.permute(x, expert_ids, num_experts, max_rows)
        ctx.save_for_backward(row_map)
        ctx.mark_non_differentiable(offsets, row_map)
        return x_sorted, offsets, row_map

    @staticmethod
    def backward(ctx, grad_x_sorted, _g_off, _g_rm):
        (row_map,) = ctx.saved_tensors
        return _ops.unpermute(grad_x_sorted, row_map, None), None, None, None


def permute(x: Tensor, expert_ids: Tensor, num_experts: int, max_rows: int = -1):
    """Group the rows of x [T, H] by expert: returns (x_sorted [R, H], expert_offsets [E+1] int64,
    row_map [T, k] int64).

    expert_ids [T, k] (int32 or int64; -1 = dropped slot). Rows of expert e are
    x_sorted[offsets[e]:offsets[e+1]], in token order. R = max_rows, or T * k when max_rows = -1; slots
    that do not fit in R rows are dropped (row_map -1); rows past offsets[E] are zero. row_map[t, j] is
    the row of slot (t, j) or -1. Differentiable w.r.t. x.
    """
    if _records_graph(x):
        return _Permute.apply(x, expert_ids, num_experts, max_rows)
    return _ops.permute(x, expert_ids, num_experts, max_rows)


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, row_map, weights):
        ctx.save_for_backward(y_sorted, row_map, weights)
        return _ops.unpermute(y_sorted, row_map, weights)

    @staticmethod
    def backward(ctx, grad_y):
        y_sorted, row_map, weights = ctx.saved_tensors
        grad_ys, grad_w = _ops.unpermute_backward(grad_y, y_sorted, row_map, weights)
        return grad_ys, None, (grad_w if weights is not None else None)


def unpermute(y_sorted: Tensor, row_map: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """y[t] = sum_j weights[t, j] * y_sorted[row_map[t, j]] -> [T, H] in y_sorted's dtype.

    Accumulates in fp32 in slot order (deterministic); dropped slots (row -1) add nothing.
    Differentiable w.r.t. y_sorted and weights.
    """
    if _records_graph(y_sorted, weights):
        return _Unpermute.apply(y_sorted, row_map, weights)
    return _ops.unpermute(y_sorted, row_map, weights)


class _GroupedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, expert_offsets, trans_b, bias):
        ctx.save_for_backward(a, b, expert_offsets)
        ctx.trans_b = trans_b
        ctx.has_bias = bias is not None
        return _ops.grouped_gemm(a, b, expert_offsets, trans_b, bias)

    @staticmethod
    def backward(ctx, grad_c):
        a, b, offsets = ctx.saved_tensors
        grad_c = grad_c.contiguous()
        grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_a = _ops.grouped_gemm(grad_c, b, offsets, not ctx.trans_b, None)
        if ctx.needs_input_grad[1]:
            grad_b = _ops.grouped_gemm_wgrad(grad_c, a, offsets) if ctx.trans_b else \
                _ops.grouped_gemm_wgrad(a, grad_c, offsets)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            # Per-expert column sums of grad_c, as a K=1 weight gradient: deterministic, no atomics.
            ones = grad_c.new_ones((grad_c.shape[0], 1))
            grad_bias = _ops.grouped_gemm_wgrad(ones, grad_c, offsets).squeeze(1)
        return grad_a, grad_b, None, None, grad_bias


def grouped_gemm(a: Tensor, b: Tensor, expert_offsets: Tensor, trans_b: bool = False,
                 bias: Optional[Tensor] = None) -> Tensor:
    """c[rows of e] = a[rows of e] @ b[e] (+ bias[e]) -> [M, N].

    a [M, K]; b [E, K, N], or [E, N, K] with trans_b; expert_offsets [E+1] int64 on a's device (rows
    of expert e are offsets[e]:offsets[e+1]); bias [E, N]. Rows outside [offsets[0], offsets[E]) are
    zero. Differentiable w.r.t. a, b and bias; the weight gradient of an expert with no rows is zero.
    """
    if _records_graph(a, b, bias):
        return _GroupedGemm.apply(a, b, expert_offsets, trans_b, bias)
    return _ops.grouped_gemm(a, b, expert_offsets, trans_b, bias)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# name -> (activation, gated). Gated ones take [gate; up] (2F columns) and return act(gate) * up.
ACTIVATIONS = {
    "silu": (F.silu, True),
    "gelu": (F.gelu, True),
    "gelu_tanh": (_gelu_tanh, True),
    "silu_no_mul": (F.silu, False),
    "gelu_no_mul": (F.gelu, False),
    "gelu_tanh_no_mul": (_gelu_tanh, False),
    "relu_no_mul": (F.relu, False),
}


def _activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"moe_ext: activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


def _gated(h: Tensor, activation: str) -> Tensor:
    """moe_ext.gated_activation over the last dim of h [..., 2F] -> [..., F]."""
    h2 = h.reshape(h.shape[:-1].numel(), h.shape[-1])
    return _ops.gated_activation(h2, activation).reshape(*h.shape[:-1], h.shape[-1] // 2)


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up over h = [gate | up] -> [.., F] in one pass (moe_ext.gated_activation); the
    backward recomputes act(gate) from h and writes d gate and d up into one [.., 2F] gradient."""

    @staticmethod
    def forward(ctx, h, act_name):
        ctx.save_for_backward(h)
        ctx.act_name = act_name
        return _gated(h, act_name)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        h2 = h.reshape(h.shape[:-1].numel(), h.shape[-1])
        grad_h = _ops.gated_activation_backward(grad.reshape(h2.shape[0], h2.shape[1] // 2), h2, ctx.act_name)
        return grad_h.reshape(h.shape), None


def apply_activation(h: Tensor, activation: str) -> Tensor:
    """act(h), or act(gate) * up over h = [gate | up] (last dim 2F -> F) for gated activations."""
    act, gated = _activation(activation)
    if not gated:
        return act(h)
    return _GatedActivation.apply(h, activation) if _records_graph(h) else _gated(h, activation)


def check_expert_weights(w1: Tensor, w2: Tensor, activation: str, hidden: int, num_experts: Optional[int] = None):
    """Validate w1 [E, 2F, H] (gated) or [E, F, H] and w2 [E, H, F]; returns (E, F)."""
    _, gated = _activation(activation)
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"moe_ext: w1 and w2 must be 3-D, got w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)}")
    E, F2, H = w1.shape
    if H != hidden:
        raise ValueError(f"moe_ext: w1 must be [E, {'2F' if gated else 'F'}, H] with H = {hidden}, got {tuple(w1.shape)}")
    if num_experts is not None and E != num_experts:
        raise ValueError(f"moe_ext: w1 must hold E = {num_experts} experts (the router's width), got {tuple(w1.shape)}")
    if gated and F2 % 2:
        raise ValueError(f"moe_ext: activation={activation!r} is gated and needs w1 [E, 2F, H] (gate rows, then up "
                         f"rows), got w1 {tuple(w1.shape)} whose dim 1 is odd")
    ffn = F2 // 2 if gated else F2
    if tuple(w2.shape) != (E, H, ffn):
        raise ValueError(f"moe_ext: w2 must be [E, H, F] = [{E}, {H}, {ffn}] for w1 {tuple(w1.shape)} and "
                         f"activation={activation!r}, got w2 {tuple(w2.shape)}")
    return E, ffn


def expert_ffn(x_sorted: Tensor, expert_offsets: Tensor, w1: Tensor, w2: Tensor, activation: str = "silu",
               b1: Optional[Tensor] = None, b2: Optional[Tensor] = None) -> Tensor:
    """Every expert's FFN on its rows of x_sorted [R, H]: act(x @ w1[e]^T + b1[e]) @ w2[e]^T + b2[e].

    w1 [E, 2F, H] for gated activations (rows 0..F-1 are the gate, F..2F-1 the up projection) or
    [E, F, H]; w2 [E, H, F]; b1 [E, 2F | F], b2 [E, H]. Rows outside the offsets stay zero.
    """
    h = apply_activation(grouped_gemm(x_sorted, w1, expert_offsets, trans_b=True, bias=b1), activation)
    return grouped_gemm(h, w2, expert_offsets, trans_b=True, bias=b2)


def fused_moe(hidden_states: Tensor, w1: Tensor, w2: Tensor, gating_output: Tensor, topk: int,
              renormalize: bool = True, *, activation: str = "silu", score_func: str = "softmax",
              expert_bias: Optional[Tensor] = None, num_expert_group: int = 1, topk_group: int = 1,
              routed_scaling_factor: float = 1.0, w1_bias: Optional[Tensor] = None,
              w2_bias: Optional[Tensor] = None) -> Tensor:
    """Drop-in fused MoE (vLLM's argument order), differentiable in all four tensor inputs.

    hidden_states [..., H]; w1 [E, 2F, H] (gated "silu"/"gelu": gate rows then up rows, as in
    transformers' gate_up_proj and vLLM's w1) or [E, F, H] ("silu_no_mul", "gelu_no_mul",
    "relu_no_mul"); w2 [E, H, F]; gating_output [..., E] router logits. Routes each token to its topk
    experts by softmax (or sigmoid) scores, renormalising the chosen weights when renormalize, and
    returns sum_j weight_j * expert_j(x) shaped like hidden_states.
    """
    H = hidden_states.shape[-1]
    x = hidden_states.reshape(-1, H)
    logits = gating_output.reshape(-1, gating_output.shape[-1])
    if logits.shape[0] != x.shape[0]:
        raise ValueError(f"moe_ext.fused_moe: gating_output must have one row per token ({x.shape[0]}), got "
                         f"{tuple(gating_output.shape)}")
    E, _ = check_expert_weights(w1, w2, activation, H, logits.shape[1])
    g = topk_gating(logits, topk, score_func=score_func, renormalize=renormalize, expert_bias=expert_bias,
                    num_groups=num_expert_group, topk_groups=topk_group, routed_scaling=routed_scaling_factor)
    x_sorted, offsets, row_map = permute(x, g.expert_ids, E)
    y_sorted = expert_ffn(x_sorted, offsets, w1, w2, activation, w1_bias, w2_bias)
    return unpermute(y_sorted, row_map, g.weights).reshape(hidden_states.shape)
