"""Time a transformers Mixtral sparse MoE block with experts_implementation "moe_ext" vs "grouped_mm" (and
"eager"), forward and forward+backward, interleaved runs, medians.

    python -m moe_ext.integrations.bench_transformers [--tokens 2048 --hidden 1024 --ffn 2048 --experts 8
        --top-k 2 --reps 15 --dtype float32 --threads N --profile]

Every implementation runs the same block (same weights, same input, transformers' own router); in each
repetition the implementations run one after another in a rotating order, so a loaded machine slows all
of them alike; the medians over repetitions are reported, with the ratio to grouped_mm.
"""
import argparse
import statistics
import time

import torch


def make_block(hidden=1024, ffn=2048, experts=8, top_k=2, dtype=torch.float32, seed=0):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts,
                        num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(cfg).to(dtype)
    with torch.no_grad():
        block.gate.weight.normal_(0, hidden ** -0.5)
        block.experts.gate_up_proj.normal_(0, hidden ** -0.5)
        block.experts.down_proj.normal_(0, ffn ** -0.5)
    return block, cfg


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(hidden=1024, ffn=2048, experts=8, top_k=2, tokens=2048, reps=15, warmup=2, dtype=torch.float32,
          impls=("moe_ext", "grouped_mm", "eager"), verbose=False):
    """{impl: {"fwd": median s, "fwd_bwd": median s, "fwd_all": [...], "fwd_bwd_all": [...]}}."""
    from . import transformers as mt
    mt.register()
    block, cfg = make_block(hidden, ffn, experts, top_k, dtype)
    x = torch.randn(1, tokens, hidden, dtype=dtype)
    g = torch.randn_like(x)

    def fwd(impl):
        cfg._experts_implementation = impl
        with torch.no_grad():
            block(x.clone())

    def fwd_bwd(impl):
        cfg._experts_implementation = impl
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        block(xi).backward(g)

    res = {i: {"fwd_all": [], "fwd_bwd_all": []} for i in impls}
    order = list(impls)
    for r in range(warmup + reps):
        for kind, fn in (("fwd_all", fwd), ("fwd_bwd_all", fwd_bwd)):
            for impl in order:
                t = _time(lambda: fn(impl))
                if r >= warmup:
                    res[impl][kind].append(t)
        order = order[1:] + order[:1]
        if verbose and r >= warmup:
            print(f"rep {r - warmup}: " + ", ".join(f"{i} fwd {res[i]['fwd_all'][-1] * 1e3:.1f} ms / fwd+bwd "
                                                  f"{res[i]['fwd_bwd_all'][-1] * 1e3:.1f} ms" for i in impls), flush=True)
    for i in impls:
        res[i]["fwd"] = statistics.median(res[i]["fwd_all"])
        res[i]["fwd_bwd"] = statistics.median(res[i]["fwd_bwd_all"])
        if "grouped_mm" in res:  # per-repetition speed ratios vs grouped_mm (same rep: same machine load)
            for kind in ("fwd", "fwd_bwd"):
                res[i][kind + "_paired_speedup"] = statistics.median(
                    b / a for a, b in zip(res[i][kind + "_all"], res["grouped_mm"][kind + "_all"]))
    return res


def profile(impl="moe_ext", hidden=1024, ffn=2048, experts=8, top_k=2, tokens=2048, dtype=torch.float32, row_limit=25):
    """torch.profiler table (self CPU time) of one forward+backward of the block with `impl`."""
    from . import transformers as mt
    mt.register()
    block, cfg = make_block(hidden, ffn, experts, top_k, dtype)
    cfg._experts_implementation = impl
    x = torch.randn(1, tokens, hidden, dtype=dtype, requires_grad=True)
    block(x).sum().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        block(x).sum().backward()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--impls", default="moe_ext,grouped_mm,eager")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    impls = tuple(a.impls.split(","))
    print(f"Mixtral sparse MoE block: T={a.tokens} H={a.hidden} F={a.ffn} E={a.experts} k={a.top_k} {a.dtype}, "
          f"{torch.get_num_threads()} threads, {a.reps} interleaved reps (medians)")
    res = bench(a.hidden, a.ffn, a.experts, a.top_k, a.tokens, a.reps, a.warmup, dtype, impls, verbose=True)
    base = res.get("grouped_mm")
    for i in impls:
        line = f"{i:>10}: fwd {res[i]['fwd'] * 1e3:8.1f} ms   fwd+bwd {res[i]['fwd_bwd'] * 1e3:8.1f} ms"
        if base is not None:
            line += (f"   speed vs grouped_mm (ratio of medians / median of paired ratios): "
                     f"fwd x{base['fwd'] / res[i]['fwd']:.3f} / x{res[i]['fwd_paired_speedup']:.3f}, "
                     f"fwd+bwd x{base['fwd_bwd'] / res[i]['fwd_bwd']:.3f} / x{res[i]['fwd_bwd_paired_speedup']:.3f}")
        print(line)
    if a.profile:
        for i in impls:
            if i != "eager":
                print(f"\n=== {i} ===\n" + profile(i, a.hidden, a.ffn, a.experts, a.top_k, a.tokens, dtype))


if __name__ == "__main__":
    main()
