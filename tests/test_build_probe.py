"""scripts/cxx_probe.py, which setup.py runs before CMake: a compiler that links its own libstdc++ into
shared libraries is caught and replaced. On a GPU image such a compiler (CXX=/opt/gcc/bin/g++) built an
extension whose error messages crashed the interpreter; `g++ -static-libstdc++` reproduces that here
(the integer comes out wrong instead of crashing)."""
import importlib.util
import os
import shutil
import stat

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("cxx_probe", os.path.join(ROOT, "scripts", "cxx_probe.py"))
cxx_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cxx_probe)

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="no g++ on this machine to probe")


@pytest.fixture(scope="module")
def static_gxx(tmp_path_factory):
    """A compiler that links libstdc++ statically into every shared library, as the GPU image's did."""
    path = tmp_path_factory.mktemp("cxx") / "g++-static-libstdc++"
    path.write_text(f'#!/bin/sh\nexec {GXX} "$@" -static-libstdc++\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    ok, detail = cxx_probe.probe(str(path))
    if ok is None:
        pytest.skip(f"this g++ cannot link libstdc++ statically: {detail}")
    return str(path), ok, detail


def test_system_compiler_passes():
    ok, detail = cxx_probe.probe(GXX)
    assert ok is True, detail


def test_compiler_with_its_own_libstdcxx_fails(static_gxx):
    path, ok, detail = static_gxx
    assert ok is False
    assert path in detail and "4096" in detail


def test_choose_switches_to_a_compiler_that_passes(static_gxx):
    path = static_gxx[0]
    cxx, message = cxx_probe.choose(path, candidates=[path, GXX])
    assert cxx == GXX
    assert f"not building with {path}" in message and f"Building with {GXX} instead" in message


def test_choose_keeps_a_compiler_that_passes():
    assert cxx_probe.choose(GXX, candidates=[])[0] == GXX


def test_choose_raises_when_nothing_passes(static_gxx):
    path = static_gxx[0]
    with pytest.raises(RuntimeError, match=r"no usable C\+\+ compiler: a library built by .*Set CXX to a compiler"):
        cxx_probe.choose(path, candidates=[path])


def test_a_compiler_that_cannot_build_is_left_to_cmake(tmp_path):
    """A broken compiler is not "incompatible": CMake reports it with its own message."""
    broken = tmp_path / "cxx-broken"
    broken.write_text("#!/bin/sh\necho 'cxx-broken: no such thing' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    ok, detail = cxx_probe.probe(str(broken))
    assert ok is None and "no such thing" in detail
    assert cxx_probe.choose(str(broken), candidates=[GXX])[0] == str(broken)


def test_built_module_check_passes_on_this_build():
    import moe_ext

    ok, detail = cxx_probe.check_module(moe_ext._C.__file__)
    assert ok is True, detail


def test_built_module_check_reports_a_module_that_does_not_load(tmp_path):
    bogus = tmp_path / "_C.so"
    bogus.write_bytes(b"not a shared library")
    ok, detail = cxx_probe.check_module(str(bogus))
    assert ok is False and "failed to load" in detail and str(bogus) in detail


def test_default_cuda_host_follows_cudahostcxx(monkeypatch):
    monkeypatch.setenv("CUDAHOSTCXX", "/opt/some/g++")
    assert cxx_probe.default_cuda_host() == "/opt/some/g++"
    monkeypatch.delenv("CUDAHOSTCXX")
    assert cxx_probe.default_cuda_host() == shutil.which("g++")


def test_choose_names_the_cuda_host_variable(static_gxx):
    path = static_gxx[0]
    cxx, message = cxx_probe.choose(path, candidates=[GXX], role="CUDAHOSTCXX")
    assert cxx == GXX and "nvcc's host compiler" in message and "Set CUDAHOSTCXX" in message
