"""Two ways to run the handwritten CUDA kernels, for the tests that compare them with the CPU kernels.

  "cuda": torch.ops.moe_ext on a GPU (the torch glue in csrc/cuda/*_cuda.cpp and the kernels);
  "emu":  the same kernels compiled for the CPU under the CUDA emulation (tests/emu), called through
          tests/emu/emu_ops.py, which mirrors that glue. Runs on every machine.

Both take and return CPU tensors and offer the same functions (plus `emulated`, `schedules()` and
`poison()`), so one test body checks both: the `kern` fixture (conftest.py) gives each test the two,
the CUDA one skipped where no GPU is visible. Inputs are not validated by the
emulated glue: a test calls the CPU op on the same arguments, which shares its checks with CUDA.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ops = torch.ops.moe_ext
DEV = "cuda"


def _dev(t, misaligned=False):
    """t on the GPU; misaligned: one element past a 16-byte boundary (the kernels' narrow accesses)."""
    if t is None or not misaligned:
        return None if t is None else t.to(DEV)
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEV)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _host(outs):
    return [t.cpu() for t in outs]


class CudaKernels:
    emulated = False

    def schedules(self):
        """The GPU schedules as it will: one run."""
        return (None,)

    def poison(self):
        from conftest import poison_cuda_allocator
        poison_cuda_allocator()

    def topk_gating(self, logits, k, expert_bias=None, **kw):
        return _host(ops.topk_gating(logits.to(DEV), k, expert_bias=_dev(expert_bias), **kw))

    def topk_gating_backward(self, grad_weights, grad_score_sum, grad_lse, logits, *rest):
        return ops.topk_gating_backward(_dev(grad_weights), _dev(grad_score_sum), _dev(grad_lse), logits.to(DEV),
                                        rest[0].to(DEV), *rest[1:]).cpu()

    def permute(self, x, expert_ids, num_experts, max_rows=-1, misaligned=False):
        return _host(ops.permute(_dev(x, misaligned), expert_ids.to(DEV), num_experts, max_rows))

    def unpermute(self, y_sorted, row_map, weights=None, misaligned=False):
        return ops.unpermute(_dev(y_sorted, misaligned), row_map.to(DEV), _dev(weights)).cpu()

    def unpermute_backward(self, grad_y, y_sorted, row_map, weights):
        return _host(ops.unpermute_backward(grad_y.to(DEV), y_sorted.to(DEV), row_map.to(DEV), _dev(weights)))

    def gated_activation(self, h, activation="silu", misaligned=False):
        return ops.gated_activation(_dev(h, misaligned), activation).cpu()

    def gated_activation_backward(self, grad, h, activation="silu"):
        return ops.gated_activation_backward(grad.to(DEV), h.to(DEV), activation).cpu()

    def capacity_reroute(self, expert_ids, keys, capacity):
        return ops.capacity_reroute(expert_ids.to(DEV), keys.to(DEV), capacity).cpu()

    def grouped_gemm(self, a, b, expert_offsets, trans_b=False, bias=None, misaligned=False):
        return ops.grouped_gemm(_dev(a, misaligned), _dev(b, misaligned), expert_offsets.to(DEV), trans_b,
                                _dev(bias)).cpu()

    def grouped_gemm_wgrad(self, x, y, expert_offsets, misaligned=False):
        return ops.grouped_gemm_wgrad(_dev(x, misaligned), _dev(y, misaligned), expert_offsets.to(DEV)).cpu()


def emulated_kernels():
    """The "emu" back end: tests/emu/emu_ops.py, with its library built (once per worker, cached on disk
    under a lock). Only the grouped GEMM's handwritten kernels are emulated, not CUTLASS: its
    grouped_gemm runs the path a GPU takes for fp64 and for 16-bit rows or data off 16-byte alignment,
    whatever the arguments."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "emu"))
    import emu_ops
    emu_ops.lib()
    return emu_ops
