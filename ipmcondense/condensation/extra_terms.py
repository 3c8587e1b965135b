"""Extra terms of a matching recipe: regularisers added to the matching loss with a weight (not IPMs).

Each term is a component (``name``, ``Options`` holding its weight with the source of the default).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.components import Component, Registry, option

from .discrepancies import class_means

__all__ = ["ExtraTerm", "SyntheticCrossEntropy", "PrototypeDiscrimination", "AnchorFeatureDistance", "EXTRA_TERMS", "EXTRA_TERM_NAMES",
           "get_extra_term"]




class ExtraTerm(Component, ABC):
    """A regulariser added to a recipe's matching loss (it is not an IPM)."""

    kind = "extra term"

    name: str = ""

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    def bind(self, synthetic: nn.Module) -> None:
        """Called once by the objective with the run's synthetic set (a term that needs more than the decoded,
        augmented batch keeps what it needs; default: nothing)."""

    @abstractmethod
    def __call__(
        self,
        net: nn.Module,
        real_images: Tensor,
        real_labels: Tensor,
        synthetic_images: Tensor,
        synthetic_labels: Tensor,
        real_segments: Sequence[slice],
        synthetic_segments: Sequence[slice],
    ) -> Tensor:
        """The weighted term, a 0-d tensor differentiable w.r.t. the synthetic images."""


class SyntheticCrossEntropy(ExtraTerm):
    r"""IDM's term :math:`w \cdot \text{acc}_\theta(T) \cdot \sum_c \text{CE}(f_\theta(S_c), c)`.

    ``acc`` is the network's accuracy on the real batch (no gradient): a partly trained network's
    logits are trusted in proportion to its accuracy. Cost: one forward pass of each side.
    """

    name = "synthetic_ce"

    @dataclass(frozen=True)
    class Options:
        ce_weight: float = option(0.5, "IDM command.txt: --ce_weight 0.5")

    @classmethod
    def from_options(cls, options, **context):
        return cls(options.ce_weight)

    def __call__(self, net, real_images, real_labels, synthetic_images, synthetic_labels, real_segments, synthetic_segments):
        with torch.no_grad():
            acc = (net(real_images).argmax(dim=1) == real_labels).float().mean()
        logits = net(synthetic_images)
        ce = logits.new_zeros(())
        for s in synthetic_segments:
            ce = ce + F.cross_entropy(logits[s], synthetic_labels[s])
        return self.weight * acc * ce


class PrototypeDiscrimination(ExtraTerm):
    r"""CAFE's discrimination term :math:`w \cdot \sum_i \text{CE}(\langle e(t_i), \bar e(S_c)\rangle_c, y_i)`.

    Real embeddings are classified by the synthetic class-mean embeddings (prototypes) with a
    summed cross-entropy; the gradient reaches S through the prototypes. Cost: two forward passes
    (the real one without a graph) and a ``(B, n_classes)`` product.
    """

    name = "prototype_discrimination"

    @dataclass(frozen=True)
    class Options:
        inner_weight: float = option(0.01, "CAFE distill.py: inner loss weight 0.01")

    @classmethod
    def from_options(cls, options, **context):
        return cls(options.inner_weight)

    def __call__(self, net, real_images, real_labels, synthetic_images, synthetic_labels, real_segments, synthetic_segments):
        with torch.no_grad():
            real_emb = net.embed(real_images)
        protos = class_means(net.embed(synthetic_images), synthetic_segments)
        classes = torch.stack([synthetic_labels[s][0] for s in synthetic_segments])
        logits = real_emb @ protos.t()
        # map real labels to prototype positions
        position = torch.full((int(classes.max()) + 1,), -1, dtype=torch.long, device=classes.device)
        position[classes] = torch.arange(classes.numel(), device=classes.device)
        targets = position[real_labels]
        keep = targets >= 0
        return self.weight * F.cross_entropy(logits[keep], targets[keep], reduction="sum")


class AnchorFeatureDistance(ExtraTerm):
    r"""IT-GAN's regulariser: :math:`w \cdot \frac1n \sum_i \|\psi_\theta(G(z_i, y_i)) - \psi_\theta(x_i)\|^2`.

    :math:`x_i` is the real image latent :math:`z_i` was inverted from (the ``anchors`` of a ``latent`` synthetic
    set) and :math:`\psi_\theta` the embedding (``net.embed``) of the step's network: each synthetic image is kept
    close, in feature space, to its real counterpart while the matching term moves the set as a whole. Both
    sides are taken without augmentation. Not an IPM (a sum of pairwise distances). Cost: one generator and
    two embedding forward passes on ``n`` images.
    """

    name = "anchor_features"

    @dataclass(frozen=True)
    class Options:
        anchor_weight: float = option(0.01, "IT-GAN (Zhao & Bilen 2022) feature regulariser; its training code is "
                                            "unreleased, the weight is this library's choice")

    @classmethod
    def from_options(cls, options, **context):
        return cls(options.anchor_weight)

    def bind(self, synthetic):
        if getattr(synthetic, "anchors", None) is None:
            raise ValueError(
                "extra term 'anchor_features' (IT-GAN) needs a synthetic set that keeps the images its latents "
                f"were inverted from: use synthetic 'latent', got {getattr(synthetic, 'name', type(synthetic).__name__)!r}"
            )
        self.synthetic = synthetic

    def __call__(self, net, real_images, real_labels, synthetic_images, synthetic_labels, real_segments, synthetic_segments):
        with torch.no_grad():
            anchor = net.embed(self.synthetic.anchors)
        decoded = net.embed(self.synthetic.images())
        return self.weight * (decoded - anchor).pow(2).sum(dim=1).mean()


#: The registered extra terms by name.
EXTRA_TERMS: Registry = Registry("extra term")
for _cls in (SyntheticCrossEntropy, PrototypeDiscrimination, AnchorFeatureDistance):
    EXTRA_TERMS.register(_cls)
EXTRA_TERM_NAMES = EXTRA_TERMS.names


def get_extra_term(name: str, weight: float) -> ExtraTerm:
    """Build an extra term by name (:data:`EXTRA_TERM_NAMES`) with its weight."""
    return EXTRA_TERMS.get(name)(weight)
