r"""Discrepancies :math:`D` between the features of a real and a synthetic class, built on :mod:`ipmcondense.ipm`.

Each discrepancy takes two point clouds ``real (n, ...)`` and ``synthetic (m, ...)`` (one feature block
of one class; extra axes are flattened) and returns a differentiable scalar. Its docstring states how it
relates to an IPM :math:`d_F(\mu, \nu) = \sup_{f \in F} |E_\mu f - E_\nu f|`.

==================  ===========================================  ==========================
name                formula                                      relation to an IPM
==================  ===========================================  ==========================
mean_embedding      :math:`\|\bar\phi(T) - \bar\phi(S)\|^2`        exact: linear-kernel IPM^2
mmd                 Gaussian-kernel MMD^2 (biased, V-statistic)   exact: RKHS-ball IPM^2
sinkhorn            debiased Sinkhorn divergence                  approximates W_p (1-Lipschitz)
sliced              sliced Wasserstein                            a Wasserstein-type metric
gradient_mse        :math:`\|\bar g(T) - \bar g(S)\|^2`            exact: IPM^2 over the L2 ball
gradient_cosine     :math:`\sum_{rows} 1 - \cos`                  normalised variant (DC)
==================  ===========================================  ==========================

Extra terms that are *not* IPMs (IDM's synthetic cross-entropy, CAFE's prototype discrimination)
live at the end of this module and are added to the loss with their weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.ipm._validation import check_choice

__all__ = [
    "Discrepancy",
    "MeanEmbeddingDiscrepancy",
    "GaussianMMDDiscrepancy",
    "SinkhornDiscrepancy",
    "SlicedWassersteinDiscrepancy",
    "GradientMSEDiscrepancy",
    "GradientCosineDiscrepancy",
    "DISCREPANCY_NAMES",
    "get_discrepancy",
    "ExtraTerm",
    "SyntheticCrossEntropy",
    "PrototypeDiscrimination",
    "EXTRA_TERM_NAMES",
    "get_extra_term",
    "class_means",
]


def class_means(values: Tensor, segments: Sequence[slice]) -> Tensor:
    """Means of the rows of each segment: ``(n_segments, d)`` from ``(B, d)``."""
    return torch.stack([values[s].mean(dim=0) for s in segments])


class Discrepancy(ABC):
    """A differentiable discrepancy between two point clouds of features."""

    name: str = ""
    #: one of "exact IPM", "normalised variant", "approximation / not an IPM"
    relation_to_ipm: str = ""
    #: True if it only depends on the mean of each side (so per-class segments can be batched)
    uses_means_only: bool = False
    #: True if it only makes sense on parameter-gradient blocks
    needs_gradient_features: bool = False

    @abstractmethod
    def __call__(self, real: Tensor, synthetic: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``D(real, synthetic)`` as a 0-d tensor, differentiable w.r.t. ``synthetic``."""


class MeanEmbeddingDiscrepancy(Discrepancy):
    r"""Squared distance of the means, :math:`\| \frac1n\sum_i \phi(t_i) - \frac1m\sum_j \phi(s_j) \|_2^2` (DM).

    Relation: exactly the square of the IPM over linear witnesses
    :math:`F = \{ x \mapsto \langle w, \phi(x)\rangle : \|w\|_2 \le 1 \}`, i.e. the linear-kernel MMD^2
    (biased V-statistic) — equal to :func:`ipmcondense.ipm.mean_embedding.mean_embedding_distance`
    with ``squared=True``. Cost: O((n + m) d).
    """

    name = "mean_embedding"
    relation_to_ipm = "exact IPM"
    uses_means_only = True

    def __call__(self, real, synthetic, *, generator=None):
        diff = real.flatten(1).mean(dim=0) - synthetic.flatten(1).mean(dim=0)
        return (diff * diff).sum()


class GaussianMMDDiscrepancy(Discrepancy):
    r"""Gaussian-kernel MMD^2 between the two clouds (M3D), via :func:`ipmcondense.ipm.mmd.mmd2`.

    Relation: exactly the square of the IPM over the unit ball of the Gaussian RKHS (a characteristic
    kernel, so it separates distributions, unlike the mean embedding). Default estimator ``"biased"``
    (V-statistic, non-negative, defined for one synthetic image per class). Cost: O((n + m)^2 d).

    Args:
        bandwidth: kernel bandwidth or ``"median"`` (median heuristic, as implemented by ``mmd2``).
        estimator: ``"biased"`` | ``"unbiased"`` | ``"linear"``.
    """

    name = "mmd"
    relation_to_ipm = "exact IPM"

    def __init__(self, bandwidth: float | str = "median", estimator: str = "biased", kernel: str = "gaussian") -> None:
        self.bandwidth = bandwidth
        self.estimator = estimator
        self.kernel = kernel

    def __call__(self, real, synthetic, *, generator=None):
        from ipmcondense.ipm.mmd import mmd2

        return mmd2(
            synthetic.flatten(1), real.flatten(1), kernel=self.kernel, bandwidth=self.bandwidth, estimator=self.estimator
        )


