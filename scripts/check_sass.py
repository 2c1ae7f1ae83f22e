#!/usr/bin/env python3
"""Static checks of the CUDA kernels in the built extension (no GPU needed).

    python scripts/check_sass.py [path/to/_C*.so] [--markdown | --families] [--cuobjdump PATH]

For every moe_ext kernel (a function whose mangled name is in namespace moe_ext) and every SASS arch
in the binary, `cuobjdump --dump-resource-usage` must report no local memory and no stack frame
(spills, or arrays indexed at run time, would show up there). It prints registers per kernel
(--markdown: a markdown table of every instantiation; --families: min-max per kernel family over
its dtypes, the table in docs/kernels.md) and exits non-zero on any failure.

Instruction requirements: REQUIRED_SASS lists (kernel-name regex, arch regex, instruction regexes):
every matching kernel's SASS must contain each instruction (e.g. HGMMA for the sm_90a grouped GEMM).
Add rows there; LOCAL_MEMORY_EXEMPT lists kernels allowed to use local memory (with a reason).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (kernel-name regex on the demangled name, arch regex, [instruction regexes]) -- all must appear.
REQUIRED_SASS: list[tuple[str, str, list[str]]] = [
    # e.g. (r"grouped_gemm", r"sm_90a", [r"\bHGMMA\b"]), (r"grouped_gemm", r"sm_80", [r"\bHMMA\b"]),
]

# kernel-name regex -> why it may use local memory
LOCAL_MEMORY_EXEMPT: dict[str, str] = {}

OUR_KERNEL = re.compile(r"moe_ext")


def find_cuobjdump(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        import triton  # its wheel ships cuobjdump

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    for p in (shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if p and os.path.exists(p):
            return p
    sys.exit("check_sass: cuobjdump not found (pass --cuobjdump)")


def find_so(explicit: str | None) -> str:
    if explicit:
        return explicit
    hits = sorted(glob.glob(os.path.join(ROOT, "moe_ext", "_C*.so")), key=os.path.getmtime)
    if not hits:
        sys.exit("check_sass: no moe_ext/_C*.so: build first")
    return hits[-1]


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def resource_usage(cuobjdump: str, so: str) -> list[dict]:
    """Rows {arch, mangled, reg, stack, local, shared} from --dump-resource-usage."""
    text = subprocess.run([cuobjdump, "--dump-resource-usage", so], capture_output=True, text=True, check=True).stdout
    rows, arch = [], "?"
    pending = None
    for line in text.splitlines():
        m = re.search(r"arch\s*=\s*(sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function\s+(\S+):\s*$", line)
        if m:
            pending = m.group(1)
            continue
        m = re.match(r"\s*Function\s+(\S+):\s*(REG:.*)$", line)  # name and usage on one line
        if m:
            pending, line = m.group(1), m.group(2)
        if pending and "REG:" in line:
            vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows.append(dict(arch=arch, mangled=pending, reg=int(vals.get("REG", 0)),
                             stack=int(vals.get("STACK", 0)), local=int(vals.get("LOCAL", 0)),
                             shared=int(vals.get("SHARED", 0))))
            pending = None
    return rows


def sass_of(cuobjdump: str, so: str, arch: str, mangled: str) -> str:
    return subprocess.run([cuobjdump, "--dump-sass", "--gpu-architecture", arch, "--function", mangled, so],
                          capture_output=True, text=True).stdout


def short_name(demangled: str) -> str:
    """Kernel name plus template arguments, without namespaces and parameter lists."""
    name = re.sub(r"\(anonymous namespace\)::", "", demangled)
    name = re.sub(r"moe_ext::cuda::", "", name)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the trailing parameter list
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    return re.sub(r"^void ", "", name)


def family(name: str) -> str:
    """A kernel's row in the docs table: the name, plus NPL when the first template argument is an
    integer (values per lane), or scalar/vector when the last one is (elements per access)."""
    name = re.sub(r"^moe_ext::", "", name)
    m = re.match(r"([\w:]+)<(.*)>$", name)
    if not m:
        return name
    args = [a.strip() for a in m.group(2).split(",")]
    if re.fullmatch(r"\d+", args[0]):
        return f"{m.group(1)}<NPL={args[0]}>"
    if len(args) > 1 and re.fullmatch(r"\d+", args[-1]):
        return f"{m.group(1)}<{'scalar' if args[-1] == '1' else 'vector'}>"
    return m.group(1)


def span(vals: list[int]) -> str:
    return str(min(vals)) if min(vals) == max(vals) else f"{min(vals)}-{max(vals)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("so", nargs="?")
    ap.add_argument("--cuobjdump")
    ap.add_argument("--markdown", action="store_true", help="print the register table as markdown")
    ap.add_argument("--families", action="store_true", help="print registers per kernel family (docs/kernels.md)")
    args = ap.parse_args()
    cuobjdump, so = find_cuobjdump(args.cuobjdump), find_so(args.so)
    rows = [r for r in resource_usage(cuobjdump, so) if OUR_KERNEL.search(r["mangled"])]
    if not rows:
        print(f"check_sass: no moe_ext kernels in {so} (a CPU-only build?)")
        return 1
    names = demangle(sorted({r["mangled"] for r in rows}))
    failures = []
    for r in rows:
        r["name"] = short_name(names[r["mangled"]])
        if r["local"] or r["stack"]:
            exempt = [p for p in LOCAL_MEMORY_EXEMPT if re.search(p, r["name"])]
            if not exempt:
                failures.append(f"{r['arch']} {r['name']}: LOCAL:{r['local']} STACK:{r['stack']} (local memory)")
    for kpat, apat, instrs in REQUIRED_SASS:
        matched = [r for r in rows if re.search(kpat, r["name"]) and re.search(apat, r["arch"])]
        if not matched:
            failures.append(f"no kernel matches /{kpat}/ on /{apat}/ (REQUIRED_SASS)")
        for r in matched:
            sass = sass_of(cuobjdump, so, r["arch"], r["mangled"])
            for ins in instrs:
                if not re.search(ins, sass):
                    failures.append(f"{r['arch']} {r['name']}: missing /{ins}/ in SASS")

    archs = sorted({r["arch"] for r in rows})
    table: dict[str, dict[str, dict]] = {}
    for r in rows:
        table.setdefault(r["name"], {})[r["arch"]] = r
    if args.markdown:
        print("| kernel | " + " | ".join(f"{a} regs / local / smem" for a in archs) + " |")
        print("|---|" + "---|" * len(archs))
        for name in sorted(table):
            cells = []
            for a in archs:
                r = table[name].get(a)
                cells.append(f"{r['reg']} / {r['local'] + r['stack']} / {r['shared']}" if r else "-")
            print(f"| `{name}` | " + " | ".join(cells) + " |")
    elif args.families:
        fam: dict[str, dict[str, list[dict]]] = {}
        for r in rows:
            fam.setdefault(family(r["name"]), {}).setdefault(r["arch"], []).append(r)
        print("| kernel (all dtypes) | " + " | ".join(f"{a} regs" for a in archs) + " | local/stack bytes |")
        print("|---|" + "---|" * (len(archs) + 1))
        for name in sorted(fam):
            regs = [span([r["reg"] for r in fam[name][a]]) if a in fam[name] else "-" for a in archs]
            local = max(r["local"] + r["stack"] for a in fam[name] for r in fam[name][a])
            print(f"| `{name}` | " + " | ".join(regs) + f" | {local} |")
    else:
        for name in sorted(table):
            cells = "  ".join(f"{a}: reg {table[name][a]['reg']:3d} local {table[name][a]['local'] + table[name][a]['stack']}"
                              if a in table[name] else f"{a}: -" for a in archs)
            print(f"{name:70s} {cells}")
    print(f"check_sass: {len(table)} moe_ext kernels x {len(archs)} archs ({', '.join(archs)}) in {os.path.basename(so)}")
    for f in failures:
        print("FAIL", f)
    print("check_sass: " + ("FAILED" if failures else "OK"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
