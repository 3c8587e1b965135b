"""Budget profiles of the benchmark grid, read from ``benchmarks/profiles.toml``.

A profile says what each cell of a dataset runs with: hyperparameter overrides (per dataset and
method, and per IPC), evaluation models and epochs, the IPCs and methods it runs, the whole-dataset
bound and the MTT expert buffer. The values, each with its justification, live in the TOML file;
this module turns them into :class:`Profile` objects and refuses a file with an unknown field,
dataset, method, hyperparameter or a non-integer IPC (``ValueError`` naming the file and the key).

TOML has no null: the string ``"protocol"`` stands for ``None`` (the protocol's evaluation epochs) in
``eval_epochs`` and in the ``epochs`` of ``upper_bound``. A string where a dataset's table or list
belongs names an entry of the file's ``[shared]`` table. Arrays become tuples.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["PROFILES", "PROFILES_FILE", "Profile", "load_profiles"]

PROFILES_FILE = Path(__file__).resolve().parents[1] / "profiles.toml"
PROTOCOL = "protocol"  # stands for None (the evaluation protocol's epochs) in the TOML file


@dataclasses.dataclass(frozen=True)
class Profile:
    """A named budget: what each cell of a dataset runs with.

    Attributes:
        name: profile name (folder under ``benchmarks/results/condense``).
        description: one line for RESULTS.md.
        use_reference_iterations: override ``iterations`` with the recipe's reference value (the
            paper's), ignoring the per-dataset budget's iteration count.
        overrides: ``{dataset: {method: {hyperparameter: value}}}`` on top of the recipe and its dataset
            budget; method ``"*"`` applies to every optimised recipe *without* a dataset budget
            (:data:`~ipmcondense.condensation.recipes.DATASET_BUDGETS`) for that dataset; a method's
            own entry is applied after ``"*"``.
        ipc_overrides: ``{dataset: {method: {ipc: {hyperparameter: value}}}}`` applied after
            ``overrides`` for that IPC only (an iteration count that fits the hour at IPC 1 does not at 10).
        models: ``{dataset: {ipc: n}}`` evaluation models (key ``0`` for any IPC not listed).
        eval_epochs: ``{dataset: {ipc: epochs}}`` evaluation epochs (``None``: the protocol's).
        ipcs: ``{dataset: ipcs}`` the IPCs the profile runs (other IPCs are skipped, with a reason).
        methods: ``{dataset: methods}`` the methods the profile runs by default (others are skipped,
            with a reason, unless named with ``--methods``); a dataset not listed runs every method.
        upper_bound: ``{dataset: {"epochs": E, "models": n}}``; a dataset not listed skips the bound.
        experts: ``{dataset: {"n_experts", "epochs", "train_fraction"}}`` the MTT expert buffer.
    """

    name: str
    description: str
    use_reference_iterations: bool = False
    overrides: dict[str, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)
    ipc_overrides: dict[str, dict[str, dict[int, dict[str, Any]]]] = dataclasses.field(default_factory=dict)
    models: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)
    eval_epochs: dict[str, dict[int, int | None]] = dataclasses.field(default_factory=dict)
    ipcs: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    methods: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    upper_bound: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    experts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def models_for(self, dataset: str, ipc: int) -> int:
        table = self.models.get(dataset, self.models.get("*", {0: 5}))
        return int(table.get(ipc, table.get(0, 5)))

    def eval_epochs_for(self, dataset: str, ipc: int) -> int | None:
        table = self.eval_epochs.get(dataset, self.eval_epochs.get("*", {}))
        return table.get(ipc, table.get(0))


class _Reader:
    """Converts one profile's TOML tables into :class:`Profile` fields, naming the file and key on error."""

    def __init__(self, source: str, shared: dict[str, Any], keys: Iterable[str], methods: Iterable[str],
                 datasets: Iterable[str]) -> None:
        self.source, self.shared = source, shared
        self.keys, self.methods, self.datasets = tuple(keys), tuple(methods), tuple(datasets)

    def fail(self, where: str, message: str) -> ValueError:
        return ValueError(f"{self.source}: [{where}] {message}")

    def table(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a table, got {value!r}")
        return value

    def integer(self, value: Any, where: str, *, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(where, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def ipc(self, key: str, where: str, *, allow_zero: bool = False) -> int:
        if not (key.isascii() and key.isdigit()) or (int(key) == 0 and not allow_zero):
            kind = "a non-negative integer (0: any IPC not listed)" if allow_zero else "a positive integer"
            raise self.fail(where, f"IPC key {key!r} is not {kind}")
        return int(key)

    def epochs(self, value: Any, where: str) -> int | None:
        return None if value == PROTOCOL else self.integer(value, where)

    def method(self, name: str, where: str, *, star: bool = False) -> str:
        allowed = (*self.methods, "*") if star else self.methods
        if name not in allowed:
            raise self.fail(where, f"unknown method {name!r}; expected one of: {', '.join(allowed)}")
        return name

    def hyperparameters(self, value: Any, where: str) -> dict[str, Any]:
        row = {}
        for key, item in self.table(value, where).items():
            if key not in self.keys:
                raise self.fail(where, f"unknown hyperparameter {key!r}; expected one of: {', '.join(sorted(self.keys))}")
            row[key] = tuple(item) if isinstance(item, list) else item
        return row

    def fields(self, value: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        table = self.table(value, where)
        for key in table:
            if key not in allowed:
                raise self.fail(where, f"unknown key {key!r}; expected one of: {', '.join(allowed)}")
        return dict(table)

    def by_dataset(self, value: Any, where: str, convert: Callable[[Any, str], Any]) -> dict[str, Any]:
        """``{dataset: convert(entry)}``; a string entry names a table of ``[shared]``."""
        out = {}
        for dataset, entry in self.table(value, where).items():
            if dataset != "*" and dataset not in self.datasets:
                raise self.fail(where, f"unknown dataset {dataset!r}; expected '*' or one of: {', '.join(self.datasets)}")
            at = f"{where}.{dataset}"
            if isinstance(entry, str):
                if entry not in self.shared:
                    raise self.fail(at, f"names {entry!r}, which is not in [shared] ({', '.join(self.shared) or 'empty'})")
                entry, at = self.shared[entry], f"shared.{entry}"
            out[dataset] = convert(entry, at)
        return out

    # one converter per Profile field: (value of one dataset, where) -> field value for that dataset
    def overrides(self, value: Any, where: str) -> dict[str, dict[str, Any]]:
        return {self.method(m, where, star=True): self.hyperparameters(row, f"{where}.{m}")
                for m, row in self.table(value, where).items()}

    def ipc_overrides(self, value: Any, where: str) -> dict[str, dict[int, dict[str, Any]]]:
        return {self.method(m, where): {self.ipc(k, f"{where}.{m}"): self.hyperparameters(row, f"{where}.{m}.{k}")
                                        for k, row in self.table(by_ipc, f"{where}.{m}").items()}
                for m, by_ipc in self.table(value, where).items()}

    def models(self, value: Any, where: str) -> dict[int, int]:
        return {self.ipc(k, where, allow_zero=True): self.integer(n, f"{where}.{k}") for k, n in self.table(value, where).items()}

    def eval_epochs(self, value: Any, where: str) -> dict[int, int | None]:
        return {self.ipc(k, where, allow_zero=True): self.epochs(e, f"{where}.{k}") for k, e in self.table(value, where).items()}

    def ipcs(self, value: Any, where: str) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list of IPCs, got {value!r}")
        return tuple(self.integer(v, where) for v in value)

    def methods_list(self, value: Any, where: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list of methods, got {value!r}")
        return tuple(self.method(v, where) for v in value)

    def upper_bound(self, value: Any, where: str) -> dict[str, Any]:
        spec = self.fields(value, where, ("epochs", "models"))
        if "epochs" in spec:
            spec["epochs"] = self.epochs(spec["epochs"], f"{where}.epochs")
        if "models" in spec:
            spec["models"] = self.integer(spec["models"], f"{where}.models")
        return spec

    def experts(self, value: Any, where: str) -> dict[str, Any]:
        spec = self.fields(value, where, ("n_experts", "epochs", "train_fraction"))
        for key in ("n_experts", "epochs"):
            if key in spec:
                spec[key] = self.integer(spec[key], f"{where}.{key}")
        fraction = spec.get("train_fraction", 1.0)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise self.fail(f"{where}.train_fraction", f"must be a number in (0, 1], got {fraction!r}")
        return spec

    def profile(self, name: str, value: Any) -> Profile:
        where = f"profiles.{name}"
        table = dict(self.table(value, where))
        per_dataset = {"overrides": self.overrides, "ipc_overrides": self.ipc_overrides, "models": self.models,
                       "eval_epochs": self.eval_epochs, "ipcs": self.ipcs, "methods": self.methods_list,
                       "upper_bound": self.upper_bound, "experts": self.experts}
        known = [f.name for f in dataclasses.fields(Profile) if f.name != "name"]
        kwargs: dict[str, Any] = {}
        for key, item in table.items():
            if key not in known:
                raise self.fail(where, f"unknown field {key!r}; expected one of: {', '.join(known)}")
            if key in per_dataset:
                kwargs[key] = self.by_dataset(item, f"{where}.{key}", per_dataset[key])
            elif key == "description":
                if not isinstance(item, str) or not item.strip():
                    raise self.fail(f"{where}.description", f"must be a non-empty string, got {item!r}")
                kwargs[key] = item
            else:  # use_reference_iterations
                if not isinstance(item, bool):
                    raise self.fail(f"{where}.{key}", f"must be true or false, got {item!r}")
                kwargs[key] = item
        if "description" not in kwargs:
            raise self.fail(where, "needs a description (one line for RESULTS.md)")
        return Profile(name=name, **kwargs)


def load_profiles(
    path: str | Path = PROFILES_FILE,
    *,
    hyperparameter_keys: Iterable[str] | None = None,
    method_names: Iterable[str] | None = None,
    dataset_names: Iterable[str] | None = None,
) -> dict[str, Profile]:
    """``{name: Profile}`` from the TOML file at ``path`` (``[profiles.<name>]`` tables, ``[shared]`` entries).

    The allowed hyperparameters, methods and datasets default to the library's
    (:data:`~ipmcondense.condensation.recipes.COMMON_DEFAULTS`, ``METHOD_NAMES``,
    :data:`ipmcondense.data.DATASET_NAMES`).
    """
    path = Path(path)
    if hyperparameter_keys is None or method_names is None:
        from ipmcondense.condensation.recipes import COMMON_DEFAULTS, METHOD_NAMES

        hyperparameter_keys = tuple(COMMON_DEFAULTS) if hyperparameter_keys is None else hyperparameter_keys
        method_names = METHOD_NAMES if method_names is None else method_names
    if dataset_names is None:
        from ipmcondense.data import DATASET_NAMES as dataset_names
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{path}: cannot read the profiles file ({err})") from err
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from err
    for key in data:
        if key not in ("shared", "profiles"):
            raise ValueError(f"{path}: unknown top-level table {key!r}; expected 'shared' and 'profiles'")
    shared = data.get("shared", {})
    reader = _Reader(str(path), shared, hyperparameter_keys, method_names, dataset_names)
    reader.table(shared, "shared")
    profiles = {name: reader.profile(name, value) for name, value in reader.table(data.get("profiles", {}), "profiles").items()}
    if not profiles:
        raise ValueError(f"{path}: defines no [profiles.<name>] table")
    return profiles


PROFILES: dict[str, Profile] = load_profiles()
