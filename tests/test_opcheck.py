"""torch.library.opcheck on every registered op (schema, fake kernel, dispatch, aot_autograd)."""
import pytest
import torch

import moe_ext  # noqa: F401

ops = torch.ops.moe_ext


def _ids(T, k, E):
    return torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)


def _t(x):
    """The same values in a column-major (dense, non-contiguous) layout: fake kernels must still
    report the kernels' contiguous outputs, which torch.empty_like would not."""
    return x.t().contiguous().t()


def samples():
    T, H, E, k = 9, 72, 7, 3
    logits = torch.randn(T, E)
    out = ops.topk_gating(logits, k)
    ids = out[1]
    x = torch.randn(T, H)
    xs, off, rm = ops.permute(x, ids, E, -1)
    w = torch.rand(T, k)
    yield "topk_gating", (logits, k), {}
    yield "topk_gating", (logits.double(), 2, "sigmoid", "softmax_topk", False, torch.randn(E).double(), 1, 1, 2.0), {}
    yield "topk_gating", (torch.randn(5, 16), 3, "sigmoid", "softmax_topk", True, None, 4, 2, 1.0), {}
    yield "topk_gating", (torch.randn(5, 16), 3, "softmax", "softmax_topk", False, None, 8, 3, 16.0, "max"), {}
    yield "topk_gating", (torch.randn(0, E), k), {}
    yield "topk_gating_backward", (torch.randn(T, k), torch.randn(E), torch.randn(T), logits, ids, "softmax",
                                   "softmax_topk", True, 1.0), {}
    yield "topk_gating_backward", (torch.randn(T, k), None, None, logits, ids, "softmax", "topk_softmax", True, 1.0), {}
    yield "permute", (x, ids, E), {}
    yield "permute", (x.bfloat16(), ids.long(), E, 10), {}
    yield "permute", (torch.randn(0, H), torch.empty(0, k, dtype=torch.int32), E), {}
    yield "unpermute", (xs, rm, w), {}
    yield "unpermute", (xs.half(), rm, None), {}
    yield "unpermute_backward", (torch.randn(T, H), xs, rm, w), {}
    yield "unpermute_backward", (torch.randn(T, H), xs, rm, None), {}
    yield "grouped_gemm", (xs, torch.randn(E, H, 40), off), {}
    yield "grouped_gemm", (xs, torch.randn(E, 40, H), off, True, torch.randn(E, 40)), {}
    yield "grouped_gemm_wgrad", (xs, torch.randn(xs.shape[0], 40), off), {}
    yield "capacity_reroute", (ids, logits, 2), {}
    yield "capacity_reroute", (ids.long(), logits.double(), 0), {}
    yield "gated_activation", (torch.randn(T, 2 * 36), "silu"), {}
    yield "gated_activation", (torch.randn(T, 2 * 36).bfloat16(), "gelu_tanh"), {}
    yield "gated_activation_backward", (torch.randn(T, 36), torch.randn(T, 72), "gelu"), {}
    yield "gated_activation", (torch.randn(T, 2 * 36).half() * 8, "swigluoai"), {}
    yield "gated_activation_backward", (torch.randn(T, 36), torch.randn(T, 72) * 8, "swigluoai"), {}
    # column-major inputs of every op
    yield "topk_gating", (_t(logits), k), {}
    yield "topk_gating_backward", (_t(torch.randn(T, k)), None, None, _t(logits), _t(ids), "softmax",
                                   "softmax_topk", True, 1.0), {}
    yield "permute", (_t(x), _t(ids), E), {}
    yield "unpermute", (_t(xs), rm, _t(w)), {}
    yield "unpermute_backward", (_t(torch.randn(T, H)), _t(xs), _t(rm), _t(w)), {}
    yield "grouped_gemm", (_t(xs), torch.randn(E, H, 40).transpose(1, 2).contiguous().transpose(1, 2), off), {}
    yield "grouped_gemm_wgrad", (_t(xs), _t(torch.randn(xs.shape[0], 40)), off), {}
    yield "capacity_reroute", (_t(ids), _t(logits), 2), {}
    yield "gated_activation", (_t(torch.randn(T, 2 * 36)), "gelu"), {}
    yield "gated_activation_backward", (_t(torch.randn(T, 36)), _t(torch.randn(T, 72)), "silu"), {}
    yield "gated_activation", (_t(torch.randn(T, 2 * 36)), "swigluoai"), {}


@pytest.mark.parametrize("name,args,kwargs", list(samples()))
def test_opcheck(name, args, kwargs):
    torch.library.opcheck(getattr(ops, name).default, args, kwargs)


def test_every_op_is_covered():
    covered = {name for name, _, _ in samples()}
    registered = {n for n in dir(ops) if not n.startswith("_") and isinstance(getattr(ops, n), torch._ops.OpOverloadPacket)}
    assert registered and registered <= covered, registered - covered
