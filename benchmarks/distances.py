"""Benchmark: unbiased Gaussian MMD² (and one Sinkhorn cell) against plain torch, pykeops and geomloss.

For ``X ~ N(0, I_D)``, ``Y ~ N(0.1, I_D)`` (float32, D = 64 by default, N = M) and the Gaussian kernel of
bandwidth ``sqrt(D)``, every *cell* (method x size) runs in a fresh subprocess (so the peak RSS it reports
through ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` belongs to that configuration alone), with a
per-cell timeout. Each cell records the forward time and the forward+backward (gradient w.r.t. X) time,
each the median of ``--repeats`` runs after one untimed warm-up (KeOps compiles during warm-up), the
peak RSS, and the RSS right after the imports and the data (to subtract the ~0.3 GB of torch itself).

Two *rooflines* are measured: the cost of the three Gram-matrix products alone (``X X^T``, ``Y Y^T``,
``X Y^T``) computed into one reused buffer, either ``roofline-contiguous`` (whole products, or 2048-row
blocks above N = 12,000, against a right factor transposed once into contiguous memory: the fast way)
or ``roofline`` (512-row blocks against a non-contiguous transpose, kept for comparison with earlier
runs). A kernel sum that uses symmetry needs only two thirds of those GEMMs, so it can beat them.
The robust comparison is the *interleaved* cell per size (``tiled-vs-rooflines``): both rooflines,
the tiled forward and the tiled forward+backward alternate in one process and the median ratios are
reported; likewise the OT cells compare ours with POT/scipy alternately. Times in the markdown
table are ratios to it (a backward pass needs about three such products, so fwd+bwd ratios near 3 are
the analogue of a forward ratio near 1).

Results are cached per cell in the JSON file (``--out``); cells already there are skipped unless
``--force``. A markdown table is written next to it (same name, ``.md``).

Usage::

    python benchmarks/distances.py --quick                   # tiny sizes, checks that everything runs
    python benchmarks/distances.py --sizes 1000 10000 50000  # the full benchmark (minutes to an hour)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MMD_METHODS = [
    "roofline-contiguous",
    "roofline",
    "ipmcondense-auto",
    "ipmcondense-dense",
    "ipmcondense-tiled",
    "ipmcondense-keops",
    "torch-dense",
    "pykeops",
    "geomloss-gaussian",
]
SINKHORN_METHODS = ["ipmcondense-sinkhorn", "geomloss-sinkhorn", "interleaved-ratio"]
SINKHORN_SETTINGS = {"p": 2, "blur": 0.05, "scaling": 0.5}
#: Interleaved comparisons (one process, calls alternated so that both sides see the same load).
INTERLEAVED_MMD = "tiled-vs-rooflines"
OT_CELLS = ["exact-weighted-vs-pot", "energy-1d-vs-scipy", "wasserstein-1d-vs-scipy"]
#: Above this N the contiguous roofline computes its Gram products in row blocks (an N x N buffer is 10 GB
#: at 50,000); blocks of 2048 rows keep each GEMM large.
ROOFLINE_FULL_MAX = 12000


# ------------------------------------------------------------------------------------------ child side


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _timed(fn, repeats: int, budget_s: float) -> tuple[float, int]:
    """Median time of up to ``repeats`` calls after one warm-up; stops early past ``budget_s``."""
    start = time.perf_counter()
    fn()
    times = []
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(times), len(times)


def _gaussian_callables(method: str, x, y, sigma: float):
    """(forward, forward+backward) closures for one MMD method; each returns a float."""
    import torch

    gamma = -1.0 / (2.0 * sigma**2)
    n, m = x.shape[0], y.shape[0]

    if method == "roofline-contiguous":
        rows_per_block = n if n <= ROOFLINE_FULL_MAX else 2048
        buffer = torch.empty(min(rows_per_block, n), max(n, m))
        right = {id(b): b.T.contiguous() for b in (x, y)}  # transposed once, outside the timing

        def roofline_contiguous():
            for a, b in ((x, x), (y, y), (x, y)):
                bt = right[id(b)]
                for r in range(0, a.shape[0], rows_per_block):
                    rows = a[r : r + rows_per_block]
                    torch.mm(rows, bt, out=buffer[: rows.shape[0], : b.shape[0]])
            return 0.0

        return roofline_contiguous, None

    if method == "roofline":
        buffer = torch.empty(min(512, n), max(n, m))

        def roofline():
            for a, b in ((x, x), (y, y), (x, y)):
                for r in range(0, a.shape[0], 512):
                    rows = a[r : r + 512]
                    torch.mm(rows, b.T, out=buffer[: rows.shape[0], : b.shape[0]])
            return 0.0

        return roofline, None

    if method.startswith("ipmcondense-"):
        from ipmcondense.ipm.mmd import mmd2

        backend = method.split("-", 1)[1]

        def value(p):
            return mmd2(p, y, bandwidth=sigma, estimator="unbiased", backend=backend)

    elif method == "torch-dense":

        def value(p):
            def gram(a, b):
                sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
                return torch.exp(sq.clamp_min(0) * gamma)

            kxx, kyy, kxy = gram(p, p), gram(y, y), gram(p, y)
            return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                    + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2.0 * kxy.mean())

    elif method == "pykeops":
        from pykeops.torch import LazyTensor

        def value(p):
            def total(a, b):
                d2 = LazyTensor(a[:, None, :]).sqdist(LazyTensor(b[None, :, :]))
                return (d2 * gamma).exp().sum(dim=1).sum()

            return ((total(p, p) - n) / (n * (n - 1)) + (total(y, y) - m) / (m * (m - 1))
                    - 2.0 * total(p, y) / (n * m))

    elif method == "geomloss-gaussian":
        from geomloss import SamplesLoss

        backend = "tensorized" if n <= 20000 else "online"
        loss = SamplesLoss("gaussian", blur=sigma, backend=backend)

        def value(p):  # geomloss returns half the biased V-statistic
            return loss(p, y)

    else:
        raise ValueError(f"unknown method {method!r}")

    def forward():
        with torch.no_grad():
            return float(value(x))

    def forward_backward():
        p = x.detach().requires_grad_(True)
        out = value(p)
        out.backward()
        return float(out)

    return forward, forward_backward


def _sinkhorn_callables(method: str, x, y):
    import torch

    if method == "ipmcondense-sinkhorn":
        from ipmcondense.ipm.sinkhorn import sinkhorn_divergence

        def value(p):
            return sinkhorn_divergence(p, y, **SINKHORN_SETTINGS)

    else:
        from geomloss import SamplesLoss

        loss = SamplesLoss("sinkhorn", debias=True, backend="tensorized", **SINKHORN_SETTINGS)

        def value(p):
            return loss(p, y)

    def forward():
        with torch.no_grad():
            return float(value(x))

    def forward_backward():
        p = x.detach().requires_grad_(True)
        out = value(p)
        out.backward()
        return float(out)

    return forward, forward_backward


def _interleaved_ratio(x, y, repeats: int) -> dict:
    """ipmcondense / geomloss Sinkhorn time ratios, the two calls alternated in this one process.

    Separate cells run minutes apart on a shared machine; alternating the calls exposes both to the same
    load, so the median ratio is the robust comparison.
    """
    ours_fwd, ours_fb = _sinkhorn_callables("ipmcondense-sinkhorn", x, y)
    geo_fwd, geo_fb = _sinkhorn_callables("geomloss-sinkhorn", x, y)
    ours_fwd(), geo_fwd()  # warm-up
    fwd, fb = [], []
    for _ in range(repeats):
        for timed, pair in (((ours_fwd, geo_fwd), fwd), ((ours_fb, geo_fb), fb)):
            spent = []
            for fn in timed:
                t0 = time.perf_counter()
                fn()
                spent.append(time.perf_counter() - t0)
            pair.append(spent[0] / spent[1])
    return {"fwd_ratio": statistics.median(fwd), "fwd_bwd_ratio": statistics.median(fb), "pairs": repeats}


def _interleaved_median_ratios(callables: dict, baselines: tuple[str, ...], repeats: int) -> dict:
    """Median over ``repeats`` rounds of time(name) / time(baseline), all calls alternated in one process."""
    for fn in callables.values():
        fn()  # warm-up
    ratios: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {name: [] for name in callables}
    for _ in range(repeats):
        spent = {}
        for name, fn in callables.items():
            t0 = time.perf_counter()
            fn()
            spent[name] = time.perf_counter() - t0
            seconds[name].append(spent[name])
        for base in baselines:
            for name in callables:
                if name != base:
                    ratios.setdefault(f"{name}/{base}", []).append(spent[name] / spent[base])
    result = {key: round(statistics.median(v), 3) for key, v in ratios.items()}
    result["seconds"] = {name: round(statistics.median(v), 4) for name, v in seconds.items()}
    result["rounds"] = repeats
    return result


def _interleaved_mmd(x, y, sigma: float, repeats: int) -> dict:
    """Tiled MMD² forward and forward+backward against both rooflines, alternated in one process."""
    calls = {
        "roofline-contiguous": _gaussian_callables("roofline-contiguous", x, y, sigma)[0],
        "roofline-blocked": _gaussian_callables("roofline", x, y, sigma)[0],
    }
    forward, forward_backward = _gaussian_callables("ipmcondense-tiled", x, y, sigma)
    calls["tiled-fwd"], calls["tiled-fwd+bwd"] = forward, forward_backward
    return _interleaved_median_ratios(calls, ("roofline-contiguous", "roofline-blocked"), repeats)


def _ot_cell(method: str, repeats: int) -> dict:
    """Interleaved ratios of one OT function of ours against its peer (POT or scipy), float64."""
    import numpy as np
    import scipy.stats
    import torch

    rng = np.random.default_rng(0)
    if method == "exact-weighted-vs-pot":
        import ot
        from scipy.spatial.distance import cdist

        from ipmcondense.ipm.wasserstein import wasserstein

        x, y = rng.normal(size=(500, 8)), rng.normal(size=(500, 8)) + 0.2
        a, b = rng.random(500), rng.random(500)
        a, b = a / a.sum(), b / b.sum()
        calls = {
            "peer": lambda: ot.emd2(a, b, cdist(x, y), numItermax=10**7),
            "ours": lambda: float(wasserstein(x, y, p=1, x_weights=a, y_weights=b)),
        }
    else:
        from ipmcondense.ipm.mmd import energy_distance
        from ipmcondense.ipm.wasserstein import wasserstein_1d

        u, v = rng.normal(size=2000), rng.normal(size=2000) + 0.1
        ours_fn, peer_fn = ((energy_distance, scipy.stats.energy_distance) if method == "energy-1d-vs-scipy"
                            else (wasserstein_1d, scipy.stats.wasserstein_distance))
        calls = {"peer": lambda: peer_fn(u, v), "ours": lambda: float(ours_fn(u, v))}
    values = {name: float(fn()) for name, fn in calls.items()}
    result = _interleaved_median_ratios(calls, ("peer",), repeats)
    result["abs_difference"] = abs(values["ours"] - values["peer"])
    result["threads"] = torch.get_num_threads()
    return result


def run_child(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    n, dim = spec["n"], spec["dim"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    y = torch.randn(n, dim, generator=g) + 0.1
    if spec["kind"] == "ot":
        result = {"rss_baseline_mb": round(_rss_mb(), 1)}
        result.update(_ot_cell(spec["method"], max(5, spec["repeats"])))
        result["peak_rss_mb"] = round(_rss_mb(), 1)
        result["status"] = "ok"
        return result
    if spec["method"].startswith(INTERLEAVED_MMD):
        result = {"rss_baseline_mb": round(_rss_mb(), 1), "threads": torch.get_num_threads()}
        load_start = os.getloadavg()[0]  # the machine is shared: the load says how much the cell competed
        result.update(_interleaved_mmd(x, y, spec["sigma"], spec["repeats"]))
        result["load_avg_1min"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
        result["peak_rss_mb"] = round(_rss_mb(), 1)
        result["status"] = "ok"
        return result
    if spec["method"] == "interleaved-ratio":
        baseline = _rss_mb()
        result = {"rss_baseline_mb": round(baseline, 1), "threads": torch.get_num_threads()}
        result.update(_interleaved_ratio(x, y, spec["repeats"]))
        result["peak_rss_mb"] = round(_rss_mb(), 1)
        result["status"] = "ok"
        return result
    if spec["kind"] == "sinkhorn":
        forward, forward_backward = _sinkhorn_callables(spec["method"], x, y)
    else:
        forward, forward_backward = _gaussian_callables(spec["method"], x, y, spec["sigma"])
    baseline = _rss_mb()
    budget = 0.35 * spec["timeout"]
    result = {"rss_baseline_mb": round(baseline, 1), "threads": torch.get_num_threads()}
    result["value"] = forward()
    result["fwd_s"], result["fwd_runs"] = _timed(forward, spec["repeats"], budget)
    if forward_backward is not None:
        result["fwd_bwd_s"], result["fwd_bwd_runs"] = _timed(forward_backward, spec["repeats"], budget)
    result["peak_rss_mb"] = round(_rss_mb(), 1)
    result["status"] = "ok"
    return result


# ----------------------------------------------------------------------------------------- parent side


def _skip_reason(method: str, n: int, args) -> str | None:
    keops = importlib.util.find_spec("pykeops") is not None
    if method in ("ipmcondense-dense", "torch-dense") and n > args.dense_max:
        return f"three {n}x{n} float32 matrices need {3 * 4 * n * n / 1e9:.0f} GB (> --dense-max {args.dense_max})"
    if method in ("ipmcondense-keops", "pykeops") and not keops:
        return "pykeops is not installed"
    if method == "geomloss-gaussian" and n > 20000 and not keops:
        return "the online geomloss backend needs pykeops"
    if method == "ipmcondense-sinkhorn" and importlib.util.find_spec("ipmcondense.ipm.sinkhorn") is None:
        return "ipmcondense.ipm.sinkhorn is not available yet"
    return None


def _run_cell(spec: dict, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    wall = time.perf_counter() - t0
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"status": "error", "message": " | ".join(tail)}
    result = json.loads(lines[-1])
    result["wall_s"] = round(wall, 2)
    return result


def _cell_key(kind: str, method: str, n: int, dim: int) -> str:
    return f"{kind}|{method}|N={n}|D={dim}"


def _format_cell(cell: dict | None, roof: dict | None) -> str:
    if cell is None:
        return "–"
    if cell.get("status") != "ok":
        return {"timeout": "timeout", "skipped": "n/a", "error": "error"}.get(cell.get("status"), "?")
    extra = cell["peak_rss_mb"] - cell.get("rss_baseline_mb", 0.0)
    peak = f"{cell['peak_rss_mb'] / 1024:.2f} GB (+{extra:.0f} MB)"
    if roof and roof.get("status") == "ok" and roof.get("fwd_s"):
        fwd = f"{cell['fwd_s']:.3g} s ({cell['fwd_s'] / roof['fwd_s']:.2f}x)"
        bwd = (f"{cell['fwd_bwd_s']:.3g} s ({cell['fwd_bwd_s'] / roof['fwd_s']:.2f}x)"
               if "fwd_bwd_s" in cell else "–")
    else:
        fwd = f"{cell['fwd_s']:.3g} s"
        bwd = f"{cell['fwd_bwd_s']:.3g} s" if "fwd_bwd_s" in cell else "–"
    return f"{fwd} / {bwd} / {peak}"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def cached_sizes(results: dict, sizes: list[int], dim: int) -> list[int]:
    """``sizes`` plus every MMD size cached in ``results`` for ``dim`` (the table shows all of them)."""
    found = set(sizes)
    for key in results:
        parts = key.split("|")
        if len(parts) == 4 and parts[0] == "mmd" and parts[3] == f"D={dim}":
            found.add(int(parts[2].removeprefix("N=")))
    return sorted(found)


def write_markdown(results: dict, path: Path, sizes: list[int], dim: int, sinkhorn_n: int) -> None:
    meta = results.get("_meta", {})
    lines = [
        "# Distance benchmarks",
        "",
        f"Unbiased Gaussian MMD², D = {dim}, N = M, float32, bandwidth sqrt(D). Machine: "
        f"{meta.get('machine', '?')}. Generated by `benchmarks/distances.py`.",
        "",
        "Each cell: forward time (ratio to the roofline) / forward+backward time (ratio to the forward "
        "roofline) / peak RSS of the process (in brackets: above the RSS after imports and data). Times are medians of the "
        "timed runs after one warm-up. The roofline is the three Gram products alone, measured in the "
        "same run.",
        "",
        "| method | " + " | ".join(f"N = {n:,}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for method in MMD_METHODS:
        row = []
        for n in sizes:
            cell = results.get(_cell_key("mmd", method, n, dim))
            roof = results.get(_cell_key("mmd", "roofline", n, dim))
            text = _format_cell(cell, roof)
            if method == "roofline" and cell and cell.get("status") == "ok":
                text = f"{cell['fwd_s']:.3g} s / – / {cell['peak_rss_mb'] / 1024:.2f} GB"
            row.append(text)
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += ["", "geomloss `SamplesLoss('gaussian')` computes half the biased V-statistic, not the "
              "unbiased MMD²; it is timed for the same kernel sums. `roofline-contiguous`: the three full Gram "
              f"products into one reused buffer with a contiguous transposed right factor (row blocks of 2048 "
              f"above N = {ROOFLINE_FULL_MAX:,}); `roofline`: the older 512-row blocks against a non-contiguous "
              "transpose (slower, so ratios against it flatter). Ratios in the cells are against `roofline`.", ""]
    lines += [
        "## Tiled MMD² against both rooflines, interleaved",
        "",
        "One process per size; in every round the two rooflines, the tiled forward and the tiled "
        "forward+backward (gradient w.r.t. X) run one after the other, and the table gives the median over "
        "rounds of each time ratio, so machine load affects both sides alike. Goal (issue 13): forward "
        "<= 1.0x and forward+backward <= 2.5x of the contiguous roofline.",
        "",
        "| N | threads | rounds | fwd / contiguous | fwd+bwd / contiguous | fwd / blocked | fwd+bwd / blocked "
        "| contiguous roofline | tiled fwd | tiled fwd+bwd | load (1-min avg, start-end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    interleaved = sorted(
        (int(key.split("|")[2].removeprefix("N=")), key) for key in results
        if key.startswith(f"mmd|{INTERLEAVED_MMD}") and key.endswith(f"|D={dim}")
    )
    for n, key in interleaved:
        cell = results[key]
        if cell.get("status") == "ok":
            sec = cell["seconds"]
            lines.append(
                f"| {n:,} | {cell['threads']} | {cell['rounds']} "
                f"| {cell['tiled-fwd/roofline-contiguous']:.2f}x | {cell['tiled-fwd+bwd/roofline-contiguous']:.2f}x "
                f"| {cell['tiled-fwd/roofline-blocked']:.2f}x | {cell['tiled-fwd+bwd/roofline-blocked']:.2f}x "
                f"| {sec['roofline-contiguous']:.3g} s | {sec['tiled-fwd']:.3g} s | {sec['tiled-fwd+bwd']:.3g} s "
                f"| {'-'.join(f'{v:.1f}' for v in cell['load_avg_1min']) if 'load_avg_1min' in cell else 'not recorded'} |")
    lines += [
        "",
        "Threads and load: every GEMM and every elementwise pass over a tile is one OpenMP parallel region "
        "ending in a barrier. On idle cores a region costs a thread wake-up (~10 us); when other processes "
        "hold the cores (load average above the core count) it costs a scheduler time slice: a 64k-element "
        "in-place op took a median 20 ms with 2 threads at load 11 against 10 us with 1 thread. The "
        "contiguous roofline is three GEMMs (a few regions); a tiled sum opens a few regions per tile "
        "(counted per operation: about 1,500 for a 10,000-point MMD² with its gradient at 2 threads, about "
        "4,500 before the gradient was built in the forward sweep), so on a loaded machine the 2-thread "
        "ratios measure the scheduler, "
        "not the kernel sums: use one thread per process there.",
        "",
        "## Optimal transport and 1-D distances against their peers, interleaved (float64)",
        "",
        "| comparison | ours / peer (median time ratio) | rounds | |value difference| |",
        "|---|---|---|---|",
    ]
    for method in OT_CELLS:
        cell = results.get(_cell_key("ot", method, 0, 0))
        if cell and cell.get("status") == "ok":
            lines.append(f"| {method} | {cell['ours/peer']:.2f}x | {cell['rounds']} | {cell['abs_difference']:.2g} |")
    lines += ["", "`exact-weighted-vs-pot`: `wasserstein(p=1)` with weights at 500 x 500, D = 8, against "
              "`ot.emd2` on the cdist cost (ours includes the cost matrix and the torch value); the 1-D rows "
              "compare with `scipy.stats` at n = m = 2000.", ""]
    lines += [
        f"## Sinkhorn divergence, N = M = {sinkhorn_n:,}, D = {dim}, "
        + ", ".join(f"{k}={v}" for k, v in SINKHORN_SETTINGS.items()),
        "",
        "| method | forward | forward+backward | peak RSS | value |",
        "|---|---|---|---|---|",
    ]
    for method in SINKHORN_METHODS:
        cell = results.get(_cell_key("sinkhorn", method, sinkhorn_n, dim))
        if method == "interleaved-ratio":
            if cell and cell.get("status") == "ok":
                lines += ["", f"Interleaved in one process ({cell['pairs']} alternating pairs, same load for both): "
                          f"ipmcondense / geomloss time = {cell['fwd_ratio']:.2f} forward, "
                          f"{cell['fwd_bwd_ratio']:.2f} forward+backward (median ratios)."]
            continue
        if cell and cell.get("status") == "ok":
            lines.append(f"| {method} | {cell['fwd_s']:.3g} s | {cell.get('fwd_bwd_s', float('nan')):.3g} s "
                         f"| {cell['peak_rss_mb'] / 1024:.2f} GB | {cell['value']:.6g} |")
        else:
            status = "–" if cell is None else cell.get("status")
            reason = "" if cell is None else cell.get("reason", cell.get("message", ""))
            lines.append(f"| {method} | {status} | | | {reason} |")
    skipped = [(k, v.get("reason", v.get("message", f"did not finish within the cell timeout of {v.get('timeout_s', '?')} s")))
               for k, v in results.items()
               if k != "_meta" and isinstance(v, dict) and v.get("status") in ("skipped", "error", "timeout")]
    if skipped:
        lines += ["", "Cells not measured:", ""] + [f"- `{k}`: {reason}" for k, reason in skipped]
    _write_atomically(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median reported)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distances.json"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every cell runs")
    parser.add_argument("--force", action="store_true", help="re-run cells already in --out")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per cell (subprocess)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dense-max", type=int, default=20000, help="largest N for dense methods")
    parser.add_argument("--sinkhorn-size", type=int, default=5000)
    parser.add_argument("--methods", nargs="+", default=None, help="subset of methods to run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    if args.quick:
        args.sizes, args.sinkhorn_size, args.timeout = [300, 700], 300, min(args.timeout, 300.0)
        if args.out == parser.get_default("out"):
            args.out = Path("benchmarks/results/distances_quick.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["_meta"] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                        "python": platform.python_version()}
    sigma = args.dim**0.5
    cells = [("mmd", method, n) for n in args.sizes for method in MMD_METHODS]
    # the interleaved cell is kept per thread count (contention on a shared machine depends on it)
    interleaved = INTERLEAVED_MMD + (f"@threads={args.threads}" if args.threads else "")
    cells += [("mmd", interleaved, n) for n in args.sizes]
    cells += [("sinkhorn", method, args.sinkhorn_size) for method in SINKHORN_METHODS]
    cells += [("ot", method, 0) for method in OT_CELLS]
    for kind, method, n in cells:
        if args.methods and method not in args.methods and method.split("@")[0] not in args.methods:
            continue
        key = _cell_key(kind, method, n, 0 if kind == "ot" else args.dim)
        if key in results and not args.force and results[key].get("status") in ("ok", "skipped"):
            print(f"cached   {key}")
            continue
        reason = _skip_reason(method, n, args)
        if reason:
            results[key] = {"status": "skipped", "reason": reason}
            print(f"skipped  {key}: {reason}")
        else:
            spec = {"kind": kind, "method": method, "n": n, "dim": args.dim, "sigma": sigma,
                    "repeats": args.repeats, "timeout": args.timeout, "threads": args.threads}
            results[key] = _run_cell(spec, args.timeout)
            cell = results[key]
            if cell["status"] != "ok":
                summary = cell.get("message", cell["status"])
            elif "fwd_ratio" in cell:
                summary = f"ipmcondense/geomloss {cell['fwd_ratio']:.2f} fwd, {cell['fwd_bwd_ratio']:.2f} fwd+bwd"
            elif "rounds" in cell:
                summary = ", ".join(f"{k} {v:.2f}" for k, v in cell.items() if "/" in k)
            else:
                summary = f"fwd {cell['fwd_s']:.3g} s, peak {cell['peak_rss_mb']:.0f} MB"
            print(f"measured {key}: {summary}", flush=True)
        _write_atomically(args.out, json.dumps(results, indent=2, sort_keys=True))
    markdown = args.out.with_suffix(".md")
    write_markdown(results, markdown, cached_sizes(results, args.sizes, args.dim), args.dim, args.sinkhorn_size)
    print(f"wrote {args.out} and {markdown}")


if __name__ == "__main__":
    main()
