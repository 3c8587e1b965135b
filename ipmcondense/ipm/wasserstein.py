r"""Wasserstein distances :math:`W_p`: exact (1-D quantiles, network simplex), Sinkhorn, sliced and max-sliced; plans.

For probability measures :math:`\alpha = \sum_i a_i \delta_{x_i}`, :math:`\beta = \sum_j b_j \delta_{y_j}` on
:math:`\mathbb{R}^d` with the Euclidean ground metric,

.. math::
    W_p(\alpha, \beta) = \Big(\min_{\pi \in \Pi(\alpha, \beta)} \sum_{ij} \pi_{ij} \|x_i - y_j\|^p\Big)^{1/p},

and for ``p=1`` it is the IPM over 1-Lipschitz witness functions (Kantorovich–Rubinstein). Every function
here returns :math:`W_p` itself (not its :math:`p`-th power) as a 0-d tensor on the device of ``x``,
differentiable with respect to the points: the optimal plan :math:`\pi^*` is solved without autograd and the
cost :math:`\sum_{ij} \pi^*_{ij} \|x_i - y_j\|^p` is evaluated in torch with :math:`\pi^*` held constant,
which by the envelope theorem is the gradient of :math:`W_p^p` wherever the optimal plan is unique (almost
everywhere). Gradients with respect to the weights are the dual potentials of the exact problem (as
``ot.emd2``), or flow through the quantile formula in one dimension.

Every exact problem is solved by the one exact solver of the package (POT's network simplex, see
:mod:`ipmcondense.ipm._ot`); every entropic one by geomloss' Sinkhorn loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _ot
from ._validation import as_point_pair, as_points, as_weights, check_choice, check_finite_scalar, check_positive

__all__ = [
    "wasserstein",
    "sliced_wasserstein",
    "max_sliced_wasserstein",
    "wasserstein_1d",
    "transport_plan",
    "free_support_barycenter",
    "WASSERSTEIN_METHODS",
    "PLAN_METHODS",
]

WASSERSTEIN_METHODS = ("exact", "sinkhorn", "sliced")
#: Methods accepted by :func:`transport_plan`.
PLAN_METHODS = ("exact", "sinkhorn")


def _check_p(p: Any) -> float:
    value = check_finite_scalar(p, "p")
    if value < 1:
        raise ValueError(f"p must be >= 1 (W_p is a metric for p >= 1), got {p!r}")
    return value


def _root(power_p: Tensor, p: float) -> Tensor:
    """:math:`t^{1/p}` for :math:`t \\ge 0`, clamped at 0 and with a zero (not NaN/inf) gradient at 0."""
    if p == 1:
        return power_p.clamp_min(0)
    positive = power_p > 0
    safe = torch.where(positive, power_p, torch.ones_like(power_p))
    return torch.where(positive, safe ** (1.0 / p), torch.zeros_like(power_p))


def _pair_costs(x: Tensor, y: Tensor, p: float) -> Tensor:
    """:math:`\\|x_k - y_k\\|^p` row by row, with a zero gradient where :math:`x_k = y_k`."""
    diff = x - y
    if p == 2:
        return (diff * diff).sum(-1)
    return torch.linalg.vector_norm(diff, dim=-1) ** p


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return int(seed)


def _check_n_projections(n_projections: Any) -> int:
    if isinstance(n_projections, bool) or not isinstance(n_projections, (int, np.integer)):
        raise TypeError(f"n_projections must be an int, got {type(n_projections).__name__}")
    if n_projections < 1:
        raise ValueError(f"n_projections must be at least 1, got {n_projections}")
    return int(n_projections)


def _prepare(
    x: Any, y: Any, x_weights: Any, y_weights: Any
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    xs, ys = as_point_pair(x, y)
    a = as_weights(x_weights, xs.shape[0], "x_weights", xs)
    b = as_weights(y_weights, ys.shape[0], "y_weights", ys)
    return xs, ys, a, b


def _weights_or_uniform(w: Tensor | None, n: int, like: Tensor) -> Tensor:
    if w is None:
        return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)
    return w.to(dtype=like.dtype, device=like.device)


def _quantile_power_p(u: Tensor, v: Tensor, u_weights: Tensor, v_weights: Tensor, p: float) -> Tensor:
    r"""Batched 1-D :math:`W_p^p` by integrating quantile functions.

    ``u``: ``(L, n)``, ``v``: ``(L, m)`` (L independent 1-D problems), weights ``(n,)``/``(m,)`` shared by
    all rows, or ``(L, n)``/``(L, m)`` one row per problem. Differentiable in the values and the weights
    (the sort orders and the merged breakpoints' order held constant). :math:`W_p^p = \int_0^1 |F_u^{-1}(t) - F_v^{-1}(t)|^p dt`, exact for discrete measures: both
    quantile functions are constant between consecutive cumulative weights, so the integral is a sum over
    the merged breakpoints. Returns ``(L,)``. Cost :math:`O(L (n + m) \log(n + m))`.
    """
    u_sorted, u_order = torch.sort(u, dim=1)
    v_sorted, v_order = torch.sort(v, dim=1)
    # index_select, not advanced indexing: the latter is ~1000x slower for these sizes on the CPU
    u_w = (torch.gather(u_weights, 1, u_order) if u_weights.dim() == 2
           else u_weights.index_select(0, u_order.reshape(-1)).view(u_order.shape))
    v_w = (torch.gather(v_weights, 1, v_order) if v_weights.dim() == 2
           else v_weights.index_select(0, v_order.reshape(-1)).view(v_order.shape))
    u_cdf = torch.cumsum(u_w, dim=1)
    v_cdf = torch.cumsum(v_w, dim=1)
    # Merge the two staircases: the quantile of u on the interval ending at merged level k is u_sorted at
    # the number of u levels strictly before k (a cumulative count, no binary search needed).
    n, m = u.shape[1], v.shape[1]
    levels, merge_order = torch.sort(torch.cat((u_cdf, v_cdf), dim=1), dim=1, stable=True)
    previous = torch.cat((torch.zeros_like(levels[:, :1]), levels[:, :-1]), dim=1)
    widths = (levels - previous).clamp_min(0)
    from_u = (merge_order < n).to(torch.long)
    u_index = (torch.cumsum(from_u, dim=1) - from_u).clamp_max(n - 1)
    v_index = (torch.cumsum(1 - from_u, dim=1) - (1 - from_u)).clamp_max(m - 1)
    gaps = (torch.gather(u_sorted, 1, u_index) - torch.gather(v_sorted, 1, v_index)).abs()
    powered = gaps * gaps if p == 2 else gaps**p
    return (widths * powered).sum(dim=1)


def _column_weights(w: Any, n: int, k: int, name: str, like: Tensor) -> Tensor:
    """Weights of a batched 1-D problem: ``(n,)`` shared by every column, or ``(n, k)`` one per column."""
    if w is None:
        return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)
    if not isinstance(w, Tensor):
        w = as_points(w, name)
    if w.dim() == 2 and w.shape[1] > 1:
        if w.shape != (n, k):
            raise ValueError(f"{name} must have shape ({n},) or ({n}, {k}), got {tuple(w.shape)}")
        columns = [as_weights(w[:, c], n, f"{name}[:, {c}]", like) for c in range(k)]
        return torch.stack(columns)  # (k, n): one row per problem
    checked = as_weights(w, n, name, like)
    return checked


def wasserstein_1d(
    u: Any, v: Any, p: float = 1, u_weights: Any = None, v_weights: Any = None, *, batched: bool = False
) -> Tensor:
    r"""Exact :math:`W_p` between two weighted samples on the real line (or column by column).

    .. math::
        W_p(\mu, \nu) = \Big(\int_0^1 |F_\mu^{-1}(t) - F_\nu^{-1}(t)|^p\, dt\Big)^{1/p},

    computed exactly from the sorted samples and their cumulative weights (unequal sizes and weights
    allowed). Differentiable with respect to ``u``, ``v`` and the weights (the sort order is held constant).
    Same value as ``scipy.stats.wasserstein_distance`` (``p=1``) and ``ot.wasserstein_1d(...) ** (1/p)``.

    Args:
        u: ``(n,)`` or ``(n, 1)`` values; with ``batched=True`` ``(n, k)``: ``k`` independent problems, one
            per column (as ``ot.wasserstein_1d``).
        v: ``(m,)``/``(m, 1)`` values (``(m, k)`` when batched), on the device of ``u``.
        p: order, at least 1.
        u_weights, v_weights: optional probability weights (uniform if ``None``); when batched either
            ``(n,)`` shared by every column or ``(n, k)``, each column summing to one.
        batched: compare the columns of ``u`` and ``v`` pairwise instead of requiring one column.

    Returns:
        0-d tensor on ``u.device``, or ``(k,)`` when ``batched``.

    Cost: :math:`O(k (n + m) \log(n + m))` time, :math:`O(k (n + m))` memory.
    """
    p_value = _check_p(p)
    if not isinstance(batched, bool):
        raise TypeError(f"batched must be a bool, got {type(batched).__name__}")
    us, vs = as_point_pair(u, v, names=("u", "v"))
    if not batched:
        if us.shape[1] != 1:
            raise ValueError(
                f"u and v must be one-dimensional samples, got u of shape {tuple(us.shape)} "
                "(pass batched=True to compare their columns one by one)"
            )
        a = _weights_or_uniform(as_weights(u_weights, us.shape[0], "u_weights", us), us.shape[0], us)
        b = _weights_or_uniform(as_weights(v_weights, vs.shape[0], "v_weights", vs), vs.shape[0], vs)
        power = _quantile_power_p(us.T, vs.T, a, b, p_value)[0]
        return _root(power, p_value)
    k = us.shape[1]
    a = _column_weights(u_weights, us.shape[0], k, "u_weights", us)
    b = _column_weights(v_weights, vs.shape[0], k, "v_weights", vs)
    return _root(_quantile_power_p(us.T, vs.T, a, b, p_value), p_value)


def _directions(
    directions: Any, n_projections: int, dim: int, seed: int | None, like: Tensor
) -> Tensor:
    """``(L, d)`` unit directions: the user's (rows normalised) or ``n_projections`` random ones."""
    if directions is None:
        return _random_directions(n_projections, dim, seed).to(device=like.device, dtype=like.dtype)
    theta = as_points(directions, "directions").to(device=like.device, dtype=like.dtype)
    if theta.shape[1] != dim:
        raise ValueError(
            f"directions must have shape (L, {dim}) (one direction per row, in the points' dimension), "
            f"got {tuple(theta.shape)}"
        )
    norms = torch.linalg.vector_norm(theta.detach(), dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("directions contains a zero row; every direction must be a non-zero vector")
    return theta / norms


def _projected_powers(
    x: Any, y: Any, n_projections: int, p: float, seed: Any, x_weights: Any, y_weights: Any, directions: Any
) -> tuple[Tensor, float]:
    count = _check_n_projections(n_projections)
    p_value = _check_p(p)
    seed_value = _check_seed(seed)
    xs, ys, a, b = _prepare(x, y, x_weights, y_weights)
    a = _weights_or_uniform(a, xs.shape[0], xs)
    b = _weights_or_uniform(b, ys.shape[0], ys)
    theta = _directions(directions, count, xs.shape[1], seed_value, xs)
    return _quantile_power_p(theta @ xs.T, theta @ ys.T, a, b, p_value), p_value


def sliced_wasserstein(
    x: Any,
    y: Any,
    n_projections: int = 200,
    p: float = 2,
    seed: int | None = None,
    x_weights: Any = None,
    y_weights: Any = None,
    directions: Any = None,
) -> Tensor:
    r"""Monte-Carlo sliced Wasserstein distance.

    .. math::
        SW_p(\alpha, \beta) = \Big(\mathbb{E}_{\theta \sim U(S^{d-1})}
        W_p^p(\theta_\# \alpha, \theta_\# \beta)\Big)^{1/p}
        \approx \Big(\frac1L \sum_{l=1}^L W_p^p(\theta_{l\#} \alpha, \theta_{l\#} \beta)\Big)^{1/p},

    with :math:`L` = ``n_projections`` directions drawn uniformly on the sphere (normalised Gaussians), or
    the user's ``directions``, and each 1-D distance computed exactly by :func:`wasserstein_1d`'s quantile
    formula. It is a metric with :math:`SW_p \le W_p`; in one dimension it equals :math:`W_p`. The
    Monte-Carlo estimate of :math:`SW_p^p` is unbiased over the directions. With the same directions it
    equals ``ot.sliced_wasserstein_distance(x, y, a, b, p=p, projections=directions.T)``.

    The directions come from a CPU ``torch.Generator`` seeded with ``seed`` (drawn in float64, then moved to
    the points' device and dtype), so the same seed gives the same directions on every device; with
    ``seed=None`` they are drawn from torch's global generator (reproducible under ``torch.manual_seed``).

    Args:
        x: ``(n, d)`` samples; y: ``(m, d)`` samples on the device of ``x``.
        n_projections: number :math:`L \ge 1` of random directions (ignored when ``directions`` is given).
        p: order, at least 1.
        seed: integer seed of the directions, or ``None``.
        x_weights, y_weights: optional probability weights (uniform if ``None``).
        directions: optional ``(L, d)`` projection directions, one per row (normalised to unit length;
            differentiable, e.g. to learn them).

    Returns:
        0-d tensor on ``x.device``, differentiable with respect to ``x``, ``y`` and the weights.

    Cost: :math:`O(L (n + m) \log(n + m) + L d (n + m))` time, :math:`O(L (n + m) + L d)` memory.
    """
    power, p_value = _projected_powers(x, y, n_projections, p, seed, x_weights, y_weights, directions)
    return _root(power.mean(), p_value)


def max_sliced_wasserstein(
    x: Any,
    y: Any,
    n_projections: int = 200,
    p: float = 2,
    seed: int | None = None,
    x_weights: Any = None,
    y_weights: Any = None,
    directions: Any = None,
) -> Tensor:
    r"""Max-sliced Wasserstein distance over a set of directions (Deshpande et al., 2019).

    .. math::
        \max_{l \le L} W_p(\theta_{l\#} \alpha, \theta_{l\#} \beta),

    the largest 1-D :math:`W_p` over ``n_projections`` random unit directions (or the user's
    ``directions``), each computed exactly by the quantile formula. This is POT's
    ``ot.max_sliced_wasserstein_distance`` (same directions, same value): a Monte-Carlo lower bound of the
    max-sliced distance :math:`\max_{\theta \in S^{d-1}} W_p(\theta_\# \alpha, \theta_\# \beta)
    \le W_p(\alpha, \beta)`, which it approaches as :math:`L` grows; pass optimised ``directions`` (they
    are differentiable) for the supremum itself. Arguments as in :func:`sliced_wasserstein`.

    Returns:
        0-d tensor on ``x.device``, differentiable with respect to ``x``, ``y``, the weights and
        ``directions`` (through the maximising direction).

    Cost: as :func:`sliced_wasserstein`.
    """
    power, p_value = _projected_powers(x, y, n_projections, p, seed, x_weights, y_weights, directions)
    return _root(power.max(), p_value)


def _random_directions(count: int, dim: int, seed: int | None) -> Tensor:
    generator = torch.Generator()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator.manual_seed(seed)
    gaussian = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    norms = torch.linalg.vector_norm(gaussian, dim=1, keepdim=True)
    # A zero Gaussian draw has probability 0; guard anyway so no NaN can appear.
    return torch.where(norms > 0, gaussian / norms.clamp_min(1e-300), torch.eye(1, dim, dtype=gaussian.dtype))


def _cost_matrix_np(x: Tensor, y: Tensor, p: float) -> np.ndarray:
    from scipy.spatial.distance import cdist

    x_np = x.detach().to("cpu", torch.float64).numpy()
    y_np = y.detach().to("cpu", torch.float64).numpy()
    return cdist(x_np, y_np, metric="sqeuclidean") if p == 2 else cdist(x_np, y_np) ** p


def _exact_solution(x: Tensor, y: Tensor, a: Tensor | None, b: Tensor | None, p: float):
    n, m = x.shape[0], y.shape[0]
    _ot.check_exact_size(n, m, "use method='sinkhorn' or method='sliced', or subsample")
    return _ot.exact_transport(_cost_matrix_np(x, y, p), a, b)


def _exact_power_p(x: Tensor, y: Tensor, a: Tensor | None, b: Tensor | None, p: float) -> Tensor:
    plan, u, v = _exact_solution(x, y, a, b, p)
    return _ot.envelope_value(plan, u, v, lambda i, j: _pair_costs(x[i], y[j], p), a, b, x)


def transport_plan(
    x: Any,
    y: Any,
    p: float = 2,
    method: str = "exact",
    x_weights: Any = None,
    y_weights: Any = None,
    blur: float = 0.05,
    scaling: float = 0.5,
    reach: float | None = None,
    iterations: int = 1000,
) -> Tensor:
    r"""Optimal transport plan :math:`\pi \in \mathbb{R}_+^{n \times m}` between two weighted point clouds.

    - ``"exact"``: a solution of :math:`\min_{\pi \in \Pi(a, b)} \sum_{ij} \pi_{ij} \|x_i - y_j\|^p` from
      the network simplex (POT's ``ot.emd``, same plan). Rows sum to :math:`a`, columns to :math:`b` (to
      float64 rounding). Memory :math:`O(nm)`; sizes are limited only by the available memory.
    - ``"sinkhorn"``: the entropic plan of geomloss' conventions, :math:`\pi_{ij} = a_i b_j
      \exp((f_i + g_j - C_{ij}) / \varepsilon)` with :math:`C = \|x - y\|^p / p`, :math:`\varepsilon =
      \text{blur}^p` and :math:`(f, g)` the potentials of :math:`\mathrm{OT}_\varepsilon(\alpha, \beta)`
      (``p`` 1 or 2) from geomloss' loop: its :math:`\varepsilon`-scaling, then ``iterations`` updates at
      the final temperature so that the marginals converge (linearly, faster for larger blurs). At
      convergence it is ``ot.sinkhorn(a, b, C, reg=eps)``'s plan. With ``reach`` the
      plan of unbalanced OT with KL marginal penalties :math:`\rho = \text{reach}^p` (``ot.unbalanced.
      sinkhorn_unbalanced(a, b, C, eps, rho)``); its marginals are only close to :math:`a`, :math:`b`, and the
      weights may then be any positive measures (no need to sum to one).

    Args:
        x: ``(n, d)``; y: ``(m, d)`` on the device of ``x``.
        p: order of the ground cost (``>= 1``; 1 or 2 for ``"sinkhorn"``).
        method: ``"exact"`` or ``"sinkhorn"``.
        x_weights, y_weights: weights (uniform if ``None``).
        blur, scaling, reach: Sinkhorn parameters, see :func:`~ipmcondense.ipm.sinkhorn.sinkhorn_divergence`.
        iterations: Sinkhorn updates at the final temperature (``"sinkhorn"`` only).

    Returns:
        ``(n, m)`` tensor of the points' dtype on ``x.device`` (no gradient: the plan is a solution, not a
        differentiable quantity; differentiate :func:`wasserstein` or the Sinkhorn divergence instead).

    Cost: exact, the network simplex (:math:`O(nm)` memory); Sinkhorn, :math:`O(nmd + K nm)` time for
    :math:`K` updates, :math:`O(nm)` memory.
    """
    check_choice(method, PLAN_METHODS, "method")
    p_value = _check_p(p)
    if method == "sinkhorn":
        from .sinkhorn import _check_sinkhorn_args, _prepare as sinkhorn_prepare

        p_int, blur_value, scaling_value, reach_value = _check_sinkhorn_args(p, blur, scaling, reach, "auto")
        if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
            raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
        xs, ys, a, b = sinkhorn_prepare(x, y, x_weights, y_weights, unbalanced=reach_value is not None)
        plan = _ot.sinkhorn_plan(xs, ys, a, b, p=p_int, blur=blur_value, scaling=scaling_value,
                                 reach=reach_value, iterations=int(iterations))
        if not bool(torch.isfinite(plan).all()):
            raise FloatingPointError("the Sinkhorn plan is not finite; use a larger blur or float64 inputs")
        return plan
    if reach is not None:
        raise ValueError("reach (unbalanced OT) needs method='sinkhorn'")
    xs, ys, a, b = _prepare(x, y, x_weights, y_weights)
    plan, _, _ = _exact_solution(xs, ys, a, b, p_value)
    return torch.as_tensor(plan, dtype=xs.dtype, device=xs.device)


def wasserstein(
    x: Any,
    y: Any,
    p: float = 1,
    method: str = "exact",
    x_weights: Any = None,
    y_weights: Any = None,
    blur: float = 0.01,
    scaling: float = 0.9,
    n_projections: int = 200,
    seed: int | None = None,
) -> Tensor:
    r"""Wasserstein distance :math:`W_p(\alpha, \beta)` (not its :math:`p`-th power), Euclidean ground metric.

    Methods:

    - ``"exact"``: the optimal transport problem solved exactly. One-dimensional points use the quantile
      formula (:func:`wasserstein_1d`, :math:`O((n + m) \log(n + m))`). Otherwise POT's network simplex
      (``ot.emd``, the package's one exact solver, :mod:`ipmcondense.ipm._ot`) solves the transport problem
      in float64 on the CPU (errors near 1e-15; any valid weights, tiny entries included), for any size
      that fits the available memory (about 64 bytes per pair; larger problems raise a ``ValueError``
      recommending ``"sinkhorn"`` or ``"sliced"``). The returned value is evaluated in torch on
      ``x.device`` from that plan (gradient in the points: the plan held constant, correct almost
      everywhere; gradient in the weights: the dual potentials, as ``ot.emd2``).
    - ``"sinkhorn"``: :math:`(p\, \max(S_\varepsilon, 0))^{1/p}` from the debiased Sinkhorn divergence
      :math:`S_\varepsilon \to W_p^p / p` (blur :math:`\to 0`) with ``blur`` and ``scaling``; ``p`` must be
      1 or 2. A slightly negative :math:`S_\varepsilon` (approximation error at small blur) is clamped to 0
      (value 0, gradient 0). Biased upwards by the entropic blur, of order ``blur``.
    - ``"sliced"``: :func:`sliced_wasserstein` with ``n_projections`` and ``seed`` (a different metric,
      :math:`SW_p \le W_p`; equal to :math:`W_p` in one dimension).

    Args:
        x: ``(n, d)`` samples (images are flattened); y: ``(m, d)`` samples on the device of ``x``.
        p: order, at least 1 (1 or 2 for ``"sinkhorn"``).
        method: ``"exact"``, ``"sinkhorn"`` or ``"sliced"``.
        x_weights, y_weights: optional probability weights (uniform if ``None``).
        blur, scaling: Sinkhorn parameters (``"sinkhorn"`` only), see
            :func:`ipmcondense.ipm.sinkhorn.sinkhorn_divergence`.
        n_projections, seed: sliced parameters (``"sliced"`` only).

    Returns:
        0-d tensor on ``x.device`` with the dtype of the inputs, differentiable with respect to the points
        and the weights.
    """
    check_choice(method, WASSERSTEIN_METHODS, "method")
    p_value = _check_p(p)
    if method == "sliced":
        return sliced_wasserstein(x, y, n_projections=n_projections, p=p_value, seed=seed,
                                  x_weights=x_weights, y_weights=y_weights)
    if method == "sinkhorn":
        from .sinkhorn import sinkhorn_divergence

        if p_value not in (1, 2):
            raise ValueError(f"p must be 1 or 2 for method='sinkhorn', got {p!r}")
        check_positive(blur, "blur")
        divergence = sinkhorn_divergence(x, y, p=int(p_value), blur=blur, scaling=scaling,
                                         x_weights=x_weights, y_weights=y_weights)
        return _root(p_value * divergence, p_value)
    xs, ys, a, b = _prepare(x, y, x_weights, y_weights)
    if xs.shape[1] == 1:
        power = _quantile_power_p(xs.T, ys.T, _weights_or_uniform(a, xs.shape[0], xs),
                                  _weights_or_uniform(b, ys.shape[0], ys), p_value)[0]
    else:
        power = _exact_power_p(xs, ys, a, b, p_value)
    return _root(power, p_value)


def free_support_barycenter(
    points: Tensor,
    n_atoms: int,
    *,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    max_iter: int = 100,
    tol: float = 1e-9,
) -> Tensor:
    r"""The :math:`W_2` barycenter of one empirical measure with ``n_atoms`` uniform atoms (free support).

    For :math:`\mu = \frac1n \sum_i \delta_{y_i}` it solves

    .. math::
        \min_{x_1, \dots, x_k} W_2^2\Big(\frac1k \sum_j \delta_{x_j},\ \mu\Big),

    the best :math:`k`-atom uniform approximation of :math:`\mu` in :math:`W_2` (the barycenter of the
    single measure :math:`\mu`, as WMDD computes it per class). Fixed-point iteration of Cuturi & Doucet
    (2014), Algorithm 2, as POT's ``ot.lp.free_support_barycenter``: with the optimal plan :math:`\pi`
    between the atoms and :math:`\mu` (exact network simplex), move every atom to the barycentric
    projection :math:`x_j \leftarrow k \sum_i \pi_{ji} y_i`; stop when no atom moves by more than ``tol``
    (max norm) or after ``max_iter`` iterations. Each step does not increase :math:`W_2^2`; the result is
    a stationary point (the problem is not convex: it depends on the initialisation). With
    :math:`k = n` the barycenter is :math:`\mu` itself; in one dimension with :math:`k \mid n` its atoms are
    the means of the :math:`k` consecutive blocks of sorted points (quantile cells).

    Args:
        points: ``(n, d)`` support of :math:`\mu` (detached; computed in float64 on the CPU).
        n_atoms: :math:`k \ge 1`.
        init: ``(k, d)`` starting atoms; default ``k`` distinct points drawn from ``points`` with
            ``generator`` (the first ``k`` points when ``generator`` is ``None``).
        generator: drives the default initialisation.
        max_iter, tol: stopping rule.

    Returns:
        ``(k, d)`` atoms, dtype and device of ``points``, no gradient.

    Cost: per iteration one exact transport problem of size :math:`k \times n` plus :math:`O(knd)`.
    """
    points = as_points(points, "points")
    n = points.shape[0]
    if isinstance(n_atoms, bool) or not isinstance(n_atoms, int) or n_atoms < 1:
        raise ValueError(f"n_atoms must be a positive integer, got {n_atoms!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    tol = check_positive(tol, "tol", allow_zero=True)
    y = points.detach().to("cpu", torch.float64)
    if init is None:
        if n_atoms > n:
            raise ValueError(f"n_atoms ({n_atoms}) exceeds the number of points ({n}); pass init")
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        x = y[order[:n_atoms]].clone()
    else:
        x = as_points(init, "init").detach().to("cpu", torch.float64)
        if x.shape != (n_atoms, y.shape[1]):
            raise ValueError(f"init must have shape ({n_atoms}, {y.shape[1]}), got {tuple(x.shape)}")
    for _ in range(max_iter):
        cost = torch.cdist(x, y).pow(2)
        plan, _, _ = _ot.exact_transport(cost, None, None)
        moved = n_atoms * (torch.from_numpy(plan) @ y)
        shift = float((moved - x).abs().max())
        x = moved
        if shift <= tol:
            break
    return x.to(device=points.device, dtype=points.dtype)
