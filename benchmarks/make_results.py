"""Generate ``benchmarks/RESULTS.md`` from the cached benchmark cells only (nothing is hand-edited).

Reads ``benchmarks/results/condense/<profile>/<dataset>/*.json`` (written by ``benchmarks/condense.py``),
``benchmarks/results/class_batching*.json`` and ``benchmarks/results/distances.md`` when present, and
writes ``benchmarks/RESULTS.md`` plus the plot ``benchmarks/results/accuracy_vs_time.png``.

Published accuracies are transcribed below (:data:`PUBLISHED`) from ``shared/reference/methods.md``
section 4, each with its source string; the legend of the confidence tags is that file's:
[R] the method's README, [P] a verbatim table re-quoted in another paper (mostly PAD, arXiv
2408.03360, Table 1), [K] the KIP-ConvNet paper's tables, [M] from memory of the original paper,
not re-verified.

Usage::

    python benchmarks/make_results.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["PUBLISHED", "PUBLISHED_DATASETS", "load_cells", "published_entry", "render_results", "plot_accuracy_vs_time", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
UPPER_BOUND = "whole-dataset"
IPCS = (1, 10, 50)
PUBLISHED_DATASETS = ("mnist", "fashion-mnist", "cifar10")
METHODS_MD = "shared/reference/methods.md §4"


def _row(source: str, tag: str, values: dict[str, tuple], note: str = "",
         per_dataset: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """A published row: default (source, tag), and ``per_dataset`` {dataset: (source, tag)} exceptions."""
    return {"source": source, "tag": tag, "values": values, "note": note, "per_dataset": per_dataset or {}}


# method -> {"source", "tag", "values": {dataset: (ipc1, ipc10, ipc50) of (mean, std|None) or None}, "note"}
# Transcribed from methods.md §4 (ConvNet-3 evaluation unless noted).
PUBLISHED: dict[str, dict[str, Any]] = {
    "random": _row("DC paper T1", "M", {
        "mnist": ((64.9, 3.5), (95.1, 0.9), (97.9, 0.2)),
        "fashion-mnist": ((51.4, 3.8), (73.8, 0.7), (82.5, 0.7)),
        "cifar10": ((14.4, 2.0), (26.0, 1.2), (43.4, 1.0))}),
    "herding": _row("DC paper T1, MTT T1", "M", {
        "mnist": ((89.2, 1.6), (93.7, 0.3), (94.8, 0.2)),
        "fashion-mnist": ((67.0, 1.9), (71.1, 0.7), (71.9, 0.8)),
        "cifar10": ((21.5, 1.2), (31.6, 0.7), (40.4, 0.6))}),
    UPPER_BOUND: _row("DC/DSA papers", "M", {
        "mnist": ((99.6, 0.0),), "fashion-mnist": ((93.5, 0.1),), "cifar10": ((84.8, 0.1),)},
        per_dataset={"cifar10": ("DC/DSA papers via PAD T1", "P")}),
    "dd": _row("DC paper T1", "M", {
        "mnist": (None, (79.5, 8.1), None), "cifar10": (None, (36.8, 1.2), None)},
        note="LeNet (MNIST) / AlexCifarNet (CIFAR-10), not ConvNet-3"),
    "dc": _row("VICO README, PAD T1", "R,P", per_dataset={"mnist": ("VICO README, KIP T1", "R,K"),
                                                          "fashion-mnist": ("VICO README, KIP T1", "R,K")}, values={
        "mnist": ((91.7, 0.5), (97.4, 0.2), (98.8, 0.1)),
        "fashion-mnist": ((70.5, 0.6), (82.3, 0.4), (83.6, 0.4)),
        "cifar10": ((28.3, 0.5), (44.9, 0.5), (53.9, 0.5))}),
    "dsa": _row("VICO README, PAD T1", "R,P", per_dataset={"mnist": ("VICO README, KIP T1", "R,K"),
                                                           "fashion-mnist": ("VICO README, KIP T1", "R,K")}, values={
        "mnist": ((88.7, 0.6), (97.8, 0.1), (99.2, 0.1)),
        "fashion-mnist": ((70.6, 0.6), (84.6, 0.3), (88.7, 0.2)),
        "cifar10": ((28.8, 0.7), (52.1, 0.5), (60.6, 0.5))}),
    "dm": _row("DM paper via PAD T1", "P", per_dataset={"mnist": ("DM paper", "M"), "fashion-mnist": ("DM paper", "M")}, values={
        "mnist": ((89.7, 0.6), (97.5, 0.1), (98.6, 0.1)),
        "fashion-mnist": ((70.7, 0.6), (83.5, 0.3), (88.1, 0.6)),
        "cifar10": ((26.0, 0.8), (48.9, 0.6), (63.0, 0.4))}),
    "cafe": _row("CAFE T1 (CAFE+DSA row)", "M", {
        "mnist": ((93.1, 0.3), (97.2, 0.2), (98.6, 0.2)),
        "fashion-mnist": ((77.1, 0.9), (83.0, 0.4), (84.8, 0.4)),
        "cifar10": ((31.6, 0.8), (50.9, 0.5), (62.3, 0.4))},
        note="our cafe recipe uses DSA, so the CAFE+DSA row"),
    "idm": _row("re-quoted in InfoUtil/RDED tables", "P", {
        "cifar10": ((45.6, 0.7), (58.6, 0.1), (67.5, 0.1))}, note="multi-formation (4 decoded images per stored image)"),
    "datadam": _row("DataDAM T1", "M", {
        "cifar10": ((32.0, 1.2), (54.2, 0.8), (67.0, 0.4))}, note="evaluation 1800 epochs, batch 64"),
    "m3d": _row("M3D T1", "M", {
        "cifar10": ((45.3, 0.3), (63.5, 0.2), (69.9, 0.5))}, note="factor/up-sampling parameterisation"),
    "mtt": _row("MTT T1 via InfoUtil re-quote", "P", per_dataset={"mnist": ("MTT via FRePo/RCIG tables", "M"),
                                                                  "fashion-mnist": ("MTT via FRePo/RCIG tables", "M")}, values={
        "mnist": ((91.4, 0.9), (97.3, 0.1), (98.5, 0.1)),
        "fashion-mnist": ((75.1, 0.9), (87.2, 0.3), (88.3, 0.1)),
        "cifar10": ((46.3, 0.8), (65.3, 0.7), (71.6, 0.2))}, note="ZCA; max over evaluation checkpoints"),
    "kip": _row("KIP NeurIPS'21 T2 (KIP -> NN)", "K", per_dataset={"cifar10": ("KIP -> NN via MTT T1", "P")}, values={
        "mnist": ((90.1, None), (97.5, None), (98.4, None)),
        "fashion-mnist": ((73.8, None), (86.8, None), (87.8, None)),
        "cifar10": ((49.9, 0.2), (62.7, 0.3), (68.6, 0.2))},
        note="width-1024 no-norm ConvNet, ZCA, label learning"),
    "rfad": _row("RFAD paper (finite-network table)", "M", {
        "mnist": ((94.4, 1.5), (98.5, 0.1), (98.8, 0.1)),
        "fashion-mnist": ((78.6, 1.3), (87.0, 0.5), (88.8, 0.4)),
        "cifar10": ((53.6, 1.2), (66.3, 0.5), (71.1, 0.4))}, note="labels learned, Platt scaling, ZCA"),
    "rcig": _row("RCIG via PAD T1", "P", per_dataset={"mnist": ("RCIG paper", "M"), "fashion-mnist": ("RCIG paper", "M")}, values={
        "mnist": ((94.7, 0.5), (98.9, 0.0), (99.2, 0.0)),
        "fashion-mnist": ((79.8, 1.1), (88.5, 0.2), (90.2, 0.2)),
        "cifar10": ((53.9, 1.0), (69.1, 0.4), (73.5, 0.3))}, note="labels learned, ZCA"),
}


def published_entry(method: str, dataset: str, ipc: int | None) -> dict[str, Any] | None:
    """``{"mean", "std", "source", "tag", "note"}`` of a published number, or ``None``."""
    row = PUBLISHED.get(method)
    if row is None or dataset not in row["values"]:
        return None
    values = row["values"][dataset]
    index = 0 if method == UPPER_BOUND else IPCS.index(ipc) if ipc in IPCS else None
    if index is None or index >= len(values) or values[index] is None:
        return None
    mean, std = values[index]
    source, tag = row["per_dataset"].get(dataset, (row["source"], row["tag"]))
    return {"mean": mean, "std": std, "source": source, "tag": tag, "note": row["note"]}


def _format_published(entry: dict[str, Any] | None, mark: str = "") -> str:
    if entry is None:
        return "–"
    value = f"{entry['mean']:.1f}" + (f" ± {entry['std']:.1f}" if entry["std"] is not None else "")
    return f"{value} [{entry['source']}; {entry['tag']}]{mark}"


#: Marks a published number measured with a protocol the library does not reproduce (or has not recorded).
OTHER_PROTOCOL_MARK = " ‡"
STANDARD = "standard"
PUBLISHED_PROTOCOL = "published"


def published_row_protocol(method: str, dataset: str) -> str | None:
    """Which of our evaluation protocols the paper's numbers are comparable with.

    ``"standard"`` when the method's published protocol (:mod:`ipmcondense.condensation.published`) is the
    standard one on ``dataset``, ``"published"`` when it differs and can be reproduced, ``None`` when the
    paper's protocol is not recorded or cannot be expressed (its numbers are then shown with
    :data:`OTHER_PROTOCOL_MARK`).
    """
    if method == UPPER_BOUND:
        return STANDARD
    try:
        from ipmcondense.condensation.published import is_standard_protocol, protocol_settings
    except ImportError:  # the table still renders without the library
        return None
    try:
        settings = protocol_settings(method, dataset, PUBLISHED_PROTOCOL)
    except ValueError:
        return None
    return STANDARD if is_standard_protocol(settings) else PUBLISHED_PROTOCOL


def _describe_protocol(method: str, dataset: str, protocol: str) -> str:
    """The evaluation column: ``standard`` or ``published (epochs 300, augmentation none)``."""
    if protocol != PUBLISHED_PROTOCOL:
        return protocol
    try:
        from ipmcondense.condensation.published import protocol_settings

        settings = protocol_settings(method, dataset, PUBLISHED_PROTOCOL)
    except (ImportError, ValueError):
        return protocol
    return f"published ({', '.join(f'{k} {v}' for k, v in sorted(settings.items())) or 'as standard'})"


def load_cells(results_dir: Path) -> list[dict[str, Any]]:
    """Every cell JSON under ``results_dir/condense`` (unreadable files are reported as errors)."""
    cells = []
    for path in sorted(Path(results_dir, "condense").glob("*/*/*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            data = {"status": "error", "error": f"unreadable cell file: {err}", "profile": path.parts[-3],
                    "dataset": path.parts[-2], "method": path.stem, "ipc": None}
        data["_path"] = os.path.relpath(path, REPO_ROOT)
        cells.append(data)
    return cells


def _format_ours(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "not run"
    if cell.get("status") == "skipped":
        return "skipped"
    if cell.get("status") != "ok":
        return "error"
    std = 100 * cell["accuracy_std"]
    return f"**{100 * cell['accuracy_mean']:.1f} ± {std:.1f}** (n={cell['n_models']}, seed {cell['seed']})"


def _method_order(methods: set[str]) -> list[str]:
    try:
        from ipmcondense.condensation.recipes import METHOD_NAMES
    except ImportError:  # the table still renders without the library
        METHOD_NAMES = ()
    known = [m for m in METHOD_NAMES if m in methods]
    return known + sorted(m for m in methods if m not in known and m != UPPER_BOUND) + (
        [UPPER_BOUND] if UPPER_BOUND in methods else [])


def _accuracy_table(dataset: str, profile: str, cells: list[dict[str, Any]]) -> list[str]:
    """One row per (method, evaluation protocol): a published number sits in the row evaluated like it."""
    by_key = {(c["method"], c.get("ipc"), c.get("protocol", STANDARD)): c for c in cells}
    methods = {c["method"] for c in cells}
    published_here = dataset in PUBLISHED_DATASETS
    if published_here:
        methods |= {m for m in PUBLISHED if dataset in PUBLISHED[m]["values"]}
    ipcs = sorted({c["ipc"] for c in cells if c.get("ipc") is not None} | set(IPCS))
    header = "| method | evaluation | " + " | ".join(f"IPC {k}: ours | IPC {k}: published" for k in ipcs) + " |"
    lines = [header, "|---|---|" + "---|---|" * len(ipcs)]
    for method in _method_order(methods):
        if method == UPPER_BOUND:
            cell = by_key.get((UPPER_BOUND, None, STANDARD))
            ours = _format_ours(cell)
            if cell is not None and cell.get("status") == "ok" and cell.get("eval_epochs") is not None:
                ours += f", {cell['eval_epochs']} epoch{'' if cell['eval_epochs'] == 1 else 's'}"
            pub = _format_published(published_entry(UPPER_BOUND, dataset, None))
            lines.append(f"| whole dataset (upper bound) | {STANDARD} | {ours} | {pub} |" + " |" * (2 * len(ipcs) - 2))
            continue
        has_published = published_here and dataset in PUBLISHED.get(method, {}).get("values", {})
        home = published_row_protocol(method, dataset) if has_published else STANDARD
        protocols = [STANDARD] + ([PUBLISHED_PROTOCOL] if home == PUBLISHED_PROTOCOL or any(
            c["method"] == method and c.get("protocol", STANDARD) == PUBLISHED_PROTOCOL for c in cells) else [])
        for protocol in protocols:
            parts = []
            for k in ipcs:
                entry = published_entry(method, dataset, k)
                if home is None:  # the paper's protocol is not reproduced: shown, marked, in the standard row
                    pub = _format_published(entry, OTHER_PROTOCOL_MARK) if protocol == STANDARD else "–"
                elif protocol == home:
                    pub = _format_published(entry)
                else:
                    pub = "– (other protocol)" if entry is not None else "–"
                parts += [_format_ours(by_key.get((method, k, protocol))), pub]
            lines.append(f"| {method} | {_describe_protocol(method, dataset, protocol)} | " + " | ".join(parts) + " |")
    return lines


def _cost_table(cells: list[dict[str, Any]]) -> list[str]:
    ok = [c for c in cells if c.get("status") == "ok"]
    if not ok:
        return []
    lines = ["| method | IPC | iterations | condensation (s) | s / iteration | evaluation (s) | eval epochs | "
             "peak RSS (MB) | library | commit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method in _method_order({c["method"] for c in ok}):
        for c in sorted((c for c in ok if c["method"] == method), key=lambda c: (c.get("ipc") or 0, c.get("protocol", STANDARD))):
            spi = c.get("seconds_per_iteration")
            label = method if c.get("protocol", STANDARD) == STANDARD else f"{method} ({c['protocol']} protocol)"
            lines.append(
                f"| {label} | {c.get('ipc') if c.get('ipc') is not None else 'all'} | {c.get('iterations', 0)} | "
                f"{c.get('condense_seconds', 0.0):.1f} | {f'{spi:.3f}' if spi else '–'} | "
                f"{c.get('eval_seconds', 0.0):.0f} | {c.get('eval_epochs') if c.get('eval_epochs') is not None else 'protocol (1000)'} | "
                f"{c.get('peak_rss_mb', 0.0):.0f} | {c.get('version', '?')} | {(c.get('git_commit') or '?')[:12]} |")
    return lines


def _not_run(cells: list[dict[str, Any]]) -> list[str]:
    lines = []
    reasons: dict[str, list[str]] = defaultdict(list)
    for c in cells:
        name = c["method"] if c.get("ipc") is None else f"{c['method']}-ipc{c['ipc']}"
        if c.get("protocol", STANDARD) != STANDARD:
            name += f"-{c['protocol']}"
        if c.get("status") == "skipped":
            reasons[f"skipped: {c.get('reason', '?')}"].append(name)
        elif c.get("status") != "ok":
            reasons[f"error: {str(c.get('error', '?')).splitlines()[0][:200]}"].append(name)
    for reason, names in sorted(reasons.items()):
        lines.append(f"- {reason}: {', '.join(names)}")
    return lines


def plot_accuracy_vs_time(cells: list[dict[str, Any]], path: Path) -> bool:
    """Scatter of accuracy against condensation time (log scale), one panel per dataset; ``False`` if no data."""
    ok = [c for c in cells if c.get("status") == "ok" and c["method"] != UPPER_BOUND]
    if not ok:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({c["dataset"] for c in ok})
    methods = _method_order({c["method"] for c in ok})
    colours = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    markers = {1: "o", 10: "s", 50: "^"}
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        seen = set()
        for c in ok:
            if c["dataset"] != dataset:
                continue
            x = max(float(c.get("condense_seconds") or 0.0), 0.1)
            label = c["method"] if c["method"] not in seen else None
            seen.add(c["method"])
            ax.errorbar(x, 100 * c["accuracy_mean"], yerr=100 * c["accuracy_std"], fmt=markers.get(c["ipc"], "D"),
                        color=colours[c["method"]], label=label, capsize=2,
                        mfc=colours[c["method"]] if c.get("profile") == "cpu-small" else "none")
        ax.set_xscale("log")
        ax.set_xlabel("condensation time (s, log; selection baselines at 0.1)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{dataset} (o IPC 1, s IPC 10, ^ IPC 50)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _class_batching_section(path: Path) -> list[str]:
    if not path.exists():
        return ["Not measured yet: `python benchmarks/condense.py --class-batching --datasets digits "
                "--methods dm m3d dc --ipc 10` writes `benchmarks/results/class_batching.json`."]
    data = json.loads(path.read_text())
    lines = [
        f"Time per outer iteration with `class_batching=True` (all classes in one forward pass) against "
        f"`class_batching=False` (the reference per-class loop), same recipe, same process, runs interleaved "
        f"(on/off, off/on, ...); each run's time is the median of its iterations after the first. Dataset "
        f"{data['dataset']}, IPC {data['ipc']}, {data['hardware']}, 1-minute load average "
        f"{data.get('load_average_1min_at_end', '?')} at the end (a load above the core count makes both "
        f"columns noisy); library {data['version']}, commit "
        f"{(data.get('git_commit') or '?')[:12]}.",
        "",
        "| recipe | batched (ms / it) | per-class loop (ms / it) | median ratio loop / batched | pairs | "
        "max relative loss difference |",
        "|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['method']} | {1e3 * row['median_batched']:.1f} | {1e3 * row['median_loop']:.1f} | "
            f"**{row['median_ratio']:.2f}** | {row['repeats']} | {row['max_relative_loss_difference']:.1e} |")
    lines += ["", "A ratio above 1 means the batched engine is faster. The loss columns must agree (same "
              "objective) up to rounding; a large difference would mean the two paths compute different things."]
    return lines


def render_results(results_dir: Path = RESULTS_DIR, plot: bool = True) -> str:
    """The text of RESULTS.md (and, with ``plot``, the PNG next to the cells)."""
    cells = load_cells(results_dir)
    profiles_seen = sorted({c.get("profile", "?") for c in cells})
    hardware = sorted({c["hardware"] for c in cells if c.get("status") == "ok" and c.get("hardware")})
    out = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/make_results.py` from the cached cells in "
        "`benchmarks/results/condense/` (written by `python benchmarks/condense.py`). Nothing here is "
        "edited by hand; re-run both scripts to update it.",
        "",
        "**Hardware of the cells below:** " + ("; ".join(hardware) if hardware else "no cell has run yet") + ".",
        "",
        "**Budgets.** The `cpu-small` profile runs each dataset in about two hours on 2 CPU cores: its "
        "outer iterations, real batches, evaluation epochs and model counts are **far below the papers'** "
        "(see each cell's `key` and `notes`), so its accuracies say how the library behaves at small cost, "
        "not what a method reaches. The `paper` profile uses the references' iterations, the protocol's "
        "epochs and 5 models. Accuracies are % on the full test set, mean ± population std over the "
        "evaluated models (n), each trained from the condensed set with the VICO-UoE protocol "
        "(ConvNet-3, SGD 0.01, momentum 0.9, DSA; `ipmcondense.evaluation.EvaluationProtocol`). On `digits` "
        "(8x8) the ConvNet sized to the input has depth 2 (`convnet-d2`) for every method, the baselines and "
        "the whole-dataset bound alike (`DATASET_DEFAULTS`).",
        "",
        f"**Published numbers** come from `{METHODS_MD}` with the source named in each cell and its "
        "confidence tag: [R] the method's README, [P] a verbatim table re-quoted in another paper (PAD "
        "T1 = arXiv 2408.03360 Table 1), [K] the KIP-ConvNet paper, [M] from memory of the original paper, "
        "not re-verified. Several published rows use protocol deviations (ZCA, learned labels, "
        "multi-formation, other networks), noted below the tables; the digits dataset (scikit-learn 8x8) "
        "has no published numbers.",
        "",
        "**Like with like.** Each row says how our number was evaluated: `standard` (the VICO-UoE protocol, every "
        "method) or `published` (the protocol of the method's paper on that dataset, "
        "`ipmcondense.condensation.published`, e.g. DC on CIFAR without augmentation for 300 epochs; cells from "
        "`python benchmarks/condense.py --protocol published`). A published number sits in the row evaluated like "
        "it; `– (other protocol)` means it belongs to the other row, and ‡ marks a paper whose protocol the "
        "library does not reproduce or has not recorded (other networks, optimisers, parameterisations), so the "
        "two columns of that row are not comparable.",
        "",
    ]
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        grouped[(c.get("dataset", "?"), c.get("profile", "?"))].append(c)
    order = {d: i for i, d in enumerate(("digits", "mnist", "fashion-mnist", "cifar10"))}
    for dataset, profile in sorted(grouped, key=lambda k: (order.get(k[0], 99), k[0], k[1])):
        group = grouped[(dataset, profile)]
        out += [f"## {dataset} — profile `{profile}`", ""]
        out += _accuracy_table(dataset, profile, group) + [""]
        notes = sorted({f"{m}: {PUBLISHED[m]['note']}" for m in PUBLISHED
                        if PUBLISHED[m]["note"] and dataset in PUBLISHED[m]["values"]})
        if notes:
            out += ["Published-row deviations: " + "; ".join(notes) + ".", ""]
        cost = _cost_table(group)
        if cost:
            out += [f"Cost ({dataset}, `{profile}`):", ""] + cost + [""]
        cell_notes = sorted({f"{c['method']}: {n}" for c in group if c.get("status") == "ok" for n in c.get("notes", [])})
        if cell_notes:
            out += ["Cell notes:", ""] + [f"- {n}" for n in cell_notes] + [""]
        not_run = _not_run(group)
        if not_run:
            out += ["Not run:", ""] + not_run + [""]
    for dataset in PUBLISHED_DATASETS:
        if not any(d == dataset for d, _ in grouped):
            out += [f"## {dataset}", "", f"No cell for {dataset} yet (published numbers only):", ""]
            out += _accuracy_table(dataset, "-", []) + [""]
    out += ["## Accuracy against condensation time", ""]
    png = results_dir / "accuracy_vs_time.png"
    if plot and plot_accuracy_vs_time(cells, png):
        out += [f"![accuracy against condensation time]({os.path.relpath(png, REPO_ROOT / 'benchmarks')})", "",
                "Filled markers: `cpu-small`; hollow: larger budgets (`cpu-hour`, `paper`). Condensation time excludes evaluation and, for "
                "MTT, building the expert buffer.", ""]
    else:
        out += ["No successful cell yet.", ""]
    out += ["## Class batching against the per-class loop", ""]
    reports = sorted(results_dir.glob("class_batching*.json"))
    for report in reports or [results_dir / "class_batching.json"]:
        out += _class_batching_section(report) + [""]
    distances = results_dir / "distances.md"
    if distances.exists():  # its own title becomes this page's section heading
        text = distances.read_text().strip().splitlines()
        out += [line if not line.startswith("# ") else "#" + line for line in text] + [""]
    else:
        out += ["## Distance benchmarks", "",
                "`benchmarks/results/distances.md` is not there yet: `python benchmarks/distances.py` writes it.", ""]
    out += [f"_Profiles present: {', '.join(profiles_seen) if profiles_seen else 'none'}._", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    text = render_results(args.results_dir, plot=not args.no_plot)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(f"wrote {os.path.relpath(args.out, REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
