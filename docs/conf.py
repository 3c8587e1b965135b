"""Sphinx configuration for the ipmcondense documentation (built in strict mode: warnings fail)."""

import os
import sys

import ipmcondense

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

project = "ipmcondense"
author = "the ipmcondense developers"
copyright = "2026, the ipmcondense developers"
release = ipmcondense.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    "cli_help",
]

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" sections as fields, so dataclass fields are not documented twice

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
# The notebooks are executed (and their claims asserted) by the test suite; the site renders the
# outputs stored by `python theory_notebooks/build.py`, so a docs build needs no kernel.
nb_execution_mode = "off"

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
html_theme = "furo"
html_title = f"ipmcondense {release}"
nitpicky = False


def _copy_notebooks(app):
    """Copy the executed notebooks of ``theory_notebooks/`` into the source tree (git-ignored)."""
    import shutil
    from pathlib import Path

    source = Path(app.srcdir).parent / "theory_notebooks"
    target = Path(app.srcdir) / "theory" / "notebooks"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for notebook in sorted(source.glob("*.ipynb")):
        shutil.copy2(notebook, target / notebook.name)


def setup(app):
    app.connect("builder-inited", _copy_notebooks)
