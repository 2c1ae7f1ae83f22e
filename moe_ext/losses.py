"""Router losses, computed from topk_gating's fused statistics (no second pass over the logits).

Load-balancing loss (Switch Transformer, GShard):  E * sum_e f_e * P_e
    f_e = fraction of the T*k routed slots that chose expert e (before any capacity drop),
    P_e = mean over tokens of expert e's full score (softmax probability or sigmoid).
  It is 1 for perfectly uniform routing. transformers' load_balancing_loss_func sums f over the k
  choices without dividing by k, so for k > 1 its value is k times this one.
Global-batch balance loss (Qwen): f_e from the counts summed over the data-parallel ranks, P_e local.
Sequence-wise balance loss (DeepSeek-V3's complementary loss): the same product per sequence of S tokens,
  with P from the normalised scores s'_te = s_te / sum_j s_tj, averaged over the sequences.
z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
Both differentiate back to the router logits through score_sum and lse (f_e is a count: no gradient).
"""
from typing import Union

import torch
from torch import Tensor


def load_balancing_loss(tokens_per_expert: Tensor, score_sum: Tensor, num_tokens: int, top_k: int) -> Tensor:
    """tokens_per_expert [E] (slots per expert), score_sum [E] (sum over tokens of full scores)."""
    E = score_sum.shape[0]
    if num_tokens == 0:
        return score_sum.sum() * 0.0
    f = tokens_per_expert.to(score_sum.dtype) / (num_tokens * top_k)
    p = score_sum / num_tokens
    return E * (f * p).sum()


def global_load_balancing_loss(tokens_per_expert: Tensor, score_sum: Tensor, num_tokens: int, top_k: int,
                               group=None) -> Tensor:
    """Global-batch balance loss (Qwen, "Demons in the Detail", 2025): E * sum_e f_e * P_e with f_e from the
    slot counts summed over the data-parallel `group` (default: the world) and P_e = score_sum / T from
    this rank's tokens, so the constraint applies to the whole global batch instead of each micro-batch.

    Every rank of the group must call it (a rank without tokens too: it contributes zeros). The counts
    are reduced as int64 with a functional all-reduce: no host synchronisation, traceable by
    torch.compile. Without an initialised process group it is load_balancing_loss.
    """
    counts = tokens_per_expert.to(torch.int64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed import _functional_collectives as funcol
        counts = funcol.all_reduce(counts, "sum", group if group is not None else torch.distributed.group.WORLD)
    f = counts.to(score_sum.dtype) / counts.sum().clamp_min(1).to(score_sum.dtype)
    p = score_sum / max(num_tokens, 1)
    return score_sum.shape[0] * (f * p).sum()


def sequence_load_balancing_loss(logits: Tensor, expert_ids: Tensor, num_seqs: int, top_k: int,
                                 score_func: str = "softmax") -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over sequences: mean_b E * sum_e f_be * P_be.

    logits [T, E] with T = num_seqs * S tokens, sequence-major (x [B, S, H] flattened); expert_ids [T, k]
    the chosen experts (before capacity drops; -1 counts nowhere). f_be = (slots of sequence b routed to e)
    / (k * S); P_be = mean over the tokens of sequence b of s'_te = s_te / sum_j s_tj, where s is the
    softmax or sigmoid score (for softmax s' = s, and with one sequence this is load_balancing_loss).
    Differentiable w.r.t. logits through P. Deterministic, no host synchronisation: the counts come
    from a comparison against every expert ([T, k, E] booleans), not from atomics.
    """
    T, E = logits.shape
    if T == 0:
        return logits.sum() * 0.0
    if num_seqs < 1 or T % num_seqs:
        raise ValueError(f"moe_ext.sequence_load_balancing_loss: {T} tokens do not split into num_seqs = "
                         f"{num_seqs} sequences of equal length")
    S = T // num_seqs
    lg = logits if logits.dtype == torch.float64 else logits.float()
    if score_func == "sigmoid":
        s = torch.sigmoid(lg)
        s = s / s.sum(-1, keepdim=True)
    else:
        s = torch.softmax(lg, dim=-1)
    p = s.view(num_seqs, S, E).mean(1)
    hits = expert_ids.unsqueeze(-1) == torch.arange(E, device=expert_ids.device, dtype=expert_ids.dtype)
    f = hits.view(num_seqs, S * top_k, E).sum(1).to(p.dtype) * (E / (top_k * S))
    return (f * p).sum(-1).mean()


def z_loss(lse: Tensor) -> Tensor:
    """lse [T]: each token's logsumexp of router logits."""
    if lse.numel() == 0:
        return lse.sum() * 0.0
    return (lse * lse).mean()


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, aux_loss, grad_scale):
        ctx.aux_meta = (aux_loss.shape, aux_loss.dtype, aux_loss.device)
        ctx.grad_scale = grad_scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        shape, dtype, device = ctx.aux_meta
        return grad_output, torch.ones(shape, dtype=dtype, device=device) * ctx.grad_scale, None


def attach_aux_loss(output: Tensor, aux_loss: Tensor, grad_scale: Union[float, Tensor] = 1.0) -> Tensor:
    """output itself, carrying aux_loss's gradient: the backward of any loss that depends on the
    returned tensor also backpropagates grad_scale * d(aux_loss), as if aux_loss had been added to
    that loss (Megatron-LM's MoEAuxLossAutoScaler).

    For training set-ups where a side output of a layer never reaches the loss: torch.utils.checkpoint
    with use_reentrant=True (its forward runs without autograd and the recomputation's aux loss is never
    differentiated), pipeline schedules. grad_scale: the factor the main loss is multiplied by before
    its backward (a GradScaler's scale, 1 / gradient-accumulation steps), which this gradient does not
    pass through. Adding aux_loss to the loss as well would count it twice.
    """
    return _AttachAuxLoss.apply(output, aux_loss, grad_scale)
