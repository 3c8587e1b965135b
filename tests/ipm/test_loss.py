"""IPMLoss: the functional value, gradients, submodule registration, optimisation, bad names."""

import pytest
import torch
from torch import nn

from ipmcondense.ipm.kernels import GaussianKernel
from ipmcondense.ipm.loss import LOSS_METRICS, IPMLoss, metric_function
from ipmcondense.ipm.mean_embedding import mean_embedding_distance
from ipmcondense.ipm.mmd import energy_distance, mmd, mmd2
from ipmcondense.ipm.sinkhorn import sinkhorn_divergence
from ipmcondense.ipm.wasserstein import sliced_wasserstein, wasserstein


def _clouds(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 2, generator=g, dtype=torch.float64)
    return x, torch.randn(10, 2, generator=g, dtype=torch.float64) + 1


@pytest.mark.parametrize("metric, function, options", [
    ("mmd", mmd, {"bandwidth": 0.8}),
    ("mmd2", mmd2, {"estimator": "biased", "kernel": "laplacian"}),
    ("energy", energy_distance, {}),
    ("sinkhorn", sinkhorn_divergence, {"blur": 0.1}),
    ("wasserstein", wasserstein, {"p": 2}),
    ("sliced", sliced_wasserstein, {"seed": 3}),
    ("mean_embedding", mean_embedding_distance, {"squared": True}),
])
def test_equals_the_functional_value_and_gradients_flow(metric, function, options):
    x, y = _clouds()
    x = x.clone().requires_grad_(True)
    loss = IPMLoss(metric, **options)
    value = loss(x, y)
    assert value.dim() == 0
    assert value.item() == pytest.approx(function(x, y, **options).item(), rel=1e-9)
    value.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert metric_function(metric) is function
    assert metric in LOSS_METRICS


def test_module_options_are_registered_submodules():
    phi = nn.Linear(2, 3).double()
    loss = IPMLoss("mean_embedding", feature_map=phi)
    assert list(loss.parameters()) == list(phi.parameters())
    x, y = _clouds()
    loss(x, y).backward()
    assert phi.weight.grad is not None
    layered = IPMLoss("mean_embedding", feature_map=[phi, torch.nn.Tanh()])
    assert layered(x, y).item() == pytest.approx(mean_embedding_distance(x, y, [phi, nn.Tanh()]).item())
    kernel_loss = IPMLoss("mmd", kernel=GaussianKernel(1.0))
    assert "kernel" in dict(kernel_loss.named_children())
    assert "metric='mmd'" in repr(kernel_loss)


def test_optimising_a_point_cloud_decreases_the_loss():
    target = torch.randn(64, 2, generator=torch.Generator().manual_seed(1)) * 0.5 + torch.tensor([1.5, -0.5])
    cloud = torch.randn(16, 2, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    loss = IPMLoss("mmd", bandwidth=2.0)
    optimizer = torch.optim.Adam([cloud], lr=0.05)
    start = loss(cloud, target).item()
    for _ in range(150):
        optimizer.zero_grad()
        value = loss(cloud, target)
        value.backward()
        optimizer.step()
    end = loss(cloud, target).item()
    assert end < 0.05 * start
    assert (cloud.detach().mean(0) - target.mean(0)).norm() < 0.1


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="metric"):
        IPMLoss("kl")
    with pytest.raises(TypeError, match="blur"):
        IPMLoss("mmd", blur=0.1)
    with pytest.raises(ValueError, match="x contains NaN"):
        IPMLoss("energy")(torch.full((2, 2), float("nan")), torch.zeros(2, 2))
