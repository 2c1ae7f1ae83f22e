"""Time a transformers Mixtral sparse MoE block with experts_implementation "moe_ext" vs "grouped_mm" (and
"eager"), forward and forward+backward, interleaved runs, medians.

    python -m moe_ext.integrations.bench_transformers [--tokens 2048 --hidden 1024 --ffn 2048 --experts 8
        --top-k 2 --reps 15 --dtype float32 --threads N --profile]
    python -m moe_ext.integrations.bench_transformers --block llama4|gpt_oss [sizes as above]

--block times another family's block as transformers runs it ("eager"; and "grouped_mm" where its experts
take an experts_implementation) against the same block after replace_moe_blocks ("moe_ext": router and experts
in moe_ext).

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


_BLOCKS = {  # family -> (modeling module, block class, config class, config keywords for the sizes)
    "llama4": ("llama4", "Llama4TextMoe", "Llama4TextConfig",
               lambda H, F, E, k: dict(intermediate_size=F, intermediate_size_mlp=F, num_local_experts=E,
                                       num_experts_per_tok=k)),
    "gpt_oss": ("gpt_oss", "GptOssMLP", "GptOssConfig",
                lambda H, F, E, k: dict(intermediate_size=F, num_local_experts=E, num_experts_per_tok=k)),
}


def _interleaved(fns: dict, reps: int, warmup: int) -> dict:
    """{name: {"fwd"/"fwd_bwd": median s, "..._all": [s, ...]}} of fns {name: (fwd, fwd_bwd)}, run in a rotating
    order within each repetition."""
    res = {n: {"fwd_all": [], "fwd_bwd_all": []} for n in fns}
    order = list(fns)
    for r in range(warmup + reps):
        for j, kind in enumerate(("fwd_all", "fwd_bwd_all")):
            for n in order:
                t = _time(fns[n][j])
                if r >= warmup:
                    res[n][kind].append(t)
        order = order[1:] + order[:1]
    for n in fns:
        res[n]["fwd"], res[n]["fwd_bwd"] = (statistics.median(res[n][k]) for k in ("fwd_all", "fwd_bwd_all"))
    return res


def bench_block(family: str, hidden=1024, ffn=2048, experts=16, top_k=1, tokens=2048, reps=9, warmup=1,
                dtype=torch.float32) -> dict:
    """A transformers block of `family` (_BLOCKS) as transformers runs it ("eager", and "grouped_mm" where the
    experts take an experts_implementation) and after replace_moe_blocks ("moe_ext"), same weights and input:
    {impl: {...}} as bench() returns, plus "max_abs_diff" of the moe_ext and eager outputs."""
    import copy
    import importlib
    import transformers
    from . import transformers as mt
    module, cls_name, cfg_name, sizes = _BLOCKS[family]
    cfg = getattr(transformers, cfg_name)(hidden_size=hidden, num_attention_heads=8, num_key_value_heads=8,
                                          **sizes(hidden, ffn, experts, top_k))
    torch.manual_seed(0)
    block = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls_name)(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, hidden ** -0.5)
    block = block.to(dtype)
    blocks = {"eager": block}
    if hasattr(block.experts, "is_transposed"):  # @use_experts_implementation: transformers' grouped_mm too
        block.experts.config._experts_implementation = "eager"
        blocks["grouped_mm"] = copy.deepcopy(block)
        blocks["grouped_mm"].experts.config._experts_implementation = "grouped_mm"
    wrapper = torch.nn.Module()
    wrapper.mlp = copy.deepcopy(block)
    mt.replace_moe_blocks(wrapper)
    blocks["moe_ext"] = wrapper.mlp
    x = torch.randn(1, tokens, hidden, dtype=dtype)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def pair(m):
        def fwd():
            with torch.no_grad():
                m(x.clone())

        def fwd_bwd():
            m.zero_grad(set_to_none=True)
            y = first(m(x.clone().requires_grad_()))
            y.backward(torch.ones_like(y))
        return fwd, fwd_bwd
    res = _interleaved({n: pair(m) for n, m in blocks.items()}, reps, warmup)
    with torch.no_grad():
        res["max_abs_diff"] = float((first(block(x)) - first(wrapper.mlp(x))).abs().max())
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
    p.add_argument("--block", choices=sorted(_BLOCKS), help="time this family's block, eager against replaced")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    if a.block:
        print(f"{a.block} block: T={a.tokens} H={a.hidden} F={a.ffn} E={a.experts} k={a.top_k} {a.dtype}, "
              f"{torch.get_num_threads()} threads, {a.reps} interleaved reps (medians)")
        res = bench_block(a.block, a.hidden, a.ffn, a.experts, a.top_k, a.tokens, a.reps, a.warmup, dtype)
        impls = [n for n in ("eager", "grouped_mm", "moe_ext") if n in res]
        for n in impls:
            speed = ", ".join(f"{kind} x{res[n][kind] / res['moe_ext'][kind]:.2f}" for kind in ("fwd", "fwd_bwd"))
            print(f"{n:>10}: fwd {res[n]['fwd'] * 1e3:8.1f} ms   fwd+bwd {res[n]['fwd_bwd'] * 1e3:8.1f} ms"
                  + (f"   moe_ext is faster by: {speed}" if n != "moe_ext" else ""))
        print(f"max |moe_ext - eager| output difference {res['max_abs_diff']:.2e}")
        return
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
