#!/usr/bin/env python
"""Static check of the built grouped GEMM kernels (no GPU needed).

On the built moe_ext/_C*.so, with cuobjdump (from the CUDA toolkit, or the copy inside Triton's wheel):
  * every sm_90a CUTLASS 3.x grouped GEMM (GemmUniversal over GroupProblemShape) contains HGMMA (wgmma);
  * every CUTLASS 2.x tensor-op grouped GEMM (GemmGrouped: the sm_8x bf16/fp16 ones, and the TF32 ones
    on sm_8x and sm_90a) contains HMMA (mma.sync), and every SIMT one (exact fp32, warp MmaSimt)
    contains FFMA;
  * each arch's kernel file was compiled for its own arch only (sm80_*.cu -> sm_8x, sm90_*.cu -> sm_90a,
    tf32_*.cu and f32_*.cu -> sm_8x or sm_90a);
  * no moe_ext grouped GEMM function (those, and the helpers in csrc/cuda/gemm) uses local memory
    (`--dump-resource-usage` LOCAL:0, i.e. no register spills, no stack arrays).
Archs that the build has no code for are reported and skipped; the check fails when no grouped GEMM
kernel is found at all, when a kernel lacks its tensor-core instruction, or when one spills.

Usage: python scripts/check_gemm_sass.py [path/to/_C.so]   (exit status 0: pass, 1: fail, 2: cannot run)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Mangled-name markers.
SM90_GEMM = "GroupProblemShape"           # cutlass::gemm::kernel::GemmUniversal<GroupProblemShape<...>, ...>
SM80_GEMM = "GemmGrouped"                 # cutlass::Kernel<cutlass::gemm::kernel::GemmGrouped<...>>
SIMT_WARP = "MmaSimt"                     # cutlass::gemm::warp::MmaSimt<...>: the exact fp32 kernels
OURS = ("moe_ext4gemm", "GroupProblemShape", "GemmGrouped")  # our helpers live in moe_ext::gemm


def find_cuobjdump():
    cands = []
    if os.environ.get("CUOBJDUMP"):
        cands.append(os.environ["CUOBJDUMP"])
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            cands.append(os.path.join(root, "bin", "cuobjdump"))
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except Exception:
        pass
    if shutil.which("cuobjdump"):
        cands.append(shutil.which("cuobjdump"))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def find_module():
    hits = sorted(glob.glob(os.path.join(ROOT, "moe_ext", "_C*.so")))
    return hits[0] if hits else None


def run(cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip()[:500]}")
    return p.stdout


def elf_list(cuobjdump, so):
    """[(source stem, arch)] of the cubins in the module, e.g. ("sm90_bf16_nn", "sm_90a")."""
    out = run([cuobjdump, "--list-elf", so])
    return re.findall(r"ELF file\s+\d+:\s+(\S+?)\.(sm_\d+a?)\.cubin", out)


def sass_functions(cuobjdump, so, arch):
    """{mangled name: SASS text} for one arch."""
    out = run([cuobjdump, "--dump-sass", "--gpu-architecture", arch, so])
    funcs = {}
    for chunk in re.split(r"\n\s*Function : ", "\n" + out)[1:]:
        name, _, body = chunk.partition("\n")
        funcs[name.strip()] = funcs.get(name.strip(), "") + body
    return funcs


def resource_usage(cuobjdump, so, arch):
    """{mangled name: {REG, STACK, SHARED, LOCAL, ...}} for one arch."""
    out = run([cuobjdump, "--dump-resource-usage", "--gpu-architecture", arch, so])
    res, name = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            res[name] = {k: int(v) for k, v in re.findall(r"([A-Z_]+):(\d+)", line)}
            name = None
    return res


def short(name, n=110):
    return name if len(name) <= n else name[:n] + "..."


def main(argv):
    so = argv[1] if len(argv) > 1 else find_module()
    if not so or not os.path.isfile(so):
        print("check_gemm_sass: no built moe_ext/_C*.so (build with MOE_EXT_CUDA=1 first)")
        return 2
    cuobjdump = find_cuobjdump()
    if not cuobjdump:
        print("check_gemm_sass: cuobjdump not found (set CUOBJDUMP, CUDA_HOME, or install triton)")
        return 2
    elfs = elf_list(cuobjdump, so)
    archs = sorted({a for _, a in elfs})
    print(f"module: {so}\ncuobjdump: {cuobjdump}\nSASS archs in module: {archs or 'none'}")
    failures, found = [], 0
    for stem, arch in elfs:  # per-file arch: no kernel compiled for an arch it cannot use
        if ((stem.startswith("sm80_") and not arch.startswith("sm_8")) or (stem.startswith("sm90_") and arch != "sm_90a")
                or (stem.startswith(("tf32_", "f32_")) and not (arch.startswith("sm_8") or arch == "sm_90a"))):
            failures.append(f"{stem} was compiled for {arch} (expected only its own arch)")
    gemm_files = sorted(f"{s_}:{a}" for s_, a in elfs if s_.startswith(("sm80_", "sm90_", "tf32_", "f32_")))
    print(f"grouped GEMM cubins: {', '.join(gemm_files) or 'none'}")
    for arch in archs:
        funcs = sass_functions(cuobjdump, so, arch)
        usage = resource_usage(cuobjdump, so, arch)
        kinds = []  # (marker, instruction)
        if arch.startswith("sm_9"):
            kinds.append((SM90_GEMM, "HGMMA"))
        if arch.startswith("sm_8") or arch == "sm_90a":
            kinds.append((SM80_GEMM, "HMMA"))
        gemms = [(f, "FFMA" if instr == "HMMA" and SIMT_WARP in f else instr)
                 for marker, instr in kinds for f in funcs if marker in f]
        found += len(gemms)
        expect = " or ".join(f"{i} in {m}" for m, i in kinds) or "-"
        if any(SIMT_WARP in f for f, _ in gemms):
            expect += f" (FFMA in the {SIMT_WARP} ones)"
        print(f"\n[{arch}] {len(gemms)} grouped GEMM kernel(s), expect {expect}")
        for f, instr in gemms:
            n = len(re.findall(r"\b" + instr + r"\b", funcs[f]))
            u = usage.get(f, {})
            ok = n > 0
            print(f"  {'ok  ' if ok else 'FAIL'} {instr} x{n:<5} REG:{u.get('REG', '?'):<4} LOCAL:{u.get('LOCAL', '?'):<4} "
                  f"SHARED:{u.get('SHARED', '?'):<6} {short(f)}")
            if not ok:
                failures.append(f"{arch}: no {instr} in {short(f)}")
        # Spills: any of our functions with local memory.
        ours = [f for f in usage if any(k in f for k in OURS)]
        spilled = [f for f in ours if usage[f].get("LOCAL", 0) > 0]
        print(f"  local memory: {len(ours)} moe_ext grouped GEMM function(s) checked, {len(spilled)} with LOCAL > 0")
        for f in spilled:
            failures.append(f"{arch}: LOCAL:{usage[f]['LOCAL']} (spills) in {short(f)}")
    if found == 0:
        failures.append("no grouped GEMM kernel in the module (was it built with CUTLASS and an sm_80/sm_90a arch?)")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nPASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
