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
from typing import Optional, Union

import torch
from torch import Tensor


def _per_token(num_tokens: Union[int, Tensor]):
    """num_tokens as a divisor: at least 1 (no tokens: the sums are 0, and so is the loss). A device
    tensor (the count of unmasked tokens) stays on the device."""
    return num_tokens.clamp_min(1) if isinstance(num_tokens, Tensor) else max(num_tokens, 1)


def expert_counts(keys: Tensor, n: int) -> Tensor:
    """How many entries of keys (any shape, integer) equal each of 0 .. n-1, as int64 [n]; other values
    (-1: dropped) count nowhere. A sort and a binary search: deterministic, no atomics, no host sync."""
    flat = torch.sort(keys.reshape(-1)).values
    edges = torch.searchsorted(flat, torch.arange(n + 1, device=keys.device, dtype=flat.dtype))
    return edges[1:] - edges[:-1]


def _check_counts(where: str, tokens_per_expert: Tensor, score_sum: Tensor, top_k: int) -> None:
    if (tokens_per_expert.dim() != 1 or score_sum.dim() != 1 or tokens_per_expert.shape != score_sum.shape
            or not score_sum.is_floating_point() or tokens_per_expert.is_floating_point()
            or tokens_per_expert.dtype == torch.bool):
        raise ValueError(f"moe_ext.{where}: tokens_per_expert must be an integer tensor [E] and score_sum a float "
                         f"tensor [E], got {tokens_per_expert.dtype} {tuple(tokens_per_expert.shape)} and "
                         f"{score_sum.dtype} {tuple(score_sum.shape)}")
    if top_k < 1:
        raise ValueError(f"moe_ext.{where}: top_k must be >= 1, got {top_k}")


def load_balancing_loss(tokens_per_expert: Tensor, score_sum: Tensor, num_tokens: Union[int, Tensor],
                        top_k: int) -> Tensor:
    """tokens_per_expert [E] (slots per expert), score_sum [E] (sum over tokens of full scores);
    num_tokens: an int, or a 0-d tensor (the unmasked tokens of a padded batch)."""
    _check_counts("load_balancing_loss", tokens_per_expert, score_sum, top_k)
    E = score_sum.shape[0]
    n = _per_token(num_tokens)
    f = tokens_per_expert.to(score_sum.dtype) / (n * top_k)
    return E * (f * (score_sum / n)).sum()


def global_load_balancing_loss(tokens_per_expert: Tensor, score_sum: Tensor, num_tokens: Union[int, Tensor],
                               top_k: int, group=None) -> Tensor:
    """Global-batch balance loss (Qwen, "Demons in the Detail", 2025): E * sum_e f_e * P_e with f_e from the
    slot counts summed over the data-parallel `group` (default: the world) and P_e = score_sum / T from
    this rank's tokens, so the constraint applies to the whole global batch instead of each micro-batch.

    Every rank of the group must call it (a rank without tokens too: it contributes zeros). The counts
    are reduced as int64 with a functional all-reduce: no host synchronisation, traceable by
    torch.compile. Without an initialised process group it is load_balancing_loss.
    """
    _check_counts("global_load_balancing_loss", tokens_per_expert, score_sum, top_k)
    counts = tokens_per_expert.to(torch.int64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed import _functional_collectives as funcol
        counts = funcol.all_reduce(counts, "sum", group if group is not None else torch.distributed.group.WORLD)
    f = counts.to(score_sum.dtype) / counts.sum().clamp_min(1).to(score_sum.dtype)
    return score_sum.shape[0] * (f * (score_sum / _per_token(num_tokens))).sum()


def sequence_load_balancing_loss(logits: Tensor, expert_ids: Tensor, num_seqs: int, top_k: int,
                                 score_func: str = "softmax", token_mask: Optional[Tensor] = None) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over sequences: mean_b E * sum_e f_be * P_be.

    logits [T, E] with T = num_seqs * S tokens, sequence-major (x [B, S, H] flattened); expert_ids [T, k]
    the chosen experts (before capacity drops; -1 counts nowhere). f_be = (slots of sequence b routed to e)
    / (k * S_b); P_be = mean over the tokens of sequence b of s'_te = s_te / sum_j s_tj, where s is the
    softmax or sigmoid score (for softmax s' = s, and with one sequence this is load_balancing_loss).
    token_mask [T] bool: only its tokens count (S_b of them in sequence b; give masked tokens id -1);
    sequences without tokens are left out of the mean. Differentiable w.r.t. logits through P.
    Deterministic, no host synchronisation (expert_counts).
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
    seq = torch.arange(T, device=logits.device) // S
    keys = torch.where(expert_ids >= 0, seq.unsqueeze(1) * E + expert_ids.long(), -1)
    counts = expert_counts(keys, num_seqs * E).view(num_seqs, E).to(s.dtype)
    if token_mask is None:
        p = s.view(num_seqs, S, E).mean(1)
        return (counts * (E / (top_k * S)) * p).sum(-1).mean()
    m = token_mask.reshape(T, 1).to(s.dtype)
    tokens = m.view(num_seqs, S).sum(1, keepdim=True)  # S_b
    p = (s * m).view(num_seqs, S, E).sum(1) / tokens.clamp_min(1)
    per_seq = (counts * E / (top_k * tokens.clamp_min(1)) * p).sum(-1)
    return per_seq.sum() / (tokens > 0).sum().clamp_min(1)


def z_loss(lse: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
    """lse [T]: each token's logsumexp of router logits; the mean of its squares over the tokens
    (token_mask [T] bool: over those only)."""
    if token_mask is None:
        return (lse * lse).mean() if lse.numel() else lse.sum() * 0.0
    m = token_mask.to(lse.dtype)
    return (lse * lse * m).sum() / m.sum().clamp_min(1)


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
