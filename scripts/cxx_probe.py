"""Does a C++ compiler build shared libraries that work inside a process that has loaded torch?

A compiler that links its own copy of libstdc++ into each shared library breaks the extension's
iostreams once torch's libstdc++.so is in the process: formatting an integer segfaults (or, with
`g++ -static-libstdc++`, prints the wrong digits). Every error message that names a shape or an id
went through that path, so bad input crashed the interpreter instead of raising. This was found on a
GPU image whose CXX=/opt/gcc/bin/g++ links that way, while its /usr/bin/g++ is fine
(bench/results/2026-11-27-h100-80gb-hbm3-07199618c6/toolchain_diag.txt).

The probe compiles a ten-line shared library with the compiler, loads it into a fresh interpreter
after `import torch` and formats an integer with it. setup.py runs it on the compiler CMake would use
and, when that one fails, builds with the first compiler on the machine that passes (saying so).

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


def probe(cxx, python=sys.executable, timeout=180):
    """(ok, detail): ok is True when a library built by `cxx` formats an integer correctly in a process
    that has imported torch, False when it crashes or formats it wrong, None when the probe could not
    build its library (the compiler's own problem, which CMake will report)."""
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
        try:
            r = subprocess.run([python, "-c", _RUNNER, lib], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"a library built by {cxx} hung while formatting an integer next to torch"
        if r.returncode < 0:
            return False, (f"a library built by {cxx} crashed (signal {-r.returncode}) formatting an integer "
                           "in a process that has loaded torch")
        if r.returncode != 0:
            return None, f"the probe could not run: {r.stderr.strip()[-500:]}"
        got = r.stdout.strip()
        if got != _EXPECTED:
            return False, (f"a library built by {cxx} formatted the integer 4096 as {got!r} (expected "
                           f"{_EXPECTED!r}) in a process that has loaded torch")
        return True, f"{cxx}: ok"


def default_compiler():
    """The compiler CMake picks when none is named: $CXX, else c++, else g++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


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


def choose(requested, python=sys.executable, candidates=None):
    """(compiler, message). The requested compiler when it passes (or cannot be probed); else the first
    candidate that passes, with a message saying why it was switched. Raises RuntimeError when the
    requested compiler fails and no candidate passes."""
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
            return alt, (f"moe_ext: not building with {requested}: {detail}. Building with {alt} instead, "
                         f"which passes. (Set CXX to choose another compiler; MOE_EXT_CXX_PROBE=0 skips this check.)")
        tried.append(alt_detail)
    raise RuntimeError(
        "moe_ext: no usable C++ compiler: " + "; ".join(tried)
        + ". A compiler that links its own copy of libstdc++ into shared libraries builds an extension that "
        "crashes when it formats an error message. Set CXX to a compiler that links libstdc++ dynamically "
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
