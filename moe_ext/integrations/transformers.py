"""moe_ext inside Hugging Face transformers (written against transformers 5.x: integrations/moe.py).

Two ways in (docs/transformers.md):

1. register(): adds "moe_ext" to transformers' ExpertsInterface, so
   ``AutoModelForCausalLM.from_config(cfg, experts_implementation="moe_ext")`` (or
   ``model.set_experts_implementation("moe_ext")``) runs every ``@use_experts_implementation`` experts
   module through moe_ext.permute -> grouped_gemm -> (the module's own _apply_gate / act_fn) ->
   grouped_gemm -> unpermute, forward and backward. The model's router is untouched. Weight layouts:
   is_transposed (w [E, in, out] vs [E, out, in]), has_bias (gate_up_proj_bias / down_proj_bias),
   has_gate (gate_up_proj vs up_proj) and is_concatenated (handled by the module's _apply_gate) all work;
   the default SiLU gate and GPT-OSS's clamped, interleaved one run as moe_ext.gated_activation;
   expert-parallel sentinels (ids >= num_experts) become dropped slots.

2. replace_moe_blocks(model): swaps each supported sparse MoE block (router included) for a MoEBlock
   that keeps the block's own submodules and Parameters (no copies, the same state_dict keys) and runs
   routing with moe_ext.topk_gating and the experts with moe_ext's ops, with the installed version's
   exact semantics (see MoEBlock).

3. to_moe_layer(block) / offload_moe_blocks(model, cache_experts=N) / shard_moe_blocks(model, group)
   (transformers_layers.py): a block as a moe_ext.MoELayer; every block's experts offloaded to host memory
   with N cached on the device, or split over the ranks of a process group.
"""
import inspect
import re
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as MF

__all__ = ["register", "unregister", "moe_ext_experts_forward", "replace_moe_blocks", "MoEBlock", "SUPPORTED_BLOCKS",
           "SAME_CODE_AS", "to_moe_layer", "offload_moe_blocks", "shard_moe_blocks", "LayerBlock"]

NAME = "moe_ext"


# ----------------------------------------------------------------------------------------------------
# 1. The experts implementation
# ----------------------------------------------------------------------------------------------------
def _is_plain_silu(act) -> bool:
    """act is transformers' or torch's SiLU module, unhooked and not patched."""
    try:
        from transformers.activations import SiLUActivation
    except ImportError:
        return False
    return (type(act) in (SiLUActivation, nn.SiLU) and not act._forward_hooks and not act._forward_pre_hooks
            and type(act).forward in (SiLUActivation.forward, nn.SiLU.forward) and "forward" not in act.__dict__)


def _silu_and_mul_applies(module: nn.Module) -> bool:
    """True when module's gate is exactly transformers' default (act_fn(gate) * up, concatenated) with SiLU."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return False
    return (getattr(type(module), "_apply_gate", None) is _default_apply_gate
            and getattr(module, "is_concatenated", True) and _is_plain_silu(getattr(module, "act_fn", None)))


def _swigluoai_applies(module: nn.Module) -> bool:
    """True when module's gate is GPT-OSS's own (GptOssExperts._apply_gate, not overridden) with the alpha and
    limit that moe_ext's "swigluoai" hard-codes (1.702, 7.0)."""
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:
        return False
    return (getattr(type(module), "_apply_gate", None) is GptOssExperts._apply_gate
            and "_apply_gate" not in module.__dict__
            and float(getattr(module, "alpha", 0.0)) == MF.SWIGLUOAI_ALPHA
            and float(getattr(module, "limit", 0.0)) == MF.SWIGLUOAI_LIMIT)


def _fused_gate(module: nn.Module) -> Optional[str]:
    """The moe_ext gated activation equal to module's gate, or None (the module's _apply_gate runs)."""
    if _silu_and_mul_applies(module):
        return "silu"
    return "swigluoai" if _swigluoai_applies(module) else None


