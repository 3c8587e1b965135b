"""Synthetic sets: how the condensed data S is stored and decoded into images.

The optimizer loop only ever calls :meth:`SyntheticSet.images` (decoded, differentiable images in
class blocks) and :meth:`SyntheticSet.parameters`; it never knows how the images are stored. Raw
pixels (:class:`PixelSet`) come first; multi-formation, factorised bases or generator latents are
further subclasses that the loop does not need to know about.

Optional learnable extras (a learnable training learning rate, learnable soft labels) are hooks on
the interface: :meth:`SyntheticSet.extra_parameter_groups` returns optimizer groups for them, and
:meth:`SyntheticSet.training_labels` returns what the evaluation network is trained on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from ipmcondense.ipm._validation import check_choice

__all__ = ["SyntheticSet", "PixelSet", "INIT_CHOICES", "initial_images"]

INIT_CHOICES = ("real", "noise", "herding", "kcenter", "kmeans", "random")


class SyntheticSet(nn.Module, ABC):
    """A learnable synthetic dataset of ``ipc`` images for each of ``num_classes`` classes.

    Images are always returned in class blocks: rows ``[c * ipc, (c + 1) * ipc)`` belong to class ``c``.

    Args:
        labels: ``(num_classes * ipc,)`` int64 hard labels in class blocks.
        num_classes: number of classes.
        ipc: images per class.
    """

    def __init__(self, labels: Tensor, num_classes: int, ipc: int) -> None:
        super().__init__()
        if labels.shape != (num_classes * ipc,):
            raise ValueError(
                f"labels must have shape ({num_classes * ipc},) for {num_classes} classes x ipc {ipc}, "
                f"got {tuple(labels.shape)}"
            )
        self.register_buffer("labels", labels.to(torch.int64).clone())
        self.num_classes = int(num_classes)
        self.ipc = int(ipc)

    @abstractmethod
    def images(self) -> Tensor:
        """Decoded images ``(num_classes * ipc, C, H, W)``, differentiable w.r.t. the stored parameters."""

    def class_slice(self, c: int) -> slice:
        """Rows of class ``c`` in :meth:`images` and :attr:`labels`."""
        if not 0 <= c < self.num_classes:
            raise ValueError(f"class index c must be in [0, {self.num_classes}), got {c}")
        return slice(c * self.ipc, (c + 1) * self.ipc)

    def image_parameters(self) -> list[nn.Parameter]:
        """The parameters that encode the images (optimised with the recipe's ``lr_images``)."""
        return [p for p in self.parameters() if p.requires_grad]

    def extra_parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups for optional learnable extras (learning rate, soft labels); none by default."""
        return []

    def training_labels(self) -> Tensor:
        """Targets the evaluation network is trained on (hard labels unless a subclass learns labels)."""
        return self.labels

    def learned_learning_rate(self) -> float | None:
        """A learned training learning rate if the parameterisation has one, else ``None``."""
        return None


class PixelSet(SyntheticSet):
    """Raw pixels: every synthetic image is a free ``(C, H, W)`` tensor (DC, DSA, DM, ...).

    Storage equals the decoded size: ``num_classes * ipc * C * H * W`` numbers; decoding is free.

    Args:
        images: ``(num_classes * ipc, C, H, W)`` initial images (normalised space), class-blocked.
        labels: matching hard labels.
        num_classes: number of classes.
    """

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if images.shape[0] % num_classes:
            raise ValueError(
                f"images must hold the same number of images for each of {num_classes} classes, "
                f"got {images.shape[0]} images"
            )
        super().__init__(labels, num_classes, images.shape[0] // num_classes)
        self.pixels = nn.Parameter(images.detach().clone().float())

    def images(self) -> Tensor:
        return self.pixels


def initial_images(
    dataset: Any,
    ipc: int,
    init: str,
    generator: torch.Generator,
    *,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Initial synthetic images ``(num_classes * ipc, C, H, W)`` and labels, in class blocks.

    ``init``: ``"real"`` (random real training images of each class, drawn with ``generator``),
    ``"noise"`` (standard normal pixels in normalised space, drawn with ``generator``), or a selection
    baseline from :mod:`ipmcondense.selection`: ``"random"``, ``"herding"``, ``"kcenter"``, ``"kmeans"``
    (when available), seeded with ``seed``.
    """
    check_choice(init, INIT_CHOICES, "init")
    images, labels = dataset.train_images, dataset.train_labels
    num_classes = int(dataset.num_classes)
    out_labels = torch.arange(num_classes).repeat_interleave(ipc)
    if init == "noise":
        shape = (num_classes * ipc, *images.shape[1:])
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return noise, out_labels
    if init == "real":
        picks = []
        for c in range(num_classes):
            idx = torch.nonzero(labels.cpu() == c).flatten()
            if idx.numel() < ipc:
                raise ValueError(f"ipc {ipc} is larger than class {c}, which has {idx.numel()} training images")
            perm = torch.randperm(idx.numel(), generator=generator)[:ipc]
            picks.append(idx[perm])
        order = torch.cat(picks)
        return images.cpu()[order].float().clone(), out_labels
    from ipmcondense import selection

    fn = getattr(selection, f"select_{init}", None)
    if fn is None:
        raise ValueError(f"init {init!r} needs ipmcondense.selection.select_{init}, which is not available")
    sel_images, sel_labels = fn(dataset, ipc, seed)
    return sel_images.detach().cpu().float().clone(), sel_labels.detach().cpu().to(torch.int64).clone()
