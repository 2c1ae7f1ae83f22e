"""Write the GPU check's results file and print its short summary table (last in the log).

    python scripts/gpu_results.py --junit OUT/junit.xml [--junit-all OUT/junit_all.xml]
        [--bench BENCH/results.json] [--sanitizer memcheck=OUT/memcheck.log ...] [--steps OUT/steps.tsv]
        [--results-dir bench/results] [--copy-to OUT]

The file, bench/results/<date>-<gpu>-<short commit>.json, holds: device (the name torch reports),
commit (the full hash), date, torch and CUDA versions, tests {passed, failed, skipped, errors},
sanitizer findings per tool (error count, first lines), the steps of the check and the benchmark rows.
Every input may be missing (a step that failed or never ran): the file says so instead.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_junit(path):
    """{passed, failed, skipped, errors, total, seconds, failures: [first names], slowest: [[name, s]]}
    from a pytest junit xml, or a dict with "missing"/"unreadable" when the file is absent or broken.
    The slowest tests size the next run's time boxes."""
    if not path or not os.path.exists(path):
        return {"status": "missing", "passed": 0, "failed": 0, "skipped": 0, "errors": 0, "total": 0}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"status": f"unreadable: {e}", "passed": 0, "failed": 0, "skipped": 0, "errors": 0, "total": 0}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    names, times = [], []
    for s in suites:
        for key in n:
            n[key] += int(s.get(key, 0) or 0)
        for case in s.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("failure") is not None or case.find("error") is not None:
                names.append(name)
            try:
                times.append((float(case.get("time", 0) or 0), name))
            except ValueError:
                pass
    times.sort(reverse=True)
    return {"status": "ok", "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
            "failed": n["failures"], "errors": n["errors"], "skipped": n["skipped"], "total": n["tests"],
            "seconds": round(sum(t for t, _ in times), 1), "failures": names[:20],
            "slowest": [[name, round(t, 2)] for t, name in times[:10]]}


# racecheck: "RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)": only errors count.
SUMMARY = {"memcheck": r"ERROR SUMMARY:\s*(\d+)\s+error",
           "racecheck": r"RACECHECK SUMMARY:\s*\d+\s+hazards?\s+displayed\s*\((\d+)\s+error",
           "initcheck": r"ERROR SUMMARY:\s*(\d+)\s+error", "synccheck": r"ERROR SUMMARY:\s*(\d+)\s+error"}
NOISE = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "Program hit", "=========     ")


DONE = "SANITIZE-DONE"  # gpu_check.sh's last line of a sanitizer run that was not cut short


def parse_sanitizer(tool, path):
    """{status, errors, first_lines} from a compute-sanitizer log: status is clean, errors,
    unsupported (the device refused the tool), incomplete (no SANITIZE-DONE line: cut short, so a clean
    summary of its first half proves nothing), no_summary (crashed before any summary) or not_run."""
    if not path or not os.path.exists(path):
        return {"status": "not_run", "errors": None, "first_lines": []}
    with open(path, errors="replace") as f:
        text = f.read()
    counts = [int(m) for m in re.findall(SUMMARY.get(tool, SUMMARY["memcheck"]), text)]
    lines = [ln.rstrip() for ln in text.splitlines() if ln.startswith("=========") and
             not any(s in ln for s in NOISE) and ln.strip("= ").strip()]
    if "Device not supported" in text or "not supported on this" in text:
        status = "unsupported"
    elif counts and sum(counts) > 0:
        status = "errors"
    elif DONE not in text:
        status = "incomplete"
    elif not counts:
        status = "no_summary"
    else:
        status = "clean"
    return {"status": status, "errors": sum(counts) if counts else None, "runs": len(counts), "first_lines": lines[:12]}


def parse_steps(path):
    steps = []
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    steps.append({"name": parts[0], "rc": int(parts[1]) if parts[1].lstrip("-").isdigit() else parts[1],
                                  "seconds": int(parts[2]) if parts[2].isdigit() else parts[2],
                                  "status": parts[3] if len(parts) > 3 else ""})
    return steps


def git(*args):
    try:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def slug(name):
    s = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return s or "unknown"


