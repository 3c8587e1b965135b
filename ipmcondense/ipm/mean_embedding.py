"""Mean-embedding IPM: the distance between the means of a feature map.

For a feature map :math:`\\phi: \\mathcal{X} \\to \\mathbb{R}^D` the witness class
:math:`F_\\phi = \\{ z \\mapsto \\langle w, \\phi(z) \\rangle : \\|w\\|_2 \\le 1 \\}` of unit-norm linear
functionals of :math:`\\phi` gives the IPM

.. math::

    d_{F_\\phi}(\\mu, \\nu) = \\sup_{\\|w\\| \\le 1} \\langle w, E_\\mu \\phi - E_\\nu \\phi \\rangle
    = \\| E_\\mu \\phi(X) - E_\\nu \\phi(Y) \\|_2 ,

attained at :math:`w^* = \\Delta / \\|\\Delta\\|`. It is the MMD with the linear kernel
:math:`k(z, z') = \\langle \\phi(z), \\phi(z') \\rangle`, and, with :math:`\\phi` the embedding of a
randomly initialised network, the per-network loss of distribution matching (DM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from ._validation import as_point_pair, as_weights
from .witness import Witness

__all__ = ["mean_embedding_distance", "mean_embedding_witness"]

FeatureMap = Union[Callable[[Tensor], Any], nn.Module]


def _feature_maps(feature_map: FeatureMap | Sequence[FeatureMap] | None) -> list[FeatureMap] | None:
    if feature_map is None:
        return None
    if isinstance(feature_map, (list, tuple)):
        if len(feature_map) == 0:
            raise ValueError("feature_map is an empty list: give at least one feature map")
        maps = list(feature_map)
    else:
        maps = [feature_map]
    for i, phi in enumerate(maps):
        if not callable(phi):
            raise TypeError(
                f"feature_map[{i}] must be a callable or an nn.Module, got {type(phi).__name__}"
            )
    return maps


def _layer_features(points: Tensor, maps: list[FeatureMap] | None, name: str) -> list[Tensor]:
    """Return the ``(n, D_l)`` features of every layer: each map's output, or each tensor of a
    map that returns a sequence of tensors (e.g. ``net.layer_features``)."""
    n = points.shape[0]
    if maps is None:
        return [points.reshape(n, -1)]
    layers: list[Tensor] = []
    for i, phi in enumerate(maps):
        out = phi(points)
        outputs = list(out) if isinstance(out, (list, tuple)) else [out]
        for j, feat in enumerate(outputs):
            if not isinstance(feat, Tensor):
                raise TypeError(
                    f"feature_map[{i}] must return a tensor or a sequence of tensors, "
                    f"got {type(feat).__name__}"
                )
            if feat.dim() == 0 or feat.shape[0] != n:
                raise ValueError(
                    f"feature_map[{i}] must keep the batch dimension: {name} has {n} points but "
                    f"output {j} has shape {tuple(feat.shape)}"
                )
            feat = feat.reshape(n, -1)
            if not feat.is_floating_point():
                feat = feat.to(points.dtype)
            if not bool(torch.isfinite(feat.detach()).all()):
                raise ValueError(f"feature_map[{i}] returned NaN or inf values on {name}")
            layers.append(feat)
    return layers


def _weighted_mean(features: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return features.mean(dim=0)
    return weights.to(features.dtype) @ features


def _mean_differences(
    x: Any,
    y: Any,
    feature_map: FeatureMap | Sequence[FeatureMap] | None,
    x_weights: Any,
    y_weights: Any,
) -> tuple[list[Tensor], tuple[int, ...]]:
    maps = _feature_maps(feature_map)
    a, b = as_point_pair(x, y, flatten=maps is None)
    wx = as_weights(x_weights, a.shape[0], "x_weights", a)
    wy = as_weights(y_weights, b.shape[0], "y_weights", b)
    fx = _layer_features(a, maps, "x")
    fy = _layer_features(b, maps, "y")
    deltas = []
    for layer, (u, v) in enumerate(zip(fx, fy)):
        if u.shape[1] != v.shape[1]:
            raise ValueError(
                f"feature layer {layer} has dimension {u.shape[1]} on x but {v.shape[1]} on y"
            )
        deltas.append(_weighted_mean(u, wx) - _weighted_mean(v, wy))
    return deltas, tuple(a.shape[1:])


def mean_embedding_distance(
    x: Any,
    y: Any,
    feature_map: FeatureMap | Sequence[FeatureMap] | None = None,
    x_weights: Any = None,
    y_weights: Any = None,
    squared: bool = False,
) -> Tensor:
    """Distance between the (weighted) means of a feature map, the IPM over linear witnesses.

    .. math::

        d(x, y) = \\Big( \\sum_{l=1}^{L} \\big\\| \\textstyle\\sum_i a_i \\phi_l(x_i)
        - \\sum_j b_j \\phi_l(y_j) \\big\\|_2^2 \\Big)^{1/2}

    with uniform weights :math:`a_i = 1/n`, :math:`b_j = 1/m` unless given. With several layers
    (a list of feature maps, or a map that returns a list of tensors such as ``layer_features``) the
    layer terms are combined as the **root of the sum of squared per-layer distances**: it is the
    mean-embedding distance of the concatenated features, hence still a (pseudo-)metric and an IPM
    over :math:`\\{ z \\mapsto \\sum_l \\langle w_l, \\phi_l(z) \\rangle : \\sum_l \\|w_l\\|^2 \\le 1 \\}`.
    ``squared=True`` returns :math:`\\sum_l \\|\\Delta_l\\|^2` (the DM loss summed over layers).

    Estimator: exact on the two empirical measures (plug-in). As an estimate of the population
    distance the squared version is biased upwards: for i.i.d. samples with uniform weights,
    :math:`E\\|\\hat\\Delta\\|^2 = \\|\\Delta\\|^2 + \\operatorname{tr}\\operatorname{Cov}_\\mu\\phi / n
    + \\operatorname{tr}\\operatorname{Cov}_\\nu\\phi / m`. The unbiased estimate is the U-statistic
    ``mmd2(phi(x), phi(y), kernel="linear", estimator="unbiased")``.

    Args:
        x: ``(n, ...)`` sample; images ``(n, C, H, W)`` are passed to ``feature_map`` unflattened.
        y: ``(m, ...)`` sample with the same per-point shape.
        feature_map: ``None`` (identity on the flattened points), a callable/``nn.Module`` mapping a
            batch ``(k, ...)`` to features ``(k, ...)`` (flattened after the call), or a list of them
            (one term per layer).
        x_weights, y_weights: optional probability weights (non-negative, summing to one).
        squared: return the squared distance.

    Returns:
        A 0-d tensor, differentiable with respect to ``x``, ``y``, the weights and the feature map's
        parameters. The gradient of the unsquared distance at zero is taken as zero.

    Cost: one forward of ``feature_map`` on each sample and :math:`O((n + m) D)` for the means;
    memory :math:`O((n + m) D)`.
    """
    if not isinstance(squared, (bool, np.bool_)):
        raise TypeError(f"squared must be True or False, got {squared!r}")
    deltas, _ = _mean_differences(x, y, feature_map, x_weights, y_weights)
    if squared:
        return sum(d.pow(2).sum() for d in deltas)
    return torch.linalg.vector_norm(torch.cat([d.reshape(-1) for d in deltas]))


def mean_embedding_witness(
    x: Any,
    y: Any,
    feature_map: FeatureMap | Sequence[FeatureMap] | None = None,
    x_weights: Any = None,
    y_weights: Any = None,
) -> Witness:
    """The witness :math:`f^*(z) = \\langle \\Delta / \\|\\Delta\\|, \\phi(z) \\rangle` of the mean-embedding IPM.

    :math:`\\Delta = E_x \\phi - E_y \\phi` (all layers concatenated) is computed once and detached; the
    witness stays differentiable in its argument ``z``. ``witness.mean_gap(x, y)`` equals
    ``mean_embedding_distance(x, y, feature_map)`` (uniform weights). When :math:`\\Delta = 0` the
    witness is the zero function.

    The returned :class:`Witness` takes points flattened to ``(k, d)`` (like every witness) and
    reshapes them to the per-point shape of ``x`` before calling ``feature_map``.

    Cost: building :math:`O((n + m) D)`; each call one forward of ``feature_map``.
    """
    with torch.no_grad():
        deltas, point_shape = _mean_differences(x, y, feature_map, x_weights, y_weights)
        norm = torch.linalg.vector_norm(torch.cat([d.reshape(-1) for d in deltas]))
        directions = [d / norm if float(norm) > 0 else torch.zeros_like(d) for d in deltas]
    maps = _feature_maps(feature_map)
    dim = int(np.prod(point_shape)) if point_shape else 1

    def witness_fn(z: Tensor) -> Tensor:
        points = z.reshape(z.shape[0], *point_shape) if maps is not None else z
        layers = _layer_features(points, maps, "z")
        if len(layers) != len(directions):
            raise ValueError(
                f"feature_map returned {len(layers)} layers on z but {len(directions)} on x"
            )
        total = torch.zeros(z.shape[0], dtype=layers[0].dtype, device=z.device)
        for feat, w in zip(layers, directions):
            total = total + feat @ w.to(device=feat.device, dtype=feat.dtype)
        return total

    return Witness(witness_fn, metric="mean_embedding", dim=dim)
