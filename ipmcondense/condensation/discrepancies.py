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
w2_barycenter       :math:`\sqrt m\, W_2(S, \text{bary}_m(T))`      not an IPM (WMDD)
gradient_mse        :math:`\|\bar g(T) - \bar g(S)\|^2`            exact: IPM^2 over the L2 ball
gradient_cosine     :math:`\sum_{rows} 1 - \cos`                  normalised variant (DC)
==================  ===========================================  ==========================

Extra terms that are *not* IPMs (IDM's synthetic cross-entropy, CAFE's prototype discrimination)
live at the end of this module and are added to the loss with their weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Sequence

import torch
from torch import Tensor

from ipmcondense.components import Component, Registry, option

__all__ = [
    "Discrepancy",
    "MeanEmbeddingDiscrepancy",
    "GaussianMMDDiscrepancy",
    "SinkhornDiscrepancy",
    "SlicedWassersteinDiscrepancy",
    "BarycenterDiscrepancy",
    "GradientMSEDiscrepancy",
    "GradientCosineDiscrepancy",
    "DISCREPANCIES",
    "DISCREPANCY_NAMES",
    "DISCREPANCY_ALIASES",
    "canonical_discrepancy_name",
    "get_discrepancy",
    "class_means",
]


def class_means(values: Tensor, segments: Sequence[slice]) -> Tensor:
    """Means of the rows of each segment: ``(n_segments, d)`` from ``(B, d)``."""
    return torch.stack([values[s].mean(dim=0) for s in segments])


class Discrepancy(Component, ABC):
    """A differentiable discrepancy between two point clouds of features (a component: ``name``, ``Options``)."""

    kind = "discrepancy"

    name: str = ""
    #: one of "exact IPM", "normalised variant", "approximation / not an IPM"
    relation_to_ipm: str = ""
    #: True if it only depends on the mean of each side (so per-class segments can be batched)
    uses_means_only: bool = False
    #: True if it only makes sense on parameter-gradient blocks
    needs_gradient_features: bool = False
    #: True if the matching loss takes it once on the class average of the per-class means (DCC), not per class
    joint_over_classes: bool = False

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

    name = "mmd2"
    relation_to_ipm = "exact IPM"

    @dataclass(frozen=True)
    class Options:
        bandwidth: float | str = option("median", "median heuristic of the pooled sample (M3D: median)")
        estimator: str = option("biased", "V-statistic: non-negative, defined at one image per class")

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

    Relation: approximation. With cost :math:`\|x - y\|^p / p` (``sinkhorn_p``), :math:`S_\varepsilon`
    tends to :math:`W_p^p / p` as blur -> 0 (for p = 1 that is :math:`W_1`, the IPM over 1-Lipschitz
    witnesses) and to an MMD (half the energy distance for p = 1) as blur -> infinity; at a positive blur
    it is a positive-definite divergence, not itself an IPM (it does not depend on :math:`\mu - \nu`
    alone). Via :func:`ipmcondense.ipm.sinkhorn.sinkhorn_divergence`. Cost: :math:`O(n m d)` per Sinkhorn
    iteration, :math:`O(\log(\text{diameter}/\text{blur}))` iterations with eps-scaling.
    """

    name = "sinkhorn"
    relation_to_ipm = "approximation / not an IPM"

    @dataclass(frozen=True)
    class Options:
        blur: float = option(0.05, "geomloss default blur")
        sinkhorn_p: int = option(2, "geomloss default p=2 (W_2^2/2); the wasserstein row sets 1 (W_1, the IPM)")

    @classmethod
    def from_options(cls, options, **context):
        return cls(p=options.sinkhorn_p, blur=options.blur)

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

    @dataclass(frozen=True)
    class Options:
        n_projections: int = option(200, "sliced Wasserstein: 200 random directions")

    def __init__(self, n_projections: int = 200, p: int = 2) -> None:
        self.n_projections, self.p = n_projections, p

    @staticmethod
    def draw_seed(generator: torch.Generator) -> int:
        """The projections' seed of one call: one number drawn from ``generator`` (class-parallel condensation
        draws and drops the other ranks' classes' seeds with it)."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))

    def drop_draws(self, generator: torch.Generator, real_rows: int) -> None:
        """Consume what one call draws from ``generator`` (one seed), for a class another rank owns."""
        self.draw_seed(generator)

    def __call__(self, real, synthetic, *, generator=None):
        from ipmcondense.ipm.wasserstein import sliced_wasserstein

        seed = None if generator is None else self.draw_seed(generator)
        return sliced_wasserstein(
            synthetic.flatten(1), real.flatten(1), n_projections=self.n_projections, p=self.p, seed=seed
        )


