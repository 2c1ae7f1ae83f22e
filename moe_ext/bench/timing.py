"""Timing: interleaved (round-robin) medians on CPU and CUDA, CUDA-graph replay for microsecond
kernels, the measured ceilings (device copy bandwidth, dense GEMM), NVTX ranges and torch.profiler.

Every implementation is a callable fn(i) that runs one call on input set i (sets rotate so that on
CUDA they exceed the L2). A sample is `inner` calls between two CUDA events (or perf_counter on the
CPU); the only host sync is the end event's, after the sample. Samples of all implementations are
taken round-robin, so drift of clocks or machine load hits them alike.
"""
import contextlib
import statistics
import time
from typing import Callable, Dict

import torch


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


class Ranges:
    """Named ranges around kernel stages: NVTX (--nsys) and/or torch.profiler record_function (--profile)."""

    def __init__(self, nvtx: bool = False, record: bool = False):
        self.nvtx, self.record = nvtx and torch.cuda.is_available(), record

    @property
    def active(self) -> bool:
        return self.nvtx or self.record

    @contextlib.contextmanager
    def __call__(self, name: str):
        rf = torch.profiler.record_function(name) if self.record else contextlib.nullcontext()
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            with rf:
                yield
        finally:
            if self.nvtx:
                torch.cuda.nvtx.range_pop()


NO_RANGES = Ranges()


def _make_runner(fn: Callable, device: str, inner: int, n_sets: int, graph: bool, notes: list):
    """A callable that runs `inner` calls (input sets rotating), replaying a CUDA graph when asked."""
    counter = [0]

    def eager():
        c = counter[0]
        for j in range(inner):
            fn((c + j) % n_sets)
        counter[0] = (c + inner) % n_sets

    if not (graph and device == "cuda"):
        return eager, None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(min(3, n_sets)):
                fn(i)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for j in range(inner):
                fn(j % n_sets)
        g.replay()
        torch.cuda.synchronize()
        return g.replay, g
    except Exception as e:  # a capture failure is reported, then the eager loop is timed
        torch.cuda.synchronize()
        notes.append(f"graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:80]}); eager timing")
        return eager, None


def _time_once(run: Callable, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def bench(fns: Dict[str, Callable], device: str, n_sets: int = 1, graph=frozenset(), budget_s: float = 0.3,
          min_rounds: int = 5, max_rounds: int = 50, sample_s: float = 1e-3, profiler_api: bool = False,
          ranges: Ranges = NO_RANGES, warmup: int = 2) -> Dict[str, dict]:
    """Median seconds per call of each fn, sampled round-robin. Returns name -> {median, p20, p80,
    rounds, inner, graph, notes}. graph: the names to time as CUDA-graph replays. budget_s bounds
    the time spent per implementation."""
    est, runners, out = {}, {}, {}
    for name, fn in fns.items():
        notes = []
        for i in range(warmup - 1):
            fn(i % n_sets)
        sync(device)
        t1 = _time_once(lambda: fn(0), device)  # the last warm-up call sizes inner and rounds
        inner = 1
        if device == "cuda":
            inner = max(1, min(1000, int(sample_s / max(t1, 1e-7))))
            inner = max(inner, n_sets) if name in graph else inner
        run, g = _make_runner(fn, device, inner, n_sets, name in graph, notes)
        est[name] = t1 * inner
        runners[name] = (run, g, inner)
        out[name] = {"inner": inner, "graph": g is not None, "notes": notes, "samples": []}
    rounds = int(max(min_rounds, min(max_rounds, budget_s / max(max(est.values()), 1e-9))))
    names = list(fns)
    if profiler_api and device == "cuda":
        torch.cuda.cudart().cudaProfilerStart()
    try:
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
            for name in order:
                run, _, inner = runners[name]
                with ranges(f"{name}") if ranges.nvtx else contextlib.nullcontext():
                    out[name]["samples"].append(_time_once(run, device) / inner)
    finally:
        if profiler_api and device == "cuda":
            torch.cuda.cudart().cudaProfilerStop()
    for name in names:
        s = sorted(out[name].pop("samples"))
        q = statistics.quantiles(s, n=5) if len(s) >= 2 else [s[0]] * 4
        out[name].update(median=statistics.median(s), p20=q[0], p80=q[3], rounds=len(s))
    runners.clear()
    return out


def copy_bandwidth(device: str, nbytes: int = None) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    nbytes = nbytes or (2 * 2**30 if device == "cuda" else 64 * 2**20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    r = bench({"copy": lambda i: dst.copy_(src)}, device, budget_s=0.2 if device == "cuda" else 0.3,
              min_rounds=5, max_rounds=20)
    return 2 * nbytes / r["copy"]["median"]


def dense_peak(device: str, dtype: torch.dtype) -> float:
    """Measured dense GEMM FLOP/s: bf16 8192^3 on CUDA, fp32 1024^3 on the CPU (random data)."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    r = bench({"mm": lambda i: torch.mm(a, b)}, device, budget_s=0.3, min_rounds=5, max_rounds=20)
    return 2 * n**3 / r["mm"]["median"]


def profile_calls(fn: Callable, device: str, calls: int = 3, n_sets: int = 1) -> dict:
    """Per-kernel (and per-range) time breakdown of `calls` calls through torch.profiler.
    Returns {"table": str, "top": [{name, us_per_call, pct, count}]}; device time on CUDA, CPU time
    (self) on the CPU."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    fn(0)
    sync(device)
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(calls):
            fn(i % n_sets)
        sync(device)
    ka = prof.key_averages()
    if device == "cuda":
        key = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") else "self_cuda_time_total"
        sort_by = "self_cuda_time_total"
    else:
        key, sort_by = "self_cpu_time_total", "self_cpu_time_total"
    evs = [e for e in ka if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in evs) or 1.0
    evs.sort(key=lambda e: -getattr(e, key))
    top = [{"name": e.key, "us_per_call": round(getattr(e, key) / calls, 2),
            "pct": round(100.0 * getattr(e, key) / total, 1), "count": e.count // calls} for e in evs[:15]]
    stages = [{"name": e.key, "us_per_call": round(e.cpu_time_total / calls, 2)} for e in ka
              if e.key in STAGES]
    try:
        table = ka.table(sort_by=sort_by, row_limit=20)
    except Exception:  # older/newer profilers name the sort keys differently
        table = ka.table(row_limit=20)
    return {"table": table, "top": top, "stages": stages}


STAGES = ("router", "gating", "permute", "grouped_gemm_w1", "activation", "grouped_gemm_w2", "unpermute")
