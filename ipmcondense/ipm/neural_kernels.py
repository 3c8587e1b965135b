"""Kernels defined by neural networks: infinite-width NNGP/NTK, empirical NTK, random features.

These are the kernels of kernel-regression condensation (KIP, Nguyen et al. 2021; RFAD, Loo et al.
2022, see :mod:`ipmcondense.ipm.kernel_regression`). Each is a :class:`~ipmcondense.ipm.kernels.Kernel`,
so it also defines an MMD: ``mmd2(x, y, kernel=FullyConnectedNTK(depth=3))``.

* :class:`FullyConnectedNNGP`, :class:`FullyConnectedNTK`: closed forms of a fully connected ReLU
  network of infinite width (arc-cosine recursions of Cho & Saul 2009, Jacot et al. 2018,
  Lee et al. 2019), in the NTK parameterisation of ``neural_tangents.stax``.
* :class:`ConvNetNNGP`, :class:`ConvNetNTK`: closed forms of KIP's infinitely wide ConvNet
  (Nguyen et al. 2021, "Dataset distillation with infinitely wide convolutional networks"): 3x3
  ``SAME`` convolutions, ReLU, 2x2 average pooling and a flatten or global-average readout, computed by
  the position-pair covariance recursion of neural-tangents' ``stax`` (Novak et al. 2019; Arora et al.
  2019). Each pair of images carries :math:`(HW)^2` entries: time and memory :math:`O(nm(HW)^2)`,
  computed in checkpointed blocks; practical on CPU for 8x8 images, GPU-sized beyond.
* :func:`empirical_ntk`, :class:`EmpiricalNTK`: the finite-width tangent kernel
  :math:`\\Theta(x, x') = J_\\theta f(x) J_\\theta f(x')^\\top` of a given network (``torch.func``).
* :class:`RandomFeatureNNGP`: :math:`\\langle \\phi(x), \\phi(x') \\rangle` with :math:`\\phi` the scaled
  concatenated embeddings of several random networks (the RFAD estimate of a ConvNet NNGP).

This module is in the math layer: networks are passed in (a module, or a factory), never imported.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import as_point_pair, check_positive
from .kernels import Kernel

__all__ = [
    "FullyConnectedNNGP",
    "FullyConnectedNTK",
    "empirical_ntk",
    "EmpiricalNTK",
    "RandomFeatureNNGP",
    "ConvNetNNGP",
    "ConvNetNTK",
    "CONV_READOUTS",
    "gaussian_init_",
    "OUTPUT_REDUCTIONS",
]

from ._finite_width import OUTPUT_REDUCTIONS, EmpiricalNTK, RandomFeatureNNGP, empirical_ntk, gaussian_init_  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Infinite-width fully connected ReLU networks
# --------------------------------------------------------------------------------------------------


class _SafeArccos(torch.autograd.Function):
    """``arccos(c)`` for ``c`` in [-1, 1] whose derivative :math:`-1/\\sqrt{1 - c^2}` stays finite.

    Where :math:`1 - c^2` is below the dtype's machine epsilon (a pair of coincident or antipodal
    points, where the correlation's own derivative vanishes) the derivative is bounded by
    :math:`1/\\sqrt{\\epsilon}`, so that the product with the (rounding-level) derivative of the
    correlation stays at rounding level instead of becoming ``inf * 0 = NaN``.
    """

    @staticmethod
    def forward(ctx, c: Tensor) -> Tensor:
        ctx.save_for_backward(c)
        return torch.arccos(c)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (c,) = ctx.saved_tensors
        eps = torch.finfo(c.dtype).eps
        return -grad * torch.rsqrt((1.0 - c * c).clamp_min(eps))


class _ArccosOne(torch.autograd.Function):
    """:math:`J_1(c) = \\sqrt{1 - c^2} + (\\pi - \\arccos c)\\, c` with the exact derivative
    :math:`J_1'(c) = \\pi - \\arccos c` (finite at :math:`c = \\pm 1`, where autograd of the
    expression would give ``inf - inf``)."""

    @staticmethod
    def forward(ctx, c: Tensor) -> Tensor:
        angle = torch.arccos(c)
        ctx.save_for_backward(angle)
        return torch.sqrt((1.0 - c * c).clamp_min(0.0)) + (math.pi - angle) * c

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (angle,) = ctx.saved_tensors
        return grad * (math.pi - angle)


#: Correlations closer than this many machine epsilons to +-1 are treated as exactly +-1.
_SNAP_ULPS = 16


def _check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1 (number of hidden ReLU layers), got {depth!r}")
    return depth


class _FullyConnectedReLUKernel(Kernel):
    """Shared recursion of :class:`FullyConnectedNNGP` and :class:`FullyConnectedNTK`."""

    def __init__(self, depth: int, weight_std: float = math.sqrt(2.0), bias_std: float = 0.1) -> None:
        super().__init__()
        self.depth = _check_depth(depth)
        self.weight_std = check_positive(weight_std, "weight_std")
        self.bias_std = check_positive(bias_std, "bias_std", allow_zero=True)

    def nngp_and_ntk(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Both Gram matrices :math:`(\\Sigma^{L}(x_i, y_j), \\Theta^{L}(x_i, y_j))`, each ``(n, m)``.

        ``x`` and ``y`` are ``(n, d)`` and ``(m, d)`` (images are flattened). Cost: ``O(nmd)`` for the
        first layer plus ``O(nm)`` per hidden layer; memory ``O(nm)``.
        """
        same = y is x
        x, y = as_point_pair(x, y)
        w2, b2 = self.weight_std**2, self.bias_std**2
        d = x.shape[1]
        cov = (x @ y.T) * (w2 / d) + b2
        var_x = (x * x).sum(1) * (w2 / d) + b2
        var_y = var_x if same else (y * y).sum(1) * (w2 / d) + b2
        ntk = cov
        # Inputs that are exactly zero with zero bias have zero variance: guard the division.
        tiny = torch.finfo(cov.dtype).tiny
        snap = _SNAP_ULPS * torch.finfo(cov.dtype).eps
        for _ in range(self.depth):
            scale = torch.sqrt((var_x[:, None] * var_y[None, :]).clamp_min(tiny))
            corr = cov / scale
            # Correlations within rounding of +-1 (coincident or antipodal points) are set to +-1
            # exactly, with zero derivative: arccos would turn an O(eps) rounding error into O(sqrt(eps)).
            ones = torch.ones_like(corr)
            corr = torch.where(corr > 1.0 - snap, ones, torch.where(corr < snap - 1.0, -ones, corr))
            if same:
                eye = torch.eye(corr.shape[0], dtype=torch.bool, device=corr.device)
                corr = torch.where(eye, torch.ones_like(corr), corr)
            angle = _SafeArccos.apply(corr)
            cov = (w2 / (2.0 * math.pi)) * scale * _ArccosOne.apply(corr) + b2
            derivative = (w2 / (2.0 * math.pi)) * (math.pi - angle)
            ntk = cov + ntk * derivative
            # Diagonal (correlation 1, angle 0): E[relu(u)^2] = var / 2.
            var_x = var_x * (w2 / 2.0) + b2
            var_y = var_x if same else var_y * (w2 / 2.0) + b2
        return cov, ntk

    def extra_repr(self) -> str:
        return f"depth={self.depth}, weight_std={self.weight_std:.6g}, bias_std={self.bias_std:.6g}"


