"""CPU checks of the shared routing maths (common/routing.h) that the CUDA kernels reproduce bit for bit:
the portable exp, the fixed summation order, and thread-count independence."""
import pytest
import torch

import moe_ext  # noqa: F401

ops = torch.ops.moe_ext


@pytest.mark.parametrize("E,k", [(8, 2), (60, 4), (256, 8), (600, 8)])
def test_gating_matches_torch_reference(E, k):
    logits = torch.randn(200, E, generator=torch.Generator().manual_seed(E)) * 3
    w, ids, tpe, ss, lse = ops.topk_gating(logits, k)
    p = torch.softmax(logits.double(), -1)
    top = p.topk(k)
    assert torch.equal(ids.long(), top.indices)
    torch.testing.assert_close(w.double(), top.values / top.values.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ss.double(), p.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), -1), rtol=1e-6, atol=1e-6)
    assert torch.equal(tpe, torch.bincount(ids.view(-1).long(), minlength=E).int())


def test_portable_exp_accuracy():
    """sigmoid weights, unrenormalised, are 1 / (1 + exp(-x)) with routing.h's exp: within 2 ulp."""
    x = torch.linspace(-80, 80, 100001).view(-1, 1)
    logits = torch.cat([x, torch.full_like(x, -1e4)], 1)
    w, *_ = ops.topk_gating(logits, 1, score_func="sigmoid", renormalize=False)
    ref = torch.sigmoid(x.double())
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert ((w.double() - ref).abs() <= 2 * ulp).all()


def test_thread_count_independent():
    logits = torch.randn(1000, 128, generator=torch.Generator().manual_seed(1))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.topk_gating(logits, 8)
        torch.set_num_threads(max(2, n))
        b = ops.topk_gating(logits, 8)
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
