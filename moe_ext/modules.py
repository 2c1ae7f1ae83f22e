"""Thin nn.Modules over moe_ext.functional: Router, Experts, MoELayer.

Parameter layout (the names outside code relies on):
  router.weight [E, H]; experts.w1 [E, 2F, H] (gated activations: gate rows, then up rows) or
  [E, F, H]; experts.w2 [E, H, F]; experts.b1 [E, 2F | F], experts.b2 [E, H] when bias=True;
  shared_experts.w1 [S, 2F, H] / .w2 [S, H, F] when num_shared_experts = S > 0;
  shared_expert_gate.weight [1, H] when shared_expert_gate=True (Qwen2-MoE);
  router.expert_bias [E] fp32 buffer when expert_bias=True (DeepSeek-V3; selection only);
  router.bias [E] when router_bias=True (GPT-OSS).
"""
import math
import numbers
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import functional as MF
from .losses import (attach_aux_loss, expert_counts, global_load_balancing_loss, load_balancing_loss,
                     sequence_load_balancing_loss, z_loss)
from .routing import apply_capacity, expert_choice


def _uniform_(t: Tensor, fan_in: int) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


class Router(nn.Module):
    """Linear router: x [..., H] -> logits [..., E] = x @ weight^T (+ bias) (fp32 under torch.autocast).

    bias=True adds .bias [E], a Parameter initialised to zeros (GPT-OSS's router has one).

    expert_bias=True registers .expert_bias [E], a float32 buffer of zeros added to the scores for
    the top-k selection only (DeepSeek-V3's auxiliary-loss-free balancing; update it with
    moe_ext.routing.update_expert_bias). It stays float32 through .to(dtype)/.half()/.double(), as
    transformers keeps e_score_correction_bias in fp32, so small updates are not rounded away.
    """

    def __init__(self, d_model: int, num_experts: int, device=None, dtype=None, expert_bias: bool = False,
                 bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, device=device, dtype=dtype))
        _uniform_(self.weight, d_model)
        self.bias = nn.Parameter(torch.zeros(num_experts, device=device, dtype=dtype)) if bias else None
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        else:
            self.expert_bias = None

    def _apply(self, fn, recurse=True):
        bias = self._buffers.get("expert_bias")
        out = super()._apply(fn, recurse)
        if bias is not None:  # keep the bias in fp32 (device moves still apply)
            moved = self._buffers["expert_bias"]
            self._buffers["expert_bias"] = bias.to(device=moved.device, dtype=torch.float32)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if MF._autocast_dtype(x) is not None:
            # Selective precision (Switch Transformer, section 2.4): under autocast the router still
            # computes in fp32. bf16 keeps 8 significant bits: logits within about 1/128 of each other
            # can round to a tie, which changes the chosen experts, and the z-loss coarsens. The router
            # is only E columns wide, so fp32 costs little.
            with torch.autocast(x.device.type, enabled=False):
                bias = None if self.bias is None else self.bias.float()
                return nn.functional.linear(x.float(), self.weight.float(), bias)
        return nn.functional.linear(x, self.weight, self.bias)


