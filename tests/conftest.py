import signal

import pytest
import torch

import moe_ext  # noqa: F401  (registers the ops)


def pytest_configure(config):
    # `timeout` (scripts/gpu_check.sh) stops a run with SIGTERM, which would kill pytest before it writes
    # its junit report; as KeyboardInterrupt, pytest ends the session and writes what it has.
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(autouse=True)
def _cuda_errors_stay_with_their_test(request):
    """Kernels run asynchronously: without this, a kernel fault surfaces at some later test's first
    synchronising call and is blamed on that test. Synchronising at the end of each CUDA test keeps
    the failure with the test that launched the kernel."""
    yield
    if request.node.get_closest_marker("cuda") is not None and torch.cuda.is_available():
        torch.cuda.synchronize()

# Per-dtype tolerances for values computed in fp32 and rounded to the output dtype.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_only(fn):
    """Marks a test that needs a CUDA GPU (skipped where none is visible)."""
    return pytest.mark.cuda(_NO_GPU(fn))


@pytest.fixture(scope="session", params=[pytest.param("emu", marks=pytest.mark.emu),
                                         pytest.param("cuda", marks=[pytest.mark.cuda, _NO_GPU])])
def kern(request):
    """The handwritten CUDA kernels, run under the CPU emulation ("emu", everywhere) and on the GPU
    ("cuda", where one is visible): tests/kernel_backends.py. CPU tensors in and out."""
    import kernel_backends
    return kernel_backends.emulated_kernels() if request.param == "emu" else kernel_backends.CudaKernels()


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous tensor (every other column of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


def has_fake_kernel(op, args, kwargs):
    """Whether moe_ext/_ops.py registered a fake (meta) kernel that handles these arguments."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils import _pytree as pytree

    try:
        with FakeTensorMode() as mode:
            op(*pytree.tree_map_only(torch.Tensor, mode.from_tensor, args), **kwargs)
        return True
    except Exception:
        return False


def poison_cuda_allocator(large_bytes=1 << 26, small_blocks=32):
    """Leave 0xFF bytes (NaN in every float dtype, -1 in every int dtype) in both pools of the CUDA
    caching allocator, so that an output element a kernel forgets to write shows up instead of reading
    back as a plausible value. Requests of 1 MiB or less come from the small pool (2 MiB segments), so
    one large block alone would leave every small output unpoisoned."""
    held = [torch.full((large_bytes,), 255, dtype=torch.uint8, device="cuda")]
    held += [torch.full((1 << 20,), 255, dtype=torch.uint8, device="cuda") for _ in range(small_blocks)]
    del held
