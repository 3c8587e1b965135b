"""The documentation site builds in strict mode (any Sphinx warning is an error)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_files():
    """Every file under docs/ and theory_notebooks/ (symlinks not followed) with its modification time."""
    files = {}
    for folder in (ROOT / "docs", ROOT / "theory_notebooks"):
        for path in folder.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                files[path] = path.stat().st_mtime_ns
    return files


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    before = _source_files()
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(tmp_path / "html"), "-d", str(tmp_path / "doctrees")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    html = tmp_path / "html"
    assert (html / "index.html").exists()
    assert (html / "api" / "ipm.html").exists()
    # the build reads the sources and writes only into its output folder
    assert _source_files() == before
    # every theory notebook is a page, and no rendered page shows a local path or a warning stream
    for notebook in sorted((ROOT / "theory_notebooks").glob("*.ipynb")):
        assert (html / "theory" / "notebooks" / f"{notebook.stem}.html").exists(), notebook.name
    for page in html.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert str(ROOT) not in text and "site-packages" not in text, page
        assert 'class="output stderr' not in text, f"{page}: a stored notebook output is a stderr stream"


def test_theory_notebooks_are_read_in_place():
    link = ROOT / "docs" / "theory" / "notebooks"
    assert link.is_symlink() and link.resolve() == (ROOT / "theory_notebooks").resolve()
    conf = (ROOT / "docs" / "conf.py").read_text()
    assert "nitpicky = True" in conf


# result containers document their fields, not a computation
_CONTAINERS = {"NeuralIPMResult", "Witness", "TwoSampleTestResult", "CondensationResult"}


def _public_objects():
    import ipmcondense

    return [(name, getattr(ipmcondense, name)) for name in ipmcondense.__all__ if name != "__version__"]


@pytest.mark.parametrize("name, obj", _public_objects(), ids=[n for n, _ in _public_objects()])
def test_every_public_name_documents_what_it_computes_and_its_cost(name, obj):
    import inspect

    doc = inspect.getdoc(obj) or ""
    assert len(doc) >= 100, f"{name}: docstring missing or too short"
    if name not in _CONTAINERS:
        lowered = doc.lower()
        assert "cost" in lowered or "o(" in lowered, f"{name}: docstring states no cost"
        assert ":math:" in doc or "``" in doc, f"{name}: docstring states no formula"
