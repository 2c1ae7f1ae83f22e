"""Does a C++ compiler build shared libraries that work inside a process that has loaded torch?

A compiler that links its own copy of libstdc++ into each shared library breaks the extension's
iostreams once torch's libstdc++.so is in the process: formatting an integer segfaults (or, with
`g++ -static-libstdc++`, prints the wrong digits). Every error message that names a shape or an id
went through that path, so bad input crashed the interpreter instead of raising. This was found on a
GPU image whose CXX=/opt/gcc/bin/g++ links that way, while its /usr/bin/g++ is fine
(bench/results/2026-11-27-h100-80gb-hbm3-07199618c6/toolchain_diag.txt).

The probe compiles a ten-line shared library with the compiler, loads it into a fresh interpreter
after `import torch` and formats an integer with it. setup.py runs it on the C++ compiler CMake would use
and on nvcc's host compiler, and when one fails, builds with the first compiler on the machine that
passes (saying so). After the build, check_module() loads the module itself next to torch and has it
raise an error that formats a shape: on the GPU image the probe passed /usr/bin/g++ for the C++ code,
but CUDAHOSTCXX still named the /opt/gcc g++, whose library directories reached the link line, and the
module crashed exactly there (bench/results/2026-11-27-h100-80gb-hbm3-951fc6ad3d.json).

    python scripts/cxx_probe.py [CXX ...]   # each compiler's verdict (default: $CXX, c++, g++);
                                            # exit status 1 if any of them fails
"""
import os
import shutil
import subprocess
import sys
import tempfile

_SOURCE = r"""
#include <cstring>
#include <sstream>
#include <string>
extern "C" int moe_ext_probe(long value, char* out, int n) {
  std::ostringstream os;
  os << "moe" << value;
  const std::string s = os.str();
  std::strncpy(out, s.c_str(), n - 1);
  out[n - 1] = '\0';
  return static_cast<int>(s.size());
}
"""

_RUNNER = r"""
import ctypes, sys
import torch  # noqa: F401  (its libstdc++ must be in the process first, as when moe_ext is imported)
lib = ctypes.CDLL(sys.argv[1])
buf = ctypes.create_string_buffer(64)
lib.moe_ext_probe(ctypes.c_long(4096), buf, 64)
print(buf.value.decode(errors="replace"))
"""

_EXPECTED = "moe4096"


_verdicts = {}  # (resolved compiler, python) -> probe's answer: each compiler is built with once


def probe(cxx, python=sys.executable, timeout=180):
    """(ok, detail): ok is True when a library built by `cxx` formats an integer correctly in a process
    that has imported torch, False when it crashes or formats it wrong, None when the probe could not
    build its library (the compiler's own problem, which CMake will report)."""
    key = (os.path.realpath(shutil.which(cxx) or cxx), python)
    if key not in _verdicts:
        _verdicts[key] = _probe(cxx, python, timeout)
    return _verdicts[key]


