"""Finite-width neural kernels: the empirical NTK of a given network and random-feature NNGPs.

Re-exported by :mod:`ipmcondense.ipm.neural_kernels`, where they are documented with the closed-form
infinite-width kernels. Networks are passed in (a module, or a factory), never imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ._validation import as_points, check_choice, check_positive
from .kernels import Kernel

#: Accepted values of ``output_reduction`` in :func:`empirical_ntk`.
OUTPUT_REDUCTIONS = ("sum", "mean", "full")


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