class FullyConnectedNNGP(_FullyConnectedReLUKernel):
    """NNGP kernel of an infinitely wide fully connected ReLU network (output covariance at init).

    The network is ``depth`` hidden layers ``Dense -> ReLU`` followed by a ``Dense`` readout, as
    ``stax.serial(*[Dense(W_std, b_std), Relu()] * depth, Dense(W_std, b_std))`` in neural-tangents.
    In the NTK parameterisation a dense layer is :math:`h' = \\frac{\\sigma_w}{\\sqrt{d_{in}}} W h +
    \\sigma_b \\beta` with :math:`W_{ij}, \\beta_i \\sim N(0, 1)`; the NNGP kernel is the same in the
    standard parameterisation. With :math:`\\sigma_w` = ``weight_std``, :math:`\\sigma_b` = ``bias_std``:

    .. math::

        \\Sigma^0(x, x') = \\sigma_w^2 \\langle x, x' \\rangle / d + \\sigma_b^2, \\qquad
        \\Sigma^{l}(x, x') = \\frac{\\sigma_w^2}{2\\pi} \\sqrt{\\Sigma^{l-1}(x, x)\\Sigma^{l-1}(x', x')}
        \\,\\big(\\sin t + (\\pi - t) \\cos t\\big) + \\sigma_b^2,

    with :math:`t = \\arccos\\big(\\Sigma^{l-1}(x, x') / \\sqrt{\\Sigma^{l-1}(x, x)\\Sigma^{l-1}(x', x')}\\big)`
    (the correlation is clamped to [-1, 1]; within :math:`16\\epsilon` of :math:`\\pm 1` it is set to
    :math:`\\pm 1` with zero derivative, so coincident points give exact values), for
    :math:`l = 1, \\dots,` ``depth``; the kernel is :math:`\\Sigma^{\\mathrm{depth}}`.
    Defaults :math:`\\sigma_w = \\sqrt 2, \\sigma_b = 0.1` are KIP's.

    Gradients are finite everywhere, including coincident points (the derivative of
    :math:`\\sin t + (\\pi - t)\\cos t` in the correlation, :math:`\\pi - t`, is applied in closed form).

    Cost: ``O(nmd + depth * nm)`` time, ``O(nm)`` memory.

    Args:
        depth: number of hidden ReLU layers, ``>= 1``.
        weight_std: :math:`\\sigma_w > 0`.
        bias_std: :math:`\\sigma_b \\ge 0`.
    """

    name = "fc_nngp"

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.nngp_and_ntk(x, y)[0]


