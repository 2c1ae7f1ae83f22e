"""The public MoE functions over torch.ops.moe_ext.*.

Shapes: T tokens, H hidden, F expert FFN size, E experts, k choices per token, S = T * k slots.
The ops carry their own autograd rules (csrc/autograd.cpp, registered at the Autograd key), so
torch.ops.moe_ext.* are differentiable however they are called, and these functions are thin: they
name the arguments, shape the results and check the expert weights. Forward and backward call only
registered ops, so torch.compile traces them without graph breaks, and no function here reads a
device value back to the host.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

_ops = torch.ops.moe_ext

__all__ = ["GatingOutput", "topk_gating", "permute", "unpermute", "grouped_gemm", "fused_moe",
           "expert_ffn", "permute_expert_ffn", "apply_activation", "ACTIVATIONS"]


class GatingOutput(NamedTuple):
    """weights [T, k] fp32 (fp64 for fp64 logits), expert_ids [T, k] int32 (best first),
    tokens_per_expert [E] int32, score_sum [E] (sum over tokens of each expert's full score: softmax
    probability or sigmoid), lse [T] (logsumexp of each token's logits, for the z-loss)."""
    weights: Tensor
    expert_ids: Tensor
    tokens_per_expert: Tensor
    score_sum: Tensor
    lse: Tensor


def topk_gating(logits: Tensor, k: int, *, score_func: str = "softmax", order: str = "softmax_topk",
                renormalize: bool = True, expert_bias: Optional[Tensor] = None, num_groups: int = 1,
                topk_groups: int = 1, routed_scaling: float = 1.0, group_score: str = "top2_sum") -> GatingOutput:
    """Top-k routing of logits [T, E] in one pass.

    score_func: "softmax" or "sigmoid". order: "softmax_topk" (scores over all E, pick the k best;
    Mixtral, Qwen, DeepSeek) or "topk_softmax" (pick the k largest logits, softmax over them).
    renormalize divides the k chosen scores by their sum. expert_bias [E] is added to the scores for
    the selection only (DeepSeek-V3). num_groups/topk_groups: group-limited routing (a group scores the
    sum of its two best selection keys, group_score="top2_sum" as DeepSeek-V3, or its best one, "max" as
    DeepSeek-V2's group_limited_greedy; the topk_groups best groups stay eligible). The weights are multiplied
    by routed_scaling. Ties go to the lower expert id; NaN logits rank last.
    Differentiable w.r.t. logits through weights, score_sum and lse.
    """
    args = (logits, k, score_func, order, renormalize, expert_bias, num_groups, topk_groups, float(routed_scaling),
            group_score)
    return GatingOutput(*_ops.topk_gating(*args))


def permute(x: Tensor, expert_ids: Tensor, num_experts: int, max_rows: int = -1):
    """Group the rows of x [T, H] by expert: returns (x_sorted [R, H], expert_offsets [E+1] int64,
    row_map [T, k] int64).

    expert_ids [T, k] (int32 or int64; -1 = dropped slot). Rows of expert e are
    x_sorted[offsets[e]:offsets[e+1]], in token order. R = max_rows, or T * k when max_rows = -1; slots
    that do not fit in R rows are dropped (row_map -1); rows past offsets[E] are zero. row_map[t, j] is
    the row of slot (t, j) or -1. Differentiable w.r.t. x.
    """
    return _ops.permute(x, expert_ids, num_experts, max_rows)


def unpermute(y_sorted: Tensor, row_map: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """y[t] = sum_j weights[t, j] * y_sorted[row_map[t, j]] -> [T, H] in y_sorted's dtype.

    Accumulates in fp32 in slot order (deterministic); dropped slots (row -1) add nothing.
    Differentiable w.r.t. y_sorted and weights.
    """
    return _ops.unpermute(y_sorted, row_map, weights)


def grouped_gemm(a: Tensor, b: Tensor, expert_offsets: Tensor, trans_b: bool = False,
                 bias: Optional[Tensor] = None) -> Tensor:
    """c[rows of e] = a[rows of e] @ b[e] (+ bias[e]) -> [M, N].

    a [M, K]; b [E, K, N], or [E, N, K] with trans_b; expert_offsets [E+1] int64 on a's device (rows
    of expert e are offsets[e]:offsets[e+1]); bias [E, N]. Rows outside [offsets[0], offsets[E]) are
    zero. Differentiable w.r.t. a, b and bias; the weight gradient of an expert with no rows is zero.
    """
    return _ops.grouped_gemm(a, b, expert_offsets, trans_b, bias)


def _lowerable(t: Tensor) -> bool:
    """Whether autocast lowers t in a matmul: floating, and not fp64 (nor integers)."""
    return t.is_floating_point() and t.dtype != torch.float64


def _autocast_dtype(t: Tensor) -> Optional[torch.dtype]:
    """The dtype torch.autocast gives t in a matmul here (bf16 or fp16), or None: autocast is off for
    t's device, or t is not a tensor it lowers."""
    dev = t.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev) or not _lowerable(t):
        return None
    return torch.get_autocast_dtype(dev)


def _cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """t in dtype when autocast would lower it (dtype None: unchanged)."""
    return t if t is None or dtype is None or not _lowerable(t) else t.to(dtype)


def _expert_rows(x: Tensor) -> Tensor:
    """x as the expert GEMMs will read it: in the autocast dtype under torch.autocast. The grouped GEMM
    casts its inputs itself (csrc/autocast.cpp); casting before permute moves half the bytes through
    permute and its backward."""
    return _cast(x, _autocast_dtype(x))


def _layer_output(y: Tensor, shape) -> Tensor:
    """A layer's own temporary y [T, H] reshaped to its input's shape, as a tensor that is not a view:
    FSDP2 warns on view outputs (an in-place update of one would skip its pre-backward hook). torch.matmul
    returns its reshaped results through the same aten._unsafe_view."""
    return torch.ops.aten._unsafe_view(y, shape)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _glu(act):
    """act(gate) * up over h = [gate | up] (last dim 2F -> F)."""
    def glu(h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return glu


SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT = 1.702, 7.0


def _clamp_inside(x: Tensor, lo: Optional[float], hi: float) -> Tensor:
    """x.clamp(lo, hi) whose gradient is 1 strictly inside (lo, hi) and 0 elsewhere, at the bounds and at NaN
    too: torch's clamp since 2.14 (torch <= 2.13 passed the gradient at the bounds)."""
    inside = (x < hi) if lo is None else (x > lo) & (x < hi)
    return torch.where(inside, x, x.detach().clamp(lo, hi))


def _swigluoai(h: Tensor) -> Tensor:
    """GPT-OSS's gated activation (transformers' GptOssExperts._apply_gate, vLLM's "swigluoai"): gate and up
    interleaved in h (columns 2j and 2j + 1), the gate clamped above, up clamped both ways."""
    gate = _clamp_inside(h[..., ::2], None, SWIGLUOAI_LIMIT)
    up = _clamp_inside(h[..., 1::2], -SWIGLUOAI_LIMIT, SWIGLUOAI_LIMIT)
    return (up + 1) * (gate * torch.sigmoid(gate * SWIGLUOAI_ALPHA))


# name -> (torch composition, gated): what apply_activation computes, in torch ops. Gated ones map h [..., 2F]
# (gate and up: [gate | up], interleaved for "swigluoai") to [..., F] and run as moe_ext.gated_activation.
ACTIVATIONS = {
    "silu": (_glu(F.silu), True),
    "gelu": (_glu(F.gelu), True),
    "gelu_tanh": (_glu(_gelu_tanh), True),
    "swigluoai": (_swigluoai, True),
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
    """moe_ext.gated_activation over the last dim of h [..., 2F] -> [..., F]. Its backward recomputes
    act(gate) from h, so only h is saved."""
    # math.prod, not torch.Size.numel(): the latter makes torch.export specialise a dynamic token count.
    h2 = h.reshape(math.prod(h.shape[:-1]), h.shape[-1])
    return _ops.gated_activation(h2, activation).reshape(*h.shape[:-1], h.shape[-1] // 2)


def apply_activation(h: Tensor, activation: str) -> Tensor:
    """act(h), or for gated activations act(gate) * up over the last dim of h (2F -> F): h = [gate | up], or
    gate and up interleaved for "swigluoai" (see ACTIVATIONS)."""
    act, gated = _activation(activation)
    return _gated(h, activation) if gated else act(h)


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
        layout = "gate and up rows interleaved" if activation == "swigluoai" else "gate rows, then up rows"
        raise ValueError(f"moe_ext: activation={activation!r} is gated and needs w1 [E, 2F, H] ({layout}), "
                         f"got w1 {tuple(w1.shape)} whose dim 1 is odd")
    ffn = F2 // 2 if gated else F2
    if tuple(w2.shape) != (E, H, ffn):
        raise ValueError(f"moe_ext: w2 must be [E, H, F] = [{E}, {H}, {ffn}] for w1 {tuple(w1.shape)} and "
                         f"activation={activation!r}, got w2 {tuple(w2.shape)}")
    return E, ffn


def expert_ffn(x_sorted: Tensor, expert_offsets: Tensor, w1: Tensor, w2: Tensor, activation: str = "silu",
               b1: Optional[Tensor] = None, b2: Optional[Tensor] = None) -> Tensor:
    """Every expert's FFN on its rows of x_sorted [R, H]: act(x @ w1[e]^T + b1[e]) @ w2[e]^T + b2[e].

    w1 [E, 2F, H] for gated activations (rows 0..F-1 are the gate, F..2F-1 the up projection; for
    "swigluoai", GPT-OSS's layout, even rows are the gate and odd rows the up projection) or
    [E, F, H]; w2 [E, H, F]; b1 [E, 2F | F], b2 [E, H]. Rows outside the offsets stay zero.
    """
    h = apply_activation(grouped_gemm(x_sorted, w1, expert_offsets, trans_b=True, bias=b1), activation)
    return grouped_gemm(h, w2, expert_offsets, trans_b=True, bias=b2)


def _activation_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    """d act / d h for apply_activation(h, activation), as its autograd would compute it (bit for bit)."""
    if _activation(activation)[1]:
        return _ops.gated_activation_backward(grad, h, activation)
    if activation == "relu_no_mul":
        return torch.ops.aten.threshold_backward(grad, h, 0)
    if activation == "silu_no_mul":
        return torch.ops.aten.silu_backward(grad, h)
    return torch.ops.aten.gelu_backward(grad, h, approximate="tanh" if activation == "gelu_tanh_no_mul" else "none")


def _bias_grad(grad: Tensor, offsets: Tensor) -> Tensor:
    """Per-expert column sums of grad [S, N] -> [E, N], as a K = 1 weight gradient (no atomics)."""
    return _ops.grouped_gemm_wgrad(grad.new_ones(grad.shape[0], 1), grad, offsets).squeeze(1)


class _RecomputedExperts(torch.autograd.Function):
    """permute, then every expert's FFN, saving x, the routing and h = x_sorted @ w1[e]^T only: the
    backward recomputes x_sorted (a permute of x, which the router saved anyway) and act(h).
    trans: the weights are [E, out, in] (True) or [E, in, out] (False, transformers' is_transposed)."""

    @staticmethod
    def forward(ctx, x, expert_ids, num_experts, max_rows, w1, w2, b1, b2, activation, trans):
        x_sorted, offsets, row_map = _ops.permute(x, expert_ids, num_experts, max_rows)
        h = _ops.grouped_gemm(x_sorted, w1, offsets, trans, b1)
        y = _ops.grouped_gemm(apply_activation(h, activation), w2, offsets, trans, b2)
        ctx.save_for_backward(x, expert_ids, offsets, row_map, h, w1, w2)
        ctx.args = (num_experts, max_rows, activation, trans)
        ctx.mark_non_differentiable(offsets, row_map)
        return y, offsets, row_map

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _offsets, _row_map):
        x, expert_ids, offsets, row_map, h, w1, w2 = ctx.saved_tensors
        num_experts, max_rows, activation, trans = ctx.args
        need_x, _, _, _, need_w1, need_w2, need_b1, need_b2, _, _ = ctx.needs_input_grad
        grad_y = grad_y.contiguous()

        def wgrad(a, grad):  # d w for c = a @ w[e]^T (trans) or a @ w[e]
            return _ops.grouped_gemm_wgrad(grad, a, offsets) if trans else _ops.grouped_gemm_wgrad(a, grad, offsets)
        dw1 = dw2 = db1 = db2 = dx = None
        if need_w2:
            dw2 = wgrad(apply_activation(h, activation), grad_y)
        if need_b2:
            db2 = _bias_grad(grad_y, offsets)
        if need_x or need_w1 or need_b1:
            dh = _activation_backward(_ops.grouped_gemm(grad_y, w2, offsets, not trans, None), h, activation)
            if need_w1:
                dw1 = wgrad(_ops.permute(x, expert_ids, num_experts, max_rows)[0], dh)
            if need_b1:
                db1 = _bias_grad(dh, offsets)
            if need_x:
                dx = _ops.unpermute(_ops.grouped_gemm(dh, w1, offsets, not trans, None), row_map, None)
        return dx, None, None, None, dw1, dw2, db1, db2, None, None


def permute_expert_ffn(x: Tensor, expert_ids: Tensor, num_experts: int, w1: Tensor, w2: Tensor,
                       activation: str = "silu", b1: Optional[Tensor] = None, b2: Optional[Tensor] = None,
                       max_rows: int = -1, recompute: bool = False, transposed: bool = False):
    """permute(x, expert_ids, num_experts, max_rows), then expert_ffn on the grouped rows: returns
    (y_sorted [R, H], expert_offsets [E+1] int64, row_map [T, k] int64), for unpermute.

    recompute=True saves less for the backward: neither the grouped copy of x ([R, H]) nor the
    activation ([R, F]) is kept; the backward recomputes them (one permute and one activation pass)
    from x, the routing and h = x_sorted @ w1[e]^T. The gradients are bit-identical to recompute=False.
    transposed=True: w1 [E, H, 2F | F] and w2 [E, F, H] (transformers' is_transposed layout, GPT-OSS), used as
    they are. x [T, H]; the other arguments as in permute and expert_ffn.
    """
    if transposed:
        check_expert_weights(w1.transpose(1, 2), w2.transpose(1, 2), activation, x.shape[-1], num_experts)
    else:
        check_expert_weights(w1, w2, activation, x.shape[-1], num_experts)
    return _permute_expert_ffn(x, expert_ids, num_experts, w1, w2, activation, b1, b2, max_rows, recompute,
                               transposed)


def _permute_expert_ffn(x, expert_ids, num_experts, w1, w2, activation, b1, b2, max_rows, recompute,
                        transposed=False):
    """permute_expert_ffn on weights already checked."""
    if not recompute or not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (x, w1, w2, b1, b2)):
        x_sorted, offsets, row_map = permute(_expert_rows(x), expert_ids, num_experts, max_rows)
        if transposed:
            h = apply_activation(grouped_gemm(x_sorted, w1, offsets, bias=b1), activation)
            return grouped_gemm(h, w2, offsets, bias=b2), offsets, row_map
        return expert_ffn(x_sorted, offsets, w1, w2, activation, b1, b2), offsets, row_map
    dt = _autocast_dtype(x)
    # Under autocast the casts happen here, as differentiable ops, so that the backward (which runs
    # without autocast) sees the dtypes the forward computed in.
    x, w1, w2, b1, b2 = (_cast(t, dt) for t in (x, w1, w2, b1, b2))
    return _RecomputedExperts.apply(x, expert_ids, num_experts, max_rows, w1, w2, b1, b2, activation, not transposed)


# vLLM's API (fused_moe and friends) lives in moe_ext.fused; fused_moe stays importable from here.
from .fused import fused_moe  # noqa: E402,F401