def moe_ext_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                            top_k_weights: Tensor, recompute: bool = False) -> Tensor:
    """transformers' experts forward signature: (experts module, x [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H] in x's dtype. Reads the layout flags that
    @use_experts_implementation sets (has_gate, has_bias, is_transposed; is_concatenated only matters to
    the module's _apply_gate) and falls back to inferring them from the parameter names.
    recompute=True (register(recompute=True)): for the default gated SiLU or GPT-OSS's gate (either weight
    layout), the backward recomputes the grouped rows and the activation instead of saving them
    (moe_ext.functional.permute_expert_ffn); other gates take the default path."""
    has_gate = getattr(self, "has_gate", hasattr(self, "gate_up_proj"))
    has_bias = getattr(self, "has_bias", False)
    transposed = getattr(self, "is_transposed", False)
    w_in = self.gate_up_proj if has_gate else self.up_proj
    b_in = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    b_out = self.down_proj_bias if has_bias else None
    E = w_in.shape[0]
    ids = top_k_index
    if getattr(self, "_is_expert_parallel", False):
        # EP sentinels (ids >= E: experts held by another rank) become dropped slots (-1): no compute.
        ids = torch.where((ids >= 0) & (ids < E), ids, torch.full_like(ids, -1))
    # The weights' dtype (as transformers' grouped_mm path does), or the autocast one under torch.autocast.
    x = hidden_states.to(MF._autocast_dtype(hidden_states) or w_in.dtype)
    fused = _fused_gate(self) if has_gate else None
    if recompute and fused is not None:
        y, _, row_map = MF.permute_expert_ffn(x, ids, E, w_in, self.down_proj, fused, b_in, b_out, recompute=True,
                                              transposed=transposed)
        return MF.unpermute(y, row_map, top_k_weights).to(hidden_states.dtype)
    x_sorted, offsets, row_map = MF.permute(x, ids, E)
    h = MF.grouped_gemm(x_sorted, w_in, offsets, trans_b=not transposed, bias=b_in)
    if has_gate:
        h = MF.apply_activation(h, fused) if fused is not None else self._apply_gate(h)
    else:
        h = self.act_fn(h)
    y = MF.grouped_gemm(h, self.down_proj, offsets, trans_b=not transposed, bias=b_out)
    # unpermute: y[t] = sum_j w[t, j] * y_sorted[row], accumulated in fp32 (fp64 for fp64) in slot order.
    return MF.unpermute(y, row_map, top_k_weights).to(hidden_states.dtype)


def _recomputing_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                                 top_k_weights: Tensor) -> Tensor:
    return moe_ext_experts_forward(self, hidden_states, top_k_index, top_k_weights, recompute=True)


def register(name: str = NAME, recompute: bool = False) -> str:
    """Register moe_ext_experts_forward as experts_implementation=`name` (default "moe_ext") in
    transformers' ExpertsInterface (global: every model, present and future). Returns the name.
    recompute=True registers the variant whose backward recomputes the grouped rows and the activation
    (saving S * (H + F) elements per layer; see moe_ext_experts_forward), e.g. as
    register("moe_ext_recompute", recompute=True)."""
    from transformers.integrations.moe import ExpertsInterface
    ExpertsInterface.register(name, _recomputing_experts_forward if recompute else moe_ext_experts_forward)
    return name


def unregister(name: str = NAME) -> None:
    """Remove `name` from transformers' ExpertsInterface (models still set to it will raise)."""
    from transformers.integrations.moe import ExpertsInterface
    ExpertsInterface._global_mapping.pop(name, None)


