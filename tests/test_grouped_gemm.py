import os
import subprocess
import sys

import pytest
import torch
from torch.autograd import gradcheck

import moe_ext
from moe_ext import reference as R
from conftest import FLOAT_DTYPES, noncontig


def offsets_from_counts(counts):
    off = torch.zeros(len(counts) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.tensor(counts), 0)
    return off


COUNTS = {
    "uniform": [5, 5, 5, 5, 5, 5, 5],
    "skewed": [20, 7, 3, 1, 1, 0, 3],
    "one_expert": [0, 0, 35, 0, 0, 0, 0],
    "mostly_empty": [0, 0, 0, 1, 0, 0, 2],
    "empty": [0] * 7,
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("groups", list(COUNTS))
def test_forward_matches_reference(dtype, trans_b, groups):
    counts = COUNTS[groups]
    M, K, N = sum(counts) + 4, 72, 40  # 4 rows past offsets[E]: must come out zero
    off = offsets_from_counts(counts)
    a = torch.randn(M, K).to(dtype)
    b = (torch.randn(7, N, K) if trans_b else torch.randn(7, K, N)).to(dtype)
    bias = torch.randn(7, N).to(dtype)
    for bi in (None, bias):
        c = moe_ext.grouped_gemm(a, b, off, trans_b, bi)
        ref = R.grouped_gemm(a.double(), b.double(), off, trans_b, None if bi is None else bi.double())
        tol = dict(atol=1e-4, rtol=1e-4) if dtype in (torch.float32, torch.float64) else dict(atol=0.15, rtol=2e-2)
        torch.testing.assert_close(c.double(), ref, **tol)
        assert (c[off[-1]:] == 0).all()


def test_rows_before_first_offset_are_zero():
    off = torch.tensor([3, 5, 8])
    a = torch.randn(10, 4)
    c = moe_ext.grouped_gemm(a, torch.randn(2, 4, 6), off)
    assert (c[:3] == 0).all() and (c[8:] == 0).all() and (c[3:8] != 0).any()


@pytest.mark.parametrize("groups", list(COUNTS))
def test_wgrad_matches_reference(groups):
    counts = COUNTS[groups]
    off = offsets_from_counts(counts)
    x = torch.randn(sum(counts), 72, dtype=torch.float64)
    y = torch.randn(sum(counts), 40, dtype=torch.float64)
    out = torch.ops.moe_ext.grouped_gemm_wgrad(x, y, off)
    torch.testing.assert_close(out, R.grouped_gemm_wgrad(x, y, off))
    for e, n in enumerate(counts):
        if n == 0:
            assert (out[e] == 0).all()


def test_cpu_fp32_ignores_the_cuda_tf32_switch():
    """torch.backends.cuda.matmul.allow_tf32 is a CUDA setting (docs/ops.md): the CPU stays exact."""
    off = offsets_from_counts(COUNTS["skewed"])
    a, b, y = torch.randn(35, 72), torch.randn(7, 72, 40), torch.randn(35, 40)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = moe_ext.grouped_gemm(a, b, off), torch.ops.moe_ext.grouped_gemm_wgrad(a, y, off)
        torch.backends.cuda.matmul.allow_tf32 = True
        assert torch.equal(moe_ext.grouped_gemm(a, b, off), exact[0])
        assert torch.equal(torch.ops.moe_ext.grouped_gemm_wgrad(a, y, off), exact[1])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_noncontiguous_inputs():
    off = offsets_from_counts([3, 0, 4])
    a = torch.randn(7, 10, dtype=torch.float64)
    b = torch.randn(3, 10, 6, dtype=torch.float64)
    torch.testing.assert_close(moe_ext.grouped_gemm(noncontig(a), noncontig(b), off), moe_ext.grouped_gemm(a, b, off))


@pytest.mark.parametrize("trans_b", [False, True])
def test_gradcheck(trans_b):
    off = offsets_from_counts([2, 0, 3, 1])
    a = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, 5, dtype=torch.float64) if trans_b else torch.randn(4, 5, 3, dtype=torch.float64)
    b.requires_grad_(True)
    bias = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b, bias: moe_ext.grouped_gemm(a, b, off, trans_b, bias), (a, b, bias))


def test_empty_expert_weight_grad_is_zero():
    off = offsets_from_counts([3, 0, 2])
    a = torch.randn(5, 4)
    b = torch.randn(3, 4, 6, requires_grad=True)
    moe_ext.grouped_gemm(a, b, off).sum().backward()
    assert (b.grad[1] == 0).all() and (b.grad[0] != 0).any()


def test_sm90_gemm_tile_setting():
    """The sm_90a tile switch exists in every build (CPU ones too) and checks its value."""
    assert moe_ext.sm90_gemm_tile() == "auto"
    try:
        assert moe_ext.set_sm90_gemm_tile("128x256") == "auto"
        assert moe_ext.sm90_gemm_tile() == "128x256"
        with pytest.raises(ValueError, match=r"tile must be 'auto', '128x128' or '128x256', got '256x128'"):
            moe_ext.set_sm90_gemm_tile("256x128")
        assert moe_ext.sm90_gemm_tile() == "128x256"
        # the CPU op ignores it
        a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
        offs = torch.tensor([0, 2, 6])
        torch.testing.assert_close(moe_ext.grouped_gemm(a, b, offs), R.grouped_gemm(a, b, offs))
    finally:
        moe_ext.set_sm90_gemm_tile("auto")


@pytest.mark.parametrize("value,expect", [("128x128", "128x128"), ("", "auto"), ("wide", None)])
def test_sm90_gemm_tile_environment(value, expect):
    code = "import moe_ext; print(moe_ext.sm90_gemm_tile())"
    env = dict(os.environ, MOE_EXT_SM90_TILE=value)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if expect is None:
        assert p.returncode != 0
        assert ("ValueError: moe_ext: the environment variable MOE_EXT_SM90_TILE must be 'auto', '128x128' or "
                "'128x256', got 'wide'") in p.stderr
    else:
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == expect
