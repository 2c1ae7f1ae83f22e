"""Builds csrc/cuda's handwritten kernels for the CPU emulation of CUDA (emu.h) into one shared library.

Each .cu file is rewritten into host C++ (the rewrite is small and mechanical, so a kernel runs here
as written):
  - `kernel<<<grid, block, smem, stream>>>(args)` becomes `::emu::launch("kernel", LB, grid, block,
    smem, stream, kernel, args)`, LB being the kernel's __launch_bounds__ (else 1024);
  - `__shared__ T name[N]...;` becomes a static array that the first thread of each block to reach
    it fills with poison (emu::shared_decl);
  - `extern __shared__ T name[];` becomes a pointer to the launch's dynamic shared memory.
The library is rebuilt when any input changes (a hash of the sources and flags names it), under a
file lock so that parallel test workers build it once.

    python tests/emu/emu_build.py        # prints the library's path
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
# csrc/cuda/... files: every handwritten kernel (not the CUTLASS instantiations)
KERNELS = ["topk_gating.cu", "topk_gating_backward.cu", "permute.cu", "unpermute.cu", "activation.cu",
           "capacity.cu", "gemm/grouped_gemm_aux.cu"]
CXX = os.environ.get("EMU_CXX", "g++")
# No contraction into FMA, as nvcc's --fmad=false and the CPU kernels' own build (docs/kernels.md).
FLAGS = ["-std=c++20", "-O1", "-g0", "-fPIC", "-ffp-contract=off", "-D__CUDA_ARCH__=900", "-fno-strict-aliasing",
         "-Wno-attributes", "-Wno-unused-variable", "-Wno-unused-function"]


def _balanced(text: str, i: int) -> int:
    """Index just past the parenthesis that closes the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "(":
            depth += 1
        elif text[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError(f"unbalanced ( at {i}")


def _split_top(args: str) -> list[str]:
    """Splits a launch configuration at its top-level commas."""
    parts, depth, cur = [], 0, ""
    for ch in args:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def launch_bounds(src: str) -> dict[str, str]:
    """Kernel name -> the thread bound of its __launch_bounds__."""
    out = {}
    for m in re.finditer(r"__launch_bounds__\s*\(", src):
        end = _balanced(src, m.end() - 1)
        bound = _split_top(src[m.end():end - 1])[0]
        name = re.match(r"\s*(\w+)\s*\(", src[end:])
        if name is None:
            raise ValueError(f"no kernel name after __launch_bounds__ at {m.start()}")
        out[name.group(1)] = bound
    return out


def rewrite(src: str, path: Path) -> str:
    bounds = launch_bounds(src)
    out, pos = [], 0
    for m in re.finditer(r"<<<", src):
        if m.start() < pos:
            continue
        # the kernel expression before <<<: a name, with template arguments if any
        head = src[:m.start()]
        j = len(head)
        if head.endswith(">"):
            depth = 0
            while True:
                j -= 1
                if head[j] == ">":
                    depth += 1
                elif head[j] == "<":
                    depth -= 1
                    if depth == 0:
                        break
        name_m = re.search(r"(\w+)\s*$", head[:j])
        kernel_start = name_m.start(1)
        name = name_m.group(1)
        kernel = src[kernel_start:m.start()]
        cfg_end = src.index(">>>", m.end())
        cfg = _split_top(src[m.end():cfg_end])
        while len(cfg) < 4:
            cfg.append("0" if len(cfg) == 2 else "nullptr")
        call = re.match(r"\s*\(", src[cfg_end + 3:])
        if call is None:
            raise ValueError(f"{path.name}: no argument list after launch of {name}")
        args_open = cfg_end + 3 + call.end() - 1
        args_close = _balanced(src, args_open)
        args = src[args_open + 1:args_close - 1].strip()
        bound = bounds.get(name, "1024")
        new = (f'::emu::launch("{name}", int({bound}), {cfg[0]}, {cfg[1]}, size_t({cfg[2]}), {cfg[3]}, '
               f'[](auto... emu_a) {{ {kernel}(emu_a...); }}' + (f", {args})" if args else ")"))
        out.append(src[pos:kernel_start])
        out.append(new)
        pos = args_close
    out.append(src[pos:])
    text = "".join(out)
    text = re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<> ]+?)\s+(\w+)\s*\[\s*\]\s*;",
                  r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_smem());", text)
    text = re.sub(r"__shared__\s+([\w:<> ]+?)\s+(\w+)((?:\s*\[[^\]]+\])+)\s*;",
                  r"static \1 \2\3; ::emu::shared_decl(\2, sizeof(\2));", text)
    leftover = [w for w in ("__shared__", "<<<") if w in text]
    if leftover:
        raise ValueError(f"{path.name}: could not rewrite {leftover}")
    return f'#line 1 "{path}"\n' + text


def _digest() -> str:
    h = hashlib.sha256()
    h.update(" ".join([CXX] + FLAGS).encode())
    files = sorted([CSRC / "cuda" / name for name in KERNELS] + list((CSRC / "cuda").rglob("*.cuh")) +
                   list((CSRC / "cuda").rglob("*.h")) + list((CSRC / "common").glob("*.h")) +
                   [p for p in HERE.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".py")])
    for p in files:
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build(out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or os.environ.get("EMU_BUILD_DIR", ROOT / "build" / "emu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"libmoe_emu-{_digest()}.so"
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return lib
        work = Path(tempfile.mkdtemp(prefix="emu-", dir=out_dir))
        includes = [f"-I{HERE / 'include'}", f"-I{HERE}", f"-I{CSRC / 'cuda'}", f"-I{CSRC}"]
        jobs = []
        for path in [CSRC / "cuda" / name for name in KERNELS] + [HERE / "selftest.cu"]:
            cpp = work / (path.name + ".cpp")
            cpp.write_text(rewrite(path.read_text(), path))
            own = f"-I{path.parent}"  # the file's own "..." includes, as from its place in csrc
            jobs.append(([CXX, *FLAGS, own, *includes, "-c", str(cpp), "-o", str(cpp) + ".o"], str(cpp) + ".o"))
        for src in ("emu.cpp", "harness.cpp"):
            flags = [f for f in FLAGS if f != "-D__CUDA_ARCH__=900"]
            jobs.append(([CXX, *flags, *includes, "-c", str(HERE / src), "-o", str(work / (src + ".o"))],
                         str(work / (src + ".o"))))

        def run(job):
            r = subprocess.run(job[0], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"emulation build failed: {' '.join(job[0])}\n{r.stderr[-6000:]}")
            return job[1]

        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            objs = list(pool.map(run, jobs))
        tmp = work / "lib.so"
        r = subprocess.run([CXX, "-shared", "-o", str(tmp), *objs], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulation link failed:\n{r.stderr[-4000:]}")
        os.replace(tmp, lib)
        shutil.rmtree(work, ignore_errors=True)
        for old in out_dir.glob("libmoe_emu-*.so"):  # builds of earlier sources
            if old != lib:
                old.unlink(missing_ok=True)
        return lib


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
