"""The ``real_batches`` axis: how the real images of each step are drawn.

A :class:`RealBatchSelector` answers ``sample(n_per_class) -> (images, labels)`` with a class-blocked
batch of real training images on the run's device, drawing every random choice from the run's one
generator (so a resumed run draws the same batches). Objectives and samplers call it; none of them
knows how the batch was chosen.

Registered selectors (:data:`REAL_BATCH_SELECTORS`): ``random`` (uniform without replacement within
each class, the references' ``get_images``). A new selector (e.g. representative k-means batches) is a
subclass with a ``name``, an ``Options`` dataclass and :meth:`~RealBatchSelector.sample`, plus a
registry entry; :meth:`~RealBatchSelector.state_dict` carries whatever it caches across steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from ipmcondense.components import Component, Registry

__all__ = ["RealBatchSelector", "RandomRealBatches", "REAL_BATCH_SELECTORS", "REAL_BATCH_NAMES", "build_real_batches"]


class RealBatchSelector(Component, ABC):
    """Draws class-blocked batches of real images (a component: ``name``, ``Options``).

    Args:
        images: ``(N, C, H, W)`` real training images on the run's device.
        labels: ``(N,)`` int64 labels.
        num_classes: number of classes.
        generator: the run's generator.
    """

    kind = "real-batch selector"

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, generator: torch.Generator) -> None:
        self.images, self.labels = images, labels
        self.num_classes, self.generator = int(num_classes), generator

    @classmethod
    def from_options(cls, options: Any, *, images: Tensor, labels: Tensor, num_classes: int,
                     generator: torch.Generator, **context: Any) -> RealBatchSelector:
        return cls(images, labels, num_classes, generator)

    @abstractmethod
    def sample(self, n_per_class: int) -> tuple[Tensor, Tensor]:
        """``(images, labels)``: up to ``n_per_class`` real images of every class, in class blocks 0..C-1."""

    def state_dict(self) -> dict[str, Any]:
        """State beyond the run's generator, for checkpoints (nothing by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class RandomRealBatches(RealBatchSelector):
    """``random``: ``n`` images of each class drawn uniformly without replacement (all of a smaller class).

    The references' ``get_images(c, n)``: a random permutation of the class, its first ``n`` entries.
    Cost: ``O(N_c)`` per class for the permutation and one gather. Via
    :class:`ipmcondense.data.ClassBalancedSampler`.
    """

    name = "random"

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, generator: torch.Generator) -> None:
        from ipmcondense.data import ClassBalancedSampler

        super().__init__(images, labels, num_classes, generator)
        self._sampler = ClassBalancedSampler(images, labels, num_classes, generator)

    def sample(self, n_per_class: int) -> tuple[Tensor, Tensor]:
        return self._sampler.sample(n_per_class)


#: The registered real-batch selectors by name, the ``real_batches`` axis.
REAL_BATCH_SELECTORS: Registry = Registry("real-batch selector")
REAL_BATCH_SELECTORS.register(RandomRealBatches)
REAL_BATCH_NAMES = REAL_BATCH_SELECTORS.names


def build_real_batches(name: str, config: dict[str, Any], *, images: Tensor, labels: Tensor, num_classes: int,
                       generator: torch.Generator) -> RealBatchSelector:
    """The ``name`` selector (:data:`REAL_BATCH_NAMES`) over the given real images, options from ``config``."""
    return REAL_BATCH_SELECTORS.get(name).from_config(config, images=images, labels=labels, num_classes=num_classes,
                                                      generator=generator)