# ----------------------------------------------------------------------------------------------------
# 2. Whole-block replacement
# ----------------------------------------------------------------------------------------------------
# block class -> (router kind, block kind). Router kinds:
#   "mixtral": softmax(fp32) -> topk -> always renormalised, weights stay fp32 (MixtralTopKRouter)
#   "qwen":    softmax(fp32) -> topk -> renormalised iff norm_topk_prob, weights cast to the logits' dtype
#   "qwen_norm": as "qwen", always renormalised (Qwen3.5-MoE's router has no norm_topk_prob)
#   "sigmoid_bias": fp32 sigmoid of the logits, selection by score + the block's e_score_correction_bias
#              (passed to the router), weights = the unbiased scores renormalised (MiniMaxM2TopKRouter)
#   "sigmoid_group": fp32 logits, sigmoid, + e_score_correction_bias for selection, group-limited
#              (sum of top-2 per group), weights = unbiased scores (/ (sum + 1e-20) iff norm_topk_prob)
#              x routed_scaling_factor (DeepseekV3TopkRouter)
#   "softmax_group": fp32 logits, softmax, top-k ("greedy") or top-k among the topk_group groups whose best
#              score is highest ("group_limited_greedy"), weights = the scores x routed_scaling_factor, never
#              renormalised (DeepseekV2TopkRouter)
#   "gpt_oss": logits = x @ W^T + b, top-k of the logits (the op), softmax over those k in the logits' dtype
#              (GptOssTopKRouter)
#   "granite": fp32 logits, top-k of them, softmax over those k, cast to the input's dtype; returns
#              (ids, weights, logits) (GraniteMoeTopKRouter); "granite_swa": the same maths in the usual
#              (logits, weights, ids) order (GraniteMoeSWATopKRouter)
#   "ernie":   fp32 softmax; selection by score + moe_statics.e_score_correction_bias; weights = the unbiased
#              scores / max(their sum, moe_norm_min), cast to the input's dtype (Ernie4_5_MoeTopKRouter)
#   "llama4":  top-k of the logits, weights = sigmoid of those logits (fp32, cast to the logits' dtype)
#              (Llama4Router; its forward keeps returning the dense scores [T, E] and the logits)
# Block kinds: "plain" (Qwen3/OLMoE/GPT-OSS), "mixtral" (in-place jitter before the gate), "qwen2" (sigmoid-gated
# shared expert: Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE), "deepseek" (ungated shared_experts added: DeepSeek-V2
# and V3, GLM-4.5, dots.llm1; Ernie 4.5 when it has them), "minimax" (Mixtral's jitter; the block holds the
# selection bias), "llama4" (the
# weight scales each expert's input; a shared expert added; returns ([T, H], router_logits)).
SUPPORTED_BLOCKS = {
    "MixtralSparseMoeBlock": ("mixtral", "mixtral"),
    "Qwen2MoeSparseMoeBlock": ("qwen", "qwen2"),
    "Qwen3MoeSparseMoeBlock": ("qwen", "plain"),
    "OlmoeSparseMoeBlock": ("qwen", "plain"),
    "DeepseekV2Moe": ("softmax_group", "deepseek"),
    "DeepseekV3MoE": ("sigmoid_group", "deepseek"),
    "GptOssMLP": ("gpt_oss", "plain"),
    "Qwen3NextSparseMoeBlock": ("qwen", "qwen2"),
    "Qwen3_5MoeSparseMoeBlock": ("qwen_norm", "qwen2"),
    "Glm4MoeMoE": ("sigmoid_group", "deepseek"),
    "Dots1MoE": ("sigmoid_group", "deepseek"),
    "MiniMaxM2SparseMoeBlock": ("sigmoid_bias", "minimax"),
    "Llama4TextMoe": ("llama4", "llama4"),
    "GraniteMoeMoE": ("granite", "plain"),
    "GraniteMoeSWAMoE": ("granite_swa", "plain"),
    "Ernie4_5_MoeSparseMoeBlock": ("ernie", "deepseek"),
}
# Blocks whose code (block and router, class names aside) is that of a block above in transformers 5.18:
# the same kinds. tests/test_transformers.py checks that the installed sources still match.
SAME_CODE_AS = {
    "GraniteMoeSharedMoE": "GraniteMoeMoE",
    "GraniteMoeHybridMoE": "GraniteMoeMoE",
    "MiniMaxSparseMoeBlock": "MixtralSparseMoeBlock",
    "FlexOlmoSparseMoeBlock": "OlmoeSparseMoeBlock",
    "MellumSparseMoeBlock": "Qwen3MoeSparseMoeBlock",
    "Qwen3OmniMoeThinkerTextSparseMoeBlock": "Qwen3MoeSparseMoeBlock",
    "Qwen4ExpTextSparseMoeBlock": "Qwen3NextSparseMoeBlock",
    "DeepseekOcr2TextMoe": "DeepseekV2Moe",
    "Glm5NextTextMoE": "DeepseekV3MoE",
    "KimiLinearMoE": "DeepseekV3MoE",
    "DeepseekV32MoE": "Glm4MoeMoE",
    "Glm4MoeLiteMoE": "Glm4MoeMoE",
    "Glm4vMoeTextMoE": "Glm4MoeMoE",
    "GlmMoeDsaMoE": "Glm4MoeMoE",
    "HYV4MoE": "Glm4MoeMoE",
    "SolarOpenMoE": "Glm4MoeMoE",
}
SUPPORTED_BLOCKS.update({name: SUPPORTED_BLOCKS[same] for name, same in SAME_CODE_AS.items()})
# Qwen3-VL-MoE's text block: Qwen3-MoE's block (no shared expert) with Qwen3.5-MoE's always-renormalising router.
SUPPORTED_BLOCKS["Qwen3VLMoeTextSparseMoeBlock"] = ("qwen_norm", "plain")


