"""Timings of the CUDA routing kernels: topk_gating latency, permute / unpermute bandwidth.

Plain functions for the benchmark CLI (which someone else writes); each returns a list of rows
{name, shape, median_us, gbps} (gbps None for latency rows). Timing: warm-up, then a CUDA graph of
`reps` calls replayed `iters` times, each replay timed with CUDA events; median per call.
Inputs are random (never zeros). Needs a CUDA GPU.
"""
from __future__ import annotations

import statistics

import torch

import moe_ext  # noqa: F401  (registers torch.ops.moe_ext)

ops = torch.ops.moe_ext

GATING_TOKENS = (1, 256, 4096, 16384)
GATING_EXPERTS = (8, 64, 128, 256)
PERMUTE_SHAPES = ((16384, 4096, 2), (4096, 7168, 8))  # (T, H, k)


def time_graph(fn, reps: int = 20, iters: int = 30, warmup: int = 3) -> float:
    """Median microseconds per fn() call: a graph of `reps` calls, replayed and timed with events."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times)


def _ids_balanced(T: int, k: int, E: int, device="cuda") -> torch.Tensor:
    """Distinct random experts per token (what topk_gating produces), int32."""
    return torch.rand(T, E, device=device).argsort(dim=1)[:, :k].to(torch.int32).contiguous()


def gating_latency(tokens=GATING_TOKENS, experts=GATING_EXPERTS, dtype=torch.bfloat16) -> list[dict]:
    """topk_gating (softmax, renormalised) latency; k = 8 capped at E, k = 2 for E = 8."""
    rows = []
    for E in experts:
        k = 2 if E == 8 else min(8, E)
        for T in tokens:
            logits = torch.randn(T, E, device="cuda", dtype=dtype)
            us = time_graph(lambda: ops.topk_gating(logits, k))
            rows.append(dict(name="topk_gating", shape=f"T={T} E={E} k={k} {str(dtype)[6:]}", median_us=us, gbps=None))
    return rows


def permute_bandwidth(shapes=PERMUTE_SHAPES, E: int = 64, dtype=torch.bfloat16) -> list[dict]:
    """permute: bytes = x read once + x_sorted written + ids read + row_map written: the least traffic,
    each token's row being needed once however many slots it has. (Runs 1 and 2 counted one read of x
    per slot, as the gather kernel of that time did: bench/NOTES.md, entry 8.)"""
    rows = []
    for T, H, k in shapes:
        x = torch.randn(T, H, device="cuda", dtype=dtype)
        ids = _ids_balanced(T, k, E)
        us = time_graph(lambda: ops.permute(x, ids, E), reps=5, iters=20)
        S, elt = T * k, x.element_size()
        nbytes = (T + S) * H * elt + S * 4 + S * 8
        rows.append(dict(name="permute", shape=f"T={T} H={H} k={k} E={E} {str(dtype)[6:]}", median_us=us,
                         gbps=nbytes / us / 1e3))
    return rows


def unpermute_bandwidth(shapes=PERMUTE_SHAPES, E: int = 64, dtype=torch.bfloat16) -> list[dict]:
    """unpermute with fp32 weights: bytes = S rows of y_sorted read + T rows of y written (+ maps, weights)."""
    rows = []
    for T, H, k in shapes:
        x = torch.randn(T, H, device="cuda", dtype=dtype)
        ids = _ids_balanced(T, k, E)
        ys, _, row_map = ops.permute(x, ids, E)
        w = torch.rand(T, k, device="cuda")
        us = time_graph(lambda: ops.unpermute(ys, row_map, w), reps=5, iters=20)
        S, elt = T * k, ys.element_size()
        nbytes = S * H * elt + T * H * elt + S * (8 + 4)
        rows.append(dict(name="unpermute", shape=f"T={T} H={H} k={k} E={E} {str(dtype)[6:]}", median_us=us,
                         gbps=nbytes / us / 1e3))
    return rows


def all_rows() -> list[dict]:
    return gating_latency() + permute_bandwidth() + unpermute_bandwidth()


if __name__ == "__main__":  # python bench/routing_kernels.py [OUT.json]
    import json
    import sys

    rows = all_rows()
    for r in rows:
        print(r)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f, indent=1)
