"""Model shapes, token counts and routing distributions of the benchmark, and the case plan.

Shapes come from real models; on the CPU the big ones are scaled down (H and F divided by
CPU_SCALE) so that a run fits in minutes, and the row's config says so.
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

L2_BYTES = 50 * 2**20  # H100/H200 L2: inputs are rotated past twice this on CUDA

# name -> hidden H, expert FFN F, experts E, top-k, activation, bias, gating kwargs (moe_ext.topk_gating names)
MODELS = {
    "mixtral": dict(H=4096, F=14336, E=8, k=2, act="silu", bias=False, gating={}),
    "qwen3": dict(H=2048, F=768, E=128, k=8, act="silu", bias=False, gating={}),
    # DeepSeek-V2: groups of 20 experts (the staged group stage), a group scored by its best expert.
    "dsv2": dict(H=5120, F=1536, E=160, k=6, act="silu", bias=False,
                 gating=dict(num_groups=8, topk_groups=3, routed_scaling=16.0, renormalize=False, group_score="max")),
    "dsv3": dict(H=7168, F=2048, E=256, k=8, act="silu", bias=False,
                 gating=dict(score_func="sigmoid", num_groups=8, topk_groups=4, routed_scaling=2.5)),
    # GPT-OSS 120B: expert biases, the clamped, interleaved "swigluoai" gate (softmax over the top-4 logits
    # selects and weighs as renormalised softmax scores do).
    "gpt_oss": dict(H=2880, F=2880, E=128, k=4, act="swigluoai", bias=True, gating={}),
    # The seed chapter's layer: 8 experts, top-2, Linear-GELU-Linear with bias.
    "seed": dict(H=512, F=2048, E=8, k=2, act="gelu_no_mul", bias=True, gating={}),
    # Tiny shape for the test suite's smoke runs (MOE_EXT_BENCH_SMOKE=1).
    "tiny": dict(H=64, F=96, E=8, k=2, act="silu", bias=False, gating={}),
    "tiny_ds": dict(H=64, F=32, E=16, k=4, act="silu", bias=False,
                    gating=dict(score_func="sigmoid", num_groups=4, topk_groups=2, routed_scaling=2.5)),
}
FULL_NAMES = {"mixtral": "Mixtral-8x7B", "qwen3": "Qwen3-30B-A3B", "dsv2": "DeepSeek-V2", "dsv3": "DeepSeek-V3",
              "gpt_oss": "gpt-oss-120b", "seed": "seed 8x top-2", "tiny": "tiny", "tiny_ds": "tiny (DSv3 gating)"}
# the CPU divides H and F of the real models by this
CPU_SCALE = {"mixtral": 8, "qwen3": 8, "dsv2": 16, "dsv3": 16, "gpt_oss": 16}
SUITES = ("gating", "permute", "unpermute", "activation", "grouped_gemm", "layer")


@dataclass
class Case:
    suite: str
    model: str
    T: int
    routing: str = "uniform"     # uniform | zipf
    pass_: str = "fwd"           # fwd | fwd+bwd (layer); w1 | w2 (grouped_gemm)
    shape: dict = field(default_factory=dict)
    scaled: bool = False

    @property
    def label(self) -> str:
        s = self.shape
        dims = f"H={s['H']} F={s['F']} E={s['E']} k={s['k']}"
        if self.scaled:
            dims += f" (H, F at 1/{CPU_SCALE[self.model]} scale for CPU)"
        return f"{self.suite}/{self.model} {self.pass_} T={self.T} {self.routing} [{dims}]"


def model_shape(name: str, device: str) -> tuple:
    s = dict(MODELS[name])
    scaled = device == "cpu" and name in CPU_SCALE
    if scaled:
        s["H"] //= CPU_SCALE[name]
        s["F"] //= CPU_SCALE[name]
    return s, scaled


def _case(suite, model, T, device, routing="uniform", pass_="fwd"):
    shape, scaled = model_shape(model, device)
    return Case(suite, model, T, routing, pass_, shape, scaled)


def plan(device: str, mode: str, suites) -> list:
    """The cases of a run: mode is "smoke" (the test suite), "quick" or "full"."""
    cases = []
    if mode == "smoke":
        for s in suites:
            pass_ = "w1" if s == "grouped_gemm" else "fwd"
            cases.append(_case(s, "tiny_ds" if s == "gating" else "tiny", 32, device, "uniform", pass_))
            if s == "layer":
                cases.append(_case(s, "tiny", 32, device, "zipf", "fwd+bwd"))
        return cases
    cpu = device == "cpu"
    if mode == "quick":
        small, large = 16, (128 if cpu else 4096)
        train = 32 if cpu else 4096  # forward+backward tokens
        want = {
            "gating": [("mixtral", small, "uniform"), ("mixtral", large, "uniform"), ("dsv3", small, "uniform"),
                       ("dsv3", large, "zipf"), ("dsv2", small, "uniform")],
            "permute": [("qwen3", small, "uniform"), ("qwen3", large, "uniform"), ("dsv3", large, "zipf")],
            "unpermute": [("qwen3", small, "uniform"), ("qwen3", large, "uniform"), ("dsv3", large, "zipf")],
            "activation": [("qwen3", large, "uniform"), ("mixtral", large, "uniform"),
                           ("mixtral", train, "uniform", "fwd+bwd"), ("gpt_oss", train, "uniform", "fwd+bwd")],
            "grouped_gemm": [("qwen3", small, "uniform", "w1"), ("qwen3", large, "uniform", "w1"),
                             ("qwen3", large, "zipf", "w1"), ("mixtral", large, "uniform", "w2")],
            "layer": [("mixtral", small, "uniform"), ("mixtral", large, "uniform"), ("qwen3", small, "uniform"),
                      ("qwen3", large, "uniform"), ("qwen3", large, "zipf"), ("dsv3", small, "uniform"),
                      ("gpt_oss", small, "uniform"),
                      ("qwen3", train, "uniform", "fwd+bwd"),
                      ("seed", large, "uniform", "fwd") if cpu else ("seed", train, "uniform", "fwd+bwd")],
        }
        return [_case(s, w[0], w[1], device, *w[2:]) for s in suites for w in want.get(s, [])]
    tokens = [1, 16, 128, 1024] if cpu else [1, 4, 16, 64, 256, 1024, 4096, 16384]
    for s in suites:
        models = (["mixtral", "qwen3", "dsv3"] + (["seed"] if s == "layer" else []) + (["dsv2"] if s == "gating" else [])
                  + (["gpt_oss"] if s in ("activation", "layer") else []))
        passes = {"grouped_gemm": ["w1", "w2"], "layer": ["fwd", "fwd+bwd"],
                  "activation": ["fwd", "fwd+bwd"]}.get(s, ["fwd"])
        for m in models:
            for p in passes:
                for T in tokens:
                    for r in ("uniform", "zipf"):
                        if m == "seed" and r == "zipf":
                            continue
                        cases.append(_case(s, m, T, device, r, p))
    return cases


def zipf_log_popularity(E: int, gen: torch.Generator, s: float = 1.2) -> torch.Tensor:
    """log p_e with p_e proportional to 1 / rank^s, over a random permutation of the experts."""
    ranks = torch.randperm(E, generator=gen).double() + 1
    p = ranks.pow(-s)
    return (p / p.sum()).log().float()


def router_logits(T: int, E: int, routing: str, gen: torch.Generator) -> torch.Tensor:
    """Router logits [T, E] fp32 on the CPU: Gumbel noise (plus log popularity for zipf), so each
    token's top-1 expert follows the popularity (uniform or Zipf with s = 1.2); never zeros."""
    u = torch.rand(T, E, generator=gen).clamp_(1e-6, 1 - 1e-6)
    g = -torch.log(-torch.log(u))
    if routing == "zipf":
        g = g + zipf_log_popularity(E, gen)
    return g


