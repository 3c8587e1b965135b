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
# docs/theory/notebooks is a symlink to ../../theory_notebooks (committed): the notebooks are read in place and
# nothing is written into the source tree; the folder's README and build script are not pages.
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "theory/notebooks/README.md"]
html_theme = "furo"
html_title = f"ipmcondense {release}"
nitpicky = True  # every cross-reference must resolve (the docs test builds with -W)


# --- cross-references -------------------------------------------------------------------------------------
# Objects of other projects (torch, numpy, the standard library) are not resolved: the build runs offline, so
# there is no intersphinx inventory. Everything inside ipmcondense must resolve.
nitpick_ignore_regex = [
    ("py:.*", r"(torch|numpy|np|scipy|sklearn|importlib|collections|contextlib|os|pathlib|abc|typing|types|enum|dataclasses)(\..*)?"),
    ("py:class", r"(Tensor|Module|nn\.Module|Path|Generator|Callable|Sequence|Mapping|Iterable|Iterator|Any)"),
    ("py:exc", r".*"),  # "Raises:" sections name built-in exceptions (and prose after them)
    ("py:.*", r"ipmcondense(\.\w+)*\._\w+(\..*)?"),  # private helpers and base classes are not documented
]
# Dangling references in docstrings of modules other engineers own (issue 15, reported to them): each entry is
# one exact target, so any new dangling reference still fails the build. Remove an entry once its docstring is
# fixed (a full dotted path, or double backquotes for a non-link) or, for the objectives, once the objectives
# package has its API reference.
nitpick_ignore = [
    ("py:class", "dataset"),  # a "name (type)" misread by napoleon in the trajectories API (condensation.rst)
    ("py:class", "The learning rate before the decay"),  # evaluation.py EvaluationProtocol.base_lr "Returns:"
    ("py:class", "Fixed split"),  # data/datasets.py DIGITS_TEST_FRACTION doc comment read as a field list
    ("py:class", "the scikit-learn digits"),
    ("py:meth", "DifferentiableSiameseAugmentation.__call__"),  # augment.py module docstring (special member)
]


def _canonical_name(target: str, module: str | None) -> str | None:
    """The documented (defining) name of an ipmcondense object referred to by a re-export or a short name.

    ``ipmcondense.mmd`` is ``ipmcondense.ipm.mmd.mmd``; ``Witness`` written inside ``ipmcondense.ipm.critic``
    is ``ipmcondense.ipm.witness.Witness``. Returns ``None`` for anything that is not an ipmcondense object.
    """
    import importlib

    candidates = [target] + ([f"{module}.{target}"] if module else [])
    for name in candidates:
        if not name.startswith("ipmcondense"):
            continue
        parts = name.split(".")
        for split in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            try:
                for attribute in parts[split:]:
                    obj = getattr(obj, attribute)
            except AttributeError:
                break
            defining_module = getattr(obj, "__module__", None)
            qualname = getattr(obj, "__qualname__", None)
            if isinstance(obj, type(importlib)):  # a module
                return obj.__name__
            if defining_module and qualname and defining_module.startswith("ipmcondense"):
                return f"{defining_module}.{qualname}"
            return None
    return None


def _resolve_reexports(app, env, node, contnode):
    """Resolve references to re-exported ipmcondense names by their defining module (``missing-reference``)."""
    if node.get("refdomain") != "py":
        return None
    canonical = _canonical_name(node["reftarget"], node.get("py:module"))
    if canonical is None or canonical == node["reftarget"]:
        return None
    domain = env.get_domain("py")
    for role in (node["reftype"], "obj"):
        resolved = domain.resolve_xref(env, node["refdoc"], app.builder, role, canonical, node, contnode)
        if resolved is not None:
            return resolved
    return None


def _resolve_constants(app, env, node, contnode):
    """A ``:data:`` reference to an ipmcondense constant without a doc comment links to its module's section.

    autodoc documents module data only when it has a doc comment (``#:``); the constants these references
    name (``RECIPES``, ``DATASET_NAMES``, ``METHOD_NAMES``, ...) are described by their module's docstring.
    The link goes to the first documented module among the one named (or the current one) and every
    ipmcondense module holding the same object. Anything else stays unresolved (and fails the build).
    """
    import importlib
    import sys

    if node.get("refdomain") != "py" or node["reftype"] != "data":
        return None
    *path, name = node["reftarget"].split(".")
    named = ".".join(path) if path else node.get("py:module")
    if not name.isupper() or not named or not named.startswith("ipmcondense"):
        return None
    try:
        value = getattr(importlib.import_module(named), name)
    except (ImportError, AttributeError):
        return None
    holders = [m for m, module in sorted(sys.modules.items())
               if m.startswith("ipmcondense") and getattr(module, name, None) is value]
    domain = env.get_domain("py")
    for module in [named, *holders]:
        resolved = domain.resolve_xref(env, node["refdoc"], app.builder, "mod", module, node, contnode)
        if resolved is not None:
            return resolved
    return None


def setup(app):
    app.connect("missing-reference", _resolve_reexports)
    app.connect("missing-reference", _resolve_constants)
