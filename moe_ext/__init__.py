"""moe_ext: fused Mixture-of-Experts kernels for PyTorch.

Ops (torch.ops.moe_ext.*, CPU and CUDA): topk_gating, permute, unpermute, grouped_gemm; the
differentiable functions are in moe_ext.functional and re-exported here; layers in moe_ext.modules.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.moe_ext.*)
from . import _ops  # noqa: F401  (fake kernels)
from .functional import (GatingOutput, expert_ffn, fused_moe, grouped_gemm, permute, topk_gating,  # noqa: F401
                         unpermute)
from .fused import fused_experts, fused_topk, grouped_topk  # noqa: F401
from .losses import (attach_aux_loss, global_load_balancing_loss, load_balancing_loss,  # noqa: F401
                     sequence_load_balancing_loss, z_loss)
from .modules import Experts, MoELayer, Router, SharedExperts  # noqa: F401
from .routing import apply_capacity, capacity_rank, expert_choice, update_expert_bias  # noqa: F401
from . import offload, parallel, presets  # noqa: F401,E402  (moe_ext.offload.offload_experts, ...)
from . import integrations  # noqa: F401,E402  (integrations.transformers imports transformers lazily)

__version__ = "0.1.0"


def build_info() -> dict:
    """How this build was compiled: {"cuda": bool, "cuda_archs": [...], "cutlass": str | None,
    "cuda_version": str, "torch": str (the torch it was built against), "version": str,
    "cxx": str (the C++ compiler: "GNU 13.3.0 at /usr/bin/c++"), "cuda_host_cxx": str (nvcc's host
    compiler; "" in a CPU build),
    "grouped_gemm": {"sm80", "sm90", "fp16", "tf32_sm80", "tf32_sm90", "f32_sm80", "f32_sm90": bool}}
    (the CUDA grouped GEMM kernel families compiled in; see docs/grouped_gemm.md)."""
    info = _C.build_info()
    info["version"] = __version__
    return info


def cpu_cache_stats() -> dict:
    """The cache of large CPU output blocks (>= 32 MiB) that moe_ext's CPU ops reuse instead of
    first-touch faulting fresh pages on every call: {"cached_bytes", "limit_bytes", "hits", "misses"}.
    The limit is MOE_EXT_CPU_CACHE_MB (MiB, default 1024, 0 = off), read at the first large allocation."""
    return _C.cpu_cache_stats()


def empty_cpu_cache() -> None:
    """Free the idle blocks of the CPU cache (blocks still in use return to it when freed)."""
    _C.empty_cpu_cache()


def sm90_gemm_tile() -> str:
    """The tile the sm_90a (Hopper) bf16/fp16 grouped GEMM uses: "auto" (the default: 128x256 when the
    experts average >= 256 rows and the problem fills the GPU twice over with such tiles, 128x128
    otherwise), "128x128" or "128x256". Starts from the environment variable MOE_EXT_SM90_TILE."""
    return _C.sm90_gemm_tile()


def set_sm90_gemm_tile(tile: str) -> str:
    """Set the sm_90a grouped GEMM tile for this process ("auto", "128x128" or "128x256"; anything else
    raises ValueError) and return the previous setting. Other GPUs and dtypes ignore it."""
    previous = _C.sm90_gemm_tile()
    _C.set_sm90_gemm_tile(tile)
    return previous
