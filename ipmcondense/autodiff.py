r"""Differentiating through training: flat parameter vectors, SGD unrolls and implicit differentiation.

The numerical building blocks below the condensation engine, shared by the trajectory objective (MTT),
the unrolled bilevel objective (DD) and the implicit bilevel objective (RCIG):

* a network's parameters seen as **one flat vector** :math:`\theta \in \mathbb{R}^P`
  (:class:`FlatParameters`, :func:`flatten_parameters`, :func:`functional_forward`): the module is
  only a template, the forward pass runs on views of the vector through
  :func:`torch.func.functional_call`, so nothing is deep-copied and the parameters can be any
  differentiable function of other tensors;
* :func:`unrolled_sgd`: :math:`N` differentiable SGD steps
  :math:`\theta_{i+1} = \theta_i - \eta_i \nabla_\theta \ell(f_{\theta_i}(A_i(X_{B_i})), Y_{B_i})`
  on a synthetic set :math:`(X, Y)`, keeping the graph (``create_graph=True``) so that a loss on
  :math:`\theta_N` can be differentiated with respect to :math:`X`, the step sizes :math:`\eta` and
  soft labels :math:`Y` (:func:`make_unroll_plan` fixes its randomness in advance so that a reverse
  pass can replay every step with :func:`sgd_step`);
* implicit differentiation at an inner optimum: :func:`implicit_hypergradient` with inverse-Hessian-vector
  products by :func:`conjugate_gradient` or a truncated :func:`neumann_series`.

To first order in the step size, the student's displacement is an accumulated gradient:
:math:`(\theta_N - \theta_0)/\eta \to -\sum_{i<N} \nabla_\theta \ell_i(\theta_0)` as
:math:`\eta \to 0` (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.ipm._validation import check_choice, check_positive_int

__all__ = [
    "FlatParameters",
    "flatten_parameters",
    "functional_forward",
    "load_flat_parameters",
    "UnrollPlan",
    "make_unroll_plan",
    "sgd_step",
    "check_unroll_inputs",
    "step_size_at",
    "unrolled_sgd",
    "conjugate_gradient",
    "neumann_series",
    "implicit_hypergradient",
]

Augmenter = Callable[..., Tensor]


# ====================================================================== flat parameter vectors
class FlatParameters:
    """The layout of a module's parameters inside one flat vector.

    Parameters are laid out in ``module.named_parameters()`` order, each flattened row-major, so
    ``flatten(module)`` equals ``torch.cat([p.reshape(-1) for p in module.parameters()])``.
    Buffers (e.g. batch-norm running statistics) are not part of the vector: a functional forward
    pass uses (and, in training mode, updates) the module's own buffers.

    Args:
        module: the template network; only its parameter names and shapes are read.

    Attributes:
        names: parameter names, in layout order.
        shapes: parameter shapes.
        numels: number of entries of each parameter.
        numel: total number of parameters ``P``.
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(module).__name__}")
        named = list(module.named_parameters())
        if not named:
            raise ValueError(f"net ({type(module).__name__}) has no parameters")
        self.names: tuple[str, ...] = tuple(name for name, _ in named)
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for _, p in named)
        self.numels: tuple[int, ...] = tuple(p.numel() for _, p in named)
        self.numel: int = int(sum(self.numels))

    def __repr__(self) -> str:
        return f"FlatParameters(tensors={len(self.names)}, numel={self.numel})"

    def flatten(self, module: nn.Module) -> Tensor:
        """A detached copy of ``module``'s parameters as a flat ``(P,)`` vector (module's dtype/device)."""
        self._check_module(module)
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def check_vector(self, flat_params: Any, name: str = "flat_params") -> Tensor:
        """Return ``flat_params`` if it is a floating ``(P,)`` tensor; raise a clear error otherwise."""
        if not isinstance(flat_params, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape ({self.numel},), got {type(flat_params).__name__}")
        if flat_params.dim() != 1 or flat_params.numel() != self.numel:
            raise ValueError(
                f"{name} must have shape ({self.numel},) (the network's parameter count), "
                f"got shape {tuple(flat_params.shape)}"
            )
        if not flat_params.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {flat_params.dtype}")
        return flat_params

    def views(self, flat_params: Tensor) -> dict[str, Tensor]:
        """Name -> differentiable view of ``flat_params`` with the parameter's shape (no copy)."""
        flat_params = self.check_vector(flat_params)
        chunks = torch.split(flat_params, self.numels)
        return {name: chunk.view(shape) for name, chunk, shape in zip(self.names, chunks, self.shapes)}

    def forward(self, module: nn.Module, flat_params: Tensor, *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` with its parameters replaced by views of ``flat_params``.

        Differentiable with respect to ``flat_params`` (to any order) and to the inputs. Cost: one
        forward pass of ``module``; no parameter copies.
        """
        self._check_module(module)
        return torch.func.functional_call(module, self.views(flat_params), args, kwargs)

    def assign(self, module: nn.Module, flat_params: Tensor) -> nn.Module:
        """Copy ``flat_params`` into ``module``'s parameters in place (no autograd); returns ``module``."""
        self._check_module(module)
        views = self.views(flat_params.detach())
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(views[name])
        return module

    def _check_module(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(module).__name__}")
        shapes = tuple((n, p.shape) for n, p in module.named_parameters())
        if shapes != tuple(zip(self.names, self.shapes)):
            raise ValueError("net does not have the parameter layout this FlatParameters was built from")


def flatten_parameters(net: nn.Module) -> Tensor:
    """``net``'s parameters as one detached flat vector ``(P,)`` in ``named_parameters()`` order."""
    return FlatParameters(net).flatten(net)


def functional_forward(net: nn.Module, flat_params: Tensor, x: Tensor) -> Tensor:
    """``net(x)`` with the parameters taken from the flat vector ``flat_params`` (differentiable).

    Uses :func:`torch.func.functional_call` on views of ``flat_params``; ``net``'s own parameters are
    neither read nor modified, its buffers are used as they are. Cost: one forward pass.
    """
    return FlatParameters(net).forward(net, flat_params, x)


def load_flat_parameters(net: nn.Module, flat_params: Tensor) -> nn.Module:
    """Copy the flat vector ``flat_params`` into ``net``'s parameters in place; returns ``net``."""
    return FlatParameters(net).assign(net, flat_params)


# ============================================================================ the SGD unroll
@dataclass(frozen=True)
class UnrollPlan:
    """The randomness of an unroll, fixed in advance so that every step can be replayed.

    ``indices[i]`` are the synthetic examples of step ``i`` (``None``: all of them); ``augment_seeds[i]``
    seeds a private generator for step ``i``'s augmentation (``None``: no augmentation).
    """

    indices: tuple[Tensor | None, ...]
    augment_seeds: tuple[int | None, ...]


def make_unroll_plan(
    n: int,
    steps: int,
    batch_size: int | None,
    augment: Augmenter | None,
    generator: torch.Generator | None,
    device: torch.device,
) -> UnrollPlan:
    """Mini-batches as in MTT: consecutive chunks of random permutations, refilled when used up."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    indices: list[Tensor | None] = []
    chunks: list[Tensor] = []
    seeds: list[int | None] = []
    for _ in range(steps):
        if batch_size is None or batch_size >= n:
            indices.append(None)
        else:
            if not chunks:
                perm = torch.randperm(n, generator=generator, device=gen_device).to(device)
                chunks = list(torch.split(perm, batch_size))
            indices.append(chunks.pop(0))
        if augment is None:
            seeds.append(None)
        else:
            seeds.append(int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).item()))
    return UnrollPlan(tuple(indices), tuple(seeds))


def check_unroll_inputs(
    layout: FlatParameters,
    flat_params: Any,
    images: Any,
    labels: Any,
    lrs: Any,
    steps: Any,
    batch_size: Any,
    soft_labels: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int | None]:
    flat_params = layout.check_vector(flat_params, "flat_params_start")
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() < 2 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty floating tensor (N, C, H, W), got {shape}")
    if not torch.isfinite(images).all():
        raise ValueError("images must be finite (found NaN or inf)")
    n = images.shape[0]
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if soft_labels:
        if labels.dim() != 2 or labels.shape[0] != n or not labels.is_floating_point():
            raise ValueError(
                f"with soft_labels=True, labels must be a floating (N, num_classes) tensor with N={n}, "
                f"got shape {tuple(labels.shape)} and dtype {labels.dtype}"
            )
    elif labels.dim() != 1 or labels.shape[0] != n or labels.is_floating_point():
        raise ValueError(
            f"labels must be a vector of {n} integer class indices (pass soft_labels=True for (N, K) "
            f"distributions), got shape {tuple(labels.shape)} and dtype {labels.dtype}"
        )
    steps = check_positive_int(steps, "steps")
    if batch_size is not None:
        batch_size = check_positive_int(batch_size, "batch_size")
    if not isinstance(lrs, Tensor):
        if isinstance(lrs, bool) or not isinstance(lrs, (int, float)):
            raise TypeError(f"lrs must be a number or a tensor, got {type(lrs).__name__}")
        lrs = torch.tensor(float(lrs), dtype=flat_params.dtype, device=flat_params.device)
    if lrs.numel() != 1 and tuple(lrs.shape) != (steps,):
        raise ValueError(
            f"lrs must be a scalar or a tensor of shape (steps,) = ({steps},), got shape {tuple(lrs.shape)}"
        )
    if not torch.isfinite(lrs).all():
        raise ValueError("lrs must be finite")
    return flat_params, images, labels, lrs, steps, batch_size


def step_size_at(lrs: Tensor, step: int) -> Tensor:
    return lrs.reshape(()) if lrs.numel() == 1 else lrs[step]


def sgd_step(
    net: nn.Module,
    layout: FlatParameters,
    theta: Tensor,
    images: Tensor,
    labels: Tensor,
    lr: Tensor,
    plan: UnrollPlan,
    step: int,
    augment: Augmenter | None,
    create_graph: bool,
    owned: Tensor | None = None,
) -> Tensor:
    r"""One SGD step :math:`\theta - \eta \nabla_\theta \ell` on step ``step``'s batch.

    ``owned`` (class-parallel, a boolean mask over the rows of ``images``): this rank computes the gradient
    of its own rows of the batch only, :math:`g_r = \nabla_\theta \sum_{i \in B \cap R_r} \ell_i / |B|`
    (the augmentation is drawn for the whole batch, then its own rows are kept: per-sample parameters, so
    the generator is consumed as in one process), and the step uses :math:`g = \sum_r g_r`
    (:func:`~ipmcondense.distributed.sum_over_ranks`); :math:`\theta` enters through
    :func:`~ipmcondense.distributed.copy_to_ranks`, so a backward pass through the step sums the ranks'
    Hessian-vector products and every rank holds the same iterate and adjoint. Equal to the one-process step
    up to the rounding of the split sum.
    """
    idx = plan.indices[step]
    x = images if idx is None else images[idx]
    y = labels if idx is None else labels[idx]
    seed = plan.augment_seeds[step]
    if seed is not None and augment is not None:
        x = augment(x, generator=torch.Generator(device=x.device).manual_seed(seed))
    if owned is None:
        loss = F.cross_entropy(layout.forward(net, theta, x), y)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
        return theta - lr * grad
    from ipmcondense.distributed import copy_to_ranks, sum_over_ranks

    mine = (owned if idx is None else owned[idx]).to(x.device)
    theta_in = copy_to_ranks(theta)
    if bool(mine.any()):
        loss = F.cross_entropy(layout.forward(net, theta_in, x[mine]), y[mine], reduction="sum") / x.shape[0]
        (partial,) = torch.autograd.grad(loss, theta_in, create_graph=create_graph)
    else:  # no own row in this batch: a zero contribution that keeps the collectives of the backward pass aligned
        partial = theta_in * 0.0
    return theta - lr * sum_over_ranks(partial)


def unrolled_sgd(
    net: nn.Module,
    flat_params_start: Tensor,
    images: Tensor,
    labels: Tensor,
    lrs: Tensor | float,
    steps: int,
    batch_size: int | None = None,
    augment: Augmenter | None = None,
    generator: torch.Generator | None = None,
    soft_labels: bool = False,
    *,
    return_trajectory: bool = False,
    create_graph: bool = True,
    owned: Tensor | None = None,
) -> Tensor | list[Tensor]:
    r"""Differentiable SGD unroll of ``steps`` steps on a synthetic set, in flat-parameter form.

    .. math::
        \theta_{i+1} = \theta_i - \eta_i \, \nabla_\theta\,
        \mathrm{CE}\big(f_{\theta_i}(A_i(X_{B_i})), Y_{B_i}\big), \qquad i = 0, \dots, N-1,

    with :math:`\theta_0` = ``flat_params_start``, :math:`B_i` the mini-batch of step :math:`i`
    (consecutive chunks of random permutations of the synthetic set, as MTT's ``batch_syn``; the whole
    set when ``batch_size`` is ``None``), :math:`A_i` the augmentation of step :math:`i` and
    :math:`\eta_i` = ``lrs`` (one learnable scalar, or one per step). With ``create_graph=True`` the
    result is differentiable with respect to ``flat_params_start``, ``images``, ``lrs`` and (soft)
    ``labels``, through the Hessian-vector products of every step.

    Args:
        net: template network; its parameters are not used or modified (buffers are used as they are).
        flat_params_start: :math:`\theta_0`, shape ``(P,)``. If it does not require grad, a detached
            leaf requiring grad is made from it (the unroll needs gradients with respect to it).
        images: synthetic images ``(N, C, H, W)``.
        labels: ``(N,)`` class indices, or ``(N, K)`` label distributions with ``soft_labels=True``
            (soft cross-entropy :math:`-\sum_k y_k \log \mathrm{softmax}(f)_k`).
        lrs: step size, a number, a 0-d / one-element tensor, or a tensor of shape ``(steps,)``.
        steps: number of SGD steps :math:`N`.
        batch_size: synthetic mini-batch size (``None``: full batch).
        augment: per-step augmentation called as ``augment(x, generator=g)`` (e.g. a
            :class:`~ipmcondense.augment.DifferentiableSiameseAugmentation`, per-sample parameters);
            ``None`` for none.
        generator: source of the mini-batch permutations and augmentation seeds (``None``: torch's
            global generator). The same generator state gives the same batches and augmentations as
            :func:`~ipmcondense.condensation.objectives.trajectory.trajectory_matching_loss_and_grads`.
        soft_labels: labels are distributions rather than indices.
        return_trajectory: return ``[theta_0, ..., theta_N]`` instead of ``theta_N``.
        create_graph: keep the graph of every step (``False``: a cheap detached forward unroll).
        owned: class-parallel (``torch.distributed``): a boolean mask of this rank's rows of ``images``;
            each step sums the ranks' gradients of their own rows (:func:`sgd_step`). ``None``: one process.

    Returns:
        :math:`\theta_N` (``(P,)``), or the list of the ``N + 1`` iterates.

    Cost: :math:`N` forward + backward passes on a batch; with ``create_graph=True`` memory grows
    linearly in :math:`N` (every step's activations and gradient graph are kept for the meta-backward,
    which costs about two more backward passes per step). See
    :func:`~ipmcondense.condensation.objectives.trajectory.trajectory_matching_loss_and_grads` for the constant-graph variant.
    """
    layout = FlatParameters(net)
    theta, images, labels, lrs, steps, batch_size = check_unroll_inputs(
        layout, flat_params_start, images, labels, lrs, steps, batch_size, soft_labels
    )
    plan = make_unroll_plan(images.shape[0], steps, batch_size, augment, generator, images.device)
    if not create_graph:
        images, labels, lrs = images.detach(), labels.detach(), lrs.detach()
    if not theta.requires_grad or not create_graph:
        theta = theta.detach().requires_grad_(True)
    trajectory = [theta]
    for step in range(steps):
        nxt = sgd_step(net, layout, theta, images, labels, step_size_at(lrs, step), plan, step, augment, create_graph,
                       owned)
        theta = nxt if create_graph else nxt.detach().requires_grad_(True)
        trajectory.append(theta)
    if not create_graph:
        trajectory = [t.detach() for t in trajectory]
    return trajectory if return_trajectory else trajectory[-1]


# ===================================================================== implicit differentiation
def conjugate_gradient(
    hvp: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 20, tolerance: float = 1e-20
) -> Tensor:
    r"""Solve :math:`H x = b` for symmetric positive definite :math:`H` given only :math:`v \mapsto Hv`.

    Plain conjugate gradients from :math:`x_0 = 0`, at most ``iterations`` steps, stopping when
    :math:`\|r\|^2 \le \mathrm{tolerance} \cdot \|b\|^2`. Exact after ``dim`` steps in exact arithmetic.
    Cost: one Hessian-vector product per iteration.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum()
    stop = tolerance * rr
    for _ in range(int(iterations)):
        if float(rr) <= float(stop) or float(rr) == 0.0:
            break
        hp = hvp(p)
        alpha = rr / (p * hp).sum()
        x = x + alpha * p
        r = r - alpha * hp
        rr_new = (r * r).sum()
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def neumann_series(hvp: Callable[[Tensor], Tensor], b: Tensor, alpha: float, iterations: int = 20) -> Tensor:
    r""":math:`H^{-1} b \approx \alpha \sum_{k=0}^{K} (I - \alpha H)^k b` (truncated Neumann series).

    Converges for :math:`0 < \alpha < 2/\lambda_{max}(H)` with error :math:`O((1 - \alpha\lambda_{min})^{K})`.
    Cost: one Hessian-vector product per term.
    """
    term = b.clone()
    total = b.clone()
    for _ in range(int(iterations)):
        term = term - alpha * hvp(term)
        total = total + term
    return alpha * total


def _largest_eigenvalue(hvp: Callable[[Tensor], Tensor], like: Tensor, iterations: int = 30) -> float:
    """Power iteration from a fixed start (no randomness): an estimate of :math:`\\lambda_{max}(H)`."""
    v = torch.ones_like(like)
    v = v / v.norm()
    value = 0.0
    for _ in range(iterations):
        w = hvp(v)
        value = float((v * w).sum())
        norm = w.norm()
        if float(norm) == 0.0:
            return 0.0
        v = w / norm
    return value


def implicit_hypergradient(
    inner_loss: Callable[[Tensor], Tensor],
    outer_loss: Callable[[Tensor], Tensor],
    solution: Tensor,
    hyperparameters: Sequence[Tensor],
    *,
    solver: str = "cg",
    iterations: int = 20,
    alpha: float | None = None,
) -> tuple[Tensor, list[Tensor | None]]:
    r"""Hypergradient of :math:`L_{out}(w^*(\lambda))` at an inner optimum :math:`w^* = \arg\min_w L_{in}(w, \lambda)`.

    By the implicit function theorem (:math:`\nabla_w L_{in}(w^*, \lambda) = 0`, Hessian
    :math:`H = \nabla^2_w L_{in}` positive definite),

    .. math:: \frac{d L_{out}}{d\lambda} = -\big(\partial_\lambda \nabla_w L_{in}\big)^{\top} v, \qquad H v = \nabla_w L_{out}(w^*),

    with :math:`v` from :func:`conjugate_gradient` (``solver="cg"``) or :func:`neumann_series`
    (``"neumann"``; ``alpha`` default :math:`1/\lambda_{max}(H)` by power iteration). ``inner_loss(w)``
    must depend on the hyperparameters through its graph; ``outer_loss(w)`` is assumed not to depend on
    them directly. Cost: ``iterations`` Hessian-vector products + one mixed second derivative.

    Returns:
        ``(outer loss value, [gradient or None per hyperparameter])``.
    """
    check_choice(solver, ("cg", "neumann"), "solver")
    w = solution.detach().requires_grad_(True)
    with torch.enable_grad():
        outer = outer_loss(w)
        (g_out,) = torch.autograd.grad(outer, w)
        w_inner = solution.detach().requires_grad_(True)
        (g_in,) = torch.autograd.grad(inner_loss(w_inner), w_inner, create_graph=True)

        def hvp(v: Tensor) -> Tensor:
            (hv,) = torch.autograd.grad(g_in, w_inner, grad_outputs=v, retain_graph=True)
            return hv

        if solver == "cg":
            v = conjugate_gradient(hvp, g_out, iterations)
        else:
            step = alpha if alpha is not None else 1.0 / max(_largest_eigenvalue(hvp, g_out), 1e-12)
            v = neumann_series(hvp, g_out, step, iterations)
        grads = torch.autograd.grad(-(g_in * v.detach()).sum(), list(hyperparameters), allow_unused=True)
    return outer.detach(), list(grads)
