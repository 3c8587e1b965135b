"""ESP: projected unrolled SGD inside the span of expert trajectories, the ``esp`` objective and row."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ipmcondense.autodiff import flatten_parameters, functional_forward, unrolled_sgd
from ipmcondense.condensation.api import condense
from ipmcondense.condensation.objectives import (
    expert_subspace,
    project_onto_subspace,
    projected_unrolled_sgd,
    subspace_residual,
)
from ipmcondense.condensation.recipes import NOT_AN_IPM, get_recipe
from ipmcondense.nets import build_isolated
from ipmcondense.nets.mlp import MLP
from ipmcondense.trajectories import ExpertBuffer

from .conftest import EXPERT_ARCH


def _net():
    return build_isolated(lambda: MLP(1, 3, (4, 4), hidden=(8,), activation="swish"), 0)


def _snapshots(net, m=4, seed=0):
    """m parameter vectors near the net's initialisation (a stand-in trajectory)."""
    g = torch.Generator().manual_seed(seed)
    theta = flatten_parameters(net).detach()
    return torch.stack([theta + 0.1 * k * torch.randn(theta.shape, generator=g) for k in range(m)])


def _residual_of_least_squares(snapshots, theta):
    """Relative residual of the least-squares fit of theta by the snapshots (numpy, independent of the SVD basis)."""
    a = snapshots.detach().double().numpy().T
    b = theta.detach().double().numpy()
    coefficients, *_ = np.linalg.lstsq(a, b, rcond=None)
    return np.linalg.norm(a @ coefficients - b) / np.linalg.norm(b)


def test_projection_is_idempotent_and_fixes_the_span():
    net = _net()
    snaps = _snapshots(net)
    q = expert_subspace(snaps)
    assert q.shape == (snaps.shape[1], 4) and torch.allclose(q.T @ q, torch.eye(4), atol=1e-5)
    x = torch.randn(snaps.shape[1], generator=torch.Generator().manual_seed(1))
    once = project_onto_subspace(q, x)
    assert torch.allclose(project_onto_subspace(q, once), once, atol=1e-5)
    assert torch.allclose(project_onto_subspace(q, snaps[2]), snaps[2], atol=1e-4)
    assert float((q.T @ (x - once)).abs().max()) < 1e-4  # the residual is orthogonal to the span
    # the projection is the least-squares fit: the same point as numpy's lstsq on the raw snapshots
    a = snaps.double().numpy().T
    c, *_ = np.linalg.lstsq(a, x.double().numpy(), rcond=None)
    assert np.allclose(once.double().numpy(), a @ c, atol=1e-4)


def _unroll_setup(seed):
    """A network, its expert snapshots and their span, and a small synthetic batch drawn with ``seed``."""
    net = _net()
    snaps = _snapshots(net)
    g = torch.Generator().manual_seed(seed)
    return net, snaps, expert_subspace(snaps), torch.randn(6, 1, 4, 4, generator=g), torch.arange(3).repeat(2)


def test_inner_parameters_stay_in_the_span_and_the_step_is_the_projected_sgd_step():
    net, snaps, q, images, labels = _unroll_setup(2)
    lrs = torch.full((3,), 0.5)
    trajectory = projected_unrolled_sgd(net, q, snaps[0], images, labels, lrs, return_trajectory=True)
    for theta in trajectory:
        assert _residual_of_least_squares(snaps, theta) < 1e-5
    # the plain unroll leaves the span: the projection is what keeps it there
    plain = unrolled_sgd(net, snaps[0], images, labels, lrs, 3)
    assert _residual_of_least_squares(snaps, plain) > 1e-3
    # one step by hand: P (theta - eta grad) with P = Q Q^T as a dense matrix
    theta0 = snaps[0].clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(functional_forward(net, theta0, images), labels), theta0)
    p = q @ q.T
    assert torch.allclose(trajectory[1], p @ (snaps[0] - 0.5 * grad), atol=1e-5)


def test_the_unroll_is_differentiable_in_the_images_and_step_sizes():
    net = _net()
    q = expert_subspace(_snapshots(net))
    images = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(3)).double().requires_grad_(True)
    lrs = torch.full((2,), 0.3, dtype=torch.float64, requires_grad=True)
    net = net.double()
    q, start = q.double(), flatten_parameters(net).detach()
    labels = torch.arange(3).repeat(2)

    def outer(x, eta):
        return projected_unrolled_sgd(net, q, start, x, labels, eta).pow(2).sum()

    assert torch.autograd.gradcheck(outer, (images, lrs), atol=1e-6)

    def residual(x, eta):  # the distance of the unprojected steps from the span reaches the images too
        residuals = []
        projected_unrolled_sgd(net, q, start, x, labels, eta, residuals=residuals)
        return torch.stack(residuals).sum()

    assert torch.autograd.gradcheck(residual, (images, lrs), atol=1e-6)


