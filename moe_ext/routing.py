"""Routing policies built on the op representation (expert ids per slot, -1 = dropped): capacity
limits for token choice, and expert-choice routing. No function here synchronises with the device.
"""
from typing import Optional

import torch
from torch import Tensor

from .functional import topk_gating


def capacity_rank(expert_ids: Tensor, num_experts: int, priority: Optional[Tensor] = None) -> Tensor:
    """Priority rank of every slot within its expert: [T, k] int64 (dropped slots: undefined).

    Priority (priority=None, drop_policy "position"): every token's first choice before any second
    choice, and so on; within one choice, lower token index first. With priority [T, k] (drop_policy
    "probs": the routing weights), higher values first, ties and NaN (last) in that position order. A
    slot is kept under capacity C when its rank is < C.
    """
    T, k = expert_ids.shape
    S = T * k
    flat = expert_ids.t().reshape(-1).long()  # p = j * T + t: the position order
    e = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    if priority is None:
        key = e * S + torch.arange(S, device=flat.device)
        sorted_key, order = torch.sort(key)
        sorted_e = sorted_key // S
    else:
        # Two stable sorts: by descending priority (position order among equals), then by expert.
        by_priority = torch.sort(-priority.detach().t().reshape(-1).double(), stable=True).indices
        order = by_priority[torch.sort(e[by_priority], stable=True).indices]
        sorted_e = e[order]
    first = torch.searchsorted(sorted_e, sorted_e)  # start of each expert's run, on the device
    rank = torch.empty_like(flat).scatter_(0, order, torch.arange(S, device=flat.device) - first)
    return rank.view(k, T).t()


def check_id_values(what: str, ids: Tensor, n: int, expected: str) -> None:
    """Raises ValueError naming `what` when ids (CPU, eager) holds a value outside [-1, n). Free there: no
    device sync, no graph break; device tensors and traced code are not read (their kernels skip such
    ids instead)."""
    if ids.device.type != "cpu" or torch.compiler.is_compiling() or not ids.numel():
        return
    bad = (ids < -1) | (ids >= n)
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(f"{what} holds {int(ids.reshape(-1)[i])} at flat index {i}, "
                         f"expected {expected} in [0, {n})")


def apply_capacity(expert_ids: Tensor, logits: Tensor, num_experts: int, capacity: int, overflow: str = "drop",
                   score_func: str = "softmax", expert_bias: Optional[Tensor] = None,
                   drop_policy: str = "position", weights: Optional[Tensor] = None) -> Tensor:
    """Expert ids [T, k] with the slots past each expert's capacity dropped (-1) or rerouted.

    overflow="drop": slots are admitted in priority order (capacity_rank); the rest become -1 and
    contribute zero (the kept slots keep their weights). drop_policy="position" (GShard, Switch): all
    first choices before any second choice, lower token first; "probs" (Megatron-LM's default): each
    expert keeps the slots with the largest routing weights [T, k] (`weights`, required), ties by
    position. overflow="reroute": slots are visited in
    priority order; one whose expert is full moves to the token's next preferred expert (by the
    selection key: logits, or score + expert_bias when a bias is given) that has room and that the token has not chosen, keeping the slot's weight; it is dropped only when
    no expert has room. Rerouting is a sequential greedy pass (the capacity_reroute op: a CPU loop, or
    one CUDA warp on the device, so no host synchronisation).
    """
    if drop_policy not in ("position", "probs"):
        raise ValueError(f"moe_ext.apply_capacity: drop_policy must be 'position' or 'probs', got {drop_policy!r}")
    if drop_policy == "probs" and overflow != "drop":
        raise ValueError("moe_ext.apply_capacity: drop_policy='probs' needs overflow='drop' (rerouting visits the "
                         "slots in position order)")
    if drop_policy == "probs" and (weights is None or weights.shape != expert_ids.shape):
        raise ValueError(f"moe_ext.apply_capacity: drop_policy='probs' needs weights shaped like expert_ids "
                         f"{tuple(expert_ids.shape)}, got {None if weights is None else tuple(weights.shape)}")
    if (logits.dim() != 2 or not logits.is_floating_point() or logits.shape[1] != num_experts
            or (expert_ids.dim() >= 1 and logits.shape[0] != expert_ids.shape[0])):
        raise ValueError(f"moe_ext.apply_capacity: logits must be a float tensor [T, num_experts] with expert_ids' "
                         f"T, got {logits.dtype} {tuple(logits.shape)} for expert_ids {tuple(expert_ids.shape)} and "
                         f"num_experts = {num_experts}")
    if overflow == "drop":
        # The reroute op checks its arguments in C++; the same checks for the drop path. Id values only
        # in eager mode on CPU tensors, where reading them costs no device synchronisation and no graph
        # break (permute checks them again on the CPU either way).
        if isinstance(capacity, int) and capacity < 0:
            raise ValueError(f"moe_ext.apply_capacity: capacity must be >= 0, got {capacity}")
        if expert_ids.dim() != 2 or expert_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"moe_ext.apply_capacity: expert_ids must be [T, k] int32 or int64, got "
                             f"{tuple(expert_ids.shape)} {expert_ids.dtype}")
        check_id_values("moe_ext.apply_capacity: expert_ids", expert_ids, num_experts,
                        "-1 (dropped) or a value")
        keep = capacity_rank(expert_ids, num_experts, weights if drop_policy == "probs" else None) < capacity
        return torch.where(keep & (expert_ids >= 0), expert_ids, torch.full_like(expert_ids, -1))
    if overflow != "reroute":
        raise ValueError(f"moe_ext.apply_capacity: overflow must be 'drop' or 'reroute', got {overflow!r}")
    keys = logits.detach().float()  # softmax and sigmoid both rank experts as the logits do
    if expert_bias is not None:  # ... unless a selection bias shifts the scores
        scores = torch.sigmoid(keys) if score_func == "sigmoid" else torch.softmax(keys, dim=-1)
        keys = scores + expert_bias.float()
    return torch.ops.moe_ext.capacity_reroute(expert_ids, keys, capacity)


