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

__all__ = ["ExtraTerm", "SyntheticCrossEntropy", "PrototypeDiscrimination", "ClassNormStatistics", "TeacherCrossEntropy",
           "AnchorFeatureDistance", "ClassContrast", "intra_class_diversity_loss",
           "inter_class_discrimination_loss", "class_norm_statistics", "EXTRA_TERMS", "EXTRA_TERM_NAMES",
           "get_extra_term"]




class ExtraTerm(Component, ABC):
    """A regulariser added to a recipe's matching loss (it is not an IPM)."""

    kind = "extra term"

    name: str = ""

    #: in class-parallel condensation this rank's classes and the number of classes of all ranks, set by the
    #: objective (``None`` in one process, where the batches hold every class)
    classes: range | None = None
    num_classes: int | None = None

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

    Class-parallel (``classes`` set): the batches hold this rank's classes; the prototypes of every class are
    rebuilt on every rank from their owners' (one all-reduce of the ``(n_classes, d)`` matrix, zeros outside
    the own rows, whose backward sums the ranks' gradients and keeps the own rows:
    :class:`~ipmcondense.condensation.parallel.WholeSetOnEveryRank`), and the rank's term is the summed
    cross-entropy of its own real rows against all of them: the ranks' terms add up to the one-process term.
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
        if self.classes is not None:  # class-parallel: every class's prototype, from its owner
            from .parallel import WholeSetOnEveryRank

            every = torch.arange(int(self.num_classes), device=classes.device)
            whole = WholeSetOnEveryRank(self.classes, every, None)
            protos = whole.rows(protos.new_zeros(every.numel(), protos.shape[1]).index_copy(0, classes, protos))
            classes = every
        logits = real_emb @ protos.t()
        # map real labels to prototype positions
        position = torch.full((int(classes.max()) + 1,), -1, dtype=torch.long, device=classes.device)
        position[classes] = torch.arange(classes.numel(), device=classes.device)
        targets = position[real_labels]
        keep = targets >= 0
        return self.weight * F.cross_entropy(logits[keep], targets[keep], reduction="sum")


#: Layers whose input statistics :class:`ClassNormStatistics` matches (BatchNorm's own; the input of the
#: ConvNet's instance norm, GroupNorm(C, C), is the same per-channel quantity).
NORM_LAYERS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)


def class_norm_statistics(net: nn.Module, images: Tensor, segments: Sequence[slice]) -> list[list[tuple[Tensor, Tensor]]]:
    r"""Per normalisation layer, per class segment: the per-channel mean and biased variance of the layer input.

    For an input :math:`z \in \mathbb R^{N_c \times C \times H \times W}` of class :math:`c`:
    :math:`\mu_c = \frac{1}{N_c H W}\sum_{n,h,w} z`, :math:`\sigma^2_c = \frac{1}{N_c H W}\sum (z - \mu_c)^2`
    (BatchNorm's statistics restricted to the class). Differentiable in ``images``; one forward pass.
    """
    inputs: list[Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
             for m in net.modules() if isinstance(m, NORM_LAYERS)]
    try:
        net(images)
    finally:
        for h in hooks:
            h.remove()
    if not inputs:
        raise ValueError(
            f"the per-class normalisation-statistics term needs a network with BatchNorm or instance/group "
            f"normalisation layers; {type(net).__name__} has none (use an arch such as convnet or convnet-bn)"
        )
    dims = lambda z: [0] + list(range(2, z.dim()))  # noqa: E731 - every axis but the channel
    return [[(z[s].mean(dim=dims(z)), z[s].var(dim=dims(z), unbiased=False)) for s in segments] for z in inputs]