class FullyConnectedNTK(_FullyConnectedReLUKernel):
    """Neural tangent kernel of an infinitely wide fully connected ReLU network.

    Same network and NTK parameterisation as :class:`FullyConnectedNNGP` (neural-tangents
    ``stax.Dense(W_std, b_std, parameterization="ntk")``, the kernel KIP regresses with). With
    :math:`\\Sigma^l` and :math:`t` as there,

    .. math::

        \\dot\\Sigma^{l}(x, x') = \\frac{\\sigma_w^2}{2\\pi}(\\pi - t), \\qquad
        \\Theta^0 = \\Sigma^0, \\qquad
        \\Theta^{l}(x, x') = \\Sigma^{l}(x, x') + \\Theta^{l-1}(x, x')\\, \\dot\\Sigma^{l}(x, x'),

    for :math:`l = 1, \\dots,` ``depth``; the kernel is :math:`\\Theta^{\\mathrm{depth}}`, the limit of
    :func:`empirical_ntk` of the network as its width grows (gradient flow on the squared loss with
    this network behaves as kernel regression with it).

    :math:`\\dot\\Sigma` has an unbounded derivative at coincident points (:math:`d t / d c =
    -1/\\sqrt{1 - c^2}`); it is bounded by :math:`1/\\sqrt{\\epsilon}` there, which keeps gradients
    finite: exactly coincident pairs (the diagonal of ``K(x, x)``) get the exact gradient.

    Cost: ``O(nmd + depth * nm)`` time, ``O(nm)`` memory.

    Args:
        depth: number of hidden ReLU layers, ``>= 1``.
        weight_std: :math:`\\sigma_w > 0`.
        bias_std: :math:`\\sigma_b \\ge 0`.
    """

    name = "fc_ntk"

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.nngp_and_ntk(x, y)[1]


# --------------------------------------------------------------------------------------------------
# Empirical (finite-width) NTK


# --------------------------------------------------------------------------------------------------
# Infinite-width ConvNets (KIP's ConvNet, Nguyen et al. 2021)
# --------------------------------------------------------------------------------------------------

#: Accepted values of ``readout`` in :class:`ConvNetNNGP` / :class:`ConvNetNTK`.
CONV_READOUTS = ("flatten", "global_average")