def expert_choice(logits: Tensor, capacity: int, score_func: str = "softmax", token_mask: Optional[Tensor] = None):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its `capacity` best tokens
    (token_mask [T] bool: only among those tokens; the others are never taken).

    logits [T, E] -> (weights [T, E] fp32 (fp64 for fp64 logits), expert_ids [T, E] int32,
    scores [T, E], lse [T]): slot (t, e) holds e when expert e took token t, else -1, and its weight
    is the token's (unrenormalised) score for e, so permute/unpermute route it like token choice with
    k = E. Ties go to the lower token index. Differentiable w.r.t. logits through the weights.
    """
    T, E = logits.shape
    lg = logits if logits.dtype == torch.float64 else logits.float()  # as topk_gating: fp64 stays fp64
    scores = torch.sigmoid(lg) if score_func == "sigmoid" else torch.softmax(lg, dim=-1)
    lse = torch.logsumexp(lg, dim=-1)
    C = min(capacity, T)
    taken_t = torch.zeros(E, T, dtype=torch.bool, device=logits.device)  # [E, T]: expert e took token t
    if C > 0:
        key = -scores.detach().t()
        if token_mask is not None:  # masked tokens rank after every real one, then are dropped
            key = torch.where(token_mask.reshape(1, T), key, torch.full_like(key, float("inf")))
        top = torch.sort(key, dim=-1, stable=True).indices[:, :C]  # [E, C] token ids
        taken_t.scatter_(1, top, True)
        if token_mask is not None:
            taken_t &= token_mask.reshape(1, T)
    taken = taken_t.t()
    arange_e = torch.arange(E, device=logits.device, dtype=torch.int32).expand(T, E)
    ids = torch.where(taken, arange_e, torch.full_like(arange_e, -1))
    weights = torch.where(taken, scores, torch.zeros_like(scores))
    return weights, ids, scores, lse


@torch.no_grad()
def update_expert_bias(layer_or_bias, tokens_per_expert=None, rate: float = 1e-3) -> Tensor:
    """Auxiliary-loss-free load balancing (DeepSeek-V3, Wang et al. 2024): one in-place update of the
    selection bias, bias += rate * sign(mean_load - load).

    layer_or_bias: a MoELayer built with expert_bias=True (its router.expert_bias is updated), a
    module with .expert_bias or .e_score_correction_bias (a transformers DeepSeek-V3 router, or a MiniMax-M2
    block), or the
    bias tensor [E] itself. tokens_per_expert: the observed load [E] (any number type), or a list of
    such tensors (e.g. one per micro-batch), summed; default: the layer's last_stats["tokens_per_expert"].
    An overloaded expert's bias goes down by rate, an underloaded one's up, an expert exactly at the mean
    is left alone. Call it after the optimizer step, once per step. Returns the bias tensor.
    """
    bias = layer_or_bias
    if isinstance(bias, torch.nn.Module):
        mod = bias
        router = getattr(mod, "router", None) or getattr(mod, "gate", None) or mod
        bias = getattr(router, "expert_bias", None)
        if bias is None:
            bias = getattr(router, "e_score_correction_bias", None)
        if bias is None:  # MiniMax-M2 keeps it on the block
            bias = getattr(mod, "e_score_correction_bias", None)
        if bias is None:
            raise ValueError("moe_ext.update_expert_bias: the module has no expert bias (build MoELayer with "
                             "expert_bias=True)")
        if tokens_per_expert is None:
            stats = getattr(mod, "last_stats", None) or {}
            if "tokens_per_expert" not in stats:
                raise ValueError("moe_ext.update_expert_bias: pass tokens_per_expert (the layer has no last_stats "
                                 "from a forward yet)")
            tokens_per_expert = stats["tokens_per_expert"]
    if not isinstance(bias, Tensor):
        raise TypeError(f"moe_ext.update_expert_bias: expected a module or a tensor, got {type(bias).__name__}")
    if tokens_per_expert is None:
        raise ValueError("moe_ext.update_expert_bias: tokens_per_expert is required with a bare bias tensor")
    if isinstance(tokens_per_expert, (list, tuple)):
        load = torch.stack([torch.as_tensor(t, device=bias.device).double() for t in tokens_per_expert]).sum(0)
    else:
        load = torch.as_tensor(tokens_per_expert, device=bias.device).double()
    if load.shape != bias.shape:
        raise ValueError(f"moe_ext.update_expert_bias: tokens_per_expert must be shaped like the bias "
                         f"{tuple(bias.shape)}, got {tuple(load.shape)}")
    bias.add_((rate * torch.sign(load.mean() - load)).to(bias.dtype))
    return bias


__all__ = ["capacity_rank", "apply_capacity", "expert_choice", "topk_gating", "update_expert_bias"]