class ClassNormStatistics(ExtraTerm):
    r"""WMDD's per-class BatchNorm-statistics loss.

    .. math::
        w \sum_l \frac1C \sum_c \Big(\|\mu^l_c(S) - \mu^l_c(T)\|_2 + \|\sigma^{2,l}_c(S) - \sigma^{2,l}_c(T)\|_2\Big)

    over the normalisation layers :math:`l` of the network (:func:`class_norm_statistics`): the per-channel
    mean and variance of each layer's input over the class's images, synthetic against real (WMDD
    ``utils.py: BNFeatureHook_new``: ``torch.norm(diff_var, dim=1).mean() + torch.norm(diff_mean, dim=1).mean()``,
    summed over layers, times ``--r-bn``). WMDD takes the real statistics from all of the class's
    training images (per-class running statistics of the teacher); here from the real batch of the step.
    Zero when the statistics agree. Not an IPM (a moment-matching penalty). Cost: one forward pass per
    side.
    """

    name = "class_norm_statistics"

    @dataclass(frozen=True)
    class Options:
        bn_weight: float = option(0.01, "WMDD run.sh: R_BN 0.01 (ImageNette; 1.0 for Tiny-ImageNet)")

    @classmethod
    def from_options(cls, options, **context):
        return cls(options.bn_weight)

    def __call__(self, net, real_images, real_labels, synthetic_images, synthetic_labels, real_segments, synthetic_segments):
        with torch.no_grad():
            real = class_norm_statistics(net, real_images, real_segments)
        synthetic = class_norm_statistics(net, synthetic_images, synthetic_segments)
        total = synthetic_images.new_zeros(())
        for layer_real, layer_syn in zip(real, synthetic):
            per_class = [(ms - mr).norm() + (vs - vr).norm() for (mr, vr), (ms, vs) in zip(layer_real, layer_syn)]
            # class-parallel: this rank's classes' share of the mean over every class (the engine sums the shares)
            total = total + (torch.stack(per_class).mean() if self.classes is None
                             else torch.stack(per_class).sum() / int(self.num_classes))
        return self.weight * total


class TeacherCrossEntropy(ExtraTerm):
    r"""WMDD's classification term :math:`w \cdot \text{CE}(f_\theta(S), y)` (mean over the synthetic batch).

    The trained network's cross-entropy on the synthetic images (WMDD ``data_synthesis_new.py``:
    ``criterion(outputs, targets) * args.r_wb``). Not an IPM. Cost: one forward pass.
    """

    name = "teacher_ce"

    @dataclass(frozen=True)
    class Options:
        teacher_ce_weight: float = option(1.0, "WMDD data_synthesis_new.py: --r-wb 1 (run.sh R_WB=1)")

    @classmethod
    def from_options(cls, options, **context):
        return cls(options.teacher_ce_weight)

    def bind(self, synthetic):
        self.synthetic_rows = int(synthetic.labels.numel())

    def __call__(self, net, real_images, real_labels, synthetic_images, synthetic_labels, real_segments, synthetic_segments):
        if self.classes is not None:  # class-parallel: this rank's rows' share of the mean over every row
            loss = F.cross_entropy(net(synthetic_images), synthetic_labels, reduction="sum")
            return self.weight * loss / self.synthetic_rows
        return self.weight * F.cross_entropy(net(synthetic_images), synthetic_labels)


class AnchorFeatureDistance(ExtraTerm):
    r"""IT-GAN's regulariser: :math:`w \cdot \frac1n \sum_i \|\psi_\theta(G(z_i, y_i)) - \psi_\theta(x_i)\|^2`.

    :math:`x_i` is the real image latent :math:`z_i` was inverted from (the ``anchors`` of a ``latent`` synthetic
    set) and :math:`\psi_\theta` the embedding (``net.embed``) of the step's network: each synthetic image is kept
    close, in feature space, to its real counterpart while the matching term moves the set as a whole. Both
    sides are taken without augmentation. Not an IPM (a sum of pairwise distances). Cost: one generator and
    two embedding forward passes on ``n`` images.

    Class-parallel (``classes`` set): a sum over rows, so each rank adds its own rows' distances divided by the
    whole ``n`` (the engine sums the ranks' shares); the decoded set is the whole one (its rows from their owners).
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
        if self.classes is not None:  # class-parallel: this rank's rows, divided by every rank's count (a sum of shares)
            labels, n = self.synthetic.labels, self.synthetic.anchors.shape[0]
            rows = torch.nonzero((labels >= self.classes.start) & (labels < self.classes.stop), as_tuple=True)[0]
            with torch.no_grad():
                anchor = net.embed(self.synthetic.anchors[rows])
            decoded = net.embed(self.synthetic.images()[rows])
            return self.weight * (decoded - anchor).pow(2).sum(dim=1).sum() / n
        with torch.no_grad():
            anchor = net.embed(self.synthetic.anchors)
        decoded = net.embed(self.synthetic.images())
        return self.weight * (decoded - anchor).pow(2).sum(dim=1).mean()


def _cosine_logits(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """``(n, m)`` cosine similarities of the rows of ``a`` and ``b`` divided by ``temperature``."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).t() / temperature


