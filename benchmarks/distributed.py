"""Class-parallel condensation: DM on MNIST, IPC 10, with 1 and with 2 processes of one thread each.

For each world size ``W`` the script launches ``W`` gloo ranks (``torch.multiprocessing.spawn``, one thread
per rank), condenses MNIST with ``dm`` at IPC 10 for ``--iterations`` outer iterations from the same seed,
and records:

* the wall time of each outer iteration (the engine's ``iteration_seconds``; the first ``--warmup``
  iterations are dropped), median over the rest, and the CPU time rank 0 spent in it
  (``time.process_time``: on a shared, oversubscribed machine the wall time measures the contention, the CPU
  time still measures the work each rank does);
* the bytes every collective of rank 0 sent, per outer iteration and at the end (the exchange of S),
  counted by wrapping ``torch.distributed.all_reduce`` / ``all_gather`` / ``broadcast``;
* whether the two runs gave the same synthetic set.

The scaling efficiency is ``t_1 / (W * t_W)`` (1: perfect, ``W`` ranks take ``1/W`` of the time), from the
wall times and, separately, from rank 0's CPU times.

Usage::

    python benchmarks/distributed.py --data-root /work/shared/data --iterations 6
    python benchmarks/distributed.py --data-root /work/shared/data --iterations 6 --json results/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

_COUNTED = ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor")


def _count_bytes(log: list[tuple[str, int]]) -> None:
    """Wrap the tensor collectives so each call appends ``(name, bytes sent by this rank)`` to ``log``."""
    import torch.distributed as dist

    for name in _COUNTED:
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)][:1]
            sent = tensors[-1] if _name == "all_gather" and tensors else (tensors[0] if tensors else None)
            log.append((_name, 0 if sent is None else sent.numel() * sent.element_size()))
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def _worker(rank: int, world: int, init: str, folder: str, args: dict) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    log: list[tuple[str, int]] = []
    _count_bytes(log)
    from ipmcondense.condensation import engine as engine_module
    from ipmcondense.condensation.api import condense

    per_iteration: list[int] = []
    cpu_seconds: list[float] = []
    original = engine_module.CondensationEngine.run_iteration

    def run_iteration(self):
        before, cpu = sum(b for _, b in log), time.process_time()
        loss = original(self)
        cpu_seconds.append(time.process_time() - cpu)
        per_iteration.append(sum(b for _, b in log) - before)
        return loss

    engine_module.CondensationEngine.run_iteration = run_iteration
    start = time.perf_counter()
    result = condense("dm", "mnist", ipc=args["ipc"], iterations=args["iterations"], seed=0,
                      data_root=args["data_root"], progress=False, checkpoint_every=0)
    wall = time.perf_counter() - start
    if rank == 0:
        torch.save({"images": result.images, "iteration_seconds": result.metrics["iteration_seconds"],
                    "cpu_seconds": cpu_seconds,
                    "bytes_per_iteration": per_iteration, "bytes_total": sum(b for _, b in log), "wall": wall,
                    "collectives": len(log)}, Path(folder) / f"world{world}.pt")
    if world > 1:
        dist.destroy_process_group()


def run(world: int, args: dict) -> dict:
    folder = tempfile.mkdtemp(prefix=f"ipmcondense-dist{world}-")
    init = f"file://{folder}/rendezvous"
    if world == 1:
        _worker(0, 1, init, folder, args)
    else:
        torch.multiprocessing.spawn(_worker, args=(world, init, folder, args), nprocs=world, join=True)
    return torch.load(Path(folder) / f"world{world}.pt", weights_only=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("IPMCONDENSE_DATA", "/work/shared/data"))
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1, help="first iterations left out of the timing")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    options = parser.parse_args(argv)
    if options.iterations <= options.warmup:
        parser.error("--iterations must exceed --warmup")
    args = {"ipc": options.ipc, "iterations": options.iterations, "data_root": options.data_root}
    torch.set_num_threads(1)
    results = {w: run(w, args) for w in options.worlds}
    base = results[options.worlds[0]]
    report = {"method": "dm", "dataset": "mnist", "ipc": options.ipc, "iterations": options.iterations,
              "warmup": options.warmup, "threads_per_rank": 1, "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "worlds": {}}
    t1 = statistics.median(base["iteration_seconds"][options.warmup:])
    c1 = statistics.median(base["cpu_seconds"][options.warmup:])
    for w, r in results.items():
        tw = statistics.median(r["iteration_seconds"][options.warmup:])
        cw = statistics.median(r["cpu_seconds"][options.warmup:])
        report["worlds"][w] = {
            "seconds_per_iteration_median": tw,
            "iteration_seconds": r["iteration_seconds"],
            "speedup": t1 / tw,
            "scaling_efficiency": t1 / (w * tw) * options.worlds[0],
            "cpu_seconds_per_iteration_rank0_median": cw,
            "cpu_seconds_rank0": r["cpu_seconds"],
            "cpu_scaling_efficiency": c1 / (w * cw) * options.worlds[0],
            "bytes_per_iteration_rank0": statistics.median(r["bytes_per_iteration"]) if r["bytes_per_iteration"] else 0,
            "bytes_total_rank0": r["bytes_total"],
            "collectives_rank0": r["collectives"],
            "same_synthetic_set_as_first": bool(torch.equal(r["images"], base["images"])),
            "wall_seconds": r["wall"],
        }
    text = json.dumps(report, indent=2)
    print(text)
    if options.json:
        from ipmcondense.files import atomic_write_text

        Path(options.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(text + "\n", options.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
