"""vLLM's fused-MoE API on moe_ext's ops: fused_moe, and its two halves fused_topk / grouped_topk (routing)
and fused_experts (the experts on given routing), with vLLM's argument names and order, so code written
for vllm.model_executor.layers.fused_moe runs unchanged. Unlike vLLM's (inference-only) kernels these
are differentiable, and they run on the CPU too.

Shapes: T tokens, H hidden, F expert FFN size, E experts (E_global with an expert_map), k = topk.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .functional import _permute_expert_ffn, check_expert_weights, topk_gating, unpermute
from .routing import check_id_values

__all__ = ["fused_moe", "fused_experts", "fused_topk", "grouped_topk"]


def _alias(name: str, value, default, alias: str, alias_value, where: str = "fused_moe"):
    """value, or alias_value when only the alias (another library's name for the argument) was given."""
    if alias_value is None:
        return value
    if value is not None and (not isinstance(value, str) or value != default):
        raise ValueError(f"moe_ext.{where}: give {name} or {alias}, not both")
    return alias_value


def _rows(t: Tensor, name: str, last: str, where: str) -> Tensor:
    """t [..., X] as [N, X]: a floating tensor with at least one dim (explicit sizes: -1 is ambiguous at X = 0)."""
    if not isinstance(t, Tensor) or t.dim() < 1 or not t.is_floating_point():
        raise ValueError(f"moe_ext.{where}: {name} must be a floating-point tensor [..., {last}], got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _logits(hidden_states: Tensor, gating_output: Tensor, where: str) -> Tuple[Tensor, Tensor]:
    """(hidden_states as [T, H], gating_output as [T, E]), after checking one row of logits per token."""
    x = _rows(hidden_states, "hidden_states", "H", where)
    logits = _rows(gating_output, "gating_output", "E", where)
    if logits.shape[0] != x.shape[0]:
        raise ValueError(f"moe_ext.{where}: gating_output must have one row per token ({x.shape[0]}), got "
                         f"{tuple(gating_output.shape)}")
    return x, logits


def fused_topk(hidden_states: Tensor, gating_output: Tensor, topk: int, renormalize: bool,
               indices_type: Optional[torch.dtype] = None, scoring_func: str = "softmax"
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """vLLM's fused_topk: (topk_weights [T, k] fp32, topk_ids [T, k] int32 (or indices_type),
    token_expert_indices [T, k] int32, slot (t, j) numbered j * T + t as vLLM's kernel numbers it).

    Each token's topk experts by softmax (or sigmoid) score over gating_output [..., E], best first, ties
    to the lower id; renormalize divides the chosen weights by their sum. Differentiable in gating_output.
    """
    _, logits = _logits(hidden_states, gating_output, "fused_topk")
    g = topk_gating(logits, topk, score_func=scoring_func, renormalize=renormalize)
    T = logits.shape[0]
    slots = torch.arange(topk, device=logits.device, dtype=torch.int32).unsqueeze(0) * T + \
        torch.arange(T, device=logits.device, dtype=torch.int32).unsqueeze(1)
    ids = g.expert_ids if indices_type is None else g.expert_ids.to(indices_type)
    return g.weights, ids, slots


def grouped_topk(hidden_states: Tensor, gating_output: Tensor, topk: int, renormalize: bool,
                 num_expert_group: int = 0, topk_group: int = 0, scoring_func: str = "softmax",
                 routed_scaling_factor: float = 1.0, e_score_correction_bias: Optional[Tensor] = None
                 ) -> Tuple[Tensor, Tensor]:
    """vLLM's grouped_topk (DeepSeek-V2/V3 routing): (topk_weights [T, k] fp32, topk_ids [T, k] int32).

    The E experts form num_expert_group groups; the topk_group best groups stay eligible. With
    e_score_correction_bias [E] (DeepSeek-V3) experts are selected by score + bias, a group scores the sum
    of its two best such keys, and the weights are the unbiased scores; without it (DeepSeek-V2) a group
    scores its best expert. Then renormalize, then x routed_scaling_factor. Differentiable in gating_output.
    """
    _, logits = _logits(hidden_states, gating_output, "grouped_topk")
    groups = num_expert_group or 1
    g = topk_gating(logits, topk, score_func=scoring_func, renormalize=renormalize,
                    expert_bias=e_score_correction_bias, num_groups=groups,
                    topk_groups=(topk_group or 1) if groups > 1 else 1, routed_scaling=routed_scaling_factor,
                    group_score="max" if e_score_correction_bias is None else "top2_sum")
    return g.weights, g.expert_ids


def fused_experts(hidden_states: Tensor, w1: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                  inplace: bool = False, activation: str = "silu", apply_router_weight_on_input: bool = False,
                  global_num_experts: int = -1, expert_map: Optional[Tensor] = None, *,
                  w1_bias: Optional[Tensor] = None, w2_bias: Optional[Tensor] = None,
                  recompute: bool = False) -> Tensor:
    """vLLM's fused_experts: sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x_t), shaped like
    hidden_states [..., H], on routing computed elsewhere (fused_topk, grouped_topk, a custom router).

    w1 [E, 2F, H] (gated: gate rows, then up rows) or [E, F, H]; w2 [E, H, F]; topk_weights [T, k] float,
    topk_ids [T, k] int32/int64 (-1: no expert). expert_map [E_global] int (expert parallelism): topk_ids
    are global ids, w1/w2 hold this rank's experts, expert_map[e] is e's local index or -1; the result is
    this rank's partial sum. apply_router_weight_on_input (Llama 4, k = 1): the weight scales the
    expert's input instead of its output. inplace=True writes into hidden_states (inference).
    Differentiable in hidden_states, w1, w2, the biases and topk_weights. recompute: see fused_moe.
    """
    x = _rows(hidden_states, "hidden_states", "H", "fused_experts")
    T, H = x.shape
    if (topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_ids.dtype not in (torch.int32, torch.int64)
            or topk_weights.shape != topk_ids.shape or not topk_weights.is_floating_point()):
        raise ValueError(f"moe_ext.fused_experts: topk_ids must be [T, k] = [{T}, k] int32 or int64 and topk_weights "
                         f"a float tensor of its shape, got topk_ids {topk_ids.dtype} {tuple(topk_ids.shape)} and "
                         f"topk_weights {topk_weights.dtype} {tuple(topk_weights.shape)}")
    E_global = None
    if expert_map is not None:
        if expert_map.dim() != 1 or expert_map.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"moe_ext.fused_experts: expert_map must be [E_global] int32 or int64, got "
                             f"{tuple(expert_map.shape)} {expert_map.dtype}")
        E_global = expert_map.shape[0]
    if global_num_experts not in (-1, None) and global_num_experts != (E_global if E_global is not None
                                                                       else w1.shape[0]):
        raise ValueError(f"moe_ext.fused_experts: global_num_experts = {global_num_experts}, but there are "
                         f"{E_global if E_global is not None else w1.shape[0]} experts "
                         f"({'expert_map' if E_global is not None else 'w1'})")
    E, _ = check_expert_weights(w1, w2, activation, H)
    return _experts(hidden_states, x, w1, w2, topk_weights, topk_ids, E, activation, w1_bias, w2_bias, expert_map,
                    apply_router_weight_on_input, inplace, recompute, "fused_experts")


def _experts(hidden_states, x, w1, w2, weights, ids, E, activation, b1, b2, expert_map, weight_on_input, inplace,
             recompute, where):
    """fused_experts on checked arguments (x: hidden_states as [T, H])."""
    if expert_map is not None:  # global ids -> this rank's local ids, -1 (no compute) for the others
        m = expert_map.to(ids.device)
        n = m.shape[0]
        check_id_values(f"moe_ext.{where}: topk_ids", ids, n, "-1 or a global expert id")
        # Clamped gather: an out-of-range id never indexes out of bounds on a device (no sync to check it).
        valid = (ids >= 0) & (ids < n)
        ids = torch.where(valid, m[ids.long().clamp(0, max(n - 1, 0))], -1).to(torch.int32)
    if weight_on_input:
        if ids.shape[1] != 1:
            raise ValueError(f"moe_ext.{where}: apply_router_weight_on_input needs topk = 1, got {ids.shape[1]}")
        x = x * weights.to(x.dtype)
        weights = None
    y_sorted, _, row_map = _permute_expert_ffn(x, ids, E, w1, w2, activation, b1, b2, -1, recompute)
    out = unpermute(y_sorted, row_map, weights).reshape(hidden_states.shape)
    if inplace:
        return hidden_states.copy_(out)
    return out


def fused_moe(hidden_states: Tensor, w1: Tensor, w2: Tensor, gating_output: Tensor, topk: int,
              renormalize: bool = True, inplace: bool = False, *, activation: str = "silu",
              score_func: str = "softmax", expert_bias: Optional[Tensor] = None,
              use_grouped_topk: Optional[bool] = None, num_expert_group: Optional[int] = 1,
              topk_group: Optional[int] = 1, routed_scaling_factor: float = 1.0,
              w1_bias: Optional[Tensor] = None, w2_bias: Optional[Tensor] = None,
              global_num_experts: int = -1, expert_map: Optional[Tensor] = None,
              recompute: bool = False, scoring_func: Optional[str] = None,
              e_score_correction_bias: Optional[Tensor] = None, group_score: Optional[str] = None,
              apply_router_weight_on_input: bool = False) -> Tensor:
    """Drop-in fused MoE (vLLM's argument order and names), differentiable in all four tensor inputs:
    the routing of fused_topk / grouped_topk, then fused_experts.

    hidden_states [..., H]; w1 [E, 2F, H] (gated "silu"/"gelu": gate rows then up rows, as in
    transformers' gate_up_proj and vLLM's w1) or [E, F, H] ("silu_no_mul", "gelu_no_mul",
    "relu_no_mul"); w2 [E, H, F]; gating_output [..., E] router logits. Routes each token to its topk
    experts by softmax (or sigmoid) scores, renormalising the chosen weights when renormalize, and
    returns sum_j weight_j * expert_j(x) shaped like hidden_states. Under torch.autocast the expert
    GEMMs run in the autocast dtype, as does the result (docs/ops.md, "Mixed precision").

    vLLM's options: inplace=True writes the result into hidden_states and returns it (inference: not
    with inputs that need gradients). Group-limited routing (num_expert_group groups, the topk_group
    best kept) applies when use_grouped_topk is True, or, left None, when num_expert_group > 1; False
    routes over all experts. As in vLLM's grouped_topk, a group scores the sum of its two best experts
    with a selection bias and its best expert without one (group_score="top2_sum" or "max" overrides).
    expert_map [E_global] int (expert parallelism): gating_output has E_global columns, w1/w2 hold this
    rank's E_local experts, and expert_map[e] is expert e's local index or -1; the result sums this
    rank's experts only (partial sums, to be reduced over the ranks). global_num_experts, when given,
    must equal E_global. apply_router_weight_on_input: see fused_experts. recompute=True: the backward
    recomputes the grouped tokens and the activation instead of saving them (permute_expert_ffn).
    vLLM's spellings scoring_func and e_score_correction_bias are accepted for score_func and expert_bias.
    """
    score_func = _alias("score_func", score_func, "softmax", "scoring_func", scoring_func)
    expert_bias = _alias("expert_bias", expert_bias, None, "e_score_correction_bias", e_score_correction_bias)
    x, logits = _logits(hidden_states, gating_output, "fused_moe")
    E_global = logits.shape[1]
    if global_num_experts not in (-1, None) and global_num_experts != E_global:
        raise ValueError(f"moe_ext.fused_moe: global_num_experts = {global_num_experts} but gating_output has "
                         f"{E_global} columns")
    if expert_map is not None and (expert_map.dim() != 1 or expert_map.shape[0] != E_global
                                   or expert_map.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"moe_ext.fused_moe: expert_map must be [E_global] = [{E_global}] int32 or int64, got "
                         f"{tuple(expert_map.shape)} {expert_map.dtype}")
    E, _ = check_expert_weights(w1, w2, activation, x.shape[1], E_global if expert_map is None else None)
    groups = num_expert_group or 1
    if use_grouped_topk is False:
        groups, topk_group = 1, 1
    elif use_grouped_topk and groups <= 1:
        raise ValueError("moe_ext.fused_moe: use_grouped_topk=True needs num_expert_group > 1")
    if group_score is None:
        group_score = "max" if expert_bias is None else "top2_sum"
    g = topk_gating(logits, topk, score_func=score_func, renormalize=renormalize, expert_bias=expert_bias,
                    num_groups=groups, topk_groups=topk_group or 1, routed_scaling=routed_scaling_factor,
                    group_score=group_score)
    return _experts(hidden_states, x, w1, w2, g.weights, g.expert_ids, E, activation, w1_bias, w2_bias, expert_map,
                    apply_router_weight_on_input, inplace, recompute, "fused_moe")