class BarycenterDiscrepancy(Discrepancy):
    r"""WMDD's feature loss: distance of S to the :math:`W_2` barycenter of T with one atom per synthetic point.

    With :math:`m` synthetic features :math:`s_1..s_m` and the free-support :math:`W_2` barycenter
    :math:`b_1..b_m` of the real features (:func:`ipmcondense.ipm.wasserstein.free_support_barycenter`,
    :math:`m` uniform atoms, initialised at :math:`m` real points drawn from the run's generator),

    .. math::
        D(T, S) = \min_{\sigma \in \mathfrak S_m} \Big(\sum_i \|s_i - b_{\sigma(i)}\|^2\Big)^{1/2}
                = \sqrt{m}\, W_2\big(\tfrac1m \textstyle\sum_i \delta_{s_i},\ \tfrac1m \sum_j \delta_{b_j}\big),

    the Frobenius norm of the matched differences (WMDD ``data_synthesis_new.py``: ``torch.norm(feature -
    wass_bary, 2)``); between two uniform :math:`m`-point measures the optimal plan is a permutation
    (Birkhoff), found by ``scipy.optimize.linear_sum_assignment`` on the detached squared distances.
    Relation: not an IPM (:math:`W_2`); by the triangle inequality
    :math:`W_2(S, T) \le W_2(S, B) + W_2(B, T)`, with :math:`W_2(B, T)` the smallest error of any
    :math:`m`-atom set, and :math:`W_1 \le W_2` bounds the Lipschitz IPM. The barycenter is recomputed
    from the real batch it is given, without gradient. Cost: ``barycenter_iterations`` exact transport
    problems of size :math:`m \times n`, one :math:`m \times m` assignment.
    """

    name = "w2_barycenter"
    relation_to_ipm = "approximation / not an IPM"

    @dataclass(frozen=True)
    class Options:
        barycenter_iterations: int = option(
            100, "WMDD barycenter.py: ot.lp.free_support_barycenter with its default numItermax=100")

    def __init__(self, barycenter_iterations: int = 100) -> None:
        if isinstance(barycenter_iterations, bool) or not isinstance(barycenter_iterations, int) or barycenter_iterations < 1:
            raise ValueError(f"barycenter_iterations must be a positive integer, got {barycenter_iterations!r}")
        self.barycenter_iterations = barycenter_iterations

    def drop_draws(self, generator: torch.Generator, real_rows: int) -> None:
        """Consume what one call on ``real_rows`` real points draws from ``generator`` (the barycenter's initial
        atoms: one ``randperm(real_rows)``), for a class another rank owns (class-parallel condensation)."""
        torch.randperm(int(real_rows), generator=generator)

    def __call__(self, real, synthetic, *, generator=None):
        from scipy.optimize import linear_sum_assignment

        from ipmcondense.ipm.wasserstein import free_support_barycenter

        real, synthetic = real.flatten(1), synthetic.flatten(1)
        m = synthetic.shape[0]
        if real.shape[0] < m:
            raise ValueError(
                f"the W_2 barycenter needs at least as many real points as atoms: got {real.shape[0]} real and {m} "
                "synthetic points per class; raise batch_real to at least ipc"
            )
        atoms = free_support_barycenter(real.detach(), m, generator=generator, max_iter=self.barycenter_iterations)
        cost = torch.cdist(synthetic.detach().double(), atoms.double()).pow(2)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        index = torch.as_tensor(cols[rows.argsort()], device=synthetic.device)
        return (synthetic - atoms[index].to(synthetic.dtype)).pow(2).sum().clamp_min(1e-30).sqrt()


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


