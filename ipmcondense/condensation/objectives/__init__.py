r"""The objective axis: what one image step of the engine minimises.

The engine (:mod:`ipmcondense.condensation.engine`) asks the recipe's :class:`Objective` for the loss
of one step and its gradients with respect to the learnable tensors (the synthetic set's parameters
and the objective's own, e.g. a temperature), then takes one optimiser step. Everything else (the
loop, checkpoints, resume, outputs, evaluation) is shared.

* ``matching``: :math:`\sum_c D(\phi_\theta(A(T_c)), \phi_\theta(A(S_c)))` plus extras (the LCMat curvature
  term with ``lcmat_weight > 0``); an exact IPM, a normalised variant or an approximation as the row's
  discrepancy says.
* ``mtt``: :math:`\|\theta^S_N - \theta^*_{t+M}\|^2/\|\theta^*_t - \theta^*_{t+M}\|^2`; a first-order
  approximation: accumulated gradient matching along the expert trajectory.
* ``kip``: :math:`\tfrac12 \mathrm{mean}(Y_T - K_{TS}(K_{SS}+\lambda I)^{-1}Y_S)^2`; not an IPM (a regression
  loss; the witness class of the kernel's MMD is the RKHS).
* ``rfad``: the Platt-scaled cross-entropy of the KRR predictions with a random-feature NNGP; not an IPM (as KIP).
* ``dd``: :math:`\mathrm{CE}(f_{\theta_N(S)}(X_T), Y_T)` after N unrolled SGD steps on S with learnable step
  sizes; not an IPM (bilevel).
* ``esp``: DD's loss after N *projected* SGD steps on S, the inner parameters kept in the span of the expert
  trajectories (:math:`\theta_{i+1} = P_V(\theta_i - \eta_i \nabla \ell_S)`), plus the weighted relative distance
  of the unprojected steps from that span; not an IPM (bilevel).
* ``rcig``: :math:`\mathrm{CE}(X_T W^*(S), Y_T)` with :math:`W^* = \arg\min_W` a convex inner loss on S, gradient
  by implicit differentiation; not an IPM (bilevel).

Randomness: every draw (real batches, expert samples, networks, augmentations, unroll mini-batches)
comes from the engine's one generator, so ``resume=True`` continues bit-for-bit.
"""

from __future__ import annotations

from ipmcondense.components import Registry

from .base import Objective, ObjectiveContext, check_options, draw_network
from .bilevel import (
    ImplicitBilevelObjective,
    UnrolledBilevelObjective,
    inner_linear_loss,
    solve_inner_linear,
    unrolled_task_loss,
)
from .kernel import KERNEL_NAMES, KernelInducingPointsObjective, RandomFeatureKRRObjective, build_kernel
from .matching import MatchingObjective, lcmat_perturbation
from .subspace import (
    SubspaceBilevelObjective,
    expert_subspace,
    project_onto_subspace,
    projected_unrolled_sgd,
    subspace_residual,
)
from .trajectory import (
    TrajectoryMatchingGradients,
    TrajectoryMatchingObjective,
    trajectory_matching_loss,
    trajectory_matching_loss_and_grads,
)

__all__ = [
    "ObjectiveContext",
    "Objective",
    "MatchingObjective",
    "TrajectoryMatchingObjective",
    "KernelInducingPointsObjective",
    "RandomFeatureKRRObjective",
    "UnrolledBilevelObjective",
    "ImplicitBilevelObjective",
    "SubspaceBilevelObjective",
    "expert_subspace",
    "project_onto_subspace",
    "subspace_residual",
    "projected_unrolled_sgd",
    "OBJECTIVES",
    "OBJECTIVE_NAMES",
    "KERNEL_NAMES",
    "get_objective_class",
    "lcmat_perturbation",
    "build_kernel",
    "unrolled_task_loss",
    "solve_inner_linear",
    "inner_linear_loss",
    "trajectory_matching_loss",
    "trajectory_matching_loss_and_grads",
    "TrajectoryMatchingGradients",
    "check_options",
    "draw_network",
]

#: The registered objectives by name, the ``objective`` of a recipe row.
OBJECTIVES: Registry = Registry("objective")
for _cls in (MatchingObjective, TrajectoryMatchingObjective, KernelInducingPointsObjective, RandomFeatureKRRObjective,
             UnrolledBilevelObjective, ImplicitBilevelObjective, SubspaceBilevelObjective):
    OBJECTIVES.register(_cls)
OBJECTIVE_NAMES = OBJECTIVES.names


def get_objective_class(name: str) -> type[Objective]:
    """The objective class registered as ``name`` (:data:`OBJECTIVE_NAMES`)."""
    return OBJECTIVES.get(name)