class Experts(nn.Module):
    """E expert FFNs applied to rows grouped by expert: (x_sorted [R, H], expert_offsets [E+1]) -> [R, H]."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, activation: str = "silu", bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        _, gated = MF._activation(activation)
        self.activation = activation
        rows = 2 * d_ff if gated else d_ff
        kw = dict(device=device, dtype=dtype)
        self.w1 = nn.Parameter(_uniform_(torch.empty(num_experts, rows, d_model, **kw), d_model))
        self.w2 = nn.Parameter(_uniform_(torch.empty(num_experts, d_model, d_ff, **kw), d_ff))
        self.b1 = nn.Parameter(_uniform_(torch.empty(num_experts, rows, **kw), d_model)) if bias else None
        self.b2 = nn.Parameter(_uniform_(torch.empty(num_experts, d_model, **kw), d_ff)) if bias else None

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def forward(self, x_sorted: Tensor, expert_offsets: Tensor) -> Tensor:
        return MF.expert_ffn(x_sorted, expert_offsets, self.w1, self.w2, self.activation, self.b1, self.b2)


class SharedExperts(nn.Module):
    """S always-on experts applied to every token and summed: x [T, H] -> [T, H]."""

    def __init__(self, d_model: int, d_ff: int, num_shared: int, activation: str = "silu", device=None, dtype=None):
        super().__init__()
        _, gated = MF._activation(activation)
        self.activation = activation
        kw = dict(device=device, dtype=dtype)
        self.w1 = nn.Parameter(_uniform_(torch.empty(num_shared, (2 if gated else 1) * d_ff, d_model, **kw), d_model))
        self.w2 = nn.Parameter(_uniform_(torch.empty(num_shared, d_model, d_ff, **kw), d_ff))

    def forward(self, x: Tensor) -> Tensor:
        S, F2, H = self.w1.shape
        h = nn.functional.linear(x, self.w1.reshape(S * F2, H)).view(-1, S, F2)
        return torch.einsum("tsf,shf->th", MF.apply_activation(h, self.activation), self.w2)


def check_token_mask(token_mask: Optional[Tensor], x: Tensor, where: str) -> Optional[Tensor]:
    """token_mask on x's device, after checking it is bool and shaped like x without its hidden dim."""
    if token_mask is None:
        return None
    if token_mask.shape != x.shape[:-1] or token_mask.dtype != torch.bool:
        raise ValueError(f"{where}: token_mask must be a bool tensor of x's shape without the hidden dim, "
                         f"{tuple(x.shape[:-1])}, got {token_mask.dtype} {tuple(token_mask.shape)}")
    return token_mask.to(x.device)


