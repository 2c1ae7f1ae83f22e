"""Every registered op on randomly corrupted arguments: a clear error or a right answer, never a crash.

Each example starts from valid arguments of one op and corrupts one or two of them: a tensor gets another
dtype, rank or size, becomes non-contiguous or empty, or (index tensors) holds an out-of-range value; an
optional tensor appears or disappears; an int becomes negative, zero or huge; a string becomes unknown.
The op must then either raise (ValueError, or the RuntimeError of the shared checks, whose message names
moe_ext and the op; TypeError from the dispatcher for a value of the wrong Python type) or return what it
returns on the same values laid out plainly. Corruptions that can never be valid (a float index tensor, an
integer data tensor, another rank, an id out of range) must raise. On CUDA the same, except the id values,
which the kernels read without a host synchronisation (MOE_EXT_DEBUG_CHECKS=1 checks them).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import moe_ext  # noqa: F401  (registers torch.ops.moe_ext)

ops = torch.ops.moe_ext
_EXAMPLES = int(os.environ.get("MOE_EXT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=_EXAMPLES, derandomize="MOE_EXT_FUZZ_EXAMPLES" not in os.environ, deadline=None,
                database=None, suppress_health_check=list(HealthCheck))
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]

T, E, K, H, F, M = 6, 5, 2, 8, 4, 9
INT_TENSORS = {"expert_ids", "row_map", "expert_offsets"}


def _valid_args():
    """Valid (name, value) arguments of each op, small and deterministic."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g)
    ids = ops.topk_gating(logits, K)[1]
    x = torch.randn(T, H, generator=g)
    x_sorted, offsets, row_map = ops.permute(x, ids, E)
    w = torch.rand(T, K, generator=g)
    counts = torch.tensor([3, 0, 2, 4, 0])
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return {
        "topk_gating": [("logits", logits), ("k", K), ("score_func", "softmax"), ("order", "softmax_topk"),
                        ("renormalize", True), ("expert_bias", torch.randn(E, generator=g)), ("num_groups", 1),
                        ("topk_groups", 1), ("routed_scaling", 1.0)],
        "topk_gating_backward": [("grad_weights", torch.randn(T, K, generator=g)),
                                 ("grad_score_sum", torch.randn(E, generator=g)),
                                 ("grad_lse", torch.randn(T, generator=g)), ("logits", logits), ("expert_ids", ids),
                                 ("score_func", "sigmoid"), ("order", "softmax_topk"), ("renormalize", True),
                                 ("routed_scaling", 1.0)],
        "permute": [("x", x), ("expert_ids", ids), ("num_experts", E), ("max_rows", -1)],
        "unpermute": [("y_sorted", x_sorted), ("row_map", row_map), ("weights", w)],
        "unpermute_backward": [("grad_y", torch.randn(T, H, generator=g)), ("y_sorted", x_sorted),
                               ("row_map", row_map), ("weights", w)],
        "grouped_gemm": [("a", torch.randn(M, H, generator=g)), ("b", torch.randn(E, H, F, generator=g)),
                         ("expert_offsets", offs), ("trans_b", False), ("bias", torch.randn(E, F, generator=g))],
        "grouped_gemm_wgrad": [("x", torch.randn(M, H, generator=g)), ("y", torch.randn(M, F, generator=g)),
                               ("expert_offsets", offs)],
        "gated_activation": [("h", torch.randn(M, 2 * F, generator=g)), ("activation", "silu")],
        "gated_activation_backward": [("grad", torch.randn(M, F, generator=g)),
                                      ("h", torch.randn(M, 2 * F, generator=g)), ("activation", "gelu")],
        "capacity_reroute": [("expert_ids", ids), ("keys", logits), ("capacity", 2)],
    }


