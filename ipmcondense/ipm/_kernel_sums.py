"""The kernel-sum engine: one narrow door to the dense, tiled and KeOps backends.

Every kernel distance reduces to two primitives, implemented here and nowhere else:

* :func:`kernel_sum` -- :math:`\\sum_{i,j} a_i b_j k(x_i, y_j)` as a float64 scalar;
* :func:`kernel_matvec` -- :math:`f(z_i) = \\sum_j b_j k(z_i, y_j)` (witness functions).

Backends (``backend=``):

``"dense"``
    The full Gram matrix with plain autograd: ``O(nmd)`` time, ``O(nm)`` memory.
``"tiled"``
    Pure torch, memory ``O(tile)`` beyond ``O((n + m) d)`` for the points and their gradients. Tiles
    of 256 x 2048 entries per torch thread (cache-sized; for a symmetric self-sum only the upper triangle is computed:
    per 256-row block the diagonal square once and the tiles right of it counted twice, so
    :math:`K_{xx}` and :math:`K_{yy}` cost half their Gram products) are built with one GEMM each
    on augmented points, :math:`[x, \\|x\\|^2, 1] \\cdot [-2y, 1, \\|y\\|^2]^\\top = \\|x - y\\|^2`
    (centred; the right factor transposed once into contiguous memory), transformed in place and
    reduced (row sums in the input dtype, tile sums accumulated in float64). Entries that lost
    accuracy to cancellation are recomputed directly (see
    :func:`~ipmcondense.ipm.kernels.squared_distances`). A custom
    ``autograd.Function`` applies the analytic gradient (radial kernels:
    :math:`\\partial_{x_i} = 2 a_i \\sum_j b_j \\varphi'_{ij} (x_i - y_j)`; dot-product kernels:
    :math:`a_i \\sum_j b_j \\psi'_{ij} y_j`), built in the same sweep over the tiles as the value when
    autograd records (the sum is a scalar: the backward pass only scales it by ``grad_output``), so no
    tile is computed twice; a forward pass under autograd whose result is never differentiated pays
    for the gradient GEMMs all the same (call it under ``torch.no_grad()``). Kernels of any other form are
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
from .pairwise import RECOMPUTE_CHUNK

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
#: With several torch threads the columns are multiplied by their number (see ``_tile_shape``).
TILE_ROWS = 256
TILE_COLS = 2048
SYMMETRIC_BLOCK = 256
#: Column-gradient GEMMs accumulate in the input dtype over this many row blocks, then in float64.
FLUSH_BLOCKS = 8


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


def _tile_shape() -> tuple[int, int, int]:
    """``(rows, cols, symmetric block)`` of the tiles: the cache-sized shape per thread, the columns
    multiplied by the number of torch threads. Every GEMM and every elementwise pass over a tile is one
    OpenMP parallel region ending in a barrier, whose cost is a thread wake-up: ~10 us on idle cores, a
    scheduler time slice (measured 10-20 ms) when other processes hold the cores. Wider tiles keep each
    thread's share cache-sized and open fewer regions per sum."""
    threads = max(1, torch.get_num_threads())
    return TILE_ROWS, TILE_COLS * threads, SYMMETRIC_BLOCK