def _group_fill_of(router_cls) -> float:
    """The value the installed router writes into the experts of dropped groups: -inf (transformers
    5.x DeepSeek-V3) or 0.0 (older versions, DeepSeek-V2, Mistral4). Read from its source."""
    try:
        src = inspect.getsource(router_cls.forward)
    except (OSError, TypeError):
        return float("-inf")
    m = re.search(r"masked_fill\(\s*~\s*score_mask\.bool\(\)\s*,\s*([^)]*\)?)\s*\)", src)
    if m and "inf" not in m.group(1):
        return float(m.group(1).strip().rstrip(")") or 0.0)
    return float("-inf")


def grouped_topk_python(scores: Tensor, bias: Optional[Tensor], k: int, n_group: int, topk_group: int,
                        fill: float) -> Tensor:
    """transformers' DeepSeek-V3 selection in plain PyTorch (used when fill is not -inf: a 0.0 fill lets
    experts of dropped groups outrank kept ones whose biased score is negative, which the op's
    exclusion cannot express). Returns ids [T, k] int64."""
    T, E = scores.shape
    choice = scores + bias if bias is not None else scores
    group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
    choice = choice.masked_fill(~score_mask.bool(), fill)
    return torch.topk(choice, k=k, dim=-1, sorted=False)[1]


class _MoeExtRouterMixin:
    """Mixed into a copy of the model's router class (isinstance holds, so transformers' router_logits
    recorder hooks still fire); forward returns (router_logits, weights [T, k], ids [T, k]) as the
    original, computed by moe_ext.topk_gating."""

    _moe_ext_kind = "qwen"
    _moe_ext_group_fill = float("-inf")

    def forward(self, hidden_states: Tensor, e_score_correction_bias: Optional[Tensor] = None):
        E, H = self.weight.shape
        k = self.top_k
        x = hidden_states.reshape(-1, H)
        kind = self._moe_ext_kind
        if kind == "sigmoid_bias":
            logits = F.linear(x.to(self.weight.dtype), self.weight)
            g = MF.topk_gating(logits.float(), k, score_func="sigmoid", renormalize=True,
                               expert_bias=e_score_correction_bias)
            return logits, g.weights, g.expert_ids
        if kind == "sigmoid_group":
            logits = F.linear(x.float(), self.weight.float())
            n_group = getattr(self, "num_group", None) or getattr(self, "n_group", 1)
            topk_group = self.topk_group
            bias = getattr(self, "e_score_correction_bias", None)
            renorm = bool(getattr(self, "norm_topk_prob", True))
            scale = float(getattr(self, "routed_scaling_factor", 1.0))
            if n_group > 1 and self._moe_ext_group_fill != float("-inf"):
                scores = logits.sigmoid()
                ids = grouped_topk_python(scores, bias, k, n_group, topk_group, self._moe_ext_group_fill)
                w = scores.gather(1, ids)
                if renorm:
                    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
                return logits, w * scale, ids
            g = MF.topk_gating(logits, k, score_func="sigmoid", renormalize=renorm, expert_bias=bias,
                               num_groups=n_group, topk_groups=topk_group, routed_scaling=scale)
            return logits, g.weights, g.expert_ids
        if kind == "softmax_group":
            logits = F.linear(x.float(), self.weight.float())
            method = getattr(self, "topk_method", "greedy")
            if method not in ("greedy", "group_limited_greedy"):
                raise ValueError(f"moe_ext.integrations.transformers: DeepSeek-V2 topk_method {method!r} is not "
                                 f"supported ('greedy' or 'group_limited_greedy')")
            n_group = (getattr(self, "num_group", None) or 1) if method == "group_limited_greedy" else 1
            g = MF.topk_gating(logits, k, renormalize=False, num_groups=n_group,
                               topk_groups=self.topk_group if n_group > 1 else 1,
                               routed_scaling=float(getattr(self, "routed_scaling_factor", 1.0)), group_score="max")
            return logits, g.weights, g.expert_ids
        if kind == "llama4":
            logits, w, ids = self._moe_ext_route(x)
            return torch.zeros_like(logits).scatter_(1, ids.long(), w), logits
        if kind == "ernie":
            logits = F.linear(x.float(), self.weight.float())
            bias = self.moe_statics.e_score_correction_bias.reshape(-1)
            g = MF.topk_gating(logits, k, renormalize=False, expert_bias=bias)
            w = g.weights / g.weights.sum(dim=-1, keepdim=True).clamp(min=self.norm_min)
            return logits, w.to(x.dtype), g.expert_ids
        if kind in ("granite", "granite_swa"):
            logits = F.linear(x, self.weight).float()
            g = MF.topk_gating(logits, k, order="topk_softmax", renormalize=False)
            out = (logits, g.weights.to(x.dtype), g.expert_ids)
            return out[::-1] if kind == "granite" else out
        if kind == "gpt_oss":
            logits = F.linear(x, self.weight, self.bias)
            ids = MF.topk_gating(logits.float(), k, order="topk_softmax", renormalize=False).expert_ids
            # The softmax over the k chosen logits in their own dtype, as GptOssTopKRouter computes it: in bf16
            # an fp32 softmax rounded once differs by an ulp, and a deep model amplifies that.
            return logits, torch.softmax(logits.gather(1, ids.long()), dim=-1, dtype=logits.dtype), ids
        logits = F.linear(x, self.weight)
        renorm = kind in ("mixtral", "qwen_norm") or bool(getattr(self, "norm_topk_prob", False))
        g = MF.topk_gating(logits.float(), k, renormalize=renorm)
        w = g.weights if kind == "mixtral" else g.weights.to(logits.dtype)
        return logits, w, g.expert_ids

    def _moe_ext_route(self, x: Tensor):
        """Llama 4: (logits, weights [T, k] in the logits' dtype, ids [T, k])."""
        logits = F.linear(x, self.weight, self.bias)
        g = MF.topk_gating(logits.float(), self.top_k, score_func="sigmoid", renormalize=False)
        return logits, g.weights.to(logits.dtype), g.expert_ids


