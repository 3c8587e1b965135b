"""Neural kernels: infinite-width FC NNGP/NTK vs wide random networks, empirical NTK vs J J^T,
random-feature NNGP, use inside the MMD, and input errors."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ipmcondense.ipm.mmd import mmd2
from ipmcondense.ipm.neural_kernels import (
    EmpiricalNTK,
    FullyConnectedNNGP,
    FullyConnectedNTK,
    RandomFeatureNNGP,
    empirical_ntk,
    gaussian_init_,
)
from ipmcondense.nets import get_network

W_STD, B_STD = math.sqrt(2.0), 0.1


class NTKDense(nn.Module):
    """Dense layer in the NTK parameterisation: w/sqrt(fan_in) * W x + b * beta, W, beta ~ N(0, 1)."""

    def __init__(self, fan_in: int, fan_out: int, generator: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in, generator=generator, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(fan_out, generator=generator, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) * (W_STD / math.sqrt(self.weight.shape[1])) + B_STD * self.bias


def ntk_mlp(d: int, width: int, depth: int, generator: torch.Generator, outputs: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    fan_in = d
    for _ in range(depth):
        layers += [NTKDense(fan_in, width, generator), nn.ReLU()]
        fan_in = width
    layers.append(NTKDense(fan_in, outputs, generator))
    return nn.Sequential(*layers)


def _inputs(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# Infinite-width kernels against wide random networks (Monte Carlo)
# ------------------------------------------------------------------------------------------------

MC_WIDTH, MC_DRAWS, MC_DEPTH = 2048, 4, 2
#: Relative Frobenius tolerance; the observed error at this width and number of draws is about 4%.
MC_TOLERANCE = 0.08


@pytest.fixture(scope="module")
def wide_networks():
    generator = torch.Generator().manual_seed(0)
    x = _inputs(5, 5, seed=1)
    nets = [ntk_mlp(5, MC_WIDTH, MC_DEPTH, generator) for _ in range(MC_DRAWS)]
    return x, nets


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


def test_fc_nngp_matches_wide_network_output_covariance(wide_networks):
    # Output covariance over the random readout layer, given the hidden layers:
    # E[f(x) f(x')] = w^2 <relu(h(x)), relu(h(x'))> / width + b^2, averaged over network draws.
    x, nets = wide_networks
    estimates = []
    with torch.no_grad():
        for net in nets:
            hidden = net[:-1](x)
            estimates.append(W_STD**2 * hidden @ hidden.T / MC_WIDTH + B_STD**2)
    estimate = torch.stack(estimates).mean(0)
    reference = FullyConnectedNNGP(MC_DEPTH)(x, x)
    assert _relative_error(estimate, reference) < MC_TOLERANCE
    # The NTK is a different kernel: the test distinguishes them.
    assert _relative_error(estimate, FullyConnectedNTK(MC_DEPTH)(x, x)) > 0.3


def test_fc_ntk_matches_empirical_ntk_of_wide_networks(wide_networks):
    x, nets = wide_networks
    estimate = torch.stack([empirical_ntk(net, x) for net in nets]).mean(0)
    reference = FullyConnectedNTK(MC_DEPTH)(x, x)
    assert _relative_error(estimate, reference) < MC_TOLERANCE
    assert _relative_error(estimate, FullyConnectedNNGP(MC_DEPTH)(x, x)) > 0.3
    # A kernel of the wrong depth is far off too.
    assert _relative_error(estimate, FullyConnectedNTK(MC_DEPTH + 2)(x, x)) > 0.3


def _numpy_fc_kernels(x, y, depth, w, b):
    """Independent NumPy transcription of the neural-tangents Dense/Relu kernel rules."""
    d = x.shape[1]
    nngp = w**2 * x @ y.T / d + b**2
    qx = w**2 * (x * x).sum(1) / d + b**2
    qy = w**2 * (y * y).sum(1) / d + b**2
    ntk = nngp.copy()
    for _ in range(depth):
        prod = np.sqrt(np.outer(qx, qy))
        theta = np.arccos(np.clip(nngp / prod, -1, 1))
        relu_nngp = prod / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * np.cos(theta))
        relu_dot = (np.pi - theta) / (2 * np.pi)
        nngp = w**2 * relu_nngp + b**2
        ntk = nngp + w**2 * relu_dot * ntk
        qx, qy = w**2 * qx / 2 + b**2, w**2 * qy / 2 + b**2
    return nngp, ntk


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("w,b", [(W_STD, B_STD), (1.3, 0.0)])
def test_fc_kernels_match_numpy_recursion(depth, w, b):
    x, y = _inputs(7, 4, 2), _inputs(5, 4, 3)
    nngp, ntk = _numpy_fc_kernels(x.numpy(), y.numpy(), depth, w, b)
    np.testing.assert_allclose(FullyConnectedNNGP(depth, w, b)(x, y).numpy(), nngp, rtol=1e-12)
    np.testing.assert_allclose(FullyConnectedNTK(depth, w, b)(x, y).numpy(), ntk, rtol=1e-12)


@pytest.mark.parametrize("kernel_class", [FullyConnectedNNGP, FullyConnectedNTK])
def test_fc_kernels_symmetric_psd_and_finite_gradients_at_coincident_points(kernel_class):
    kernel = kernel_class(depth=3)
    x = _inputs(8, 4, 4).requires_grad_(True)
    gram = kernel(x, x)
    assert torch.allclose(gram, gram.T, atol=1e-12)
    assert float(torch.linalg.eigvalsh(gram.detach()).min()) > 0
    # Coincident points passed as two different tensors (correlation exactly 1 off the "same" path).
    (grad,) = torch.autograd.grad(kernel(x, x.detach().clone()).sum(), x)
    assert bool(torch.isfinite(grad).all())
    (grad_same,) = torch.autograd.grad(kernel(x, x).sum(), x)
    assert bool(torch.isfinite(grad_same).all())
    # Coincident points give the same values and gradients whether or not they are the same tensor.
    np.testing.assert_allclose(kernel(x, x.detach().clone()).detach(), gram.detach(), rtol=1e-13)
    np.testing.assert_allclose(grad, grad_same / 2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel_class", [FullyConnectedNNGP, FullyConnectedNTK])
def test_fc_kernels_gradcheck(kernel_class):
    kernel = kernel_class(depth=2)
    x = _inputs(3, 3, 5).requires_grad_(True)
    y = _inputs(4, 3, 6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kernel(a, b), (x, y))
    # Self-Gram: the diagonal (correlation 1) is differentiated through the variances only.
    assert torch.autograd.gradcheck(lambda a: kernel(a, a), (x,))


# ------------------------------------------------------------------------------------------------
# Empirical NTK against an explicit Jacobian
# ------------------------------------------------------------------------------------------------


def _explicit_jacobian(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows J[(i, c), :] = d f_c(x_i) / d theta, built by one backward pass per (input, output)."""
    params = list(network.parameters())
    rows = []
    for i in range(x.shape[0]):
        out = network(x[i : i + 1]).reshape(-1)
        for c in range(out.shape[0]):
            grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(grads, params)]))
    return torch.stack(rows).reshape(x.shape[0], -1, sum(p.numel() for p in params))


