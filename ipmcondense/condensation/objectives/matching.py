r"""The ``matching`` objective: feature matching over the recipe's three axes (DM, M3D, DC, DSA, CAFE, ...).

One step: a class-balanced real batch from the ``real_batches`` axis, one siamese augmentation draw per
class, and :func:`~ipmcondense.condensation.matching.matching_loss` on every network of the sampler's draw:
:math:`\sum_\theta \sum_c \sum_b w_b D(\phi^b_\theta(A_c(T_c)), \phi^b_\theta(A_c(S_c)))` plus the extra terms.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.components import option

from ..matching import build_discrepancy, build_extra_terms, build_feature_map, matching_loss, siamese_augment
from .base import Objective, ObjectiveContext, check_options

__all__ = ["MatchingObjective", "lcmat_perturbation"]


def lcmat_perturbation(
    net: nn.Module, real_images: Tensor, real_labels: Tensor, synthetic_images: Tensor, synthetic_labels: Tensor,
    rho: float,
    batch_sizes: tuple[int, int] | None = None,
) -> nn.Module:
    r"""A copy of ``net`` moved to :math:`\theta + \rho\, g / \|g\|`, the worst case of the loss gap to first order.

    :math:`g = \nabla_\theta\, |\ell_T(\theta) - \ell_S(\theta)|` (detached) with :math:`\ell_T, \ell_S`
    the mean cross-entropies of the real and synthetic batches: one normalised ascent step of the
    loss gap over the ball :math:`\|\epsilon\| \le \rho` (LCMat's estimate of the worst case). Cost: one
    forward + backward per side and one parameter copy.

    ``batch_sizes`` (class-parallel: the real and synthetic batch sizes over ALL ranks; the batches given hold
    this rank's classes): the gap is the sum over the ranks of their rows' cross-entropy sums divided by those
    sizes, :math:`g = \mathrm{sign}(\sum_r \mathrm{gap}_r) \sum_r \nabla_\theta \mathrm{gap}_r` (one
    all-reduce of the gap and of the parameter gradient), so every rank moves the network alike.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    with torch.enable_grad():
        if batch_sizes is None:
            gap = F.cross_entropy(net(real_images.detach()), real_labels) - F.cross_entropy(
                net(synthetic_images.detach()), synthetic_labels
            )
            grads = torch.autograd.grad(gap.abs(), params, allow_unused=True)
        else:
            from ipmcondense.distributed import sum_over_ranks

            gap = (F.cross_entropy(net(real_images.detach()), real_labels, reduction="sum") / batch_sizes[0]
                   - F.cross_entropy(net(synthetic_images.detach()), synthetic_labels, reduction="sum") / batch_sizes[1])
            partial = torch.autograd.grad(gap, params, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, partial)])
            summed = sum_over_ranks(torch.cat([flat, gap.detach().reshape(1)]))
            sign = torch.sign(summed[-1])
            grads, offset = [], 0
            for p in params:
                grads.append(sign * summed[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
    norm = torch.sqrt(sum((g * g).sum() for g in grads if g is not None))
    moved = copy.deepcopy(net)
    if float(norm) > 0:
        with torch.no_grad():
            for p, g in zip((q for q in moved.parameters() if q.requires_grad), grads):
                if g is not None:
                    p.add_(g, alpha=float(rho) / float(norm))
    return moved


class MatchingObjective(Objective):
    r"""Feature matching: :math:`\sum_\theta \sum_c \sum_b w_b D(\phi^b_\theta(A_c(T_c)), \phi^b_\theta(A_c(S_c)))` + extras.

    One step: a class-balanced real batch (``batch_real`` per class), one siamese augmentation draw per
    class, :func:`~ipmcondense.condensation.matching.matching_loss` on every network of the draw
    (exactly the engine's behaviour before objectives existed).

    **Sharpness-aware gradient matching** (the ``lcmat`` row; ``lcmat_weight`` :math:`\lambda > 0`, gradient
    feature maps): the loss on each network becomes
    :math:`GM(\theta) + \lambda\, (GM(\theta + \rho\hat g) - GM(\theta))`, with
    :math:`\theta + \rho\hat g` from :func:`lcmat_perturbation` (``lcmat_rho``), LCMat's first-order worst
    case of the loss gap in the :math:`\rho`-ball: the gap between gradient matching at that point and at the
    centre, a curvature (second-order) penalty; for :math:`\lambda \le 1` the loss is the convex combination
    :math:`(1-\lambda) GM(\theta) + \lambda GM(\theta + \rho\hat g)`, so it never rewards a mismatch.
    It is not LCMat's stated regulariser (the worst-case loss gap itself, bounded with a max-eigenvalue
    term of the Hessian difference; the condensation code is unreleased). Cost: about twice the plain
    matching loss.
    """

    name = "matching"
    relation_to_ipm = "as the discrepancy of the row (exact IPM, normalised variant or approximation)"
    default_sampler = "fresh"

    @dataclass(frozen=True)
    class Options:
        lcmat_weight: float = option(0.0, "0: off; the lcmat row sets 0.5")
        lcmat_rho: float = option(0.05, "SAM-style radius of the perturbation ball (LCMat paper: rho)")

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.feature_map = build_feature_map(ctx.recipe, ctx.config)
        self.discrepancy = build_discrepancy(ctx.recipe, ctx.config)
        self.extra_terms = build_extra_terms(ctx.recipe, ctx.config)
        for term in self.extra_terms:
            term.bind(ctx.synthetic)
            term.classes, term.num_classes = ctx.classes, ctx.synthetic.num_classes
        self.lcmat_weight = float(ctx.config.get("lcmat_weight") or 0.0)
        self.lcmat_rho = float(ctx.config.get("lcmat_rho") or 0.0)
        # class-parallel with a joint discrepancy (DCC): every rank computes the same joint loss (not a share)
        self.loss_replicated_over_ranks = bool(getattr(self.discrepancy, "joint_over_classes", False))
        if self.lcmat_weight > 0 and not self.feature_map.needs_parameter_gradients:
            raise ValueError("lcmat_weight > 0 needs a gradient-matching recipe (feature map 'gradients')")

    @classmethod
    def prepare_config(cls, config, dataset):
        weight = config.get("lcmat_weight")
        if weight is not None:
            check_options(config, non_negative=("lcmat_weight",))
            if weight > 0:
                check_options(config, ("lcmat_rho",))
        return config

    def loss(self, networks):
        cfg, ctx = self.config, self.ctx
        real, real_labels = ctx.real_batches.sample(int(cfg["batch_real"]))
        syn, syn_labels = ctx.synthetic.images(), ctx.synthetic.labels
        draw_for = None
        if ctx.classes is not None:  # class-parallel: this rank's classes only, augmentations drawn for all
            rows = torch.nonzero((syn_labels >= ctx.classes.start) & (syn_labels < ctx.classes.stop), as_tuple=True)[0]
            syn, syn_labels = syn[rows], syn_labels[rows]
            draw_for = range(ctx.synthetic.num_classes)
        real_aug, syn_aug = siamese_augment(ctx.augmentation, real, real_labels, syn, syn_labels, ctx.generator,
                                            draw_for=draw_for)
        total = None
        for net in networks:
            value = self._one(net, real_aug, real_labels, syn_aug, syn_labels)
            if self.lcmat_weight > 0:  # class-parallel: the gap over every rank's rows (batch sizes of all ranks)
                sizes = None if ctx.classes is None else (ctx.real_batches.global_batch_size(int(cfg["batch_real"])),
                                                          int(ctx.synthetic.labels.numel()))
                moved = lcmat_perturbation(net, real_aug, real_labels, syn_aug, syn_labels, self.lcmat_rho, sizes)
                centre = value if not self.extra_terms else self._one(net, real_aug, real_labels, syn_aug, syn_labels,
                                                                      extras=False)
                value = value + self.lcmat_weight * (
                    self._one(moved, real_aug, real_labels, syn_aug, syn_labels, extras=False) - centre
                )
            total = value if total is None else total + value
        return total

    def _one(self, net, real, real_labels, syn, syn_labels, extras=True):
        discrepancy = self.discrepancy
        if self.ctx.classes is not None and hasattr(discrepancy, "drop_draws"):
            # class-parallel with a discrepancy drawing from the generator at each call (sliced's seed, the
            # barycenter's initial atoms): the other classes' draws are made and dropped around this rank's calls,
            # as one process makes them (one call per feature block, on each class's real rows)
            from ..parallel import DrawsOfEveryClass

            blocks = len(self.feature_map(net, syn[:1], syn_labels[:1], [slice(0, 1)], differentiable=False))
            rows = [min(int(self.config["batch_real"]), count) for count in self.ctx.real_batches.counts]
            discrepancy = DrawsOfEveryClass(discrepancy, self.ctx.classes, self.ctx.synthetic.num_classes, blocks,
                                            rows)
            discrepancy.before(self.ctx.generator)
        total = matching_loss(
            net, self.feature_map, discrepancy, real, real_labels, syn, syn_labels,
            class_batching=bool(self.config["class_batching"]),
            extra_terms=self.extra_terms if extras else (), generator=self.ctx.generator,
            precision=str(self.config["precision"]), channels_last=bool(self.config["channels_last"]),
            joint_over_ranks=None if self.ctx.classes is None else self.ctx.synthetic.num_classes,
        ).total
        if discrepancy is not self.discrepancy:
            discrepancy.after(self.ctx.generator)
        return total
