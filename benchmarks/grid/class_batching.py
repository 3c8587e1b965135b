"""Class batching against the per-class loop: time per outer iteration, interleaved in one process.

``python benchmarks/condense.py --class-batching`` writes the report to
``benchmarks/results/class_batching.json`` (``make_results.py`` renders it).
"""

from __future__ import annotations

import datetime as _dt
import os
import statistics
from typing import Any

from .environment import git_commit, hardware_string

__all__ = ["class_batching_ratio"]


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
