"""Benchmark: ipmcondense against the reference implementation, side by side, on MNIST.

The reference is VICO-UoE DatasetCondensation (``main_DM.py`` for DM, ``main.py`` for DC and DSA), which
the user fetches (``git clone https://github.com/VICO-UoE/DatasetCondensation``) and names with
``--reference DIR``; it is never vendored. Without ``--reference`` the script measures ipmcondense alone.

Settings (the reference's own, the ones its README gives):

=============  ===========================================================================================
``dm-ipc10``   ``main_DM.py --ipc 10 --init real --lr_img 1 --batch_real 256`` + DSA; target: the accuracy
               of the reference after 250 iterations (95.9% on 3 models here, the issue's number)
``dc-ipc1``    ``main.py --method DC --ipc 1`` (noise init, lr_img 0.1, no DSA); target at 100 iterations
               (89.0%)
``dsa-ipc1``   ``main.py --method DSA --ipc 1 --init real`` + DSA; target at 100 iterations (88.0%)
=============  ===========================================================================================

Three measurements, each a *cell* cached in ``benchmarks/results/time_to_accuracy/<setting>/<mode>.json``
(written atomically; a cell with the same key is not recomputed unless ``--force``):

``speed``
    Seconds per outer iteration, both sides, in *interleaved* rounds (reference, ours, reference, ours,
    ...; every run a fresh subprocess with the same thread count), over the same window of iterations
    (``--warmup`` .. ``--iterations``) so start-up and data loading are excluded: the reference's time
    is the slope of the wall-clock stamps of its ``iter = k`` lines (it prints every 10 iterations),
    ours the mean of the engine's own per-iteration times over the same window. Also seconds per
    evaluated model (``--eval-epochs`` epochs of the exact protocol on a 10-per-class real set: the
    reference's ``evaluate_synset`` at iteration 0 against ``ipmcondense``'s ``evaluate_synthetic``).
    Reported: medians and the ratio ours / reference (below 1 is faster). Also, per side and round, the
    CPU seconds (user, system) and minor page faults of the whole processes (``getrusage``; start-up and
    data loading included) and the load average before each round and at the end: on a shared machine
    the wall times move with the load, the system time and page faults much less (they showed what made
    the whole-batch real side slow: fresh memory for every activation; see ``ipmcondense.nets._common.run_block``).
``accuracy``
    Accuracy at equal (half) wall time: the reference condenses for its target iterations; its set is
    read back from the ``res_*.pt`` it saves and evaluated with *our* evaluator (one evaluator for both,
    so the difference is the condensation); ipmcondense then condenses for as many iterations as fit in
    half the reference's measured condensation time (from the ``speed`` cell) and is evaluated with the
    same models and seeds. Hours on a CPU: meant to be run once, in the background.
``levers``
    One DM step's network work in isolation, in one process, interleaved over rounds: the real side
    (``ipc``-setting's ``batch_real`` images per class, all classes in one pass, no autograd) and the
    synthetic side (forward and backward of the synthetic set) of the library's MNIST ConvNet, for every
    combination of precision (float32, bfloat16 autocast) and memory format (contiguous, channels_last).
    Reported: medians and ratios to float32/contiguous (what each lever buys in isolation); then whole
    outer iterations of the engine (``condense``, MNIST, the setting's method and IPC) with each lever as
    wired in (``precision``, ``channels_last``), interleaved, as ratios to the defaults.
``profile``
    Where the time of ipmcondense goes: :mod:`torch.profiler` over a few outer steps and over one
    evaluated model trained for one epoch (so the full test pass, a fixed cost per model, is in it:
    over 1000 epochs it is amortised); the top entries by self CPU time are stored and printed.

Profiles of ipmcondense (``--ours-profile``; the reference always runs as it is):

``reference`` (default)
    the library's defaults, which are the reference's settings: float32 everywhere. Cells ``<mode>.json``.
``fast``
    ``--precision bfloat16`` in condensation (the networks' forward passes under bfloat16 autocast,
    features and losses in float32) and ``precision="bfloat16"`` in the evaluated models. (``--channels-last``
    is left out: 0.53x on the isolated real side in the ``levers`` cell, but 0.89x alone and 0.92x with
    bfloat16 on whole DM steps, against 0.60x for bfloat16 alone, measured in one process under load.) (``EvaluationProtocol(precision=
    "bfloat16")``). Cells ``<mode>-fast.json``. In the accuracy cell both condensed sets are evaluated by
    the float32 protocol (the comparison of the condensations), and ours once more with the bfloat16
    evaluator (does the fast evaluation give the same accuracy?).

Compatibility shim (stated, numerically neutral): with torch >= 2 the reference's ``ConvNet.forward``
and ``ConvNet.embed`` call ``.view`` on the non-contiguous output of its DSA and fail; the runner
replaces them, in the reference's process only, by the same code with ``.reshape`` (a copy instead of a
view: the same numbers). Nothing else of the reference is touched.

Usage::

    python benchmarks/time_to_accuracy.py --data-root /path/with/MNIST/raw --reference ~/DatasetCondensation
    python benchmarks/time_to_accuracy.py --data-root R --settings dm-ipc10 --modes speed profile
    python benchmarks/time_to_accuracy.py --data-root R --reference REF --modes accuracy   # hours
    python benchmarks/time_to_accuracy.py --quick --data-root R   # tiny sizes: checks that everything runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "time_to_accuracy"
#: ipmcondense's side of a cell: extra ``condense`` arguments and the evaluation precision (module docstring)
OURS_PROFILES: dict[str, dict[str, Any]] = {
    "reference": {"condense": (), "eval_precision": "float32"},
    "fast": {"condense": ("--precision", "bfloat16"), "eval_precision": "bfloat16"},
}
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@dataclass(frozen=True)
class Setting:
    """One comparison: our recipe and the reference's script with the same hyperparameters."""

    name: str
    method: str
    ipc: int
    reference_script: str
    reference_args: tuple[str, ...]
    target_iterations: int
    target_accuracy: float  # the reference's accuracy at target_iterations, 3 models (issue 16)
    notes: str = ""


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("dm-ipc10", "dm", 10, "main_DM.py",
                ("--ipc", "10", "--init", "real", "--lr_img", "1", "--batch_real", "256",
                 "--dsa_strategy", "color_crop_cutout_flip_scale_rotate"), 250, 0.959),
        Setting("dc-ipc1", "dc", 1, "main.py",
                ("--method", "DC", "--ipc", "1", "--init", "noise", "--lr_img", "0.1", "--batch_real", "256",
                 "--dsa_strategy", "None"), 100, 0.890),
        Setting("dsa-ipc1", "dsa", 1, "main.py",
                ("--method", "DSA", "--ipc", "1", "--init", "real", "--lr_img", "0.1", "--batch_real", "256",
                 "--dsa_strategy", "color_crop_cutout_flip_scale_rotate"), 100, 0.880),
    )
}

