"""Benchmark grid: every condensation recipe x dataset x images per class, cached cell by cell.

A *cell* is one (profile, dataset, method, IPC): condense with the registry recipe under the profile's
budget, evaluate ``models`` fresh networks with the standard protocol, and store everything needed to
trust the number in ``benchmarks/results/condense/<profile>/<dataset>/<method>-ipc<k>.json`` (written
atomically): the cell key (the resolved hyperparameters before the run), the run's own configuration
(from its ``metrics.json``), library version, git commit, seed, accuracy mean and std over the
models, per-model accuracies and seeds, condensation time, time per outer iteration, peak memory of
the cell's process and the hardware. The whole-dataset upper bound is the cell
``whole-dataset.json`` (a network trained on the full training set with the same protocol).

Every cell runs in its own subprocess (peak RSS = that cell alone; a crash or timeout records the
error in the cell's JSON and the grid goes on). A cell whose JSON exists with ``status == "ok"`` and
the same key is never recomputed (``--force`` recomputes). Cells that cannot run here (no data, a
profile that leaves them out) are written with ``status == "skipped"`` and the reason.

Budget profiles (:data:`PROFILES`, read from ``benchmarks/profiles.toml``, each value with its reason):

* ``cpu-small``: about two hours per dataset on 2 CPU cores. ``digits`` uses the recipes' own
  dataset budgets (:data:`ipmcondense.condensation.recipes.DATASET_BUDGETS`); MNIST and
  Fashion-MNIST use the iteration counts, real batch sizes, evaluation epochs and model counts
  listed in the profile. These budgets are far below the papers': the numbers say how the library
  behaves at small cost, not what the methods reach.
* ``paper``: the references' outer iterations (the recipe defaults), the protocol's epochs
  (1000 with DSA) and 5 evaluation models.

Usage::

    python benchmarks/condense.py --dry-run                                   # cells and estimated cost
    python benchmarks/condense.py --datasets digits --methods random dm --ipc 1
    python benchmarks/condense.py --profile cpu-small --datasets digits       # a whole dataset
    python benchmarks/condense.py --class-batching --datasets digits --methods dm m3d dc --ipc 10
    python benchmarks/make_results.py                                         # RESULTS.md from the cells
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = [
    "PROFILES",
    "UPPER_BOUND",
    "CELL_FORMAT",
    "Profile",
    "Cell",
    "cell_path",
    "cell_key",
    "key_hash",
    "keys_match",
    "cached_cell",
    "plan_cells",
    "estimate_cell_seconds",
    "hardware_string",
    "atomic_write_json",
    "main",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results" / "condense"
RUNS_DIR = REPO_ROOT / "runs" / "benchmarks"
CLASS_BATCHING_FILE = REPO_ROOT / "benchmarks" / "results" / "class_batching.json"
CELL_FORMAT = "ipmcondense-benchmark-cell-v1"
UPPER_BOUND = "whole-dataset"
DEFAULT_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
DEFAULT_IPCS = (1, 10, 50)
BASELINES = ("random", "herding", "kcenter")


# ------------------------------------------------------------------------------------------ profiles

# The budget profiles live in benchmarks/profiles.toml, each value with its reason; benchmarks/grid is
# imported as the package ``grid`` (a script's folder is on sys.path already, a module loaded from
# its file needs it added).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from grid.profiles import PROFILES, PROFILES_FILE, Profile, load_profiles  # noqa: E402



# ------------------------------------------------------------------------------------------ cells


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

    @property
    def name(self) -> str:
        return UPPER_BOUND if self.method == UPPER_BOUND else f"{self.method}-ipc{self.ipc}"


def cell_path(results_dir: Path, profile: str, dataset: str, method: str, ipc: int | None) -> Path:
    """``<results_dir>/<profile>/<dataset>/<method>-ipc<k>.json`` (``whole-dataset.json`` for the bound)."""
    name = UPPER_BOUND if method == UPPER_BOUND else f"{method}-ipc{ipc}"
    return Path(results_dir) / profile / dataset / f"{name}.json"


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
) -> dict[str, Any]:
    """What identifies a cell's result: if any of it changes, the cached number is stale."""
    return _plain({
        "profile": profile, "dataset": dataset, "method": method, "ipc": ipc, "seed": seed,
        "models": models, "eval_epochs": eval_epochs, "hyperparameters": hyperparameters,
        "experts": experts,
    })


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
    """Write ``obj`` as JSON to a temporary file next to ``path``, then ``os.replace`` it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(_plain(obj), handle, indent=1)
            handle.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------ planning


def _dataset_status(name: str, data_root: str | None, download: bool, cache: dict) -> tuple[Any, str | None]:
    """(LabelledImages or None, reason it is unavailable)."""
    if name not in cache:
        from ipmcondense.data import load_dataset

        try:
            cache[name] = (load_dataset(name, data_root, download=download), None)
        except Exception as err:  # noqa: BLE001 - any loader failure means "no data here"
            cache[name] = (None, f"data not available: {str(err).splitlines()[0]}")
    return cache[name]


def _hyperparameters(profile: Profile, dataset: str, method: str, extra: dict[str, Any],
                     ipc: int | None = None) -> tuple[dict, dict]:
    """(overrides passed to condense, resolved hyperparameters for the key, per-IPC budgets included)."""
    from ipmcondense.condensation.recipes import COMMON_DEFAULTS, DATASET_BUDGETS, get_recipe, resolve_config

    recipe = get_recipe(method)
    overrides: dict[str, Any] = {}
    if not recipe.is_selection:
        table = profile.overrides.get(dataset, {})
        if method not in DATASET_BUDGETS.get(dataset, {}):
            overrides.update(table.get("*", {}))
        overrides.update(table.get(method, {}))
        if ipc is not None:
            overrides.update(profile.ipc_overrides.get(dataset, {}).get(method, {}).get(ipc, {}))
        if profile.use_reference_iterations:
            overrides["iterations"] = recipe.defaults.get("iterations", COMMON_DEFAULTS["iterations"])
    overrides.update(extra)
    resolved = resolve_config(recipe, dataset, overrides, ipc=ipc)
    if recipe.is_selection:
        resolved["iterations"] = 0
        resolved["init"] = recipe.selection
    resolved.pop("experts", None)  # a path: the buffer's settings go in the key instead
    return overrides, resolved


def plan_cells(
    profile: Profile, datasets: list[str], ipcs: list[int], methods: list[str] | None, *, seed: int = 0,
    models: int | None = None, data_root: str | None = None, download: bool = False,
    upper_bound: bool = True, dataset_cache: dict | None = None,
) -> list[Cell]:
    """Every cell of the grid, in run order (cheap IPCs first), with a skip reason where it cannot run.

    ``methods=None`` means the profile's methods for each dataset (every registry row if it names none).
    """
    from ipmcondense.condensation.recipes import METHOD_NAMES, get_recipe

    cache = dataset_cache if dataset_cache is not None else {}
    explicit = methods is not None
    cells: list[Cell] = []
    for dataset in datasets:
        ds, missing = _dataset_status(dataset, data_root, download, cache)
        names = list(methods) if explicit else list(METHOD_NAMES)
        for ipc in sorted(ipcs):
            for method in names:
                if method == UPPER_BOUND:
                    continue
                get_recipe(method)
                n_models = models or profile.models_for(dataset, ipc)
                epochs = profile.eval_epochs_for(dataset, ipc)
                overrides, resolved = _hyperparameters(profile, dataset, method, {}, ipc)
                experts = None
                if get_recipe(method).objective == "mtt":
                    experts = dict(profile.experts.get(dataset, profile.experts.get("*", {}))) or None
                    if experts is not None:
                        experts["arch"] = resolved["arch"]
                key = cell_key(profile=profile.name, dataset=dataset, method=method, ipc=ipc, seed=seed,
                               models=n_models, eval_epochs=epochs, hyperparameters=resolved, experts=experts)
                reason = missing
                if reason is None and profile.ipcs.get(dataset) is not None and ipc not in profile.ipcs[dataset]:
                    reason = f"IPC {ipc} is not in the {profile.name} profile for {dataset} (runs {list(profile.ipcs[dataset])})"
                if reason is None and not explicit and dataset in profile.methods and method not in profile.methods[dataset]:
                    reason = (f"not in the {profile.name} method list for {dataset} (name it with --methods to run it)")
                if reason is None and get_recipe(method).objective == "mtt" and not experts:
                    reason = f"the {profile.name} profile defines no expert buffer for {dataset}"
                if reason is None and ds is not None:
                    smallest = int(ds.train_labels.bincount(minlength=ds.num_classes).min())
                    if ipc > smallest:
                        reason = f"IPC {ipc} exceeds the smallest class ({smallest} training images)"
                cells.append(Cell(profile.name, dataset, method, ipc, seed, n_models, epochs, overrides, key,
                                  reason, experts))
        if upper_bound and (not explicit or UPPER_BOUND in names):
            spec = profile.upper_bound.get(dataset)
            n_models = models or (spec or {}).get("models", 1)
            epochs = (spec or {}).get("epochs")
            key = cell_key(profile=profile.name, dataset=dataset, method=UPPER_BOUND, ipc=None, seed=seed,
                           models=n_models, eval_epochs=epochs, hyperparameters={"arch": _dataset_arch(dataset)})
            reason = missing or (None if spec else f"the {profile.name} profile runs no whole-dataset bound for {dataset}")
            cells.append(Cell(profile.name, dataset, UPPER_BOUND, None, seed, n_models, epochs, {}, key, reason))
    return cells


# ------------------------------------------------------------------------------------------ cost model

# seconds per image through ConvNet-3 forward+backward, one loaded CPU core (measured: digits 256-batch
# step 0.18 s, MNIST 256-batch step 2.5 s); CIFAR-10 ~1.5x MNIST. Overhead per optimiser step ~5 ms.
_SECONDS_PER_IMAGE = {"digits": 7e-4, "mnist": 1e-2, "fashion-mnist": 1e-2, "cifar10": 1.5e-2,
                      "cifar100": 1.5e-2, "svhn": 1.5e-2}
_STEP_OVERHEAD = 5e-3
_GPU_SPEEDUP = 100.0


def estimate_cell_seconds(cell: Cell, num_classes: int = 10, train_size: int = 50000, test_size: int = 10000,
                          device: str = "cpu") -> float:
    """A rough cost (seconds) of a cell: condensation + evaluation, from per-image pass costs.

    An order-of-magnitude model for ``--dry-run``, not a prediction: forward-only passes count 1/3 of
    a forward+backward pass; the loops of each objective are counted from the resolved hyperparameters.
    """
    unit = _SECONDS_PER_IMAGE.get(cell.dataset, 1.5e-2) / (_GPU_SPEEDUP if device.startswith("cuda") else 1.0)
    h = cell.key["hyperparameters"]
    test_pass = test_size * unit / 3
    if cell.method == UPPER_BOUND:
        epochs = cell.eval_epochs if cell.eval_epochs is not None else 1000
        return cell.models * ((epochs + 1) * (train_size * unit + math.ceil(train_size / 256) * _STEP_OVERHEAD) + test_pass)
    from ipmcondense.condensation.recipes import get_recipe

    recipe = get_recipe(cell.method)
    ipc, n = cell.ipc, num_classes
    syn = ipc * n
    real = h.get("batch_real", 256) * n
    iterations = h.get("iterations", 0)
    if recipe.is_selection:
        condense = 0.0 if recipe.selection == "random" else train_size * unit / 3
    elif recipe.objective == "matching":
        if recipe.sampler == "fresh_inner":
            outer = h.get("outer_loop") or (1 if ipc == 1 else 10 if ipc <= 10 else 50)
            inner = h.get("inner_loop") or (1 if ipc == 1 else 50 if ipc <= 10 else 10)
            per = outer * (real + 3 * syn + inner * syn) * unit
        else:
            per = (real / 3 + 2 * syn) * unit
            if recipe.sampler == "pool":
                per += h.get("train_steps", 10) * h.get("batch_pool", 26) * n * unit
        condense = iterations * (per + n * _STEP_OVERHEAD)
    elif recipe.objective == "mtt":
        batch = h.get("batch_syn") or syn
        per = 3 * h.get("syn_steps", 20) * batch * unit
        experts = cell.experts or {}
        buffer = experts.get("n_experts", 0) * experts.get("epochs", 0) * train_size * experts.get("train_fraction", 1.0) * unit
        condense = iterations * per + buffer
    elif recipe.objective in ("kip", "rfad"):
        per = (h.get("batch_real", 256) + syn) * unit * (h.get("n_models", 1) if recipe.objective == "rfad" else 0.1)
        condense = iterations * (per + _STEP_OVERHEAD)
    elif recipe.objective == "dd":
        condense = iterations * (3 * h.get("dd_steps", 10) * syn + h.get("batch_real", 100) * n) * unit
    else:  # rcig and any new objective: inner steps on S plus a real batch
        condense = iterations * (h.get("rcig_inner_steps", 10) * syn / 3 + h.get("batch_real", 100) * n) * unit
    epochs = cell.eval_epochs if cell.eval_epochs is not None else 1000
    steps = math.ceil(syn / 256)
    evaluation = cell.models * ((epochs + 1) * (syn * unit + steps * _STEP_OVERHEAD) + test_pass)
    return condense + evaluation


# ------------------------------------------------------------------------------------------ environment


def hardware_string(device: str = "cpu") -> str:
    """CPU model, logical cores, torch threads and version, device (GPU name when CUDA)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), device {device}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f" ({torch.cuda.get_device_name(torch.device(device))})"
    return text


