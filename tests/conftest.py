import pytest
import torch

import moe_ext  # noqa: F401  (registers the ops)

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
