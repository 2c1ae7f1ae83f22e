"""Grouped GEMM timings on CUDA: moe_ext vs torch's grouped_mm, a per-expert matmul loop, and a dense
GEMM of equal FLOPs (the ceiling). Plain functions, no CLI (the CLI lives elsewhere).

Shapes are the expert FFNs of real MoE models: "up" is x[S,H] @ w1[e] -> [S,2F] (gated, so N = 2F)
and "down" is h[S,F] @ w2[e] -> [S,H], with S = tokens * top_k rows routed uniformly at random
(seeded). "fwd" times the forward GEMM (layout NN, b [E,K,N]); "fwd+bwd" times forward + dgrad
(grouped_gemm with trans_b, NT) + wgrad (grouped_gemm_wgrad, TN).

Timing: CUDA events around each call, warm-up first, median of `iters`; inputs are rotated through
enough copies to exceed twice the 50 MB L2 when one set is smaller than that. Inputs are random, never
zeros; the impls take turns over 3 rounds. Every row: {name, impl, shape, tokens, median_us (median of
the rounds), rounds_us, tflops, speedup_vs_grouped_mm} (+ kernel for moe_ext rows, + error).
On an sm_90 GPU, 16-bit rows also time moe_ext with each tile forced ("moe_ext@128x128",
"moe_ext@128x256"), next to the "moe_ext" row, which uses the tile its heuristic picks; "kernel" names the
forward kernel that ran.

    from bench.gemm_kernels import run
    rows = run(models=["mixtral"], tokens=[128, 4096])
"""
import math
import statistics

import torch

import moe_ext

MODELS = {
    "mixtral": dict(hidden=4096, ffn=14336, experts=8, topk=2),         # Mixtral 8x7B
    "qwen3-30b-a3b": dict(hidden=2048, ffn=768, experts=128, topk=8),
    "deepseek-v3": dict(hidden=7168, ffn=2048, experts=256, topk=8),
}
TOKENS = (1, 16, 128, 1024, 4096, 8192, 16384)
GEMMS = ("up", "down")
IMPLS = ("moe_ext", "grouped_mm", "loop", "dense")
L2_BYTES = 50 * 2**20


def _grouped_mm_fn():
    f = getattr(torch.nn.functional, "grouped_mm", None)
    if f is not None:
        return f
    g = getattr(torch, "_grouped_mm", None)
    if g is None:
        return None
    return lambda a, b, offs=None: g(a, b, offs=offs)


SM90_TILES = ("128x128", "128x256")


def available_impls(dtype=torch.bfloat16):
    impls = ["moe_ext", "loop", "dense"]
    if _grouped_mm_fn() is not None:
        impls.insert(1, "grouped_mm")
    if dtype in (torch.bfloat16, torch.float16) and _sm90_build():
        impls[1:1] = [f"moe_ext@{t}" for t in SM90_TILES]
    return impls


def _sm90_build():
    return torch.cuda.get_device_capability() == (9, 0) and moe_ext.build_info()["grouped_gemm"]["sm90"]


def gemm_dims(model, gemm):
    """(K, N, E, top_k) of one expert GEMM of `model`."""
    m = MODELS[model]
    if gemm == "up":
        return m["hidden"], 2 * m["ffn"], m["experts"], m["topk"]
    if gemm == "down":
        return m["ffn"], m["hidden"], m["experts"], m["topk"]
    raise ValueError(f"gemm must be 'up' or 'down', got {gemm!r}")


