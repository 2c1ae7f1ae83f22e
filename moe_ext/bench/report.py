"""Output of a benchmark run: the terminal table, results.json, results.csv and PNG plots."""
import csv
import datetime
import json
import os
import platform
import subprocess
from typing import List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit() -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    head = run("rev-parse", "HEAD")
    return {"commit": head or None, "dirty": bool(run("status", "--porcelain", "--untracked-files=no")) if head else None}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def versions(device: str) -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device == "cuda":
        v["cudnn"] = torch.backends.cudnn.version()
        v["driver"] = _nvidia_smi("driver_version")
        v["clocks_sm_mhz"] = _nvidia_smi("clocks.sm")
    for mod in ("triton", "transformers"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = None
    try:
        import moe_ext
        v["moe_ext"] = moe_ext.build_info()
    except Exception as e:
        v["moe_ext"] = f"unavailable: {e}"
    return v


def _nvidia_smi(field: str):
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else None
    except Exception:
        return None


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows: List[dict]) -> str:
    head = f"{'case':<44} {'impl':<17} {'ok':<3} {'median_us':>10} {'TFLOP/s':>8} {'GB/s':>8} {'%roof':>6}  speedup"
    lines = [head, "-" * len(head)]
    last = None
    for r in rows:
        case = f"{r['suite']}/{r['model']} {r['pass']} T={r['T']} {r['routing'][:4]}"
        if case != last and last is not None:
            lines.append("")
        ok = {True: "ok", False: "BAD", None: "-"}[r["ok"]]
        sp = " ".join(f"{k}:{v:.2f}x" for k, v in (r.get("speedup") or {}).items())
        lines.append(f"{case if case != last else '':<44} {r['impl']:<17} {ok:<3} {_fmt(r['median_us'], '10.1f')} "
                     f"{_fmt(r['tflops'], '8.2f')} {_fmt(r['gbps'], '8.1f')} "
                     f"{_fmt(None if r['roofline_frac'] is None else 100 * r['roofline_frac'], '6.1f')}  {sp}"
                     + (f"  saved {r['saved_mb']:.2f} MB" if r.get("saved_mb") is not None else "")
                     + (f"  [{r['note']}]" if r.get("note") else ""))
        last = case
    return "\n".join(lines)


CSV_FIELDS = ["suite", "model", "pass", "T", "routing", "impl", "ok", "err", "median_us", "p20_us", "p80_us",
              "tflops", "gbps", "roofline_frac", "bound", "dense_frac", "saved_mb", "graph", "n_sets", "config", "note"]


def write_csv(path: str, rows: List[dict]):
    baselines = sorted({b for r in rows for b in (r.get("speedup") or {})})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS + [f"speedup_vs_{b}" for b in baselines])
        for r in rows:
            w.writerow([r.get(k) for k in CSV_FIELDS] + [(r.get("speedup") or {}).get(b) for b in baselines])


def write_json(path: str, doc: dict):
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def plots(out_dir: str, rows: List[dict]) -> List[str]:
    """throughput.png, speedup.png, roofline.png (one panel per suite; moe_ext rows against tokens)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    suites = [s for s in ("gating", "permute", "unpermute", "grouped_gemm", "layer") if any(r["suite"] == s for r in rows)]
    if not suites:
        return []
    written = []

    def series(suite, impl="moe_ext"):
        groups = {}
        for r in rows:
            if r["suite"] == suite and r["impl"] == impl and r["median_us"] is not None:
                groups.setdefault(f"{r['model']} {r['pass']} {r['routing']}", []).append(r)
        return {k: sorted(v, key=lambda r: r["T"]) for k, v in groups.items()}

    def figure(name, ylabel_of, value_of, title, logy=False):
        fig, axes = plt.subplots(1, len(suites), figsize=(4.6 * len(suites), 3.8), squeeze=False)
        for ax, suite in zip(axes[0], suites):
            for label, rs in series(suite).items():
                for lab, xs, ys in value_of(label, rs):
                    if xs:
                        ax.plot(xs, ys, marker="o", label=lab)
            ax.set_xscale("log", base=2)
            if logy and ax.lines:
                ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.set_ylabel(ylabel_of(suite))
            ax.set_title(suite)
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
        fig.suptitle(title)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def thr(label, rs):
        key = "tflops" if rs[0]["tflops"] is not None else "gbps"
        return [(label, [r["T"] for r in rs if r[key] is not None], [r[key] for r in rs if r[key] is not None])]

    def spd(label, rs):
        out = []
        for b in sorted({b for r in rs for b in (r.get("speedup") or {})}):
            pts = [(r["T"], r["speedup"][b]) for r in rs if b in (r.get("speedup") or {})]
            out.append((f"{label} vs {b}", [p[0] for p in pts], [p[1] for p in pts]))
        return out

    def roof(label, rs):
        pts = [(r["T"], 100 * r["roofline_frac"]) for r in rs if r["roofline_frac"] is not None]
        return [(label, [p[0] for p in pts], [p[1] for p in pts])]

    figure("throughput.png", lambda s: "TFLOP/s" if s in ("grouped_gemm", "layer") else "GB/s", thr,
           "moe_ext throughput")
    figure("speedup.png", lambda s: "speedup (x)", spd, "moe_ext speedup over baselines (>1: moe_ext faster)",
           logy=True)
    figure("roofline.png", lambda s: "% of roofline", roof,
           "moe_ext share of the roofline (measured dense GEMM FLOP/s and copy bandwidth)")
    return written
