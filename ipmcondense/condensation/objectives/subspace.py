r"""The ``esp`` objective: DD-style unrolling inside the subspace spanned by expert trajectories (Ma et al. 2023).

ESP ("Dataset Condensation via Expert Subspace Projection", Ma et al., *Sensors* 23(19):8148, 2023) constrains
the training trajectory of the synthetic set to the subspace spanned by the training trajectories on the
real data. No code is public and only the abstract could be read, so this objective follows the issue's
definition: DD's unrolled bilevel objective (:class:`~ipmcondense.condensation.objectives.bilevel.UnrolledBilevelObjective`)
whose inner parameters are projected onto

.. math:: V = \mathrm{span}\{\theta^*_{k,t} : k \text{ expert}, 0 \le t \le E\} \subset R^P,

the span of every snapshot of every expert in the buffer (:func:`expert_subspace`: the top ``esp_rank``
left singular vectors :math:`Q \in R^{P \times r}` of the snapshot matrix, orthonormal columns). The inner
step is projected SGD, :math:`\theta_{i+1} = P_V(\theta_i - \eta_i \nabla_\theta \mathrm{CE}(f_{\theta_i}(X_S), Y_S))`
with :math:`P_V = Q Q^\top`, run in the coefficients :math:`c = Q^\top \theta` (:func:`projected_unrolled_sgd`).
The abstract says ESP avoids unrolling; the paper's loss could not be read, so that part is not reproduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.autodiff import FlatParameters
from ipmcondense.components import option

from .base import Objective, ObjectiveContext, check_options

__all__ = ["SubspaceBilevelObjective", "expert_subspace", "project_onto_subspace", "projected_unrolled_sgd"]


def expert_subspace(snapshots: Tensor, rank: int | None = None, tolerance: float = 1e-7) -> Tensor:
    r"""Orthonormal basis :math:`Q` ``(P, r)`` of the span of ``snapshots`` ``(m, P)`` (rows: parameter vectors).

    Thin SVD of :math:`\Theta^\top` in float64; keeps the left singular vectors whose singular value exceeds
    ``tolerance`` times the largest (the numerical rank), or the top ``rank`` of them. Cost:
    :math:`O(P m^2)`.

    Raises:
        ValueError: ``rank`` is not a positive integer or exceeds the numerical rank.
    """
    if snapshots.dim() != 2 or snapshots.shape[0] < 1:
        raise ValueError(f"snapshots must have shape (m >= 1, P), got {tuple(snapshots.shape)}")
    u, s, _ = torch.linalg.svd(snapshots.detach().double().T, full_matrices=False)
    numerical = int((s > tolerance * s[0]).sum())
    if rank is None:
        rank = numerical
    elif isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= numerical:
        raise ValueError(
            f"esp_rank must be an integer in [1, {numerical}] (the numerical rank of the {snapshots.shape[0]} expert "
            f"snapshots), got {rank!r}"
        )
    return u[:, :rank].to(snapshots.dtype)


def project_onto_subspace(basis: Tensor, theta: Tensor) -> Tensor:
    r""":math:`P_V \theta = Q (Q^\top \theta)` for an orthonormal ``basis`` :math:`Q` ``(P, r)``; idempotent. Cost :math:`O(P r)`."""
    return basis @ (basis.T @ theta)


def projected_unrolled_sgd(
    net: nn.Module,
    basis: Tensor,
    flat_params_start: Tensor,
    images: Tensor,
    labels: Tensor,
    lrs: Tensor,
    *,
    return_trajectory: bool = False,
) -> Tensor | list[Tensor]:
    r"""Projected SGD on the whole synthetic set, ``len(lrs)`` steps, differentiable in ``images`` and ``lrs``.

    .. math:: c_0 = Q^\top \theta_0, \qquad
        c_{i+1} = c_i - \eta_i\, Q^\top \nabla_\theta \mathrm{CE}\big(f_{Q c_i}(X), Y\big), \qquad \theta_i = Q c_i,

    i.e. :math:`\theta_{i+1} = P_V(\theta_i - \eta_i \nabla \ell(\theta_i))` with :math:`\theta_0` replaced by its
    projection; every iterate lies in :math:`V = \mathrm{range}(Q)` exactly (up to rounding). Returns
    :math:`\theta_N` (``(P,)``) or the list :math:`[\theta_0, \dots, \theta_N]`.
    Cost: ``N`` forward + backward passes on X plus :math:`O(P r)` per step; the graph of every step is kept.
    """
    layout = FlatParameters(net)
    layout.check_vector(flat_params_start, "flat_params_start")
    if basis.dim() != 2 or basis.shape[0] != flat_params_start.numel():
        raise ValueError(f"basis must have shape ({flat_params_start.numel()}, r), got {tuple(basis.shape)}")
    coefficients = basis.T @ flat_params_start.detach()
    trajectory = [basis @ coefficients]
    for step in range(int(lrs.numel())):
        theta = trajectory[-1]
        if not theta.requires_grad:
            theta = theta.requires_grad_(True)
        loss = F.cross_entropy(layout.forward(net, theta, images), labels)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        coefficients = coefficients - lrs[step] * (basis.T @ grad)
        trajectory.append(basis @ coefficients)
    return trajectory if return_trajectory else trajectory[-1]


class SubspaceBilevelObjective(Objective):
    r"""ESP: DD's real-data loss after ``dd_steps`` projected SGD steps on S inside the experts' span (module docstring).

    Each step: draw an expert :math:`k` (run's generator) and start at its initialisation
    :math:`\theta^*_{k,0}` (a random init, DD's ``unknown_init``, that lies in :math:`V`); take ``dd_steps``
    projected SGD steps on the whole synthetic set with DD's learnable step sizes
    :math:`\eta_i = \mathrm{softplus}(r_i)` (init ``dd_lr_init``, own step ``lr_lrs``); the loss is the
    cross-entropy of :math:`f_{\theta_N}` on a class-balanced real batch (``batch_real``). The subspace is
    computed once from the buffer (``experts``), of dimension ``esp_rank`` (``None``: the numerical rank).

    **Relation to an IPM**: none: a bilevel performance objective; the projection restricts the inner
    hypothesis class to networks in the experts' span.

    Cost: as DD plus :math:`O(P r)` per inner step; memory: the basis (:math:`P r` numbers) and the graph of
    the ``dd_steps`` steps.
    """

    name = "esp"
    relation_to_ipm = "not an IPM: bilevel objective (real-data loss after projected unrolled training on S)"

    @dataclass(frozen=True)
    class Options:
        esp_rank: int | None = option(None, "None: the numerical rank of every expert snapshot (issue 12 item 6)")

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        from .trajectory import _open_buffer

        self.buffer = _open_buffer(ctx.config, ctx.dataset, method="esp")
        self.template = self.buffer.build_network().to(ctx.device)
        snapshots = torch.cat([self.buffer.trajectory(k) for k in range(self.buffer.n_experts)])
        self.basis = expert_subspace(snapshots, ctx.config["esp_rank"]).to(ctx.device)
        steps, init = int(ctx.config["dd_steps"]), float(ctx.config["dd_lr_init"])
        self.raw_lrs = nn.Parameter(torch.full((steps,), math.log(math.expm1(init)), device=ctx.device))

    @classmethod
    def prepare_config(cls, config, dataset):
        from .trajectory import _open_buffer

        _open_buffer(config, dataset, method="esp")
        config = dict(config)
        config["experts"] = str(config["experts"])
        check_options(config, ("dd_lr_init", "lr_lrs"), integers=("dd_steps",))
        if config["esp_rank"] is not None:
            check_options(config, integers=("esp_rank",))
        return config

    def parameter_groups(self):
        return [{"params": [self.raw_lrs], "lr": float(self.config["lr_lrs"])}]

    def learned_step_sizes(self) -> Tensor:
        """:math:`\\mathrm{softplus}(r)`, the current per-step learning rates."""
        return F.softplus(self.raw_lrs.detach())

    def loss(self, networks):
        ctx = self.ctx
        k = int(torch.randint(0, self.buffer.n_experts, (1,), generator=ctx.generator))
        start = self.buffer.snapshot(k, 0, device=ctx.device)
        from ..parallel import WholeSetOnEveryRank

        # class-parallel: the unroll trains on the whole S on every rank, the loss is this rank's real rows' share
        whole = WholeSetOnEveryRank.of_context(ctx)
        n_real = int(self.config["batch_real"])
        real, real_labels = ctx.real_batches.sample(n_real)
        end = projected_unrolled_sgd(self.template, self.basis, start, whole.rows(ctx.synthetic.images()),
                                     ctx.synthetic.labels, F.softplus(whole.shared(self.raw_lrs)))
        value = F.cross_entropy(FlatParameters(self.template).forward(self.template, end, real), real_labels)
        return whole.share(value, real.shape[0], n_real)

    def check_after_step(self, iteration):
        if not bool(torch.isfinite(self.raw_lrs.detach()).all()):
            raise FloatingPointError(f"the learned step sizes of 'esp' became non-finite at iteration {iteration}")

    def state_dict(self):
        return {"raw_lrs": self.raw_lrs.detach().cpu().clone()}

    def load_state_dict(self, state):
        if "raw_lrs" in state:
            with torch.no_grad():
                self.raw_lrs.copy_(state["raw_lrs"])