def git_commit() -> str | None:
    """``HEAD``'s hash (``+dirty`` when the working tree has changes), or ``None`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=20).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _peak_memory() -> dict[str, float | None]:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"peak_rss_mb": rss, "peak_gpu_mb": gpu}


# ------------------------------------------------------------------------------------------ child side


def _expert_buffer(spec: dict[str, Any], ds: Any) -> tuple[str, float]:
    """Build (or reuse: :func:`train_experts` resumes) the profile's MTT buffer; return (path, seconds).

    The folder is named by everything that determines the buffer (dataset, architecture, experts,
    epochs, training fraction, seed), not by the profile: profiles with the same buffer share it.
    """
    import torch

    from ipmcondense.trajectories import train_experts

    experts = spec["experts"]
    fraction = float(experts.get("train_fraction", 1.0))
    folder = Path(spec["runs_dir"]) / "experts" / (
        f"{spec['dataset']}-{experts['arch']}-n{experts['n_experts']}-e{experts['epochs']}-f{fraction:g}"
        f"-s{int(spec['seed'])}")
    train = ds
    if fraction < 1.0:
        generator = torch.Generator().manual_seed(int(spec["seed"]))
        keep = []
        for c in range(ds.num_classes):
            idx = (ds.train_labels == c).nonzero().flatten()
            take = max(1, int(round(fraction * idx.numel())))
            keep.append(idx[torch.randperm(idx.numel(), generator=generator)[:take]])
        index = torch.cat(keep)
        train = dataclasses.replace(ds, train_images=ds.train_images[index], train_labels=ds.train_labels[index])
    start = time.perf_counter()
    train_experts(train, n_experts=int(experts["n_experts"]), epochs=int(experts["epochs"]), out_dir=folder,
                  arch=experts["arch"], seed=int(spec["seed"]), progress=False, device=spec.get("device"))
    return str(folder), time.perf_counter() - start


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one cell in this (fresh) process and return its measurements."""
    import torch

    from ipmcondense.condensation.api import condense, evaluate
    from ipmcondense.data import load_dataset
    from ipmcondense.evaluation import EvaluationProtocol, evaluate_synthetic

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    ds = load_dataset(spec["dataset"], spec.get("data_root"), download=bool(spec.get("download")))
    device = spec.get("device") or "cpu"
    out: dict[str, Any] = {"notes": []}
    if spec["method"] == UPPER_BOUND:
        protocol = EvaluationProtocol(arch=_dataset_arch(spec["dataset"]), epochs=spec["eval_epochs"])
        start = time.perf_counter()
        result = evaluate_synthetic(ds.train_images.to(device), ds.train_labels.to(device), ds, protocol,
                                    n_models=int(spec["models"]), seed=int(spec["seed"]), device=device)
        out.update(accuracy_mean=result.accuracy_mean, accuracy_std=result.accuracy_std,
                   accuracies=list(result.accuracies), eval_seeds=list(result.seeds), n_models=result.n_models,
                   eval_protocol=result.protocol, eval_seconds=time.perf_counter() - start,
                   condense_seconds=0.0, seconds_per_iteration=None, iterations=0,
                   config={"dataset": ds.name, "train_size": int(ds.train_labels.numel()), "arch": protocol.arch})
        if spec["eval_epochs"] is not None:
            out["notes"].append(f"trained {spec['eval_epochs']} (+1) epochs on the whole training set instead of "
                                f"the protocol's 1000 (budget of the {spec['profile']} profile)")
        out.update(_peak_memory())
        return out
    overrides = dict(spec["overrides"])
    if spec.get("experts"):
        path, seconds = _expert_buffer(spec, ds)
        overrides["experts"] = path
        out["experts_seconds"] = seconds
        out["notes"].append(
            f"expert buffer: {spec['experts']['n_experts']} experts x {spec['experts']['epochs']} epochs on "
            f"{spec['experts'].get('train_fraction', 1.0):g} of the training set ({seconds:.0f} s to build, "
            "not counted in the condensation time)")
    run_dir = Path(spec["run_dir"])
    start = time.perf_counter()
    condense(spec["method"], ds, int(spec["ipc"]), out=run_dir, seed=int(spec["seed"]), data_root=spec.get("data_root"),
             overwrite=True, progress=False, device=device, **overrides)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    start = time.perf_counter()
    report = evaluate(run_dir, ds, models=int(spec["models"]), epochs=spec["eval_epochs"], seed=int(spec["seed"]),
                      device=device)
    out.update(
        accuracy_mean=report["accuracy_mean"], accuracy_std=report["accuracy_std"], accuracies=report["accuracies"],
        eval_seeds=report["seeds"], n_models=report["n_models"], eval_protocol=report["protocol"],
        eval_seconds=time.perf_counter() - start, condense_seconds=metrics["seconds"],
        condense_wall_seconds=wall, seconds_per_iteration=metrics["seconds_per_iteration"] or None,
        iterations=metrics["iterations"], config=metrics["config"], threads=metrics.get("threads"),
        final_loss=(metrics["loss_history"] or [None])[-1],
    )
    if spec["eval_epochs"] is not None:
        out["notes"].append(f"evaluation: {spec['eval_epochs']} (+1) epochs instead of the protocol's 1000")
    out["torch_threads"] = torch.get_num_threads()
    out.update(_peak_memory())
    return out


