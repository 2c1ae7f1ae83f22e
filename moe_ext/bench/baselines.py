"""Baselines timed next to moe_ext: plain-PyTorch ops, a torch grouped_mm MoE layer, transformers'
MixtralSparseMoeBlock (eager and grouped_mm experts; optional import), and the staged moe_ext layer
that carries the per-stage NVTX / profiler ranges.

None of these reads a device value back to the host, so they can be timed without host syncs
(the textbook loop, moe_ext.reference.naive_moe, does sync: it is timed eagerly).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import moe_ext.functional as MF

from .timing import NO_RANGES, Ranges


# --- plain PyTorch versions of the single ops -------------------------------------------------

def torch_gating(logits: Tensor, k: int, score_func: str = "softmax", num_groups: int = 1, topk_groups: int = 1,
                 routed_scaling: float = 1.0, expert_bias: Optional[Tensor] = None, renormalize: bool = True,
                 group_score: str = "top2_sum"):
    """(weights fp32 [T, k], ids [T, k]) the way HF/vLLM write it in eager PyTorch."""
    lg = logits.float()
    scores = torch.sigmoid(lg) if score_func == "sigmoid" else torch.softmax(lg, dim=-1)
    key = scores if expert_bias is None else scores + expert_bias.float()
    if num_groups > 1:
        T, E = key.shape
        grouped = key.view(T, num_groups, -1)
        grp = grouped.max(-1).values if group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(grp).scatter_(1, grp.topk(topk_groups, dim=-1).indices, 1.0)
        mask = keep.unsqueeze(-1).expand(T, num_groups, E // num_groups).reshape(T, E)
        key = key.masked_fill(mask == 0, float("-inf"))
    ids = key.topk(k, dim=-1).indices
    w = scores.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * routed_scaling, ids


def torch_permute(x: Tensor, ids: Tensor, E: int):
    """(x_sorted [S, H], offsets [E+1], row_map [T, k]) through a stable argsort; no host sync."""
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    row_map = torch.empty_like(flat).scatter_(0, order, torch.arange(flat.numel(), device=x.device))
    return x.index_select(0, order // k), offsets, row_map.view(T, k)


def torch_unpermute(y_sorted: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    T, k = row_map.shape
    rows = y_sorted.index_select(0, row_map.reshape(-1)).view(T, k, -1).float()
    return (rows * weights.unsqueeze(-1)).sum(1).to(y_sorted.dtype)


def grouped_mm_fn():
    """torch.nn.functional.grouped_mm or torch._grouped_mm, or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available(device: str, dtype: torch.dtype) -> Optional[str]:
    """None when a grouped_mm runs here for this dtype, else why not (a short note)."""
    gmm = grouped_mm_fn()
    if gmm is None:
        return "torch has no grouped_mm"
    try:
        a = torch.randn(32, 64, device=device).to(dtype)
        b = torch.randn(2, 64, 32, device=device).to(dtype)
        gmm(a, b, offs=torch.tensor([16, 32], dtype=torch.int32, device=device))
        return None
    except Exception as e:
        return f"grouped_mm unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


def grouped_mm_gemm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """c[rows of e] = a[rows of e] @ b[e]^T with b [E, N, K] (moe_ext's trans_b layout)."""
    return grouped_mm_fn()(a, b.transpose(-2, -1), offs=offsets[1:].to(torch.int32))


# --- whole layers -------------------------------------------------------------------------------

def _act(h: Tensor, activation: str) -> Tensor:
    return MF.ACTIVATIONS[activation][0](h)