_ROUTER_CLASSES = {}


def _llama4_experts(experts: nn.Module, x: Tensor, ids: Tensor) -> Tensor:
    """Llama4TextExperts on the slots ids [T, 1]: gate_up_proj [E, H, 2F] ([gate | up]), down_proj [E, F, H],
    no biases. transformers runs every expert on every token (the unchosen ones on zero inputs); this runs
    each token through its chosen expert only."""
    x_sorted, offsets, row_map = MF.permute(x, ids, experts.gate_up_proj.shape[0])
    h = MF.grouped_gemm(x_sorted, experts.gate_up_proj, offsets)
    if _is_plain_silu(experts.act_fn):
        h = MF.apply_activation(h, "silu")
    else:
        gate, up = h.chunk(2, dim=-1)
        h = up * experts.act_fn(gate)
    return MF.unpermute(MF.grouped_gemm(h, experts.down_proj, offsets), row_map, None)


def _moe_ext_router(router: nn.Module, kind: str) -> nn.Module:
    """A new router module of a subclass of router's class that shares its Parameters, buffers,
    attributes and forward hooks, with moe_ext's forward."""
    cls = type(router)
    sub = _ROUTER_CLASSES.get(cls)
    if sub is None:
        sub = type(f"MoeExt{cls.__name__}", (_MoeExtRouterMixin, cls),
                   {"_moe_ext_kind": kind, "_moe_ext_group_fill": _group_fill_of(cls), "__module__": __name__})
        _ROUTER_CLASSES[cls] = sub
    new = sub.__new__(sub)
    new.__dict__.update(router.__dict__)
    for attr in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
                 "_non_persistent_buffers_set"):
        val = router.__dict__.get(attr)
        if val is not None:
            new.__dict__[attr] = type(val)(val) if not isinstance(val, OrderedDict) else OrderedDict(val)
    return new


