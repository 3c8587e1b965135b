"""The kernel-sum engine: one narrow door to the dense, tiled and KeOps backends.

Every kernel distance reduces to two primitives, implemented here and nowhere else:

* :func:`kernel_sum` -- :math:`\\sum_{i,j} a_i b_j k(x_i, y_j)` as a float64 scalar;
* :func:`kernel_matvec` -- :math:`f(z_i) = \\sum_j b_j k(z_i, y_j)` (witness functions).

Backends (``backend=``):

``"dense"``
    The full Gram matrix with plain autograd: ``O(nmd)`` time, ``O(nm)`` memory.
``"tiled"``
    Pure torch, memory ``O(tile)`` in the forward *and* the backward pass. Tiles of
    256 x 2048 entries (cache-sized; for a symmetric self-sum only the upper triangle is computed:
    per 256-row block the diagonal square once and the tiles right of it counted twice, so
    :math:`K_{xx}` and :math:`K_{yy}` cost half their Gram products) are built with one GEMM each
    on augmented points, :math:`[x, \\|x\\|^2, 1] \\cdot [-2y, 1, \\|y\\|^2]^\\top = \\|x - y\\|^2`
    (centred; the right factor transposed once into contiguous memory), transformed in place and
    reduced (row sums in the input dtype, tile sums accumulated in float64). Entries that lost
    accuracy to cancellation are recomputed directly (see
    :func:`~ipmcondense.ipm.kernels.squared_distances`). A custom
    ``autograd.Function`` recomputes each tile in the backward pass and applies the analytic
    gradient (radial kernels: :math:`\\partial_{x_i} = 2 a_i \\sum_j b_j \\varphi'_{ij} (x_i - y_j)`;
    dot-product kernels: :math:`a_i \\sum_j b_j \\psi'_{ij} y_j`). Kernels of any other form are
    recomputed tile by tile under autograd (activation checkpointing), so memory stays bounded too.
    The analytic backward is first-order only (a second derivative raises an error; use ``dense``).
``"keops"``
    pykeops ``LazyTensor`` reductions (symbolic, linear memory; the fast choice on a GPU). pykeops is
    probed lazily, once; if it cannot be imported or its compiler fails, a warning is issued once and
    the tiled backend is used instead.
``"auto"``
    On the CPU ``dense`` when :math:`nm \\le 65536` (e.g. 256 x 256), else ``tiled``. On CUDA ``dense``
    when :math:`nm \\le 4 \\cdot 10^6`, else ``keops`` when usable, else ``tiled``.

Private module: the distances in :mod:`ipmcondense.ipm.mmd` are the public interface. Inputs are
assumed checked (finite, same dimension and dtype, weights valid) by the caller.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ._validation import check_choice
from ._keops import _keops_matvec, _keops_sum, keops_available  # noqa: F401
from .kernels import (
    CANCELLATION_RATIO,
    DotProductKernel,
    GaussianKernel,
    InverseMultiquadricKernel,
    Kernel,
    LinearKernel,
    MixtureKernel,
    RadialKernel,
    cancelled_entries,
    direct_squared_distances,
)

__all__ = ["BACKENDS", "kernel_sum", "kernel_matvec", "keops_available", "resolve_backend"]

BACKENDS = ("auto", "dense", "tiled", "keops")
#: ``auto`` uses the dense backend up to this many kernel entries on CUDA (16 MB in float32) ...
DENSE_MAX_ENTRIES = 4_000_000
#: ... and up to this many on the CPU, where the tiled backend is already as fast at 100 x 100 and
#: 2-10x faster from 300 x 300 on (it reuses one cache-sized buffer instead of allocating the Gram matrix;
#: measured on 2 cores, forward and forward+backward). Below it the dense path keeps second derivatives.
DENSE_MAX_ENTRIES_CPU = 65_536
#: Tile shape: 256 x 2048 float32 entries (2 MB) stay in this CPU's L2 cache (2 MB per core) through the
#: GEMM, the in-place kernel profile and the row sums; larger tiles spill and are up to 2x slower
#: (measured at N = 10,000, D = 64). ``SYMMETRIC_BLOCK`` is the row-block height of a symmetric self-sum.
TILE_ROWS = 256
TILE_COLS = 2048
SYMMETRIC_BLOCK = 256

def resolve_backend(backend: str, n: int, m: int, device: torch.device) -> str:
    """The concrete backend (``dense``/``tiled``/``keops``) that ``backend`` means for an ``n x m`` sum."""
    check_choice(backend, BACKENDS, "backend")
    if backend != "auto":
        return backend
    if n * m <= (DENSE_MAX_ENTRIES if device.type == "cuda" else DENSE_MAX_ENTRIES_CPU):
        return "dense"
    if device.type == "cuda" and keops_available():
        return "keops"
    return "tiled"


def _family(kernel: Kernel) -> str:
    if isinstance(kernel, RadialKernel) or (isinstance(kernel, MixtureKernel) and kernel.is_radial):
        return "radial"
    if isinstance(kernel, DotProductKernel):
        return "dot"
    return "generic"


def _flat_length_scale(kernel: Kernel) -> float | None:
    r"""Length scale :math:`h` with :math:`|\varphi'| \le 1 / (2h^2)` (Gaussian, IMQ, mixtures of them),
    or ``None`` when the profile is steep at 0 (square-root kernels) or unknown."""
    if isinstance(kernel, (GaussianKernel, InverseMultiquadricKernel)) and not isinstance(kernel.bandwidth, str):
        return float(kernel.bandwidth)
    if isinstance(kernel, MixtureKernel):
        scales = [_flat_length_scale(k) for k in kernel.kernels]
        if scales and all(h is not None for h in scales):
            return min(scales) / max(1.0, sum(kernel.weights)) ** 0.5  # type: ignore[type-var]
    return None


def _diagonal_offset(r0: int, r1: int, c0: int, c1: int) -> int | None:
    """Offset of the global diagonal ``i == j`` inside tile rows [r0, r1) x cols [c0, c1), if any."""
    return r0 - c0 if max(r0, c0) < min(r1, c1) else None


# --------------------------------------------------------------------------------------------------
# Public engine functions
# --------------------------------------------------------------------------------------------------


def kernel_sum(
    x: Tensor,
    y: Tensor,
    kernel: Kernel,
    x_weights: Tensor | None = None,
    y_weights: Tensor | None = None,
    *,
    exclude_diagonal: bool = False,
    backend: str = "auto",
) -> Tensor:
    """:math:`\\sum_{i,j} a_i b_j k(x_i, y_j)` as a 0-d float64 tensor, differentiable.

    Args:
        x, y: points ``(n, d)`` and ``(m, d)`` of one floating dtype.
        kernel: the kernel; a ``"median"`` bandwidth is resolved on ``(x, y)`` (resolve it on the
            pooled sample beforehand, as the distances do, to use one bandwidth for several sums).
        x_weights, y_weights: ``a`` and ``b``; ``None`` means all ones (a plain sum, not a mean).
        exclude_diagonal: drop the terms ``i == j`` (needs ``n == m``; the U-statistic).
        backend: ``"auto"``, ``"dense"``, ``"tiled"`` or ``"keops"`` (see the module docstring).

    When ``y is x`` (and ``y_weights is x_weights``) the sum is symmetric: the tiled backend computes
    only the upper triangle of tiles, and the distances ``|x_i - x_i|`` are exactly 0.
    Tile values are accumulated in float64 whatever the input dtype.
    """
    check_choice(backend, BACKENDS, "backend")
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel must be a Kernel module, got {type(kernel).__name__}")
    n, m = x.shape[0], y.shape[0]
    if exclude_diagonal and n != m:
        raise ValueError(f"exclude_diagonal needs as many x as y points, got {n} and {m}")
    kernel = kernel.resolved(x, y)
    if isinstance(kernel, LinearKernel):
        return _linear_sum(x, y, x_weights, y_weights, exclude_diagonal)
    chosen = resolve_backend(backend, n, m, x.device)
    if chosen == "keops":
        result = _keops_sum(kernel, x, y, x_weights, y_weights, exclude_diagonal)
        if result is not None:
            return result
        chosen = "tiled"
    if chosen == "dense":
        return _dense_sum(kernel, x, y, x_weights, y_weights, exclude_diagonal)
    return _tiled_sum(kernel, x, y, x_weights, y_weights, exclude_diagonal)


def kernel_matvec(
    z: Tensor, y: Tensor, kernel: Kernel, y_weights: Tensor | None = None, backend: str = "auto"
) -> Tensor:
    """:math:`f(z_i) = \\sum_j b_j k(z_i, y_j)` for every query point, shape ``(k,)``, differentiable.

    ``y_weights`` ``None`` means all ones. The kernel should already be resolved (a ``"median"``
    bandwidth would otherwise be taken from ``(z, y)``). The result has the dtype of ``z``/``y``
    (promoted); column tiles are accumulated in float64. Memory: ``O(k m)`` dense, ``O(tile)`` tiled.
    """
    check_choice(backend, BACKENDS, "backend")
    dtype = torch.promote_types(z.dtype, y.dtype)
    z, y = z.to(dtype), y.to(dtype)
    kernel = kernel.resolved(z, y)
    if isinstance(kernel, LinearKernel):
        mean = y.sum(0) if y_weights is None else y_weights @ y
        return z @ mean
    chosen = resolve_backend(backend, z.shape[0], y.shape[0], z.device)
    if chosen == "keops":
        result = _keops_matvec(kernel, z, y, y_weights)
        if result is not None:
            return result
        chosen = "tiled"
    if chosen == "dense":
        gram = kernel(z, y)
        return gram.sum(1) if y_weights is None else gram @ y_weights
    return _tiled_matvec(kernel, z, y, y_weights)


# --------------------------------------------------------------------------------------------------
# Linear kernel: closed form, every backend
# --------------------------------------------------------------------------------------------------


def _linear_sum(x: Tensor, y: Tensor, a: Tensor | None, b: Tensor | None, exclude: bool) -> Tensor:
    xd, yd = x.double(), y.double()
    sx = xd.sum(0) if a is None else a.double() @ xd
    sy = yd.sum(0) if b is None else b.double() @ yd
    total = sx @ sy
    if exclude:
        diag = (xd * yd).sum(1)
        if a is not None:
            diag = diag * a.double()
        if b is not None:
            diag = diag * b.double()
        total = total - diag.sum()
    return total


# --------------------------------------------------------------------------------------------------
# Dense backend
# --------------------------------------------------------------------------------------------------


def _weighted_total(rows: Tensor, a: Tensor | None) -> Tensor:
    rows = rows.double()
    return rows.sum() if a is None else rows @ a.double()


def _dense_sum(kernel: Kernel, x, y, a, b, exclude: bool) -> Tensor:
    gram = kernel(x, y)
    rows = gram.sum(1) if b is None else gram @ b
    total = _weighted_total(rows, a)
    if exclude:
        diag = gram.diagonal()
        if b is not None:
            diag = diag * b
        total = total - _weighted_total(diag, a)
    return total


# --------------------------------------------------------------------------------------------------
# Tiled backend
# --------------------------------------------------------------------------------------------------


class _TilePlan:
    """Everything one tiled sum needs: prepared points, the tile list and the per-tile kernel maths."""

    def __init__(self, kernel: Kernel, x: Tensor, y: Tensor, symmetric: bool, self_pairs: bool,
                 exclude: bool) -> None:
        self.kernel = kernel
        self.family = _family(kernel)
        self.symmetric = symmetric
        self.self_pairs = self_pairs
        self.exclude = exclude
        n, m = x.shape[0], y.shape[0]
        if symmetric:
            # Upper triangle only: per block of rows, the diagonal square once, the rest twice (symmetry).
            self.tiles = []
            for r0 in range(0, n, SYMMETRIC_BLOCK):
                r1 = min(r0 + SYMMETRIC_BLOCK, n)
                self.tiles.append((r0, r1, r0, r1, 1.0))
                self.tiles.extend((r0, r1, c0, min(c0 + TILE_COLS, n), 2.0) for c0 in range(r1, n, TILE_COLS))
            rows, cols = SYMMETRIC_BLOCK, max(SYMMETRIC_BLOCK, TILE_COLS)
        else:
            self.tiles = [
                (r0, min(r0 + TILE_ROWS, n), c0, min(c0 + TILE_COLS, m), 1.0)
                for r0 in range(0, n, TILE_ROWS)
                for c0 in range(0, m, TILE_COLS)
            ]
            rows, cols = TILE_ROWS, TILE_COLS
        self.buffer_size = min(rows, n) * min(cols, m)

    def prepare(self, x: Tensor, y: Tensor) -> None:
        """Centre (radial kernels) and precompute squared norms; detached."""
        x, y = x.detach(), y.detach()
        if self.family == "radial":
            center = (x.sum(0) + y.sum(0)) / (x.shape[0] + y.shape[0])
            self.x0, self.y0 = x, y
            self.xs = x - center
            self.ys = self.xs if self.self_pairs else y - center
            self.x_sq = (self.xs * self.xs).sum(1)
            self.y_sq = self.x_sq if self.self_pairs else (self.ys * self.ys).sum(1)
            # Tiles whose norms are small against the kernel's length scale cannot lose accuracy that
            # matters (|phi'| * rounding stays below ~16 ulp): they skip the cancellation check.
            scale = _flat_length_scale(self.kernel)
            self.check_limit = None if scale is None else 2.0 * CANCELLATION_RATIO * scale**2
            self.check_tiles = self.check_limit is None or (
                float(self.x_sq.max() + self.y_sq.max()) > self.check_limit
            )
            # One GEMM per tile gives the squared distances: [x, |x|^2, 1] . [-2y, 1, |y|^2]^T, with the
            # right factor transposed once into contiguous memory (no broadcast passes over the tile).
            ones_x = torch.ones_like(self.x_sq)[:, None]
            self.left = torch.cat((self.xs, self.x_sq[:, None], ones_x), dim=1)
            ones_y = torch.ones_like(self.y_sq)[:, None]
            self.right_t = torch.cat((-2.0 * self.ys, ones_y, self.y_sq[:, None]), dim=1).T.contiguous()
            # Gaussian kernel: fold -1/(2h^2) into the right factor, so the GEMM gives the exponent and the
            # profile is one in-place exp (not when tiles may need the cancellation repair, which reads d2).
            self.exponent_scale = None
            if type(self.kernel) is GaussianKernel and not self.check_tiles:
                self.exponent_scale = self.kernel._gamma()
                self.right_t.mul_(self.exponent_scale)
        else:
            self.xs, self.ys = x, y
        self.flat = torch.empty(self.buffer_size, dtype=x.dtype, device=x.device)

    def base(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Squared distances (radial; times the Gaussian exponent scale when it is folded in) or inner
        products (dot) of one tile, in the shared buffer."""
        out = self.flat[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        if self.family == "radial":
            torch.mm(self.left[r0:r1], self.right_t[:, c0:c1], out=out)
            if self.exponent_scale is None:
                out.clamp_min_(0.0)
            else:
                out.clamp_max_(0.0)  # scaled by a negative number
            self._repair_cancellation(out, r0, r1, c0, c1)
            offset = _diagonal_offset(r0, r1, c0, c1)
            if self.self_pairs and offset is not None:
                out.diagonal(offset).zero_()
        else:
            torch.mm(self.xs[r0:r1], self.ys[c0:c1].T, out=out)
        return out

    def _repair_cancellation(self, out: Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
        """Recompute directly the entries of a tile that cancellation made inaccurate (see
        :func:`~ipmcondense.ipm.kernels.squared_distances`); free when the tile's norms are small."""
        if not self.check_tiles:
            return
        x_sq, y_sq = self.x_sq[r0:r1], self.y_sq[c0:c1]
        if self.check_limit is not None and float(x_sq.max() + y_sq.max()) <= self.check_limit:
            return
        index = cancelled_entries(out, x_sq, y_sq)
        if index.shape[0]:
            rows, cols = index[:, 0], index[:, 1]
            out[rows, cols] = direct_squared_distances(self.x0, self.y0, rows + r0, cols + c0)

    def tile_value(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        base = self.base(r0, r1, c0, c1)
        if self.family == "radial":
            value = base.exp_() if self.exponent_scale is not None else self.kernel.profile_(base)
        else:
            value = self.kernel.dot_profile(base)
        self._exclude(value, r0, r1, c0, c1)
        return value

    def tile_value_and_slope(self, r0, r1, c0, c1) -> tuple[Tensor, Tensor, float]:
        base = self.base(r0, r1, c0, c1)
        if self.family == "radial" and self.exponent_scale is not None:
            value = base.exp_()
            slope, scale = value, self.exponent_scale
        elif self.family == "radial":
            value, slope, scale = self.kernel.profile_and_slope(base)
        else:
            value, slope, scale = self.kernel.dot_profile_and_slope(base)
        self._exclude(value, r0, r1, c0, c1)
        self._exclude(slope, r0, r1, c0, c1)
        return value, slope, scale

    def _exclude(self, tile: Tensor, r0, r1, c0, c1) -> None:
        offset = _diagonal_offset(r0, r1, c0, c1)
        if self.exclude and offset is not None:
            tile.diagonal(offset).zero_()


class _TiledKernelSum(torch.autograd.Function):
    """Tiled :math:`\\sum_{ij} a_i b_j k(x_i, y_j)` with an analytic, tile-by-tile backward."""

    @staticmethod
    def forward(ctx, x, y, a, b, plan: _TilePlan):  # noqa: D102
        ctx.plan = plan
        ctx.save_for_backward(x, y, a, b)
        plan.prepare(x, y)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for r0, r1, c0, c1, mult in plan.tiles:
            value = plan.tile_value(r0, r1, c0, c1)
            rows = value.sum(1) if b is None else value @ b[c0:c1]
            part = _weighted_total(rows, None if a is None else a[r0:r1])
            total.add_(part, alpha=mult)
        plan.flat = plan.xs = plan.ys = plan.x0 = plan.y0 = plan.left = plan.right_t = None  # rebuilt by the backward pass: hold no copies meanwhile
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # noqa: D102
        x, y, a, b = ctx.saved_tensors
        plan: _TilePlan = ctx.plan
        need_x, need_y, need_a, need_b = ctx.needs_input_grad[:4]
        g = float(grad_output)
        plan.prepare(x, y)
        acc = dict(dtype=torch.float64, device=x.device)
        grad_x = torch.zeros(x.shape, **acc) if (need_x or need_y and plan.symmetric) else None
        grad_a = torch.zeros(x.shape[0], **acc) if a is not None and (need_a or need_b and plan.symmetric) else None
        if plan.symmetric:
            grad_y, grad_b = grad_x, grad_a
        else:
            grad_y = torch.zeros(y.shape, **acc) if need_y else None
            grad_b = torch.zeros(y.shape[0], **acc) if b is not None and need_b else None
        xs, ys = plan.xs, plan.ys
        x_scaled = xs if a is None else xs * a[:, None]
        y_scaled = ys if b is None else ys * b[:, None]
        radial = plan.family == "radial"
        for r0, r1, c0, c1, mult in plan.tiles:
            a_i = None if a is None else a[r0:r1]
            b_j = None if b is None else b[c0:c1]
            value, slope, scale = plan.tile_value_and_slope(r0, r1, c0, c1)
            coef = (2.0 if radial else 1.0) * scale * mult * g
            if grad_x is not None:
                gx = slope @ y_scaled[c0:c1]
                if radial:
                    row_mass = slope.sum(1) if b_j is None else slope @ b_j
                    gx = xs[r0:r1] * row_mass[:, None] - gx
                if a_i is not None:
                    gx = gx * a_i[:, None]
                grad_x[r0:r1].add_(gx, alpha=coef)
            if grad_y is not None:
                gy = slope.T @ x_scaled[r0:r1]
                if radial:
                    col_mass = slope.sum(0) if a_i is None else slope.T @ a_i
                    gy = ys[c0:c1] * col_mass[:, None] - gy
                if b_j is not None:
                    gy = gy * b_j[:, None]
                grad_y[c0:c1].add_(gy, alpha=coef)
            if grad_a is not None:
                grad_a[r0:r1].add_(value.sum(1) if b_j is None else value @ b_j, alpha=mult * g)
            if grad_b is not None:
                grad_b[c0:c1].add_(value.sum(0) if a_i is None else value.T @ a_i, alpha=mult * g)
        plan.flat = plan.xs = plan.ys = plan.x0 = plan.y0 = plan.left = plan.right_t = None

        def cast(t: Tensor | None, like: Tensor | None) -> Tensor | None:
            return None if t is None or like is None else t.to(like.dtype)

        if plan.symmetric:
            return cast(grad_x, x), None, cast(grad_a, a), None, None
        return cast(grad_x, x), cast(grad_y, y), cast(grad_a, a), cast(grad_b, b), None


def _tiled_sum(kernel: Kernel, x, y, a, b, exclude: bool) -> Tensor:
    symmetric = y is x and (b is a)
    if _family(kernel) == "generic":
        return _checkpointed_sum(kernel, x, y, a, b, exclude)
    plan = _TilePlan(kernel, x, y, symmetric=symmetric, self_pairs=y is x, exclude=exclude)
    if symmetric:
        return _TiledKernelSum.apply(x, x, a, a, plan)
    return _TiledKernelSum.apply(x, y, a, b, plan)


def _needs_autograd(kernel: Kernel, *tensors: Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    if any(t is not None and t.requires_grad for t in tensors):
        return True
    return any(p.requires_grad for p in kernel.parameters())


def _run_tiles(fn: Callable[..., Tensor], tracked: bool, *args) -> Tensor:
    if tracked:
        return checkpoint(fn, *args, use_reentrant=False)
    with torch.no_grad():
        return fn(*args)


def _checkpointed_sum(kernel: Kernel, x, y, a, b, exclude: bool) -> Tensor:
    """Any kernel: tile by tile, each tile recomputed under autograd in the backward pass."""
    tracked = _needs_autograd(kernel, x, y, a, b)

    def tile_sum(x_i: Tensor, y_j: Tensor, a_i, b_j, offset: int | None) -> Tensor:
        gram = kernel(x_i, y_j)
        if exclude and offset is not None:
            mask = torch.ones_like(gram)
            mask.diagonal(offset).zero_()
            gram = gram * mask
        rows = gram.sum(1) if b_j is None else gram @ b_j
        return _weighted_total(rows, a_i)

    total = torch.zeros((), dtype=torch.float64, device=x.device)
    n, m = x.shape[0], y.shape[0]
    for r0 in range(0, n, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, n)
        for c0 in range(0, m, TILE_COLS):
            c1 = min(c0 + TILE_COLS, m)
            a_i = None if a is None else a[r0:r1]
            b_j = None if b is None else b[c0:c1]
            offset = _diagonal_offset(r0, r1, c0, c1)
            total = total + _run_tiles(tile_sum, tracked, x[r0:r1], y[c0:c1], a_i, b_j, offset)
    return total


def _tiled_matvec(kernel: Kernel, z: Tensor, y: Tensor, b: Tensor | None) -> Tensor:
    tracked = _needs_autograd(kernel, z, y, b)

    def block(z_i: Tensor, y_j: Tensor, b_j: Tensor | None) -> Tensor:
        gram = kernel(z_i, y_j)
        return (gram.sum(1) if b_j is None else gram @ b_j).double()

    out = []
    for r0 in range(0, z.shape[0], TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, z.shape[0])
        acc = None
        for c0 in range(0, y.shape[0], TILE_COLS):
            c1 = min(c0 + TILE_COLS, y.shape[0])
            b_j = None if b is None else b[c0:c1]
            part = _run_tiles(block, tracked, z[r0:r1], y[c0:c1], b_j)
            acc = part if acc is None else acc + part
        out.append(acc)
    return torch.cat(out).to(z.dtype)
