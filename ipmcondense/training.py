r"""The one training loop of the library: SGD steps of a network on (image, label) batches.

Evaluation (:func:`ipmcondense.evaluation.train_network`), expert training
(:func:`ipmcondense.trajectories.train_experts`) and the inner loops of the parameter samplers
(:mod:`ipmcondense.condensation.samplers`) all train through :func:`train_on_batches`, so every
network the library trains sees the same step:

.. math:: \theta \leftarrow \mathrm{opt}\big(\theta, \nabla_\theta\, \ell(f_\theta(A(x_B)), y_B)\big)

with :math:`A` a per-sample augmentation drawn from the caller's generator and :math:`\ell` the
cross-entropy (hard labels or label distributions). Cost: one forward and one backward pass per batch.

Precision: every loop computes in float32 as the reference implementations do. ``precision="bfloat16"``
(:func:`autocast`) runs the network's forward pass under :func:`torch.autocast` with ``bfloat16``:
convolutions and matrix products take bfloat16 inputs (8 bits of mantissa) and accumulate in float32,
the parameters, their gradients, the optimiser state and the loss stay float32. On CPUs with AMX or
AVX512-BF16 (and on GPUs) the convolutions run about twice as fast; the accuracies it gives are
measured in ``benchmarks/time_to_accuracy.py`` (a library option, never a recipe's default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PRECISIONS", "autocast", "shuffled_batches", "train_on_batches", "train_epoch"]

#: the computation precisions a loop accepts, ``float32`` (the references) and ``bfloat16`` (autocast)
PRECISIONS = ("float32", "bfloat16")


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context of ``precision`` on ``device``: nothing for ``"float32"``, bfloat16 autocast otherwise.

    Raises:
        ValueError: ``precision`` not in :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device | str) -> list[Tensor]:
    """Index tensors of one epoch: a ``randperm(n)`` from ``generator`` cut into chunks of ``batch_size``.

    The permutation is drawn on the generator's device and moved to ``device``; the last chunk may be
    smaller.
    """
    order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    return [order[start : start + batch_size] for start in range(0, n, batch_size)]


def train_on_batches(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    augmentation: Callable[..., Tensor] | None = None,
    generator: torch.Generator | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    precision: str = "float32",
) -> list[Tensor]:
    """One optimiser step per ``(images, labels)`` batch; returns the detached batch losses in order.

    ``augmentation(images, generator=generator)`` is applied to each batch first when given (in
    float32). The network's mode (``train``/``eval``) and ``requires_grad`` flags are the caller's.
    ``precision="bfloat16"`` autocasts the forward pass (:func:`autocast`); the loss is taken on the
    float32 logits.
    """
    losses = []
    for images, labels in batches:
        if augmentation is not None:
            images = augmentation(images, generator=generator)
        with autocast(precision, images.device):
            logits = network(images)
        loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def train_epoch(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    generator: torch.Generator,
    *,
    augmentation: Callable[..., Tensor] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    precision: str = "float32",
) -> list[Tensor]:
    """One epoch of :func:`train_on_batches` over ``(images, labels)`` in :func:`shuffled_batches` order."""
    batches = (
        (images[index], labels[index])
        for index in shuffled_batches(images.shape[0], batch_size, generator, images.device)
    )
    return train_on_batches(network, optimizer, batches, augmentation=augmentation, generator=generator,
                            loss_fn=loss_fn, precision=precision)
