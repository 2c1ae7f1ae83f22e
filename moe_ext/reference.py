"""Pure-PyTorch references of every moe_ext op, and of a whole MoE layer.

They are written for clarity, not speed, and are what the tests hold the kernels to (run them in
float64 where precision matters). Semantics: docs/ops.md.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import ACTIVATIONS


def _ranked(keys: Tensor, excluded: Optional[Tensor] = None) -> Tensor:
    """Indices of keys [..., E] sorted best first: larger first, NaN after every number, excluded
    entries after everything, ties to the lower index (stable sorts, least significant key first)."""
    nan = torch.isnan(keys)
    order = torch.sort(-torch.where(nan, torch.zeros_like(keys), keys), dim=-1, stable=True).indices
    for flag in (nan, excluded):
        if flag is not None:
            order = torch.gather(order, -1, torch.sort(torch.gather(flag.to(torch.int8), -1, order), dim=-1,
                                                       stable=True).indices)
    return order


def topk_gating(logits: Tensor, k: int, score_func: str = "softmax", order: str = "softmax_topk",
                renormalize: bool = True, expert_bias: Optional[Tensor] = None, num_groups: int = 1,
                topk_groups: int = 1, routed_scaling: float = 1.0, group_score: str = "top2_sum"):
    """Reference of moe_ext.topk_gating: (weights, expert_ids int64, tokens_per_expert, score_sum, lse)."""
    T, E = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lg = logits.to(acc)
    lse = torch.logsumexp(lg, dim=-1)
    score = torch.sigmoid(lg) if score_func == "sigmoid" else torch.softmax(lg, dim=-1)
    key = lg if (score_func == "softmax" and order == "topk_softmax") else score
    if expert_bias is not None:
        key = key + expert_bias.to(acc)
    if num_groups > 1:
        gs = E // num_groups
        kg = key.view(T, num_groups, gs)
        n_best = 1 if group_score == "max" else 2
        best = torch.gather(kg, -1, _ranked(kg.reshape(T * num_groups, gs)).view(T, num_groups, gs)[..., :n_best])
        kept = _ranked(best.sum(-1))[:, :topk_groups]
        mask = torch.zeros(T, num_groups, dtype=torch.bool, device=logits.device).scatter_(1, kept, True)
        excluded = ~mask.repeat_interleave(gs, dim=1)
    else:
        excluded = None
    ids = _ranked(key, excluded)[:, :k]
    if score_func == "softmax" and order == "topk_softmax":
        w = torch.softmax(torch.gather(lg, 1, ids), dim=-1)
    else:
        w = torch.gather(score, 1, ids)
        if renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * routed_scaling
    tpe = torch.bincount(ids.reshape(-1), minlength=E).to(torch.int32) if T else torch.zeros(E, dtype=torch.int32)
    return w, ids, tpe, score.sum(0), lse


def permute(x: Tensor, expert_ids: Tensor, num_experts: int, max_rows: int = -1):
    """Reference of moe_ext.permute (a stable sort of the slots by expert)."""
    T, k = expert_ids.shape
    R = T * k if max_rows < 0 else max_rows
    flat = expert_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(flat[valid], minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    offsets = offsets.clamp(max=R)
    rows = torch.full((T * k,), -1, dtype=torch.int64)
    n_valid = int(valid.sum())
    rows[order[:n_valid]] = torch.arange(n_valid)
    rows[rows >= R] = -1
    x_sorted = x.new_zeros((R, x.shape[1]))
    keep = rows >= 0
    x_sorted[rows[keep]] = x.repeat_interleave(k, dim=0)[keep]
    return x_sorted, offsets.to(x.device), rows.view(T, k).to(x.device)


def unpermute(y_sorted: Tensor, row_map: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Reference of moe_ext.unpermute, accumulated in float64."""
    T, k = row_map.shape
    if y_sorted.shape[0] == 0:  # every slot dropped (max_rows = 0): nothing to gather
        return y_sorted.new_zeros((T,) + tuple(y_sorted.shape[1:]))
    rows = y_sorted.double()[row_map.clamp(min=0)]  # [T, k, H]
    w = torch.ones(T, k, dtype=torch.float64) if weights is None else weights.double()
    w = torch.where(row_map >= 0, w, torch.zeros_like(w))
    return (rows * w.unsqueeze(-1)).sum(1).to(y_sorted.dtype)


