"""Execute every theory notebook (in memory) so that each numerical claim they assert is tested.

The notebooks in ``theory_notebooks/`` state their claims as ``assert`` statements; a false claim
raises ``CellExecutionError`` here. They run with the ``python3`` kernel of the interpreter that runs
pytest (``.venv/bin/python -m pytest`` gives the project's environment, checked by
``test_kernel_uses_this_interpreter``), in the notebooks folder; nothing is written back to disk.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "theory_notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def _run(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
        record_timing=False,
    )
    return client.execute()


def test_notebooks_are_present():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


def test_kernel_uses_this_interpreter():
    cell = nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.getcwd())")
    notebook = _run(nbformat.v4.new_notebook(cells=[cell]))
    executable, cwd = notebook.cells[0].outputs[0]["text"].split()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(cwd).resolve() == NOTEBOOK_DIR


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_outputs_show_no_warnings_or_local_paths(path: Path):
    """The docs render the stored outputs: no stderr stream (warnings), no error, no path of this machine."""
    notebook = nbformat.read(path, as_version=4)
    root = str(NOTEBOOK_DIR.parent)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is not None, f"cell {index} was never executed: run build.py"
        for output in cell.outputs:
            assert output.get("name") != "stderr", f"cell {index}: stderr output {output.get('text', '')[:200]!r}"
            assert output.get("output_type") != "error", f"cell {index}: stored error"
            text = str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
            assert root not in text and "site-packages" not in text, f"cell {index}: local path in the output"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_without_error(path: Path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    _run(notebook)  # raises CellExecutionError on any error, including a failed assert
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("output_type") == "error"
    ]
    assert not errors
