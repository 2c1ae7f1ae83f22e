"""Build moe_ext: setup.py hands the native build to CMakeLists.txt (one build description).

Environment:
  MOE_EXT_CUDA=auto|1|0     build the CUDA kernels (auto: when torch is a CUDA build and nvcc is found)
  TORCH_CUDA_ARCH_LIST      CUDA archs, default "8.0;9.0a"
  MAX_JOBS                  parallel compile jobs (default: all cores)
  MOE_EXT_CUTLASS_DIR       CUTLASS include dir (default: the nvidia-cutlass wheel's headers)
  MOE_EXT_BUILD_DIR         CMake build dir (default: build/cmake-<python>-<torch>; kept for incremental builds)
  DEBUG=1                   -O0 -g
  MOE_EXT_CXX_PROBE=0       skip the toolchain checks. By default the C++ compiler CMake would use ($CXX,
                            else c++) and nvcc's host compiler ($CUDAHOSTCXX, else g++) are each first tried
                            on a small library loaded next to torch (scripts/cxx_probe.py), and one that breaks
                            there (one linking its own libstdc++) is replaced by one that passes; after the
                            build, the new module is loaded next to torch and made to raise an error message
                            that formats integers, and a module that crashes there fails the build
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _cmake_exe():
    try:  # the cmake PyPI package, if installed, is newer than most system cmakes
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        exe = shutil.which("cmake")
        if exe is None:
            raise RuntimeError("moe_ext needs CMake >= 3.22 to build: pip install cmake") from None
        return exe


def _checks_on():
    return os.environ.get("MOE_EXT_CXX_PROBE", "1") != "0"


def _load_probe():
    """scripts/cxx_probe.py as a module, or None (with a warning) when it is missing."""
    import importlib.util

    path = os.path.join(ROOT, "scripts", "cxx_probe.py")
    if not os.path.exists(path):
        print(f"moe_ext: {path} is missing: the C++ compilers are not checked", file=sys.stderr)
        return None
    spec = importlib.util.spec_from_file_location("moe_ext_cxx_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe


def _choose(probe, requested, role):
    """(override, expected) for one compiler: override is the compiler CMake must be told to use instead
    of its own pick (None: CMake picks as usual); expected is the full path of the compiler the build
    will use, when known (an existing build dir configured with another one is reconfigured)."""
    if probe is None or requested is None:
        return None, None  # no check, or no compiler: CMake reports that
    chosen, message = probe.choose(requested, role=role)
    if chosen == requested:
        print(message)
        return None, shutil.which(requested) or requested
    print(message, file=sys.stderr)
    return shutil.which(chosen) or chosen, shutil.which(chosen) or chosen


_COMPILER_ENV = {"CMAKE_CXX_COMPILER": "CXX", "CMAKE_CUDA_HOST_COMPILER": "CUDAHOSTCXX"}  # CMake var -> env var


def _choose_compilers():
    """{CMake variable: (override, expected)} for the C++ compiler and nvcc's host compiler, each checked
    with scripts/cxx_probe.py. Both matter: the host halves of the .cu files are built by the second, and
    CMake puts its library directories on the extension's link line."""
    none = (None, None)
    if not _checks_on():
        return {"CMAKE_CXX_COMPILER": none, "CMAKE_CUDA_HOST_COMPILER": none}
    probe = _load_probe()
    cuda = os.environ.get("MOE_EXT_CUDA", "auto") != "0"
    return {
        "CMAKE_CXX_COMPILER": _choose(probe, probe and probe.default_compiler(), "CXX"),
        "CMAKE_CUDA_HOST_COMPILER": _choose(probe, probe and probe.default_cuda_host(), "CUDAHOSTCXX") if cuda
        else none,
    }


def _check_built_module(path, compilers):
    """Raise RuntimeError when the module just built breaks its error messages next to torch (see
    scripts/cxx_probe.py check_module) instead of letting it be installed."""
    probe = _load_probe() if _checks_on() else None
    if probe is None:
        return
    ok, detail = probe.check_module(path)
    used = ", ".join(f"{k}={v[1] or 'CMake default'}" for k, v in compilers.items())
    if ok:
        print(f"moe_ext: {detail} ({used})")
        return
    raise RuntimeError(
        f"moe_ext: {detail}. Compilers: {used}. A compiler or library directory that brings its own libstdc++ "
        "does this; set CXX and CUDAHOSTCXX to the system g++ (e.g. /usr/bin/g++) and rebuild. "
        "MOE_EXT_CXX_PROBE=0 skips the checks.")


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch  # noqa: F401  (fail early and clearly if torch is missing: use --no-build-isolation)

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
        build_dir = os.environ.get("MOE_EXT_BUILD_DIR") or os.path.join(ROOT, "build", f"cmake-{tag}")
        os.makedirs(build_dir, exist_ok=True)
        cfg = "Debug" if os.environ.get("DEBUG", "0") == "1" else "Release"
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DMOE_EXT_CUDA={os.environ.get('MOE_EXT_CUDA', 'auto')}",
        ]
        try:
            import ninja

            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={os.path.join(ninja.BIN_DIR, 'ninja')}"]
        except ImportError:
            if shutil.which("ninja"):
                args += ["-G", "Ninja"]
        compilers = _choose_compilers()
        env = dict(os.environ)  # an override also replaces its variable, which torch's FindCUDA reads too
        for var, (override, _) in compilers.items():
            if override is not None:
                args.append(f"-D{var}={override}")
                env[_COMPILER_ENV[var]] = override
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if os.path.exists(cache):  # a generator or compiler switch would fail on the old cache
            with open(cache) as f:
                text = f.read()
            stale = ("CMAKE_GENERATOR:INTERNAL=Ninja" in text) != ("Ninja" in args)
            for var, (override, expected) in compilers.items():
                cached = [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith(var + ":")]
                if expected is not None and cached and cached[0]:
                    stale |= os.path.realpath(cached[0]) != os.path.realpath(expected)
                elif override is not None:  # named now, not in the cache: CMake would keep its old pick
                    stale = True
            if stale:
                shutil.rmtree(build_dir)
                os.makedirs(build_dir)
        cmake = _cmake_exe()
        subprocess.run([cmake, "-S", ROOT, "-B", build_dir, *args], check=True, env=env)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", build_dir, "--parallel", jobs], check=True, env=env)
        _check_built_module(os.path.abspath(self.get_ext_fullpath(ext.name)), compilers)


setup(
    packages=find_packages(include=["moe_ext", "moe_ext.*"]),
    ext_modules=[CMakeExtension("moe_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
)
