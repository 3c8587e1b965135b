"""Planning the benchmark grid: the cells of a profile, their hyperparameters, and a rough cost.

:func:`plan_cells` lists every (dataset, IPC, method) cell of a profile in run order, with its key
(the resolved hyperparameters, models, epochs, seed and expert buffer: :func:`.cells.cell_key`) and,
where it cannot run here, the reason. :func:`estimate_cell_seconds` is the order-of-magnitude cost
model that ``--dry-run`` prints.
"""

from __future__ import annotations

import math
from typing import Any

from .cells import UPPER_BOUND, Cell, cell_key
from .profiles import Profile

__all__ = ["plan_cells", "estimate_cell_seconds", "dataset_arch"]


#: the objectives that read an expert buffer (the profile's ``experts`` spec is built and passed to them)
EXPERT_OBJECTIVES = ("mtt", "esp")

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
    upper_bound: bool = True, dataset_cache: dict | None = None, protocol: str = "standard",
) -> list[Cell]:
    """Every cell of the grid, in run order (cheap IPCs first), with a skip reason where it cannot run.

    ``methods=None`` means the profile's methods for each dataset (every registry row if it names none).
    ``protocol`` is the evaluation protocol (``"standard"`` or ``"published"``,
    :mod:`ipmcondense.condensation.published`); with ``"published"`` a method without an expressible
    published protocol is skipped with the reason, and the whole-dataset bound is not planned.
    """
    from ipmcondense.condensation.published import protocol_settings
    from ipmcondense.condensation.recipes import METHOD_NAMES, get_recipe
    from ipmcondense.condensation.synthetic import SYNTHETIC_SETS

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
                if getattr(get_recipe(method), "objective", None) in EXPERT_OBJECTIVES:
                    experts = dict(profile.experts.get(dataset, profile.experts.get("*", {}))) or None
                    if experts is not None:
                        experts["arch"] = resolved["arch"]
                        if resolved.get("zca"):  # experts trained on the whitened data (MTT buffer.py --zca)
                            experts["zca_eps"] = resolved["zca_eps"]
                key = cell_key(profile=profile.name, dataset=dataset, method=method, ipc=ipc, seed=seed,
                               models=n_models, eval_epochs=epochs, hyperparameters=resolved, experts=experts,
                               protocol=protocol)
                reason = missing
                if reason is None:
                    try:
                        protocol_settings(method, dataset, protocol)
                    except ValueError as err:
                        reason = str(err)
                if reason is None and profile.ipcs.get(dataset) is not None and ipc not in profile.ipcs[dataset]:
                    reason = f"IPC {ipc} is not in the {profile.name} profile for {dataset} (runs {list(profile.ipcs[dataset])})"
                if reason is None and not explicit and dataset in profile.methods and method not in profile.methods[dataset]:
                    reason = (f"not in the {profile.name} method list for {dataset} (name it with --methods to run it)")
                if reason is None and getattr(get_recipe(method), "objective", None) in EXPERT_OBJECTIVES and not experts:
                    reason = f"the {profile.name} profile defines no expert buffer for {dataset}"
                if reason is None and getattr(SYNTHETIC_SETS.get(getattr(get_recipe(method), "synthetic", "pixels")),
                                              "needs_generator", False):
                    reason = ("needs a generator run (`ipmcondense generator`, then condense with --generator DIR); "
                              "the grid trains none: see benchmarks/results/dcgm_digits.json and docs/guides/generative.md")
                if reason is None and ds is not None:
                    smallest = int(ds.train_labels.bincount(minlength=ds.num_classes).min())
                    if ipc > smallest:
                        reason = f"IPC {ipc} exceeds the smallest class ({smallest} training images)"
                cells.append(Cell(profile.name, dataset, method, ipc, seed, n_models, epochs, overrides, key,
                                  reason, experts, protocol))
        if upper_bound and protocol == "standard" and (not explicit or UPPER_BOUND in names):
            spec = profile.upper_bound.get(dataset)
            n_models = models or (spec or {}).get("models", 1)
            epochs = (spec or {}).get("epochs")
            key = cell_key(profile=profile.name, dataset=dataset, method=UPPER_BOUND, ipc=None, seed=seed,
                           models=n_models, eval_epochs=epochs, hyperparameters={"arch": dataset_arch(dataset)})
            reason = missing or (None if spec else f"the {profile.name} profile runs no whole-dataset bound for {dataset}")
            cells.append(Cell(profile.name, dataset, UPPER_BOUND, None, seed, n_models, epochs, {}, key, reason))
    return cells


def dataset_arch(dataset: str) -> str:
    """The evaluation network of ``dataset``'s cells (the recipes' default arch for it)."""
    from ipmcondense.condensation.recipes import COMMON_DEFAULTS, DATASET_DEFAULTS

    return DATASET_DEFAULTS.get(dataset, {}).get("arch", COMMON_DEFAULTS["arch"])


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
    elif recipe.objective in ("dd", "esp"):
        condense = iterations * (3 * h.get("dd_steps", 10) * syn + h.get("batch_real", 100) * n) * unit
    else:  # rcig and any new objective: inner steps on S plus a real batch
        condense = iterations * (h.get("rcig_inner_steps", 10) * syn / 3 + h.get("batch_real", 100) * n) * unit
    epochs = cell.eval_epochs if cell.eval_epochs is not None else 1000
    steps = math.ceil(syn / 256)
    evaluation = cell.models * ((epochs + 1) * (syn * unit + steps * _STEP_OVERHEAD) + test_pass)
    return condense + evaluation