def _shift_sum_no_grad(k: Tensor) -> Tensor:
    h, w = k.shape[-2:]
    out = k.clone()
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di == dj == 0:
                continue
            # Destination positions p with p + d inside the image (the same for q).
            dst_i, src_i = (slice(0, h - di), slice(di, h)) if di >= 0 else (slice(-di, h), slice(0, h + di))
            dst_j, src_j = (slice(0, w - dj), slice(dj, w)) if dj >= 0 else (slice(-dj, w), slice(0, w + dj))
            out[..., dst_i, dst_j, dst_i, dst_j] += k[..., src_i, src_j, src_i, src_j]
    return out


class _ShiftedSum3x3(torch.autograd.Function):
    """The operator is self-adjoint (the offsets are symmetric and zero padding's adjoint is zero
    padding), so the backward pass applies it again instead of nine slice-backward allocations."""

    @staticmethod
    def forward(ctx, k: Tensor) -> Tensor:
        return _shift_sum_no_grad(k)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _ShiftedSum3x3.apply(grad)


def _shifted_sum_3x3(k: Tensor) -> Tensor:
    """:math:`\\sum_{d \\in \\{-1,0,1\\}^2} K(p + d, q + d)` for ``k`` of shape ``(a, b, H, W, H, W)``.

    Out-of-image positions contribute zero (``SAME`` zero padding). Cost: 9 passes over ``k``.
    """
    return _ShiftedSum3x3.apply(k)


def _average_pool_2x2(k: Tensor) -> Tensor:
    """2x2 average pooling with stride 2 (``VALID``: an odd last row/column is dropped) on both positions."""
    a, b, h, w = k.shape[0], k.shape[1], k.shape[2] // 2, k.shape[3] // 2
    if h == 0 or w == 0:
        raise ValueError(f"average pooling needs spatial size >= 2, got {tuple(k.shape[2:4])}: use a smaller depth")
    k = k[:, :, : 2 * h, : 2 * w, : 2 * h, : 2 * w]
    return k.reshape(a, b, h, 2, w, 2, h, 2, w, 2).mean(dim=(3, 5, 7, 9))


def _position_diagonal(k: Tensor) -> Tensor:
    """``K(p, p)`` of ``(a, b, H, W, H, W)`` as ``(a, b, H, W)``."""
    a, b, h, w = k.shape[:4]
    return k.reshape(a, b, h * w, h * w).diagonal(dim1=-2, dim2=-1).reshape(a, b, h, w)