def grouped_gemm(a: Tensor, b: Tensor, expert_offsets: Tensor, trans_b: bool = False,
                 bias: Optional[Tensor] = None) -> Tensor:
    """Reference of moe_ext.grouped_gemm: a Python loop over experts."""
    out = a.new_zeros((a.shape[0], b.shape[1] if trans_b else b.shape[2]))
    o = expert_offsets.tolist()
    for e in range(b.shape[0]):
        be = b[e].t() if trans_b else b[e]
        out[o[e]:o[e + 1]] = a[o[e]:o[e + 1]] @ be + (0 if bias is None else bias[e])
    return out


def grouped_gemm_wgrad(x: Tensor, y: Tensor, expert_offsets: Tensor) -> Tensor:
    """Reference of moe_ext.grouped_gemm_wgrad: out[e] = x[rows of e]^T @ y[rows of e]."""
    o = expert_offsets.tolist()
    return torch.stack([x[o[e]:o[e + 1]].t() @ y[o[e]:o[e + 1]] for e in range(len(o) - 1)])


def expert_forward(x: Tensor, w1: Tensor, w2: Tensor, activation: str = "silu", b1: Optional[Tensor] = None,
                   b2: Optional[Tensor] = None) -> Tensor:
    """One expert on tokens x [n, H]: w1 [2F | F, H] (gated: [gate; up], interleaved for "swigluoai"), w2 [H, F]."""
    # the activation's torch composition (functional.ACTIVATIONS), not the moe_ext kernel it checks
    return F.linear(ACTIVATIONS[activation][0](F.linear(x, w1, b1)), w2, b2)


def naive_moe(x: Tensor, router_weight: Tensor, w1: Tensor, w2: Tensor, k: int, activation: str = "silu",
              b1: Optional[Tensor] = None, b2: Optional[Tensor] = None) -> Tensor:
    """The textbook MoE layer: top-k over the router scores, softmax over the k chosen, then a loop
    over experts with a mask of the tokens that chose each one. x [T, H] -> [T, H]."""
    logits = x @ router_weight.t()
    top_vals, top_idx = torch.topk(logits, k, dim=-1)
    gates = torch.softmax(top_vals, dim=-1)
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        mask = top_idx == e  # [T, k]
        tok = mask.any(-1).nonzero(as_tuple=True)[0]
        if tok.numel() == 0:
            continue
        g = (gates * mask).sum(-1)[tok].unsqueeze(-1)
        out[tok] += g * expert_forward(x[tok], w1[e], w2[e], activation,
                                       None if b1 is None else b1[e], None if b2 is None else b2[e])
    return out