class _TilePlan:
    """Everything one tiled sum needs: prepared points, the tile list and the per-tile kernel maths."""

    def __init__(self, kernel: Kernel, x: Tensor, y: Tensor, symmetric: bool, self_pairs: bool,
                 exclude: bool) -> None:
        self.kernel = kernel
        self.family = _family(kernel)
        self.symmetric = symmetric
        self.self_pairs = self_pairs
        self.exclude = exclude
        self.exponent_scale = None
        #: whether autograd was recording when the sum was called (inside ``forward`` it is always off)
        self.grad_enabled = torch.is_grad_enabled()
        n, m = x.shape[0], y.shape[0]
        tile_rows, tile_cols, block = _tile_shape()
        if symmetric:
            # Upper triangle only: per block of rows, the diagonal square once, the rest twice (symmetry).
            self.tiles = []
            for r0 in range(0, n, block):
                r1 = min(r0 + block, n)
                self.tiles.append((r0, r1, r0, r1, 1.0))
                self.tiles.extend((r0, r1, c0, min(c0 + tile_cols, n), 2.0) for c0 in range(r1, n, tile_cols))
            rows, cols = block, max(block, tile_cols)
        else:
            self.tiles = [
                (r0, min(r0 + tile_rows, n), c0, min(c0 + tile_cols, m), 1.0)
                for r0 in range(0, n, tile_rows)
                for c0 in range(0, m, tile_cols)
            ]
            rows, cols = tile_rows, tile_cols
        self.max_rows, self.max_cols = min(rows, n), min(cols, m)
        self.buffer_size = self.max_rows * self.max_cols

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

    def release(self) -> None:
        """Drop the prepared copies (a plan is kept by autograd until the backward pass)."""
        self.flat = self.xs = self.ys = self.x0 = self.y0 = self.left = self.right_t = None
        self.x_sq = self.y_sq = None

    def base(self, r0: int, r1: int, c0: int, c1: int) -> tuple[Tensor, Tensor | None]:
        """Squared distances (radial; times the Gaussian exponent scale when it is folded in) or inner
        products (dot) of one tile, in the shared buffer, and the ``(K, 2)`` tile-local indices of the
        entries recomputed directly (``None`` when none were)."""
        out = self.flat[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        repaired = None
        if self.family == "radial":
            torch.mm(self.left[r0:r1], self.right_t[:, c0:c1], out=out)
            if self.exponent_scale is None:
                out.clamp_min_(0.0)
            else:
                out.clamp_max_(0.0)  # scaled by a negative number
            repaired = self._repair_cancellation(out, r0, r1, c0, c1)
            offset = _diagonal_offset(r0, r1, c0, c1)
            if self.self_pairs and offset is not None:
                out.diagonal(offset).zero_()
        else:
            torch.mm(self.xs[r0:r1], self.ys[c0:c1].T, out=out)
        return out, repaired

    def _repair_cancellation(self, out: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor | None:
        """Recompute directly the entries of a tile that cancellation made inaccurate (see
        :func:`~ipmcondense.ipm.kernels.squared_distances`); free when the tile's norms are small."""
        if not self.check_tiles:
            return None
        x_sq, y_sq = self.x_sq[r0:r1], self.y_sq[c0:c1]
        if self.check_limit is not None and float(x_sq.max() + y_sq.max()) <= self.check_limit:
            return None
        index = cancelled_entries(out, x_sq, y_sq)
        if not index.shape[0]:
            return None
        rows, cols = index[:, 0], index[:, 1]
        out[rows, cols] = direct_squared_distances(self.x0, self.y0, rows + r0, cols + c0)
        return index

    def tile_value(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        base, _ = self.base(r0, r1, c0, c1)
        if self.family == "radial":
            value = base.exp_() if self.exponent_scale is not None else self.kernel.profile_(base)
        else:
            value = self.kernel.dot_profile(base)
        self._exclude(value, r0, r1, c0, c1)
        return value

    def tile_value_and_slope(self, r0, r1, c0, c1) -> tuple[Tensor, Tensor, float, Tensor | None]:
        """``(value, slope, scale, repaired)``: the kernel tile, its derivative ``slope * scale`` in
        the squared distance (radial) or inner product (dot), and the directly recomputed entries.
        ``slope`` may be ``value`` itself (Gaussian)."""
        base, repaired = self.base(r0, r1, c0, c1)
        if self.family == "radial" and self.exponent_scale is not None:
            value = base.exp_()
            slope, scale = value, self.exponent_scale
        elif self.family == "radial":
            value, slope, scale = self.kernel.profile_and_slope(base)
        else:
            value, slope, scale = self.kernel.dot_profile_and_slope(base)
        self._exclude(value, r0, r1, c0, c1)
        if slope is not value:
            self._exclude(slope, r0, r1, c0, c1)
        return value, slope, scale, repaired

    def _exclude(self, tile: Tensor, r0, r1, c0, c1) -> None:
        offset = _diagonal_offset(r0, r1, c0, c1)
        if self.exclude and offset is not None:
            tile.diagonal(offset).zero_()


def _augmented(points: Tensor, weights: Tensor | None) -> Tensor:
    """``[w * p, w]`` (``w`` all ones when ``None``): one GEMM with a kernel-slope tile gives both the
    weighted point sums and the weighted slope mass of every row."""
    if weights is None:
        return torch.cat((points, torch.ones_like(points[:, :1])), dim=1)
    w = weights.detach().to(points.dtype)[:, None]
    return torch.cat((points * w, w), dim=1)


class _TiledKernelSum(torch.autograd.Function):
    """Tiled :math:`\\sum_{ij} a_i b_j k(x_i, y_j)`; the gradient is built in the same sweep over the
    tiles as the value (when autograd records), so no tile is computed twice.

    The sum is a scalar, so its gradient is ``grad_output`` times the gradient of the sum: the forward
    pass accumulates the latter (``O((n + m) d)`` memory, float64) while each tile is in cache, and the
    backward pass only scales it. Radial kernels,
    :math:`\\partial_{x_i} = 2 a_i \\sum_j b_j \\varphi'_{ij} (x_i - y_j)`: one GEMM of the slope tile
    with ``[b y, b]`` gives :math:`\\sum_j b_j \\varphi'_{ij} y_j` and the mass
    :math:`\\sum_j b_j \\varphi'_{ij}` together (for the Gaussian, whose slope is its value, that mass is
    also the forward row sum). Entries recomputed directly for cancellation get their gradient terms
    directly too, :math:`b_j \\varphi'_{ij} (x_i - y_j)` from the original coordinates, so a point far
    from the others does not cost the near ones their gradient's accuracy. Dot-product kernels:
    :math:`a_i \\sum_j b_j \\psi'_{ij} y_j`.
    """

    @staticmethod
    def forward(ctx, x, y, a, b, plan: _TilePlan):  # noqa: D102
        needs = ctx.needs_input_grad[:4] if plan.grad_enabled else (False,) * 4
        need_x, need_y, need_a, need_b = needs
        ctx.plan_dtypes = (x.dtype, y.dtype, None if a is None else a.dtype, None if b is None else b.dtype)
        ctx.symmetric = plan.symmetric
        ctx.grads = (None, None, None, None)
        plan.prepare(x, y)
        try:
            if any(needs):
                total, ctx.grads = _value_and_gradients(plan, x, y, a, b, need_x, need_y, need_a, need_b)
            else:
                total = _value_only(plan, a, b)
        finally:
            plan.release()
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # noqa: D102
        g = grad_output.to(torch.float64)

        def scaled(t: Tensor | None, dtype) -> Tensor | None:
            return None if t is None or dtype is None else (t * g).to(dtype)

        grad_x, grad_y, grad_a, grad_b = ctx.grads
        x_dtype, y_dtype, a_dtype, b_dtype = ctx.plan_dtypes
        if ctx.symmetric:
            return scaled(grad_x, x_dtype), None, scaled(grad_a, a_dtype), None, None
        return (scaled(grad_x, x_dtype), scaled(grad_y, y_dtype), scaled(grad_a, a_dtype),
                scaled(grad_b, b_dtype), None)


def _value_only(plan: _TilePlan, a: Tensor | None, b: Tensor | None) -> Tensor:
    total = torch.zeros((), dtype=torch.float64, device=plan.flat.device)
    for r0, r1, c0, c1, mult in plan.tiles:
        value = plan.tile_value(r0, r1, c0, c1)
        rows = value.sum(1) if b is None else value @ b[c0:c1]
        total.add_(_weighted_total(rows, None if a is None else a[r0:r1]), alpha=mult)
    return total


def _gaussian_value_and_gradients(plan: _TilePlan, x, y, a, b, need_x, need_y, need_a, need_b):
    """The common case in one sweep (Gaussian, exponent folded, no tile needing the repair, gradient
    w.r.t. the row points wanted): two passes over each tile (exp, then the clamp-free GEMMs), no
    separate sums. The slope of the Gaussian is its value, so ``value @ [b y, b]`` gives the gradient
    terms and the row sums at once; those GEMMs accumulate in place (``addmm_``) over a row block (rows)
    and over ``FLUSH_BLOCKS`` row blocks (columns) in the input dtype before being added in float64."""
    dim = x.shape[1]
    acc = dict(dtype=torch.float64, device=x.device)
    col_grad = need_y or plan.symmetric
    row_acc = torch.zeros(x.shape[0], dim + 1, **acc)
    col_acc = (row_acc if plan.symmetric else torch.zeros(y.shape[0], dim + 1, **acc)) if col_grad else None
    right = _augmented(plan.ys, b)  # [b y, b]
    left = _augmented(plan.xs, a) if col_grad else None  # [a x, a]
    row_buf = x.new_empty(plan.max_rows, dim + 1)
    col_buf = x.new_zeros(y.shape[0], dim + 1) if col_grad else None
    block, blocks_done = None, 0
    for r0, r1, c0, c1, mult in plan.tiles:
        if block != (r0, r1):
            if block is not None:
                row_acc[block[0] : block[1]].add_(row_buf[: block[1] - block[0]])
                blocks_done += 1
                if col_buf is not None and blocks_done % FLUSH_BLOCKS == 0:
                    col_acc.add_(col_buf)
                    col_buf.zero_()
            block, beta = (r0, r1), 0.0
        else:
            beta = 1.0
        value = plan.tile_value(r0, r1, c0, c1)
        row_buf[: r1 - r0].addmm_(value, right[c0:c1], beta=beta, alpha=mult)
        if col_buf is not None:
            col_buf[c0:c1].addmm_(value.T, left[r0:r1], alpha=mult)
    if block is not None:
        row_acc[block[0] : block[1]].add_(row_buf[: block[1] - block[0]])
    if col_buf is not None:
        col_acc.add_(col_buf)
    # row_acc[i] = sum_j mult b_j k_ij [y_j, 1] (a symmetric sum: its rows and columns, so twice)
    mass = row_acc[:, dim]
    total = (mass.sum() if a is None else mass @ a.detach().double()) / (2.0 if plan.symmetric else 1.0)
    scale = 2.0 * plan.exponent_scale

    def point_grad(points, gemm_acc, weights):
        grad = (points.double() * gemm_acc[:, dim:] - gemm_acc[:, :dim]).mul_(scale)
        return grad if weights is None else grad * weights.detach().double()[:, None]

    grad_x = point_grad(plan.xs, row_acc, a) if need_x or plan.symmetric else None
    grad_a = mass.clone() if a is not None and (need_a or plan.symmetric and need_b) else None
    if plan.symmetric:
        return total, (grad_x, None, grad_a, None)
    grad_y = point_grad(plan.ys, col_acc, b) if need_y else None
    grad_b = col_acc[:, dim].clone() if b is not None and need_b else None
    return total, (grad_x, grad_y, grad_a if need_a else None, grad_b)


def _value_and_gradients(plan: _TilePlan, x, y, a, b, need_x, need_y, need_a, need_b):
    """One sweep over the tiles: the sum and the gradients of the sum (float64)."""
    if plan.exponent_scale is not None and (need_x or plan.symmetric and need_y) and (
        not need_b or plan.symmetric or need_y
    ):
        return _gaussian_value_and_gradients(plan, x, y, a, b, need_x, need_y, need_a, need_b)
    acc = dict(dtype=torch.float64, device=x.device)
    radial = plan.family == "radial"
    dim = x.shape[1]
    # Gradient w.r.t. the row points (x) from each tile, and w.r.t. the column points (y) from its
    # transpose; a symmetric sum needs both, into the same accumulator.
    row_grad = need_x or (need_y and plan.symmetric)
    col_grad = need_y or (need_x and plan.symmetric)
    row_acc = torch.zeros(x.shape[0], dim + 1, **acc) if row_grad else None
    col_acc = (row_acc if plan.symmetric else torch.zeros(y.shape[0], dim + 1, **acc)) if col_grad else None
    direct_rows = direct_cols = None  # gradient terms of directly recomputed entries (lazily allocated)
    row_weight_grad = need_a or (need_b and plan.symmetric)
    col_weight_grad = need_b or (need_a and plan.symmetric)
    grad_a = torch.zeros(x.shape[0], **acc) if a is not None and row_weight_grad else None
    grad_b = (grad_a if plan.symmetric else torch.zeros(y.shape[0], **acc)) if b is not None and col_weight_grad else None
    right = _augmented(plan.ys, b) if row_grad else None  # [b y, b]
    left = _augmented(plan.xs, a) if col_grad else None  # [a x, a]
    row_buf = x.new_empty(plan.max_rows, dim + 1) if row_grad else None
    col_buf = x.new_empty(plan.max_cols, dim + 1) if col_grad else None
    total = torch.zeros((), **acc)
    for r0, r1, c0, c1, mult in plan.tiles:
        a_i = None if a is None else a[r0:r1]
        b_j = None if b is None else b[c0:c1]
        value, slope, scale, repaired = plan.tile_value_and_slope(r0, r1, c0, c1)
        # The value's row (column) sums come free from the gradient GEMM when the slope is the value.
        free_rows = slope is value and row_grad and repaired is None
        free_cols = slope is value and col_grad and repaired is None
        rows = cols = None
        if not free_rows and (grad_a is not None or not free_cols):
            rows = value.sum(1) if b_j is None else value @ b_j
        if grad_b is not None and not free_cols:
            cols = value.sum(0) if a_i is None else value.T @ a_i
        if repaired is not None:
            flagged = slope[repaired[:, 0], repaired[:, 1]]
            slope[repaired[:, 0], repaired[:, 1]] = 0.0  # their terms are added directly below
        if row_grad:
            gemm = torch.mm(slope, right[c0:c1], out=row_buf[: r1 - r0])
            row_acc[r0:r1].add_(gemm, alpha=scale * mult)
            if free_rows:
                rows = gemm[:, dim]
        if col_grad:
            gemm_t = torch.mm(slope.T, left[r0:r1], out=col_buf[: c1 - c0])
            col_acc[c0:c1].add_(gemm_t, alpha=scale * mult)
            if free_cols:
                cols = gemm_t[:, dim]
        if rows is not None:
            total.add_(_weighted_total(rows, a_i), alpha=mult)
        else:
            total.add_(_weighted_total(cols, b_j), alpha=mult)
        if grad_a is not None:
            grad_a[r0:r1].add_(rows, alpha=mult)
        if grad_b is not None:
            grad_b[c0:c1].add_(cols, alpha=mult)
        if repaired is not None and (row_grad or col_grad):
            if direct_rows is None and direct_cols is None:
                direct_rows = torch.zeros(x.shape[0], dim, **acc) if row_grad else None
                direct_cols = (direct_rows if plan.symmetric else torch.zeros(y.shape[0], dim, **acc)) if col_grad else None
            _direct_terms(plan, repaired, flagged * (scale * mult), r0, c0, a, b, direct_rows, direct_cols)
    grad_x = grad_y = None
    for points, weights, gemm_acc, direct, wanted in (
        (plan.xs, a, row_acc, direct_rows, need_x or plan.symmetric),
        (plan.ys, b, col_acc, direct_cols, need_y and not plan.symmetric),
    ):
        if gemm_acc is None or not wanted:
            continue
        if radial:
            # sum_j b_j phi'_ij (x_i - y_j) = x_i * mass_i - sum_j b_j phi'_ij y_j (centred coordinates)
            grad = points.double() * gemm_acc[:, dim:] - gemm_acc[:, :dim]
            if direct is not None:
                grad.add_(direct)
            grad.mul_(2.0)
        else:
            grad = gemm_acc[:, :dim]
        if weights is not None:
            grad = grad * weights.detach().double()[:, None]
        if points is plan.xs:
            grad_x = grad
        else:
            grad_y = grad
    if plan.symmetric:
        return total, (grad_x, None, grad_a, None)
    return total, (grad_x if need_x else None, grad_y, grad_a if need_a else None, grad_b if need_b else None)


def _direct_terms(plan: _TilePlan, index: Tensor, coef: Tensor, r0: int, c0: int, a, b,
                  direct_rows: Tensor | None, direct_cols: Tensor | None) -> None:
    """Gradient terms of the directly recomputed entries, from the original coordinates:
    ``coef_k b_j (x_i - y_j)`` into the row ``i``, ``coef_k a_i (y_j - x_i)`` into the column ``j``."""
    rows_all, cols_all = index[:, 0] + r0, index[:, 1] + c0
    for s in range(0, rows_all.shape[0], RECOMPUTE_CHUNK):
        rows, cols = rows_all[s : s + RECOMPUTE_CHUNK], cols_all[s : s + RECOMPUTE_CHUNK]
        diff = (plan.x0[rows] - plan.y0[cols]).double()
        weight = coef[s : s + RECOMPUTE_CHUNK].double()
        if direct_rows is not None:
            w = weight if b is None else weight * b.detach()[cols].double()
            direct_rows.index_add_(0, rows, diff * w[:, None])
        if direct_cols is not None:
            w = weight if a is None else weight * a.detach()[rows].double()
            direct_cols.index_add_(0, cols, diff * (-w)[:, None])


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