class MoEBlock(nn.Module):
    """A transformers sparse MoE block run by moe_ext, holding the original block's submodules (so its
    Parameters and state_dict keys are the model's own): .gate (.router for GPT-OSS, Llama 4, Granite; the moe_ext
    router, see _MoeExtRouterMixin), .experts (the model's experts module, run through moe_ext_experts_forward
    whatever the model's experts_implementation), and .shared_expert/.shared_expert_gate (Qwen2-MoE) or .shared_experts
    (DeepSeek-V3). Semantics follow the installed transformers version:
      Mixtral: in-place multiplicative jitter U(1-eps, 1+eps) of the block input in training (same RNG
               draw as transformers), softmax in fp32, top-k, always renormalised, fp32 weights.
      Qwen2/Qwen3/OLMoE: softmax in fp32, renormalised iff norm_topk_prob, weights in the logits'
               dtype; Qwen2 adds sigmoid(shared_expert_gate(x)) * shared_expert(x).
      DeepSeek-V2: fp32 logits, softmax, top-k overall ("greedy") or among the topk_group groups with the
               best top score ("group_limited_greedy"), weights = scores x routed_scaling_factor (not
               renormalised); + shared_experts(x).
      DeepSeek-V3: fp32 logits, sigmoid, selection by score + e_score_correction_bias among the
               topk_group best groups (sum of top-2), masking as the installed router does (-inf here:
               the op's exclusion; a 0.0 fill is computed in PyTorch), weights = unbiased scores
               (/ (sum + 1e-20) iff norm_topk_prob) x routed_scaling_factor; + shared_experts(x).
      GPT-OSS: logits with the router's bias, top-k of the logits, softmax over them in the logits' dtype;
               the experts' clamped, interleaved SwiGLU runs as moe_ext's "swigluoai".
      Qwen3-Next, Qwen3.5-MoE: as Qwen2-MoE (Qwen3.5 always renormalises); GLM-4.5, dots.llm1: as
               DeepSeek-V3; MiniMax-M2: Mixtral's jitter, fp32 sigmoid, selection by score + the block's
               e_score_correction_bias, the unbiased scores renormalised.
      Ernie 4.5: fp32 softmax, selection by score + moe_statics' bias, the unbiased scores divided by
               max(their sum, moe_norm_min); + shared_experts(x) when the block has them.
      Granite-MoE (and its Shared, Hybrid and SWA variants): fp32 logits, top-k of them, softmax over those k
               in the input's dtype.
      Llama 4: top-k of the logits, weight = their sigmoid (fp32, then the logits' dtype), which scales the
               expert's input; + shared_expert(x). transformers runs all E experts on every token; this
               runs the chosen ones. Returns ([T, H], router_logits) as the installed block.
    Routed outputs are accumulated in fp32 (unpermute) and rounded once to the hidden dtype. Returns what
    the original block returns (a tensor in transformers 5.x, (hidden, router_scores [T, k]) for GPT-OSS;
    (hidden, router_logits) when the installed block returned that pair). .last_stats holds tokens_per_expert
    [E] of the last forward.
    """

    def __init__(self, block: nn.Module, router_kind: str, block_kind: str, returns: Optional[str] = None):
        super().__init__()
        self.router_kind, self.block_kind, self.returns = router_kind, block_kind, returns
        # the router keeps the block's attribute name, and so its state_dict keys
        self.router_name = "gate" if isinstance(getattr(block, "gate", None), nn.Module) else "router"
        router = getattr(block, self.router_name)
        self.top_k = router.top_k
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        self.original_class = type(block).__name__
        setattr(self, self.router_name, _moe_ext_router(router, router_kind))
        self.experts = block.experts
        for name in ("shared_expert", "shared_expert_gate", "shared_experts"):
            if getattr(block, name, None) is not None:
                setattr(self, name, getattr(block, name))
        if block_kind == "minimax":  # the same tensor, under the block's state_dict key
            self.register_buffer("e_score_correction_bias", block.e_score_correction_bias)
        if hasattr(block, "config"):
            self.config = block.config
        self.last_stats: dict = {}

    def forward(self, hidden_states: Tensor):
        shape = hidden_states.shape
        if self.block_kind in ("mixtral", "minimax") and self.training and self.jitter_noise > 0:
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x = hidden_states.reshape(-1, shape[-1])
        router = getattr(self, self.router_name)
        if self.block_kind == "llama4":  # each choice scales its expert's input: one top-1 pass per choice
            logits, weights, ids = router._moe_ext_route(x)
            y = self.shared_expert(x)
            for j in range(ids.shape[1]):
                y = y + _llama4_experts(self.experts, x * weights[:, j:j + 1], ids[:, j:j + 1]).to(y.dtype)
        else:
            bias = (self.e_score_correction_bias,) if self.block_kind == "minimax" else ()
            if self.router_kind == "granite":  # the router's own output order
                ids, weights, logits = router(x)
            else:
                logits, weights, ids = router(x, *bias)
            y = moe_ext_experts_forward(self.experts, x, ids, weights)
        with torch.no_grad():
            E = router.weight.shape[0]
            self.last_stats = {"tokens_per_expert": torch.zeros(E, dtype=torch.int64, device=ids.device)
                               .index_add_(0, ids.reshape(-1).long(), torch.ones_like(ids.reshape(-1), dtype=torch.int64))}
        if self.block_kind == "qwen2":
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif self.block_kind == "deepseek" and getattr(self, "shared_experts", None) is not None:
            y = y.view(shape) + self.shared_experts(hidden_states)
        if self.block_kind != "llama4":  # Llama 4's block returns the flattened [T, H]
            y = y.reshape(shape)
        if self.returns == "router_logits":
            return y, logits
        return (y, weights) if self.returns == "router_scores" else y