def test_subspace_residual_is_the_relative_least_squares_residual():
    net = _net()
    snaps = _snapshots(net)
    q = expert_subspace(snaps)
    x = torch.randn(snaps.shape[1], generator=torch.Generator().manual_seed(4))
    assert float(subspace_residual(q, x)) == pytest.approx(_residual_of_least_squares(snaps, x) ** 2, rel=1e-4)
    assert float(subspace_residual(q, 3.0 * snaps[1] - snaps[3])) < 1e-8
    orthogonal = x - project_onto_subspace(q, x)
    assert float(subspace_residual(q, orthogonal)) == pytest.approx(1.0, abs=1e-5)
    assert float(subspace_residual(q, torch.zeros_like(x))) == 0.0


def test_the_residuals_of_the_unroll_are_those_of_the_unprojected_gradients():
    net, snaps, q, images, labels = _unroll_setup(5)
    residuals = []
    trajectory = projected_unrolled_sgd(net, q, snaps[0], images, labels, torch.full((2,), 0.5),
                                        return_trajectory=True, residuals=residuals)
    assert len(residuals) == 2
    for theta, rho in zip(trajectory[:2], residuals):
        theta = theta.detach().requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(functional_forward(net, theta, images), labels), theta)
        assert float(rho.detach()) == pytest.approx(_residual_of_least_squares(snaps, grad) ** 2, rel=1e-4)


def test_esp_loss_adds_the_weighted_mean_residual_of_the_synthetic_steps(small_expert_buffer):
    """The real-data loss alone leaves S free off the span (digits IPC 1: 50.6% < 78.9% for random images)."""
    buffer = ExpertBuffer(small_expert_buffer)
    kw = {"arch": EXPERT_ARCH, "experts": str(small_expert_buffer), "ipc": 1, "seed": 3, "progress": False,
          "batch_real": 4, "dd_steps": 1, "iterations": 1}
    plain = condense("esp", "digits", esp_residual_weight=0.0, **kw)
    weighted = condense("esp", "digits", esp_residual_weight=2.0, **kw)
    added = (weighted.metrics["loss_history"][0] - plain.metrics["loss_history"][0]) / 2.0
    # the one step starts at the drawn expert's initialisation on the initial images: its gradient's residual
    start = condense("esp", "digits", **{**kw, "iterations": 0})
    snaps = torch.cat([buffer.trajectory(k) for k in range(buffer.n_experts)])
    net = buffer.build_network()
    candidates = []
    for k in range(buffer.n_experts):
        theta = buffer.snapshot(k, 0).requires_grad_(True)
        loss = F.cross_entropy(functional_forward(net, theta, start.images), start.labels)
        grad, = torch.autograd.grad(loss, theta)
        candidates.append(_residual_of_least_squares(snaps, grad) ** 2)
    assert 0.5 < added <= 1.0
    assert min(abs(added - c) for c in candidates) < 1e-3


def test_subspace_of_a_buffer_and_rank_option(small_expert_buffer):
    buffer = ExpertBuffer(small_expert_buffer)
    snaps = torch.cat([buffer.trajectory(k) for k in range(buffer.n_experts)])
    assert expert_subspace(snaps).shape == (buffer.num_params, 2 * 3)
    assert expert_subspace(snaps, 2).shape == (buffer.num_params, 2)
    with pytest.raises(ValueError, match=r"esp_rank must be an integer in \[1, 6\]"):
        expert_subspace(snaps, 7)


def test_esp_row_runs_and_resumes_bit_for_bit(small_expert_buffer, tmp_path):
    row = get_recipe("esp")
    assert (row.objective, row.relation_to_ipm, row.sampler) == ("esp", NOT_AN_IPM, "none")
    assert "abstract" in row.source and "Deviation" in row.source
    assert row.defaults["esp_residual_weight"] == 10.0  # the component's default 0 is the projection alone
    kw = {"arch": EXPERT_ARCH, "experts": str(small_expert_buffer), "ipc": 1, "seed": 2, "progress": False,
          "batch_real": 8, "dd_steps": 2, "checkpoint_every": 1}
    straight = condense("esp", "digits", iterations=3, out=tmp_path / "a", **kw)
    partial = condense("esp", "digits", iterations=1, out=tmp_path / "b", **kw)
    assert not torch.equal(partial.images, straight.images)
    resumed = condense("esp", "digits", iterations=3, out=tmp_path / "b", resume=True, **kw)
    assert torch.equal(straight.images, resumed.images)
    assert straight.metrics["loss_history"] == resumed.metrics["loss_history"]


def test_esp_without_a_buffer_or_with_a_bad_rank_names_the_option(small_expert_buffer):
    with pytest.raises(ValueError, match="method 'esp' needs an expert buffer"):
        condense("esp", "digits", ipc=1, iterations=1, progress=False, arch=EXPERT_ARCH)
    with pytest.raises(ValueError, match="esp_rank"):
        condense("esp", "digits", ipc=1, iterations=1, progress=False, arch=EXPERT_ARCH,
                 experts=str(small_expert_buffer), esp_rank=0)
