"""Generate examples/moe_walkthrough.ipynb from examples/moe_walkthrough.py (percent format).

    python scripts/make_notebook.py            # write the notebook
    python scripts/make_notebook.py --check    # exit 1 if the committed notebook is out of date

The script is split at lines starting with "# %%": "# %% [markdown]" cells are comment blocks whose
"# " prefixes are stripped, the others are code cells. The output is deterministic (cell ids are
numbered, no outputs, fixed metadata) and needs only the standard library, so tests can compare it
with the committed file byte for byte. nbformat 4.5 JSON, written the way nbformat writes it
(indent 1, sorted keys).
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "moe_walkthrough.py")
NOTEBOOK = os.path.join(ROOT, "examples", "moe_walkthrough.ipynb")


def _source(lines):
    """nbformat's multi-line string: a list of lines, each but the last keeping its newline."""
    text = "\n".join(lines).strip("\n")
    return text.splitlines(keepends=True)


def cells_from_script(text: str):
    cells, kind, body = [], None, []

    def flush():
        if kind is None:
            if "".join(body).strip():
                raise ValueError("make_notebook: the script must start with a '# %%' cell marker")
            return
        if kind == "markdown":
            lines = []
            for ln in body:
                if ln.strip() and not ln.startswith("#"):
                    raise ValueError(f"make_notebook: a markdown cell holds a non-comment line: {ln!r}")
                lines.append(ln[2:] if ln.startswith("# ") else ln.lstrip("#"))
        else:
            lines = body
        if "".join(lines).strip():
            cells.append((kind, _source(lines)))

    for ln in text.splitlines():
        if ln.startswith("# %%"):
            flush()
            kind, body = ("markdown" if "[markdown]" in ln else "code"), []
        else:
            body.append(ln)
    flush()
    return cells


def build(text: str) -> str:
    nb_cells = []
    for i, (kind, source) in enumerate(cells_from_script(text)):
        cell = {"cell_type": kind, "id": f"cell-{i:02d}", "metadata": {}, "source": source}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        nb_cells.append(cell)
    nb = {
        "cells": nb_cells,
        "metadata": {
            "jupytext": {"formats": "ipynb,py:percent"},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that the notebook is up to date")
    a = p.parse_args()
    with open(SCRIPT, encoding="utf-8") as f:
        want = build(f.read())
    if a.check:
        have = open(NOTEBOOK, encoding="utf-8").read() if os.path.exists(NOTEBOOK) else ""
        if have != want:
            print(f"{NOTEBOOK} is out of date: run python scripts/make_notebook.py", file=sys.stderr)
            sys.exit(1)
        print("notebook is up to date")
        return
    with open(NOTEBOOK, "w", encoding="utf-8") as f:
        f.write(want)
    print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
    main()
