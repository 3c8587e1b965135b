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
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ._validation import as_point_pair, as_points, check_choice, check_positive
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

#: Accepted values of ``output_reduction`` in :func:`empirical_ntk`.
OUTPUT_REDUCTIONS = ("sum", "mean", "full")


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


def _network_dtype(network: nn.Module, fallback: torch.dtype) -> torch.dtype:
    for p in network.parameters():
        if p.is_floating_point():
            return p.dtype
    return fallback


def _shape_inputs(x: Tensor, input_shape: tuple[int, ...] | None, name: str) -> Tensor:
    """Reshape flat ``(n, prod(input_shape))`` points to ``(n, *input_shape)``; clear error otherwise."""
    if input_shape is None:
        return x
    expected = math.prod(input_shape)
    if tuple(x.shape[1:]) == tuple(input_shape):
        return x
    if x.dim() < 2 or math.prod(x.shape[1:]) != expected:
        raise ValueError(
            f"{name} of shape {tuple(x.shape)} cannot be read as inputs of shape {tuple(input_shape)} "
            f"(input_shape): each point must have {expected} entries, as (n, {expected}) or "
            f"(n, {', '.join(map(str, input_shape))})"
        )
    return x.reshape(x.shape[0], *input_shape)


def _check_input_shape(input_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    if input_shape is None:
        return None
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive integers, got {input_shape!r}")
    return shape


def _as_network_input(x, name: str, network: nn.Module) -> Tensor:
    if not isinstance(x, Tensor):
        x = as_points(x, name)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one input, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if not bool(torch.isfinite(x.detach()).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return x.to(_network_dtype(network, x.dtype))


def _jacobians(
    network: nn.Module, x: Tensor, name: str, chunk_size: int | None
) -> tuple[list[Tensor], bool]:
    """Per-sample Jacobians ``[(n, k, p_q)]`` of the outputs w.r.t. each parameter tensor."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in network.named_parameters()}
    buffers = {k: v.detach() for k, v in network.named_buffers()}

    def output(p: dict[str, Tensor], sample: Tensor) -> Tensor:
        out = functional_call(network, (p, buffers), (sample.unsqueeze(0),))
        return out.reshape(-1)

    try:
        jac = vmap(jacrev(output), in_dims=(None, 0), chunk_size=chunk_size)(params, x)
    except (RuntimeError, ValueError, TypeError) as err:
        if "saved tensor hooks" in str(err):
            # Inside activation checkpointing (the tiled kernel sums): torch.func's reverse mode is
            # unavailable there, plain autograd is not.
            return _jacobians_by_autograd(network, x, name), bool(params)
        raise ValueError(
            f"{name} of shape {tuple(x.shape)} cannot be passed through the network "
            f"({type(network).__name__}): {err}"
        ) from err
    n = x.shape[0]
    flat = [jac[k].reshape(n, jac[k].shape[1], -1) for k in params]
    return flat, bool(params)


def _jacobians_by_autograd(network: nn.Module, x: Tensor, name: str) -> list[Tensor]:
    """Same as :func:`_jacobians` with one ``torch.autograd.grad`` call per (input, output) pair."""
    from torch.func import functional_call

    named = {k: v.detach().requires_grad_(True) for k, v in network.named_parameters()}
    buffers = {k: v.detach() for k, v in network.named_buffers()}
    params = list(named.values())
    create_graph = torch.is_grad_enabled() and x.requires_grad
    rows: list[list[Tensor]] = [[] for _ in params]
    outputs = 0
    for i in range(x.shape[0]):
        with torch.enable_grad():
            try:
                out = functional_call(network, (named, buffers), (x[i : i + 1],)).reshape(-1)
            except (RuntimeError, ValueError, TypeError) as err:
                raise ValueError(
                    f"{name} of shape {tuple(x.shape)} cannot be passed through the network "
                    f"({type(network).__name__}): {err}"
                ) from err
            outputs = out.shape[0]
            for c in range(outputs):
                grads = torch.autograd.grad(
                    out[c], params, retain_graph=True, create_graph=create_graph, allow_unused=True
                )
                for q, (g, p) in enumerate(zip(grads, params)):
                    rows[q].append((torch.zeros_like(p) if g is None else g).reshape(-1))
    return [torch.stack(r).reshape(x.shape[0], outputs, -1) for r in rows]


def empirical_ntk(
    network: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    output_reduction: str = "sum",
    chunk_size: int | None = None,
) -> Tensor:
    """Empirical neural tangent kernel :math:`\\Theta(x, x') = J(x) J(x')^\\top` of ``network``.

    :math:`J(x) = \\partial f_\\theta(x) / \\partial \\theta` is the Jacobian of the ``k`` outputs for one
    input with respect to all parameters :math:`\\theta` (every tensor of ``network.parameters()``,
    concatenated), evaluated at the current parameters, which are treated as constants (the result
    is differentiable with respect to ``x`` and ``y``, not the parameters). Each input is passed
    through the network alone (``torch.func.vmap`` of ``jacrev``), so batch-coupled layers (batch norm
    in training mode) are not supported: call ``network.eval()`` first.

    Args:
        network: a module mapping a batch ``(B, ...)`` to outputs ``(B, ...)`` (flattened to ``k``).
        x: inputs ``(n, ...)`` in the shape the network expects.
        y: inputs ``(m, ...)``; ``None`` means ``x`` (a symmetric PSD Gram matrix).
        output_reduction: ``"sum"`` -- the trace over outputs
            :math:`\\sum_{c<k} J_c(x) J_c(x')^\\top`, shape ``(n, m)`` (neural-tangents'
            ``trace_axes=(-1,)``); ``"mean"`` -- the trace divided by ``k`` (comparable to an
            infinite-width NTK, whose output block is :math:`\\Theta \\, I_k`); ``"full"`` -- every
            output pair :math:`J_c(x) J_{c'}(x')^\\top`, shape ``(n, m, k, k)``.
        chunk_size: how many inputs ``vmap`` processes at once (``None``: all), to bound memory.

    Returns:
        The Gram matrix in the network's parameter dtype (inputs are cast to it).

    Cost: ``n + m`` per-sample backward passes, each about ``k`` times a forward pass, then
    ``O(nmkP)`` for the contraction (``O(nmk^2P)`` for ``"full"``) with ``P`` parameters; memory
    ``O((n + m) k P)`` for the Jacobians (bound it with ``chunk_size`` and by splitting ``x``).
    """
    check_choice(output_reduction, OUTPUT_REDUCTIONS, "output_reduction")
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
    x = _as_network_input(x, "x", network)
    jx, has_params = _jacobians(network, x, "x", chunk_size)
    if not has_params:
        raise ValueError(f"network ({type(network).__name__}) has no parameters: its NTK is undefined")
    if y is None:
        jy = jx
    else:
        y = _as_network_input(y, "y", network)
        if y.device != x.device:
            raise ValueError(f"x is on {x.device} but y is on {y.device}: move both to one device")
        jy, _ = _jacobians(network, y, "y", chunk_size)
        if jy[0].shape[1] != jx[0].shape[1]:
            raise ValueError(
                f"the network gives {jx[0].shape[1]} outputs for x but {jy[0].shape[1]} for y"
            )
    k = jx[0].shape[1]
    if output_reduction == "full":
        return sum(torch.einsum("akp,blp->abkl", a, b) for a, b in zip(jx, jy))
    gram = sum(torch.einsum("akp,bkp->ab", a, b) for a, b in zip(jx, jy))
    return gram / k if output_reduction == "mean" else gram


class EmpiricalNTK(Kernel):
    """The empirical NTK of a fixed network as a :class:`~ipmcondense.ipm.kernels.Kernel`.

    :math:`k(x, x') = \\sum_c J_c(x) J_c(x')^\\top` (or its mean over outputs), see
    :func:`empirical_ntk`. The distances pass flattened points ``(n, d)``; ``input_shape`` (e.g.
    ``(C, H, W)``) reshapes them for the network. The Gram matrix is returned in the inputs' dtype.

    Args:
        network: the network (its parameters are treated as constants).
        input_shape: the shape of one input, or ``None`` to pass inputs unchanged.
        output_reduction: ``"sum"`` (default) or ``"mean"`` over outputs.
        chunk_size: inputs per ``vmap`` chunk (memory bound), ``None`` for all.

    Cost: as :func:`empirical_ntk`: ``O((n + m) k)`` forward passes plus ``O(nmkP)``.
    """

    name = "empirical_ntk"

    def __init__(
        self,
        network: nn.Module,
        input_shape: Sequence[int] | None = None,
        *,
        output_reduction: str = "sum",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        check_choice(output_reduction, ("sum", "mean"), "output_reduction")
        self.network = network
        self.input_shape = _check_input_shape(input_shape)
        self.output_reduction = output_reduction
        self.chunk_size = chunk_size

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        same = y is x
        dtype = torch.promote_types(x.dtype, y.dtype) if x.is_floating_point() else torch.get_default_dtype()
        xs = _shape_inputs(x, self.input_shape, "x")
        ys = xs if same else _shape_inputs(y, self.input_shape, "y")
        gram = empirical_ntk(
            self.network,
            xs,
            None if same else ys,
            output_reduction=self.output_reduction,
            chunk_size=self.chunk_size,
        )
        return gram.to(dtype)

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, output_reduction={self.output_reduction!r}"


# --------------------------------------------------------------------------------------------------
# Random-feature NNGP (RFAD)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def gaussian_init_(
    module: nn.Module,
    generator: torch.Generator | None = None,
    weight_std: float = math.sqrt(2.0),
    bias_std: float = 0.1,
) -> nn.Module:
    """Re-initialise every ``Linear``/``Conv`` layer of ``module`` in place, NNGP style (RFAD).

    Weights :math:`\\sim N(0, \\sigma_w^2 / \\mathrm{fan\\_in})` (fan-in = input channels x kernel
    size), biases :math:`\\sim N(0, \\sigma_b^2)`, drawn from ``generator`` (which must live on the
    parameters' device). Other layers (norms) are left unchanged. Returns ``module``.
    """
    weight_std = check_positive(weight_std, "weight_std")
    bias_std = check_positive(bias_std, "bias_std", allow_zero=True)
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0.0, weight_std / math.sqrt(fan_in), generator=generator)
            if layer.bias is not None:
                if bias_std > 0:
                    layer.bias.normal_(0.0, bias_std, generator=generator)
                else:
                    layer.bias.zero_()
    return module


class RandomFeatureNNGP(Kernel):
    """Random-feature estimate of a network's NNGP kernel from several random networks (RFAD).

    With ``n_models`` networks :math:`g_1, \\dots, g_M` drawn by ``network_factory`` and their
    embeddings :math:`g_j.\\mathrm{embed}(x) \\in \\mathbb{R}^{d_j}`,

    .. math::

        \\phi(x) = \\mathrm{concat}_j\\, \\frac{g_j.\\mathrm{embed}(x)}{\\sqrt{M d_j}}, \\qquad
        k(x, x') = s\\, \\langle \\phi(x), \\phi(x') \\rangle + c,

    an unbiased Monte-Carlo estimate (over the random networks) of
    :math:`s\\, E_g[\\langle g(x), g(x')\\rangle / d] + c`, which tends to the NNGP kernel of the
    architecture as width and ``n_models`` grow. RFAD uses width-256 ConvNets without normalisation,
    Gaussian init (:func:`gaussian_init_`), ``n_models=8``, readout scale ``s = 2`` and offset
    ``c = 0.01`` (the kernel of a final ReLU-free dense layer with :math:`\\sigma_w^2 = 2`,
    :math:`\\sigma_b^2 = 0.01`); the defaults here, ``s = 1, c = 0``, give the plain feature inner product.

    The networks are frozen (no gradient to their parameters; gradients flow to the inputs). Call
    :meth:`resample` to draw new ones (RFAD does so every iteration).

    Args:
        network_factory: ``(generator: torch.Generator) -> nn.Module`` with an ``embed`` method; it
            must draw its random parameters from the generator.
        n_models: number of networks :math:`M \\ge 1`.
        seed: seed of the internal generator (used by the constructor and by ``resample()``).
        input_shape: the shape of one input (e.g. ``(C, H, W)``) to reshape flat points; ``None``
            passes inputs unchanged.
        scale: :math:`s > 0`.  offset: :math:`c \\ge 0`.

    Cost: ``M`` forward passes on ``n + m`` inputs, then ``O(nmD)`` with :math:`D = \\sum_j d_j`;
    memory ``O((n + m) D)`` plus the activations.
    """

    name = "random_feature_nngp"

    def __init__(
        self,
        network_factory: Callable[[torch.Generator], nn.Module],
        n_models: int = 8,
        seed: int = 0,
        *,
        input_shape: Sequence[int] | None = None,
        scale: float = 1.0,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        if not callable(network_factory):
            raise TypeError(f"network_factory must be callable, got {type(network_factory).__name__}")
        if isinstance(n_models, bool) or not isinstance(n_models, int) or n_models < 1:
            raise ValueError(f"n_models must be a positive integer, got {n_models!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        self.network_factory = network_factory
        self.n_models = n_models
        self.input_shape = _check_input_shape(input_shape)
        self.scale = check_positive(scale, "scale")
        self.offset = check_positive(offset, "offset", allow_zero=True)
        self.generator = torch.Generator().manual_seed(seed)
        self.models = nn.ModuleList()
        self.resample()

    def resample(self, generator: torch.Generator | None = None) -> RandomFeatureNNGP:
        """Draw ``n_models`` new networks from ``generator`` (default: the internal one).

        The new networks are moved to the device and dtype of the previous ones. Returns ``self``.
        """
        generator = self.generator if generator is None else generator
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        previous = next(iter(self.models.parameters()), None)
        models = []
        for index in range(self.n_models):
            model = self.network_factory(generator)
            if not isinstance(model, nn.Module) or not callable(getattr(model, "embed", None)):
                raise TypeError(
                    "network_factory must return an nn.Module with an embed(x) method, got "
                    f"{type(model).__name__} for model {index}"
                )
            if previous is not None:
                model = model.to(device=previous.device, dtype=previous.dtype)
            model.requires_grad_(False)
            models.append(model)
        self.models = nn.ModuleList(models)
        return self

    def features(self, x: Tensor, name: str = "x") -> Tensor:
        """:math:`\\phi(x)`, shape ``(n, D)``, in the networks' dtype."""
        inputs = _shape_inputs(x, self.input_shape, name)
        parts = []
        for model in self.models:
            dtype = _network_dtype(model, inputs.dtype)
            try:
                emb = model.embed(inputs.to(dtype))
            except (RuntimeError, ValueError) as err:
                raise ValueError(
                    f"{name} of shape {tuple(inputs.shape)} cannot be passed through the network "
                    f"({type(model).__name__}): {err}"
                ) from err
            emb = emb.reshape(emb.shape[0], -1)
            parts.append(emb / math.sqrt(self.n_models * emb.shape[1]))
        return torch.cat(parts, dim=1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        same = y is x
        dtype = torch.promote_types(x.dtype, y.dtype)
        phi_x = self.features(x, "x")
        phi_y = phi_x if same else self.features(y, "y")
        gram = self.scale * (phi_x @ phi_y.T) + self.offset
        return gram.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"n_models={self.n_models}, input_shape={self.input_shape}, scale={self.scale:g}, "
            f"offset={self.offset:g}"
        )
