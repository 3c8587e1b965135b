"""DCGM next to glad on digits, IPC 1 and 10, on one generator trained here (issue 18, method 3).

Trains the default digits generator (``train_generator``, 50 epochs, seed 0) unless ``--generator DIR`` is
given, then condenses with ``glad`` and ``dcgm`` at the digits DM budget (600 iterations, ``batch_real`` 64,
seed 0) and evaluates each set with the standard protocol (3 models of the dataset's ConvNet-D2). Writes
``benchmarks/results/dcgm_digits.json`` (atomically, after every cell, so a partial run keeps its cells; the
cells of an earlier run that this one does not recompute are kept).

    OMP_NUM_THREADS=1 python benchmarks/dcgm_digits.py [--generator DIR] [--ipc 1 10]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ipmcondense.condensation.api import condense, evaluate
from ipmcondense.data import load_dataset
from ipmcondense.files import atomic_write_json
from ipmcondense.generators import train_generator

OUT = Path(__file__).resolve().parent / "results" / "dcgm_digits.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--generator", default=None, help="an existing digits generator run (default: train one)")
    parser.add_argument("--work", default="/tmp/dcgm_digits", help="where the generator run is written")
    parser.add_argument("--ipc", type=int, nargs="+", default=[10, 1])
    parser.add_argument("--methods", nargs="+", default=["dcgm", "glad"])
    parser.add_argument("--models", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    digits = load_dataset("digits")
    report: dict = {"dataset": "digits", "threads": 1, "budget": {"iterations": 600, "batch_real": 64, "seed": 0},
                    "evaluation": f"standard protocol, {args.models} models, arch from the digits table (convnet-d2)",
                    "cells": []}
    if OUT.is_file():  # keep the cells of an earlier run that this one does not recompute
        earlier = json.loads(OUT.read_text())
        wanted = {(m, i) for m in args.methods for i in args.ipc}
        report["cells"] = [c for c in earlier.get("cells", []) if (c["method"], c["ipc"]) not in wanted]
    generator = args.generator
    if generator is None:
        generator = str(Path(args.work) / "generator")
        start = time.perf_counter()
        run = train_generator(digits, generator, progress=False, seed=0, overwrite=True)
        report["generator"] = {"dir": generator, "seconds": round(time.perf_counter() - start, 1),
                               "quality": run.metrics.get("quality")}
    else:
        report["generator"] = {"dir": generator}
    for method in args.methods:
        for ipc in args.ipc:
            start = time.perf_counter()
            result = condense(method, "digits", ipc=ipc, iterations=600, batch_real=64, seed=0, progress=False,
                              generator=generator)
            seconds = time.perf_counter() - start
            scores = evaluate(result, "digits", models=args.models, save=False)
            report["cells"].append({"method": method, "ipc": ipc, "condense_seconds": round(seconds, 1),
                                    "accuracy_mean": scores["accuracy_mean"], "accuracy_std": scores["accuracy_std"],
                                    "accuracies": scores["accuracies"],
                                    "final_loss": result.metrics["loss_history"][-1]})
            atomic_write_json(report, OUT)
            print(report["cells"][-1], flush=True)


if __name__ == "__main__":
    main()
