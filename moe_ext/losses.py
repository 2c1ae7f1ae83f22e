"""Router losses, computed from topk_gating's fused statistics (no second pass over the logits).

Load-balancing loss (Switch Transformer, GShard):  E * sum_e f_e * P_e
    f_e = fraction of the T*k routed slots that chose expert e (before any capacity drop),
    P_e = mean over tokens of expert e's full score (softmax probability or sigmoid).
  It is 1 for perfectly uniform routing. transformers' load_balancing_loss_func sums f over the k
  choices without dividing by k, so for k > 1 its value is k times this one.
z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
Both differentiate back to the router logits through score_sum and lse (f_e is a count: no gradient).
"""
from torch import Tensor


def load_balancing_loss(tokens_per_expert: Tensor, score_sum: Tensor, num_tokens: int, top_k: int) -> Tensor:
    """tokens_per_expert [E] (slots per expert), score_sum [E] (sum over tokens of full scores)."""
    E = score_sum.shape[0]
    if num_tokens == 0:
        return score_sum.sum() * 0.0
    f = tokens_per_expert.to(score_sum.dtype) / (num_tokens * top_k)
    p = score_sum / num_tokens
    return E * (f * p).sum()


def z_loss(lse: Tensor) -> Tensor:
    """lse [T]: each token's logsumexp of router logits."""
    if lse.numel() == 0:
        return lse.sum() * 0.0
    return (lse * lse).mean()