def _probe(cxx, python, timeout):
    with tempfile.TemporaryDirectory(prefix="moe_ext_cxx_probe_") as tmp:
        src, lib = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            f.write(_SOURCE)
        try:
            r = subprocess.run([cxx, "-std=c++17", "-O2", "-shared", "-fPIC", src, "-o", lib],
                               capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"could not run {cxx}: {e}"
        if r.returncode != 0:
            return None, f"{cxx} could not build the probe library: {r.stderr.strip()[-500:]}"
        kind, got = _run_python(python, _RUNNER, lib, timeout)
        if kind == "hung":
            return False, f"a library built by {cxx} hung while formatting an integer next to torch"
        if kind == "crashed":
            return False, (f"a library built by {cxx} crashed ({got}) formatting an integer "
                           "in a process that has loaded torch")
        if kind == "failed":
            return None, f"the probe could not run: {got[-500:]}"
        if got != _EXPECTED:
            return False, (f"a library built by {cxx} formatted the integer 4096 as {got!r} (expected "
                           f"{_EXPECTED!r}) in a process that has loaded torch")
        return True, f"{cxx}: ok"


# Loads a freshly built moe_ext._C next to torch and has it raise an error that formats integers.
_MODULE_RUNNER = r"""
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("moe_ext._C", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
try:
    torch.ops.moe_ext.gated_activation(torch.randn(3, 5))
except RuntimeError as e:
    print(str(e).splitlines()[0])
"""


def check_module(path, python=sys.executable, timeout=300):
    """(ok, detail) for a built moe_ext._C at `path`: loaded into a fresh interpreter after torch, it must
    raise an error message that formats the shape [3, 5]. The compiler probe alone missed the GPU image's
    case (nvcc's host compiler brought its own libstdc++ onto the link line); this checks the module
    that was actually built."""
    kind, got = _run_python(python, _MODULE_RUNNER, path, timeout)
    if kind == "hung":
        return False, f"the built extension {path} hung raising an error that names a shape"
    if kind == "crashed":
        return False, (f"the built extension {path} crashed ({got}) raising an error that names a shape ([3, 5]) "
                       "next to torch")
    if kind == "failed":
        return False, f"the built extension {path} failed to load: {got[-800:]}"
    if "[3, 5]" not in got:
        return False, (f"the built extension {path} formatted the shape [3, 5] as {got!r} in an error message "
                       "next to torch")
    return True, "the built module formats its error messages correctly"


def _run_python(python, code, arg, timeout):
    """Run `python -c code arg`: ("ok", stdout), ("crashed", "signal N"), ("failed", stderr) or ("hung", "")."""
    try:
        r = subprocess.run([python, "-c", code, arg], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hung", ""
    if r.returncode < 0:
        return "crashed", f"signal {-r.returncode}"
    if r.returncode != 0:
        return "failed", r.stderr.strip()
    return "ok", r.stdout.strip()


def default_compiler():
    """The compiler CMake picks when none is named: $CXX, else c++, else g++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def default_cuda_host():
    """The compiler nvcc builds the host half of .cu files with when CMake names none: $CUDAHOSTCXX,
    else the g++ on the PATH. CMake also puts that compiler's library directories on the link line, so a
    bad one here breaks the extension even when the C++ compiler is fine: on the GPU image CUDAHOSTCXX
    named the same /opt/gcc g++ as CXX (bench/results/2026-11-27-h100-80gb-hbm3-951fc6ad3d)."""
    return os.environ.get("CUDAHOSTCXX") or shutil.which("g++")


def alternatives():
    """Other compilers to try, in order, without duplicates (by resolved path)."""
    names = [shutil.which("g++"), shutil.which("c++"), "/usr/bin/g++", "/usr/bin/c++"]
    out, seen = [], set()
    for n in names:
        if n and os.path.isfile(n) and os.access(n, os.X_OK):
            real = os.path.realpath(n)
            if real not in seen:
                seen.add(real)
                out.append(n)
    return out


def choose(requested, python=sys.executable, candidates=None, role="CXX"):
    """(compiler, message). The requested compiler when it passes (or cannot be probed); else the first
    candidate that passes, with a message saying why it was switched. Raises RuntimeError when the
    requested compiler fails and no candidate passes. `role` names the variable that picks it (CXX, or
    CUDAHOSTCXX for nvcc's host compiler)."""
    ok, detail = probe(requested, python)
    if ok is not False:
        return requested, detail
    tried = [detail]
    failed = os.path.realpath(shutil.which(requested) or requested)
    for alt in alternatives() if candidates is None else candidates:
        if os.path.realpath(alt) == failed:
            continue
        alt_ok, alt_detail = probe(alt, python)
        if alt_ok:
            what = "nvcc's host compiler" if role == "CUDAHOSTCXX" else "C++ compiler"
            return alt, (f"moe_ext: not building with {requested} ({what}): {detail}. Building with {alt} "
                         f"instead, which passes. (Set {role} to choose another compiler; MOE_EXT_CXX_PROBE=0 "
                         "skips this check.)")
        tried.append(alt_detail)
    raise RuntimeError(
        "moe_ext: no usable C++ compiler: " + "; ".join(tried)
        + ". A compiler that links its own copy of libstdc++ into shared libraries builds an extension that "
        f"crashes when it formats an error message. Set {role} to a compiler that links libstdc++ dynamically "
        "(the system g++ usually does), or MOE_EXT_CXX_PROBE=0 to build anyway.")


def main(argv):
    compilers = argv or [c for c in [default_compiler()] if c] + alternatives()
    bad = False
    for cxx in dict.fromkeys(compilers):
        ok, detail = probe(cxx)
        print(("PASS " if ok else "FAIL " if ok is False else "UNKNOWN ") + detail)
        bad |= ok is False
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
