r"""Wasserstein distances :math:`W_p`: exact (1-D, assignment, linear program), Sinkhorn and sliced.

For probability measures :math:`\alpha = \sum_i a_i \delta_{x_i}`, :math:`\beta = \sum_j b_j \delta_{y_j}` on
:math:`\mathbb{R}^d` with the Euclidean ground metric,

.. math::
    W_p(\alpha, \beta) = \Big(\min_{\pi \in \Pi(\alpha, \beta)} \sum_{ij} \pi_{ij} \|x_i - y_j\|^p\Big)^{1/p},

and for ``p=1`` it is the IPM over 1-Lipschitz witness functions (Kantorovich–Rubinstein). Every function
here returns :math:`W_p` itself (not its :math:`p`-th power) as a 0-d tensor on the device of ``x``,
differentiable with respect to the points: the optimal plan :math:`\pi^*` is solved without autograd and the
cost :math:`\sum_{ij} \pi^*_{ij} \|x_i - y_j\|^p` is evaluated in torch with :math:`\pi^*` held constant,
which by the envelope theorem is the gradient of :math:`W_p^p` wherever the optimal plan is unique (almost
everywhere). Weights are treated as constants.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._validation import as_point_pair, as_weights, check_choice, check_finite_scalar, check_positive

__all__ = [
    "wasserstein",
    "sliced_wasserstein",
    "wasserstein_1d",
    "WASSERSTEIN_METHODS",
    "MAX_ASSIGNMENT_PAIRS",
    "MAX_LINEAR_PROGRAM_PAIRS",
]

WASSERSTEIN_METHODS = ("exact", "sinkhorn", "sliced")

# n * m above which the exact solvers refuse: the cost matrix alone is 32 MB in float64 at 4e6 pairs, and
# the Hungarian algorithm is O(n^3). The general linear program (HiGHS) is much slower than the assignment
# problem at equal size, so its limit is lower.
MAX_ASSIGNMENT_PAIRS = 4_000_000
MAX_LINEAR_PROGRAM_PAIRS = 250_000


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
    all rows. :math:`W_p^p = \int_0^1 |F_u^{-1}(t) - F_v^{-1}(t)|^p dt`, exact for discrete measures: both
    quantile functions are constant between consecutive cumulative weights, so the integral is a sum over
    the merged breakpoints. Returns ``(L,)``. Cost :math:`O(L (n + m) \log(n + m))`.
    """
    u_sorted, u_order = torch.sort(u, dim=1)
    v_sorted, v_order = torch.sort(v, dim=1)
    u_cdf = torch.cumsum(u_weights.detach()[u_order], dim=1)
    v_cdf = torch.cumsum(v_weights.detach()[v_order], dim=1)
    levels, _ = torch.sort(torch.cat((u_cdf, v_cdf), dim=1), dim=1)
    previous = torch.cat((torch.zeros_like(levels[:, :1]), levels[:, :-1]), dim=1)
    widths = (levels - previous).clamp_min(0)
    middles = (previous + levels) / 2
    n, m = u.shape[1], v.shape[1]
    u_index = torch.searchsorted(u_cdf.contiguous(), middles.contiguous()).clamp_max(n - 1)
    v_index = torch.searchsorted(v_cdf.contiguous(), middles.contiguous()).clamp_max(m - 1)
    gaps = (torch.gather(u_sorted, 1, u_index) - torch.gather(v_sorted, 1, v_index)).abs()
    powered = gaps * gaps if p == 2 else gaps**p
    return (widths * powered).sum(dim=1)