def routed_counts(tokens, experts, topk, seed=0):
    """Rows per expert for `tokens` tokens routed uniformly at random to top_k distinct experts (CPU)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, experts, generator=g).topk(topk, dim=1).indices
    return torch.bincount(ids.flatten(), minlength=experts)


def time_us(fn, n_sets, warmup=5, iters=20):
    """Median microseconds of fn(i) (i = the input set, rotated) timed with CUDA events."""
    for i in range(warmup):
        fn(i % n_sets)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn(i % n_sets)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def _rotation(bytes_per_set):
    return max(1, min(8, math.ceil(2 * L2_BYTES / max(1, bytes_per_set))))


def _make_sets(S, K, N, E, dtype, backward, n_sets, gen):
    sets = []
    for _ in range(n_sets):
        # generated in the target dtype directly: an fp32 copy of DeepSeek-V3's w1 would be 30 GB
        s = {
            "a": torch.randn(S, K, generator=gen, device="cuda", dtype=dtype),
            "b": torch.randn(E, K, N, generator=gen, device="cuda", dtype=dtype).mul_(K**-0.5),
        }
        if backward:
            s["dc"] = torch.randn(S, N, generator=gen, device="cuda", dtype=dtype)
        sets.append(s)
    return sets


def _impl_fn(impl, sets, offsets, counts, backward):
    """A callable fn(i) running `impl` on input set i, or raise if the impl is unavailable."""
    ops = torch.ops.moe_ext
    if impl.startswith("moe_ext"):  # the tile of "moe_ext@TILE" is set around the timing
        def fn(i):
            s = sets[i]
            c = ops.grouped_gemm(s["a"], s["b"], offsets, False)
            if backward:
                ops.grouped_gemm(s["dc"], s["b"], offsets, True)       # dgrad (NT)
                ops.grouped_gemm_wgrad(s["a"], s["dc"], offsets)       # wgrad (TN)
            return c
        return fn
    if impl == "grouped_mm":
        gmm = _grouped_mm_fn()
        if gmm is None:
            raise RuntimeError("torch has neither nn.functional.grouped_mm nor _grouped_mm")
        offs32 = offsets[1:].to(torch.int32)  # end offsets, groups start at 0

        def fn(i):
            s = sets[i]
            c = gmm(s["a"], s["b"], offs=offs32)
            if backward:
                gmm(s["dc"], s["b"].transpose(-2, -1), offs=offs32)
                gmm(s["a"].t(), s["dc"], offs=offs32)
            return c
        return fn
    if impl == "loop":
        bounds = [0] + torch.cumsum(counts, 0).tolist()  # host sizes, computed before timing

        def fn(i):
            s = sets[i]
            c = torch.empty(s["a"].shape[0], s["b"].shape[2], device="cuda", dtype=s["a"].dtype)
            for e in range(len(bounds) - 1):
                lo, hi = bounds[e], bounds[e + 1]
                if hi == lo:
                    continue
                torch.matmul(s["a"][lo:hi], s["b"][e], out=c[lo:hi])
                if backward:
                    torch.matmul(s["dc"][lo:hi], s["b"][e].t())
                    torch.matmul(s["a"][lo:hi].t(), s["dc"][lo:hi])
            return c
        return fn
    if impl == "dense":
        def fn(i):
            s = sets[i]
            w = s["b"][0]
            c = torch.matmul(s["a"], w)
            if backward:
                torch.matmul(s["dc"], w.t())
                torch.matmul(s["a"].t(), s["dc"])
            return c
        return fn
    raise ValueError(f"unknown impl {impl!r}")


def bench_grouped_gemm(model, tokens, gemm="up", backward=False, impls=None, dtype=torch.bfloat16,
                       warmup=5, iters=20, seed=0, rounds=3):
    """Rows for one (model, gemm, tokens, fwd or fwd+bwd) point, one per impl: the median over `rounds`
    rounds (rounds_us) of each round's median of `iters` calls."""
    K, N, E, topk = gemm_dims(model, gemm)
    S = tokens * topk
    counts = routed_counts(tokens, E, topk, seed)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).cuda()
    flops = 2.0 * S * K * N * (3 if backward else 1)
    elem = torch.finfo(dtype).bits // 8
    set_bytes = (S * K + E * K * N + (S * N if backward else 0)) * elem
    gen = torch.Generator(device="cuda").manual_seed(seed)
    name = f"{model}.{gemm}.{'fwd+bwd' if backward else 'fwd'}"
    if dtype == torch.float32:  # fp32 runs exact or as TF32, by torch's switch (docs/grouped_gemm.md)
        name += ".tf32" if torch.backends.cuda.matmul.allow_tf32 else ".fp32"
    elif dtype != torch.bfloat16:
        name += "." + str(dtype).replace("torch.", "")
    shape = f"S={S} K={K} N={N} E={E}"
    try:
        sets = _make_sets(S, K, N, E, dtype, backward, _rotation(set_bytes), gen)
    except torch.cuda.OutOfMemoryError as e:
        return [dict(name=name, impl=i, shape=shape, tokens=tokens, median_us=None, tflops=None,
                     speedup_vs_grouped_mm=None, error=f"OOM: {e}".splitlines()[0])
                for i in (impls or available_impls(dtype))]
    rows = [dict(name=name, impl=impl, shape=shape, tokens=tokens, median_us=None, tflops=None,
                 speedup_vs_grouped_mm=None) for impl in impls or available_impls(dtype)]
    times = {r["impl"]: [] for r in rows}
    # The impls take turns, `rounds` times, and each row reports the median of its rounds: clocks drift
    # with heat over a long run (the same kernel measured 1.1-2x apart in the 2026-11-27 H100 run when
    # timed at different moments), and taking turns exposes every impl to the same drift.
    for _ in range(rounds):
        for row in rows:
            if "error" in row:
                continue
            impl = row["impl"]
            previous_tile = moe_ext.set_sm90_gemm_tile(impl.split("@", 1)[1]) if "@" in impl else None
            try:
                fn = _impl_fn(impl, sets, offsets, counts, backward)
                times[impl].append(time_us(fn, len(sets), warmup, iters))
                if impl.startswith("moe_ext") and "kernel" not in row:  # which forward kernel ran
                    torch.ops.moe_ext.grouped_gemm(sets[0]["a"], sets[0]["b"], offsets, False)
                    row["kernel"] = moe_ext._C.last_grouped_gemm_kernel()
            except Exception as e:  # an impl that cannot run this shape (dtype, layout, memory)
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            finally:
                if previous_tile is not None:
                    moe_ext.set_sm90_gemm_tile(previous_tile)
    for row in rows:
        ts = times[row["impl"]]
        if "error" not in row and ts:
            us = statistics.median(ts)
            row.update(median_us=us, tflops=flops / (us * 1e-6) / 1e12, rounds_us=[round(t, 1) for t in ts])
    ref = next((r["median_us"] for r in rows if r["impl"] == "grouped_mm" and r["median_us"]), None)
    for r in rows:
        if ref and r["median_us"]:
            r["speedup_vs_grouped_mm"] = ref / r["median_us"]
    del sets
    torch.cuda.empty_cache()
    return rows