def grouped_mm_layer(x, router_w, w1, w2, k, activation="silu", b1=None, b2=None, gating=None,
                     expert_bias=None):
    """A MoE layer from PyTorch ops and torch grouped_mm: router, torch gating, argsort permute,
    two grouped_mm, index_add_ unpermute. Same routing semantics as moe_ext (gating kwargs)."""
    T, H = x.shape
    E = w1.shape[0]
    w, ids = torch_gating(F.linear(x, router_w), k, expert_bias=expert_bias, **(gating or {}))
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    tok = order // k
    gmm = grouped_mm_fn()
    h = gmm(x.index_select(0, tok), w1.transpose(-2, -1), offs=offs)
    e_sorted = flat.index_select(0, order)
    if b1 is not None:
        h = h + b1.index_select(0, e_sorted)
    y = gmm(_act(h, activation), w2.transpose(-2, -1), offs=offs)
    if b2 is not None:
        y = y + b2.index_select(0, e_sorted)
    y = y * w.reshape(-1).index_select(0, order).unsqueeze(-1).to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tok, y)


def staged_moe(x, router_w, w1, w2, k, activation="silu", b1=None, b2=None, gating=None, expert_bias=None,
               ranges: Ranges = NO_RANGES):
    """moe_ext.fused_moe's composition, one public function per stage, each inside a named range
    (router, gating, permute, grouped_gemm_w1, activation, grouped_gemm_w2, unpermute)."""
    g = dict(gating or {})
    with ranges("router"):
        logits = F.linear(x, router_w)
    with ranges("gating"):
        out = MF.topk_gating(logits, k, expert_bias=expert_bias, **g)
    with ranges("permute"):
        x_sorted, offsets, row_map = MF.permute(x, out.expert_ids, w1.shape[0])
    with ranges("grouped_gemm_w1"):
        h = MF.grouped_gemm(x_sorted, w1, offsets, trans_b=True, bias=b1)
    with ranges("activation"):
        h = _act(h, activation)
    with ranges("grouped_gemm_w2"):
        y_sorted = MF.grouped_gemm(h, w2, offsets, trans_b=True, bias=b2)
    with ranges("unpermute"):
        return MF.unpermute(y_sorted, row_map, out.weights)


def moe_ext_layer(x, router_w, w1, w2, k, activation="silu", b1=None, b2=None, gating=None, expert_bias=None,
                  recompute=False):
    """The public path: router GEMM, then moe_ext.fused_moe."""
    g = dict(gating or {})
    return MF.fused_moe(x, w1, w2, F.linear(x, router_w), k, activation=activation,
                        score_func=g.get("score_func", "softmax"), expert_bias=expert_bias,
                        num_expert_group=g.get("num_groups", 1), topk_group=g.get("topk_groups", 1),
                        routed_scaling_factor=g.get("routed_scaling", 1.0), w1_bias=b1, w2_bias=b2,
                        recompute=recompute, renormalize=g.get("renormalize", True),
                        group_score=g.get("group_score", "top2_sum"))


def hf_mixtral_block(H: int, F_: int, E: int, k: int, router_w, w1, w2, implementation: str):
    """transformers' MixtralSparseMoeBlock sharing our tensors (gate.weight = router_w,
    experts.gate_up_proj = w1 [E, 2F, H], experts.down_proj = w2 [E, H, F]; nn.Parameters), with
    config._experts_implementation = implementation ("eager" | "grouped_mm").
    Returns (callable x [T, H] -> [T, H], None) or (None, why not)."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception as e:  # not installed, or a version without the block
        return None, f"transformers unavailable ({type(e).__name__})"
    try:
        cfg = MixtralConfig(hidden_size=H, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=k,
                            hidden_act="silu", router_jitter_noise=0.0)
        cfg._experts_implementation = implementation
        with torch.device("meta"):
            block = MixtralSparseMoeBlock(cfg)
        experts = getattr(block, "experts", None)
        if not hasattr(experts, "gate_up_proj"):
            return None, "transformers' Mixtral block has no 3-D experts (transformers < 5)"
        # The very same Parameter objects as the other implementations (so gradients land on them).
        block.gate.weight, experts.gate_up_proj, experts.down_proj = router_w, w1, w2
        block.eval()
    except Exception as e:
        return None, f"transformers block setup failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"

    def run(x):
        out = block(x.unsqueeze(0))
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(x.shape)

    return run, None