def wasserstein_1d(u: Any, v: Any, p: float = 1, u_weights: Any = None, v_weights: Any = None) -> Tensor:
    r"""Exact :math:`W_p` between two weighted samples on the real line.

    .. math::
        W_p(\mu, \nu) = \Big(\int_0^1 |F_\mu^{-1}(t) - F_\nu^{-1}(t)|^p\, dt\Big)^{1/p},

    computed exactly from the sorted samples and their cumulative weights (unequal sizes and weights
    allowed). Differentiable with respect to ``u`` and ``v`` (the sort order is held constant).

    Args:
        u: ``(n,)`` or ``(n, 1)`` values.
        v: ``(m,)`` or ``(m, 1)`` values, on the device of ``u``.
        p: order, at least 1.
        u_weights, v_weights: optional probability weights (uniform if ``None``).

    Returns:
        0-d tensor on ``u.device``.

    Cost: :math:`O((n + m) \log(n + m))` time, :math:`O(n + m)` memory.
    """
    p_value = _check_p(p)
    us, vs = as_point_pair(u, v, names=("u", "v"))
    if us.shape[1] != 1:
        raise ValueError(f"u and v must be one-dimensional samples, got u of shape {tuple(us.shape)}")
    a = _weights_or_uniform(as_weights(u_weights, us.shape[0], "u_weights", us), us.shape[0], us)
    b = _weights_or_uniform(as_weights(v_weights, vs.shape[0], "v_weights", vs), vs.shape[0], vs)
    power = _quantile_power_p(us.T, vs.T, a, b, p_value)[0]
    return _root(power, p_value)


def sliced_wasserstein(
    x: Any,
    y: Any,
    n_projections: int = 200,
    p: float = 2,
    seed: int | None = None,
    x_weights: Any = None,
    y_weights: Any = None,
) -> Tensor:
    r"""Monte-Carlo sliced Wasserstein distance.

    .. math::
        SW_p(\alpha, \beta) = \Big(\mathbb{E}_{\theta \sim U(S^{d-1})}
        W_p^p(\theta_\# \alpha, \theta_\# \beta)\Big)^{1/p}
        \approx \Big(\frac1L \sum_{l=1}^L W_p^p(\theta_{l\#} \alpha, \theta_{l\#} \beta)\Big)^{1/p},

    with :math:`L` = ``n_projections`` directions drawn uniformly on the sphere (normalised Gaussians) and
    each 1-D distance computed exactly by :func:`wasserstein_1d`'s quantile formula. It is a metric with
    :math:`SW_p \le W_p`; in one dimension it equals :math:`W_p`. The Monte-Carlo estimate of
    :math:`SW_p^p` is unbiased over the directions.

    The directions come from a CPU ``torch.Generator`` seeded with ``seed`` (drawn in float64, then moved to
    the points' device and dtype), so the same seed gives the same directions on every device; with
    ``seed=None`` they are drawn from torch's global generator (reproducible under ``torch.manual_seed``).

    Args:
        x: ``(n, d)`` samples; y: ``(m, d)`` samples on the device of ``x``.
        n_projections: number :math:`L \ge 1` of directions.
        p: order, at least 1.
        seed: integer seed of the directions, or ``None``.
        x_weights, y_weights: optional probability weights (uniform if ``None``).

    Returns:
        0-d tensor on ``x.device``, differentiable with respect to ``x`` and ``y``.

    Cost: :math:`O(L (n + m) \log(n + m) + L d (n + m))` time, :math:`O(L (n + m) + L d)` memory.
    """
    count = _check_n_projections(n_projections)
    p_value = _check_p(p)
    seed_value = _check_seed(seed)
    xs, ys, a, b = _prepare(x, y, x_weights, y_weights)
    a = _weights_or_uniform(a, xs.shape[0], xs)
    b = _weights_or_uniform(b, ys.shape[0], ys)
    directions = _random_directions(count, xs.shape[1], seed_value).to(device=xs.device, dtype=xs.dtype)
    power = _quantile_power_p(directions @ xs.T, directions @ ys.T, a, b, p_value).mean()
    return _root(power, p_value)


def _random_directions(count: int, dim: int, seed: int | None) -> Tensor:
    generator = torch.Generator()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator.manual_seed(seed)
    gaussian = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    norms = torch.linalg.vector_norm(gaussian, dim=1, keepdim=True)
    # A zero Gaussian draw has probability 0; guard anyway so no NaN can appear.
    return torch.where(norms > 0, gaussian / norms.clamp_min(1e-300), torch.eye(1, dim, dtype=gaussian.dtype))


