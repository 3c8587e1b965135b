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

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from ipmcondense.ipm._validation import check_choice

__all__ = ["SyntheticSet", "PixelSet", "LearnedExtrasPixelSet", "INIT_CHOICES", "initial_images"]

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



class LearnedExtrasPixelSet(PixelSet):
    r"""Raw pixels plus optional learnable extras: a training step size, soft labels, regression labels.

    * ``learning_rate`` (MTT, DATM): a learnable scalar :math:`\eta` (the student's SGD step size),
      optimised by SGD with step ``lr_lr`` and momentum 0.5 (MTT's ``syn_lr``); saved with the set and
      used by the evaluation protocol (``learned_lr``).
    * ``label_logits`` (DATM): learnable logits :math:`z`; the labels are :math:`\mathrm{softmax}(z)`
      (a distribution per image) and the evaluation trains on them with soft cross-entropy. SGD with
      step ``lr_labels`` and momentum 0.9 (DATM's ``lr_y``, ``Momentum_y``).
    * ``label_values`` (KIP, RFAD ``learn_labels``): learnable regression targets :math:`Y_s`
      ``(n, C)`` (init: centred one-hot); step ``lr_labels``. The evaluation network is trained on
      the hard labels (the learned targets are KRR targets, not distributions).

    Storage: the pixels plus one number and ``n * C`` numbers per label extra.

    Args:
        images, labels, num_classes: as :class:`PixelSet`.
        learning_rate: initial learnable step size, or ``None`` for none.
        lr_lr: optimiser step for ``learning_rate``.
        label_logits: initial ``(n, C)`` logits, or ``None``.
        label_values: initial ``(n, C)`` regression labels, or ``None``.
        lr_labels: optimiser step for the labels.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        num_classes: int,
        *,
        learning_rate: float | None = None,
        lr_lr: float = 1e-5,
        label_logits: Tensor | None = None,
        label_values: Tensor | None = None,
        lr_labels: float = 1.0,
    ) -> None:
        super().__init__(images, labels, num_classes)
        if label_logits is not None and label_values is not None:
            raise ValueError("pass at most one of label_logits (soft labels) and label_values (regression labels)")
        n = self.labels.shape[0]
        for name, value in (("label_logits", label_logits), ("label_values", label_values)):
            if value is not None and tuple(value.shape) != (n, num_classes):
                raise ValueError(f"{name} must have shape ({n}, {num_classes}), got {tuple(value.shape)}")
        self.learning_rate = None
        if learning_rate is not None:
            if not isinstance(learning_rate, (int, float)) or not math.isfinite(learning_rate) or learning_rate <= 0:
                raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate!r}")
            self.learning_rate = nn.Parameter(torch.tensor(float(learning_rate)))
        self.label_logits = None if label_logits is None else nn.Parameter(label_logits.detach().clone().float())
        self.label_values = None if label_values is None else nn.Parameter(label_values.detach().clone().float())
        self.lr_lr, self.lr_labels = float(lr_lr), float(lr_labels)

    def image_parameters(self) -> list[nn.Parameter]:
        return [self.pixels]

    def extra_parameter_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = []
        if self.learning_rate is not None:
            groups.append({"params": [self.learning_rate], "lr": self.lr_lr, "momentum": 0.5})
        if self.label_logits is not None:
            groups.append({"params": [self.label_logits], "lr": self.lr_labels, "momentum": 0.9})
        if self.label_values is not None:
            groups.append({"params": [self.label_values], "lr": self.lr_labels})
        return groups

    def soft_labels(self) -> Tensor:
        r""":math:`\mathrm{softmax}(z)` ``(n, C)``, differentiable in the logits (requires ``label_logits``)."""
        if self.label_logits is None:
            raise ValueError("this synthetic set has no learnable soft labels (label_logits is None)")
        return torch.softmax(self.label_logits, dim=1)

    def training_labels(self) -> Tensor:
        if self.label_logits is not None:
            return self.soft_labels().detach()
        return self.labels

    def learned_learning_rate(self) -> float | None:
        return None if self.learning_rate is None else float(self.learning_rate.detach())


def initial_images(
    dataset: Any,
    ipc: int,
    init: str,
    generator: torch.Generator,
    *,
    seed: int = 0,
    arch: str = "convnet",
) -> tuple[Tensor, Tensor]:
    """Initial synthetic images ``(num_classes * ipc, C, H, W)`` and labels, in class blocks.

    ``init``: ``"real"`` (random real training images of each class, drawn with ``generator``),
    ``"noise"`` (standard normal pixels in normalised space, drawn with ``generator``), or a selection
    baseline from :mod:`ipmcondense.selection`: ``"random"``, ``"herding"``, ``"kcenter"``, ``"kmeans"``
    (when available), seeded with ``seed``; herding and k-center embed with an untrained ``arch`` network.
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
    sel_images, sel_labels = fn(dataset, ipc, seed, **({"arch": arch} if init in ("herding", "kcenter") else {}))
    return sel_images.detach().cpu().float().clone(), sel_labels.detach().cpu().to(torch.int64).clone()
