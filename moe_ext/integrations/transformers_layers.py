"""transformers sparse MoE blocks as moe_ext.MoELayer; expert offloading and expert parallelism for a model.

    layer = mt.to_moe_layer(block)                     # the block's routing and experts as a MoELayer
    names = mt.offload_moe_blocks(model, cache_experts=N)   # every block's experts in host memory, N on the device
    names = mt.shard_moe_blocks(model, group)          # every block's experts split over the group's ranks

to_moe_layer gives a pretrained block everything MoELayer has (moe_ext.offload, moe_ext.parallel's
shard_experts, capacity, the balance losses, routing statistics). offload_moe_blocks swaps each supported block
of a model for moe_ext.offload.offload_experts(to_moe_layer(block), N): inference on a device that holds N
experts per layer. shard_moe_blocks swaps each for moe_ext.parallel.shard_experts(to_moe_layer(block), group):
training or inference with the experts spread over ranks (moe_ext.parallel.all_reduce_gradients(model) after
backward). All cover the routing kinds MoELayer expresses; Llama 4 (the weight scales the expert's input) is
refused with a clear error. docs/transformers.md, section 3.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from ..modules import MoELayer
from . import transformers as mt

__all__ = ["to_moe_layer", "offload_moe_blocks", "shard_moe_blocks", "LayerBlock"]


def _where(block: nn.Module) -> str:
    return f"moe_ext.to_moe_layer({mt._block_class(block)})"


def _kinds(block: nn.Module):
    """(router module, router kind, block kind) of a supported transformers block or of a mt.MoEBlock."""
    name = mt._block_class(block)
    if name not in mt.SUPPORTED_BLOCKS:
        raise ValueError(f"moe_ext.to_moe_layer: unsupported block class {name}; supported: "
                         f"{sorted(mt.SUPPORTED_BLOCKS)}")
    router_kind, block_kind = mt.SUPPORTED_BLOCKS[name]
    if router_kind == "llama4":
        raise ValueError(f"{_where(block)}: Llama 4 scales each expert's input by its routing weight, which "
                         f"MoELayer does not express; use replace_moe_blocks")
    router = block.gate if isinstance(getattr(block, "gate", None), nn.Module) else block.router
    return router, router_kind, block_kind


def _routing(block: nn.Module, router: nn.Module, router_kind: str) -> dict:
    """MoELayer's routing keywords for the router's semantics (mt.MoEBlock documents them)."""
    kw = dict(score_func="softmax", renormalize=True)
    if router_kind == "qwen":
        kw["renormalize"] = bool(getattr(router, "norm_topk_prob", False))
    elif router_kind == "softmax_group":
        grouped = getattr(router, "topk_method", "greedy") == "group_limited_greedy"
        n = (getattr(router, "num_group", None) or 1) if grouped else 1
        kw.update(renormalize=False, routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)),
                  group_score="max")
        if n > 1:
            kw.update(n_group=n, topk_group=router.topk_group)
    elif router_kind == "sigmoid_group":
        if mt._group_fill_of(type(router)) != float("-inf"):
            raise ValueError(f"{_where(block)}: this router fills dropped groups with a finite value, which "
                             f"MoELayer's group exclusion does not express; use replace_moe_blocks")
        n = getattr(router, "num_group", None) or getattr(router, "n_group", 1)
        kw.update(score_func="sigmoid", renormalize=bool(getattr(router, "norm_topk_prob", True)),
                  routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)), expert_bias=True)
        if n > 1:
            kw.update(n_group=n, topk_group=router.topk_group)
    elif router_kind == "sigmoid_bias":
        kw.update(score_func="sigmoid", expert_bias=True)
    elif router_kind == "gpt_oss":
        kw["router_bias"] = True
    elif router_kind == "ernie":  # (its division by max(sum, 1e-12) differs only where the k scores sum below that)
        kw["expert_bias"] = True
    # "mixtral", "qwen_norm", "granite(_swa)": softmax over the k best (= the renormalised softmax scores)
    return kw


def _shared_mlp(mlp: nn.Module, where: str):
    """(w1 [1, 2F, H], w2 [1, H, F]) copied from a gated MLP (gate_proj, up_proj, down_proj, SiLU)."""
    if not (all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
            and all(getattr(mlp, n).bias is None for n in ("gate_proj", "up_proj", "down_proj"))
            and mt._is_plain_silu(getattr(mlp, "act_fn", None))):
        raise ValueError(f"{where}: the shared expert {type(mlp).__name__} is not a bias-free SiLU-gated MLP")
    w1 = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().unsqueeze(0)
    return nn.Parameter(w1), nn.Parameter(mlp.down_proj.weight.detach().unsqueeze(0).clone())


def to_moe_layer(block: nn.Module) -> MoELayer:
    """A MoELayer computing what a supported transformers sparse MoE block (or a mt.MoEBlock) computes.

    Shared, not copied: the router weight (and bias), the routed experts' weights and biases when they are
    [E, out, in] (GPT-OSS's [E, in, out] are copied transposed), the selection bias buffer and Qwen's
    shared_expert_gate. Copied: the shared expert's gate and up weights (concatenated into w1) and its down
    weight. Routing is MoELayer's (fp32 or the model's dtype, whichever is wider; transformers routes in
    fp32), and training-time jitter is not carried over (Mixtral's and MiniMax's scale the whole block input;
    MoELayer's jitter_eps only the router's). Raises ValueError for what MoELayer cannot express.
    """
    where = _where(block)
    router, router_kind, block_kind = _kinds(block)
    experts = block.experts
    if not hasattr(experts, "gate_up_proj"):
        raise ValueError(f"{where}: the experts have no gate_up_proj (ungated experts are not supported)")
    activation = mt._fused_gate(experts)
    if activation is None:
        raise ValueError(f"{where}: the experts' gate is neither SiLU-and-multiply nor GPT-OSS's")
    transposed = bool(getattr(experts, "is_transposed", False))
    has_bias = bool(getattr(experts, "has_bias", False))
    w_in, w_out = experts.gate_up_proj, experts.down_proj
    E, H = router.weight.shape
    F_ = (w_in.shape[2] if transposed else w_in.shape[1]) // 2
    shared = getattr(block, "shared_expert", None)
    if shared is None:
        shared = getattr(block, "shared_experts", None)
    kw = _routing(block, router, router_kind)
    if shared is not None:
        s_w1, s_w2 = _shared_mlp(shared, where)
        kw.update(num_shared_experts=1, shared_d_ff=s_w2.shape[2], shared_expert_gate=block_kind == "qwen2")
    layer = MoELayer(H, F_, E, router.top_k, activation=activation, bias=has_bias, device="meta", dtype=w_in.dtype,
                     **kw)
    layer.router.weight = router.weight
    if kw.get("router_bias"):
        layer.router.bias = router.bias
    if kw.get("expert_bias"):
        holder = {"sigmoid_bias": block, "ernie": getattr(router, "moe_statics", None)}.get(router_kind, router)
        layer.router.register_buffer("expert_bias", holder.e_score_correction_bias.detach().reshape(-1))

    def oriented(p: nn.Parameter) -> nn.Parameter:
        return nn.Parameter(p.detach().transpose(1, 2).contiguous()) if transposed else p
    layer.experts.w1, layer.experts.w2 = oriented(w_in), oriented(w_out)
    if has_bias:
        layer.experts.b1, layer.experts.b2 = experts.gate_up_proj_bias, experts.down_proj_bias
    if shared is not None:
        layer.shared_experts.w1, layer.shared_experts.w2 = s_w1, s_w2
        if block_kind == "qwen2":
            layer.shared_expert_gate = block.shared_expert_gate
    meta = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
    if meta:  # a tensor MoELayer has that this block did not provide: a bug here, not the caller's
        raise RuntimeError(f"{where}: internal error, left on the meta device: {meta}")
    return layer.train(block.training)


class LayerBlock(nn.Module):
    """A transformers block's place in its model, run by a moe_ext module (.layer: an offloaded or an
    expert-parallel MoELayer): returns what the block returned, with None for the router's second output
    (GPT-OSS's scores, older blocks' logits)."""

    def __init__(self, layer: nn.Module, returns: Optional[str], original_class: str):
        super().__init__()
        self.layer, self.returns, self.original_class = layer, returns, original_class

    def forward(self, hidden_states: Tensor):
        y = self.layer(hidden_states)
        return (y, None) if self.returns else y


def _swap_blocks(model: nn.Module, classes, where: str, make) -> list:
    """Replace every supported block of model (classes: names; default all but Llama 4's) by
    LayerBlock(make(to_moe_layer(block))); returns the qualified names."""
    targets = mt._supported_blocks_in(model, classes, where, skip_kind="llama4")
    for name, block in targets:
        returns = block.returns if isinstance(block, mt.MoEBlock) else mt._returns_of(type(block))
        mt._set_submodule(model, name, LayerBlock(make(to_moe_layer(block)), returns, mt._block_class(block)))
    return [name for name, _ in targets]


def offload_moe_blocks(model: nn.Module, cache_experts: int, device=None, classes=None) -> list:
    """Replace every supported sparse MoE block of model by a LayerBlock holding
    moe_ext.offload.offload_experts(to_moe_layer(block), cache_experts, device): the routed experts in host
    memory (pinned on CUDA), an LRU cache of cache_experts of them on device (default: the current CUDA device,
    else the CPU), router and shared experts on device. Returns the qualified names replaced. Inference only.
    classes: block class names (default: every supported one but Llama 4's)."""
    from ..offload import offload_experts
    return _swap_blocks(model, classes, "offload_moe_blocks",
                        lambda layer: offload_experts(layer.eval(), cache_experts, device=device))


def shard_moe_blocks(model: nn.Module, group=None, classes=None) -> list:
    """Replace every supported sparse MoE block of model by a LayerBlock holding
    moe_ext.parallel.shard_experts(to_moe_layer(block), group): each rank of the group keeps a contiguous range
    of every layer's experts and exchanges tokens with the others (two all-to-alls per layer). Call it on
    every rank with the same model; each rank then runs its own tokens. After backward,
    moe_ext.parallel.all_reduce_gradients(model) sums the replicated parameters' gradients over the ranks.
    The state_dict then holds the LayerBlocks' own names (layer.router.weight, layer.experts.w1, ...).
    Returns the qualified names replaced. classes: as offload_moe_blocks."""
    from ..parallel import shard_experts
    return _swap_blocks(model, classes, "shard_moe_blocks", lambda layer: shard_experts(layer, group))
