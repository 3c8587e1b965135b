"""Benchmark cells: the planned cell, its JSON path, its key, and the cache check.

A cell is one (profile, dataset, method, IPC, evaluation protocol); its result lives in
``benchmarks/results/condense/<profile>/<dataset>/<method>-ipc<k>.json`` (``-published`` before ``.json``
when evaluated with the method's published protocol; ``whole-dataset.json`` for the upper bound),
written atomically. A cached result counts when its JSON has ``status == "ok"``
and a key that describes the same computation as the planned cell (:func:`keys_match`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "RUNS_DIR",
    "CLASS_BATCHING_FILE",
    "CELL_FORMAT",
    "UPPER_BOUND",
    "Cell",
    "cell_name",
    "cell_path",
    "cell_key",
    "key_hash",
    "keys_match",
    "cached_cell",
    "atomic_write_json",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results" / "condense"
RUNS_DIR = REPO_ROOT / "runs" / "benchmarks"
CLASS_BATCHING_FILE = REPO_ROOT / "benchmarks" / "results" / "class_batching.json"
CELL_FORMAT = "ipmcondense-benchmark-cell-v1"
UPPER_BOUND = "whole-dataset"


@dataclasses.dataclass
class Cell:
    """One grid cell as planned (before it runs)."""

    profile: str
    dataset: str
    method: str
    ipc: int | None
    seed: int
    models: int
    eval_epochs: int | None
    overrides: dict[str, Any]
    key: dict[str, Any]
    skip_reason: str | None = None
    experts: dict[str, Any] | None = None
    protocol: str = "standard"

    @property
    def name(self) -> str:
        return cell_name(self.method, self.ipc, self.protocol)


def cell_name(method: str, ipc: int | None, protocol: str = "standard") -> str:
    """``<method>-ipc<k>``, plus ``-<protocol>`` for an evaluation protocol other than the standard one."""
    name = UPPER_BOUND if method == UPPER_BOUND else f"{method}-ipc{ipc}"
    return name if protocol == "standard" else f"{name}-{protocol}"


def cell_path(results_dir: Path, profile: str, dataset: str, method: str, ipc: int | None,
              protocol: str = "standard") -> Path:
    """``<results_dir>/<profile>/<dataset>/<method>-ipc<k>[-<protocol>].json`` (``whole-dataset.json`` for the
    bound); cells evaluated with the method's published protocol end in ``-published``."""
    return Path(results_dir) / profile / dataset / f"{cell_name(method, ipc, protocol)}.json"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def cell_key(
    *, profile: str, dataset: str, method: str, ipc: int | None, seed: int, models: int,
    eval_epochs: int | None, hyperparameters: dict[str, Any], experts: dict[str, Any] | None = None,
    protocol: str = "standard",
) -> dict[str, Any]:
    """What identifies a cell's result: if any of it changes, the cached number is stale.

    The evaluation ``protocol`` enters the key only when it is not ``"standard"`` (the keys of the cells
    cached before protocols could be chosen stay valid)."""
    key = {
        "profile": profile, "dataset": dataset, "method": method, "ipc": ipc, "seed": seed,
        "models": models, "eval_epochs": eval_epochs, "hyperparameters": hyperparameters,
        "experts": experts,
    }
    if protocol != "standard":
        key["protocol"] = protocol
    return _plain(key)


def key_hash(key: dict[str, Any]) -> str:
    """Short SHA-256 of the canonical JSON of ``key``."""
    return hashlib.sha256(json.dumps(_plain(key), sort_keys=True).encode()).hexdigest()[:16]


def keys_match(cached: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None) -> bool:
    """Whether a cached key describes the same computation as ``current``.

    Everything must be equal, except hyperparameters that exist on one side only: a key the library
    added after the cell ran counts as unchanged when its current value is its default (``defaults``),
    and a key the library has since removed is ignored.
    """
    cached, current = _plain(cached), _plain(current)
    if {k: v for k, v in cached.items() if k != "hyperparameters"} != {
        k: v for k, v in current.items() if k != "hyperparameters"
    }:
        return False
    old, new = cached.get("hyperparameters") or {}, current.get("hyperparameters") or {}
    defaults = _plain(dict(defaults or {}))
    for name in set(old) | set(new):
        if name in old and name in new:
            if old[name] != new[name]:
                return False
        elif name in new and name in defaults and new[name] != defaults[name]:
            return False
    return True


def cached_cell(path: Path, key: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The cached cell at ``path`` if it holds an ``ok`` result for ``key``; else ``None``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != CELL_FORMAT or data.get("status") != "ok":
        return None
    return data if keys_match(data.get("key", {}), key, defaults) else None


def atomic_write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as JSON (indent 1) to ``path`` atomically (:func:`ipmcondense.files.atomic_write_text`)."""
    from ipmcondense.files import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(_plain(obj), indent=1) + "\n", path)
