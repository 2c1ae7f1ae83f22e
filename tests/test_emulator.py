"""The CUDA emulation's own checks: each report it promises really fires.

tests/emu runs the handwritten CUDA kernels (csrc/cuda/*.cu and gemm/grouped_gemm_aux.cu: all but the
CUTLASS GEMMs) on the CPU: tests/kernel_backends.py's "emu" back end, which the CUDA tests
(test_cuda_routing.py, test_cuda_activation.py, test_capacity.py, test_cuda_grouped_gemm.py) take
through the `kern` fixture on every machine. There it fails a launch on a warp collective that part of a
warp misses, a collective after lanes exited, a deadlock, a launch over its __launch_bounds__ or the
block limits; its buffers catch out-of-bounds writes (guard bytes) and reads past their end (a protected
page); outputs and shared memory start as poison; and threads run in a seeded random order between sync
points, so a missing barrier changes the result with the seed. The kernels here (tests/emu/selftest.cu)
break each rule on purpose.

What the emulation cannot see: timing, the GPU memory model, the device's expf / erff and 2-ulp
division (activation.cu) and nvcc's FMA contraction where it is on (gemm/grouped_gemm_aux.cu): those
are compared within tolerance.
"""
import ctypes

import pytest
import torch

from kernel_backends import emulated_kernels

pytestmark = pytest.mark.emu


# ---------------------------------------------------------------- the emulation's own checks
def _selftest(which, n=64, threads=64, seed=1):
    emu_ops = emulated_kernels()
    emu_ops.set_seed(seed)
    launch = emu_ops.Launch()
    out = launch.empty("out", (n,), torch.int32)
    launch.call(emu_ops.lib().emu_selftest, which, ctypes.c_void_p(out.data_ptr()), n, threads)
    return out.clone()


def test_emulator_selftest():
    emu_ops = emulated_kernels()
    expected = (torch.arange(64, dtype=torch.int32) + 32) % 64
    for seed in range(1, 6):
        assert torch.equal(_selftest(1, seed=seed), expected)  # with the barrier: always right
    # without it, warp 0 reads warp 1's slots before or after they are written, by seed
    racy = [_selftest(0, seed=seed) for seed in range(1, 6)]
    assert any(not torch.equal(r, expected) for r in racy)
    poison = int.from_bytes(bytes([emu_ops.POISON]) * 4, "little", signed=True)
    assert any((r == poison).any() for r in racy)
    with pytest.raises(emu_ops.EmuError, match=r"__shfl_sync with the full mask, but lanes of the warp have exited"):
        _selftest(2)
    with pytest.raises(emu_ops.EmuError, match=r"deadlock: .*16 lanes at __shfl_sync, 16 at __syncthreads"):
        _selftest(3)
    with pytest.raises(emu_ops.EmuError, match=r"out-of-bounds write next to \['out'\]"):
        _selftest(4, n=5, threads=32)
    assert (_selftest(5) == poison).all()  # shared memory nobody wrote holds the poison
    assert (_selftest(6, threads=64) == 1).all()
    with pytest.raises(emu_ops.EmuError, match=r"bounded_kernel refused: more threads than its __launch_bounds__"):
        _selftest(6, n=128, threads=128)
    with pytest.raises(emu_ops.EmuError, match="block too large"):
        _selftest(1, n=2048, threads=2048)
    emu_ops.set_seed(1)
