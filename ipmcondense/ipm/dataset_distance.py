"""Distances between labelled datasets: pooled or class-conditional IPMs, and a label-aware OT distance.

:func:`distance` is the dataset-level entry point. It accepts tensors, NumPy arrays or torch
``Dataset`` objects, optionally maps them through a feature map, and compares them with one of the IPMs
of :mod:`ipmcondense.ipm` either on the pooled points, or class by class, or with ``metric="otdd"``, an
optimal transport distance whose ground cost also compares the labels (in the spirit of OTDD,
Alvarez-Melis & Fusi, 2020).

**Class-conditional IPMs.** With labels :math:`\\ell` on both datasets,

.. math::

    d_{cc}(A, B) = \\sum_{c} w_c \\, d(A_c, B_c), \\qquad w_c = \\tfrac12 (\\pi_A(c) + \\pi_B(c)),

where :math:`A_c` are the points of class :math:`c` and :math:`\\pi_A(c) = |A_c| / |A|` the class
proportion. Both datasets must contain the same classes.

**Label-aware OT (OTDD).** Each point is a pair :math:`(x, \\ell)` and the ground cost between
:math:`(x, \\ell)` and :math:`(x', \\ell')` is

.. math::

    c((x, \\ell), (x', \\ell')) = \\|x - x'\\|_2^p + \\lambda \\, W_p(P_\\ell, P'_{\\ell'})^p,

with :math:`P_\\ell` the empirical distribution of the features of class :math:`\\ell` in its dataset
(labels are compared through the distributions they name, so the two datasets may use different label
sets, and renaming classes changes nothing). The value is :math:`\\mathrm{OT}_c(A, B)^{1/p}`, a
:math:`p`-Wasserstein distance on the product space, computed exactly (``outer="exact"``) or with the
debiased Sinkhorn divergence :math:`S_\\varepsilon = \\mathrm{OT}_\\varepsilon(A, B) -
\\frac12\\mathrm{OT}_\\varepsilon(A, A) - \\frac12\\mathrm{OT}_\\varepsilon(B, B)` on this cost (default),
so that :math:`d(D, D) = 0`, unlike the original implementation (OTDD issues #14, #22, #32): the three
entropic problems run identical iterations, so a dataset compared with itself gives exactly 0, and a
subsample (``max_samples``) is drawn with the same seed on both sides.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _ot
from ._validation import as_point_pair, as_points, check_choice, check_positive
from .loss import check_metric_options, metric_function
from .mean_embedding import FeatureMap, _feature_maps, _layer_features
from .wasserstein import sliced_wasserstein, wasserstein

__all__ = ["distance", "otdd", "DATASET_METRICS", "OTDD_INNER_METHODS", "OTDD_OUTER_METHODS"]

#: Metrics accepted by :func:`distance`.
DATASET_METRICS = ("mmd", "mmd2", "energy", "wasserstein", "sinkhorn", "sliced", "mean_embedding", "otdd")
#: How :func:`otdd` computes the label-to-label distances :math:`W_p(P_\\ell, P'_{\\ell'})`.
OTDD_INNER_METHODS = ("auto", "exact", "sinkhorn", "sliced")
#: How :func:`otdd` solves the outer transport problem.
OTDD_OUTER_METHODS = ("sinkhorn", "exact")

# "auto" inner method: exact OT while every class has at most this many points, Sinkhorn above.
_AUTO_EXACT_MAX_CLASS = 200


# ----------------------------------------------------------------------------------------------------
# Inputs: tensors, arrays, torch Datasets; labels; subsampling; features.


def _subsample_indices(n: int, max_samples: int | None, seed: int) -> Tensor | None:
    """Sorted indices of a seeded uniform subsample of ``max_samples`` of ``n`` items, or ``None``."""
    if max_samples is None or n <= max_samples:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:max_samples].sort().values


def _stack_items(values: list[Any], what: str, name: str) -> Tensor:
    try:
        return torch.stack([v if isinstance(v, Tensor) else torch.as_tensor(np.asarray(v)) for v in values])
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"the {what} yielded by dataset {name} must be tensors or arrays of one shape") from err


def _dataset_length(dataset: torch.utils.data.Dataset, name: str) -> int:
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"{name} is a Dataset without __len__; pass a tensor or a map-style Dataset") from err
    if n == 0:
        raise ValueError(f"{name} is an empty dataset")
    return n


def _from_dataset(
    dataset: torch.utils.data.Dataset, name: str, index: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Points and labels (``None`` if the items are bare points) of the items at ``index`` (all if None)."""
    if isinstance(dataset, torch.utils.data.TensorDataset):
        tensors = [t if index is None else t[index.to(t.device)] for t in dataset.tensors]
        return tensors[0], (tensors[1] if len(tensors) > 1 else None)
    positions = range(len(dataset)) if index is None else index.tolist()  # type: ignore[arg-type]
    items = [dataset[i] for i in positions]
    if isinstance(items[0], (tuple, list)):
        if len(items[0]) < 1:
            raise ValueError(f"dataset {name} yields empty items")
        points = _stack_items([item[0] for item in items], "points", name)
        labels = (
            _stack_items([item[1] for item in items], "labels", name) if len(items[0]) >= 2 else None
        )
        return points, labels
    return _stack_items(items, "points", name), None


