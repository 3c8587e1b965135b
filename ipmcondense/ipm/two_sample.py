"""Permutation two-sample tests with IPM statistics.

Under the null hypothesis :math:`H_0: \\mu = \\nu` the pooled sample
:math:`z = (x_1, \\dots, x_n, y_1, \\dots, y_m)` is exchangeable, so the statistic :math:`T` evaluated on
random re-splittings of :math:`z` into groups of sizes ``n`` and ``m`` samples its null distribution.
With :math:`B` permutations and observed value :math:`T_0`,

.. math::

    p = \\frac{1 + \\#\\{ b : T_b \\ge T_0 \\}}{1 + B},

which is a valid p-value (:math:`P(p \\le \\alpha) \\le \\alpha` under :math:`H_0`) for any :math:`B`.

Kernel statistics are computed from the pooled Gram matrix :math:`K` (built once) for a whole batch of
permutations at a time: with :math:`S \\in \\{0, 1\\}^{B \\times N}` the group-membership indicators,
the within- and between-group kernel sums are the row sums of :math:`(S K) \\odot S` and
:math:`(S K) \\odot (1 - S)`; no kernel is re-evaluated. Data-dependent kernel parameters (the
``"median"`` bandwidth) are fixed once on the pooled sample, which is itself permutation invariant,
so every permutation sees the same kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._validation import as_point_pair, check_choice
from .kernels import EnergyKernel, Kernel, get_kernel
from .mean_embedding import _feature_maps, _layer_features

__all__ = ["TwoSampleTestResult", "two_sample_test", "TEST_STATISTICS"]

#: Statistics accepted by :func:`two_sample_test`.
TEST_STATISTICS = ("mmd2", "mmd", "energy", "mean_embedding", "sinkhorn")

_PERMUTATION_CHUNK = 256


@dataclass
class TwoSampleTestResult:
    """Outcome of :func:`two_sample_test`.

    Attributes:
        statistic: the observed statistic :math:`T_0`.
        p_value: :math:`(1 + \\#\\{T_b \\ge T_0\\}) / (1 + B)`.
        null_samples: the :math:`B` permutation statistics, a float64 CPU tensor.
        n_permutations: :math:`B`.
        statistic_name: which statistic was used.
    """

    statistic: float
    p_value: float
    null_samples: Tensor
    n_permutations: int
    statistic_name: str = "mmd2"

    def reject(self, alpha: float = 0.05) -> bool:
        """Whether :math:`H_0: \\mu = \\nu` is rejected at level ``alpha`` (``p_value <= alpha``)."""
        return self.p_value <= alpha


def _memberships(
    n: int, total: int, count: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``count`` random indicators of an ``n``-subset of ``total`` points, shape ``(count, total)``."""
    order = torch.argsort(torch.rand(count, total, generator=generator), dim=1)
    members = torch.zeros(count, total, dtype=dtype)
    members.scatter_(1, order[:, :n], 1.0)
    return members.to(device)


def _kernel_statistics(gram: Tensor, members: Tensor, n: int, m: int, estimator: str) -> Tensor:
    """MMD² (unbiased or biased) for each row of ``members`` (indicator of the x-group)."""
    diagonal = gram.diagonal()
    projected = members @ gram  # (B, N)
    xx = (projected * members).sum(1)
    xy = (projected * (1 - members)).sum(1)
    yy = gram.sum() - 2 * xy - xx
    if estimator == "unbiased":
        trace_x = members @ diagonal
        trace_y = diagonal.sum() - trace_x
        return (xx - trace_x) / (n * (n - 1)) + (yy - trace_y) / (m * (m - 1)) - 2 * xy / (n * m)
    return xx / n**2 + yy / m**2 - 2 * xy / (n * m)


def _mean_embedding_statistics(features: Tensor, members: Tensor, n: int, m: int) -> Tensor:
    """:math:`\\|\\bar\\phi_x - \\bar\\phi_y\\|` for each row of ``members``."""
    signed = members / n - (1 - members) / m
    return torch.linalg.vector_norm(signed @ features, dim=1)


