#!/usr/bin/env python
"""Execute the theory notebooks in place and store their outputs, so the docs render them without a kernel.

Usage (from the repository root, with the project's environment)::

    .venv/bin/python theory_notebooks/build.py              # every notebook in theory_notebooks/
    .venv/bin/python theory_notebooks/build.py 01 05_condensation_dynamics.ipynb   # a selection

A name selects the notebooks whose file name starts with it (``01``, ``02_kernel``) or equals it (with or
without ``.ipynb``). Each notebook runs with the ``python3`` kernel of the interpreter running this script
(jupyter_client resolves the kernelspec's ``python`` to ``sys.executable``), in the notebooks folder, with a
per-cell timeout of 300 s. A failing cell (including a failed ``assert``) stops the build with a non-zero exit
status and leaves that notebook unchanged on disk. Execution counts are kept, timing metadata is not, and
the KeOps start-up warning about missing CUDA libraries is dropped from the stored outputs.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent
CELL_TIMEOUT_S = 300
KERNEL_NAME = "python3"
_KEOPS_NOISE = re.compile(r"^\[KeOps\] Warning : CUDA libraries not found.*\n*", re.MULTILINE)


def notebook_paths(names: list[str]) -> list[Path]:
    """The notebooks selected by ``names`` (all of them when empty), sorted by file name."""
    available = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if not names:
        return available
    selected: list[Path] = []
    for name in names:
        stem = Path(name).name.removesuffix(".ipynb")
        matches = [p for p in available if p.stem == stem or p.stem.startswith(stem)]
        if not matches:
            known = ", ".join(p.name for p in available)
            raise SystemExit(f"no notebook matches {name!r} in {NOTEBOOK_DIR} (available: {known})")
        selected.extend(p for p in matches if p not in selected)
    return selected


def _drop_keops_noise(notebook: nbformat.NotebookNode) -> None:
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                output["text"] = _KEOPS_NOISE.sub("", output["text"])
                if not output["text"]:
                    continue
            kept.append(output)
        cell["outputs"] = kept


def execute(path: Path, *, write: bool = True) -> nbformat.NotebookNode:
    """Run ``path`` top to bottom in a fresh kernel; write it back with outputs when ``write``."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
        record_timing=False,
    )
    client.execute()
    _drop_keops_noise(notebook)
    notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": KERNEL_NAME}
    if write:
        nbformat.write(notebook, path)
    return notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (prefixes or file names); default: all")
    args = parser.parse_args(argv)
    for path in notebook_paths(args.names):
        start = time.perf_counter()
        execute(path)
        size_kb = path.stat().st_size / 1024
        print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s, stored {size_kb:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