def router_weight_and_input(T: int, H: int, E: int, routing: str, gen: torch.Generator):
    """x [T, H] and router weight [E, H] (fp32, CPU) whose logits x @ W^T have unit Gaussian noise and,
    for zipf, a per-expert offset log p_e (x's first column is the constant 1 that carries it)."""
    x = torch.randn(T, H, generator=gen)
    w = torch.randn(E, H, generator=gen) / math.sqrt(H - 1)
    x[:, 0] = 1.0
    w[:, 0] = zipf_log_popularity(E, gen) if routing == "zipf" else 0.0
    return x, w


def routing_stats(expert_ids: torch.Tensor, E: int) -> dict:
    """Summary of the per-expert token histogram: experts hit, max load / mean load."""
    counts = torch.bincount(expert_ids.reshape(-1).long().cpu().clamp(min=0), minlength=E).double()
    mean = counts.sum() / E
    return {"experts_hit": int((counts > 0).sum()), "max_over_mean": round(float(counts.max() / mean), 2) if mean > 0
            else 0.0}


def dtype_for(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def ref_dtype_for(device: str) -> torch.dtype:
    return torch.float32 if device == "cuda" else torch.float64


def tolerance(dtype: torch.dtype, grad: bool = False) -> float:
    """Largest allowed max|out - ref| / max|ref|."""
    tol = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    return tol * (2.5 if grad else 1.0)


def sets_for(device: str, set_bytes: int, cap: int = 64) -> int:
    """How many copies of an input set rotate so that they exceed twice the L2 (CUDA only)."""
    if device != "cuda" or set_bytes <= 0:
        return 1
    return max(1, min(cap, math.ceil(2 * L2_BYTES / set_bytes)))


def optional_attr(obj, *names) -> Optional[object]:
    for n in names:
        if hasattr(obj, n):
            return getattr(obj, n)
    return None