def _tiny_mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _tiny_convnet():
    torch.manual_seed(4)
    return get_network("convnet-w32", channels=1, num_classes=3, image_size=(8, 8), depth=2).double()


@pytest.mark.parametrize("make,shape", [(_tiny_mlp, (4,)), (_tiny_convnet, (1, 8, 8))])
def test_empirical_ntk_matches_explicit_jacobian(make, shape):
    network = make()
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y = torch.randn(3, *shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    jx, jy = _explicit_jacobian(network, x), _explicit_jacobian(network, y)
    full = torch.einsum("akp,blp->abkl", jx, jy)
    np.testing.assert_allclose(empirical_ntk(network, x, y, output_reduction="full").detach(), full,
                               rtol=1e-10, atol=1e-10)
    traced = torch.einsum("akp,bkp->ab", jx, jy)
    np.testing.assert_allclose(empirical_ntk(network, x, y).detach(), traced, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(empirical_ntk(network, x, y, output_reduction="mean").detach(), traced / 3,
                               rtol=1e-10, atol=1e-10)
    gram = empirical_ntk(network, x).detach()
    np.testing.assert_allclose(gram, torch.einsum("akp,bkp->ab", jx, jx), rtol=1e-10, atol=1e-10)
    assert torch.allclose(gram, gram.T, rtol=0, atol=1e-12)
    assert float(torch.linalg.eigvalsh(gram).min()) > -1e-10


def test_empirical_ntk_chunked_and_differentiable_in_inputs():
    network = _tiny_mlp()
    x = _inputs(5, 4, 9).requires_grad_(True)
    y = _inputs(3, 4, 10)
    np.testing.assert_allclose(empirical_ntk(network, x, y, chunk_size=2).detach(),
                               empirical_ntk(network, x, y).detach(), rtol=1e-12)
    assert torch.autograd.gradcheck(lambda a: empirical_ntk(network, a, y), (x[:2].detach().requires_grad_(),))
    # Parameters are constants: no gradient reaches them.
    empirical_ntk(network, x, y).sum().backward()
    assert all(p.grad is None for p in network.parameters())
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_empirical_ntk_kernel_reshapes_flat_points():
    network = _tiny_convnet()
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    kernel = EmpiricalNTK(network, input_shape=(1, 8, 8))
    np.testing.assert_allclose(kernel(images.reshape(4, -1), images.reshape(4, -1)).detach(),
                               empirical_ntk(network, images).detach(), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Random-feature NNGP
# ------------------------------------------------------------------------------------------------


class _LinearEmbedding(nn.Module):
    """embed(x) = W x with W ~ N(0, 1): E[<Wx, Wy>] / width = <x, y>."""

    def __init__(self, d: int, width: int, generator: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, d, generator=generator, dtype=torch.float64))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


def test_random_feature_nngp_is_scaled_concatenated_features_and_estimates_expectation():
    kernel = RandomFeatureNNGP(lambda g: _LinearEmbedding(3, 500, g), n_models=4, seed=1, scale=2.0,
                               offset=0.01)
    x, y = _inputs(6, 3, 12), _inputs(5, 3, 13)
    phi = [m.embed(x) / math.sqrt(4 * 500) for m in kernel.models]
    psi = [m.embed(y) / math.sqrt(4 * 500) for m in kernel.models]
    direct = 2.0 * torch.cat(phi, 1) @ torch.cat(psi, 1).T + 0.01
    gram = kernel(x, y)
    np.testing.assert_allclose(gram.detach(), direct.detach(), rtol=1e-12)
    # Monte-Carlo estimate of 2 <x, y> + 0.01 from 2000 random features: error O(1/sqrt(2000)).
    expected = 2.0 * x @ y.T + 0.01
    scale = 2.0 * x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :]
    assert float(((gram - expected).abs() / scale).max()) < 0.12


def test_random_feature_nngp_resample_and_seeds():
    factory = lambda g: _LinearEmbedding(3, 16, g)  # noqa: E731
    x = _inputs(4, 3, 14)
    first = RandomFeatureNNGP(factory, n_models=2, seed=5)
    again = RandomFeatureNNGP(factory, n_models=2, seed=5)
    gram = first(x, x)
    assert torch.equal(gram, again(x, x))
    first.resample()
    assert not torch.allclose(first(x, x), gram)
    first.resample(torch.Generator().manual_seed(21))
    again.resample(torch.Generator().manual_seed(21))
    assert torch.equal(first(x, x), again(x, x))


def test_random_feature_nngp_with_convnets_is_differentiable_in_inputs_only():
    def factory(generator):
        net = get_network("convnet-nn", channels=1, num_classes=3, image_size=(8, 8), width=16, depth=2)
        return gaussian_init_(net, generator)

    kernel = RandomFeatureNNGP(factory, n_models=2, seed=0, input_shape=(1, 8, 8))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(15), requires_grad=True)
    gram = kernel(x, x)
    assert gram.shape == (3, 3)
    assert float(torch.linalg.eigvalsh(gram.detach().double()).min()) > -1e-5
    gram.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in kernel.parameters())