def _exact_plan(
    x: Tensor, y: Tensor, a: Tensor | None, b: Tensor | None, p: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Support ``(rows, cols, masses)`` of an optimal plan, solved in float64 on the CPU."""
    from scipy.optimize import linear_sum_assignment, linprog
    from scipy.sparse import coo_matrix, vstack
    from scipy.spatial.distance import cdist

    n, m = x.shape[0], y.shape[0]
    x_np = x.detach().to("cpu", torch.float64).numpy()
    y_np = y.detach().to("cpu", torch.float64).numpy()
    cost = cdist(x_np, y_np, metric="sqeuclidean") if p == 2 else cdist(x_np, y_np) ** p
    if a is None and b is None and n == m:
        rows, cols = linear_sum_assignment(cost)
        return rows, cols, np.full(n, 1.0 / n)
    a_np = np.full(n, 1.0 / n) if a is None else a.detach().to("cpu", torch.float64).numpy()
    b_np = np.full(m, 1.0 / m) if b is None else b.detach().to("cpu", torch.float64).numpy()
    # The weights were checked to sum to 1 within 1e-5; the equality constraints need exactly equal masses.
    a_np, b_np = a_np / a_np.sum(), b_np / b_np.sum()
    index = np.arange(n * m)
    row_constraints = coo_matrix((np.ones(n * m), (index // m, index)), shape=(n, n * m))
    col_constraints = coo_matrix((np.ones(n * m), (index % m, index)), shape=(m, n * m))
    result = linprog(
        cost.ravel(),
        A_eq=vstack([row_constraints, col_constraints]).tocsr(),
        b_eq=np.concatenate([a_np, b_np]),
        bounds=(0, None),
        method="highs",
    )
    if result.status != 0 or result.x is None:
        raise RuntimeError(f"the optimal transport linear program failed: {result.message}")
    plan = result.x.reshape(n, m)
    rows, cols = np.nonzero(plan > 1e-14)
    return rows, cols, plan[rows, cols]


def _exact_power_p(x: Tensor, y: Tensor, a: Tensor | None, b: Tensor | None, p: float) -> Tensor:
    n, m = x.shape[0], y.shape[0]
    uniform_square = a is None and b is None and n == m
    limit = MAX_ASSIGNMENT_PAIRS if uniform_square else MAX_LINEAR_PROGRAM_PAIRS
    if n * m > limit:
        solver = "assignment problem" if uniform_square else "linear program"
        raise ValueError(
            f"x and y are too large for exact optimal transport ({n} x {m} = {n * m} pairs; the exact "
            f"{solver} is limited to {limit}): use method='sinkhorn' or method='sliced', or subsample"
        )
    rows, cols, masses = _exact_plan(x, y, a, b, p)
    device = x.device
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.as_tensor(cols, dtype=torch.long, device=device)
    masses_t = torch.as_tensor(masses, dtype=x.dtype, device=device)
    return (masses_t * _pair_costs(x[rows_t], y[cols_t], p)).sum()


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
      formula (:func:`wasserstein_1d`, :math:`O((n + m) \log(n + m))`). Equal sizes with uniform weights use
      the assignment problem (``scipy.optimize.linear_sum_assignment``, :math:`O(n^3)` time, :math:`O(n^2)`
      memory; at most 4e6 pairs). Otherwise the transport linear program is solved with HiGHS
      (``scipy.optimize.linprog``; :math:`nm` variables, at most 2.5e5 pairs). Larger problems raise a
      ``ValueError`` recommending ``"sinkhorn"`` or ``"sliced"``. The plan is solved in float64 on the CPU;
      the returned value is evaluated in torch on ``x.device`` from that plan (gradient: the plan held
      constant, correct almost everywhere).
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
        0-d tensor on ``x.device`` with the dtype of the inputs, differentiable with respect to the points.
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
