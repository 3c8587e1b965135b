r"""Pairwise geometry shared by the kernels and the kernel sums: squared distances, the median heuristic.

:func:`squared_distances` computes :math:`\|x_i - y_j\|^2` by the Gram expansion
:math:`\|x\|^2 + \|y\|^2 - 2\langle x, y\rangle` around a common centre, and recomputes directly from the
coordinates the entries where that expansion cancels (:func:`cancelled_entries`), so distances stay accurate
when norms are large relative to the distances. :func:`median_bandwidth` is the median heuristic on the
pooled sample; :func:`safe_sqrt` a square root with a zero (sub)gradient at zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "squared_distances",
    "median_bandwidth",
    "safe_sqrt",
    "cancelled_entries",
    "direct_squared_distances",
    "MEDIAN_MAX_POINTS",
    "CANCELLATION_RATIO",
]


#: The median heuristic looks at no more than this many points, about 5e5 pairwise distances.
MEDIAN_MAX_POINTS = 1000


class _SafeSqrt(torch.autograd.Function):
    """``sqrt(max(v, 0))`` whose derivative is defined as 0 where the value is 0 (never inf/NaN)."""

    @staticmethod
    def forward(ctx, value: Tensor) -> Tensor:
        root = value.clamp_min(0).sqrt()
        ctx.save_for_backward(root)
        return root

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (root,) = ctx.saved_tensors
        safe = torch.where(root > 0, root, torch.ones_like(root))
        return torch.where(root > 0, grad / (2 * safe), torch.zeros_like(grad))


def safe_sqrt(value: Tensor) -> Tensor:
    """:math:`\\sqrt{\\max(v, 0)}` with gradient 0 (not inf or NaN) at :math:`v \\le 0`."""
    return _SafeSqrt.apply(value)


#: An entry whose GEMM value :math:`\|x\|^2 + \|y\|^2 - 2\langle x, y\rangle` is below
#: :math:`(\|x\|^2 + \|y\|^2) / 16` (centred norms) has lost more than ~4 bits to cancellation: it is
#: recomputed directly as :math:`\sum_k (x_k - y_k)^2`. Kept entries have a relative error of at most
#: ~16 roundings, so kernel values are as accurate as a cdist-style computation.
CANCELLATION_RATIO = 16.0
#: Entries recomputed directly per chunk (bounds the temporary memory to this many points pairs).
RECOMPUTE_CHUNK = 65_536


def _common_center(x: Tensor, y: Tensor) -> Tensor:
    """Detached mean of the pooled points; subtracting it reduces cancellation in |x|^2+|y|^2-2<x,y>."""
    with torch.no_grad():
        return (x.sum(0) + y.sum(0)) / (x.shape[0] + y.shape[0])


def cancelled_entries(d2: Tensor, x_sq: Tensor, y_sq: Tensor) -> Tensor:
    """``(K, 2)`` indices of the GEMM squared distances that cancellation has made inaccurate."""
    with torch.no_grad():
        return torch.nonzero(d2 * CANCELLATION_RATIO < x_sq[:, None] + y_sq[None, :])


def direct_squared_distances(x: Tensor, y: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    r""":math:`\|x_{r_k} - y_{c_k}\|^2` for listed pairs, summed coordinate-wise (no cancellation)."""
    parts = [
        ((x[rows[s : s + RECOMPUTE_CHUNK]] - y[cols[s : s + RECOMPUTE_CHUNK]]) ** 2).sum(1)
        for s in range(0, rows.shape[0], RECOMPUTE_CHUNK)
    ]
    return torch.cat(parts) if parts else x.new_zeros(0)


def squared_distances(x: Tensor, y: Tensor, *, snap_to_zero: bool = False) -> Tensor:
    r"""Dense matrix :math:`D_{ij} = \|x_i - y_j\|^2` of shape ``(n, m)``, differentiable.

    Computed with one GEMM as :math:`\|x_i\|^2 + \|y_j\|^2 - 2\langle x_i, y_j \rangle` after
    subtracting the pooled mean (distances are translation invariant; centring reduces cancellation),
    clamped at 0. Where cancellation still bites -- entries below :math:`(\|x_i\|^2 + \|y_j\|^2)/16`
    in centred norms, e.g. near-duplicates, or points far from the others (one far point pulls the mean) --
    the entry is recomputed directly from the original coordinates as :math:`\sum_k (x_{ik} - y_{jk})^2`,
    so the result is as accurate as ``scipy.spatial.distance.cdist`` whatever the norms, and duplicated
    points give exactly 0 (zero gradient through a square root). When ``y is x`` the diagonal is exactly
    0. ``snap_to_zero`` is accepted for compatibility; exact zeros no longer need it, so it changes
    nothing. Cost: ``O(nmd)`` time, ``O(nm)`` memory (plus ``O(Kd)`` for ``K`` recomputed entries).
    """
    del snap_to_zero  # exact zeros come from the direct recomputation
    center = _common_center(x, y)
    xc = x - center
    yc = xc if y is x else y - center
    x_sq = (xc * xc).sum(1)
    y_sq = x_sq if y is x else (yc * yc).sum(1)
    d2 = (torch.addmm(x_sq[:, None], xc, yc.T, beta=1.0, alpha=-2.0) + y_sq[None, :]).clamp_min(0.0)
    index = cancelled_entries(d2.detach(), x_sq.detach(), y_sq.detach())
    if index.shape[0]:
        rows, cols = index[:, 0], index[:, 1]
        d2 = d2.index_put((rows, cols), direct_squared_distances(x, y, rows, cols))
    if y is x:
        d2 = d2 - torch.diag_embed(d2.diagonal())
    return d2


def median_bandwidth(x: Tensor, y: Tensor | None = None) -> float:
    """Median heuristic: the median pairwise Euclidean distance of the pooled sample.

    With :math:`z = \\mathrm{concat}(x, y)` of :math:`N` points, returns the median of
    :math:`\\{\\|z_i - z_j\\| : i < j\\}` (the average of the two middle values when their number is even,
    as ``numpy.median``). When :math:`N > 1000` a deterministic subsample of 1000 evenly spaced indices
    of :math:`z` (``linspace(0, N - 1, 1000)``) is used, so the cost is at most ``O(10^6 d)``.

    Degenerate samples never give NaN or 0: if the median is 0 (more than half of the pairs are
    duplicates) the median of the non-zero distances is returned instead; if every distance is 0
    (all points identical, where every bandwidth gives the same, zero, discrepancy) the result is 1.0.
    The result is a Python float, detached from any autograd graph, computed in float64.
    """
    with torch.no_grad():
        z = x if y is None else torch.cat([x, y.to(x.dtype)], dim=0)
        z = z.detach().reshape(z.shape[0], -1).to(torch.float64)
        if z.shape[0] > MEDIAN_MAX_POINTS:
            index = torch.linspace(0, z.shape[0] - 1, MEDIAN_MAX_POINTS, device=z.device).round().long()
            z = z[index]
        if z.shape[0] < 2:
            return 1.0
        distances = torch.nn.functional.pdist(z)
        median = float(torch.quantile(distances, 0.5))
        if median > 0:
            return median
        nonzero = distances[distances > 0]
        if nonzero.numel() == 0:
            return 1.0
        return float(torch.quantile(nonzero, 0.5))