def _child_main(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    try:
        result = {"status": "ok", **run_child(spec), "hardware": hardware_string(spec.get("device") or "cpu")}
    except BaseException as err:  # noqa: BLE001 - recorded in the cell, the parent decides
        result = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
        result.update(_peak_memory())
    atomic_write_json(result, Path(spec["result_file"]))
    return 0 if result["status"] == "ok" else 1


# ------------------------------------------------------------------------------------------ parent side


def _base_record(cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    from ipmcondense import __version__

    return {
        "format": CELL_FORMAT, "profile": cell.profile, "dataset": cell.dataset, "method": cell.method,
        "ipc": cell.ipc, "seed": cell.seed, "models_requested": cell.models, "eval_epochs": cell.eval_epochs,
        "key": cell.key, "key_hash": key_hash(cell.key), "version": __version__, "git_commit": git_commit(),
        "hardware": hardware_string(args.device), "device": args.device,
        "load_average_1min_at_end": os.getloadavg()[0],
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_cell(cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``cell`` in a subprocess with a timeout; return the record (also written to its JSON)."""
    path = cell_path(args.results_dir, cell.profile, cell.dataset, cell.method, cell.ipc)
    run_dir = Path(args.runs_dir) / cell.profile / cell.dataset / cell.name
    with tempfile.TemporaryDirectory(prefix="ipmcondense-bench-") as tmp:
        spec = {
            "profile": cell.profile, "dataset": cell.dataset, "method": cell.method, "ipc": cell.ipc,
            "seed": cell.seed, "models": cell.models, "eval_epochs": cell.eval_epochs, "overrides": cell.overrides,
            "experts": cell.experts, "data_root": args.data_root, "download": args.download, "device": args.device,
            "threads": args.threads,
            "run_dir": str(run_dir), "runs_dir": str(args.runs_dir), "result_file": str(Path(tmp) / "result.json"),
        }
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_file)],
                                  capture_output=True, text=True, timeout=args.timeout, cwd=REPO_ROOT)
            stderr, timed_out = proc.stderr, False
        except subprocess.TimeoutExpired as err:
            stderr, timed_out = (err.stderr or b"").decode() if isinstance(err.stderr, bytes) else (err.stderr or ""), True
        elapsed = time.perf_counter() - start
        result_file = Path(spec["result_file"])
        result = json.loads(result_file.read_text()) if result_file.exists() else None
    record = _base_record(cell, args)
    record["cell_wall_seconds"] = elapsed
    if timed_out:
        record.update(status="error", error=f"timed out after {args.timeout:.0f} s", stderr_tail=stderr[-2000:])
    elif result is None:
        record.update(status="error", error=f"the cell process died (exit {proc.returncode})", stderr_tail=stderr[-2000:])
    else:
        record.update(result)
        if record["status"] != "ok":
            record["stderr_tail"] = stderr[-2000:]
        record["run_dir"] = os.path.relpath(run_dir, REPO_ROOT)
    atomic_write_json(record, path)
    return record


def _format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_grid(args: argparse.Namespace) -> int:
    """Plan, print, and (unless ``--dry-run``) run the missing cells."""
    from ipmcondense.condensation.recipes import COMMON_DEFAULTS

    profile = PROFILES[args.profile]
    cache: dict = {}
    cells = plan_cells(profile, args.datasets, args.ipc, args.methods, seed=args.seed, models=args.models,
                       data_root=args.data_root, download=args.download, upper_bound=not args.no_upper_bound,
                       dataset_cache=cache)
    totals: dict[str, float] = {}
    skipped: dict[str, int] = {}
    todo: list[Cell] = []
    print(f"profile {profile.name}: {profile.description}")
    for cell in cells:
        path = cell_path(args.results_dir, cell.profile, cell.dataset, cell.method, cell.ipc)
        label = f"{cell.dataset:14s} {cell.name:24s}"
        if cell.skip_reason is not None:
            reason = cell.skip_reason if len(cell.skip_reason) <= 100 else cell.skip_reason[:97] + "..."
            if args.verbose or not reason.startswith(("data not available", "IPC", "not in the")):
                print(f"  skip   {label} {reason}")
            skipped[reason.split(":")[0] if reason.startswith("data") else reason.split(" (")[0]] = (
                skipped.get(reason.split(":")[0] if reason.startswith("data") else reason.split(" (")[0], 0) + 1)
            if not args.dry_run:
                previous = cached_cell(path, cell.key, COMMON_DEFAULTS)
                if previous is None:
                    atomic_write_json({**_base_record(cell, args), "status": "skipped", "reason": cell.skip_reason}, path)
            continue
        if not args.force and cached_cell(path, cell.key, COMMON_DEFAULTS) is not None:
            print(f"  cached {label} {os.path.relpath(path, REPO_ROOT)}")
            continue
        ds = cache[cell.dataset][0]
        estimate = estimate_cell_seconds(cell, ds.num_classes, int(ds.train_labels.numel()),
                                         int(ds.test_labels.numel()), args.device)
        totals[cell.dataset] = totals.get(cell.dataset, 0.0) + estimate
        print(f"  run    {label} models={cell.models} eval_epochs={cell.eval_epochs or 'protocol'} "
              f"iterations={cell.key['hyperparameters'].get('iterations', 0)} ~{_format_seconds(estimate)}")
        todo.append(cell)
    for reason, count in skipped.items():
        print(f"  skipped {count} cell(s): {reason} (--verbose lists them)")
    for dataset, seconds in totals.items():
        print(f"estimated cost {dataset}: {_format_seconds(seconds)} (rough model: one loaded core; see estimate_cell_seconds)")
    print(f"{len(todo)} cell(s) to run, {_format_seconds(sum(totals.values()))} estimated in all")
    if args.dry_run:
        return 0
    if args.max_cells is not None:
        todo = todo[: args.max_cells]
    failures = 0
    for i, cell in enumerate(todo, 1):
        path = cell_path(args.results_dir, cell.profile, cell.dataset, cell.method, cell.ipc)
        if not args.force and cached_cell(path, cell.key, COMMON_DEFAULTS) is not None:
            # another grid process sharing the results folder finished it meanwhile
            print(f"[{i}/{len(todo)}] {cell.profile}/{cell.dataset}/{cell.name}: cached meanwhile", flush=True)
            continue
        print(f"[{i}/{len(todo)}] {cell.profile}/{cell.dataset}/{cell.name} ...", flush=True)
        record = run_cell(cell, args)
        if record["status"] == "ok":
            acc = 100 * record["accuracy_mean"]
            print(f"    ok: {acc:.1f} ± {100 * record['accuracy_std']:.1f} % over {record['n_models']} model(s); "
                  f"condensation {record['condense_seconds']:.1f} s; cell {record['cell_wall_seconds']:.0f} s", flush=True)
        else:
            failures += 1
            print(f"    error: {record['error']}", flush=True)
    return 1 if failures else 0


def _dataset_arch(dataset: str) -> str:
    """The evaluation network of ``dataset``'s cells (the recipes' default arch for it)."""
    from ipmcondense.condensation.recipes import COMMON_DEFAULTS, DATASET_DEFAULTS

    return DATASET_DEFAULTS.get(dataset, {}).get("arch", COMMON_DEFAULTS["arch"])


# ------------------------------------------------------------------------------------------ class batching


def class_batching_ratio(dataset: str, methods: list[str], ipc: int, iterations: int, repeats: int,
                         data_root: str | None = None, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Time per outer iteration with ``class_batching`` on and off, interleaved in this one process.

    For each recipe, ``repeats`` pairs of short runs alternate the order (on/off, off/on, ...); each run's
    time per iteration is the median of its iterations after the first (warm-up). The ratio of a pair
    is loop / batched (> 1: batching is faster); the median ratio over pairs is reported. The loss
    histories of both settings are compared as a check that they compute the same objective.
    """
    from ipmcondense.condensation.api import condense
    from ipmcondense.data import load_dataset

    ds = load_dataset(dataset, data_root)
    rows = []
    for method in methods:
        times: dict[bool, list[float]] = {True: [], False: []}
        ratios, loss_gap = [], 0.0
        for r in range(repeats):
            pair = {}
            for flag in ((True, False) if r % 2 == 0 else (False, True)):
                result = condense(method, ds, ipc, iterations=iterations, seed=seed + r, progress=False,
                                  device=device, class_batching=flag)
                steps = result.metrics["iteration_seconds"][1:] or result.metrics["iteration_seconds"]
                pair[flag] = (statistics.median(steps), result.metrics["loss_history"])
                times[flag].append(pair[flag][0])
            ratios.append(pair[False][0] / pair[True][0])
            for a, b in zip(pair[True][1], pair[False][1]):
                loss_gap = max(loss_gap, abs(a - b) / max(abs(a), abs(b), 1e-12))
        rows.append({
            "method": method, "ipc": ipc, "iterations_per_run": iterations, "repeats": repeats,
            "seconds_per_iteration_batched": times[True], "seconds_per_iteration_loop": times[False],
            "median_batched": statistics.median(times[True]), "median_loop": statistics.median(times[False]),
            "ratios_loop_over_batched": ratios, "median_ratio": statistics.median(ratios),
            "max_relative_loss_difference": loss_gap,
        })
        print(f"  {method:12s} batched {rows[-1]['median_batched'] * 1e3:8.1f} ms/it  loop "
              f"{rows[-1]['median_loop'] * 1e3:8.1f} ms/it  ratio {rows[-1]['median_ratio']:.2f}", flush=True)
    from ipmcondense import __version__

    return {"dataset": dataset, "ipc": ipc, "device": device, "hardware": hardware_string(device),
            "load_average_1min_at_end": os.getloadavg()[0],
            "version": __version__, "git_commit": git_commit(), "seed": seed,
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "rows": rows}


# ------------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS))
    p.add_argument("--ipc", nargs="+", type=int, default=list(DEFAULT_IPCS))
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"registry recipes and/or {UPPER_BOUND!r} (default: the profile's list, every recipe)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu-small")
    p.add_argument("--data-root", default=os.environ.get("IPMCONDENSE_DATA_ROOT"),
                   help="torchvision-layout folder (default $IPMCONDENSE_DATA_ROOT); digits needs none")
    p.add_argument("--download", action="store_true", help="let torchvision extract/download into --data-root")
    p.add_argument("--models", type=int, default=None, help="evaluation models per cell (default: the profile's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads per cell (0: torch's default)")
    p.add_argument("--force", action="store_true", help="recompute cells even when cached")
    p.add_argument("--dry-run", action="store_true", help="print the cells and their estimated cost, run nothing")
    p.add_argument("--max-cells", type=int, default=None, help="run at most this many uncached cells")
    p.add_argument("--verbose", action="store_true", help="list every skipped cell")
    p.add_argument("--no-upper-bound", action="store_true", help="leave out the whole-dataset cells")
    p.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per cell")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="where the cells' run folders go")
    p.add_argument("--class-batching", action="store_true",
                   help="instead of the grid: time class_batching on vs off (first dataset, first IPC)")
    p.add_argument("--cb-iterations", type=int, default=8, help="outer iterations per class-batching run")
    p.add_argument("--cb-repeats", type=int, default=3, help="on/off pairs per recipe")
    p.add_argument("--cb-out", type=Path, default=CLASS_BATCHING_FILE)
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return _child_main(args.child)
    if args.models is not None and args.models < 1:
        raise SystemExit("--models must be a positive integer")
    if args.class_batching:
        methods = args.methods or ["dm", "m3d", "dc"]
        print(f"class batching on {args.datasets[0]}, ipc {args.ipc[0]}: {', '.join(methods)}")
        report = class_batching_ratio(args.datasets[0], methods, args.ipc[0], args.cb_iterations, args.cb_repeats,
                                      args.data_root, args.device, args.seed)
        atomic_write_json(report, args.cb_out)
        print(f"wrote {os.path.relpath(args.cb_out, REPO_ROOT)}")
        return 0
    return run_grid(args)


if __name__ == "__main__":
    sys.exit(main())