def _as_labels(labels: Any, n: int, name: str, device: torch.device) -> Tensor:
    if isinstance(labels, Tensor):
        t = labels.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(labels))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a sequence of integer class labels") from err
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1:
        raise ValueError(f"{name} must be a vector of class labels, got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} must have one label per point ({n}), got {t.shape[0]}")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise ValueError(f"{name} must hold integer class labels, got non-integer values")
    elif t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold integer class labels, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _labelled_points(
    data: Any, labels: Any, name: str, max_samples: int | None, seed: int
) -> tuple[Tensor, Tensor | None]:
    """Points (original per-point shape, checked) and labels (or ``None``) of one dataset."""
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, Tensor):
        n = _dataset_length(data, name)
        index = _subsample_indices(n, max_samples, seed)
        points, found = _from_dataset(data, name, index)
        points = as_points(points, name, flatten=False)
        if labels is None:
            labels = found
        else:
            labels = _as_labels(labels, n, f"labels_{name}", points.device)
            labels = labels if index is None else labels[index.to(labels.device)]
    else:
        points = as_points(data, name, flatten=False)
        index = _subsample_indices(points.shape[0], max_samples, seed)
        if labels is not None:
            labels = _as_labels(labels, points.shape[0], f"labels_{name}", points.device)
        if index is not None:
            points = points[index.to(points.device)]
            labels = labels[index.to(points.device)] if labels is not None else None
    if labels is not None:
        labels = _as_labels(labels, points.shape[0], f"labels_{name}", points.device)
    return points, labels


def _features(points: Tensor, feature_map, batch_size: int, name: str) -> Tensor:
    maps = _feature_maps(feature_map)
    if maps is None:
        return points.reshape(points.shape[0], -1)
    chunks = [
        torch.cat(_layer_features(points[s : s + batch_size], maps, name), dim=1)
        for s in range(0, points.shape[0], batch_size)
    ]
    return torch.cat(chunks)


# ----------------------------------------------------------------------------------------------------
# Class-conditional aggregation.


def _class_conditional(
    fa: Tensor, la: Tensor, fb: Tensor, lb: Tensor, fn: Callable[..., Tensor], options: dict[str, Any]
) -> Tensor:
    classes_a, counts_a = torch.unique(la, return_counts=True)
    classes_b, counts_b = torch.unique(lb, return_counts=True)
    set_a, set_b = set(classes_a.tolist()), set(classes_b.tolist())
    if set_a != set_b:
        only_a, only_b = sorted(set_a - set_b), sorted(set_b - set_a)
        raise ValueError(
            "class-conditional distances need the same classes in both datasets: "
            f"classes only in a: {only_a}, only in b: {only_b} (use metric='otdd', which compares "
            "datasets with different label sets, or class_conditional=False)"
        )
    total = None
    for c, count_a, count_b in zip(classes_a.tolist(), counts_a.tolist(), counts_b.tolist()):
        weight = 0.5 * (count_a / la.shape[0] + count_b / lb.shape[0])
        term = weight * fn(fa[la == c], fb[lb == c], **options)
        total = term if total is None else total + term
    return total


