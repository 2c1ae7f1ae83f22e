"""moe_ext: fused Mixture-of-Experts kernels for PyTorch."""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.moe_ext.*)
from . import _ops  # noqa: F401  (fake kernels)

__version__ = "0.1.0"


def build_info() -> dict:
    """How this build was compiled: {"cuda": bool, "cuda_archs": [...], "cutlass": str | None, ...}."""
    info = _C.build_info()
    info["version"] = __version__
    return info
