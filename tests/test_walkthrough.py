"""examples/moe_walkthrough.py: the script runs with --quick, the notebook is in sync with it, and the
notebook executes (nbclient, with the seconds-long --smoke setting)."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "moe_walkthrough.py")
NOTEBOOK = os.path.join(ROOT, "examples", "moe_walkthrough.ipynb")
FIGURES = ["expert_load.png", "specialisation.png", "router_logits.png", "capacity.png",
           "capacity_compute.png", "training_loss.png"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _check_outputs(out, num_experts=8):
    for name in FIGURES:
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 1000, name
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert sorted(m["figures"]) == sorted(FIGURES)
    loads = m["max_expert_load_fraction"]
    assert set(loads) == {"aux", "no_aux"}
    for v in loads.values():  # the busiest expert gets at least 1/E of the slots, at most all
        assert 1.0 / num_experts - 1e-9 <= v <= 1.0
    fs = m["from_scratch"]
    assert fs["max_abs_diff_textbook_vs_moelayer"] < 1e-4 and fs["max_abs_diff_naive_moe_vs_moelayer"] < 1e-4
    for run in m["runs"].values():
        assert math.isfinite(run["eval_loss"]) and 0 < run["eval_loss"] < 10
        for frac in run.get("expert_load_fraction", []):
            assert len(frac) == num_experts and abs(sum(frac) - 1) < 1e-6
    for rows in m["capacity"].values():
        drops = [r["drop_fraction"] for r in rows]
        assert all(0 <= d <= 1 for d in drops)
        assert drops[-1] == 0  # capacity_factor None: dropless
        assert all(a >= b - 1e-9 for a, b in zip(drops, drops[1:]))  # more capacity, fewer drops
        assert all(r["tokens_per_second"] > 0 for r in rows)
    for label in ("none", "z_loss", "jitter"):
        assert math.isfinite(m["router_logits"][label]["mean_lse"])
    layers = m["compute"]["layers"]
    dense = layers[0]
    assert dense["name"].startswith("dense") and dense["total_params"] == dense["active_params"]
    for b in layers[1:]:
        assert b["total_params"] >= b["active_params"] >= dense["active_params"] and b["ms"] > 0
    return m


@pytest.mark.slow
def test_script_quick(tmp_path):
    out = tmp_path / "walk"
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = _check_outputs(str(out))
    assert m["config"]["mode"] == "quick"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_notebook", os.path.join(ROOT, "scripts", "make_notebook.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_notebook_in_sync():
    gen = _load_generator()
    with open(SCRIPT, encoding="utf-8") as f:
        want = gen.build(f.read())
    with open(NOTEBOOK, encoding="utf-8") as f:
        have = f.read()
    assert have == want, "examples/moe_walkthrough.ipynb is stale: run python scripts/make_notebook.py"
    nb = json.loads(have)
    kinds = [c["cell_type"] for c in nb["cells"]]
    assert kinds[0] == "markdown" and "code" in kinds
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")


@pytest.mark.slow
def test_notebook_executes(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="executing the notebook needs nbclient (and ipykernel)")
    import nbformat  # a dependency of nbclient

    out = tmp_path / "walk_nb"
    # The kernel inherits this environment; MPLBACKEND stays unset so that figures display inline.
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("MOE_WALKTHROUGH_ARGS", f"--smoke --out {out}")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}})
    client.execute()
    m = _check_outputs(str(out))
    assert m["config"]["mode"] == "smoke"
    # the figures were shown inline too
    shown = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if "image/png" in o.get("data", {}))
    assert shown == len(FIGURES)