# ----------------------------------------------------------------------------------------------------
# OTDD: label-to-label distances, augmented costs, debiased Sinkhorn / exact outer problem.


def _pairwise_power(x: Tensor, y: Tensor, p: float) -> Tensor:
    """:math:`\\|x_i - y_j\\|^p` (dense), zero (with zero gradient) on coincident points."""
    diff_sq = (x[:, None, :] - y[None, :, :]).pow(2).sum(-1)
    if p == 2:
        return diff_sq
    positive = diff_sq > 0
    safe = torch.where(positive, diff_sq, torch.ones_like(diff_sq))
    return torch.where(positive, safe ** (p / 2), torch.zeros_like(diff_sq))


def _label_distance(
    x: Tensor, y: Tensor, p: float, method: str, blur: float, n_projections: int, seed: int
) -> Tensor:
    if method == "sliced":
        return sliced_wasserstein(x, y, n_projections=n_projections, p=p, seed=seed)
    if method == "sinkhorn":
        return wasserstein(x, y, p=p, method="sinkhorn", blur=blur)
    return wasserstein(x, y, p=p, method="exact")


def _label_distances(
    fa: Tensor, ia: Tensor, fb: Tensor, ib: Tensor, ka: int, kb: int, same: bool, p: float, **options: Any
) -> Tensor:
    """Matrix :math:`W_p(P^a_i, P^b_j)^p` for class indices ``ia`` (``ka`` classes) and ``ib``."""
    groups_a = [fa[ia == i] for i in range(ka)]
    groups_b = [fb[ib == j] for j in range(kb)]
    rows = []
    for i in range(ka):
        row = []
        for j in range(kb):
            if same and j == i:
                row.append(fa.new_zeros(()))
            elif same and j < i:
                row.append(rows[j][i])
            else:
                row.append(_label_distance(groups_a[i], groups_b[j], p, **options).pow(p))
        rows.append(row)
    return torch.stack([torch.stack(r) for r in rows])


def _exact_transport_cost(cost: Tensor) -> Tensor:
    r""":math:`\min_\pi \langle \pi, C \rangle` for uniform marginals, plan held constant (envelope).

    Solved by the package's one exact solver (POT's network simplex, :mod:`ipmcondense.ipm._ot`).
    """
    n, m = cost.shape
    _ot.check_exact_size(n, m, "use outer='sinkhorn' or max_samples")
    plan, u, v = _ot.exact_transport(cost, None, None)
    return _ot.envelope_value(plan, u, v, lambda i, j: cost[i, j], None, None, cost)


def _root(value: Tensor, p: float) -> Tensor:
    """:math:`\\max(v, 0)^{1/p}` with a zero gradient (not NaN) at 0."""
    positive = value > 0
    safe = torch.where(positive, value, torch.ones_like(value))
    return torch.where(positive, safe ** (1.0 / p), torch.zeros_like(value))


