r"""The one training loop of the library: SGD steps of a network on (image, label) batches.

Evaluation (:func:`ipmcondense.evaluation.train_network`), expert training
(:func:`ipmcondense.trajectories.train_experts`) and the inner loops of the parameter samplers
(:mod:`ipmcondense.condensation.samplers`) all train through :func:`train_on_batches`, so every
network the library trains sees the same step:

.. math:: \theta \leftarrow \mathrm{opt}\big(\theta, \nabla_\theta\, \ell(f_\theta(A(x_B)), y_B)\big)

with :math:`A` a per-sample augmentation drawn from the caller's generator and :math:`\ell` the
cross-entropy (hard labels or label distributions). Cost: one forward and one backward pass per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["shuffled_batches", "train_on_batches", "train_epoch"]


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
) -> list[Tensor]:
    """One optimiser step per ``(images, labels)`` batch; returns the detached batch losses in order.

    ``augmentation(images, generator=generator)`` is applied to each batch first when given. The
    network's mode (``train``/``eval``) and ``requires_grad`` flags are the caller's.
    """
    losses = []
    for images, labels in batches:
        if augmentation is not None:
            images = augmentation(images, generator=generator)
        loss = loss_fn(network(images), labels)
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
) -> list[Tensor]:
    """One epoch of :func:`train_on_batches` over ``(images, labels)`` in :func:`shuffled_batches` order."""
    batches = (
        (images[index], labels[index])
        for index in shuffled_batches(images.shape[0], batch_size, generator, images.device)
    )
    return train_on_batches(network, optimizer, batches, augmentation=augmentation, generator=generator,
                            loss_fn=loss_fn)
