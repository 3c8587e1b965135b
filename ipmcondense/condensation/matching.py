r"""The matching loss of the feature-matching recipes (DM, DC, DSA, CAFE, ...) and its builders.

:math:`L(S) = \sum_c \sum_b w_b D(\phi^b_\theta(A_c(T_c)), \phi^b_\theta(A_c(S_c)))` plus the recipe's extra
terms, for class-blocked real and synthetic batches, and the siamese augmentation that draws one
augmentation per class for both sides. Used by the ``"matching"`` objective
(:class:`ipmcondense.condensation.objectives.matching.MatchingObjective`); re-exported by
:mod:`ipmcondense.condensation.engine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ipmcondense.features import FEATURE_MAPS, FeatureMap, segments_from_labels
from ipmcondense.training import autocast

from .discrepancies import DISCREPANCIES, Discrepancy
from .extra_terms import EXTRA_TERMS, ExtraTerm

if TYPE_CHECKING:
    from .recipes import Recipe

__all__ = [
    "MatchingLoss",
    "matching_loss",
    "siamese_augment",
    "build_feature_map",
    "build_discrepancy",
    "build_extra_terms",
    "build_augmentation",
]


@dataclass
class MatchingLoss:
    """The loss of one image step on one network: ``total = sum(per_class) + sum(extras)``.

    ``per_class`` holds one term per class, or a single joint term for a discrepancy with
    ``joint_over_classes`` (DCC)."""

    total: Tensor
    per_class: list[Tensor]
    extras: list[Tensor]


def matching_loss(
    net: nn.Module,
    feature_map: FeatureMap,
    discrepancy: Discrepancy,
    real_images: Tensor,
    real_labels: Tensor,
    synthetic_images: Tensor,
    synthetic_labels: Tensor,
    *,
    class_batching: bool = True,
    extra_terms: Sequence[ExtraTerm] = (),
    generator: torch.Generator | None = None,
    precision: str = "float32",
    channels_last: bool = False,
    joint_over_ranks: int | None = None,
) -> MatchingLoss:
    r""":math:`\sum_c \sum_b w_b D(\phi^b(T_c), \phi^b(S_c))` + extra terms, for class-blocked inputs.

    Both sides must hold the same classes in the same block order. With ``class_batching`` the feature
    map sees all classes of one side in one batch (one forward pass); otherwise it is called once per
    class and side (the reference loop). Both give the same value up to floating-point rounding (for
    networks without batch statistics). Extra terms always see the whole batch.

    A discrepancy with ``joint_over_classes = True`` (DCC's ``gradient_cosine_joint``) is instead taken
    once, on the class average of each block's per-class means:
    :math:`\sum_b w_b D(\frac1C\sum_c \bar\phi^b(T_c), \frac1C\sum_c \bar\phi^b(S_c))`; for gradient
    features that is the gradient of the loss over all classes jointly (equal class sizes on S).

    ``precision="bfloat16"`` runs the feature-map calls under bfloat16 autocast
    (:func:`ipmcondense.training.autocast`) and casts every feature block back to float32, so the
    discrepancies and extra terms are computed in float32 as with ``"float32"``. ``channels_last=True``
    runs the real side in ``torch.channels_last`` memory format when the feature map needs no parameter
    gradients (its pass runs without autograd): the same float32 arithmetic in another order (oneDNN's
    NHWC convolutions, about twice as fast on CPU for large batches), the network restored to contiguous
    parameters before the synthetic side (whose backward is slower in channels_last).

    ``joint_over_ranks`` (class-parallel, the number of classes of ALL ranks; the inputs hold this rank's
    classes): the joint term's class averages are :math:`\frac1C\sum_c` over every rank's classes, each rank's
    partial sum all-reduced (:func:`~ipmcondense.distributed.sum_over_ranks`: the discrepancy of the averages is
    then computed alike on every rank, so the backward pass hands each rank the gradient of its own classes'
    share); the returned loss is the same on every rank (not a per-rank share).

    Cost: per side one (batched) or ``n_classes`` (loop) feature-map calls; the discrepancy per class
    (once for a joint discrepancy).
    """
    real_segments = segments_from_labels(real_labels)
    syn_segments = segments_from_labels(synthetic_labels)
    real_classes = [int(real_labels[s.start]) for s in real_segments]
    syn_classes = [int(synthetic_labels[s.start]) for s in syn_segments]
    if real_classes != syn_classes:
        raise ValueError(
            f"real and synthetic batches must hold the same class blocks in the same order, got "
            f"{real_classes} and {syn_classes}"
        )

    def features(images, labels, segments, differentiable):
        nhwc = channels_last and not differentiable and not feature_map.needs_parameter_gradients and images.dim() == 4
        if nhwc:
            net.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        try:
            with autocast(precision, images.device):
                blocks = feature_map(net, images, labels, segments, differentiable=differentiable)
        finally:
            if nhwc:
                net.to(memory_format=torch.contiguous_format)
        if precision == "float32":
            return blocks
        return [replace(b, values=b.values.float()) for b in blocks]

    pairs = []  # per class: (real blocks, synthetic blocks, segment index, real rows, synthetic rows)
    if class_batching:
        fr = features(real_images, real_labels, real_segments, False)
        fs = features(synthetic_images, synthetic_labels, syn_segments, True)
        pairs = [(fr, fs, i, rs, ss) for i, (rs, ss) in enumerate(zip(real_segments, syn_segments))]
    else:
        for rs, ss in zip(real_segments, syn_segments):
            r_rows, s_rows = slice(0, rs.stop - rs.start), slice(0, ss.stop - ss.start)
            fr = features(real_images[rs], real_labels[rs], [r_rows], False)
            fs = features(synthetic_images[ss], synthetic_labels[ss], [s_rows], True)
            pairs.append((fr, fs, 0, r_rows, s_rows))
    if getattr(discrepancy, "joint_over_classes", False):
        per_class = [_joint_term(pairs, discrepancy, generator, joint_over_ranks)]
    else:
        per_class = [_class_term(fr, fs, i, rs, ss, discrepancy, generator) for fr, fs, i, rs, ss in pairs]
    extras = [
        term(net, real_images, real_labels, synthetic_images, synthetic_labels, real_segments, syn_segments)
        for term in extra_terms
    ]
    total = torch.stack(per_class).sum()
    for e in extras:
        total = total + e
    return MatchingLoss(total, per_class, extras)


def _class_term(fr, fs, index, real_rows, syn_rows, discrepancy, generator) -> Tensor:
    term = None
    for br, bs in zip(fr, fs):
        value = bs.weight * discrepancy(br.segment(index, real_rows), bs.segment(index, syn_rows), generator=generator)
        term = value if term is None else term + value
    return term


def _joint_term(pairs, discrepancy, generator, joint_over_ranks: int | None = None) -> Tensor:
    """One discrepancy of the class-averaged block means (a discrepancy with ``joint_over_classes``, DCC);
    ``joint_over_ranks``: the class averages over every rank's classes (see :func:`matching_loss`)."""
    term = None
    for b in range(len(pairs[0][0])):
        real = torch.stack([fr[b].segment(i, rr).mean(dim=0) for fr, _, i, rr, _ in pairs])
        syn = torch.stack([fs[b].segment(i, sr).mean(dim=0) for _, fs, i, _, sr in pairs])
        if joint_over_ranks is None:
            real, syn = real.mean(dim=0, keepdim=True), syn.mean(dim=0, keepdim=True)
        else:
            from ipmcondense.distributed import sum_over_ranks

            real = sum_over_ranks(real.sum(dim=0, keepdim=True) / joint_over_ranks)
            syn = sum_over_ranks(syn.sum(dim=0, keepdim=True) / joint_over_ranks)
        value = pairs[0][1][b].weight * discrepancy(real, syn, generator=generator)
        term = value if term is None else term + value
    return term


def siamese_augment(
    augmentation: Any,
    real_images: Tensor,
    real_labels: Tensor,
    synthetic_images: Tensor,
    synthetic_labels: Tensor,
    generator: torch.Generator,
    *,
    draw_for: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Apply one augmentation draw per class to that class's real AND synthetic images (siamese).

    Draws are taken class by class from ``generator`` in class order. Differentiable in both inputs.
    ``draw_for``: the classes to draw for, in order, when the batches hold only some of them (class-parallel
    condensation: a rank draws for every class, as one process does, and applies the draws of its own).
    """
    real_segments = segments_from_labels(real_labels)
    syn_segments = segments_from_labels(synthetic_labels)
    real_out, syn_out = [], []
    if draw_for is None:
        draws = [augmentation.draw(generator) for _ in real_segments]
    else:
        by_class = {int(c): augmentation.draw(generator) for c in draw_for}
        draws = [by_class[int(real_labels[rs.start])] for rs in real_segments]
    for rs, ss, draw in zip(real_segments, syn_segments, draws):
        real_out.append(augmentation.apply(real_images[rs], draw))
        syn_out.append(augmentation.apply(synthetic_images[ss], draw))
    return torch.cat(real_out), torch.cat(syn_out)


# ------------------------------------------------------------------------------ builders from a config


def build_feature_map(recipe: Recipe, config: dict[str, Any]) -> FeatureMap:
    """The row's feature map, options from the flat hyperparameters."""
    return FEATURE_MAPS.get(recipe.feature_map).from_config(config)


def build_discrepancy(recipe: Recipe, config: dict[str, Any]) -> Discrepancy:
    """The row's discrepancy, options from the flat hyperparameters."""
    return DISCREPANCIES.get(recipe.discrepancy).from_config(config)


def build_extra_terms(recipe: Recipe, config: dict[str, Any]) -> list[ExtraTerm]:
    """The row's extra terms (weights from the flat hyperparameters)."""
    return [EXTRA_TERMS.get(name).from_config(config) for name in recipe.extra_terms]


def build_augmentation(recipe: Recipe, dataset: Any) -> Any:
    from ipmcondense.augment import DifferentiableSiameseAugmentation, NoAugmentation, dsa_strategy_for

    if recipe.augmentation == "dsa":
        return DifferentiableSiameseAugmentation(dsa_strategy_for(dataset))
    return NoAugmentation()
