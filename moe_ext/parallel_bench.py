"""Expert-parallel communication benchmark: bytes sent per rank against the seed chapter's model, and
the time split between communication (the all-to-alls) and compute.

    python -m moe_ext.parallel_bench --world 2 [--tokens 512 --hidden 256 --ffn 512 --experts 8 --topk 2]

Spawns --world gloo processes on 127.0.0.1 (CPU). The model (per rank, per all-to-all):
B * D * (N - 1) / N elements leave each rank for B tokens of hidden size D over N ranks when routing is
uniform, times k for top-k, times 2 for dispatch + combine; the measured value counts the rows this
rank actually sent to other ranks (rows kept on the rank cost nothing), so it fluctuates around the
model with the routing. Times: "comm" is the wall time inside the all-to-alls (the counts exchange,
dispatch and combine, forward and backward), which includes waiting for slower ranks; "compute" is
the rest of the forward + backward step.
"""
import argparse
import json
import time

import torch


def model_bytes(tokens: int, hidden: int, world: int, top_k: int, elem_size: int) -> float:
    """Seed chapter: B*D*(N-1)/N per all-to-all per rank, times k, times 2 (dispatch + combine)."""
    return 2 * top_k * tokens * hidden * (world - 1) / world * elem_size


def _bench_worker(rank, world, cfg):
    import moe_ext
    from moe_ext.parallel import all_reduce_gradients, shard_experts
    torch.manual_seed(0)
    dtype = getattr(torch, cfg["dtype"])
    layer = moe_ext.MoELayer(cfg["hidden"], cfg["ffn"], cfg["experts"], cfg["topk"]).to(dtype)
    ep = shard_experts(layer, None)
    del layer
    torch.manual_seed(1 + rank)
    x = torch.randn(cfg["tokens"], cfg["hidden"], dtype=dtype, requires_grad=True)
    sent = {"dispatch": 0, "combine": 0}
    acc = {"step": 0.0, "comm": 0.0}
    for it in range(cfg["warmup"] + cfg["iters"]):
        timing = it >= cfg["warmup"]
        ep.comm_stats = {} if timing else None
        t0 = time.perf_counter()
        y = ep(x)
        y.float().square().mean().backward()
        all_reduce_gradients(ep)
        step = time.perf_counter() - t0
        if timing:
            comm = ep.comm_stats.get("comm_s", 0.0)
            sent["dispatch"] += ep.last_comm["dispatch_bytes_sent"]
            sent["combine"] += ep.last_comm["combine_bytes_sent"]
            acc["step"] += step
            acc["comm"] += comm
        ep.zero_grad(set_to_none=True)
        x.grad = None
    n = cfg["iters"]
    elem = x.element_size()
    return {
        "rank": rank,
        "dispatch_bytes_sent": sent["dispatch"] / n,
        "combine_bytes_sent": sent["combine"] / n,
        "measured_bytes_fwd": (sent["dispatch"] + sent["combine"]) / n,
        "model_bytes_fwd": model_bytes(cfg["tokens"], cfg["hidden"], world, cfg["topk"], elem),
        "step_s": acc["step"] / n,
        "comm_s": acc["comm"] / n,
        "compute_s": (acc["step"] - acc["comm"]) / n,
    }


def run(world: int = 2, tokens: int = 512, hidden: int = 256, ffn: int = 512, experts: int = 8, topk: int = 2,
        iters: int = 5, warmup: int = 1, dtype: str = "float32", timeout_s: float = 300.0):
    """Run the benchmark on `world` spawned gloo processes; returns one dict per rank."""
    from ._dist_launch import launch
    cfg = dict(tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, topk=topk, iters=iters, warmup=warmup,
               dtype=dtype)
    return launch(_bench_worker, world, cfg, timeout_s=timeout_s)


def format_table(results) -> str:
    lines = [f"{'rank':>4} {'sent fwd (B)':>13} {'model (B)':>12} {'ratio':>6} {'step ms':>8} {'comm ms':>8} "
             f"{'compute ms':>10} {'comm %':>6}"]
    for r in results:
        ratio = r["measured_bytes_fwd"] / r["model_bytes_fwd"] if r["model_bytes_fwd"] else float("nan")
        lines.append(f"{r['rank']:>4} {r['measured_bytes_fwd']:>13.0f} {r['model_bytes_fwd']:>12.0f} {ratio:>6.2f} "
                     f"{1e3 * r['step_s']:>8.2f} {1e3 * r['comm_s']:>8.2f} {1e3 * r['compute_s']:>10.2f} "
                     f"{100 * r['comm_s'] / max(r['step_s'], 1e-12):>6.1f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank (B)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (D)")
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print the per-rank results as JSON")
    a = p.parse_args(argv)
    res = run(a.world, a.tokens, a.hidden, a.ffn, a.experts, a.topk, a.iters, a.warmup, a.dtype)
    print(f"expert parallel over gloo (CPU), world={a.world}, B={a.tokens} tokens/rank, D={a.hidden}, "
          f"E={a.experts}, k={a.topk}, {a.dtype}; forward bytes = dispatch + combine rows sent to other ranks; "
          f"model = 2*k*B*D*(N-1)/N*elem_size; comm/compute per forward+backward step")
    print(format_table(res))
    if a.json:
        print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