def otdd(
    fa: Tensor,
    la: Tensor,
    fb: Tensor,
    lb: Tensor,
    p: float = 2,
    label_weight: float = 1.0,
    inner: str = "auto",
    outer: str = "sinkhorn",
    blur: float | None = None,
    scaling: float = 0.9,
    tolerance: float | None = None,
    max_iterations: int = 200,
    inner_blur: float = 0.01,
    n_projections: int = 200,
    seed: int = 0,
) -> Tensor:
    """Label-aware OT distance between ``(fa, la)`` and ``(fb, lb)`` (see the module docstring).

    Args:
        fa, fb: ``(n, d)`` and ``(m, d)`` features; la, lb: their integer labels.
        p: order of the ground cost and of the label distances (``>= 1``; 1 or 2 for ``inner="sinkhorn"``).
        label_weight: :math:`\\lambda \\ge 0`, weight of the label term (0 gives plain :math:`W_p` of the
            features).
        inner: label-to-label :math:`W_p`: ``"exact"`` (assignment / linear program per class pair),
            ``"sinkhorn"`` (:func:`~ipmcondense.ipm.wasserstein.wasserstein` ``method="sinkhorn"`` with
            ``inner_blur``), ``"sliced"`` (``n_projections``, ``seed``; a lower bound), or ``"auto"``:
            exact while every class has at most 200 points, else Sinkhorn (sliced if ``p`` is not 1 or 2).
        outer: ``"sinkhorn"`` (debiased, ``blur``, ``scaling``, ``max_iterations``; the value is
            :math:`\\max(S_\\varepsilon, 0)^{1/p}`, biased by the blur; geomloss' Sinkhorn loop, the package's
            one Sinkhorn) or ``"exact"`` (POT's network simplex, the package's one exact solver; any size that
            fits memory, :math:`O(nm)`).
        blur: :math:`\\varepsilon^{1/p}` of the outer Sinkhorn problem, in the units of the features.
            ``None`` (default): 5% of the diameter of the augmented costs, :math:`0.05 \\max c^{1/p}`, which
            makes the distance scale-equivariant (:math:`d(sA, sB) = s\\, d(A, B)` with ``inner="exact"``
            or ``"sliced"``: both cost terms scale by :math:`s^p`); smaller blurs approach the exact
            value but need more iterations (Sinkhorn converges in :math:`O(1/\\varepsilon)` iterations).
        scaling: ratio of successive blurs in the :math:`\\varepsilon`-scaling, in (0, 1).
        tolerance: deprecated and without effect (the loop no longer stops early: it runs geomloss'
            :math:`\\varepsilon`-scaling schedule, then ``max_iterations`` iterations); passing a value warns.
        max_iterations: Sinkhorn iterations run at the final :math:`\\varepsilon` after the scaling steps.
        inner_blur: blur of ``inner="sinkhorn"`` (absolute, in feature units).
        n_projections, seed: directions and their seed for ``inner="sliced"``.

    Returns:
        0-d tensor of the features' dtype (computed in float64), differentiable with respect to the
        features (envelope theorem for both OT layers).

    Cost: :math:`K_a K_b + K_a^2/2 + K_b^2/2` inner OT problems between classes; the outer problem needs
    the three dense cost matrices, :math:`O((n + m)^2)` memory, and :math:`O((n + m)^2)` per Sinkhorn
    iteration.
    """
    fa, fb = as_point_pair(fa, fb, ("fa", "fb"))
    out_dtype = fa.dtype
    # float64 throughout: the debiased value is a difference of three nearly equal OT costs.
    fa, fb = fa.double(), fb.double()
    la = _as_labels(la, fa.shape[0], "la", fa.device)
    lb = _as_labels(lb, fb.shape[0], "lb", fb.device)
    p = check_positive(p, "p")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p!r}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise ValueError(f"max_iterations must be a non-negative integer, got {max_iterations!r}")
    if tolerance is not None:
        warnings.warn(
            "otdd(tolerance=...) has no effect any more: the outer Sinkhorn problem runs geomloss' "
            "epsilon-scaling loop followed by max_iterations iterations at the final temperature",
            DeprecationWarning,
            stacklevel=2,
        )
    check_positive(label_weight, "label_weight", allow_zero=True)
    check_choice(inner, OTDD_INNER_METHODS, "inner")
    check_choice(outer, OTDD_OUTER_METHODS, "outer")
    if blur is not None:
        check_positive(blur, "blur")
    if not 0.0 < scaling < 1.0:
        raise ValueError(f"scaling must lie strictly between 0 and 1, got {scaling!r}")
    classes_a, ia = torch.unique(la, return_inverse=True)
    classes_b, ib = torch.unique(lb, return_inverse=True)
    ka, kb = classes_a.shape[0], classes_b.shape[0]
    if inner == "auto":
        largest = max(int(torch.bincount(ia).max()), int(torch.bincount(ib).max()))
        if largest <= _AUTO_EXACT_MAX_CLASS:
            inner = "exact"
        else:
            inner = "sinkhorn" if p in (1, 2) else "sliced"
    options = {"method": inner, "blur": inner_blur, "n_projections": n_projections, "seed": seed}

    if label_weight > 0:
        w_aa = _label_distances(fa, ia, fa, ia, ka, ka, True, p, **options)
        if fa.shape == fb.shape and torch.equal(fa, fb) and torch.equal(la, lb):
            # one dataset compared with itself: the three label-distance matrices coincide
            w_ab = w_bb = w_aa
        else:
            w_ab = _label_distances(fa, ia, fb, ib, ka, kb, False, p, **options)
            w_bb = _label_distances(fb, ib, fb, ib, kb, kb, True, p, **options)

    def augmented(x: Tensor, ix: Tensor, y: Tensor, iy: Tensor, label_costs: Tensor | None) -> Tensor:
        cost = _pairwise_power(x, y, p)
        if label_weight > 0:
            cost = cost + label_weight * label_costs[ix][:, iy]
        return cost

    cost_ab = augmented(fa, ia, fb, ib, w_ab if label_weight > 0 else None)
    if outer == "exact":
        return _root(_exact_transport_cost(cost_ab), p).to(out_dtype)
    cost_aa = augmented(fa, ia, fa, ia, w_aa if label_weight > 0 else None)
    cost_bb = augmented(fb, ib, fb, ib, w_bb if label_weight > 0 else None)
    a = torch.full((fa.shape[0],), 1.0 / fa.shape[0], dtype=fa.dtype, device=fa.device)
    b = torch.full((fb.shape[0],), 1.0 / fb.shape[0], dtype=fb.dtype, device=fb.device)
    diameter = float(max(cost_ab.detach().max(), cost_aa.detach().max(), cost_bb.detach().max(), 0.0)) ** (1 / p)
    target = 0.05 * diameter if blur is None else blur
    if target <= 0:  # every cost is zero: all points coincide and the divergence is 0
        target = 1.0
    value = _ot.sinkhorn_costs(
        cost_ab, cost_aa, cost_bb, a, b, p=p, blur=target, scaling=scaling, diameter=diameter,
        extra_iterations=max_iterations,
    )
    if not bool(torch.isfinite(value.detach())):
        raise FloatingPointError("the OTDD Sinkhorn iterations diverged; use a larger blur")
    return _root(value, p).to(out_dtype)


