"""Per-dataset hyperparameters, read from one TOML file per dataset (``configs/<dataset>.toml``).

Each file holds what the recipes need to know about one dataset, every value beside a comment that
gives its source (a measurement, a paper, a reference implementation)::

    [defaults]                  # dataset-wide: every recipe and baseline of the dataset
    arch = "convnet-d2"

    [budgets.dm]                # per-method budget row
    iterations = 600

    [ipc_budgets.dm.1]          # per-method row for one number of images per class
    lr_images = 10.0

Hyperparameters resolve as ``COMMON_DEFAULTS | DATASET_DEFAULTS[dataset] | recipe.defaults |
DATASET_BUDGETS[dataset][method] | DATASET_IPC_BUDGETS[dataset][method][ipc] | overrides``
(:func:`ipmcondense.condensation.recipes.resolve_config`). This module turns the files into those
three read-only tables. Keys are :data:`~ipmcondense.condensation.recipes.COMMON_DEFAULTS` names,
methods are :data:`~ipmcondense.condensation.recipes.METHOD_NAMES` rows, IPC keys are positive
integers; anything else raises ``ValueError`` naming the file and the key. TOML arrays become
tuples (every sequence-valued hyperparameter is a tuple, e.g. ``lr_decay_at``); TOML has no null,
so a ``None`` setting is written by leaving the key out. A file, or a section, with no values adds
no entry: a dataset without settings is absent from the tables, as before the files existed.

The files ship as package data (``pyproject.toml``, ``[tool.setuptools.package-data]``) and are
found with :mod:`importlib.resources`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "DatasetConfig",
    "DATASET_DEFAULTS",
    "DATASET_BUDGETS",
    "DATASET_IPC_BUDGETS",
    "config_files",
    "load_dataset_config",
    "load_dataset_configs",
]

CONFIG_PACKAGE = "ipmcondense.condensation"
CONFIG_FOLDER = "configs"
SECTIONS = ("defaults", "budgets", "ipc_budgets")


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset's file, read and validated.

    Attributes:
        dataset: the dataset name (the file name without ``.toml``).
        source: the file it was read from (for error messages).
        defaults: dataset-wide hyperparameters.
        budgets: ``{method: {hyperparameter: value}}``.
        ipc_budgets: ``{method: {ipc: {hyperparameter: value}}}``.
    """

    dataset: str
    source: str
    defaults: Mapping[str, Any]
    budgets: Mapping[str, Mapping[str, Any]]
    ipc_budgets: Mapping[str, Mapping[int, Mapping[str, Any]]]


def _registry_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(hyperparameter keys, method names) of the recipe table, imported here to avoid an import cycle.

    ``recipes`` imports this module's tables; it must do so after it has defined ``COMMON_DEFAULTS``
    and ``METHOD_NAMES``, which are read from the (partly initialised) module here.
    """
    from . import recipes

    try:
        return tuple(recipes.COMMON_DEFAULTS), tuple(recipes.METHOD_NAMES)
    except AttributeError as err:
        raise ImportError(
            "ipmcondense.condensation.recipes must import dataset_config after defining COMMON_DEFAULTS and "
            f"METHOD_NAMES (the dataset files are validated against them): {err}"
        ) from err


def _tuples(value: Any) -> Any:
    """TOML arrays as tuples, recursively (the type the recipes use for every sequence)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _row(table: Any, where: str, source: str, keys: Iterable[str]) -> MappingProxyType:
    """A ``{hyperparameter: value}`` table, checked: known keys, scalar or array values."""
    if not isinstance(table, dict):
        raise ValueError(f"{source}: [{where}] must be a table of hyperparameters, got {table!r}")
    known = tuple(keys)
    row = {}
    for key, value in table.items():
        if key not in known:
            raise ValueError(
                f"{source}: unknown hyperparameter {key!r} in [{where}]; expected one of: {', '.join(sorted(known))}"
            )
        if isinstance(value, dict):
            raise ValueError(f"{source}: [{where}] {key} must be a value, got a table {value!r}")
        row[key] = _tuples(value)
    return MappingProxyType(row)


def _method(name: str, where: str, source: str, methods: Iterable[str]) -> str:
    known = tuple(methods)
    if name not in known:
        raise ValueError(f"{source}: unknown method {name!r} in [{where}]; expected one of: {', '.join(known)}")
    return name


def _ipc(key: str, where: str, source: str) -> int:
    if not (key.isascii() and key.isdigit()) or int(key) < 1:
        raise ValueError(f"{source}: IPC key {key!r} in [{where}] is not a positive integer (images per class)")
    return int(key)