def intra_class_diversity_loss(synthetic_features: Tensor, real_features: Tensor,
                               synthetic_segments: Sequence[slice], real_segments: Sequence[slice],
                               temperature: float) -> Tensor:
    r"""DCGM's intra-class term: each synthetic sample pulled to its real class centre, pushed from its class-mates.

    With :math:`s(a, b) = \cos(a, b)/\tau`, :math:`f_i` the synthetic features of class :math:`c` and
    :math:`\mu^T_c` the mean real feature of the class (the positive), the other synthetic samples of the
    same class being the negatives:

    .. math:: L_{intra} = \frac1{|S|}\sum_c \sum_{i \in S_c}
        \Big[\log\Big(e^{s(f_i, \mu^T_c)} + \sum_{j \in S_c, j \neq i} e^{s(f_i, f_j)}\Big) - s(f_i, \mu^T_c)\Big].

    Zero for one sample per class (no negatives); decreasing in every same-class cosine similarity
    :math:`\cos(f_i, f_j)`: the samples of a class are spread apart. ``synthetic_segments[k]`` and
    ``real_segments[k]`` hold the same class. Cost: :math:`O(\sum_c |S_c|^2 d)`.
    """
    total, count = synthetic_features.new_zeros(()), 0
    for ss, rs in zip(synthetic_segments, real_segments):
        f = synthetic_features[ss]
        centre = real_features[rs].mean(dim=0, keepdim=True)
        positive = _cosine_logits(f, centre, temperature)  # (n_c, 1)
        same = _cosine_logits(f, f, temperature)
        same = same.masked_fill(torch.eye(f.shape[0], dtype=torch.bool, device=f.device), float("-inf"))
        total = total + (torch.logsumexp(torch.cat([positive, same], dim=1), dim=1) - positive[:, 0]).sum()
        count += f.shape[0]
    return total / max(count, 1)


def inter_class_discrimination_loss(synthetic_features: Tensor, real_features: Tensor,
                                    synthetic_segments: Sequence[slice], real_segments: Sequence[slice],
                                    temperature: float) -> Tensor:
    r"""DCGM's inter-class term: every synthetic class centre pulled to its real centre, pushed from the other
    synthetic class centres.

    With :math:`\mu^S_c, \mu^T_c` the synthetic and real mean features of class :math:`c` and
    :math:`s(a, b) = \cos(a, b)/\tau`:

    .. math:: L_{inter} = \frac1C\sum_c \Big[\log\Big(e^{s(\mu^S_c, \mu^T_c)}
        + \sum_{c' \neq c} e^{s(\mu^S_c, \mu^S_{c'})}\Big) - s(\mu^S_c, \mu^T_c)\Big]:

    a cross-entropy that classifies each synthetic centre as its own class; it widens the gaps between the
    centres of different classes. Cost: :math:`O(|S| d + C^2 d)`.
    """
    syn_centres = class_means(synthetic_features, synthetic_segments)
    real_centres = class_means(real_features, real_segments)
    positive = (F.normalize(syn_centres, dim=1) * F.normalize(real_centres, dim=1)).sum(dim=1, keepdim=True) / temperature
    others = _cosine_logits(syn_centres, syn_centres, temperature)
    others = others.masked_fill(torch.eye(others.shape[0], dtype=torch.bool, device=others.device), float("-inf"))
    return (torch.logsumexp(torch.cat([positive, others], dim=1), dim=1) - positive[:, 0]).mean()


