"""Kernels: Gram matrices against NumPy formulas, the median heuristic, names and errors."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, pdist

from ipmcondense.ipm.kernels import (
    KERNEL_NAMES,
    EnergyKernel,
    GaussianKernel,
    InverseMultiquadricKernel,
    LaplacianKernel,
    LinearKernel,
    MixtureKernel,
    PolynomialKernel,
    get_kernel,
    median_bandwidth,
    squared_distances,
)


def _points(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) + shift


X = _points(17, 3, 1)
Y = _points(11, 3, 2, shift=0.5)
D = cdist(X, Y)
REFERENCE_GRAMS = {
    "gaussian": (GaussianKernel(0.7), np.exp(-(D**2) / (2 * 0.7**2))),
    "laplacian": (LaplacianKernel(0.7), np.exp(-D / 0.7)),
    "imq": (InverseMultiquadricKernel(0.7), (1 + D**2 / 0.7**2) ** -0.5),
    "energy": (EnergyKernel(), -D),
    "linear": (LinearKernel(), X @ Y.T),
    "polynomial": (PolynomialKernel(degree=3, gamma=0.4, coef0=0.5), (0.4 * X @ Y.T + 0.5) ** 3),
}


@pytest.mark.parametrize("name", list(REFERENCE_GRAMS))
def test_gram_matrix_matches_numpy_formula(name):
    kernel, expected = REFERENCE_GRAMS[name]
    gram = kernel(torch.from_numpy(X), torch.from_numpy(Y))
    assert gram.shape == (17, 11) and gram.dtype == torch.float64
    np.testing.assert_allclose(gram.numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(REFERENCE_GRAMS))
def test_paired_evaluation_is_the_gram_diagonal(name):
    kernel, _ = REFERENCE_GRAMS[name]
    x, y = torch.from_numpy(X[:11]), torch.from_numpy(Y)
    torch.testing.assert_close(kernel.paired(x, y), kernel(x, y).diagonal(), rtol=1e-10, atol=1e-10)


def test_polynomial_default_gamma_is_one_over_dimension():
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    expected = (X @ Y.T / 3 + 1) ** 3
    np.testing.assert_allclose(PolynomialKernel()(x, y).numpy(), expected, rtol=1e-12)


def test_mixture_of_gaussians_is_the_weighted_sum():
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    mixture = MixtureKernel.gaussians([0.5, 2.0], weights=[0.25, 1.5])
    expected = 0.25 * np.exp(-(D**2) / 0.5) + 1.5 * np.exp(-(D**2) / 8.0)
    np.testing.assert_allclose(mixture(x, y).numpy(), expected, rtol=1e-10)
    mixed = MixtureKernel([GaussianKernel(1.0), LinearKernel()])
    np.testing.assert_allclose(mixed(x, y).numpy(), np.exp(-(D**2) / 2) + X @ Y.T, rtol=1e-10)


@pytest.mark.parametrize("kernel", [GaussianKernel(1.0), LaplacianKernel(1.0), InverseMultiquadricKernel(1.0)])
def test_characteristic_kernels_have_positive_semidefinite_gram(kernel):
    z = torch.from_numpy(_points(40, 2, 3))
    eigenvalues = torch.linalg.eigvalsh(kernel(z, z))
    assert float(eigenvalues.min()) > -1e-10


def test_energy_kernel_is_conditionally_positive_definite():
    z = torch.from_numpy(_points(40, 2, 3))
    gram = EnergyKernel()(z, z)
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = torch.from_numpy(rng.normal(size=40))
        c = c - c.mean()
        assert float(c @ gram @ c) >= -1e-10


def test_squared_distances_are_exactly_zero_on_the_self_diagonal():
    z = torch.from_numpy(_points(30, 5, 4) * 1e3 + 1e4)
    d2 = squared_distances(z, z)
    assert bool((d2.diagonal() == 0).all())
    np.testing.assert_allclose(d2.numpy(), cdist(z.numpy(), z.numpy()) ** 2, rtol=1e-8, atol=1e-3)


@pytest.mark.parametrize("kernel", [LaplacianKernel(1.0), EnergyKernel()])
def test_square_root_kernels_have_zero_finite_gradient_at_duplicates(kernel):
    base = torch.from_numpy(_points(6, 3, 5))
    x = torch.cat([base, base[:3]]).requires_grad_(True)
    y = torch.cat([base[3:], base[:2]])
    gram = kernel(x, y)
    (grad,) = torch.autograd.grad(gram.sum(), x)
    assert bool(torch.isfinite(grad).all())
    # The reference gradient with the coincident pairs removed (their subgradient is defined as 0).
    x_ref = x.detach().clone().requires_grad_(True)
    dist = torch.cdist(x_ref, y)
    mask = dist.detach() > 0
    values = torch.exp(-dist / 1.0) if isinstance(kernel, LaplacianKernel) else -dist
    (expected,) = torch.autograd.grad((values * mask).sum(), x_ref)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


def test_median_bandwidth_is_the_median_pooled_distance():
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    expected = np.median(pdist(np.concatenate([X, Y])))
    assert median_bandwidth(x, y) == pytest.approx(expected, rel=1e-12)
    assert GaussianKernel("median").resolve_bandwidth(x, y) == pytest.approx(expected, rel=1e-12)


def test_median_bandwidth_subsamples_large_samples_deterministically():
    z = torch.from_numpy(_points(2500, 2, 6))
    index = np.round(np.linspace(0, 2499, 1000)).astype(int)
    expected = np.median(pdist(z.numpy()[index]))
    assert median_bandwidth(z[:1200], z[1200:]) == pytest.approx(expected, rel=1e-12)
    assert median_bandwidth(z[:1200], z[1200:]) == median_bandwidth(z[:1200], z[1200:])


def test_median_bandwidth_degenerate_samples_never_give_zero_or_nan():
    same = torch.ones(5, 3)
    assert median_bandwidth(same, same) == 1.0
    mostly = torch.cat([torch.zeros(8, 1), torch.tensor([[1.0], [3.0]])])
    # 28 of 45 pairs are coincident: the median of the non-zero distances (1 or 3) is used.
    assert median_bandwidth(mostly) == pytest.approx(np.median(pdist(mostly.numpy())[pdist(mostly.numpy()) > 0]))


def test_resolved_bandwidth_is_detached_float():
    x = torch.from_numpy(X).requires_grad_(True)
    kernel = GaussianKernel().resolved(x, torch.from_numpy(Y))
    assert isinstance(kernel.bandwidth, float)
    assert GaussianKernel().bandwidth == "median"  # the original module is not modified


def test_get_kernel_names_and_aliases():
    assert isinstance(get_kernel("gaussian", 2.0), GaussianKernel)
    assert get_kernel("gaussian", 2.0).bandwidth == 2.0
    assert isinstance(get_kernel("imq"), InverseMultiquadricKernel)
    assert isinstance(get_kernel("inverse_multiquadric"), InverseMultiquadricKernel)
    assert isinstance(get_kernel("distance"), EnergyKernel)
    assert isinstance(get_kernel("energy", "median"), EnergyKernel)
    module = LaplacianKernel(3.0)
    assert get_kernel(module) is module
    assert set(KERNEL_NAMES) >= {"gaussian", "laplacian", "imq", "energy", "linear", "polynomial"}


def test_get_kernel_errors_name_the_argument():
    with pytest.raises(ValueError, match="kernel 'cauchy'.*gaussian"):
        get_kernel("cauchy")
    with pytest.raises(ValueError, match="bandwidth"):
        get_kernel("gaussian", -1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        get_kernel("gaussian", "mean")
    with pytest.raises(ValueError, match="no bandwidth"):
        get_kernel("energy", 2.0)
    with pytest.raises(ValueError, match="bandwidth"):
        get_kernel(GaussianKernel(1.0), 2.0)
    with pytest.raises(TypeError, match="kernel"):
        get_kernel(3)
    with pytest.raises(ValueError, match="degree"):
        PolynomialKernel(degree=0)