class SinkhornDiscrepancy(Discrepancy):
    r"""Debiased Sinkhorn divergence :math:`S_\varepsilon` (WMDD-style Wasserstein matching).

    Relation: approximation. :math:`S_\varepsilon` interpolates between :math:`W_p^p` (the IPM over
    1-Lipschitz witnesses for p = 1) as blur -> 0 and an MMD as blur -> infinity; it is a
    positive-definite divergence, not itself an IPM. Via :func:`ipmcondense.ipm.sinkhorn.sinkhorn_divergence`.
    """

    name = "sinkhorn"
    relation_to_ipm = "approximation / not an IPM"

    def __init__(self, p: int = 2, blur: float = 0.05, scaling: float = 0.5) -> None:
        self.p, self.blur, self.scaling = p, blur, scaling

    def __call__(self, real, synthetic, *, generator=None):
        from ipmcondense.ipm.sinkhorn import sinkhorn_divergence

        return sinkhorn_divergence(
            synthetic.flatten(1), real.flatten(1), p=self.p, blur=self.blur, scaling=self.scaling
        )


class SlicedWassersteinDiscrepancy(Discrepancy):
    r"""Sliced Wasserstein distance (mean of 1-D :math:`W_p` over random directions).

    Relation: approximation. A metric bounded by :math:`W_p`; the projections are drawn from the run's
    generator (a seed drawn from ``generator``) so that runs and resumes are reproducible.
    Via :func:`ipmcondense.ipm.wasserstein.sliced_wasserstein`.
    """

    name = "sliced"
    relation_to_ipm = "approximation / not an IPM"

    def __init__(self, n_projections: int = 200, p: int = 2) -> None:
        self.n_projections, self.p = n_projections, p

    def __call__(self, real, synthetic, *, generator=None):
        from ipmcondense.ipm.wasserstein import sliced_wasserstein

        seed = None if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        return sliced_wasserstein(
            synthetic.flatten(1), real.flatten(1), n_projections=self.n_projections, p=self.p, seed=seed
        )


class GradientMSEDiscrepancy(Discrepancy):
    r"""Squared L2 distance of the mean gradients, :math:`\| \bar g(T) - \bar g(S) \|_2^2` (DC ``'mse'``).

    Summed over parameter blocks it is the squared norm of the difference of the concatenated gradient
    vectors. Relation: exactly the square of the IPM over
    :math:`F = \{ (x, y) \mapsto \langle w, \nabla_\theta \ell(f_\theta(x), y)\rangle : \|w\|_2 \le 1\}`
    (biases included). Cost: O(n_parameters).
    """

    name = "gradient_mse"
    relation_to_ipm = "exact IPM"
    uses_means_only = True
    needs_gradient_features = True

    def __call__(self, real, synthetic, *, generator=None):
        diff = real.mean(dim=0) - synthetic.mean(dim=0)
        return (diff * diff).sum()


class GradientCosineDiscrepancy(Discrepancy):
    r"""DC's layer-wise distance: :math:`\sum_{i} 1 - \cos(\bar g^T_i, \bar g^S_i)` over output rows ``i``.

    Per parameter tensor (the block), the mean gradient is reshaped to ``(out_channels, -1)`` and the
    cosine is taken row by row, with ``eps = 1e-6`` in the denominator as the reference
    (``utils.py: distance_wb``). One-dimensional tensors (biases, norm affine) contribute exactly 0.
    Relation: normalised variant — each row term is one minus the normalised linear-witness gap
    (the mean-gradient IPM divided by the norms), so it ignores gradient magnitudes.
    """

    name = "gradient_cosine"
    relation_to_ipm = "normalised variant"
    uses_means_only = True
    needs_gradient_features = True

    def __call__(self, real, synthetic, *, generator=None):
        gr, gs = real.mean(dim=0), synthetic.mean(dim=0)
        if gr.dim() <= 1:
            return gr.new_zeros(())
        gr, gs = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)
        cos = (gr * gs).sum(dim=-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6)
        return (1.0 - cos).sum()


DISCREPANCY_NAMES = ("mean_embedding", "mmd", "sinkhorn", "sliced", "gradient_mse", "gradient_cosine")

_DISCREPANCIES = {
    "mean_embedding": MeanEmbeddingDiscrepancy,
    "mmd": GaussianMMDDiscrepancy,
    "sinkhorn": SinkhornDiscrepancy,
    "sliced": SlicedWassersteinDiscrepancy,
    "gradient_mse": GradientMSEDiscrepancy,
    "gradient_cosine": GradientCosineDiscrepancy,
}


def get_discrepancy(name: str, **options) -> Discrepancy:
    """Build a discrepancy by name (:data:`DISCREPANCY_NAMES`) with its options."""
    check_choice(name, DISCREPANCY_NAMES, "discrepancy")
    try:
        return _DISCREPANCIES[name](**options)
    except TypeError as err:
        raise TypeError(f"bad options for discrepancy {name!r}: {err}") from err


# ----------------------------------------------------------------------------------------------
# Extra terms: not IPMs, added to the matching loss with a weight.


class ExtraTerm(ABC):
    """A regulariser added to a recipe's matching loss (it is not an IPM)."""

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
    r"""IDM's term :math:`w \cdot \text{acc}_\theta(T) \cdot \sum_c \text{CE}(f_\theta(S_c), c)`.

    ``acc`` is the network's accuracy on the real batch (no gradient): a partly trained network's
    logits are trusted in proportion to its accuracy. Cost: one forward pass of each side.
    """

    name = "synthetic_ce"

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


EXTRA_TERM_NAMES = ("synthetic_ce", "prototype_discrimination")


def get_extra_term(name: str, weight: float) -> ExtraTerm:
    """Build an extra term by name (:data:`EXTRA_TERM_NAMES`) with its weight."""
    check_choice(name, EXTRA_TERM_NAMES, "extra term")
    return {"synthetic_ce": SyntheticCrossEntropy, "prototype_discrimination": PrototypeDiscrimination}[name](weight)