def test_gaussian_init_statistics():
    layer = nn.Conv2d(8, 64, 3)
    gaussian_init_(layer, torch.Generator().manual_seed(0), weight_std=math.sqrt(2.0), bias_std=0.1)
    fan_in = 8 * 9
    assert abs(float(layer.weight.detach().std()) / math.sqrt(2.0 / fan_in) - 1) < 0.05
    assert abs(float(layer.weight.detach().mean())) < 0.01
    assert 0.05 < float(layer.bias.detach().std()) < 0.15


# ------------------------------------------------------------------------------------------------
# Inside the MMD
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel",
    [
        FullyConnectedNTK(depth=3),
        FullyConnectedNNGP(depth=2),
        EmpiricalNTK(_tiny_mlp()),
        RandomFeatureNNGP(lambda g: _LinearEmbedding(4, 8, g), n_models=3, seed=2),
    ],
    ids=["fc_ntk", "fc_nngp", "empirical_ntk", "random_feature"],
)
def test_neural_kernels_inside_mmd(kernel):
    x = _inputs(6, 4, 16).requires_grad_(True)
    y = _inputs(5, 4, 17) + 0.5
    kxx, kyy, kxy = (kernel(a, b).detach() for a, b in ((x, x), (y, y), (x, y)))
    biased = kxx.mean() + kyy.mean() - 2 * kxy.mean()
    unbiased = ((kxx.sum() - kxx.trace()) / 30 + (kyy.sum() - kyy.trace()) / 20 - 2 * kxy.mean())
    value = mmd2(x, y, kernel=kernel, estimator="biased", backend="dense")
    np.testing.assert_allclose(float(value.detach()), float(biased), rtol=1e-8)
    np.testing.assert_allclose(float(mmd2(x, y, kernel=kernel, backend="tiled").detach()), float(unbiased), rtol=1e-8)
    (grad,) = torch.autograd.grad(value, x)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    # The tiled backend recomputes tiles under activation checkpointing: same value and gradient.
    tiled = mmd2(x, y, kernel=kernel, estimator="biased", backend="tiled")
    (tiled_grad,) = torch.autograd.grad(tiled, x)
    np.testing.assert_allclose(float(tiled.detach()), float(value.detach()), rtol=1e-10)
    np.testing.assert_allclose(tiled_grad, grad, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None for p in kernel.parameters())
    same = mmd2(x, x.detach().clone(), kernel=kernel, estimator="biased")
    assert float(same.detach()) == pytest.approx(0, abs=1e-10)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0, -1, 1.5, True])
