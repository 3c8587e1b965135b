"""Running the benchmark grid: one child process per cell, the grid loop, and the cell records.

The parent (:func:`run_grid`) plans the cells (:func:`.plan.plan_cells`), prints each as cached,
skipped or to run with a rough cost, and runs the missing ones with :func:`run_cell`: each in its own
``benchmarks/condense.py --child SPEC`` process with a timeout, so peak memory is that cell's alone
and a crash or a timeout is recorded in the cell's JSON while the grid goes on. The child
(:func:`run_child`) condenses, evaluates and measures; the parent adds the record's provenance
(key, version, git commit, hardware) and writes the JSON atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .cells import CELL_FORMAT, REPO_ROOT, UPPER_BOUND, Cell, atomic_write_json, cached_cell, cell_path, key_hash
from .environment import git_commit, hardware_string, peak_memory
from .plan import dataset_arch, estimate_cell_seconds, plan_cells
from .profiles import PROFILES

__all__ = ["CONDENSE_SCRIPT", "run_child", "child_main", "run_cell", "run_grid"]

# the command line whose --child mode runs one cell (a fresh interpreter per cell)
CONDENSE_SCRIPT = REPO_ROOT / "benchmarks" / "condense.py"


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
    zca_eps = experts.get("zca_eps")
    folder = Path(spec["runs_dir"]) / "experts" / (
        f"{spec['dataset']}-{experts['arch']}-n{experts['n_experts']}-e{experts['epochs']}-f{fraction:g}"
        f"-s{int(spec['seed'])}" + ("" if zca_eps is None else f"-zca{zca_eps:g}"))
    whitening = None
    if zca_eps is not None:  # fitted on the full training set, as the condensation run fits it
        from ipmcondense.whitening import DatasetWhitening

        whitening = DatasetWhitening(ds, float(zca_eps))
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
                  arch=experts["arch"], seed=int(spec["seed"]), progress=False, device=spec.get("device"),
                  whitening=whitening)
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
        protocol = EvaluationProtocol(arch=dataset_arch(spec["dataset"]), epochs=spec["eval_epochs"])
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
        out.update(peak_memory())
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
                      device=device, protocol=spec.get("protocol", "standard"))
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
    out.update(peak_memory())
    return out


def child_main(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    try:
        result = {"status": "ok", **run_child(spec), "hardware": hardware_string(spec.get("device") or "cpu")}
    except BaseException as err:  # noqa: BLE001 - recorded in the cell, the parent decides
        result = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
        result.update(peak_memory())
    atomic_write_json(result, Path(spec["result_file"]))
    return 0 if result["status"] == "ok" else 1


# ------------------------------------------------------------------------------------------ parent side


def _base_record(cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    from ipmcondense import __version__

    return {
        "format": CELL_FORMAT, "profile": cell.profile, "dataset": cell.dataset, "method": cell.method,
        "ipc": cell.ipc, "seed": cell.seed, "models_requested": cell.models, "eval_epochs": cell.eval_epochs,
        "protocol": cell.protocol,
        "key": cell.key, "key_hash": key_hash(cell.key), "version": __version__, "git_commit": git_commit(),
        "hardware": hardware_string(args.device), "device": args.device,
        "load_average_1min_at_end": os.getloadavg()[0],
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_cell(cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``cell`` in a subprocess with a timeout; return the record (also written to its JSON)."""
    path = cell_path(args.results_dir, cell.profile, cell.dataset, cell.method, cell.ipc, cell.protocol)
    run_dir = Path(args.runs_dir) / cell.profile / cell.dataset / cell.name
    with tempfile.TemporaryDirectory(prefix="ipmcondense-bench-") as tmp:
        spec = {
            "profile": cell.profile, "dataset": cell.dataset, "method": cell.method, "ipc": cell.ipc,
            "seed": cell.seed, "models": cell.models, "eval_epochs": cell.eval_epochs, "overrides": cell.overrides,
            "experts": cell.experts, "data_root": args.data_root, "download": args.download, "device": args.device,
            "protocol": cell.protocol,
            "threads": args.threads,
            "run_dir": str(run_dir), "runs_dir": str(args.runs_dir), "result_file": str(Path(tmp) / "result.json"),
        }
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(CONDENSE_SCRIPT), "--child", str(spec_file)],
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
                       dataset_cache=cache, protocol=getattr(args, "protocol", "standard"))
    totals: dict[str, float] = {}
    skipped: dict[str, int] = {}
    todo: list[Cell] = []
    print(f"profile {profile.name}: {profile.description}")
    for cell in cells:
        path = cell_path(args.results_dir, cell.profile, cell.dataset, cell.method, cell.ipc, cell.protocol)
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
        path = cell_path(args.results_dir, cell.profile, cell.dataset, cell.method, cell.ipc, cell.protocol)
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