def moe(x: Tensor, logits: Tensor, w1: Tensor, w2: Tensor, k: int, activation: str = "silu",
        renormalize: bool = True, **gating) -> Tensor:
    """Sort-based reference of fused_moe: the reference gating, then each token's k experts."""
    w, ids, *_ = topk_gating(logits, k, renormalize=renormalize, **gating)
    out = torch.zeros_like(x, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    for j in range(k):
        for e in ids[:, j].unique().tolist():
            tok = (ids[:, j] == e).nonzero(as_tuple=True)[0]
            out[tok] += w[tok, j].unsqueeze(-1).to(out.dtype) * expert_forward(x[tok], w1[e], w2[e], activation).to(out.dtype)
    return out.to(x.dtype)


def capacity_reroute(expert_ids: Tensor, keys: Tensor, capacity: int) -> Tensor:
    """Reference of moe_ext's capacity_reroute: the greedy pass in Python (see moe_ext.routing)."""
    T, k = expert_ids.shape
    E = keys.shape[1]
    pref = _ranked(keys.float()).tolist()
    ids = expert_ids.tolist()
    load = [0] * E
    for j in range(k):
        for t in range(T):
            e = ids[t][j]
            if not 0 <= e < E:
                ids[t][j] = -1
                continue
            if load[e] < capacity:
                load[e] += 1
                continue
            ids[t][j] = -1
            for alt in pref[t]:
                if alt not in ids[t] and load[alt] < capacity:
                    ids[t][j] = alt
                    load[alt] += 1
                    break
    return torch.tensor(ids, dtype=expert_ids.dtype).view(T, k)


def capacity_drop(expert_ids: Tensor, capacity: int, weights: Optional[Tensor] = None) -> Tensor:
    """Reference of moe_ext.apply_capacity(overflow="drop"): each expert keeps `capacity` slots, taken
    in position order (every first choice, then every second choice, ...; lower token first) or, with
    weights [T, k] (drop_policy="probs"), larger weight first, NaN last, ties in position order."""
    T, k = expert_ids.shape
    slots = [(j, t) for j in range(k) for t in range(T)]
    if weights is not None:
        w = weights.tolist()
        slots.sort(key=lambda s: (math.isnan(w[s[1]][s[0]]), 0.0 if math.isnan(w[s[1]][s[0]]) else -w[s[1]][s[0]]))
    ids = expert_ids.tolist()
    out = [[-1] * k for _ in range(T)]
    load = {}
    for j, t in slots:
        e = ids[t][j]
        if e >= 0 and load.get(e, 0) < capacity:
            load[e] = load.get(e, 0) + 1
            out[t][j] = e
    return torch.tensor(out, dtype=expert_ids.dtype).view(T, k)


def sequence_load_balancing_loss(logits: Tensor, expert_ids: Tensor, num_seqs: int, top_k: int,
                                 score_func: str = "softmax") -> Tensor:
    """Reference of moe_ext.losses.sequence_load_balancing_loss, as DeepSeek-V3 writes it (eqs. 17-20),
    one sequence at a time: L_b = sum_i f_i P_i, f_i = N / (K S) * #{t : i chosen by t},
    P_i = 1/S sum_t s_it / sum_j s_jt; the mean over sequences."""
    T, E = logits.shape
    S = T // num_seqs
    losses = []
    for b in range(num_seqs):
        lg = logits[b * S:(b + 1) * S].double()
        s = torch.sigmoid(lg) if score_func == "sigmoid" else torch.softmax(lg, dim=-1)
        s = s / s.sum(-1, keepdim=True)
        ids = expert_ids[b * S:(b + 1) * S]
        total = lg.new_zeros(())
        for i in range(E):
            f = E / (top_k * S) * float((ids == i).sum())
            total = total + f * s[:, i].mean()
        losses.append(total)
    return torch.stack(losses).mean()


def _textbook_expert_choice(scores: Tensor, capacity: int, token_mask: Optional[Tensor]) -> Tensor:
    """Expert ids [T, E] of expert-choice routing, one expert and one token at a time: expert e takes
    its `capacity` highest-scoring tokens among those that count, ties to the lower token."""
    T, E = scores.shape
    ids = torch.full((T, E), -1, dtype=torch.int64)
    s = scores.tolist()
    for e in range(E):
        cand = [t for t in range(T) if token_mask is None or bool(token_mask[t])]
        cand.sort(key=lambda t: -s[t][e])  # a stable sort: equal scores keep token order
        for t in cand[:capacity]:
            ids[t, e] = e
    return ids


def moe_layer(layer, x: Tensor, token_mask: Optional[Tensor] = None):
    """Reference forward of a moe_ext.MoELayer (jitter off), written from the semantics in docs/ops.md and
    docs/routing.md with the references above and per-token loops: (y shaped like x, aux_loss,
    {"tokens_per_expert", "drop_fraction", "router_entropy"}). Differentiable w.r.t. x and the layer's
    parameters; run the layer in float64 to compare closely."""
    shape = x.shape
    xt = x.reshape(-1, shape[-1])
    T, E, k = xt.shape[0], layer.num_experts, layer.top_k
    mask = None if token_mask is None else token_mask.reshape(T)
    real = list(range(T)) if mask is None else [t for t in range(T) if bool(mask[t])]
    n = len(real)
    logits = F.linear(xt, layer.router.weight, getattr(layer.router, "bias", None))
    lg = logits if logits.dtype == torch.float64 else logits.float()
    scores = torch.sigmoid(lg) if layer.score_func == "sigmoid" else torch.softmax(lg, dim=-1)
    lse = torch.logsumexp(lg, dim=-1)
    bias = getattr(layer.router, "expert_bias", None)
    cf = layer.capacity_factor if layer.capacity_factor is not None else 1.0
    cap = math.ceil(cf * T * k / E)
    if layer.routing == "expert_choice":
        ids = _textbook_expert_choice(scores.detach(), min(cap, T), mask)
        weights, chosen = scores, None
    else:
        weights, chosen, *_ = topk_gating(lg, k, layer.score_func, "softmax_topk", layer.renormalize, bias,
                                          layer.n_group, layer.topk_group, layer.routed_scaling_factor,
                                          layer.group_score)
        if mask is not None:
            chosen = torch.where(mask.reshape(T, 1), chosen, torch.full_like(chosen, -1))
        ids = chosen
        if layer.capacity_factor is not None:
            if layer.overflow == "reroute":
                keys = lg.detach() if bias is None else scores.detach() + bias.to(lg.dtype)
                ids = capacity_reroute(chosen, keys, cap)
            else:
                ids = capacity_drop(chosen, cap, weights.detach() if layer.drop_policy == "probs" else None)
    ex = layer.experts
    rows = []
    for t in range(T):
        acc = torch.zeros_like(xt[t])
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            w = weights[t, e] if layer.routing == "expert_choice" else weights[t, j]
            out = expert_forward(xt[t:t + 1], ex.w1[e], ex.w2[e], ex.activation,
                                 None if ex.b1 is None else ex.b1[e], None if ex.b2 is None else ex.b2[e])[0]
            acc = acc + w.to(acc.dtype) * out
        rows.append(acc)
    y = torch.stack(rows) if T else xt * 0
    if layer.shared_experts is not None:
        sh = layer.shared_experts
        shared = sum(expert_forward(xt, sh.w1[s], sh.w2[s], sh.activation) for s in range(sh.w1.shape[0]))
        if layer.shared_expert_gate is not None:
            shared = torch.sigmoid(F.linear(xt, layer.shared_expert_gate.weight)) * shared
        y = y + shared

    aux = lg.sum() * 0.0
    if layer.aux_loss_coef and chosen is not None and n:
        if layer.aux_loss_scope == "sequence":
            num_seqs = math.prod(shape[:-2]) if len(shape) > 2 else 1
            S = T // num_seqs
            norm = scores / scores.sum(-1, keepdim=True)
            per_seq = []
            for b in range(num_seqs):
                toks = [t for t in real if b * S <= t < (b + 1) * S]
                if toks:
                    f = [float((chosen[toks] == e).sum()) * E / (k * len(toks)) for e in range(E)]
                    per_seq.append(sum(f[e] * norm[toks, e].mean() for e in range(E)))
            lbl = torch.stack(per_seq).mean()
        else:  # "batch", and "global" without a process group
            f = [float((chosen[real] == e).sum()) / (n * k) for e in range(E)]
            lbl = E * sum(f[e] * scores[real, e].mean() for e in range(E))
        aux = aux + layer.aux_loss_coef * lbl
    if layer.z_loss_coef and n:
        aux = aux + layer.z_loss_coef * (lse[real] ** 2).mean()

    kept = torch.tensor([int((ids[real] == e).sum()) for e in range(E)], dtype=torch.int32)
    logp = torch.log_softmax(lg.detach().double(), dim=-1)
    entropy = float(-(logp.exp() * logp).sum(-1)[real].mean()) if n else 0.0
    drop = 0.0
    if layer.routing == "token_choice" and n:
        drop = 1.0 - float(kept.sum()) / (n * k)
    return y.reshape(shape), aux, {"tokens_per_expert": kept, "drop_fraction": drop, "router_entropy": entropy}
