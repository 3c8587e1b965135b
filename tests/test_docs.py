"""The documentation site builds in strict mode (any Sphinx warning is an error)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(tmp_path / "html"), "-d", str(tmp_path / "doctrees")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (tmp_path / "html" / "index.html").exists()
    assert (tmp_path / "html" / "api" / "ipm.html").exists()


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
