"""Build moe_ext: setup.py hands the native build to CMakeLists.txt (one build description).

Environment:
  MOE_EXT_CUDA=auto|1|0     build the CUDA kernels (auto: when torch is a CUDA build and nvcc is found)
  TORCH_CUDA_ARCH_LIST      CUDA archs, default "8.0;9.0a"
  MAX_JOBS                  parallel compile jobs (default: all cores)
  MOE_EXT_CUTLASS_DIR       CUTLASS include dir (default: the nvidia-cutlass wheel's headers)
  MOE_EXT_BUILD_DIR         CMake build dir (default: build/cmake-<python>-<torch>; kept for incremental builds)
  DEBUG=1                   -O0 -g
  MOE_EXT_CXX_PROBE=0       skip the compiler check (scripts/cxx_probe.py): by default the C++ compiler CMake
                            would use ($CXX, else c++) is first tried on a small library loaded next to torch,
                            and a compiler that breaks there (one linking its own libstdc++) is replaced by one
                            that passes
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


def _choose_cxx():
    """(override, expected): override is the C++ compiler CMake must use instead of its own pick (None: CMake
    picks, from $CXX or the PATH, as usual); expected is the full path of the compiler the build will
    use, when known (an existing build dir configured with another one is reconfigured)."""
    if os.environ.get("MOE_EXT_CXX_PROBE", "1") == "0":
        return None, None
    import importlib.util

    path = os.path.join(ROOT, "scripts", "cxx_probe.py")
    if not os.path.exists(path):
        print(f"moe_ext: {path} is missing: the C++ compiler is not checked", file=sys.stderr)
        return None, None
    spec = importlib.util.spec_from_file_location("moe_ext_cxx_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    requested = probe.default_compiler()
    if requested is None:
        return None, None  # CMake reports the missing compiler
    cxx, message = probe.choose(requested)
    if cxx == requested:
        print(message)
        return None, shutil.which(requested)
    print(message, file=sys.stderr)
    return shutil.which(cxx) or cxx, shutil.which(cxx) or cxx


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
        cxx, expected_cxx = _choose_cxx()
        if cxx is not None:
            args.append(f"-DCMAKE_CXX_COMPILER={cxx}")
            if not os.environ.get("CUDAHOSTCXX"):
                args.append(f"-DCMAKE_CUDA_HOST_COMPILER={cxx}")  # nvcc's host code from the same compiler
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if os.path.exists(cache):  # a generator or compiler switch would fail on the old cache
            with open(cache) as f:
                text = f.read()
            stale = ("CMAKE_GENERATOR:INTERNAL=Ninja" in text) != ("Ninja" in args)
            if expected_cxx is not None:
                cached = [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith("CMAKE_CXX_COMPILER:")]
                stale |= bool(cached) and os.path.realpath(cached[0]) != os.path.realpath(expected_cxx)
            if stale:
                shutil.rmtree(build_dir)
                os.makedirs(build_dir)
        cmake = _cmake_exe()
        subprocess.run([cmake, "-S", ROOT, "-B", build_dir, *args], check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", build_dir, "--parallel", jobs], check=True)


setup(
    packages=find_packages(include=["moe_ext", "moe_ext.*"]),
    ext_modules=[CMakeExtension("moe_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
)
