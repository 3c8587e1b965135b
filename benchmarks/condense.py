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
  dataset budgets (``ipmcondense/condensation/configs/digits.toml``); MNIST and Fashion-MNIST use
  the iteration counts, real batch sizes, evaluation epochs and model counts listed in the profile.
  These budgets are far below the papers': the numbers say how the library behaves at small cost,
  not what the methods reach.
* ``cpu-hour``: at most about an hour of condensation per cell on 2 CPU cores (MNIST), the
  protocol's evaluation epochs.
* ``paper``: the references' outer iterations (the recipe defaults), the protocol's epochs
  (1000 with DSA) and 5 evaluation models.

This file is the command line; the grid lives in ``benchmarks/grid/`` (profiles, cells and their
cache, planning and cost, the runner, class batching).

Usage::

    python benchmarks/condense.py --dry-run                                   # cells and estimated cost
    python benchmarks/condense.py --datasets digits --methods random dm --ipc 1
    python benchmarks/condense.py --profile cpu-small --datasets digits       # a whole dataset
    python benchmarks/condense.py --class-batching --datasets digits --methods dm m3d dc --ipc 10
    python benchmarks/make_results.py                                         # RESULTS.md from the cells
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# benchmarks/grid is imported as the package ``grid``: a script's folder is on sys.path already, a
# module loaded from its file (tests) needs it added
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from grid import cells, class_batching, environment, plan, profiles, runner  # noqa: E402
from grid.cells import (  # noqa: E402
    CELL_FORMAT,
    CLASS_BATCHING_FILE,
    REPO_ROOT,
    RESULTS_DIR,
    RUNS_DIR,
    UPPER_BOUND,
    Cell,
    atomic_write_json,
    cached_cell,
    cell_key,
    cell_path,
    key_hash,
    keys_match,
)
from grid.class_batching import class_batching_ratio  # noqa: E402
from grid.environment import git_commit, hardware_string  # noqa: E402
from grid.plan import estimate_cell_seconds, plan_cells  # noqa: E402
from grid.profiles import PROFILES, PROFILES_FILE, Profile, load_profiles  # noqa: E402
from grid.runner import run_cell, run_grid  # noqa: E402

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

DEFAULT_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
DEFAULT_IPCS = (1, 10, 50)
BASELINES = ("random", "herding", "kcenter")


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
    p.add_argument("--protocol", choices=("standard", "published"), default="standard",
                   help="evaluation protocol: standard (VICO-UoE, every method; default) or published (each "
                        "method's paper's; cells end in -published)")
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
        return runner.child_main(args.child)
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