class _ConvNetReLUKernel(Kernel):
    """Shared recursion of :class:`ConvNetNNGP` and :class:`ConvNetNTK`."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        depth: int = 3,
        weight_std: float = math.sqrt(2.0),
        bias_std: float = 0.1,
        readout: str = "flatten",
        prepend_conv: bool = True,
        max_block_entries: int = 2**20,
    ) -> None:
        super().__init__()
        shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
        if shape is None or len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                                   for s in shape):
            raise ValueError(f"input_shape must be (channels, height, width) of positive integers, got {input_shape!r}")
        self.input_shape = shape
        self.depth = _check_depth(depth)
        self.weight_std = check_positive(weight_std, "weight_std")
        self.bias_std = check_positive(bias_std, "bias_std", allow_zero=True)
        if readout not in CONV_READOUTS:
            raise ValueError(f"readout must be one of {CONV_READOUTS}, got {readout!r}")
        self.readout = readout
        if not isinstance(prepend_conv, bool):
            raise TypeError(f"prepend_conv must be a bool, got {prepend_conv!r}")
        self.prepend_conv = prepend_conv
        if isinstance(max_block_entries, bool) or not isinstance(max_block_entries, int) or max_block_entries < 1:
            raise ValueError(f"max_block_entries must be a positive integer, got {max_block_entries!r}")
        self.max_block_entries = max_block_entries
        if min(shape[1], shape[2]) < 2**depth:
            raise ValueError(
                f"depth={depth} halves the image {depth} times: input_shape {shape} needs height and width "
                f">= {2**depth}"
            )

    # -- the layer rules, on pair covariances of shape (a, b, H, W, H, W) ---------------------------

    def _conv(self, k: Tensor, ntk: Tensor | None) -> tuple[Tensor, Tensor]:
        w2, b2 = self.weight_std**2, self.bias_std**2
        k = _shifted_sum_3x3(k) * (w2 / 9.0) + b2
        ntk = k if ntk is None else _shifted_sum_3x3(ntk) * (w2 / 9.0) + k
        return k, ntk

    def _relu(self, k: Tensor, ntk: Tensor, var_a: Tensor, var_b: Tensor, self_pairs: bool) -> tuple[Tensor, Tensor]:
        tiny = torch.finfo(k.dtype).tiny
        snap = _SNAP_ULPS * torch.finfo(k.dtype).eps
        # Rows index x_i, columns y_j; for self pairs (b = 1) row i is paired with itself.
        cols = var_b[:, None, None, None, :, :] if self_pairs else var_b[None, :, None, None, :, :]
        scale = torch.sqrt((var_a[:, None, :, :, None, None] * cols).clamp_min(tiny))
        corr = k / scale
        ones = torch.ones_like(corr)
        corr = torch.where(corr > 1.0 - snap, ones, torch.where(corr < snap - 1.0, -ones, corr))
        if self_pairs:
            hw = k.shape[2] * k.shape[3]
            eye = torch.eye(hw, dtype=torch.bool, device=k.device).reshape(k.shape[2:])
            corr = torch.where(eye, ones, corr)
        angle = _SafeArccos.apply(corr)
        k = scale * _ArccosOne.apply(corr) / (2.0 * math.pi)
        ntk = ntk * (math.pi - angle) / (2.0 * math.pi)
        return k, ntk

    def _layers(self, k: Tensor, variances: tuple[list[Tensor], list[Tensor]] | None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Run the network on the input pair covariance ``k``; return (nngp, ntk) of shape ``(a, b)``.

        ``variances`` (the per-image ``K(p, p)`` before each ReLU, for the rows and the columns) is
        ``None`` for self pairs ``(x_i, x_i)`` (``b = 1``), where they are read off ``k`` and returned.
        """
        self_pairs = variances is None
        record: list[Tensor] = []
        ntk = None
        n_conv = self.depth + int(self.prepend_conv)
        for layer in range(n_conv):
            k, ntk = self._conv(k, ntk)
            if self_pairs:
                var = _position_diagonal(k)[:, 0]
                record.append(var)
                var_a = var_b = var
            else:
                var_a, var_b = variances[0][layer], variances[1][layer]
            k, ntk = self._relu(k, ntk, var_a, var_b, self_pairs)
            if layer >= int(self.prepend_conv):
                k, ntk = _average_pool_2x2(k), _average_pool_2x2(ntk)
        w2, b2 = self.weight_std**2, self.bias_std**2
        if self.readout == "flatten":
            k_out, ntk_out = _position_diagonal(k).mean(dim=(2, 3)), _position_diagonal(ntk).mean(dim=(2, 3))
        else:
            k_out, ntk_out = k.mean(dim=(2, 3, 4, 5)), ntk.mean(dim=(2, 3, 4, 5))
        nngp = k_out * w2 + b2
        return nngp, ntk_out * w2 + nngp, record

    # -- blocks ----------------------------------------------------------------------------------------

    def _images(self, x: Tensor, name: str) -> Tensor:
        from ._finite_width import _shape_inputs

        return _shape_inputs(x, self.input_shape, name)

    def _run_blocks(self, fn, *tensors: Tensor, several: bool):
        if several and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, *tensors, use_reentrant=False)
        return fn(*tensors)

    def _per_pair_entries(self) -> int:
        _, h, w = self.input_shape
        return (h * w) ** 2

    def _self_variances(self, x: Tensor) -> list[Tensor]:
        c = self.input_shape[0]
        rows = max(1, self.max_block_entries // self._per_pair_entries())
        blocks = []
        for start in range(0, x.shape[0], rows):

            def run(part: Tensor) -> tuple[Tensor, ...]:
                k0 = torch.einsum("achw,acHW->ahwHW", part, part)[:, None] / c
                return tuple(self._layers(k0, None)[2])

            blocks.append(self._run_blocks(run, x[start : start + rows], several=rows < x.shape[0]))
        return [torch.cat([b[layer] for b in blocks]) for layer in range(len(blocks[0]))]

    def nngp_and_ntk(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Both Gram matrices ``(n, m)``: the NNGP :math:`\\Sigma(x_i, y_j)` and the NTK :math:`\\Theta(x_i, y_j)`.

        ``x``, ``y``: ``(n, C, H, W)`` / ``(m, C, H, W)`` images, or flattened ``(n, C*H*W)``.
        Computed in blocks of at most ``max_block_entries`` position-pair entries; with autograd on
        and more than one block, each block is checkpointed (recomputed in the backward pass), so memory stays
        :math:`O(\\text{max\\_block\\_entries})` per live tensor plus :math:`O((n + m)(HW)^2)` for
        the per-image self-covariances.
        """
        same = y is x
        x, y = as_point_pair(x, y, flatten=False)
        x, y = self._images(x, "x"), self._images(y, "y")
        var_x = self._self_variances(x)
        var_y = var_x if same else self._self_variances(y)
        c = self.input_shape[0]
        per_pair = self._per_pair_entries()
        cols = max(1, min(y.shape[0], self.max_block_entries // per_pair))
        rows = max(1, self.max_block_entries // (per_pair * cols))
        nngp_rows, ntk_rows = [], []
        for r in range(0, x.shape[0], rows):
            nngp_cols, ntk_cols = [], []
            for s in range(0, y.shape[0], cols):

                def run(a: Tensor, b: Tensor, *var: Tensor, r=r, s=s) -> tuple[Tensor, Tensor]:
                    half = len(var) // 2
                    k0 = torch.einsum("achw,bcHW->abhwHW", a, b) / c
                    nngp, ntk, _ = self._layers(k0, (list(var[:half]), list(var[half:])))
                    return nngp, ntk

                var_block = [v[r : r + rows] for v in var_x] + [v[s : s + cols] for v in var_y]
                nngp, ntk = self._run_blocks(run, x[r : r + rows], y[s : s + cols], *var_block,
                                              several=rows < x.shape[0] or cols < y.shape[0])
                nngp_cols.append(nngp)
                ntk_cols.append(ntk)
            nngp_rows.append(torch.cat(nngp_cols, 1))
            ntk_rows.append(torch.cat(ntk_cols, 1))
        nngp, ntk = torch.cat(nngp_rows), torch.cat(ntk_rows)
        if same:
            nngp, ntk = (nngp + nngp.T) / 2, (ntk + ntk.T) / 2
        return nngp, ntk

    def extra_repr(self) -> str:
        return (f"input_shape={self.input_shape}, depth={self.depth}, weight_std={self.weight_std:.6g}, "
                f"bias_std={self.bias_std:.6g}, readout={self.readout!r}, prepend_conv={self.prepend_conv}")



class ConvNetNNGP(_ConvNetReLUKernel):
    """NNGP kernel of KIP's infinitely wide ConvNet (Nguyen et al. 2021), in neural-tangents' ``stax`` rules.

    The network (``ConvNet`` of the KIP code, no normalisation; NTK parameterisation) is::

        [Conv(3x3, SAME) -> ReLU]            (if prepend_conv)
        [Conv(3x3, SAME) -> ReLU -> AvgPool(2x2, stride 2)] x depth
        Flatten (or GlobalAvgPool) -> Dense

    with every layer :math:`h' = \\frac{\\sigma_w}{\\sqrt{\\text{fan-in}}} W * h + \\sigma_b \\beta`
    (fan-in :math:`9C` for a convolution, :math:`W, \\beta \\sim N(0, 1)`). For a pair of images it
    propagates the covariance :math:`K(p, q)` between every pair of positions :math:`p, q`:

    .. math::

        K^0(p, q) &= \\tfrac1C \\textstyle\\sum_c x_c(p)\\, x'_c(q), \\\\
        \\text{Conv:}\\quad \\Sigma(p, q) &= \\tfrac{\\sigma_w^2}{9} \\textstyle\\sum_{d \\in \\{-1,0,1\\}^2}
            K(p + d, q + d) + \\sigma_b^2 \\quad (\\text{zero outside the image}), \\\\
        \\text{ReLU:}\\quad K(p, q) &= \\tfrac{1}{2\\pi} \\sqrt{\\Sigma_{xx}(p, p)\\, \\Sigma_{x'x'}(q, q)}\\,
            \\big(\\sin t + (\\pi - t) \\cos t\\big), \\quad
            t = \\arccos \\tfrac{\\Sigma(p, q)}{\\sqrt{\\Sigma_{xx}(p, p) \\Sigma_{x'x'}(q, q)}}, \\\\
        \\text{AvgPool:}\\quad K(P, Q) &= \\tfrac1{16} \\textstyle\\sum_{p \\in P, q \\in Q} K(p, q), \\\\
        \\text{readout:}\\quad k(x, x') &= \\sigma_w^2\\, \\mathrm{mean}_p K(p, p) + \\sigma_b^2
            \\;\\; (\\text{flatten}), \\quad \\sigma_w^2\\, \\mathrm{mean}_{p, q} K(p, q) + \\sigma_b^2
            \\;\\; (\\text{global average}).

    (The ReLU rule is the normalised arc-cosine kernel of order 1 of Cho & Saul 2009; the diagonal
    variances come from the same recursion run on each image with itself.) Pooling is ``VALID``: an
    odd last row/column is dropped. The arc-cosine is handled as in :class:`FullyConnectedNNGP`
    (correlations within :math:`16\\epsilon` of :math:`\\pm1` snapped, finite gradients).

    **Cost** (why this kernel is for small images only): every pair of images carries a full
    position-pair covariance, :math:`(HW)^2` entries, so time and memory are
    :math:`O(nm(HW)^2)` (times about 30 elementwise passes per layer, the first two layers at full
    resolution). The Gram matrix is computed in blocks of at most ``max_block_entries`` entries
    (default :math:`2^{20}`, 8 MB per float64 tensor), each checkpointed under autograd, so memory is
    :math:`O(\\text{max\\_block\\_entries} + (n + m)(HW)^2)`; time is not reduced. In practice: 8x8
    (digits, 4096 entries per pair) costs about a millisecond per pair on one CPU core; 28x28
    (614,656 per pair) and 32x32 (1,048,576 per pair, one pair per default block) are 150-250 times
    more and need a GPU for KIP-sized Gram matrices.

    Args:
        input_shape: ``(channels, height, width)`` of the images; flattened points are reshaped to it.
        depth: number of ``Conv -> ReLU -> AvgPool`` blocks, ``>= 1`` (KIP: 3); height and width
            must be ``>= 2**depth``.
        weight_std: :math:`\\sigma_w > 0` (KIP: :math:`\\sqrt 2`).
        bias_std: :math:`\\sigma_b \\ge 0` (KIP: 0.1).
        readout: ``"flatten"`` (KIP's default, ``use_gap=False``) or ``"global_average"``.
        prepend_conv: one ``Conv -> ReLU`` without pooling before the blocks (KIP's "ConvNet";
            ``False`` is its "ConvNet3").
        max_block_entries: position-pair entries per computed block (memory, see Cost).
    """

    name = "conv_nngp"

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.nngp_and_ntk(x, y)[0]


class ConvNetNTK(_ConvNetReLUKernel):
    """Neural tangent kernel of KIP's infinitely wide ConvNet (the kernel of KIP's ConvNet results).

    Same network, parameterisation, arguments and cost as :class:`ConvNetNNGP`. Alongside
    :math:`\\Sigma, K` the recursion carries the tangent kernel :math:`\\Theta(p, q)`:

    .. math::

        \\text{Conv:}\\quad \\Theta'(p, q) &= \\tfrac{\\sigma_w^2}{9} \\textstyle\\sum_d \\Theta(p + d, q + d)
            + \\Sigma(p, q) \\quad (\\Theta = 0 \\text{ at the input}), \\\\
        \\text{ReLU:}\\quad \\Theta'(p, q) &= \\Theta(p, q)\\, \\tfrac{\\pi - t}{2\\pi}, \\qquad
        \\text{AvgPool: as } K, \\\\
        \\text{readout:}\\quad \\theta(x, x') &= \\sigma_w^2\\, \\mathrm{mean}_p \\Theta(p, p) + k(x, x')
            \\;\\; (\\text{flatten; } \\mathrm{mean}_{p,q} \\text{ for global average}),

    the limit of :func:`empirical_ntk` of the finite ConvNet as its width grows.
    """

    name = "conv_ntk"

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.nngp_and_ntk(x, y)[1]