# Runs the reference's script in this process with the .view -> .reshape shim (see the module docstring).
_REFERENCE_RUNNER = r"""
import runpy, sys
sys.path.insert(0, sys.argv[1])
import networks
def _forward(self, x):
    return self.classifier(self.features(x).reshape(x.shape[0], -1))
def _embed(self, x):
    return self.features(x).reshape(x.shape[0], -1)
networks.ConvNet.forward = _forward
networks.ConvNet.embed = _embed
script = sys.argv[2]
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


@dataclass
class StampedRun:
    """A subprocess's output lines with the wall-clock time each arrived (``perf_counter`` seconds)."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    returncode: int = 0
    seconds: float = 0.0
    #: CPU seconds (user, system) and minor page faults of the process, from ``getrusage(RUSAGE_CHILDREN)``
    cpu: dict[str, float] = field(default_factory=dict)

    def stamps(self, pattern: str) -> list[tuple[float, re.Match]]:
        rx = re.compile(pattern)
        return [(t, m) for t, line in self.lines if (m := rx.search(line))]


def _environment(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


_USAGE_LOG: list[dict[str, float]] = []  # run_stamped appends each finished process's CPU usage


def _with_usage(usage: dict[str, list[dict[str, float]]], label: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, recording under ``label`` the summed CPU usage of the processes it ran (whole processes:
    start-up and data loading included, so compare the two sides' system time and page faults, not totals)."""
    first = len(_USAGE_LOG)
    value = fn(*args, **kwargs)
    runs = _USAGE_LOG[first:]
    usage.setdefault(label, []).append({k: sum(r[k] for r in runs) for k in runs[0]} if runs else {})
    return value


def run_stamped(cmd: list[str], *, threads: int, cwd: Path | None = None, timeout: float | None = None) -> StampedRun:
    """Run ``cmd``, stamping every output line on arrival; raise with the tail of the output on failure."""
    run = StampedRun()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env=_environment(threads))
    assert proc.stdout is not None
    for line in proc.stdout:
        run.lines.append((time.perf_counter() - start, line.rstrip("\n")))
        if timeout is not None and time.perf_counter() - start > timeout:
            proc.kill()
            break
    run.returncode = proc.wait()
    run.seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run.cpu = {"user_seconds": after.ru_utime - before.ru_utime, "system_seconds": after.ru_stime - before.ru_stime,
               "minor_page_faults": after.ru_minflt - before.ru_minflt}
    _USAGE_LOG.append(run.cpu)
    if run.returncode != 0:
        tail = "\n".join(line for _, line in run.lines[-25:])
        raise RuntimeError(f"command failed ({run.returncode}): {' '.join(cmd)}\n{tail}")
    return run


def prepare_reference_data(data_root: Path, scratch: Path) -> Path:
    """A scratch torchvision root whose ``MNIST/raw`` links the publisher's files (the reference unpacks there)."""
    raw = scratch / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        source = data_root / "MNIST" / "raw" / name
        if not source.is_file():
            raise FileNotFoundError(f"--data-root: {source} is missing (the publisher's MNIST files are needed)")
        target = raw / name
        if not target.exists():
            target.symlink_to(source.resolve())
    return scratch


# ------------------------------------------------------------------------------------------ one side each
def reference_seconds_per_iteration(setting: Setting, reference: Path, ref_data: Path, scratch: Path,
                                    iterations: int, warmup: int, threads: int) -> float:
    """Slope of the reference's ``iter = k`` stamps between iteration ``warmup`` and ``iterations``."""
    run = run_stamped(_reference_cmd(setting, reference, ref_data, scratch, iterations, num_eval=0),
                      threads=threads, cwd=scratch)
    return iteration_slope(run, warmup, iterations)


def iteration_slope(run: StampedRun, warmup: int, iterations: int) -> float:
    """Seconds per iteration between the stamps of the ``iter = warmup`` and ``iter = iterations`` lines."""
    stamps = {int(m.group(1)): t for t, m in run.stamps(r"iter = (\d+)")}
    if warmup not in stamps or iterations not in stamps:
        raise RuntimeError(f"reference printed iterations {sorted(stamps)}; need {warmup} and {iterations} "
                           f"(it prints every 10: choose multiples of 10)")
    return (stamps[iterations] - stamps[warmup]) / (iterations - warmup)


def _reference_cmd(setting: Setting, reference: Path, ref_data: Path, scratch: Path, iterations: int,
                   num_eval: int, epochs: int | None = None) -> list[str]:
    save = scratch / "result"
    save.mkdir(exist_ok=True)
    cmd = [sys.executable, "-c", _REFERENCE_RUNNER, str(reference), str(reference / setting.reference_script),
           "--dataset", "MNIST", "--model", "ConvNet", *setting.reference_args, "--Iteration", str(iterations),
           "--num_exp", "1", "--num_eval", str(num_eval), "--data_path", str(ref_data), "--save_path", str(save)]
    if epochs is not None:
        cmd += ["--epoch_eval_train", str(epochs)]
    return cmd


def ours_seconds_per_iteration(setting: Setting, data_root: Path, scratch: Path, iterations: int, warmup: int,
                               threads: int, seed: int = 0, extra: tuple[str, ...] = ()) -> float:
    """Mean of the engine's per-iteration times over the reference's window (``warmup`` .. ``iterations``)."""
    out = scratch / f"ours-{setting.name}"
    run_stamped([sys.executable, "-m", "ipmcondense", "condense", "--method", setting.method, "--dataset", "mnist",
                 "--ipc", str(setting.ipc), "--iterations", str(iterations + 1), "--data-root", str(data_root),
                 "--out", str(out), "--overwrite", "--no-progress", "--seed", str(seed), *extra], threads=threads)
    seconds = json.loads((out / "metrics.json").read_text())["iteration_seconds"]
    # the reference's iteration k is its (k+1)-th loop pass; our list is indexed from iteration 0
    window = seconds[warmup + 1: iterations + 1]
    return statistics.fmean(window)


def reference_seconds_per_model(setting: Setting, reference: Path, ref_data: Path, scratch: Path, epochs: int,
                                threads: int) -> float:
    """Wall time of one evaluated model (``epochs`` epochs + test) at iteration 0 of the reference's run."""
    run = run_stamped(_reference_cmd(setting, reference, ref_data, scratch, 0, num_eval=1, epochs=epochs),
                      threads=threads, cwd=scratch)
    begin = [t for t, _ in run.stamps(r"^Evaluation$")]
    end = [t for t, _ in run.stamps(r"Evaluate 1 random")]
    if not begin or not end:
        raise RuntimeError("the reference printed no evaluation block")
    return end[0] - begin[0]


def ours_seconds_per_model(setting: Setting, data_root: Path, epochs: int, threads: int,
                           precision: str = "float32") -> float:
    """Wall time of one model of :func:`ipmcondense.evaluation.evaluate_synthetic` on an ``ipc``-per-class real set."""
    run = run_stamped([sys.executable, __file__, "_eval-worker", "--data-root", str(data_root), "--ipc",
                       str(setting.ipc), "--epochs", str(epochs), "--augmentation",
                       "none" if "None" in setting.reference_args else "dsa", "--precision", precision],
                      threads=threads)
    return float(json.loads(run.lines[-1][1])["wall_seconds"][0])


def _eval_worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--ipc", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--augmentation", default="dsa")
    parser.add_argument("--models", type=int, default=1)
    parser.add_argument("--set", default=None, help="a .pt file with images/labels to evaluate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="float32")
    args = parser.parse_args(argv)
    import torch

    from ipmcondense.data import load_dataset
    from ipmcondense.evaluation import EvaluationProtocol, evaluate_synthetic
    from ipmcondense.selection import select_random

    data = load_dataset("mnist", root=args.data_root)
    if args.set:
        payload = torch.load(args.set, map_location="cpu")
        images, labels = payload["images"], payload["labels"]
    else:
        images, labels = select_random(data, args.ipc, seed=args.seed)
    protocol = EvaluationProtocol(epochs=args.epochs, augmentation=args.augmentation, precision=args.precision)
    result = evaluate_synthetic(images, labels, data, protocol, n_models=args.models, seed=args.seed)
    print(json.dumps({"accuracies": result.accuracies, "wall_seconds": result.wall_seconds}))
    return 0


# ------------------------------------------------------------------------------------------ the cells
def _cell_path(setting: Setting, mode: str, ours_profile: str = "reference") -> Path:
    suffix = "" if ours_profile == "reference" else f"-{ours_profile}"
    return RESULTS / setting.name / f"{mode}{suffix}.json"


def _with_profile(key: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The key of a cell of ``args.ours_profile`` (the reference profile's keys predate profiles: unchanged)."""
    return key if args.ours_profile == "reference" else {**key, "ours_profile": args.ours_profile}


def _hardware(threads: int) -> dict[str, Any]:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "python": platform.python_version()}


def _reference_commit(reference: Path | None) -> str | None:
    if reference is None:
        return None
    try:
        return subprocess.run(["git", "-C", str(reference), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _cached(path: Path, key: dict[str, Any], force: bool) -> dict[str, Any] | None:
    if force or not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == key and record.get("status") == "ok" else None


def _save(path: Path, record: dict[str, Any]) -> None:
    from ipmcondense.files import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, path)


def speed_cell(setting: Setting, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    key = speed_cell_key(setting, args)
    path = _cell_path(setting, "speed", args.ours_profile)
    profile = OURS_PROFILES[args.ours_profile]
    if (record := _cached(path, key, args.force)) is not None:
        return record
    ref_data = prepare_reference_data(args.data_root, scratch / "ref-data") if args.reference else None
    timings: dict[str, list[float]] = {"ours_iteration": [], "reference_iteration": [], "ours_model": [],
                                       "reference_model": []}
    usage: dict[str, list[dict[str, float]]] = {}
    load_average: list[list[float]] = []
    for round_ in range(args.rounds):
        print(f"[{setting.name}] speed round {round_ + 1}/{args.rounds}", flush=True)
        load_average.append(list(os.getloadavg()))
        if args.reference:
            timings["reference_iteration"].append(_with_usage(usage, "reference_iteration", reference_seconds_per_iteration,
                setting, args.reference, ref_data, scratch, args.iterations, args.warmup, args.threads))
        timings["ours_iteration"].append(_with_usage(usage, "ours_iteration", ours_seconds_per_iteration,
            setting, args.data_root, scratch, args.iterations, args.warmup, args.threads,
            extra=profile["condense"]))
        if args.eval_epochs:
            if args.reference:
                timings["reference_model"].append(_with_usage(usage, "reference_model", reference_seconds_per_model,
                    setting, args.reference, ref_data, scratch, args.eval_epochs, args.threads))
            timings["ours_model"].append(_with_usage(usage, "ours_model", ours_seconds_per_model, setting,
                                                     args.data_root, args.eval_epochs, args.threads,
                                                     profile["eval_precision"]))
    load_average.append(list(os.getloadavg()))
    medians = {k: statistics.median(v) for k, v in timings.items() if v}
    ratios = {}
    if "reference_iteration" in medians:
        ratios["iteration"] = medians["ours_iteration"] / medians["reference_iteration"]
    if "reference_model" in medians:
        ratios["model"] = medians["ours_model"] / medians["reference_model"]
    record = {"status": "ok", "key": key, "timings": timings, "medians": medians,
              "ratios_ours_over_reference": ratios, "process_usage": usage,
              "load_average_1_5_15_min": load_average, "hardware": _hardware(args.threads),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    _save(path, record)
    return record


def accuracy_cell(setting: Setting, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    if args.reference is None:
        raise SystemExit("--modes accuracy needs --reference (it compares with the reference's set)")
    speed = _cached(_cell_path(setting, "speed", args.ours_profile), speed_cell_key(setting, args), False)
    if speed is None or "reference_iteration" not in speed["medians"]:
        raise SystemExit(f"[{setting.name}] run --modes speed with --reference first (accuracy uses its timings)")
    iterations = args.target_iterations or setting.target_iterations
    key = _with_profile({"setting": asdict(setting), "iterations": iterations, "models": args.models,
                         "epochs": args.epochs, "threads": args.threads,
                         "reference_commit": _reference_commit(args.reference)}, args)
    path = _cell_path(setting, "accuracy", args.ours_profile)
    profile = OURS_PROFILES[args.ours_profile]
    if (record := _cached(path, key, args.force)) is not None:
        return record
    import torch

    ref_data = prepare_reference_data(args.data_root, scratch / "ref-data")
    run = run_stamped(_reference_cmd(setting, args.reference, ref_data, scratch, iterations, num_eval=0),
                      threads=args.threads, cwd=scratch)
    begin = [t for t, _ in run.stamps(r"training begins")][0]
    reference_seconds = run.seconds - begin
    saved = next((scratch / "result").glob(f"res_*_MNIST_ConvNet_{setting.ipc}ipc.pt"))
    images, labels = torch.load(saved, map_location="cpu", weights_only=False)["data"][0]
    reference_set = scratch / "reference-set.pt"
    torch.save({"images": images, "labels": labels}, reference_set)
    budget = 0.5 * reference_seconds
    ours_iterations = max(1, int(budget / speed["medians"]["ours_iteration"]))
    ours_out = scratch / f"ours-{setting.name}"
    ours_run = run_stamped([sys.executable, "-m", "ipmcondense", "condense", "--method", setting.method,
                            "--dataset", "mnist", "--ipc", str(setting.ipc), "--iterations", str(ours_iterations),
                            "--data-root", str(args.data_root), "--out", str(ours_out), "--overwrite",
                            "--no-progress", *profile["condense"]], threads=args.threads)
    ours_seconds = json.loads((ours_out / "metrics.json").read_text())["seconds"]
    payload = torch.load(ours_out / "synthetic.pt", map_location="cpu", weights_only=False)
    ours_set = scratch / "ours-set.pt"
    torch.save({"images": payload["images"], "labels": payload["labels"]}, ours_set)
    accuracies, evaluation_seconds = {}, {}
    evaluations = [("reference", reference_set, "float32"), ("ours", ours_set, "float32")]
    if profile["eval_precision"] != "float32":  # the fast evaluator on our set too: the same accuracy?
        evaluations.append((f"ours_evaluated_{profile['eval_precision']}", ours_set, profile["eval_precision"]))
    for side, file, precision in evaluations:
        worker = run_stamped([sys.executable, __file__, "_eval-worker", "--data-root", str(args.data_root),
                              "--ipc", str(setting.ipc), "--epochs", str(args.epochs), "--models", str(args.models),
                              "--set", str(file), "--augmentation",
                              "none" if "None" in setting.reference_args else "dsa", "--precision", precision],
                             threads=args.threads)
        report = json.loads(worker.lines[-1][1])
        accuracies[side], evaluation_seconds[side] = report["accuracies"], report["wall_seconds"]
    record = {"status": "ok", "key": key, "reference_condensation_seconds": reference_seconds,
              "ours_iterations": ours_iterations, "ours_condensation_seconds": ours_seconds,
              "ours_process_seconds": ours_run.seconds, "wall_time_ratio": ours_seconds / reference_seconds,
              "accuracies": accuracies, "evaluation_seconds_per_model": evaluation_seconds,
              "accuracy_mean": {k: statistics.fmean(v) for k, v in accuracies.items()},
              "target_accuracy": setting.target_accuracy, "hardware": _hardware(args.threads),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    _save(path, record)
    return record


def speed_cell_key(setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
    return _with_profile({"setting": asdict(setting), "iterations": args.iterations, "warmup": args.warmup,
                          "rounds": args.rounds, "eval_epochs": args.eval_epochs, "threads": args.threads,
                          "reference_commit": _reference_commit(args.reference)}, args)


def profile_cell(setting: Setting, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    key = _with_profile({"setting": asdict(setting), "steps": args.profile_steps, "threads": args.threads}, args)
    path = _cell_path(setting, "profile", args.ours_profile)
    precision = OURS_PROFILES[args.ours_profile]["eval_precision"]
    if (record := _cached(path, key, args.force)) is not None:
        return record
    run = run_stamped([sys.executable, __file__, "_profile-worker", "--data-root", str(args.data_root),
                       "--method", setting.method, "--ipc", str(setting.ipc), "--steps", str(args.profile_steps),
                       "--precision", precision],
                      threads=args.threads)
    report = json.loads(run.lines[-1][1])
    record = {"status": "ok", "key": key, **report, "hardware": _hardware(args.threads),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    _save(path, record)
    return record


#: outer iterations per engine run of the levers cell (the first of each run, paying the start-up, is left out)
LEVER_STEPS = 4


def levers_cell(setting: Setting, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    key = {"setting": asdict(setting), "rounds": args.rounds, "threads": args.threads, "steps": LEVER_STEPS}
    path = _cell_path(setting, "levers")
    if (record := _cached(path, key, args.force)) is not None:
        return record
    batch_real = int(setting.reference_args[setting.reference_args.index("--batch_real") + 1])
    run = run_stamped([sys.executable, __file__, "_levers-worker", "--ipc", str(setting.ipc), "--batch-real",
                       str(batch_real), "--rounds", str(args.rounds), "--data-root", str(args.data_root),
                       "--method", setting.method, "--steps", str(LEVER_STEPS)], threads=args.threads)
    report = json.loads(run.lines[-1][1])
    record = {"status": "ok", "key": key, **report, "load_average_1_5_15_min": list(os.getloadavg()),
              "hardware": _hardware(args.threads), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    _save(path, record)
    return record


def _levers_worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ipc", type=int, required=True)
    parser.add_argument("--batch-real", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--method", default="dm")
    parser.add_argument("--steps", type=int, default=LEVER_STEPS)
    args = parser.parse_args(argv)
    import torch

    from ipmcondense.condensation.api import condense
    from ipmcondense.data import load_dataset
    from ipmcondense.nets import get_network
    from ipmcondense.training import autocast

    torch.manual_seed(0)
    net = get_network("convnet", 1, 10, (28, 28))
    real = torch.randn(10 * args.batch_real, 1, 28, 28)
    syn = torch.randn(10 * args.ipc, 1, 28, 28)
    combos = [(p, f) for p in ("float32", "bfloat16") for f in ("contiguous", "channels_last")]
    times: dict[str, dict[str, list[float]]] = {f"{p}/{f}": {"real_side": [], "synthetic_side": []} for p, f in combos}

    def one(precision: str, fmt: str) -> tuple[float, float]:
        memory = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        model = net.to(memory_format=memory)
        x_real = real.contiguous(memory_format=memory)
        x_syn = syn.contiguous(memory_format=memory).requires_grad_(True)
        start = time.perf_counter()
        with torch.no_grad(), autocast(precision, "cpu"):
            model.embed(x_real)
        middle = time.perf_counter()
        with autocast(precision, "cpu"):
            out = model.embed(x_syn)
        out.float().square().mean().backward()
        return middle - start, time.perf_counter() - middle

    one("float32", "contiguous")  # warm-up
    for _ in range(args.rounds):
        for precision, fmt in combos:
            real_s, syn_s = one(precision, fmt)
            times[f"{precision}/{fmt}"]["real_side"].append(real_s)
            times[f"{precision}/{fmt}"]["synthetic_side"].append(syn_s)
    medians = {k: {side: statistics.median(v) for side, v in sides.items()} for k, sides in times.items()}
    base = medians["float32/contiguous"]
    ratios = {k: {side: m[side] / base[side] for side in m} for k, m in medians.items()}
    report = {"seconds": times, "medians": medians, "ratios_to_float32_contiguous": ratios,
              "torch_threads": torch.get_num_threads()}
    if args.data_root:  # whole outer iterations of the engine with each lever wired in
        data = load_dataset("mnist", root=args.data_root)
        variants = {"defaults": {}, "channels_last": {"channels_last": True}, "bfloat16": {"precision": "bfloat16"},
                    "bfloat16+channels_last": {"precision": "bfloat16", "channels_last": True}}
        steps: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, options in variants.items():
                result = condense(args.method, data, args.ipc, iterations=args.steps, progress=False, **options)
                steps[name] += result.metrics["iteration_seconds"][1:]  # the first pays the start-up
        step_medians = {k: statistics.median(v) for k, v in steps.items()}
        report.update(step_seconds=steps, step_medians=step_medians,
                      step_ratios_to_defaults={k: v / step_medians["defaults"] for k, v in step_medians.items()})
    print(json.dumps(report))
    return 0


def _profile_worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--ipc", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--precision", default="float32")
    args = parser.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ipmcondense.condensation.api import condense
    from ipmcondense.data import load_dataset
    from ipmcondense.evaluation import EvaluationProtocol, evaluate_synthetic

    data = load_dataset("mnist", root=args.data_root)
    condense(args.method, data, args.ipc, iterations=1, progress=False,
             precision=args.precision)  # warm-up: allocations, first calls

    def top(prof) -> list[dict[str, Any]]:
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1.0
        return [{"name": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
                 "share": e.self_cpu_time_total / total} for e in events]

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = condense(args.method, data, args.ipc, iterations=args.steps, progress=False, precision=args.precision)
    step = top(prof)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        evaluate_synthetic(result.images, result.labels, data, EvaluationProtocol(epochs=1, precision=args.precision),
                           n_models=1)
    epoch = top(prof)
    print(json.dumps({"outer_steps": step, "evaluation_one_epoch_and_test": epoch,
                      "torch_threads": torch.get_num_threads()}))
    return 0


# ------------------------------------------------------------------------------------------ report
def report_lines(records: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    lines = []
    for name, modes in records.items():
        if (speed := modes.get("speed")) is not None:
            m, r = speed["medians"], speed["ratios_ours_over_reference"]
            text = f"{name}: ours {m['ours_iteration']:.3f} s/iteration"
            if "iteration" in r:
                text += f", reference {m['reference_iteration']:.3f} s (ratio {r['iteration']:.2f})"
            if "ours_model" in m:
                text += f"; ours {m['ours_model']:.1f} s/model ({speed['key']['eval_epochs']} epochs)"
            if "model" in r:
                text += f", reference {m['reference_model']:.1f} s (ratio {r['model']:.2f})"
            lines.append(text)
        if (acc := modes.get("accuracy")) is not None:
            a = acc["accuracy_mean"]
            lines.append(f"{name}: reference {acc['key']['iterations']} iterations in "
                         f"{acc['reference_condensation_seconds']:.0f} s -> {a['reference']:.2%}; ours "
                         f"{acc['ours_iterations']} iterations in {acc['ours_condensation_seconds']:.0f} s "
                         f"(ratio {acc['wall_time_ratio']:.2f}) -> {a['ours']:.2%}"
                         + "".join(f"; {k.replace('_', ' ')} -> {v:.2%}" for k, v in a.items()
                                   if k not in ("reference", "ours")))
        if (levers := modes.get("levers")) is not None:
            for combo, r in levers["ratios_to_float32_contiguous"].items():
                lines.append(f"{name}: {combo}: real side {r['real_side']:.2f}x, synthetic side "
                             f"{r['synthetic_side']:.2f}x of float32/contiguous")
            for variant, r in levers.get("step_ratios_to_defaults", {}).items():
                lines.append(f"{name}: whole outer iteration with {variant}: {r:.2f}x of the defaults")
        if (prof := modes.get("profile")) is not None:
            lines.append(f"{name}: top of {prof['key']['steps']} outer steps (self CPU):")
            lines += [f"    {e['share']:6.1%}  {e['self_cpu_ms']:9.1f} ms  {e['name']}" for e in prof["outer_steps"][:8]]
            lines.append(f"{name}: top of one evaluated model, 1 epoch + the test pass (self CPU):")
            lines += [f"    {e['share']:6.1%}  {e['self_cpu_ms']:9.1f} ms  {e['name']}"
                      for e in prof["evaluation_one_epoch_and_test"][:8]]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_eval-worker"]:
        return _eval_worker(argv[1:])
    if argv[:1] == ["_profile-worker"]:
        return _profile_worker(argv[1:])
    if argv[:1] == ["_levers-worker"]:
        return _levers_worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=os.environ.get("IPMCONDENSE_DATA_ROOT"),
                        help="folder holding MNIST/raw/*.gz (default $IPMCONDENSE_DATA_ROOT)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="a checkout of VICO-UoE/DatasetCondensation (omit: ipmcondense alone)")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS))
    parser.add_argument("--modes", nargs="+", choices=("speed", "accuracy", "profile", "levers"), default=["speed"])
    parser.add_argument("--iterations", type=int, default=40, help="last iteration of the timed window")
    parser.add_argument("--warmup", type=int, default=10, help="first iteration of the timed window")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    parser.add_argument("--eval-epochs", type=int, default=20, help="epochs of the timed evaluation (0: skip)")
    parser.add_argument("--models", type=int, default=3, help="evaluation models of the accuracy cell")
    parser.add_argument("--epochs", type=int, default=1000, help="evaluation epochs of the accuracy cell")
    parser.add_argument("--target-iterations", type=int, default=None,
                        help="reference iterations of the accuracy cell (default: the setting's)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--ours-profile", choices=sorted(OURS_PROFILES), default="reference",
                        help="ipmcondense's settings: reference (its defaults, float32) or fast (bfloat16 autocast in "
                             "condensation and evaluation); cells of fast end in -fast")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--force", action="store_true", help="recompute cached cells")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (iterations 10..20, 1 round, 2 evaluation epochs); writes nothing")
    args = parser.parse_args(argv)
    if args.data_root is None:
        parser.error("--data-root (or $IPMCONDENSE_DATA_ROOT) is required: the folder holding MNIST/raw/*.gz")
    if args.reference is not None and not (args.reference / "main_DM.py").is_file():
        parser.error(f"--reference: {args.reference} is not a DatasetCondensation checkout (no main_DM.py)")
    if args.warmup % 10 or args.iterations % 10 or args.iterations <= args.warmup:
        parser.error("--warmup and --iterations must be multiples of 10 (the reference prints every 10), "
                     "with --iterations > --warmup")
    if args.quick:
        global RESULTS
        RESULTS = Path(tempfile.mkdtemp(prefix="tta-quick-"))
        args.iterations, args.warmup, args.rounds, args.eval_epochs = 20, 10, 1, 2
        args.profile_steps, args.force = 1, True
    records: dict[str, dict[str, dict[str, Any]]] = {}
    cells = {"speed": speed_cell, "accuracy": accuracy_cell, "profile": profile_cell, "levers": levers_cell}
    for name in args.settings:
        setting = SETTINGS[name]
        with tempfile.TemporaryDirectory(prefix=f"tta-{name}-") as tmp:
            for mode in args.modes:
                records.setdefault(name, {})[mode] = cells[mode](setting, args, Path(tmp))
        label = name if args.ours_profile == "reference" else f"{name} ({args.ours_profile})"
        for line in report_lines({label: records[name]}):
            print(line, flush=True)
    if args.quick:
        shutil.rmtree(RESULTS, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