def test_fc_kernels_reject_bad_depth(depth):
    for kernel_class in (FullyConnectedNNGP, FullyConnectedNTK):
        with pytest.raises(ValueError, match="depth"):
            kernel_class(depth=depth)


def test_fc_kernels_reject_bad_hyperparameters_and_points():
    with pytest.raises(ValueError, match="weight_std"):
        FullyConnectedNTK(2, weight_std=0.0)
    with pytest.raises(ValueError, match="bias_std"):
        FullyConnectedNTK(2, bias_std=-0.1)
    with pytest.raises(ValueError, match="bias_std"):
        FullyConnectedNNGP(2, bias_std=float("nan"))
    kernel = FullyConnectedNTK(2)
    with pytest.raises(ValueError, match="same point dimension"):
        kernel(_inputs(3, 4, 0), _inputs(3, 5, 1))
    bad = _inputs(3, 4, 0)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        kernel(bad, _inputs(2, 4, 1))


def test_empirical_ntk_rejects_inputs_the_network_cannot_take():
    network = _tiny_convnet()
    kernel = EmpiricalNTK(network, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"x of shape \(3, 50\).*input_shape"):
        kernel(_inputs(3, 50, 0), _inputs(3, 50, 0))
    with pytest.raises(ValueError, match=r"y of shape \(2, 63\)"):
        kernel(_inputs(3, 64, 0), _inputs(2, 63, 0))
    with pytest.raises(ValueError, match=r"^x of shape \(3, 64\) cannot be passed through the network"):
        empirical_ntk(network, _inputs(3, 64, 0))
    with pytest.raises(ValueError, match="output_reduction"):
        empirical_ntk(network, torch.zeros(2, 1, 8, 8, dtype=torch.float64), output_reduction="trace")
    with pytest.raises(ValueError, match="input_shape"):
        EmpiricalNTK(network, input_shape=(1, 0, 8))
    with pytest.raises(TypeError, match="network"):
        empirical_ntk(lambda v: v, _inputs(2, 3, 0))
    nan_images = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    nan_images[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        empirical_ntk(network, nan_images)


def test_random_feature_nngp_rejects_bad_factories_and_inputs():
    with pytest.raises(TypeError, match="embed"):
        RandomFeatureNNGP(lambda g: nn.Linear(3, 3), n_models=1)
    with pytest.raises(ValueError, match="n_models"):
        RandomFeatureNNGP(lambda g: _LinearEmbedding(3, 4, g), n_models=0)
    kernel = RandomFeatureNNGP(lambda g: _LinearEmbedding(3, 4, g), n_models=1)
    with pytest.raises(ValueError, match=r"x of shape \(2, 5\) cannot be passed through the network"):
        kernel(_inputs(2, 5, 0), _inputs(2, 5, 0))
