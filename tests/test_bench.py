"""The benchmark CLI (CPU smoke size) and the GPU check's results writer, on fake inputs."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_results  # noqa: E402
from moe_ext.bench import __main__ as bench_main  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One in-process smoke run of every suite on the CPU, with --profile (tiny shapes, ~10 s)."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:  # one thread: the 2-core CI machines are often shared, and oversubscribed OpenMP crawls
        rc = bench_main.main(["--device", "cpu", "--smoke", "--profile", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    with open(out / "results.json") as f:
        return rc, out, json.load(f)


def test_cli_writes_results_csv_and_plots(smoke_run):
    rc, out, doc = smoke_run
    assert rc == 0
    for key in ("device", "versions", "commit", "date", "config", "ceilings", "rows"):
        assert key in doc, key
    assert doc["device_type"] == "cpu" and doc["config"]["mode"] == "smoke"
    assert doc["ceilings"]["copy_GBps"] > 0 and doc["ceilings"]["dense_TFLOPs"] > 0
    assert {r["suite"] for r in doc["rows"]} == {"gating", "permute", "unpermute", "activation", "grouped_gemm", "layer"}
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(doc["rows"])
    for png in ("throughput.png", "speedup.png", "roofline.png"):
        assert (out / png).stat().st_size > 1000, png


def test_rows_are_checked_and_timed(smoke_run):
    _, _, doc = smoke_run
    timed = [r for r in doc["rows"] if r["median_us"] is not None]
    moe = [r for r in timed if r["impl"] == "moe_ext"]
    assert len(moe) == 7  # one per suite, plus the layer's fwd+bwd
    for r in timed:
        if r["impl"] != "dense":  # the dense ceiling computes something else: not checked
            assert r["ok"] is True, r
        assert r["median_us"] > 0 and r["p20_us"] <= r["median_us"] <= r["p80_us"]
    for r in moe:
        assert r["speedup"], r  # against the baselines of the same run
    layer = [r for r in moe if r["suite"] == "layer"]
    assert {r["pass"] for r in layer} == {"fwd", "fwd+bwd"}
    assert all(r["tflops"] > 0 and r["dense_frac"] > 0 and r["roofline_frac"] > 0 for r in layer)
    assert {"naive", "dense"} <= {r["impl"] for r in timed if r["suite"] == "layer"}


def test_profile_breakdown_on_cpu(smoke_run):
    _, out, doc = smoke_run
    assert len(doc["profile"]) == 7  # one per smoke case
    layer = [p for p in doc["profile"] if p["case"].startswith("layer/")][0]
    assert layer["top"] and all(e["us_per_call"] >= 0 for e in layer["top"])
    assert {"gating", "permute", "grouped_gemm_w1", "grouped_gemm_w2", "unpermute"} <= {s["name"] for s in layer["stages"]}
    assert "moe_ext::grouped_gemm" in (out / "profile.txt").read_text()


def test_quick_plan_is_small_and_cpu_scaled():
    from moe_ext.bench.shapes import plan
    cases = plan("cpu", "quick", bench_main.SUITES)
    assert 10 <= len(cases) <= 30
    big = [c for c in cases if c.model in ("mixtral", "qwen3", "dsv3")]
    assert big and all(c.scaled and "scale for CPU" in c.label for c in big)
    gpu = plan("cuda", "quick", bench_main.SUITES)
    assert not any(c.scaled for c in gpu) and max(c.T for c in gpu) == 4096


def _fake_junit(path):
    path.write_text("""<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="10">
