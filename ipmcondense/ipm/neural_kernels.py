"""Kernels defined by neural networks: infinite-width NNGP/NTK, empirical NTK, random features.

These are the kernels of kernel-regression condensation (KIP, Nguyen et al. 2021; RFAD, Loo et al.
2022, see :mod:`ipmcondense.ipm.kernel_regression`). Each is a :class:`~ipmcondense.ipm.kernels.Kernel`,
so it also defines an MMD: ``mmd2(x, y, kernel=FullyConnectedNTK(depth=3))``.

* :class:`FullyConnectedNNGP`, :class:`FullyConnectedNTK`: closed forms of a fully connected ReLU
  network of infinite width (arc-cosine recursions of Cho & Saul 2009, Jacot et al. 2018,
  Lee et al. 2019), in the NTK parameterisation of ``neural_tangents.stax``.
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
