"""Class-balanced sampling of real images, the real-data side of class-conditional matching."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ipmcondense.ipm._validation import check_positive_int

__all__ = ["ClassBalancedSampler"]


class ClassBalancedSampler:
    """Draw class-blocked batches of real images.

    The per-class index tensors are built once (``O(N)``) and kept on the images' device; a draw
    of ``n`` images of class ``c`` is a random permutation of that class (``O(N_c)``) followed by
    one gather (``O(n C H W)``), **without replacement**. When a class holds fewer than ``n``
    images, all of them are returned (in random order): the block of that class is shorter, never
    padded with repeats. Every class in ``range(num_classes)`` must have at least one image.

    Randomness comes only from ``generator`` (a ``torch.Generator``; the global RNG when
    ``None``): the same seed gives the same draws. Permutations are drawn on the generator's
    device and moved to the images' device, so a CPU generator works with CUDA images.

    Args:
        images: ``(N, ...)`` tensor (typically ``(N, C, H, W)``).
        labels: ``(N,)`` integer tensor in ``[0, num_classes)``.
        num_classes: number of classes.
        generator: source of randomness.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        num_classes: int,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(images, Tensor) or images.dim() < 1 or images.shape[0] == 0:
            raise ValueError("images must be a non-empty tensor of shape (N, ...)")
        n_images = images.shape[0]
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != n_images:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must have shape ({n_images},) to match images, got {shape}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must hold integer class indices, got dtype {labels.dtype}")
        num_classes = check_positive_int(num_classes, "num_classes")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        labels = labels.to(device=images.device, dtype=torch.long)
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got values in [{low}, {high}]"
            )
        self.images = images
        self.labels = labels
        self.num_classes = num_classes
        self.generator = generator
        self._indices = [torch.nonzero(labels == c, as_tuple=True)[0] for c in range(num_classes)]
        empty = [c for c, idx in enumerate(self._indices) if idx.numel() == 0]
        if empty:
            raise ValueError(
                f"labels has no example of class(es) {empty}; every class in range(num_classes="
                f"{num_classes}) needs at least one image"
            )

    @property
    def class_counts(self) -> tuple[int, ...]:
        """Number of images of each class."""
        return tuple(int(idx.numel()) for idx in self._indices)

    def _check_class(self, c: Any) -> int:
        if isinstance(c, Tensor) and c.numel() == 1:
            c = int(c)
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.num_classes:
            raise ValueError(f"class c must be an integer in [0, {self.num_classes}), got {c!r}")
        return c

    def indices_of_class(self, c: int) -> Tensor:
        """Indices (into ``images``) of all images of class ``c``, in dataset order."""
        return self._indices[self._check_class(c)]

    def images_of_class(self, c: int) -> Tensor:
        """All images of class ``c``, in dataset order: ``(N_c, ...)``."""
        return self.images[self.indices_of_class(c)]

    def _draw_indices(self, c: int, n: int) -> Tensor:
        pool = self._indices[c]
        device = self.generator.device if self.generator is not None else torch.device("cpu")
        order = torch.randperm(pool.numel(), generator=self.generator, device=device)
        return pool[order[: min(n, pool.numel())].to(pool.device)]

    def sample_class(self, c: int, n: int) -> Tensor:
        """``min(n, N_c)`` distinct random images of class ``c``: ``(min(n, N_c), ...)``."""
        c = self._check_class(c)
        n = check_positive_int(n, "n")
        return self.images[self._draw_indices(c, n)]

    def sample(self, n_per_class: int) -> tuple[Tensor, Tensor]:
        """Class-blocked batch ``[class 0 block, class 1 block, ...]`` and its labels.

        Each block holds ``min(n_per_class, N_c)`` distinct images of class ``c``, so the batch has
        ``num_classes * n_per_class`` images when every class is large enough.
        """
        n = check_positive_int(n_per_class, "n_per_class")
        picks = [self._draw_indices(c, n) for c in range(self.num_classes)]
        index = torch.cat(picks)
        sizes = torch.tensor([p.numel() for p in picks], device=index.device)
        labels = torch.repeat_interleave(torch.arange(self.num_classes, device=index.device), sizes)
        return self.images[index], labels