# ----------------------------------------------------------------------------------------------------
# The entry point.


def distance(
    a: Any,
    b: Any,
    metric: str = "mmd",
    labels_a: Any = None,
    labels_b: Any = None,
    feature_map: FeatureMap | Sequence[FeatureMap] | None = None,
    *,
    class_conditional: bool | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    feature_batch_size: int = 1024,
    **kwargs: Any,
) -> Tensor:
    """Distance between two datasets, pooled, class-conditional, or label-aware (OTDD).

    Args:
        a, b: the datasets: tensors or NumPy arrays ``(n, ...)`` (images allowed), or torch ``Dataset``
            objects yielding points or ``(point, label)`` pairs (``TensorDataset`` is read directly).
        metric: ``"mmd"`` (root of the biased MMD², :func:`~ipmcondense.ipm.mmd.mmd`), ``"mmd2"``
            (unbiased MMD² by default), ``"energy"``, ``"wasserstein"``, ``"sinkhorn"`` (divergence),
            ``"sliced"``, ``"mean_embedding"`` (the IPMs of :mod:`ipmcondense.ipm`), or ``"otdd"``
            (:func:`otdd`, needs labels).
        labels_a, labels_b: integer labels, one per point. When ``None`` and the dataset yields
            ``(point, label)`` pairs, its labels are used.
        feature_map: applied to both datasets (in chunks of ``feature_batch_size``) before the metric;
            a callable, an ``nn.Module`` or a list of them (features concatenated). ``None``: the
            flattened points.
        class_conditional: for the IPM metrics, average the per-class distances
            :math:`\\sum_c w_c d(A_c, B_c)` with :math:`w_c = \\frac12(\\pi_A(c) + \\pi_B(c))` (both
            datasets must have the same classes). ``None`` (default): class-conditional exactly when both
            datasets have labels. ``True`` requires labels; ``False`` ignores them.
        max_samples: if a dataset has more points, a uniform subsample of ``max_samples`` points (without
            replacement) drawn with a CPU generator seeded by ``seed`` is used. Each dataset uses its own
            generator with the same seed, so a dataset compared with itself gets the same subsample.
        seed: seed of the subsampling; also the seed of the ``"sliced"`` projections and of OTDD's
            sliced inner distances.
        feature_batch_size: chunk size for the feature map.
        **kwargs: options of the metric's function (e.g. ``kernel``, ``bandwidth``, ``estimator`` for
            MMD; ``p``, ``method`` for Wasserstein; ``blur`` for Sinkhorn), or of :func:`otdd` (``p``,
            ``label_weight``, ``inner``, ``outer``, ``blur``, ...).

    Returns:
        A 0-d tensor, differentiable with respect to tensor inputs (and the feature map's parameters).

    Estimator and cost: those of the chosen metric on the (subsampled) empirical distributions;
    ``"mmd"``, ``"energy"``, ``"wasserstein"``, ``"sliced"``, ``"mean_embedding"`` and ``"otdd"`` give
    0 for a dataset compared with itself (up to rounding: the square roots of ``"mmd"``/``"energy"``
    turn a rounding error of 1e-16 into 1e-8); ``"mmd2"`` with the
    unbiased estimator does not (it is unbiased for the population MMD², which can make it negative).
    """
    check_choice(metric, DATASET_METRICS, "metric")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(feature_batch_size, bool) or not isinstance(feature_batch_size, int) or feature_batch_size < 1:
        raise ValueError(f"feature_batch_size must be a positive integer, got {feature_batch_size!r}")
    if class_conditional is not None and not isinstance(class_conditional, bool):
        raise TypeError(f"class_conditional must be True, False or None, got {class_conditional!r}")
    if metric == "otdd":
        allowed = ("p", "label_weight", "inner", "outer", "blur", "scaling", "tolerance", "max_iterations",
                   "inner_blur", "n_projections")
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for metric 'otdd'; "
                f"accepted: {', '.join(map(repr, allowed))}"
            )
    else:
        # the datasets' points are weighted uniformly (subsampling and class splits would break weights)
        reserved = ("x_weights", "y_weights", "u_weights", "v_weights", "feature_map")
        check_metric_options(metric, kwargs, reserved=reserved)
        if metric == "sliced":
            kwargs.setdefault("seed", int(seed))

    xa, la = _labelled_points(a, labels_a, "a", max_samples, int(seed))
    xb, lb = _labelled_points(b, labels_b, "b", max_samples, int(seed))
    if xa.device != xb.device:
        raise ValueError(f"a is on {xa.device} but b is on {xb.device}: move both to one device")
    fa = _features(xa, feature_map, feature_batch_size, "a")
    fb = _features(xb, feature_map, feature_batch_size, "b")
    fa, fb = as_points(fa, "features of a"), as_points(fb, "features of b")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(
            f"a and b must have the same point dimension, got {tuple(fa.shape)} and {tuple(fb.shape)}"
        )
    dtype = torch.promote_types(fa.dtype, fb.dtype)
    fa, fb = fa.to(dtype), fb.to(dtype)

    if metric == "otdd":
        if la is None or lb is None:
            missing = " and ".join(n for n, lab in (("a", la), ("b", lb)) if lab is None)
            raise ValueError(
                f"metric 'otdd' needs labels for both datasets; none for {missing}: pass labels_a/labels_b "
                "or Datasets yielding (point, label) pairs"
            )
        return otdd(fa, la, fb, lb, seed=int(seed), **kwargs)

    fn = metric_function(metric)
    use_labels = class_conditional if class_conditional is not None else (la is not None and lb is not None)
    if use_labels:
        if la is None or lb is None:
            missing = " and ".join(n for n, lab in (("a", la), ("b", lb)) if lab is None)
            raise ValueError(f"class_conditional=True needs labels for both datasets; none for {missing}")
        return _class_conditional(fa, la, fb, lb, fn, kwargs)
    return fn(fa, fb, **kwargs)