def _returns_of(block_cls) -> Optional[str]:
    """What the installed block returns beside the hidden states: "router_logits" (older blocks),
    "router_scores" (GPT-OSS: the weights [T, k]) or None (the hidden states alone)."""
    try:
        src = inspect.getsource(block_cls.forward)
    except (OSError, TypeError):
        return None
    m = re.search(r"return\s+[\w.()]+\s*,\s*(router_logits|router_scores)\b", src)
    return m.group(1) if m else None


def _block_class(mod: nn.Module) -> str:
    """The transformers class name of a block (a MoEBlock's original one)."""
    return mod.original_class if isinstance(mod, MoEBlock) else type(mod).__name__


def _supported_blocks_in(model: nn.Module, classes, where: str, skip_kind: Optional[str] = None) -> list:
    """[(qualified name, module)] of model's blocks whose class (_block_class) is in classes (default: every
    supported one, but those of router kind skip_kind); unsupported class names raise ValueError."""
    wanted = set(SUPPORTED_BLOCKS if classes is None else classes)
    unknown = wanted - set(SUPPORTED_BLOCKS)
    if unknown:
        raise ValueError(f"moe_ext.{where}: unsupported block classes {sorted(unknown)}; supported: "
                         f"{sorted(SUPPORTED_BLOCKS)}")
    if classes is None and skip_kind is not None:
        wanted = {c for c in wanted if SUPPORTED_BLOCKS[c][0] != skip_kind}
    return [(name, mod) for name, mod in model.named_modules() if _block_class(mod) in wanted]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def replace_moe_blocks(model: nn.Module, classes=None) -> list:
    """Replace every supported sparse MoE block of model in place by a MoEBlock sharing its Parameters.

    classes: names of block classes to replace (default: all of SUPPORTED_BLOCKS). Returns the list of
    qualified names replaced. Unsupported MoE blocks are left alone (use register() for those), and so are
    blocks already replaced.
    """
    targets = [(name, block) for name, block in _supported_blocks_in(model, classes, "replace_moe_blocks")
               if not isinstance(block, MoEBlock)]
    for name, block in targets:
        router_kind, block_kind = SUPPORTED_BLOCKS[type(block).__name__]
        new = MoEBlock(block, router_kind, block_kind, _returns_of(type(block)))
        new.train(block.training)
        new._forward_hooks.update(block._forward_hooks)
        new._forward_pre_hooks.update(block._forward_pre_hooks)
        _set_submodule(model, name, new)
    return [name for name, _ in targets]


# 3. As MoELayers, offloaded or expert-parallel (transformers_layers.py; imported last: it reads the tables above).
from .transformers_layers import LayerBlock, offload_moe_blocks, shard_moe_blocks, to_moe_layer  # noqa: E402,F401