def _parse(data: Mapping[str, Any], dataset: str, source: str, keys: tuple[str, ...],
           methods: tuple[str, ...]) -> DatasetConfig:
    for section in data:
        if section not in SECTIONS:
            raise ValueError(f"{source}: unknown section {section!r}; expected one of: {', '.join(SECTIONS)}")
    defaults = _row(data.get("defaults", {}), "defaults", source, keys)
    budgets_table = data.get("budgets", {})
    if not isinstance(budgets_table, dict):
        raise ValueError(f"{source}: [budgets] must be a table of methods, got {budgets_table!r}")
    budgets = {
        _method(method, f"budgets.{method}", source, methods): _row(row, f"budgets.{method}", source, keys)
        for method, row in budgets_table.items()
    }
    ipc_table = data.get("ipc_budgets", {})
    if not isinstance(ipc_table, dict):
        raise ValueError(f"{source}: [ipc_budgets] must be a table of methods, got {ipc_table!r}")
    ipc_budgets: dict[str, MappingProxyType] = {}
    for method, by_ipc in ipc_table.items():
        where = f"ipc_budgets.{method}"
        _method(method, where, source, methods)
        if not isinstance(by_ipc, dict):
            raise ValueError(f"{source}: [{where}] must be a table of IPC rows ([{where}.<ipc>]), got {by_ipc!r}")
        ipc_budgets[method] = MappingProxyType({
            _ipc(ipc, where, source): _row(row, f"{where}.{ipc}", source, keys) for ipc, row in by_ipc.items()
        })
    return DatasetConfig(dataset, source, defaults, MappingProxyType(budgets), MappingProxyType(ipc_budgets))


def config_files() -> dict[str, Any]:
    """``{dataset: file}`` of the shipped configuration files (:mod:`importlib.resources` traversables)."""
    folder = resources.files(CONFIG_PACKAGE) / CONFIG_FOLDER
    return {
        entry.name[: -len(".toml")]: entry
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".toml") and entry.is_file()
    }


def load_dataset_config(
    source: str | Path | Any,
    *,
    hyperparameter_keys: Iterable[str] | None = None,
    method_names: Iterable[str] | None = None,
) -> DatasetConfig:
    """Read and validate one dataset's file.

    Args:
        source: a shipped dataset's name (``"digits"``), a path to a ``<dataset>.toml`` file, or an
            :mod:`importlib.resources` traversable; the dataset is the file name without ``.toml``.
        hyperparameter_keys: the allowed keys (default: ``COMMON_DEFAULTS`` of the recipe table).
        method_names: the allowed methods (default: ``METHOD_NAMES`` of the recipe table).

    Raises:
        ValueError: naming the file and the key, for invalid TOML, an unknown section, hyperparameter
            or method, a non-integer IPC key, or a table where a value belongs.
    """
    if isinstance(source, str) and not source.endswith(".toml") and "/" not in source:
        files = config_files()
        if source not in files:
            raise ValueError(
                f"no configuration file for dataset {source!r}; shipped: {', '.join(files) or 'none'}"
            )
        source = files[source]
    elif isinstance(source, (str, Path)):
        source = Path(source)
    name = source.name
    if not name.endswith(".toml"):
        raise ValueError(f"{source}: a dataset configuration file must be named <dataset>.toml")
    if hyperparameter_keys is None or method_names is None:
        registry_keys, registry_methods = _registry_names()
        hyperparameter_keys = registry_keys if hyperparameter_keys is None else hyperparameter_keys
        method_names = registry_methods if method_names is None else method_names
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{source}: cannot read the dataset configuration file ({err})") from err
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{source}: not valid TOML ({err})") from err
    return _parse(data, name[: -len(".toml")], str(source), tuple(hyperparameter_keys), tuple(method_names))


def load_dataset_configs() -> dict[str, DatasetConfig]:
    """Every shipped dataset's file, read and validated, by dataset name."""
    return {dataset: load_dataset_config(entry) for dataset, entry in config_files().items()}


def _tables() -> tuple[MappingProxyType, MappingProxyType, MappingProxyType]:
    configs = load_dataset_configs().values()
    return (
        MappingProxyType({c.dataset: c.defaults for c in configs if c.defaults}),
        MappingProxyType({c.dataset: c.budgets for c in configs if c.budgets}),
        MappingProxyType({c.dataset: c.ipc_budgets for c in configs if c.ipc_budgets}),
    )


_TABLES = _tables()

#: ``{dataset: {hyperparameter: value}}``: dataset-wide settings (the files' ``[defaults]``).
DATASET_DEFAULTS: Mapping[str, Mapping[str, Any]] = _TABLES[0]

#: ``{dataset: {method: {hyperparameter: value}}}``: per-method budgets (``[budgets.<method>]``).
DATASET_BUDGETS: Mapping[str, Mapping[str, Mapping[str, Any]]] = _TABLES[1]

#: ``{dataset: {method: {ipc: {hyperparameter: value}}}}``: per-method per-IPC rows
#: (``[ipc_budgets.<method>.<ipc>]``), applied on top of the method's budget for that IPC.
DATASET_IPC_BUDGETS: Mapping[str, Mapping[str, Mapping[int, Mapping[str, Any]]]] = _TABLES[2]
