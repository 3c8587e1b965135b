"""The package's layers: a lower layer never imports a higher one (checked statically on every module).

    ipm  <  core  <  models  <  engine  <  app

* ``ipm``: :mod:`ipmcondense.ipm`, the mathematics (kernels, MMD, OT, critics), usable on its own;
* ``core``: version, atomic files, components and registries, the one training loop, autodiff helpers;
* ``models``: networks, augmentation, data, feature maps, evaluation protocol, selection, expert buffers;
* ``engine``: :mod:`ipmcondense.condensation` (components of the recipe axes, objectives, the loop, the API);
* ``app``: the package root, the command line.

Every ``import`` counts, including the lazy ones inside functions. The checker is tested on a reversed
import, so this test can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ipmcondense

PACKAGE = Path(ipmcondense.__file__).parent
LAYERS = ("ipm", "core", "models", "engine", "app")
_LAYER_OF_PREFIX = {
    "ipmcondense.ipm": "ipm",
    "ipmcondense._version": "core",
    "ipmcondense.files": "core",
    "ipmcondense.components": "core",
    "ipmcondense.training": "core",
    "ipmcondense.autodiff": "core",
    "ipmcondense.distributed": "core",
    "ipmcondense.nets": "models",
    "ipmcondense.augment": "models",
    "ipmcondense.data": "models",
    "ipmcondense.features": "models",
    "ipmcondense.evaluation": "models",
    "ipmcondense.selection": "models",
    "ipmcondense.whitening": "models",
    "ipmcondense.trajectories": "models",
    "ipmcondense.generators": "models",
    "ipmcondense.condensation": "engine",
    "ipmcondense.commands": "app",
    "ipmcondense.cli": "app",
    "ipmcondense.__main__": "app",
}


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside the package (the root ``ipmcondense`` is ``app``)."""
    best = max((p for p in _LAYER_OF_PREFIX if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        if module == "ipmcondense":
            return "app"
        raise KeyError(f"module {module} has no layer: add it to tests/test_layers.py")
    return _LAYER_OF_PREFIX[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[str, int]]:
    """``(absolute module, line)`` of every import of a package module in ``source``."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "ipmcondense"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ipmcondense":
                continue
            if target == "ipmcondense":  # `from ipmcondense import x`: x may be a submodule
                for alias in node.names:
                    sub = f"ipmcondense.{alias.name}"
                    found.append((sub if (PACKAGE / alias.name).exists() or (PACKAGE / f"{alias.name}.py").exists()
                                  else "ipmcondense", node.lineno))
            else:
                found.append((target, node.lineno))
    return found


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """Every import in ``source`` (of ``module``) of a strictly higher layer, as readable strings."""
    own = LAYERS.index(layer_of(module))
    return [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)}) at line {line}"
        for target, line in imported_modules(source, module, is_package)
        if LAYERS.index(layer_of(target)) > own
    ]


def test_no_module_imports_a_higher_layer():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        problems += upward_imports(path.read_text(), module, path.name == "__init__.py")
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("ipmcondense.ipm.mmd", "from ipmcondense.condensation import condense\n"),
        ("ipmcondense.ipm.mmd", "def f():\n    from ..nets import get_network\n"),
        ("ipmcondense.condensation.engine", "from ipmcondense import __version__\n"),
        ("ipmcondense.features", "import ipmcondense.condensation.recipes\n"),
        ("ipmcondense.trajectories.buffer", "from ..condensation.objectives import trajectory_matching_loss\n"),
    ],
)
def test_the_checker_reports_a_reversed_import(module, source):
    assert upward_imports(source, module), f"the checker missed an upward import in {module}"


def test_the_checker_accepts_downward_imports():
    assert not upward_imports("from ipmcondense.ipm.mmd import mmd2\nfrom .base import Objective\n",
                              "ipmcondense.condensation.objectives.matching")