def _public_args():
    """Valid arguments of the public Python entry points that take tensors from users."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    return {
        "fused_moe": [("hidden_states", x), ("w1", torch.randn(E, 2 * F, H, generator=g)),
                      ("w2", torch.randn(E, H, F, generator=g)), ("gating_output", logits), ("topk", K),
                      ("renormalize", True), ("activation", "silu"), ("w1_bias", torch.randn(E, 2 * F, generator=g)),
                      ("w2_bias", torch.randn(E, H, generator=g))],
        "layer": [("x", torch.randn(2, T, H, generator=g)), ("token_mask", torch.rand(2, T, generator=g) < 0.6)],
        "load_balancing_loss": [("tokens_per_expert", torch.randint(0, 4, (E,), generator=g)),
                                ("score_sum", torch.rand(E, generator=g)), ("num_tokens", T), ("top_k", K)],
        "apply_capacity": [("expert_ids", ops.topk_gating(logits, K)[1]), ("logits", logits), ("num_experts", E),
                           ("capacity", 2), ("overflow", "drop")],
    }


def _public_fn(name):
    if name == "layer":
        torch.manual_seed(0)
        layer = moe_ext.MoELayer(H, F, E, K, capacity_factor=1.0, aux_loss_coef=0.1, num_shared_experts=1)
        return lambda **kw: layer(**kw)
    if name == "apply_capacity":
        return moe_ext.routing.apply_capacity
    return getattr(moe_ext, name)


VALID = _valid_args()
PUBLIC = _public_args()
OPTIONAL = {("topk_gating", "expert_bias"), ("topk_gating_backward", "grad_score_sum"),
            ("topk_gating_backward", "grad_lse"), ("unpermute", "weights"), ("grouped_gemm", "bias"),
            ("fused_moe", "w1_bias"), ("fused_moe", "w2_bias"), ("layer", "token_mask")}
ID_TENSORS = set(INT_TENSORS)  # whose values index something: out of range is an error
INT_TENSORS |= {"tokens_per_expert"}
# Tensors [..., X] that take any number of leading dims.
BATCHED = {("fused_moe", "hidden_states"), ("fused_moe", "gating_output"), ("layer", "x"), ("layer", "token_mask")}


def _corrupt(op, name, value, how, rnd):
    """(new value, whether the op must refuse it: True, False, or "cpu" for a value only the CPU checks)."""
    if isinstance(value, bool):
        return (not value), False
    if isinstance(value, str):
        return "bogus", True
    if isinstance(value, int):
        return rnd.choice([-2, -1, 0, 1, 3, 2**31, 2**40]), False
    if isinstance(value, float):
        return rnd.choice([0.0, -1.0, float("nan"), float("inf"), 1e-30]), False
    if value is None:
        return torch.randn(E), False
    if how == "drop" and (op, name) in OPTIONAL:
        return None, False
    if how == "dtype":
        if name in INT_TENSORS:
            dt = rnd.choice([torch.float32, torch.bool, torch.int16, torch.uint8, torch.int32, torch.int64])
        else:
            dt = rnd.choice([torch.int32, torch.int64, torch.bool, torch.complex64, torch.float16, torch.float64,
                             torch.bfloat16])
        if name == "token_mask":
            bad = dt != torch.bool
        elif name == "tokens_per_expert":  # counts: any integer type
            bad = dt.is_floating_point or dt == torch.bool
        elif name in INT_TENSORS:
            bad = dt.is_floating_point or dt == torch.bool or dt in (torch.int16, torch.uint8)
        else:
            bad = not dt.is_floating_point
        return value.to(dt), bad and dt != value.dtype
    if how == "rank":
        return (value.unsqueeze(0) if rnd.random() < 0.5 or value.dim() == 1 else value.reshape(-1)), \
            (op, name) not in BATCHED
    if how == "size" and value.dim():
        d = rnd.randrange(value.dim())
        n = value.shape[d]
        if n and rnd.random() < 0.5:
            return value.narrow(d, 0, n - 1), False
        return torch.cat([value, value.narrow(d, 0, min(1, n))], dim=d), False
    if how == "empty" and value.dim():
        return value.narrow(rnd.randrange(value.dim()), 0, 0), False
    if how == "values" and name in ID_TENSORS and value.numel():
        v = value.clone()
        bad = {"expert_offsets": [-1, M + 1, 10**6], "row_map": [-2, 2**31 - 1, 10**6]}.get(
            name, [-2, E, 2**31 - 1, 10**6])
        v.view(-1)[rnd.randrange(v.numel())] = rnd.choice(bad)
        return v, "cpu"
    return value, False


def _noncontig(v):
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return v
    wide = torch.zeros(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype, device=v.device)
    wide[..., ::2] = v
    return wide[..., ::2]


def _to(v, device):
    return v.to(device) if isinstance(v, torch.Tensor) else v


@pytest.mark.parametrize("device", DEVICES)
@given(st.sampled_from(sorted(VALID) + sorted(PUBLIC)), st.lists(st.tuples(st.integers(0, 8), st.sampled_from(
    ["dtype", "rank", "size", "empty", "values", "drop", "noncontig", "noncontig"])), min_size=1, max_size=2),
    st.randoms(use_true_random=False))
@FUZZ
def test_corrupted_arguments(device, op, corruptions, rnd):
    args = list(VALID[op] if op in VALID else PUBLIC[op])
    must_raise = False
    value_corruption = False
    done, strided = [], set()
    for i, how in corruptions:
        i %= len(args)
        if any(args[i][0] == d[0] for d in done):  # one corruption per argument: a second could undo the first
            continue
        name, value = args[i]
        done.append((name, how))
        if how == "noncontig":
            strided.add(name)
            continue
        new, bad = _corrupt(op, name, value, how, rnd)
        if bad == "cpu":  # an id, row or offset out of range: the CPU refuses it; CUDA never reads it on the host
            value_corruption = True
            must_raise = must_raise or device == "cpu"
        else:
            must_raise = must_raise or bad
        args[i] = (name, new)
        done[-1] += (getattr(new, "dtype", new), tuple(getattr(new, "shape", ())))
    kwargs = {n: _noncontig(_to(v, device)) if n in strided else _to(v, device) for n, v in args}
    fn = getattr(ops, op) if op in VALID else _public_fn(op)
    try:
        out = fn(**kwargs)
    except (TypeError, OverflowError):  # the dispatcher or Python: an int too large for int64 (2**40 * 2**40)
        return
    except (RuntimeError, ValueError) as e:
        msg = str(e)
        if "allocate" in msg:  # a huge but valid size (max_rows = 2**31 pads permute's output): out of memory
            return
        assert (f"moe_ext.{op}" if op in VALID else "moe_ext") in msg, f"{op}: unclear error: {msg}"
        return
    assert not must_raise, f"{op} accepted {done}"
    if value_corruption:
        return  # CUDA: the kernels read id values without a host synchronisation, and skip invalid ones
    # Accepted: the same answer as on the same values laid out plainly (contiguous). The ops give the same
    # bits; the expert GEMMs behind the public functions may sum in another order for strided weights.
    ref = fn(**{n: _to(v, device) for n, v in args})
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    tol = dict(rtol=0, atol=0) if op in VALID else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)
