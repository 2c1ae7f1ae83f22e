"""Two ways to run the handwritten CUDA kernels, for the tests that compare them with the CPU kernels.

  "cuda": torch.ops.moe_ext on a GPU (the torch glue in csrc/cuda/*_cuda.cpp and the kernels);
  "emu":  the same kernels compiled for the CPU under the CUDA emulation (tests/emu), called through
          tests/emu/emu_ops.py, which mirrors that glue. Runs on every machine.

Both take and return CPU tensors, so one test body checks both: the `kern` fixture (conftest.py) gives
each test the two, the CUDA one skipped where no GPU is visible. Inputs are not validated by the
emulated glue: a test calls the CPU op on the same arguments, which shares its checks with CUDA.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ops = torch.ops.moe_ext
DEV = "cuda"
SEEDS = (1, 2)  # emulated scheduling orders for the kernels whose threads share memory


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
    name = "cuda"
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


class EmuKernels:
    """Misaligned: the input and the output one element past a 16-byte boundary."""
    name = "emu"
    emulated = True

    def __init__(self):
        sys.path.insert(0, str(Path(__file__).resolve().parent / "emu"))
        import emu_ops
        self.emu = emu_ops
        emu_ops.lib()  # built once per worker (cached on disk, under a lock)

    def schedules(self):
        """Each scheduling order in turn: a missing barrier or a race changes the results between them."""
        try:
            for seed in SEEDS:
                self.emu.set_seed(seed)
                yield seed
        finally:
            self.emu.set_seed(SEEDS[0])

    def poison(self):
        pass  # every emulated output starts as poison

    def topk_gating(self, logits, k, **kw):
        return list(self.emu.topk_gating(logits, k, **kw))

    def topk_gating_backward(self, *args):
        return self.emu.topk_gating_backward(*args)

    def permute(self, x, expert_ids, num_experts, max_rows=-1, misaligned=False):
        return list(self.emu.permute(x, expert_ids, num_experts, max_rows, misalign=x.element_size() * misaligned))

    def unpermute(self, y_sorted, row_map, weights=None, misaligned=False):
        return self.emu.unpermute(y_sorted, row_map, weights, misalign=y_sorted.element_size() * misaligned)

    def unpermute_backward(self, grad_y, y_sorted, row_map, weights):
        return list(self.emu.unpermute_backward(grad_y, y_sorted, row_map, weights))

    def gated_activation(self, h, activation="silu", misaligned=False):
        return self.emu.gated_activation(h, activation, misalign=h.element_size() * misaligned)

    def gated_activation_backward(self, grad, h, activation="silu"):
        return self.emu.gated_activation_backward(grad, h, activation)

    def capacity_reroute(self, expert_ids, keys, capacity):
        return self.emu.capacity_reroute(expert_ids, keys, capacity)

    # Only the grouped GEMM's handwritten kernels are emulated (not CUTLASS): these run the path a GPU
    # takes for fp64 and for 16-bit rows or data off 16-byte alignment, whatever the arguments.
    def grouped_gemm(self, a, b, expert_offsets, trans_b=False, bias=None, misaligned=False):
        return self.emu.grouped_gemm(a, b, expert_offsets, trans_b, bias, misalign=a.element_size() * misaligned)

    def grouped_gemm_wgrad(self, x, y, expert_offsets, misaligned=False):
        return self.emu.grouped_gemm_wgrad(x, y, expert_offsets, misalign=x.element_size() * misaligned)