<testcase classname="tests.test_cuda_routing" name="test_a" time="0.25"/>
<testcase classname="tests.test_cuda_routing" name="test_b" time="3.5"><failure message="x">boom</failure></testcase>
<testcase classname="tests.test_cuda_grouped_gemm" name="test_c"><failure message="y">bang</failure></testcase>
<testcase classname="tests.test_cuda_grouped_gemm" name="test_d"><error message="z">oops</error></testcase>
</testsuite></testsuites>""")


def test_results_writer_from_fake_inputs(tmp_path, capsys):
    _fake_junit(tmp_path / "junit.xml")
    (tmp_path / "memcheck.log").write_text(
        "========= COMPUTE-SANITIZER\n========= Invalid __global__ write of size 4 bytes\n"
        "=========     at permute_kernel+0x90\n========= ERROR SUMMARY: 1 error\n"
        "========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\nSANITIZE-DONE tool=memcheck rc=1\n")
    (tmp_path / "racecheck.log").write_text("========= RACECHECK SUMMARY: 2 hazards displayed (0 errors, 2 warnings)\n"
                                            "SANITIZE-DONE tool=racecheck rc=0\n")
    (tmp_path / "steps.tsv").write_text("info\t0\t0\tok\nbuild\t0\t95\tok\ntests_cuda\t1\t40\tfailed rc=1\n")
    rows = [{"suite": "layer", "model": "mixtral", "pass": "fwd", "T": 4096, "routing": "uniform", "impl": "moe_ext",
             "ok": True, "median_us": 5000.0, "tflops": 577.0, "gbps": 700.0, "roofline_frac": 0.73,
             "speedup": {"naive": 3.0}}]
    (tmp_path / "bench.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "rows": rows,
                                                     "ceilings": {"copy_GBps": 3000.0}, "versions": {}}))
    res = tmp_path / "results"
    rc = gpu_results.main(["--junit", str(tmp_path / "junit.xml"), "--bench", str(tmp_path / "bench.json"),
                           "--sanitizer", f"memcheck={tmp_path / 'memcheck.log'}",
                           "--sanitizer", f"racecheck={tmp_path / 'racecheck.log'}",
                           "--steps", str(tmp_path / "steps.tsv"), "--results-dir", str(res),
                           "--copy-to", str(tmp_path / "out"), "--commit", "a" * 40, "--date", "2026-11-20T10:00:00+00:00"])
    assert rc == 1  # failed tests, a failed step and a sanitizer error
    files = os.listdir(res)
    assert files == ["2026-11-20-h100-80gb-hbm3-aaaaaaaaaa.json"]
    assert os.path.exists(tmp_path / "out" / files[0])
    doc = json.loads((res / files[0]).read_text())
    for key in ("device", "commit", "date", "torch", "cuda", "tests", "sanitizer", "bench", "steps"):
        assert key in doc, key
    assert doc["device"] == "NVIDIA H100 80GB HBM3" and doc["commit"] == "a" * 40
    assert {k: doc["tests"][k] for k in ("passed", "failed", "skipped", "errors")} == \
        {"passed": 4, "failed": 2, "skipped": 3, "errors": 1}
    assert len(doc["tests"]["failures"]) == 3
    assert doc["tests"]["seconds"] == 3.8 and doc["tests"]["slowest"][0] == ["tests.test_cuda_routing::test_b", 3.5]
    mc = doc["sanitizer"]["memcheck"]
    assert mc["status"] == "errors" and mc["errors"] == 1 and mc["runs"] == 2
    assert any("Invalid __global__ write" in ln for ln in mc["first_lines"])
    assert doc["sanitizer"]["racecheck"]["status"] == "clean"
    assert doc["bench"]["rows"] == rows and doc["failed_steps"] == ["tests_cuda"] and doc["ok"] is False
    text = capsys.readouterr().out.strip().splitlines()
    assert text[-1].startswith("RESULT: FAIL") and any("layer/mixtral fwd T=4096" in ln for ln in text)


def _write_clean_run(tmp_path, steps, memcheck_done=True, racecheck="done", bench_complete=True):
    (tmp_path / "junit.xml").write_text('<testsuite tests="2" failures="0" errors="0" skipped="0">'
                                        '<testcase classname="t" name="a"/><testcase classname="t" name="b"/>'
                                        '</testsuite>')
    (tmp_path / "memcheck.log").write_text("========= ERROR SUMMARY: 0 errors\n"
                                           + ("SANITIZE-DONE tool=memcheck rc=0\n" if memcheck_done else ""))
    race = "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
    (tmp_path / "racecheck.log").write_text(race + "SANITIZE-DONE tool=racecheck rc=0\n" if racecheck == "done" else
                                            race if racecheck == "cut" else
                                            "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n")
    (tmp_path / "steps.tsv").write_text("".join(f"{name}\t{rc}\t5\tx\n" for name, rc in steps))
    rows = [{"suite": "gating", "model": "m", "pass": "fwd", "T": 8, "routing": "uniform", "impl": "moe_ext", "ok": True}]
    (tmp_path / "bench.json").write_text(json.dumps({"rows": rows, "complete": bench_complete}))
    return ["--junit", str(tmp_path / "junit.xml"), "--bench", str(tmp_path / "bench.json"),
            "--sanitizer", f"memcheck={tmp_path / 'memcheck.log'}", "--sanitizer", f"racecheck={tmp_path / 'racecheck.log'}",
            "--steps", str(tmp_path / "steps.tsv"), "--results-dir", str(tmp_path / "res"),
            "--device", "NVIDIA H100 80GB HBM3", "--commit", "c" * 40]


def _doc(tmp_path):
    res = tmp_path / "res"
    return json.loads((res / os.listdir(res)[0]).read_text())


def test_results_writer_passes_a_clean_run_with_optional_steps_cut_short(tmp_path):
    required = [("info", 0), ("build", 0), ("tests_cuda", 0), ("memcheck", 0), ("bench_quick", 0)]
    args = _write_clean_run(tmp_path, required + [("racecheck", "incomplete"), ("tests_cpu", "incomplete")],
                            racecheck="cut")
    assert gpu_results.main(args + ["--dirty", "1"]) == 0
    doc = _doc(tmp_path)
    assert doc["ok"] is True and doc["failed_steps"] == [] and doc["dirty"] is True
    assert doc["sanitizer"]["memcheck"]["status"] == "clean"
    assert doc["sanitizer"]["racecheck"]["status"] == "incomplete"  # recorded, not claimed clean


@pytest.mark.parametrize("what", ["memcheck_cut", "racecheck_error", "bench_cut", "required_step_timeout"])
def test_results_writer_fails_what_did_not_finish_or_found_something(tmp_path, what):
    steps = [("info", 0), ("build", 0), ("tests_cuda", 0), ("memcheck", 0), ("bench_quick", 0), ("racecheck", 0)]
    if what == "required_step_timeout":
        steps[2] = ("tests_cuda", 124)
    args = _write_clean_run(tmp_path, steps, memcheck_done=what != "memcheck_cut",
                            racecheck="error" if what == "racecheck_error" else "done",
                            bench_complete=what != "bench_cut")
    assert gpu_results.main(args) == 1
    doc = _doc(tmp_path)
    assert doc["ok"] is False
    if what == "memcheck_cut":
        assert doc["sanitizer"]["memcheck"]["status"] == "incomplete"
    elif what == "racecheck_error":
        assert doc["sanitizer"]["racecheck"] == dict(doc["sanitizer"]["racecheck"], status="errors", errors=1)
    elif what == "bench_cut":
        assert doc["bench"]["status"] == "incomplete"
    else:
        assert doc["failed_steps"] == ["tests_cuda"]


def test_bench_interrupted_keeps_the_rows_so_far(tmp_path, monkeypatch):
    """timeout's SIGTERM mid-run: results.json still holds the finished cases, marked incomplete."""
    import signal

    real, calls = bench_main.run_case, []

    def run_then_terminate(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(bench_main, "run_case", run_then_terminate)
    rc = bench_main.main(["--device", "cpu", "--smoke", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 1 and len(calls) == 2
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["complete"] is False and doc["cases"] > 2
    assert len({r["config"] for r in doc["rows"]}) == 1  # the second case was cut before its rows landed
    assert signal.getsignal(signal.SIGTERM) is not bench_main._raise_interrupt  # handler restored


def test_results_writer_tolerates_missing_inputs(tmp_path):
    rc = gpu_results.main(["--junit", str(tmp_path / "nope.xml"), "--bench", str(tmp_path / "nope.json"),
                           "--sanitizer", f"memcheck={tmp_path / 'nope.log'}", "--results-dir", str(tmp_path),
                           "--device", "NVIDIA H200", "--commit", "b" * 40])
    assert rc == 1
    doc = json.loads(open(os.path.join(tmp_path, os.listdir(tmp_path)[0])).read())
    assert doc["tests"]["status"] == "missing" and doc["bench"]["status"] == "missing"
    assert doc["sanitizer"]["memcheck"]["status"] == "not_run"


@pytest.mark.parametrize("script", ["gpu_check.sh", "prepare_gpu_wheels.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", script)], check=True)


def test_gpu_check_fails_loudly_without_gpu(tmp_path):
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                       env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable), timeout=120)
    assert r.returncode == 2
    assert "NO GPU VISIBLE" in r.stdout and "NO GPU VISIBLE" in (tmp_path / "log.txt").read_text()


def test_quick_cli_on_cpu(tmp_path):
    """The real --quick plan end to end on the CPU, as the README's first command runs it (~30 s)."""
    out = tmp_path / "quick"
    r = subprocess.run([sys.executable, "-m", "moe_ext.bench", "--device", "cpu", "--quick", "--threads", "1",
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["mode"] == "quick"
    checked = [row for row in doc["rows"] if row.get("impl") == "moe_ext"]
    assert checked and all(row["ok"] is True for row in checked)
    assert {row["suite"] for row in doc["rows"]} >= {"gating", "permute", "unpermute", "grouped_gemm", "layer"}