class GradientL1Discrepancy(Discrepancy):
    r"""IDC's ``metric='l1'``: :math:`\sum_{i} |\bar g^T_i - \bar g^S_i|` over the entries of each parameter tensor
    of three or more dimensions (convolution kernels).

    As IDC's ``condense.py: matchloss`` with its defaults ``--bias False --fc False``: tensors of one
    dimension (biases, norm affine) and two dimensions (the linear classifier) contribute exactly 0.
    Relation: exactly the IPM over the linear witnesses of the kept gradient coordinates with
    :math:`\|w\|_\infty \le 1`, since :math:`\|v\|_1 = \sup_{\|w\|_\infty \le 1} \langle w, v\rangle`.
    Cost: O(n_parameters).
    """

    name = "gradient_l1"
    relation_to_ipm = "exact IPM"
    uses_means_only = True
    needs_gradient_features = True

    def __call__(self, real, synthetic, *, generator=None):
        gr, gs = real.mean(dim=0), synthetic.mean(dim=0)
        if gr.dim() <= 2:
            return gr.new_zeros(())
        return (gr - gs).abs().sum()


class GradientCosineJointDiscrepancy(GradientCosineDiscrepancy):
    r"""DCC's contrastive matching: DC's layer-wise :math:`\sum_i 1 - \cos` of the gradients of the loss over
    *all classes jointly*.

    The matching loss calls it once (``joint_over_classes``) with the class averages of the per-class mean
    gradients, :math:`\bar g^T = \frac1C \sum_c \nabla_\theta \ell(T_c)` (DCC ``main.py``: the real gradient
    averaged over classes) and :math:`\bar g^S = \nabla_\theta \frac1{|S|}\sum_{x \in S} \ell(x)` (the loss on the
    whole synthetic set, the same average when classes have equal sizes), instead of one term per class:
    the gradient then carries the contrast between classes (how the classifier separates them). With a
    single class it is DC's loss. Relation: normalised variant of the gradient IPM over the joint
    distribution of (x, y) rather than the per-class conditionals. Cost: O(n_parameters), once per step.
    """

    name = "gradient_cosine_joint"
    joint_over_classes = True


#: The registered discrepancies by name.
DISCREPANCIES: Registry = Registry("discrepancy")
for _cls in (MeanEmbeddingDiscrepancy, GaussianMMDDiscrepancy, SinkhornDiscrepancy, SlicedWassersteinDiscrepancy,
             BarycenterDiscrepancy, GradientMSEDiscrepancy, GradientCosineDiscrepancy, GradientL1Discrepancy, GradientCosineJointDiscrepancy):
    DISCREPANCIES.register(_cls)
DISCREPANCY_NAMES = DISCREPANCIES.names

#: Old spellings still accepted (with a ``DeprecationWarning``): ``"mmd"`` computed MMD^2, so it is ``"mmd2"``.
DISCREPANCY_ALIASES = {"mmd": "mmd2"}


def canonical_discrepancy_name(name: str) -> str:
    """``name`` with deprecated aliases replaced (``"mmd"`` -> ``"mmd2"``, warned)."""
    if isinstance(name, str) and name in DISCREPANCY_ALIASES:
        import warnings

        new = DISCREPANCY_ALIASES[name]
        warnings.warn(f"discrepancy {name!r} is now called {new!r} (it computes the squared MMD)",
                      DeprecationWarning, stacklevel=3)
        return new
    return name


def get_discrepancy(name: str, **options) -> Discrepancy:
    """Build a discrepancy by name (:data:`DISCREPANCY_NAMES`) with its constructor options."""
    cls = DISCREPANCIES.get(canonical_discrepancy_name(name))
    try:
        return cls(**options)
    except TypeError as err:
        raise TypeError(f"bad options for discrepancy {name!r}: {err}") from err
