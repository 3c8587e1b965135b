r"""Training trajectories: flat-parameter networks, differentiable SGD unrolls and expert buffers.

The building blocks of the trajectory-based recipes (MTT, its TESLA-style constant-memory variant,
DATM, and the unrolled bilevel objectives of DD):

* a network's parameters seen as **one flat vector** :math:`\theta \in \mathbb{R}^P`
  (:class:`FlatParameters`, :func:`flatten_parameters`, :func:`functional_forward`): the module is
  only a template, the forward pass runs on views of the vector through
  :func:`torch.func.functional_call`, so nothing is deep-copied and the parameters can be any
  differentiable function of other tensors;
* :func:`unrolled_sgd`: :math:`N` differentiable SGD steps
  :math:`\theta_{i+1} = \theta_i - \eta_i \nabla_\theta \ell(f_{\theta_i}(A_i(X_{B_i})), Y_{B_i})`
  on a synthetic set :math:`(X, Y)`, keeping the graph (``create_graph=True``) so that a loss on
  :math:`\theta_N` can be differentiated with respect to :math:`X`, the step sizes :math:`\eta` and
  soft labels :math:`Y`;
* :func:`trajectory_matching_loss` (MTT):
  :math:`\|\theta_N - \theta^*_{t+M}\|^2 / \|\theta^*_t - \theta^*_{t+M}\|^2`;
* :func:`trajectory_matching_loss_and_grads`: the same loss and its gradients by a reverse pass with
  recomputation, whose memory holds :math:`N` parameter vectors and one step's graph instead of the
  graphs of all :math:`N` steps;
* expert trajectories: :func:`train_experts` writes a resumable buffer of SGD trajectories on the real
  data, :class:`ExpertBuffer` reads it back and samples (start, target) pairs.

To first order in the step size, the student's displacement is an accumulated gradient:
:math:`(\theta_N - \theta_0)/\eta \to -\sum_{i<N} \nabla_\theta \ell_i(\theta_0)` as
:math:`\eta \to 0`, so trajectory matching is gradient matching summed along the unroll (tested).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.augment import DifferentiableSiameseAugmentation, dsa_strategy_for
from ipmcondense.nets import get_network

__all__ = [
    "FlatParameters",
    "flatten_parameters",
    "functional_forward",
    "load_flat_parameters",
    "unrolled_sgd",
    "trajectory_matching_loss",
    "trajectory_matching_loss_and_grads",
    "TrajectoryMatchingGradients",
    "train_experts",
    "ExpertTrainingReport",
    "ExpertBuffer",
    "ExpertSample",
    "ExpertBufferNotFoundError",
    "ExpertBufferMismatchError",
    "BUFFER_METADATA_FILE",
    "BUFFER_FORMAT",
    "BUFFER_FORMAT_VERSION",
    "expert_file_name",
]

#: Name of the metadata file of an expert buffer directory.
BUFFER_METADATA_FILE = "buffer.json"
#: Value of the ``"format"`` key of ``buffer.json``.
BUFFER_FORMAT = "ipmcondense-expert-buffer"
#: Version of the on-disk layout (bumped on incompatible changes).
BUFFER_FORMAT_VERSION = 1

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
class _UnrollPlan:
    """The randomness of an unroll, fixed in advance so that every step can be replayed.

    ``indices[i]`` are the synthetic examples of step ``i`` (``None``: all of them); ``augment_seeds[i]``
    seeds a private generator for step ``i``'s augmentation (``None``: no augmentation).
    """

    indices: tuple[Tensor | None, ...]
    augment_seeds: tuple[int | None, ...]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _make_plan(
    n: int,
    steps: int,
    batch_size: int | None,
    augment: Augmenter | None,
    generator: torch.Generator | None,
    device: torch.device,
) -> _UnrollPlan:
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
    return _UnrollPlan(tuple(indices), tuple(seeds))


def _check_unroll_inputs(
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
    steps = _positive_int(steps, "steps")
    if batch_size is not None:
        batch_size = _positive_int(batch_size, "batch_size")
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


def _lr_at(lrs: Tensor, step: int) -> Tensor:
    return lrs.reshape(()) if lrs.numel() == 1 else lrs[step]


def _sgd_step(
    net: nn.Module,
    layout: FlatParameters,
    theta: Tensor,
    images: Tensor,
    labels: Tensor,
    lr: Tensor,
    plan: _UnrollPlan,
    step: int,
    augment: Augmenter | None,
    create_graph: bool,
) -> Tensor:
    """One SGD step :math:`\\theta - \\eta \\nabla_\\theta \\ell` on step ``step``'s batch."""
    idx = plan.indices[step]
    x = images if idx is None else images[idx]
    y = labels if idx is None else labels[idx]
    seed = plan.augment_seeds[step]
    if seed is not None and augment is not None:
        x = augment(x, generator=torch.Generator(device=x.device).manual_seed(seed))
    loss = F.cross_entropy(layout.forward(net, theta, x), y)
    (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
    return theta - lr * grad


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
            :func:`trajectory_matching_loss_and_grads`.
        soft_labels: labels are distributions rather than indices.
        return_trajectory: return ``[theta_0, ..., theta_N]`` instead of ``theta_N``.
        create_graph: keep the graph of every step (``False``: a cheap detached forward unroll).

    Returns:
        :math:`\theta_N` (``(P,)``), or the list of the ``N + 1`` iterates.

    Cost: :math:`N` forward + backward passes on a batch; with ``create_graph=True`` memory grows
    linearly in :math:`N` (every step's activations and gradient graph are kept for the meta-backward,
    which costs about two more backward passes per step). See
    :func:`trajectory_matching_loss_and_grads` for the constant-graph variant.
    """
    layout = FlatParameters(net)
    theta, images, labels, lrs, steps, batch_size = _check_unroll_inputs(
        layout, flat_params_start, images, labels, lrs, steps, batch_size, soft_labels
    )
    plan = _make_plan(images.shape[0], steps, batch_size, augment, generator, images.device)
    if not create_graph:
        images, labels, lrs = images.detach(), labels.detach(), lrs.detach()
    if not theta.requires_grad or not create_graph:
        theta = theta.detach().requires_grad_(True)
    trajectory = [theta]
    for step in range(steps):
        nxt = _sgd_step(net, layout, theta, images, labels, _lr_at(lrs, step), plan, step, augment, create_graph)
        theta = nxt if create_graph else nxt.detach().requires_grad_(True)
        trajectory.append(theta)
    if not create_graph:
        trajectory = [t.detach() for t in trajectory]
    return trajectory if return_trajectory else trajectory[-1]


# ===================================================================== trajectory matching loss
def trajectory_matching_loss(student_end: Tensor, expert_start: Tensor, expert_target: Tensor) -> Tensor:
    r"""MTT's normalised parameter-matching loss.

    .. math::
        \mathcal{L} = \frac{\|\hat\theta_N - \theta^*_{t+M}\|_2^2}{\|\theta^*_t - \theta^*_{t+M}\|_2^2}

    (MTT also divides both norms by the parameter count, which cancels). Zero when the student lands
    on the expert's target; 1 when it does not move. Differentiable in ``student_end``.
    Cost: :math:`O(P)`.

    Raises:
        ValueError: shapes differ, non-finite values, or ``expert_start`` equals ``expert_target``
            (the normaliser is zero: pick ``expert_epochs >= 1`` on a trajectory that moves).
    """
    for name, value in (("student_end", student_end), ("expert_start", expert_start), ("expert_target", expert_target)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {type(value).__name__}")
    if not (student_end.shape == expert_start.shape == expert_target.shape):
        raise ValueError(
            "student_end, expert_start and expert_target must have the same shape, got "
            f"{tuple(student_end.shape)}, {tuple(expert_start.shape)} and {tuple(expert_target.shape)}"
        )
    target = expert_target.detach()
    normaliser = (expert_start.detach() - target).pow(2).sum()
    value = float(normaliser)
    if not math.isfinite(value):
        raise ValueError("expert_start and expert_target must be finite")
    if value == 0.0:
        raise ValueError(
            "expert_start equals expert_target, so the trajectory-matching normaliser is zero; "
            "use expert_epochs >= 1 on a trajectory whose parameters change"
        )
    return (student_end - target).pow(2).sum() / normaliser


class TrajectoryMatchingGradients(NamedTuple):
    """Result of :func:`trajectory_matching_loss_and_grads` (all detached).

    Attributes:
        loss: the trajectory-matching loss (0-d).
        images_grad: :math:`\\partial\\mathcal{L}/\\partial X`, shaped like ``images``.
        lrs_grad: :math:`\\partial\\mathcal{L}/\\partial \\eta`, shaped like ``lrs``.
        labels_grad: :math:`\\partial\\mathcal{L}/\\partial Y` for soft labels, else ``None``.
        student_end: the student's final parameters :math:`\\theta_N`.
    """

    loss: Tensor
    images_grad: Tensor
    lrs_grad: Tensor
    labels_grad: Tensor | None
    student_end: Tensor


def trajectory_matching_loss_and_grads(
    net: nn.Module,
    expert_start: Tensor,
    expert_target: Tensor,
    images: Tensor,
    labels: Tensor,
    lrs: Tensor | float,
    steps: int,
    batch_size: int | None = None,
    augment: Augmenter | None = None,
    generator: torch.Generator | None = None,
    soft_labels: bool = False,
) -> TrajectoryMatchingGradients:
    r"""MTT loss and its gradients by a reverse pass with recomputation (TESLA-like memory).

    Forward: the student unroll of :func:`unrolled_sgd` from :math:`\theta_0 = \theta^*_t` without
    graphs, keeping only the iterates :math:`\theta_0, \dots, \theta_{N-1}`. Backward: with the
    adjoint :math:`a_N = \partial\mathcal{L}/\partial\theta_N = 2(\theta_N - \theta^*_{t+M}) / D`,
    walk :math:`i = N-1, \dots, 0`, rebuild step :math:`i`'s graph
    :math:`\theta_{i+1} = \theta_i - \eta_i g_i(\theta_i, X, Y)` alone and take one vector-Jacobian
    product

    .. math::
        a_i = a_{i+1} - \eta_i H_i a_{i+1}, \quad
        \nabla_X \mathrel{+}= -\eta_i \big(\partial_X g_i\big)^{\!\top} a_{i+1}, \quad
        \nabla_{\eta_i} = -\langle g_i, a_{i+1} \rangle,

    (and likewise for soft labels). The result equals the gradient of the full unroll of
    :func:`unrolled_sgd` + :func:`trajectory_matching_loss` (same batches and augmentations for the
    same ``generator`` state) up to floating-point rounding.

    Args: as :func:`unrolled_sgd`; ``expert_start`` / ``expert_target`` are :math:`\theta^*_t` and
    :math:`\theta^*_{t+M}` (``(P,)``), the student starts at ``expert_start``.

    Returns:
        :class:`TrajectoryMatchingGradients`. To feed an optimizer, set ``images.grad`` (or call
        ``decoded_images.backward(images_grad)`` when the images are decoded from other parameters).

    Cost: about 1.5x the time of the full unroll (every step's forward and backward are run twice);
    memory: :math:`N` parameter vectors (:math:`NP` numbers) plus the graph of a single step,
    instead of the activations and graphs of all :math:`N` steps.
    """
    layout = FlatParameters(net)
    theta0, images, labels, lrs, steps, batch_size = _check_unroll_inputs(
        layout, expert_start, images, labels, lrs, steps, batch_size, soft_labels
    )
    layout.check_vector(expert_target, "expert_target")
    plan = _make_plan(images.shape[0], steps, batch_size, augment, generator, images.device)

    images_leaf = images.detach().requires_grad_(True)
    lrs_leaf = lrs.detach().requires_grad_(True)
    labels_leaf = labels.detach().requires_grad_(True) if soft_labels else labels.detach()

    # forward without graphs: keep theta_0 .. theta_{N-1}
    iterates: list[Tensor | None] = []
    theta = theta0.detach()
    for step in range(steps):
        iterates.append(theta)
        nxt = _sgd_step(
            net, layout, theta.detach().requires_grad_(True), images_leaf.detach(), labels_leaf.detach(),
            _lr_at(lrs_leaf.detach(), step), plan, step, augment, create_graph=False,
        )
        theta = nxt.detach()
    student_end = theta

    end = student_end.requires_grad_(True)
    loss = trajectory_matching_loss(end, expert_start.detach(), expert_target.detach())
    (adjoint,) = torch.autograd.grad(loss, end)
    student_end = student_end.detach()

    images_grad = torch.zeros_like(images_leaf)
    lrs_grad = torch.zeros_like(lrs_leaf)
    labels_grad = torch.zeros_like(labels_leaf) if soft_labels else None
    for step in reversed(range(steps)):
        theta_i = iterates[step].detach().requires_grad_(True)  # type: ignore[union-attr]
        nxt = _sgd_step(
            net, layout, theta_i, images_leaf, labels_leaf, _lr_at(lrs_leaf, step), plan, step, augment,
            create_graph=True,
        )
        inputs = [theta_i, images_leaf, lrs_leaf] + ([labels_leaf] if soft_labels else [])
        grads = torch.autograd.grad(nxt, inputs, grad_outputs=adjoint, allow_unused=True)
        adjoint = grads[0].detach()
        if grads[1] is not None:
            images_grad += grads[1]
        if grads[2] is not None:
            lrs_grad += grads[2]
        if soft_labels and grads[3] is not None:
            labels_grad += grads[3]
        iterates[step] = None  # release memory as we go
    return TrajectoryMatchingGradients(loss.detach(), images_grad, lrs_grad, labels_grad, student_end)


# ============================================================================ expert buffers
class ExpertBufferNotFoundError(FileNotFoundError, ValueError):
    """No expert buffer at the given path (the message says how to create one)."""


class ExpertBufferMismatchError(ValueError):
    """An expert buffer was made for another dataset, architecture or training setting."""


def expert_file_name(index: int) -> str:
    """File name of expert ``index`` inside a buffer directory: ``expert_{index:03d}.pt``."""
    return f"expert_{int(index):03d}.pt"


def _create_command(dataset: str = "NAME", arch: str | None = None, path: str | os.PathLike = "DIR") -> str:
    arch_part = f" --arch {arch}" if arch else ""
    return f"ipmcondense experts --dataset {dataset}{arch_part} --n-experts K --epochs E --out {path}"


def _expert_seed(seed: int, index: int) -> int:
    """Independent seed of expert ``index`` of a buffer seeded with ``seed`` (stable when adding experts)."""
    return int(np.random.SeedSequence(entropy=int(seed), spawn_key=(int(index),)).generate_state(1, np.uint64)[0] >> 1)


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _library_version() -> str:
    from ipmcondense import __version__

    return __version__


#: Settings that must agree between a buffer on disk and a request to extend or use it.
_SETTING_KEYS = (
    "dataset",
    "image_shape",
    "num_classes",
    "train_size",
    "arch",
    "num_params",
    "epochs",
    "lr",
    "batch_size",
    "augment",
    "dsa_strategy",
    "seed",
)


@dataclass
class ExpertTrainingReport:
    """Summary of a :func:`train_experts` call.

    Attributes:
        out_dir: the buffer directory.
        dataset, arch, epochs, num_params: the buffer's settings.
        n_experts: experts present in the buffer after the call.
        trained: indices trained by this call; ``skipped``: indices found complete and kept;
        retrained_corrupt: indices whose files were unreadable or inconsistent and were retrained.
        test_accuracy: final test accuracy of each expert in the buffer, by index.
        seconds: wall time of the call; size_bytes: total size of the expert files.
    """

    out_dir: str
    dataset: str
    arch: str
    epochs: int
    num_params: int
    n_experts: int
    trained: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    retrained_corrupt: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary."""
        return asdict(self)


def _settings(
    dataset: Any, arch: str, epochs: int, lr: float, batch_size: int, augment: bool, seed: int, num_params: int
) -> dict[str, Any]:
    return {
        "dataset": dataset.name,
        "image_shape": [int(s) for s in dataset.train_images.shape[1:]],
        "num_classes": int(dataset.num_classes),
        "train_size": int(dataset.train_images.shape[0]),
        "arch": arch,
        "num_params": int(num_params),
        "epochs": int(epochs),
        "lr": float(lr),
        "batch_size": int(batch_size),
        "augment": bool(augment),
        "dsa_strategy": dsa_strategy_for(dataset) if augment else None,
        "seed": int(seed),
    }


def _mismatches(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    return [
        f"{key}={stored.get(key)!r} (buffer) vs {requested[key]!r} (requested)"
        for key in _SETTING_KEYS
        if stored.get(key) != requested[key]
    ]


def _load_expert_file(path: Path, *, mmap: bool = True) -> dict[str, Any]:
    from ipmcondense.data.files import torch_load_weights_only

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # noqa: BLE001 - older files or file systems without mmap; errors named below
        data = torch_load_weights_only(path, "expert file")
    if not isinstance(data, dict) or "trajectory" not in data or "metadata" not in data:
        raise ValueError(f"{path} is not an ipmcondense expert file (expected keys 'trajectory' and 'metadata')")
    return data


def _valid_expert(path: Path, index: int, settings: dict[str, Any], expert_seed: int) -> bool:
    """Whether ``path`` holds a complete, readable expert ``index`` made with ``settings``."""
    if not path.is_file():
        return False
    try:
        data = _load_expert_file(path)
        trajectory, meta = data["trajectory"], data["metadata"]
        shape_ok = tuple(trajectory.shape) == (settings["epochs"] + 1, settings["num_params"])
        meta_ok = (
            meta.get("index") == index
            and meta.get("seed") == expert_seed
            and not _mismatches(meta.get("settings", {}), settings)
        )
        return bool(shape_ok and meta_ok and torch.isfinite(trajectory).all())
    except Exception:  # noqa: BLE001 - any unreadable file (truncated zip, bad pickle) is retrained
        return False


def _build_network(arch: str, channels: int, num_classes: int, image_size: tuple[int, int], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_network(arch, channels, num_classes, image_size)


@torch.no_grad()
def _accuracy(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    was_training = net.training
    net.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = net(images[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    net.train(was_training)
    return correct / max(1, images.shape[0])


def _train_one_expert(
    dataset: Any,
    arch: str,
    epochs: int,
    lr: float,
    batch_size: int,
    augmentation: DifferentiableSiameseAugmentation | None,
    expert_seed: int,
    device: torch.device,
    images: Tensor,
    labels: Tensor,
    on_epoch: Callable[[], None],
) -> tuple[Tensor, list[float], float]:
    net = _build_network(arch, dataset.channels, dataset.num_classes, tuple(dataset.image_size), expert_seed).to(device)
    layout = FlatParameters(net)
    generator = torch.Generator(device=device).manual_seed(expert_seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    trajectory = torch.empty(epochs + 1, layout.numel, dtype=torch.float32)
    trajectory[0] = layout.flatten(net).float().cpu()
    train_loss: list[float] = []
    n = images.shape[0]
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=generator, device=device)
        total = torch.zeros((), device=device)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            x = images[idx]
            if augmentation is not None:
                x = augmentation(x, generator=generator)
            loss = F.cross_entropy(net(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * idx.numel()
        train_loss.append(float(total) / n)
        if not math.isfinite(train_loss[-1]):
            raise ValueError(
                f"expert training diverged (loss {train_loss[-1]} at epoch {epoch + 1}); lower lr (got {lr})"
            )
        trajectory[epoch + 1] = layout.flatten(net).float().cpu()
        on_epoch()
    test_images = dataset.test_images.to(device)
    test_labels = dataset.test_labels.to(device)
    return trajectory, train_loss, _accuracy(net, test_images, test_labels)


def train_experts(
    dataset: Any,
    n_experts: int,
    epochs: int,
    out_dir: str | os.PathLike,
    arch: str = "convnet",
    lr: float = 0.01,
    batch_size: int = 256,
    augment: bool = True,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> ExpertTrainingReport:
    r"""Train ``n_experts`` networks on the real training set and store their trajectories (MTT buffer).

    Each expert is a fresh ``arch`` network trained with plain SGD (step ``lr``, no momentum, no
    weight decay, no decay of the step; MTT's ``buffer.py`` with ``--mom 0 --l2 0``) for ``epochs``
    epochs of shuffled mini-batches of ``batch_size``, each batch augmented with DSA (independent
    per-sample parameters, strategy :func:`~ipmcondense.augment.dsa_strategy_for`) unless
    ``augment=False``. Its parameters are recorded at initialisation and after every epoch.

    On disk (``out_dir``): ``expert_{k:03d}.pt`` holds ``{"trajectory": float32 (epochs + 1, P),
    "metadata": {...}}`` (per-epoch train loss, test accuracy, seed, settings), and ``buffer.json``
    the buffer's settings and the list of completed experts. Every file is written atomically
    (temporary file + ``os.replace``), so an interruption never leaves a half-written expert.

    Resuming: calling again with the same ``out_dir`` keeps every complete expert (files untouched),
    retrains missing or unreadable ones and adds experts up to ``n_experts``. Expert ``k`` is seeded
    from ``(seed, k)`` alone, so an extended buffer equals one trained in one go.

    Args:
        dataset: a :class:`~ipmcondense.data.LabelledImages`.
        n_experts: number of experts the buffer should hold.
        epochs: training epochs per expert (``epochs + 1`` snapshots).
        out_dir: buffer directory (created if missing).
        arch: network name for :func:`~ipmcondense.nets.get_network`.
        lr: SGD step size (MTT's ``lr_teacher``).
        batch_size: real mini-batch size.
        augment: DSA during training.
        seed: base seed (initialisation, shuffling, augmentation of every expert).
        progress: tqdm progress bar on stderr.
        device: where to train (default: the dataset's device).

    Returns:
        An :class:`ExpertTrainingReport`.

    Raises:
        ExpertBufferMismatchError: ``out_dir`` holds a buffer made with other settings (the message
            lists them).

    Cost: ``n_experts * epochs`` epochs of training (about 3 network passes per image each) and
    ``4 n_experts (epochs + 1) P`` bytes on disk.
    """
    started = time.perf_counter()
    n_experts = _positive_int(n_experts, "n_experts")
    epochs = _positive_int(epochs, "epochs")
    batch_size = _positive_int(batch_size, "batch_size")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for attr in ("name", "train_images", "train_labels", "test_images", "test_labels", "num_classes"):
        if not hasattr(dataset, attr):
            raise TypeError(
                f"dataset must be a LabelledImages (from ipmcondense.data.load_dataset), got {type(dataset).__name__}"
            )
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a network name, got {type(arch).__name__}")
    arch = arch.lower().strip()
    device = torch.device(device) if device is not None else dataset.train_images.device
    template = _build_network(arch, dataset.channels, dataset.num_classes, tuple(dataset.image_size), 0)
    settings = _settings(dataset, arch, epochs, lr, batch_size, augment, int(seed), FlatParameters(template).numel)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / BUFFER_METADATA_FILE
    previous: dict[str, Any] = {}
    if meta_path.exists():
        try:
            previous = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ExpertBufferMismatchError(
                f"{meta_path} is unreadable ({err}); remove it (the expert files are kept and checked) "
                "or use another --out directory"
            ) from err
        if previous.get("format") != BUFFER_FORMAT:
            raise ExpertBufferMismatchError(f"{meta_path} is not an ipmcondense expert buffer")
        diff = _mismatches(previous, settings)
        if diff:
            raise ExpertBufferMismatchError(
                f"the expert buffer in {str(out)!r} was made with other settings: {'; '.join(diff)}. "
                "Rerun with the buffer's settings to extend it, or pick another --out directory."
            )

    report = ExpertTrainingReport(
        out_dir=str(out), dataset=dataset.name, arch=arch, epochs=epochs,
        num_params=settings["num_params"], n_experts=0,
    )
    # leftovers of an interrupted write
    for tmp in out.glob("*.tmp"):
        tmp.unlink()

    expert_seeds = {k: _expert_seed(seed, k) for k in range(n_experts)}
    completed: dict[int, dict[str, Any]] = {}
    to_train: list[int] = []
    previous_entries = {int(e["index"]): e for e in previous.get("experts", []) if isinstance(e, dict) and "index" in e}
    highest_previous = max(previous_entries, default=-1)
    for k in range(max(n_experts, highest_previous + 1)):
        path = out / expert_file_name(k)
        seed_k = expert_seeds.get(k, _expert_seed(seed, k))
        if _valid_expert(path, k, settings, seed_k):
            meta = _load_expert_file(path)["metadata"]
            completed[k] = {"index": k, "file": path.name, "seed": seed_k, "test_accuracy": meta.get("test_accuracy")}
            if k < n_experts:
                report.skipped.append(k)
        elif k < n_experts:
            if path.exists():
                report.retrained_corrupt.append(k)
            to_train.append(k)

    def write_metadata() -> None:
        payload = {
            "format": BUFFER_FORMAT,
            "format_version": BUFFER_FORMAT_VERSION,
            **settings,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "n_experts": len(completed),
            "experts": [completed[k] for k in sorted(completed)],
            "library_version": _library_version(),
            "torch_version": torch.__version__,
        }
        _write_json_atomic(meta_path, payload)

    write_metadata()
    images = dataset.train_images.to(device)
    labels = dataset.train_labels.to(device)
    augmentation = DifferentiableSiameseAugmentation(settings["dsa_strategy"]) if augment else None
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(to_train) * epochs, disable=not progress, desc=f"experts {dataset.name}/{arch}",
        unit="epoch", file=sys.stderr,
    )
    try:
        for k in to_train:
            trajectory, train_loss, test_accuracy = _train_one_expert(
                dataset, arch, epochs, lr, batch_size, augmentation, expert_seeds[k], device, images, labels,
                lambda: bar.update(1),
            )
            meta = {
                "index": k,
                "seed": expert_seeds[k],
                "settings": settings,
                "train_loss": train_loss,
                "test_accuracy": test_accuracy,
                "library_version": _library_version(),
            }
            path = out / expert_file_name(k)
            _save_atomic({"trajectory": trajectory.contiguous(), "metadata": meta}, path)
            completed[k] = {"index": k, "file": path.name, "seed": expert_seeds[k], "test_accuracy": test_accuracy}
            report.trained.append(k)
            write_metadata()
    finally:
        bar.close()

    report.n_experts = len(completed)
    report.test_accuracy = [float(completed[k]["test_accuracy"]) for k in sorted(completed)]
    report.size_bytes = int(sum((out / completed[k]["file"]).stat().st_size for k in completed))
    report.seconds = time.perf_counter() - started
    return report


class ExpertSample(NamedTuple):
    """One draw from an :class:`ExpertBuffer`: the student's start and the expert's target.

    Attributes:
        expert_index: which expert.
        start_epoch: :math:`t`.
        params_start: :math:`\\theta^*_t` ``(P,)``.
        params_target: :math:`\\theta^*_{t+M}` ``(P,)``.
    """

    expert_index: int
    start_epoch: int
    params_start: Tensor
    params_target: Tensor


class ExpertBuffer:
    """Read access to a directory of expert trajectories written by :func:`train_experts`.

    Expert files are opened memory-mapped and only the two snapshots of a draw are copied, so a
    buffer larger than memory can be sampled. Experts are addressed by their position
    ``0 .. n_experts - 1`` among the completed ones (equal to the file index ``k`` of
    ``expert_{k:03d}.pt`` unless a buffer has gaps; :meth:`indices` gives the mapping).

    Args:
        path: the buffer directory.
        dataset: optional dataset (a :class:`~ipmcondense.data.LabelledImages` or a name) to check
            against, see :meth:`check_compatible`.
        arch: optional network name to check against.

    Raises:
        ExpertBufferNotFoundError: no directory or no ``buffer.json`` (the message gives the
            ``ipmcondense experts`` command that creates one).
        ExpertBufferMismatchError: incompatible ``dataset`` / ``arch``.
    """

    def __init__(self, path: str | os.PathLike, dataset: Any = None, arch: str | None = None) -> None:
        self.path = Path(path)
        name = getattr(dataset, "name", dataset) if dataset is not None else "NAME"
        meta_path = self.path / BUFFER_METADATA_FILE
        if not self.path.is_dir() or not meta_path.is_file():
            what = "directory" if not self.path.is_dir() else f"{BUFFER_METADATA_FILE} in the directory"
            raise ExpertBufferNotFoundError(
                f"no expert buffer at {str(self.path)!r} (missing {what}); create one with: "
                f"{_create_command(str(name), arch, self.path)}"
            )
        try:
            self.metadata: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ExpertBufferMismatchError(f"{meta_path} is unreadable: {err}") from err
        if self.metadata.get("format") != BUFFER_FORMAT:
            raise ExpertBufferMismatchError(f"{meta_path} is not an ipmcondense expert buffer")
        if int(self.metadata.get("format_version", -1)) > BUFFER_FORMAT_VERSION:
            raise ExpertBufferMismatchError(
                f"{meta_path} has format version {self.metadata.get('format_version')}, newer than this "
                f"library's {BUFFER_FORMAT_VERSION}; upgrade ipmcondense"
            )
        self._files = [self.path / e["file"] for e in self.metadata.get("experts", [])]
        self._indices = [int(e["index"]) for e in self.metadata.get("experts", [])]
        if not self._files:
            raise ExpertBufferNotFoundError(
                f"the expert buffer at {str(self.path)!r} holds no completed expert yet; finish it with: "
                f"{_create_command(self.metadata.get('dataset', 'NAME'), self.metadata.get('arch'), self.path)}"
            )
        self._cache: dict[int, Tensor] = {}
        if dataset is not None or arch is not None:
            self.check_compatible(dataset, arch)

    def __repr__(self) -> str:
        return (
            f"ExpertBuffer({str(self.path)!r}, dataset={self.dataset_name!r}, arch={self.arch!r}, "
            f"n_experts={self.n_experts}, epochs={self.epochs})"
        )

    def __len__(self) -> int:
        return self.n_experts

    # ----------------------------------------------------------------------------- properties
    @property
    def n_experts(self) -> int:
        """Number of completed experts."""
        return len(self._files)

    @property
    def epochs(self) -> int:
        """Training epochs per expert (each trajectory has ``epochs + 1`` snapshots)."""
        return int(self.metadata["epochs"])

    @property
    def num_params(self) -> int:
        """Parameter count ``P`` of the network."""
        return int(self.metadata["num_params"])

    @property
    def arch(self) -> str:
        """Network name."""
        return str(self.metadata["arch"])

    @property
    def dataset_name(self) -> str:
        """Name of the dataset the experts were trained on."""
        return str(self.metadata["dataset"])

    @property
    def lr(self) -> float:
        """The experts' SGD step size (MTT's ``lr_teacher``, the usual init of the learnable ``syn_lr``)."""
        return float(self.metadata["lr"])

    # ------------------------------------------------------------------------------- checking
    def check_compatible(self, dataset: Any = None, arch: str | None = None) -> None:
        """Raise :class:`ExpertBufferMismatchError` unless the buffer fits ``dataset`` and ``arch``.

        ``dataset`` may be a name (name compared) or a :class:`~ipmcondense.data.LabelledImages`
        (name, image shape and class count compared); ``arch`` is compared case-insensitively.
        The message names each mismatch and the command that makes a matching buffer.
        """
        problems: list[str] = []
        name = None
        if dataset is not None:
            name = dataset if isinstance(dataset, str) else getattr(dataset, "name", None)
            if name is None:
                raise TypeError(f"dataset must be a name or a LabelledImages, got {type(dataset).__name__}")
            if name.lower() != self.dataset_name.lower():
                problems.append(f"dataset {self.dataset_name!r} (buffer) vs {name!r} (requested)")
            elif not isinstance(dataset, str):
                shape = [int(s) for s in dataset.train_images.shape[1:]]
                if shape != list(self.metadata["image_shape"]):
                    problems.append(f"image shape {self.metadata['image_shape']} (buffer) vs {shape} (requested)")
                if int(dataset.num_classes) != int(self.metadata["num_classes"]):
                    problems.append(
                        f"num_classes {self.metadata['num_classes']} (buffer) vs {dataset.num_classes} (requested)"
                    )
        if arch is not None:
            if not isinstance(arch, str):
                raise TypeError(f"arch must be a network name, got {type(arch).__name__}")
            if arch.lower().strip() != self.arch.lower():
                problems.append(f"arch {self.arch!r} (buffer) vs {arch!r} (requested)")
        if problems:
            raise ExpertBufferMismatchError(
                f"the expert buffer at {str(self.path)!r} does not fit: {'; '.join(problems)}. "
                f"Make a matching buffer with: {_create_command(name or self.dataset_name, arch or self.arch, 'DIR')}"
            )

    # --------------------------------------------------------------------------------- access
    def trajectory(self, expert_index: int) -> Tensor:
        """Expert ``expert_index``'s trajectory, float32 ``(epochs + 1, P)`` (memory-mapped, CPU; do not modify)."""
        position = self._position(expert_index)
        if position not in self._cache:
            path = self._files[position]
            if not path.is_file():
                raise ExpertBufferNotFoundError(
                    f"expert file {str(path)!r} listed in {BUFFER_METADATA_FILE} is missing; rerun "
                    f"{_create_command(self.dataset_name, self.arch, self.path)} to retrain it"
                )
            tensor = _load_expert_file(path)["trajectory"]
            if tuple(tensor.shape) != (self.epochs + 1, self.num_params):
                raise ExpertBufferMismatchError(
                    f"{path} holds a trajectory of shape {tuple(tensor.shape)}, expected "
                    f"({self.epochs + 1}, {self.num_params})"
                )
            self._cache[position] = tensor
        return self._cache[position]

    def _position(self, expert_index: int) -> int:
        if isinstance(expert_index, bool) or not isinstance(expert_index, (int, np.integer)) or not (
            0 <= expert_index < self.n_experts
        ):
            raise ValueError(f"expert_index must be an integer in [0, {self.n_experts}), got {expert_index!r}")
        return int(expert_index)

    def snapshot(
        self,
        expert_index: int,
        epoch: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """A copy of expert ``expert_index``'s flat parameters after ``epoch`` epochs (0 = init): ``(P,)``."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or not 0 <= epoch <= self.epochs:
            raise ValueError(f"epoch must be an integer in [0, {self.epochs}], got {epoch!r}")
        return self.trajectory(expert_index)[int(epoch)].to(device=device, dtype=dtype, copy=True)

    def build_network(self, seed: int = 0) -> nn.Module:
        """A fresh network of the buffer's architecture and input geometry (a template for the student)."""
        channels, height, width = self.metadata["image_shape"]
        return _build_network(self.arch, channels, int(self.metadata["num_classes"]), (height, width), seed)

    def network(self, expert_index: int, epoch: int, device: torch.device | str | None = None) -> nn.Module:
        """The expert's network after ``epoch`` epochs, as an ``nn.Module`` (e.g. for DATM's soft labels)."""
        net = self.build_network()
        load_flat_parameters(net, self.snapshot(expert_index, epoch))
        return net.to(device) if device is not None else net

    def sample(
        self,
        generator: torch.Generator | None = None,
        max_start_epoch: int | None = None,
        expert_epochs: int = 2,
        *,
        min_start_epoch: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> ExpertSample:
        r"""Draw an expert uniformly and a start epoch :math:`t \sim U\{t_{min}, \dots, T^+ - 1\}`.

        Returns :math:`(k, t, \theta^*_{k,t}, \theta^*_{k,t+M})` with ``M = expert_epochs``.

        Args:
            generator: source of randomness (CPU generator; ``None``: torch's global one).
            max_start_epoch: :math:`T^+` (exclusive upper bound of the start epoch, as MTT's
                ``max_start_epoch``); default ``epochs - expert_epochs + 1`` (every valid start).
            expert_epochs: :math:`M \ge 1`.
            min_start_epoch: lower bound of the start epoch (DATM's window; default 0).
            device, dtype: where and how the two parameter vectors are returned.

        Raises:
            ValueError: an empty range, or ``max_start_epoch - 1 + expert_epochs > epochs``.
        """
        expert_epochs = _positive_int(expert_epochs, "expert_epochs")
        if expert_epochs > self.epochs:
            raise ValueError(f"expert_epochs must be at most the buffer's epochs ({self.epochs}), got {expert_epochs}")
        if max_start_epoch is None:
            max_start_epoch = self.epochs - expert_epochs + 1
        max_start_epoch = _positive_int(max_start_epoch, "max_start_epoch")
        if (
            isinstance(min_start_epoch, bool)
            or not isinstance(min_start_epoch, (int, np.integer))
            or min_start_epoch < 0
        ):
            raise ValueError(f"min_start_epoch must be a non-negative integer, got {min_start_epoch!r}")
        if min_start_epoch >= max_start_epoch:
            raise ValueError(
                f"min_start_epoch ({min_start_epoch}) must be below max_start_epoch ({max_start_epoch})"
            )
        if max_start_epoch - 1 + expert_epochs > self.epochs:
            raise ValueError(
                f"max_start_epoch - 1 + expert_epochs = {max_start_epoch - 1 + expert_epochs} exceeds the buffer's "
                f"{self.epochs} epochs; use max_start_epoch <= {self.epochs - expert_epochs + 1}"
            )
        gen_device = generator.device if generator is not None else torch.device("cpu")
        k = int(torch.randint(0, self.n_experts, (1,), generator=generator, device=gen_device).item())
        t = int(
            torch.randint(int(min_start_epoch), max_start_epoch, (1,), generator=generator, device=gen_device).item()
        )
        return ExpertSample(
            k,
            t,
            self.snapshot(k, t, device=device, dtype=dtype),
            self.snapshot(k, t + expert_epochs, device=device, dtype=dtype),
        )

    def indices(self) -> Sequence[int]:
        """The training indices (``expert_{index:03d}.pt``) of the experts, by position."""
        return tuple(self._indices)