def two_sample_test(
    x: Any,
    y: Any,
    statistic: str = "mmd2",
    n_permutations: int = 500,
    seed: int | None = None,
    **kwargs: Any,
) -> TwoSampleTestResult:
    """Permutation test of :math:`H_0: \\mu = \\nu` from samples ``x ~ mu`` and ``y ~ nu``.

    Statistics:

    * ``"mmd2"`` (also spelt ``"mmd"``, the name of earlier versions; both compute the squared MMD, as
      ``"mmd2"`` means everywhere in :mod:`ipmcondense.ipm`): :math:`\\mathrm{MMD}^2` with keyword
      arguments ``kernel`` (default ``"gaussian"``, a name
      or a :class:`~ipmcondense.ipm.kernels.Kernel`), ``bandwidth`` (default ``"median"``, resolved
      once on the pooled sample) and ``estimator`` (``"unbiased"``, the default, or ``"biased"``); the
      observed value equals :func:`~ipmcondense.ipm.mmd.mmd2` with the same arguments. Needs
      ``n, m >= 2`` for the unbiased estimator.
    * ``"energy"``: the energy distance (:func:`~ipmcondense.ipm.mmd.energy_distance`), from the pooled
      distance matrix.
    * ``"mean_embedding"``: :func:`~ipmcondense.ipm.mean_embedding.mean_embedding_distance` with keyword
      ``feature_map`` (default identity); the features of the pooled sample are computed once.
    * ``"sinkhorn"``: :func:`~ipmcondense.ipm.sinkhorn.sinkhorn_divergence` with its keyword arguments
      (``p``, ``blur``, ``scaling``, ...). It has no Gram-matrix shortcut: one Sinkhorn solve per
      permutation.

    Args:
        x: ``(n, ...)`` sample; y: ``(m, ...)`` sample (same point shape, same device).
        statistic: one of ``"mmd2"`` (alias ``"mmd"``), ``"energy"``, ``"mean_embedding"``, ``"sinkhorn"``.
        n_permutations: number :math:`B \\ge 1` of random permutations.
        seed: seed of the permutations (a CPU ``torch.Generator``); ``None`` draws one from torch's
            global generator (reproducible under ``torch.manual_seed``).
        **kwargs: options of the statistic (see above); unknown ones raise ``TypeError``.

    Returns:
        A :class:`TwoSampleTestResult`. Computed without autograd, in float64.

    Cost: kernel statistics :math:`O(N^2 d + B N^2)` time and :math:`O(N^2 + 256 N)` memory for
    :math:`N = n + m` (the Gram matrix is dense); ``"mean_embedding"`` :math:`O(B N D)`; ``"sinkhorn"``
    :math:`B + 1` Sinkhorn solves.
    """
    check_choice(statistic, TEST_STATISTICS, "statistic")
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"n_permutations must be a positive integer, got {n_permutations!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    allowed = {
        "mmd2": {"kernel", "bandwidth", "estimator"},
        "mmd": {"kernel", "bandwidth", "estimator"},
        "energy": set(),
        "mean_embedding": {"feature_map"},
        "sinkhorn": {"p", "blur", "scaling", "reach", "backend"},
    }[statistic]
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for statistic {statistic!r}; "
            f"accepted: {', '.join(map(repr, sorted(allowed))) or 'none'}"
        )
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    generator = torch.Generator().manual_seed(seed)

    with torch.no_grad():
        if statistic == "sinkhorn":
            return _sinkhorn_test(x, y, n_permutations, generator, kwargs)
        if statistic == "mean_embedding":
            maps = _feature_maps(kwargs.get("feature_map"))
            if maps is None:
                a, b = as_point_pair(x, y)
            else:
                a, b = as_point_pair(x, y, flatten=False)
            n, m = a.shape[0], b.shape[0]
            pooled = torch.cat([a, b])
            features = torch.cat(_layer_features(pooled, maps, "x and y"), dim=1).double()

            def compute(members: Tensor) -> Tensor:
                return _mean_embedding_statistics(features, members, n, m)

            device = features.device
        else:
            a, b = as_point_pair(x, y)
            n, m = a.shape[0], b.shape[0]
            pooled = torch.cat([a, b]).double()
            if statistic in ("mmd", "mmd2"):
                estimator = check_choice(kwargs.get("estimator", "unbiased"), ("unbiased", "biased"), "estimator")
                if estimator == "unbiased" and min(n, m) < 2:
                    raise ValueError(
                        f"x and y need at least 2 points each for the unbiased estimator, got {n} and {m}"
                    )
                kernel_arg = kwargs.get("kernel", "gaussian")
                bandwidth = kwargs.get("bandwidth", "median")
                if isinstance(kernel_arg, Kernel) and bandwidth == "median":
                    bandwidth = None
                kernel = get_kernel(kernel_arg, bandwidth).resolved(pooled)
            else:
                estimator, kernel = "biased", EnergyKernel()
            gram = kernel(pooled, pooled).double()
            take_root = statistic == "energy"

            def compute(members: Tensor) -> Tensor:
                values = _kernel_statistics(gram, members, n, m, estimator)
                return values.clamp_min(0).sqrt() if take_root else values

            device = gram.device

        identity = torch.zeros(1, n + m, dtype=torch.float64)
        identity[0, :n] = 1.0
        observed = compute(identity.to(device))[0]
        nulls = []
        for start in range(0, n_permutations, _PERMUTATION_CHUNK):
            count = min(_PERMUTATION_CHUNK, n_permutations - start)
            members = _memberships(n, n + m, count, generator, device, torch.float64)
            nulls.append(compute(members))
        null_samples = torch.cat(nulls).cpu()
    return _result(float(observed), null_samples, n_permutations, statistic)


def _result(observed: float, null_samples: Tensor, n_permutations: int, name: str) -> TwoSampleTestResult:
    if not bool(torch.isfinite(null_samples).all()) or not torch.isfinite(torch.tensor(observed)):
        raise ValueError(f"the {name} statistic is not finite on these samples")
    # Ties (e.g. the identity split drawn again) must count as ">=" despite rounding differences.
    tolerance = 1e-9 * max(1.0, abs(observed), float(null_samples.abs().max()))
    exceed = int((null_samples >= observed - tolerance).sum())
    p_value = (1 + exceed) / (1 + n_permutations)
    return TwoSampleTestResult(observed, p_value, null_samples.double(), n_permutations, name)


def _sinkhorn_test(
    x: Any, y: Any, n_permutations: int, generator: torch.Generator, options: dict[str, Any]
) -> TwoSampleTestResult:
    from .sinkhorn import sinkhorn_divergence

    a, b = as_point_pair(x, y)
    n, m = a.shape[0], b.shape[0]
    pooled = torch.cat([a, b])
    observed = float(sinkhorn_divergence(a, b, **options))
    nulls = torch.empty(n_permutations, dtype=torch.float64)
    for index in range(n_permutations):
        order = torch.randperm(n + m, generator=generator).to(pooled.device)
        nulls[index] = float(sinkhorn_divergence(pooled[order[:n]], pooled[order[n:]], **options))
    return _result(observed, nulls, n_permutations, "sinkhorn")