def check_layer_input(x: Tensor, token_mask: Optional[Tensor], router_weight: Tensor, where: str) -> Optional[Tensor]:
    """Checks a layer's input x [..., H] against its router weight [E, H] (floating, width H, same device, and
    the parameters' dtype unless torch.autocast casts it), then token_mask (check_token_mask)."""
    H = router_weight.shape[1]
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != H or not x.is_floating_point():
        raise ValueError(f"{where}: x must be a floating-point tensor [..., d_model = {H}], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if x.device != router_weight.device:
        raise ValueError(f"{where}: x is on {x.device} but the layer's parameters are on {router_weight.device}")
    if x.dtype != router_weight.dtype and MF._autocast_dtype(x) is None:
        raise ValueError(f"{where}: x is {x.dtype} but the layer's parameters are {router_weight.dtype} (convert one, "
                         f"or run under torch.autocast)")
    return check_token_mask(token_mask, x, where)


class _Shared:
    """Holds an object that copy.deepcopy shares instead of copying (a process group, which cannot be)."""

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self


class Routing(NamedTuple):
    """MoELayer.route's result for x [T, H]; k' = top_k, or E for expert choice."""
    logits: Tensor                   # [T, E]
    weights: Tensor                  # [T, k']
    expert_ids: Tensor               # [T, k'], after capacity (-1 = dropped)
    max_rows: int                    # permute's R, or -1 (T * k)
    tokens_chosen: Optional[Tensor]  # [E] slots per expert before capacity; None for expert choice
    score_sum: Tensor                # [E]
    lse: Tensor                      # [T]
    chosen_ids: Optional[Tensor]     # [T, k] before capacity; None for expert choice
    token_mask: Optional[Tensor] = None  # [T] bool: the tokens that count (None: all)


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN layer: x [..., H] -> [..., H].

    Token choice (default): each token picks its top_k experts by softmax or sigmoid scores
    (renormalised, group-limited with n_group/topk_group, a group scored by the sum of its two best
    experts, group_score="top2_sum" (DeepSeek-V3), or its best, "max" (DeepSeek-V2), scaled by
    routed_scaling_factor).
    capacity_factor: each expert keeps at most ceil(cf * T * top_k / E) slots, admitted by priority
    (drop_policy="position": all first choices before any second choice, lower token first; "probs":
    the largest routing weights first); overflow="drop" zeroes the rest, "reroute" (position only)
    moves them to the token's next preferred expert with room.
    routing="expert_choice": each expert takes its ceil(cf * T * top_k / E) best tokens (cf defaults to 1).
    expert_bias=True: router.expert_bias [E] (fp32 zeros) is added to the scores for the selection only
    (DeepSeek-V3; see moe_ext.routing.update_expert_bias). router_bias=True: the router is Linear(H, E) with a
    bias, router.bias [E] (GPT-OSS). num_shared_experts=S: S always-on experts
    of width shared_d_ff (default d_ff) added to every token; shared_expert_gate=True scales their sum
    by sigmoid(x @ shared_expert_gate.weight^T) per token (Qwen2-MoE; Linear(H, 1) without bias).
    After each forward: .aux_loss (aux_loss_coef * load-balancing loss + z_loss_coef * z-loss, a
    differentiable scalar; aux_loss_scope="sequence": DeepSeek-V3's sequence-wise balance loss over
    the rows of x [B, S, H], "global": Qwen's global-batch loss, its counts summed over the process
    group aux_loss_group (default the world; every rank must run the layer)) and .last_stats {"tokens_per_expert",
    "drop_fraction", "router_entropy"}
    (docs/routing.md says how to read them). attach_aux_loss=True: the aux loss's gradient rides on the
    output's backward instead (moe_ext.losses.attach_aux_loss, scaled by .aux_loss_grad_scale, default
    1.0) and .aux_loss is detached, for logging only; use it under reentrant activation checkpointing or
    pipeline schedules, where .aux_loss never reaches the loss. recompute=True: the backward recomputes
    the grouped tokens [T*k, H] and the experts' activation [T*k, F] instead of saving them
    (moe_ext.functional.permute_expert_ffn); same gradients, bit for bit. Presets: moe_ext.presets.
    """

    # What route() and capacity() read; moe_ext.parallel and moe_ext.offload copy them.
    ROUTING_ATTRS = ("num_experts", "top_k", "score_func", "renormalize", "capacity_factor", "overflow", "routing",
                     "drop_policy", "jitter_eps", "aux_loss_coef", "aux_loss_scope", "aux_loss_group", "z_loss_coef",
                     "n_group", "topk_group", "group_score", "routed_scaling_factor")

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, *, activation: str = "silu",
                 bias: bool = False, score_func: str = "softmax", renormalize: bool = True,
                 capacity_factor: Optional[float] = None, overflow: str = "drop", drop_policy: str = "position",
                 routing: str = "token_choice",
                 num_shared_experts: int = 0, jitter_eps: float = 0.0, aux_loss_coef: float = 0.0,
                 aux_loss_scope: str = "batch", aux_loss_group=None, z_loss_coef: float = 0.0, n_group: Optional[int] = None, topk_group: Optional[int] = None,
                 routed_scaling_factor: float = 1.0, group_score: str = "top2_sum", expert_bias: bool = False,
                 router_bias: bool = False, shared_expert_gate: bool = False,
                 shared_d_ff: Optional[int] = None, attach_aux_loss: bool = False, recompute: bool = False,
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            if not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"moe_ext.MoELayer: {name} must be an int >= 1, got {value!r}")
        if not isinstance(num_shared_experts, numbers.Integral) or num_shared_experts < 0:
            raise ValueError(f"moe_ext.MoELayer: num_shared_experts must be an int >= 0, got {num_shared_experts!r}")
        if shared_d_ff is not None and (not isinstance(shared_d_ff, numbers.Integral) or shared_d_ff < 1):
            raise ValueError(f"moe_ext.MoELayer: shared_d_ff must be None or an int >= 1, got {shared_d_ff!r}")
        if not 0.0 <= jitter_eps < 1.0:
            raise ValueError(f"moe_ext.MoELayer: jitter_eps must be in [0, 1), got {jitter_eps}")
        if not isinstance(top_k, numbers.Integral) or not 1 <= top_k <= num_experts:
            raise ValueError(f"moe_ext.MoELayer: top_k must be in [1, num_experts] = [1, {num_experts}], got {top_k}")
        if overflow not in ("drop", "reroute"):
            raise ValueError(f"moe_ext.MoELayer: overflow must be 'drop' or 'reroute', got {overflow!r}")
        if aux_loss_scope not in ("batch", "sequence", "global"):
            raise ValueError(f"moe_ext.MoELayer: aux_loss_scope must be 'batch', 'sequence' or 'global', got "
                             f"{aux_loss_scope!r}")
        if drop_policy not in ("position", "probs"):
            raise ValueError(f"moe_ext.MoELayer: drop_policy must be 'position' or 'probs', got {drop_policy!r}")
        if drop_policy == "probs" and overflow != "drop":
            raise ValueError("moe_ext.MoELayer: drop_policy='probs' needs overflow='drop'")
        if routing not in ("token_choice", "expert_choice"):
            raise ValueError(f"moe_ext.MoELayer: routing must be 'token_choice' or 'expert_choice', got {routing!r}")
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_ext.MoELayer: score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        if capacity_factor is not None and not (0 < capacity_factor < math.inf):  # also rejects NaN
            raise ValueError(f"moe_ext.MoELayer: capacity_factor must be a finite number > 0, got {capacity_factor}")
        if (n_group is None) != (topk_group is None):
            raise ValueError("moe_ext.MoELayer: n_group and topk_group go together")
        if group_score not in ("top2_sum", "max"):
            raise ValueError(f"moe_ext.MoELayer: group_score must be 'top2_sum' or 'max', got {group_score!r}")
        if n_group is not None:
            if not 1 <= n_group <= 64 or num_experts % n_group:
                raise ValueError(f"moe_ext.MoELayer: n_group must be in [1, 64] and divide num_experts = "
                                 f"{num_experts}, got {n_group}")
            if n_group > 1 and not 1 <= topk_group <= n_group:  # one group: topk_group is unused, as in the op
                raise ValueError(f"moe_ext.MoELayer: topk_group must be in [1, n_group] = [1, {n_group}], got "
                                 f"{topk_group}")
            if n_group > 1 and top_k > topk_group * (num_experts // n_group):
                raise ValueError(f"moe_ext.MoELayer: top_k = {top_k} exceeds the experts in the kept groups "
                                 f"(topk_group * num_experts / n_group = {topk_group * (num_experts // n_group)})")
        if shared_expert_gate and num_shared_experts <= 0:
            raise ValueError("moe_ext.MoELayer: shared_expert_gate=True needs num_shared_experts > 0")
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.renormalize = score_func, renormalize
        self.capacity_factor, self.overflow, self.routing = capacity_factor, overflow, routing
        self.drop_policy = drop_policy
        self.jitter_eps, self.aux_loss_coef, self.z_loss_coef = jitter_eps, aux_loss_coef, z_loss_coef
        self.aux_loss_scope, self.aux_loss_group = aux_loss_scope, aux_loss_group
        self.n_group, self.topk_group, self.group_score = n_group or 1, topk_group or 1, group_score
        self.routed_scaling_factor = routed_scaling_factor
        self.attach_aux_loss, self.aux_loss_grad_scale = attach_aux_loss, 1.0
        self.recompute = recompute
        self.router = Router(d_model, num_experts, device=device, dtype=dtype, expert_bias=expert_bias,
                             bias=router_bias)
        self.experts = Experts(d_model, d_ff, num_experts, activation, bias, device=device, dtype=dtype)
        self.shared_experts = (SharedExperts(d_model, shared_d_ff or d_ff, num_shared_experts, activation,
                                             device=device, dtype=dtype)
                               if num_shared_experts > 0 else None)
        self.shared_expert_gate = (nn.Linear(d_model, 1, bias=False, device=device, dtype=dtype)
                                   if shared_expert_gate else None)
        self.aux_loss: Tensor = torch.zeros(())
        self.last_stats: dict = {}

    @property
    def aux_loss_group(self):
        """The process group aux_loss_scope="global" sums the counts over (None: the world). A deep copy of
        the layer shares it."""
        holder = self.__dict__.get("_aux_loss_group")
        return None if holder is None else holder.obj

    @aux_loss_group.setter
    def aux_loss_group(self, group):
        self.__dict__["_aux_loss_group"] = None if group is None else _Shared(group)

    def capacity(self, num_tokens: int) -> int:
        cf = self.capacity_factor if self.capacity_factor is not None else 1.0
        return math.ceil(cf * num_tokens * self.top_k / self.num_experts)

    def route(self, x: Tensor, token_mask: Optional[Tensor] = None) -> Routing:
        """Routing of x [T, H] (see Routing); token_mask [T] bool: the other tokens get no expert (their
        slots are -1, before capacity, so they take no room) and no part in the statistics.

        Reads only the router, the ROUTING_ATTRS, training and capacity(), so moe_ext.offload and
        moe_ext.parallel reuse it on a module with the same attributes.
        """
        T = x.shape[0]
        router_in = x
        if self.training and self.jitter_eps > 0:
            # Switch-style multiplicative jitter on the router input only.
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            router_in = x * noise
        logits = self.router(router_in)
        if self.routing == "expert_choice":
            weights, ids, scores, lse = expert_choice(logits, self.capacity(T), self.score_func, token_mask)
            if token_mask is not None:
                scores = scores * token_mask.reshape(T, 1)
            score_sum, tokens_chosen, chosen = scores.sum(0), None, None
            max_rows = self.num_experts * min(self.capacity(T), T)
        else:
            g = MF.topk_gating(logits, self.top_k, score_func=self.score_func, renormalize=self.renormalize,
                               expert_bias=getattr(self.router, "expert_bias", None), num_groups=self.n_group,
                               topk_groups=self.topk_group, routed_scaling=self.routed_scaling_factor,
                               group_score=getattr(self, "group_score", "top2_sum"))
            weights, ids, score_sum, lse, tokens_chosen = g.weights, g.expert_ids, g.score_sum, g.lse, g.tokens_per_expert
            if token_mask is not None:
                # Masked tokens choose nothing; the statistics are recounted over the others (the full
                # scores as topk_gating sums them: softmax or sigmoid, without the selection bias).
                keep = token_mask.reshape(T, 1)
                ids = torch.where(keep, ids, torch.full_like(ids, -1))
                tokens_chosen = expert_counts(ids, self.num_experts).to(torch.int32)
                lg = logits if logits.dtype == torch.float64 else logits.float()
                full = torch.sigmoid(lg) if self.score_func == "sigmoid" else torch.softmax(lg, dim=-1)
                score_sum = (full * keep).sum(0)
            chosen, max_rows = ids, -1
            if self.capacity_factor is not None:
                ids = apply_capacity(ids, logits, self.num_experts, self.capacity(T), self.overflow,
                                     score_func=self.score_func, expert_bias=getattr(self.router, "expert_bias", None),
                                     drop_policy=getattr(self, "drop_policy", "position"), weights=weights)
                max_rows = min(T * self.top_k, self.num_experts * self.capacity(T))
        return Routing(logits, weights, ids, max_rows, tokens_chosen, score_sum, lse, chosen,
                       None if token_mask is None else token_mask.reshape(T))

    def forward(self, x: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
        """x [..., H] -> [..., H]. token_mask [...] bool (x's shape without H; e.g. an attention mask):
        False marks padding, which gets no routed expert (its output is the shared experts' alone, or
        zero), takes no capacity, and is left out of the aux losses and statistics."""
        shape = x.shape
        token_mask = check_layer_input(x, token_mask, self.router.weight, "moe_ext.MoELayer")
        x = x.reshape(-1, shape[-1])
        r = self.route(x, token_mask)
        if getattr(self, "recompute", False):
            ex = self.experts
            y_sorted, offsets, row_map = MF.permute_expert_ffn(x, r.expert_ids, self.num_experts, ex.w1, ex.w2,
                                                               ex.activation, ex.b1, ex.b2, r.max_rows, recompute=True)
        else:  # through the Experts module, whose hooks users may rely on
            x_sorted, offsets, row_map = MF.permute(MF._expert_rows(x), r.expert_ids, self.num_experts, r.max_rows)
            y_sorted = self.experts(x_sorted, offsets)
        y = MF.unpermute(y_sorted, row_map, r.weights)
        if self.shared_experts is not None:
            y = y + self._shared(x)
        self._record(r, offsets, shape)
        return MF._layer_output(self._with_aux_loss(y, x), shape)

    def _with_aux_loss(self, y: Tensor, x: Tensor) -> Tensor:
        """y, carrying the aux loss's gradient when attach_aux_loss; warns when a training forward runs
        without autograd on inputs that need gradients (reentrant checkpointing), as .aux_loss then has
        no gradient and adding it to the loss would silently not train the router's balance."""
        aux = self.aux_loss
        if getattr(self, "attach_aux_loss", False):
            self.aux_loss = aux.detach()
            return attach_aux_loss(y, aux, self.aux_loss_grad_scale) if aux.requires_grad else y
        if (self.training and (self.aux_loss_coef or self.z_loss_coef) and not torch.is_grad_enabled()
                and x.requires_grad):
            warnings.warn("moe_ext.MoELayer: this training forward ran without autograd on inputs that require "
                          "grad, as under torch.utils.checkpoint(use_reentrant=True): .aux_loss carries no "
                          "gradient, and the recomputation's aux loss is never differentiated. Use "
                          "use_reentrant=False, or MoELayer(attach_aux_loss=True).", stacklevel=3)
        return y

    def _shared(self, x: Tensor) -> Tensor:
        """The shared experts' output for x [T, H], gated by sigmoid(shared_expert_gate(x)) when present."""
        out = self.shared_experts(x)
        gate = getattr(self, "shared_expert_gate", None)
        if gate is not None:
            out = torch.sigmoid(gate(x)) * out
        return out

    def _record(self, r: Routing, offsets: Tensor, shape):
        """Sets .aux_loss and .last_stats from the routing r of an input shaped `shape` [..., S, H]."""
        T = r.logits.shape[0]
        m = r.token_mask
        n = T if m is None else m.sum()  # the tokens that count: a device tensor under a mask (no sync)
        kept = (offsets[1:] - offsets[:-1]).to(torch.int32)
        slots = n * self.top_k
        aux = r.score_sum.sum() * 0.0
        if self.aux_loss_coef and r.tokens_chosen is not None:
            scope = getattr(self, "aux_loss_scope", "batch")
            if scope == "sequence":
                # Sequences are the input's rows: x [B, S, H] holds B of them, x [S, H] one.
                num_seqs = math.prod(shape[:-2]) if len(shape) > 2 else 1
                lbl = sequence_load_balancing_loss(r.logits, r.chosen_ids, num_seqs, self.top_k, self.score_func, m)
            elif scope == "global":
                lbl = global_load_balancing_loss(r.tokens_chosen, r.score_sum, n, self.top_k, self.aux_loss_group)
            else:
                lbl = load_balancing_loss(r.tokens_chosen, r.score_sum, n, self.top_k)
            aux = aux + self.aux_loss_coef * lbl
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * z_loss(r.lse, m)
        self.aux_loss = aux
        with torch.no_grad():
            # Mean over the tokens that count of the entropy of the softmax over experts, in nats.
            logp = torch.log_softmax(r.logits.float(), dim=-1)
            ent = -(logp.exp() * logp).sum(-1)
            drop = torch.zeros((), dtype=torch.float64, device=kept.device)
            # Unmasked, T and the slots are host ints (symbolic under torch.export: kept out of tensors,
            # which would fix them); masked, device tensors.
            if m is None:
                entropy = ent.mean() if T else logp.sum()
                if self.routing == "token_choice" and slots:
                    drop = 1.0 - kept.sum().double() / slots
            else:
                entropy = (ent * m).sum() / n.clamp_min(1)
                if self.routing == "token_choice":
                    drop = torch.where(slots > 0, 1.0 - kept.sum().double() / slots.clamp_min(1), drop)
        self.last_stats = {"tokens_per_expert": kept, "drop_fraction": drop, "router_entropy": entropy}
