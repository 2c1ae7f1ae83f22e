"""MoELayer presets of published MoE designs. Every size is a keyword argument, so tests build them tiny;
any other MoELayer keyword (dtype, device, capacity_factor, ...) passes through **kw.

    switch(...)          Switch Transformer: top-1, capacity factor 1.25, overflow dropped, ReLU
                         experts, load-balancing loss 1e-2, router jitter 1e-2, z-loss optional.
    mixtral_8x7b(...)    Mixtral 8x7B: H 4096, F 14336, 8 experts, top-2, SwiGLU, renormalised.
    deepseek_moe(...)    DeepSeek-MoE 16B: H 2048, F 1408, 64 routed + 2 shared experts, top-6,
                         softmax without renormalisation, aux loss 1e-3.
    deepseek_v2(...)     DeepSeek-V2: H 5120, F 1536, 160 routed + 2 shared experts, top-6 within the 3
                         best of 8 groups (a group scores its best expert), softmax without
                         renormalisation, x16, aux loss 3e-3.
    deepseek_v3(...)     DeepSeek-V3: H 7168, F 2048, 256 routed + 1 shared, top-8 within the 4 best of
                         8 groups, sigmoid scores, renormalised, x2.5, selection bias (expert_bias),
                         sequence-wise balance loss 1e-4.
    gpt_oss(...)         GPT-OSS 120B (num_experts=32: 20B): H 2880, F 2880, 128 experts, top-4, router
                         and expert biases, softmax over the 4 chosen logits, GPT-OSS's clamped SwiGLU
                         ("swigluoai", gate and up rows interleaved as in its checkpoints).
"""
from .modules import MoELayer

__all__ = ["switch", "mixtral_8x7b", "deepseek_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"]


def switch(d_model: int = 768, d_ff: int = 3072, num_experts: int = 128, *, capacity_factor: float = 1.25,
           aux_loss_coef: float = 1e-2, z_loss_coef: float = 0.0, jitter_eps: float = 1e-2,
           activation: str = "relu_no_mul", **kw) -> MoELayer:
    """Switch Transformer (Fedus et al. 2021; switch-base-128 sizes): each token goes to its top-1 expert
    with weight = its softmax probability (no renormalisation), capacity ceil(1.25 * T / E), overflow
    dropped (the token passes through with zero expert output), Switch load-balancing loss x 1e-2.
    z_loss_coef (ST-MoE uses 1e-3) is off by default."""
    return MoELayer(d_model, d_ff, num_experts, 1, activation=activation, renormalize=False,
                    capacity_factor=capacity_factor, overflow="drop", aux_loss_coef=aux_loss_coef,
                    z_loss_coef=z_loss_coef, jitter_eps=jitter_eps, **kw)


def mixtral_8x7b(d_model: int = 4096, d_ff: int = 14336, num_experts: int = 8, top_k: int = 2, *,
                 aux_loss_coef: float = 0.0, **kw) -> MoELayer:
    """Mixtral 8x7B's sparse block: softmax over 8 experts, top-2, the two weights renormalised,
    SwiGLU experts (w1 = [gate; up] like transformers' gate_up_proj). Mixtral was trained with
    router_aux_loss_coef 0.02 in transformers' convention, which is top_k x ours: pass
    aux_loss_coef=0.02 * top_k for the same gradient."""
    return MoELayer(d_model, d_ff, num_experts, top_k, activation="silu", renormalize=True,
                    aux_loss_coef=aux_loss_coef, **kw)


def deepseek_moe(d_model: int = 2048, d_ff: int = 1408, num_experts: int = 64, top_k: int = 6, *,
                 num_shared_experts: int = 2, aux_loss_coef: float = 1e-3, **kw) -> MoELayer:
    """DeepSeek-MoE 16B: fine-grained experts (64 routed of width 1408, top-6, softmax without
    renormalisation) plus 2 always-on shared experts of the same width (equal to one shared SwiGLU MLP
    of width 2 x 1408), expert-level balance loss 1e-3."""
    return MoELayer(d_model, d_ff, num_experts, top_k, activation="silu", renormalize=False,
                    num_shared_experts=num_shared_experts, aux_loss_coef=aux_loss_coef, **kw)


def deepseek_v2(d_model: int = 5120, d_ff: int = 1536, num_experts: int = 160, top_k: int = 6, *,
                n_group: int = 8, topk_group: int = 3, routed_scaling_factor: float = 16.0,
                num_shared_experts: int = 2, aux_loss_coef: float = 3e-3, **kw) -> MoELayer:
    """DeepSeek-V2: softmax scores over 160 routed experts; device-limited routing as its
    group_limited_greedy (transformers' DeepseekV2MoE, vLLM's grouped_topk without a bias): each of the
    n_group groups scores its best expert, the topk_group best groups stay eligible, top-6 among them;
    the weights are the softmax scores (no renormalisation) x routed_scaling_factor; two shared SwiGLU
    experts; expert-level balance loss alpha_1 = 3e-3 (the paper's device- and communication-level
    losses are for its parallel layout and are not part of the layer)."""
    return MoELayer(d_model, d_ff, num_experts, top_k, activation="silu", score_func="softmax", renormalize=False,
                    n_group=n_group, topk_group=topk_group, group_score="max",
                    routed_scaling_factor=routed_scaling_factor, num_shared_experts=num_shared_experts,
                    aux_loss_coef=aux_loss_coef, **kw)


def deepseek_v3(d_model: int = 7168, d_ff: int = 2048, num_experts: int = 256, top_k: int = 8, *,
                n_group: int = 8, topk_group: int = 4, routed_scaling_factor: float = 2.5,
                num_shared_experts: int = 1, aux_loss_coef: float = 1e-4, **kw) -> MoELayer:
    """DeepSeek-V3: sigmoid scores; selection by score + router.expert_bias (fp32 zeros; update with
    moe_ext.routing.update_expert_bias) among the topk_group best of n_group groups (group score =
    sum of its two best); weights = the unbiased scores renormalised, x routed_scaling_factor; one
    shared SwiGLU expert. Balancing is auxiliary-loss-free (the bias) plus the paper's complementary
    sequence-wise balance loss with alpha = 1e-4 (aux_loss_scope="sequence": the rows of x [B, S, H])."""
    return MoELayer(d_model, d_ff, num_experts, top_k, activation="silu", score_func="sigmoid", renormalize=True,
                    n_group=n_group, topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                    expert_bias=True, num_shared_experts=num_shared_experts, aux_loss_coef=aux_loss_coef,
                    aux_loss_scope="sequence", **kw)


def gpt_oss(d_model: int = 2880, d_ff: int = 2880, num_experts: int = 128, top_k: int = 4, *,
            aux_loss_coef: float = 0.0, **kw) -> MoELayer:
    """GPT-OSS (OpenAI 2025; gpt-oss-120b sizes, num_experts=32 for gpt-oss-20b): a router Linear(H, E) with a
    bias; the weights are the softmax over the top-4 logits (= the renormalised softmax scores); experts with
    biases and the clamped SwiGLU "swigluoai": (clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g), g = min(gate, 7),
    gate and up rows of experts.w1 interleaved like the checkpoints' gate_up_proj (transposed: w1[e] is
    gate_up_proj[e].T). transformers' GptOssConfig has router_aux_loss_coef 0.001 in its convention (top_k x
    ours): pass aux_loss_coef=0.001 * top_k for the same gradient."""
    return MoELayer(d_model, d_ff, num_experts, top_k, activation="swigluoai", bias=True, router_bias=True,
                    renormalize=True, aux_loss_coef=aux_loss_coef, **kw)
