"""python -m moe_ext.bench [--device cpu|cuda] [--suite gating,permute,unpermute,activation,grouped_gemm,layer]
                          [--quick] [--out DIR] [--nsys] [--profile] [--filter TEXT]

Times moe_ext's ops and layer against baselines measured in the same run (plain PyTorch, the textbook
loop moe_ext.reference.naive_moe, torch grouped_mm, transformers' MixtralSparseMoeBlock when
installed) and against the ceilings (a dense GEMM of equal FLOPs; measured copy bandwidth and dense
FLOP/s). Every implementation is checked against moe_ext.reference before it is timed (column ok).
Writes DIR/results.json, DIR/results.csv, DIR/*.png and prints a table. See docs/benchmarks.md.
"""
import argparse
import os
import signal
import sys
import threading
import time

import torch

from . import report
from .shapes import SUITES, plan
from .suites import BUILDERS
from .timing import Ranges, bench, copy_bandwidth, dense_peak, profile_calls


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m moe_ext.bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--suite", default=",".join(SUITES), help="comma-separated: " + ",".join(SUITES))
    p.add_argument("--quick", action="store_true", help="a small subset (< 2 min on a GPU, < 3 min on a CPU)")
    p.add_argument("--out", default="bench_out", help="output folder (default: bench_out)")
    p.add_argument("--nsys", action="store_true", help="NVTX stage ranges + cudaProfilerStart/Stop around timing")
    p.add_argument("--profile", action="store_true", help="per-kernel breakdown of moe_ext through torch.profiler")
    p.add_argument("--filter", default="", help="only the cases whose label contains this text")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per implementation and case")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's); 1 gives steadier CPU numbers on a loaded machine")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny shapes, for the tests
    a = p.parse_args(argv)
    a.suites = [s.strip() for s in a.suite.split(",") if s.strip()]
    bad = [s for s in a.suites if s not in SUITES]
    if bad:
        p.error(f"unknown suite(s) {bad}; choose from {','.join(SUITES)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    a.smoke = a.smoke or os.environ.get("MOE_EXT_BENCH_SMOKE") == "1"
    a.mode = "smoke" if a.smoke else ("quick" if a.quick else "full")
    return a


class Progress:
    """tqdm when installed, else a counter on stderr."""

    def __init__(self, total):
        self.total, self.n, self.bar = total, 0, None
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True)
        except Exception:
            pass

    def step(self, label):
        self.n += 1
        if self.bar is not None:
            self.bar.set_description(label[:60])
            self.bar.update(1)
        else:
            print(f"[{self.n}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_case(case, args, ceil, ranges):
    device = args.device
    bwd = case.pass_ == "fwd+bwd"
    with torch.no_grad() if not bwd else torch.enable_grad():
        built = BUILDERS[case.suite](case, device, ranges)
        checked = {}
        for name, chk in built.checks.items():
            try:
                checked[name] = chk()
            except Exception as e:  # a failing implementation is reported, not timed
                checked[name] = (False, None, f"raised {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                built.impls.pop(name, None)
        budget = args.budget or {"smoke": 0.02, "quick": 0.25 if device == "cpu" else 0.15}.get(args.mode, 0.5)
        timed = bench(built.impls, device, n_sets=built.n_sets, graph=built.graphable, budget_s=budget,
                      min_rounds=3 if args.mode == "smoke" else 5, profiler_api=args.nsys, ranges=ranges)
        prof = None
        if args.profile and built.profile_fn is not None and "moe_ext" in built.impls:
            prof = profile_calls(built.profile_fn, device, n_sets=built.n_sets)
    rows = []
    t_moe = timed.get("moe_ext", {}).get("median")
    for name in list(checked) + [n for n in timed if n not in checked]:
        t = timed.get(name, {}).get("median")
        ok, err, note = checked.get(name, (None, None, ""))
        notes = [note] + timed.get(name, {}).get("notes", [])
        r = dict(suite=case.suite, model=case.model, T=case.T, routing=case.routing, config=case.label,
                 impl=name, ok=ok, err=err, note="; ".join(n for n in notes if n),
                 median_us=t and t * 1e6, p20_us=t and timed[name]["p20"] * 1e6, p80_us=t and timed[name]["p80"] * 1e6,
                 tflops=(built.flops / t / 1e12) if (t and built.flops) else None,
                 gbps=(built.bytes / t / 1e9) if t else None, graph=timed.get(name, {}).get("graph"),
                 n_sets=built.n_sets, flops=built.flops, bytes=built.bytes, info=built.info)
        r["pass"] = case.pass_
        saved = built.saved_bytes.get(name)
        r["saved_mb"] = None if saved is None else saved / 2**20
        t_roof = max(built.flops / ceil["dense_flops"], built.bytes / ceil["copy_Bps"])
        r["roofline_frac"] = (t_roof / t) if t else None
        r["bound"] = "compute" if built.flops / ceil["dense_flops"] >= built.bytes / ceil["copy_Bps"] else "memory"
        t_dense = timed.get("dense", {}).get("median")
        r["dense_frac"] = (t_dense / t) if (t and t_dense and name != "dense") else None
        if name == "moe_ext" and t:
            r["speedup"] = {b: timed[b]["median"] / t for b in timed if b not in ("moe_ext", "dense")}
        elif t and t_moe:
            r["moe_ext_speedup"] = t / t_moe
        rows.append(r)
    for name, why in built.skipped.items():
        rows.append(dict(suite=case.suite, model=case.model, T=case.T, routing=case.routing, config=case.label,
                         impl=name, ok=None, err=None, note="skipped: " + why, median_us=None, p20_us=None,
                         p80_us=None, tflops=None, gbps=None, roofline_frac=None, bound=None, dense_frac=None,
                         graph=None, n_sets=built.n_sets, **{"pass": case.pass_}))
    del built
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows, prof


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    device = args.device
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    cases = [c for c in plan(device, args.mode, args.suites) if args.filter in c.label]
    ranges = Ranges(nvtx=args.nsys)  # timed code carries NVTX only; --profile adds record_function ranges
    from .shapes import dtype_for
    ceil = {"copy_Bps": copy_bandwidth(device, nbytes=(8 * 2**20 if args.smoke else None)),
            "dense_flops": dense_peak(device, dtype_for(device))}
    print(f"moe_ext.bench on {report.device_name(device)}: {len(cases)} cases ({args.mode}); copy "
          f"{ceil['copy_Bps'] / 1e9:.1f} GB/s, dense GEMM {ceil['dense_flops'] / 1e12:.2f} TFLOP/s", file=sys.stderr)
    rows, profiles, prog = [], [], Progress(len(cases))

    def run_one(case):
        prog.step(case.label)
        try:
            rs, prof = run_case(case, args, ceil, ranges)
        except Exception as e:  # one broken case does not end the run
            rs, prof = [dict(suite=case.suite, model=case.model, T=case.T, routing=case.routing, config=case.label,
                             impl="moe_ext", ok=False, err=None, note=f"case failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''}", median_us=None, p20_us=None,
                             p80_us=None, tflops=None, gbps=None, roofline_frac=None, bound=None, dense_frac=None,
                             graph=None, n_sets=None, **{"pass": case.pass_})], None
        rows.extend(rs)
        if prof is not None:
            profiles.append({"case": case.label, "top": prof["top"], "stages": prof["stages"]})
            with open(os.path.join(args.out, "profile.txt"), "a") as f:
                f.write(f"== {case.label}\n{prof['table']}\n")

    header = {"schema": 1, "device": report.device_name(device), "device_type": device, "date": report.now(),
              **report.git_commit(), "versions": report.versions(device),
              "config": {"mode": args.mode, "suites": args.suites, "filter": args.filter, "nsys": args.nsys,
                         "profile": args.profile, "dtype": str(dtype_for(device)), "argv": sys.argv[1:],
                         "cpu_threads": torch.get_num_threads()},
              "ceilings": {"copy_GBps": ceil["copy_Bps"] / 1e9, "dense_TFLOPs": ceil["dense_flops"] / 1e12}}

    def document(complete):
        return {**header, "rows": rows, "profile": profiles, "complete": complete, "cases": len(cases),
                "elapsed_s": round(time.time() - t0, 1)}

    json_path = os.path.join(args.out, "results.json")
    # A run cut short (timeout's SIGTERM, Ctrl-C) still leaves results.json with the rows so far.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    try:
        for case in cases:
            run_one(case)
            report.write_json(json_path, document(complete=False))
    except KeyboardInterrupt:
        prog.close()
        print(f"\ninterrupted after {len({r['config'] for r in rows})} of {len(cases)} cases; their rows are in "
              f"{json_path}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    prog.close()
    doc = document(complete=True)
    report.write_csv(os.path.join(args.out, "results.csv"), rows)
    pngs = report.plots(args.out, rows)
    doc["elapsed_s"] = round(time.time() - t0, 1)
    report.write_json(json_path, doc)
    print(report.table(rows))
    bad = [r for r in rows if r["ok"] is False]
    print(f"\n{len(rows)} rows, {len(bad)} failed checks; wrote {args.out}/results.json, results.csv"
          + (", " + ", ".join(os.path.basename(p) for p in pngs) if pngs else "") + f" in {doc['elapsed_s']} s")
    return 1 if any(r["ok"] is False and r["impl"] == "moe_ext" for r in rows) else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