def run(models=None, tokens=None, gemms=GEMMS, backward=(False, True), impls=None, dtype=torch.bfloat16,
        warmup=5, iters=20, rounds=3):
    """All (model, gemm, tokens, phase) points; returns the list of rows."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench.gemm_kernels needs a CUDA GPU")
    rows = []
    for model in models or MODELS:
        for gemm in gemms:
            for t in tokens or TOKENS:
                for bwd in backward:
                    rows += bench_grouped_gemm(model, t, gemm, bwd, impls, dtype, warmup, iters, rounds=rounds)
    return rows


def main(argv=None):
    """python bench/gemm_kernels.py [--quick] [--out FILE.json]: the issue's goal points (--quick:
    Mixtral at 8192 tokens forward and forward+backward, 1/16-token decode, and Qwen3-30B-A3B at 4096
    tokens in bf16, in exact fp32 and in fp32 as TF32; plus the forward at 64-256 rows per expert,
    Qwen3 at 1024 tokens and Mixtral at 1024, where the sm_90a tile threshold is decided) or the full
    grid."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.quick:
        rows = run(models=["mixtral"], tokens=[1, 16, 8192]) + run(models=["qwen3-30b-a3b"], tokens=[4096],
                                                                   backward=(False,))
        # rows per expert: Qwen3 64 (1024 tokens) and 256 (4096, above), Mixtral 256 (1024 tokens)
        rows += run(models=["qwen3-30b-a3b", "mixtral"], tokens=[1024], backward=(False,))
        tf32 = torch.backends.cuda.matmul.allow_tf32
        try:  # fp32 exact, then as TF32 (the loop and dense baselines follow the same switch)
            for allow in (False, True):
                torch.backends.cuda.matmul.allow_tf32 = allow
                rows += run(models=["qwen3-30b-a3b"], tokens=[4096], backward=(False,), dtype=torch.float32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    else:
        rows = run()
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
