import pytest
import torch
from torch.autograd import gradcheck

import moe_ext
from moe_ext import reference as R
from conftest import FLOAT_DTYPES, noncontig


def random_ids(T, k, E, drop_frac=0.0, dtype=torch.int32):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.long)
    if drop_frac:
        ids[torch.rand(T, k) < drop_frac] = -1
    return ids.to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("T,H,E,k", [(37, 72, 7, 3), (16, 8, 8, 2), (5, 3, 7, 7), (1, 72, 7, 1), (0, 72, 7, 3)])
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_permute_matches_reference(dtype, T, H, E, k, drop):
    x = torch.randn(T, H).to(dtype)
    ids = random_ids(T, k, E, drop)
    xs, off, rm = moe_ext.permute(x, ids, E)
    rxs, roff, rrm = R.permute(x, ids, E)
    assert off.dtype == torch.int64 and rm.dtype == torch.int64
    assert torch.equal(off, roff) and torch.equal(rm, rrm)
    assert torch.equal(xs, rxs)  # a pure copy: bit-exact


@pytest.mark.parametrize("max_rows", [0, 5, 40, 200])
def test_permute_max_rows_clamps(max_rows):
    x = torch.randn(37, 8)
    ids = random_ids(37, 3, 7)
    xs, off, rm = moe_ext.permute(x, ids, 7, max_rows)
    rxs, roff, rrm = R.permute(x, ids, 7, max_rows)
    assert xs.shape == (max_rows, 8)
    assert torch.equal(off, roff) and torch.equal(rm, rrm) and torch.equal(xs, rxs)
    assert (rm < max_rows).all() and off[-1] <= max_rows
    w = torch.rand(37, 3)
    torch.testing.assert_close(moe_ext.unpermute(xs, rm, w), R.unpermute(xs, rm, w))  # also R = 0 rows


def test_permute_stable_token_order_and_empty_experts():
    ids = torch.tensor([[3, 0], [0, 3], [3, 5], [0, 1]], dtype=torch.int32)
    x = torch.arange(4.0).unsqueeze(1)
    xs, off, rm = moe_ext.permute(x, ids, 7)
    assert off.tolist() == [0, 3, 4, 4, 7, 7, 8, 8]  # experts 2, 4 and 6 have no tokens
    assert xs[:, 0].tolist() == [0, 1, 3, 3, 0, 1, 2, 2]
    assert rm.tolist() == [[4, 0], [1, 5], [6, 7], [2, 3]]


def test_permute_int64_ids_and_noncontiguous():
    x = torch.randn(9, 72)
    ids = random_ids(9, 3, 7, dtype=torch.int64)
    a = moe_ext.permute(x, ids, 7)
    b = moe_ext.permute(noncontig(x), noncontig(ids), 7)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_all_tokens_dropped():
    x = torch.randn(4, 6)
    xs, off, rm = moe_ext.permute(x, torch.full((4, 2), -1, dtype=torch.int32), 3)
    assert off.tolist() == [0, 0, 0, 0] and (rm == -1).all() and (xs == 0).all()
    y = moe_ext.unpermute(xs, rm, torch.ones(4, 2))
    assert (y == 0).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_weights", [True, False])
def test_unpermute_matches_reference(dtype, with_weights):
    T, H, E, k = 37, 72, 7, 3
    ids = random_ids(T, k, E, 0.2)
    _, _, rm = moe_ext.permute(torch.zeros(T, H), ids, E)
    ys = torch.randn(T * k, H).to(dtype)
    w = torch.rand(T, k) if with_weights else None
    y = moe_ext.unpermute(ys, rm, w)
    ref = R.unpermute(ys, rm, w)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref, atol=1e-5 if dtype in (torch.float32, torch.float64) else 1e-2, rtol=1e-3)


def test_permute_unpermute_roundtrip_is_identity_times_weight_sum():
    x = torch.randn(23, 40, dtype=torch.float64)
    ids = random_ids(23, 3, 7)
    w = torch.rand(23, 3, dtype=torch.float64)
    xs, _, rm = moe_ext.permute(x, ids, 7)
    torch.testing.assert_close(moe_ext.unpermute(xs, rm, w), x * w.sum(-1, keepdim=True))


def test_gradcheck_permute_unpermute():
    T, H, E, k = 6, 5, 4, 2
    ids = random_ids(T, k, E, 0.25)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        xs, _, rm = moe_ext.permute(x, ids, E)
        return moe_ext.unpermute(xs * 1.5 + xs ** 2, rm, w)

    assert gradcheck(f, (x, w))


def test_unpermute_backward_unreferenced_rows_zero():
    ys = torch.randn(10, 4, requires_grad=True)
    rm = torch.tensor([[0, -1], [3, 2]])
    w = torch.rand(2, 2, requires_grad=True)
    moe_ext.unpermute(ys, rm, w).sum().backward()
    assert (ys.grad[[1, 4, 5, 6, 7, 8, 9]] == 0).all()
    assert w.grad[0, 1] == 0