class ClassContrast(ExtraTerm):
    r"""DCGM's two relation terms, :math:`w_{intra} L_{intra} + w_{inter} L_{inter}`, in the step network's embedding.

    :math:`L_{intra}` is :func:`intra_class_diversity_loss` (each synthetic sample pushed away from the others of
    its class) and :math:`L_{inter}` :func:`inter_class_discrimination_loss` (the synthetic class centres pushed
    apart), both on ``net.embed`` of the step's augmented batches (the real side without a graph). One component
    so the two share one embedding pass per side. Not an IPM (contrastive penalties on the synthetic set's own
    geometry). Cost: one embedding forward pass per side plus :math:`O(\sum_c |S_c|^2 d + C^2 d)`.
    """

    name = "class_contrast"

    @dataclass(frozen=True)
    class Options:
        intra_weight: float = option(0.1, "DCGM (Zhang et al. 2023): weight of the intra-class loss; no code or "
                                          "value released, this library's choice")
        inter_weight: float = option(0.1, "DCGM (Zhang et al. 2023): weight of the inter-class loss; no code or "
                                          "value released, this library's choice")
        dcgm_temperature: float = option(0.1, "temperature of DCGM's two contrastive terms (this library's choice)")

    def __init__(self, intra_weight: float, inter_weight: float | None = None, temperature: float = 0.1) -> None:
        """``inter_weight=None``: the same weight for both terms (:func:`get_extra_term` passes one weight)."""
        from ipmcondense.ipm._validation import check_positive_number

        self.intra_weight = check_positive_number(intra_weight, "intra_weight", allow_zero=True)
        inter_weight = self.intra_weight if inter_weight is None else inter_weight
        self.inter_weight = check_positive_number(inter_weight, "inter_weight", allow_zero=True)
        self.temperature = check_positive_number(temperature, "dcgm_temperature")
        super().__init__(1.0)

    @classmethod
    def from_options(cls, options, **context):
        return cls(options.intra_weight, options.inter_weight, options.dcgm_temperature)

    def bind(self, synthetic):
        self.synthetic_rows = int(synthetic.labels.numel())

    def _rank_share(self, synthetic: Tensor, real: Tensor, synthetic_labels: Tensor,
                    synthetic_segments: Sequence[slice], real_segments: Sequence[slice]) -> Tensor:
        r"""Class-parallel: this rank's share of both terms (the engine sums the shares over the ranks).

        :math:`L_{intra}` is a sum over the rows of each class divided by :math:`|S|`: the own classes' sum over
        the whole :math:`|S|`. :math:`L_{inter}` is a mean over the classes of a cross-entropy against every
        synthetic centre: the centres of every class are rebuilt on every rank from their owners
        (:meth:`~ipmcondense.condensation.parallel.WholeSetOnEveryRank.rows`: one all-reduce of the ``(C, d)``
        matrix, its backward summing the ranks' gradients into the owners' centres) and each rank adds its own
        classes' terms divided by :math:`C`.
        """
        from .parallel import WholeSetOnEveryRank

        total = synthetic.new_zeros(())
        if self.intra_weight:
            intra = intra_class_diversity_loss(synthetic, real, synthetic_segments, real_segments, self.temperature)
            total = total + self.intra_weight * intra * synthetic.shape[0] / self.synthetic_rows
        if self.inter_weight:
            own = torch.stack([synthetic_labels[s][0] for s in synthetic_segments])
            every = torch.arange(int(self.num_classes), device=own.device)
            centres = class_means(synthetic, synthetic_segments)
            whole = WholeSetOnEveryRank(self.classes, every, None)
            all_centres = whole.rows(centres.new_zeros(every.numel(), centres.shape[1]).index_copy(0, own, centres))
            real_centres = class_means(real, real_segments)
            positive = (F.normalize(centres, dim=1) * F.normalize(real_centres, dim=1)).sum(dim=1, keepdim=True)
            positive = positive / self.temperature
            others = _cosine_logits(centres, all_centres, self.temperature)
            others = others.masked_fill(own[:, None] == every[None, :], float("-inf"))
            inter = (torch.logsumexp(torch.cat([positive, others], dim=1), dim=1) - positive[:, 0]).sum()
            total = total + self.inter_weight * inter / int(self.num_classes)
        return total

    def __call__(self, net, real_images, real_labels, synthetic_images, synthetic_labels, real_segments, synthetic_segments):
        if self.intra_weight == 0 and self.inter_weight == 0:
            return synthetic_images.new_zeros(())
        with torch.no_grad():
            real = net.embed(real_images).flatten(1)
        synthetic = net.embed(synthetic_images).flatten(1)
        if self.classes is not None:
            return self._rank_share(synthetic, real, synthetic_labels, synthetic_segments, real_segments)
        total = synthetic.new_zeros(())
        if self.intra_weight:
            total = total + self.intra_weight * intra_class_diversity_loss(
                synthetic, real, synthetic_segments, real_segments, self.temperature)
        if self.inter_weight:
            total = total + self.inter_weight * inter_class_discrimination_loss(
                synthetic, real, synthetic_segments, real_segments, self.temperature)
        return total


#: The registered extra terms by name.
EXTRA_TERMS: Registry = Registry("extra term")
for _cls in (SyntheticCrossEntropy, PrototypeDiscrimination, ClassNormStatistics, TeacherCrossEntropy,
             AnchorFeatureDistance, ClassContrast):
    EXTRA_TERMS.register(_cls)
EXTRA_TERM_NAMES = EXTRA_TERMS.names


def get_extra_term(name: str, weight: float) -> ExtraTerm:
    """Build an extra term by name (:data:`EXTRA_TERM_NAMES`) with its weight."""
    return EXTRA_TERMS.get(name)(weight)
