"""Maximum mean discrepancy (MMD) and energy distance between two point clouds.

The MMD is the IPM whose witness class is the unit ball of a reproducing-kernel Hilbert space
:math:`\\mathcal H` with kernel :math:`k`:

.. math::
    \\mathrm{MMD}(\\mu, \\nu) = \\sup_{\\|f\\|_{\\mathcal H} \\le 1} E_\\mu f - E_\\nu f
    = \\| E_\\mu \\phi(X) - E_\\nu \\phi(Y) \\|_{\\mathcal H},
    \\qquad \\mathrm{MMD}^2 = E k(X, X') + E k(Y, Y') - 2 E k(X, Y).

All kernel sums go through :mod:`ipmcondense.ipm._kernel_sums` (backends ``dense``, ``tiled``,
``keops``, ``auto``), are accumulated in float64, and the three terms are combined in float64 before the
result is cast back to the inputs' (promoted) floating dtype: in float32 the combination, not the kernel
evaluation, is what loses precision as MMD² approaches 0. Costs: ``O((n + m)^2 d)`` time for the
quadratic estimators, ``O((n + m) d)`` memory with the tiled/KeOps backends.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._kernel_sums import BACKENDS, kernel_matvec, kernel_sum
from ._validation import as_point_pair, as_points, as_weights, check_choice
from .kernels import EnergyKernel, Kernel, get_kernel, safe_sqrt
from .witness import Witness

__all__ = ["ESTIMATORS", "mmd2", "mmd", "mmd2_from_kernel_matrix", "energy_distance", "mmd_witness"]

#: Estimators accepted by :func:`mmd2`.
ESTIMATORS = ("unbiased", "biased", "linear")


def _prepare(x, y, kernel, bandwidth, backend, x_weights, y_weights):
    x, y = as_point_pair(x, y)
    check_choice(backend, BACKENDS, "backend")
    a = as_weights(x_weights, x.shape[0], "x_weights", x)
    b = as_weights(y_weights, y.shape[0], "y_weights", y)
    if isinstance(kernel, Kernel) and bandwidth == "median":
        bandwidth = None
    resolved = get_kernel(kernel, bandwidth).resolved(x, y)
    return x, y, a, b, resolved


def _identical_samples(x: Tensor, y: Tensor, a: Tensor | None, b: Tensor | None) -> bool:
    """Whether the two weighted samples are equal entry by entry (an ``O(nd)`` check)."""
    if x.shape != y.shape or (a is None) != (b is None):
        return False
    with torch.no_grad():
        return bool(torch.equal(x, y) and (a is None or torch.equal(a, b)))


def _biased_mmd2(x: Tensor, y: Tensor, a, b, kernel: Kernel, backend: str) -> Tensor:
    """V-statistic in float64: ``|sum_i a_i phi(x_i) - sum_j b_j phi(y_j)|^2`` (a, b uniform if None).

    Identical samples give exactly 0 (with its exact, zero, gradient): the three sums would otherwise
    cancel only to rounding level, which a square root (:func:`mmd`) turns into ~1e-8 in float64.
    """
    n, m = x.shape[0], y.shape[0]
    if _identical_samples(x, y, a, b):
        inputs = [t for t in (x, y, a, b) if t is not None]
        return sum(t.sum() for t in inputs).double() * 0.0
    xx = kernel_sum(x, x, kernel, a, a, backend=backend)
    yy = kernel_sum(y, y, kernel, b, b, backend=backend)
    xy = kernel_sum(x, y, kernel, a, b, backend=backend)
    if a is None:
        xx, xy = xx / n**2, xy / n
    if b is None:
        yy, xy = yy / m**2, xy / m
    return xx + yy - 2.0 * xy


def _unbiased_mmd2(x: Tensor, y: Tensor, a, b, kernel: Kernel, backend: str) -> Tensor:
    """U-statistic in float64 (weighted: off-diagonal sums divided by ``1 - sum a_i^2``)."""
    n, m = x.shape[0], y.shape[0]
    for name, size in (("x", n), ("y", m)):
        if size < 2:
            raise ValueError(f"{name} must have at least 2 points for the unbiased estimator, got {size}")
    xx = kernel_sum(x, x, kernel, a, a, exclude_diagonal=True, backend=backend)
    yy = kernel_sum(y, y, kernel, b, b, exclude_diagonal=True, backend=backend)
    xy = kernel_sum(x, y, kernel, a, b, backend=backend)
    xx = xx / (n * (n - 1)) if a is None else xx / _off_diagonal_mass(a, "x_weights")
    yy = yy / (m * (m - 1)) if b is None else yy / _off_diagonal_mass(b, "y_weights")
    xy = xy / (n if a is None else 1.0) / (m if b is None else 1.0)
    return xx + yy - 2.0 * xy


def _off_diagonal_mass(w: Tensor, name: str) -> Tensor:
    mass = 1.0 - (w.double() ** 2).sum()
    if float(mass.detach()) <= 1e-12:
        raise ValueError(
            f"{name} put all mass on one point: the unbiased estimator needs at least two points "
            "with positive weight"
        )
    return mass


def _linear_mmd2(x: Tensor, y: Tensor, kernel: Kernel) -> Tensor:
    """Gretton et al. (2012) linear-time statistic on consecutive pairs, float64 mean."""
    pairs = min(x.shape[0], y.shape[0]) // 2
    for name, size in (("x", x.shape[0]), ("y", y.shape[0])):
        if size < 2:
            raise ValueError(f"{name} must have at least 2 points for the linear estimator, got {size}")
    x1, x2 = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
    y1, y2 = y[0 : 2 * pairs : 2], y[1 : 2 * pairs : 2]
    h = kernel.paired(x1, x2) + kernel.paired(y1, y2) - kernel.paired(x1, y2) - kernel.paired(x2, y1)
    return h.double().mean()


def mmd2(
    x,
    y,
    kernel: str | Kernel = "gaussian",
    bandwidth: float | str = "median",
    estimator: str = "unbiased",
    backend: str = "auto",
    x_weights=None,
    y_weights=None,
) -> Tensor:
    """Squared maximum mean discrepancy :math:`\\mathrm{MMD}^2_k(\\mu_x, \\nu_y)`.

    Args:
        x, y: point clouds ``(n, d)`` and ``(m, d)`` (tensors, arrays; images are flattened).
        kernel: a name accepted by :func:`~ipmcondense.ipm.kernels.get_kernel` or a
            :class:`~ipmcondense.ipm.kernels.Kernel` module (which carries its own bandwidth).
        bandwidth: positive float or ``"median"`` (median heuristic on the pooled sample, resolved once
            for all three kernel sums; detached from the graph).
        estimator:
            ``"unbiased"`` (default) -- the U-statistic
            :math:`\\frac{1}{n(n-1)}\\sum_{i \\ne i'} k(x_i, x_{i'}) + \\frac{1}{m(m-1)}\\sum_{j \\ne j'}
            k(y_j, y_{j'}) - \\frac{2}{nm}\\sum_{i,j} k(x_i, y_j)`, unbiased for MMD², so it can be
            negative when the distributions are close; needs ``n, m >= 2``. With weights, the
            off-diagonal sums :math:`\\sum_{i \\ne i'} a_i a_{i'} k(x_i, x_{i'})` are divided by
            :math:`1 - \\sum_i a_i^2` (unbiased for fixed weights; equal to the above for uniform ones).
            ``"biased"`` -- the V-statistic
            :math:`\\|\\sum_i a_i \\phi(x_i) - \\sum_j b_j \\phi(y_j)\\|^2_{\\mathcal H} \\ge 0`, the exact
            MMD² between the (weighted) empirical distributions; biased upwards by ``O(1/n + 1/m)``.
            ``"linear"`` -- Gretton et al. (2012) :math:`\\mathrm{MMD}^2_l = \\frac1P \\sum_{p<P}
            k(x_{2p}, x_{2p+1}) + k(y_{2p}, y_{2p+1}) - k(x_{2p}, y_{2p+1}) - k(x_{2p+1}, y_{2p})`
            over the first :math:`2P` points of each set in the given order, :math:`P =
            \\lfloor \\min(n, m)/2 \\rfloor`. Unbiased, ``O(P d)`` time, but its variance is much larger:
            use it as a stochastic training signal, not for evaluation. No weights.
        backend: ``"auto"``, ``"dense"``, ``"tiled"`` or ``"keops"`` for the kernel sums.
        x_weights, y_weights: probability weights (non-negative, summing to 1) or ``None`` (uniform).

    Returns:
        A 0-d tensor of the inputs' promoted floating dtype, differentiable with respect to ``x``,
        ``y`` and the weights. Computed and combined in float64, then cast back.

    Cost: ``O((n + m)^2 d)`` time (``O(min(n, m) d)`` for ``"linear"``); memory ``O(nm)`` with the
    dense backend, ``O((n + m) d)`` plus a fixed tile with ``tiled``/``keops``.
    """
    check_choice(estimator, ESTIMATORS, "estimator")
    x, y, a, b, k = _prepare(x, y, kernel, bandwidth, backend, x_weights, y_weights)
    if estimator == "biased":
        value = _biased_mmd2(x, y, a, b, k, backend)
    elif estimator == "unbiased":
        value = _unbiased_mmd2(x, y, a, b, k, backend)
    else:
        if a is not None or b is not None:
            raise ValueError("x_weights/y_weights are not supported by the linear estimator")
        value = _linear_mmd2(x, y, k)
    return value.to(x.dtype)


def mmd(
    x,
    y,
    kernel: str | Kernel = "gaussian",
    bandwidth: float | str = "median",
    backend: str = "auto",
    x_weights=None,
    y_weights=None,
) -> Tensor:
    """The MMD metric :math:`\\|\\hat\\mu_x - \\hat\\nu_y\\|_{\\mathcal H}` between the empirical distributions.

    The square root of the biased (V-statistic) MMD², clamped at 0 before the root (rounding can make
    a zero MMD² slightly negative); the gradient at 0 is defined as 0, never NaN. For a characteristic
    kernel (Gaussian, Laplacian, IMQ, energy) this is a metric between (weighted) empirical
    distributions: non-negative, symmetric, zero iff they are equal, and it satisfies the triangle
    inequality. Arguments, dtype and cost as in :func:`mmd2`.
    """
    x, y, a, b, k = _prepare(x, y, kernel, bandwidth, backend, x_weights, y_weights)
    return safe_sqrt(_biased_mmd2(x, y, a, b, k, backend)).to(x.dtype)


def mmd2_from_kernel_matrix(
    kernel_matrix, n_x: int, estimator: str = "unbiased", x_weights=None, y_weights=None
) -> Tensor:
    """MMD² from a precomputed joint Gram matrix (as alibi-detect's ``mmd2_from_kernel_matrix``).

    ``kernel_matrix`` is the ``(n + m, n + m)`` matrix :math:`k(z_i, z_j)` of the pooled sample
    :math:`z = (x_1, \\dots, x_n, y_1, \\dots, y_m)`, the ``n_x`` points of ``x`` first: any kernel works,
    including ones this package cannot evaluate (graph, string, learned kernels). With blocks
    :math:`K_{xx}`, :math:`K_{yy}`, :math:`K_{xy}`:

    * ``"unbiased"``: :math:`\\frac{1}{n(n-1)} \\sum_{i \\ne i'} K_{xx} + \\frac{1}{m(m-1)} \\sum_{j \\ne j'}
      K_{yy} - \\frac{2}{nm} \\sum K_{xy}` (weighted: off-diagonal sums over :math:`1 - \\sum a_i^2`), as
      :func:`mmd2`;
    * ``"biased"``: :math:`a^\\top K_{xx} a + b^\\top K_{yy} b - 2 a^\\top K_{xy} b`, the V-statistic.

    The matrix is not checked for symmetry or positive definiteness (a precomputed kernel is trusted), only
    for shape and finiteness. Computed in float64, returned in the matrix's floating dtype; differentiable
    with respect to the matrix and the weights. Cost: :math:`O((n + m)^2)`.

    Args:
        kernel_matrix: ``(n + m, n + m)`` tensor or array.
        n_x: number :math:`n` of ``x`` points (``1 <= n_x < n + m``; at least 2 on each side for
            ``"unbiased"``).
        estimator: ``"unbiased"`` or ``"biased"``.
        x_weights, y_weights: optional probability weights of the two samples.
    """
    check_choice(estimator, ("unbiased", "biased"), "estimator")
    k = as_points(kernel_matrix, "kernel_matrix", flatten=False)
    if k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"kernel_matrix must be a square (n + m, n + m) matrix, got shape {tuple(k.shape)}")
    total = k.shape[0]
    if isinstance(n_x, bool) or not isinstance(n_x, int) or not 0 < n_x < total:
        raise ValueError(f"n_x must be an integer with 0 < n_x < {total} (the matrix size), got {n_x!r}")
    n, m = n_x, total - n_x
    kd = k.double()
    a = as_weights(x_weights, n, "x_weights", kd)
    b = as_weights(y_weights, m, "y_weights", kd)
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=k.device) if a is None else a
    b = torch.full((m,), 1.0 / m, dtype=torch.float64, device=k.device) if b is None else b
    kxx, kyy, kxy = kd[:n, :n], kd[n:, n:], kd[:n, n:]
    xx, yy, xy = a @ kxx @ a, b @ kyy @ b, a @ kxy @ b
    if estimator == "unbiased":
        for name, size in (("x", n), ("y", m)):
            if size < 2:
                raise ValueError(f"{name} must have at least 2 points for the unbiased estimator, got {size}")
        xx = (xx - (a * a * kxx.diagonal()).sum()) / _off_diagonal_mass(a, "x_weights")
        yy = (yy - (b * b * kyy.diagonal()).sum()) / _off_diagonal_mass(b, "y_weights")
    return (xx + yy - 2.0 * xy).to(k.dtype)


def energy_distance(x, y, x_weights=None, y_weights=None, backend: str = "auto", exponent: float = 1.0) -> Tensor:
    """Energy distance :math:`\\sqrt{2E\\|X - Y\\|^a - E\\|X - X'\\|^a - E\\|Y - Y'\\|^a}` between empirical laws.

    Expectations are the (weighted) V-statistics over all pairs, diagonals included, so in 1-D this
    equals ``scipy.stats.energy_distance`` (with ``u_weights``/``v_weights``), and its square is
    ``dcor.energy_distance(x, y, exponent=a)``. It is the MMD with the distance kernel
    :math:`k(x, y) = -\\|x - y\\|^a` (:class:`~ipmcondense.ipm.kernels.EnergyKernel`), a metric between
    distributions with finite :math:`a`-th moment for :math:`0 < a < 2`. Clamped at 0 before the square
    root; zero gradient at 0. Returns a 0-d tensor of the inputs' promoted floating dtype (lists of Python
    floats are float64).

    Cost: one-dimensional points with ``exponent=1`` use the CDF formula of scipy,
    :math:`\\mathcal E^2 = 2 \\int (F_x - F_y)^2`, on the merged sorted samples: :math:`O((n + m)
    \\log(n + m))` time and memory, differentiable in the points and weights (``backend`` is then unused).
    Otherwise ``O((n + m)^2 d)`` time, ``O((n + m) d)`` memory with the tiled backend; squared distances
    are accurate even when norms dwarf the distances (see
    :func:`~ipmcondense.ipm.kernels.squared_distances`).
    """
    x, y, a, b, k = _prepare(x, y, EnergyKernel(exponent), None, backend, x_weights, y_weights)
    if x.shape[1] == 1 and k.exponent == 1.0:
        return safe_sqrt(2.0 * _cdf_l2_squared(x[:, 0], y[:, 0], a, b)).to(x.dtype)
    return safe_sqrt(_biased_mmd2(x, y, a, b, k, backend)).to(x.dtype)


def _cdf_l2_squared(u: Tensor, v: Tensor, a: Tensor | None, b: Tensor | None) -> Tensor:
    """:math:`\\int (F_u(t) - F_v(t))^2 dt` for weighted 1-D samples, in float64, in O((n+m) log(n+m))."""
    u, v = u.double(), v.double()
    a = torch.full_like(u, 1.0 / u.shape[0]) if a is None else a.double()
    b = torch.full_like(v, 1.0 / v.shape[0]) if b is None else b.double()
    merged, order = torch.sort(torch.cat((u, v)), stable=True)
    widths = merged[1:] - merged[:-1]
    from_u = order < u.shape[0]
    masses = torch.cat((a, b)).index_select(0, order)  # (plain indexing is ~1000x slower here)
    zero = torch.zeros_like(masses)
    # F_u and F_v just right of each merged point (ties have zero width, so their order does not matter)
    u_cdf = torch.cumsum(torch.where(from_u, masses, zero), 0)[:-1]
    v_cdf = torch.cumsum(torch.where(from_u, zero, masses), 0)[:-1]
    return ((u_cdf - v_cdf) ** 2 * widths).sum()


def mmd_witness(
    x, y, kernel: str | Kernel = "gaussian", bandwidth: float | str = "median", backend: str = "auto"
) -> Witness:
    """The MMD witness :math:`f^*(z) = \\frac1n \\sum_i k(z, x_i) - \\frac1m \\sum_j k(z, y_j)`.

    Unnormalised: :math:`f^* = \\hat\\mu_x - \\hat\\nu_y` in the RKHS, with
    :math:`\\|f^*\\|_{\\mathcal H} = \\mathrm{MMD}` (biased), so ``witness.mean_gap(x, y)`` equals the
    biased MMD² (:func:`mmd2` with ``estimator="biased"``) and :math:`f^* / \\mathrm{MMD}` is the unit-norm
    witness attaining the supremum. The bandwidth (``"median"``) is resolved once on the pooled
    sample. Evaluating the witness at ``k`` points costs ``O(k (n + m) d)``; it stays differentiable with
    respect to the query points and to ``x``, ``y``.
    """
    x, y, _, _, k = _prepare(x, y, kernel, bandwidth, backend, None, None)
    n, m = x.shape[0], y.shape[0]

    def witness(z: Tensor) -> Tensor:
        z = z.to(device=x.device, dtype=torch.promote_types(z.dtype, x.dtype))
        return (
            kernel_matvec(z, x, k, backend=backend) / n - kernel_matvec(z, y, k, backend=backend) / m
        )

    return Witness(witness, metric="mmd", dim=x.shape[1])