def torch_info(ask_device=True):
    """Versions, and the device name only when asked: after a hung kernel, touching the GPU again could
    hang this last step too (gpu_check.sh passes the name it read at the start)."""
    try:
        import torch
        return {"torch": torch.__version__, "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name() if ask_device and torch.cuda.is_available() else None}
    except Exception:
        return {"torch": None, "cuda": None, "device": None}


def build(args):
    bench = None
    if args.bench and os.path.exists(args.bench):
        try:
            with open(args.bench) as f:
                bench = json.load(f)
        except ValueError as e:
            bench = {"error": f"unreadable: {e}"}
    ti = torch_info(ask_device=not args.device)
    device = args.device or (bench or {}).get("device") or ti["device"] or "unknown"
    commit = args.commit or git("rev-parse", "HEAD") or (bench or {}).get("commit") or "unknown"
    if args.dirty is not None:
        dirty = args.dirty == "1"
    else:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit != "unknown" else None
    bver = (bench or {}).get("versions", {})
    doc = {
        "schema": 1,
        "device": device,
        "commit": commit,
        "dirty": dirty,
        "date": args.date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": ti["torch"] or bver.get("torch"),
        "cuda": ti["cuda"] or bver.get("cuda"),
        "driver": bver.get("driver"),
        "build": bver.get("moe_ext"),
        "tests": parse_junit(args.junit),
        "tests_all": parse_junit(args.junit_all) if args.junit_all else None,
        "sanitizer": {t: parse_sanitizer(t, p) for t, p in (s.split("=", 1) for s in args.sanitizer)},
        "steps": parse_steps(args.steps),
        "bench": {"status": "missing" if bench is None else ("unreadable" if "rows" not in bench else
                                                              ("incomplete" if bench.get("complete") is False else "ok")),
                  "ceilings": (bench or {}).get("ceilings"), "config": (bench or {}).get("config"),
                  "rows": (bench or {}).get("rows", [])},
    }
    unsupported = {t for t, v in doc["sanitizer"].items() if v["status"] == "unsupported"}  # e.g. gVisor machines
    # "incomplete": an optional step (gpu_check.sh) ran out of time; what it did finish still counts.
    cut_short = {s["name"] for s in doc["steps"] if s["rc"] == "incomplete"}
    failed_steps = [s["name"] for s in doc["steps"] if s["rc"] not in (0, "0", "skipped", "missing", "incomplete")
                    and s["name"] not in unsupported]
    doc["ok"] = (not failed_steps and doc["tests"]["status"] == "ok" and doc["tests"]["failed"] == 0
                 and doc["tests"]["errors"] == 0 and doc["bench"]["status"] == "ok"
                 and all(r.get("ok") is not False for r in doc["bench"]["rows"] if r.get("impl") == "moe_ext")
                 and all(s["status"] in ("clean", "unsupported") or (s["status"] == "incomplete" and t in cut_short)
                         for t, s in doc["sanitizer"].items()))
    doc["failed_steps"] = failed_steps
    return doc


def summary(doc, path):
    t = doc["tests"]
    out = [f"GPU check: {doc['device']}  commit {doc['commit'][:12]}{' (dirty)' if doc['dirty'] else ''}  "
           f"torch {doc['torch']} CUDA {doc['cuda']}",
           f"tests (-m cuda): {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"
           + (f" [{t['status']}]" if t["status"] != "ok" else "")]
    if doc["tests_all"]:
        a = doc["tests_all"]
        out.append(f"tests (all):     {a['passed']} passed, {a['failed']} failed, {a['errors']} errors, "
                   f"{a['skipped']} skipped" + (f" [{a['status']}]" if a["status"] != "ok" else ""))
    for name in (t.get("failures") or [])[:5]:
        out.append(f"  FAILED {name}")
    if t.get("slowest"):
        out.append(f"  test time {t['seconds']} s; slowest: " + ", ".join(f"{n.split('::')[-1]} {s}s"
                                                                       for n, s in t["slowest"][:3]))
    for tool, s in doc["sanitizer"].items():
        out.append(f"sanitizer {tool}: {s['status']}" + (f", {s['errors']} errors" if s["errors"] else "")
                   + ("".join(f"\n    {ln}" for ln in s["first_lines"][:3]) if s["status"] == "errors" else ""))
    out.append("steps: " + ", ".join(f"{s['name']}={s['status'] or s['rc']}({s['seconds']}s)" for s in doc["steps"]))
    rows = [r for r in doc["bench"]["rows"] if r.get("impl") == "moe_ext"]
    if rows:
        out.append(f"{'bench case':<40} {'ok':<4} {'us':>9} {'TF/s':>7} {'GB/s':>7} {'%roof':>6}  speedup")
        for r in rows:
            sp = " ".join(f"{k}:{v:.2f}" for k, v in (r.get("speedup") or {}).items())
            us, tf, gb, rf = r.get("median_us"), r.get("tflops"), r.get("gbps"), r.get("roofline_frac")
            out.append(f"{(r['suite'] + '/' + r['model'] + ' ' + r['pass'] + ' T=' + str(r['T']) + ' ' + r['routing'][:4]):<40} "
                       f"{'ok' if r.get('ok') else 'BAD':<4} {('%9.1f' % us) if us else '        -'} "
                       f"{('%7.1f' % tf) if tf else '      -'} {('%7.0f' % gb) if gb else '      -'} "
                       f"{('%6.1f' % (100 * rf)) if rf else '     -'}  {sp}")
    else:
        out.append(f"bench: {doc['bench']['status']}, no moe_ext rows")
    out.append(f"RESULT: {'PASS' if doc['ok'] else 'FAIL'}" + (f" (failed steps: {', '.join(doc['failed_steps'])})"
                                                               if doc["failed_steps"] else "") + f"  -> {path}")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--junit")
    p.add_argument("--junit-all")
    p.add_argument("--bench")
    p.add_argument("--sanitizer", action="append", default=[], help="TOOL=LOG, repeatable")
    p.add_argument("--steps")
    p.add_argument("--results-dir", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--copy-to")
    p.add_argument("--device", help="the device name (default: asks torch)")
    p.add_argument("--commit", help="the commit tested (default: git, where .git is there)")
    p.add_argument("--dirty", choices=["0", "1"], help="whether the tree had uncommitted changes (default: git)")
    p.add_argument("--date", help="override the date (tests)")
    args = p.parse_args(argv)
    doc = build(args)
    short = doc["commit"][:10] if doc["commit"] != "unknown" else "nocommit"
    name = f"{doc['date'][:10]}-{slug(doc['device'])}-{short}.json"
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, name)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    if args.copy_to:
        os.makedirs(args.copy_to, exist_ok=True)
        shutil.copy(path, os.path.join(args.copy_to, name))
    print(summary(doc, path))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
