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
from .samplers import running_accuracy_percent

__all__ = ["ExtraTerm", "SyntheticCrossEntropy", "PrototypeDiscrimination", "EXTRA_TERMS", "EXTRA_TERM_NAMES",
           "get_extra_term"]




class ExtraTerm(Component, ABC):
    """A regulariser added to a recipe's matching loss (it is not an IPM)."""

    kind = "extra term"

    name: str = ""

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

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
    r"""IDM's class-aware term :math:`w \cdot a_\theta \cdot \sum_c \text{CE}(f_\theta(S_c), c)`.

    :math:`a_\theta \in [0, 100]` is the network's running *training* accuracy in percent, as kept by the
    pool that trains it (:class:`~ipmcondense.condensation.samplers.AccuracyMeter`, IDM's
    ``ClassErrorMeter(accuracy=True).value()[0]``, i.e. x100): a partly trained network's logits are
    trusted in proportion to how well it has learned the real data. A network no pool has trained
    (e.g. a ``fresh`` sampler) has :math:`a_\theta = 0` (IDM: ``value()[0] if n != 0 else 0``), so the
    term vanishes. :math:`\text{CE}(f_\theta(S_c), c)` is the mean cross-entropy over the (augmented)
    synthetic images of class ``c``. Cost: one forward pass of the synthetic batch.
    """

    name = "synthetic_ce"

    @dataclass(frozen=True)
    class Options:
        ce_weight: float = option(0.5, "IDM command.txt: --ce_weight 0.5")

    @classmethod
    def from_options(cls, options, **context):
        return cls(options.ce_weight)

    def __call__(self, net, real_images, real_labels, synthetic_images, synthetic_labels, real_segments, synthetic_segments):
        accuracy_percent = running_accuracy_percent(net)
        logits = net(synthetic_images)
        ce = logits.new_zeros(())
        for s in synthetic_segments:
            ce = ce + F.cross_entropy(logits[s], synthetic_labels[s])
        return self.weight * accuracy_percent * ce


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


#: The registered extra terms by name.
EXTRA_TERMS: Registry = Registry("extra term")
for _cls in (SyntheticCrossEntropy, PrototypeDiscrimination):
    EXTRA_TERMS.register(_cls)
EXTRA_TERM_NAMES = EXTRA_TERMS.names


def get_extra_term(name: str, weight: float) -> ExtraTerm:
    """Build an extra term by name (:data:`EXTRA_TERM_NAMES`) with its weight."""
    return EXTRA_TERMS.get(name)(weight)
