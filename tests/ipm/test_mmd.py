"""MMD estimators and energy distance: brute force, closed forms, scipy, gradcheck, axioms, errors."""

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from ipmcondense.ipm import _kernel_sums as ks
from ipmcondense.ipm.kernels import GaussianKernel, median_bandwidth
from ipmcondense.ipm.mmd import energy_distance, mmd, mmd2, mmd_witness
from ipmcondense.ipm.witness import Witness

NAMED_KERNELS = ["gaussian", "laplacian", "imq", "energy", "linear", "polynomial"]


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(ks, "TILE_ROWS", 5)
    monkeypatch.setattr(ks, "TILE_COLS", 7)
    monkeypatch.setattr(ks, "SYMMETRIC_BLOCK", 4)


def _numpy_gram(name, x, y, h):
    d = cdist(x, y)
    return {
        "gaussian": np.exp(-(d**2) / (2 * h**2)),
        "laplacian": np.exp(-d / h),
        "imq": (1 + d**2 / h**2) ** -0.5,
        "energy": -d,
        "linear": x @ y.T,
        "polynomial": (x @ y.T / x.shape[1] + 1) ** 3,
    }[name]


def _numpy_mmd2(name, x, y, estimator, h, a=None, b=None):
    kxx, kyy, kxy = (_numpy_gram(name, p, q, h) for p, q in ((x, x), (y, y), (x, y)))
    n, m = len(x), len(y)
    if estimator == "linear":
        p = min(n, m) // 2
        i, j = np.arange(p) * 2, np.arange(p) * 2 + 1
        return np.mean(kxx[i, j] + kyy[i, j] - kxy[i, j] - kxy[j, i])
    a = np.full(n, 1 / n) if a is None else a
    b = np.full(m, 1 / m) if b is None else b
    if estimator == "biased":
        return a @ kxx @ a + b @ kyy @ b - 2 * a @ kxy @ b
    off_x = (a @ kxx @ a - a**2 @ np.diag(kxx)) / (1 - np.sum(a**2))
    off_y = (b @ kyy @ b - b**2 @ np.diag(kyy)) / (1 - np.sum(b**2))
    return off_x + off_y - 2 * a @ kxy @ b


def _samples(n=13, m=10, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(m, d)) * 1.3 + 0.5


@pytest.mark.parametrize("backend", ["dense", "tiled"])
@pytest.mark.parametrize("estimator", ["biased", "unbiased", "linear"])
@pytest.mark.parametrize("name", NAMED_KERNELS)
def test_mmd2_matches_numpy_brute_force(small_tiles, name, estimator, backend):
    x, y = _samples()
    h = np.median(cdist(np.concatenate([x, y]), np.concatenate([x, y]))[np.triu_indices(23, 1)])
    value = mmd2(torch.from_numpy(x), torch.from_numpy(y), kernel=name, estimator=estimator, backend=backend)
    assert value.dtype == torch.float64 and value.dim() == 0
    np.testing.assert_allclose(value.item(), _numpy_mmd2(name, x, y, estimator, h), rtol=1e-10, atol=1e-12)
    fixed = mmd2(x, y, kernel=name, bandwidth=0.8, estimator=estimator, backend=backend) if name in (
        "gaussian", "laplacian", "imq") else None
    if fixed is not None:
        np.testing.assert_allclose(fixed.item(), _numpy_mmd2(name, x, y, estimator, 0.8), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["dense", "tiled"])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("name", ["gaussian", "energy", "polynomial"])
def test_weighted_mmd2_matches_numpy_brute_force(small_tiles, name, estimator, backend):
    x, y = _samples()
    rng = np.random.default_rng(1)
    a, b = rng.random(13) + 0.1, rng.random(10) + 0.1
    a, b = a / a.sum(), b / b.sum()
    value = mmd2(x, y, kernel=name, bandwidth=1.0 if name == "gaussian" else "median",
                 estimator=estimator, backend=backend, x_weights=a, y_weights=b)
    np.testing.assert_allclose(value.item(), _numpy_mmd2(name, x, y, estimator, 1.0, a, b), rtol=1e-10)


def test_uniform_weights_reproduce_the_unweighted_estimators():
    x, y = _samples()
    for estimator in ("biased", "unbiased"):
        plain = mmd2(x, y, estimator=estimator)
        weighted = mmd2(x, y, estimator=estimator, x_weights=np.full(13, 1 / 13), y_weights=np.full(10, 0.1))
        torch.testing.assert_close(weighted, plain, rtol=1e-12, atol=1e-14)


def _gaussian_mean_kernel(mu1, mu2, s1, s2, h, d):
    """E k(X, Y) for X ~ N(mu1, s1^2 I), Y ~ N(mu2, s2^2 I) and the Gaussian kernel of bandwidth h."""
    v = h**2 + s1**2 + s2**2
    return (h**2 / v) ** (d / 2) * np.exp(-np.sum((mu1 - mu2) ** 2) / (2 * v))


def _closed_form_mmd2(mu1, mu2, s1, s2, h, d):
    return (_gaussian_mean_kernel(mu1, mu1, s1, s1, h, d) + _gaussian_mean_kernel(mu2, mu2, s2, s2, h, d)
            - 2 * _gaussian_mean_kernel(mu1, mu2, s1, s2, h, d))


def test_gaussian_mmd2_between_gaussians_matches_closed_form():
    d, h, s1, s2 = 2, 1.0, 1.0, 0.7
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    truth = _closed_form_mmd2(mu1, mu2, s1, s2, h, d)  # ~0.071
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4000, d, generator=g, dtype=torch.float64) * s1 + torch.from_numpy(mu1)
    y = torch.randn(4000, d, generator=g, dtype=torch.float64) * s2 + torch.from_numpy(mu2)
    value = mmd2(x, y, bandwidth=h)  # 4000^2 entries: the tiled backend
    # The U-statistic's standard deviation at n = m = 4000 is ~2e-3 here: 5e-3 is ~2.5 sd.
    assert value.item() == pytest.approx(truth, abs=5e-3)
    assert abs(mmd2(x, y, bandwidth=h, estimator="biased").item() - truth) < 5e-3


def test_u_statistic_is_unbiased_and_v_statistic_is_not():
    d, h, n = 2, 1.0, 8
    mu1, mu2 = np.zeros(d), np.full(d, 0.3)
    truth = _closed_form_mmd2(mu1, mu2, 1.0, 1.0, h, d)
    g = torch.Generator().manual_seed(4)
    draws = 3000
    x = torch.randn(draws, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(draws, n, d, generator=g, dtype=torch.float64) + 0.3
    unbiased = np.array([mmd2(x[i], y[i], bandwidth=h).item() for i in range(draws)])
    biased = np.array([mmd2(x[i], y[i], bandwidth=h, estimator="biased").item() for i in range(draws)])
    linear = np.array([mmd2(x[i], y[i], bandwidth=h, estimator="linear").item() for i in range(draws)])
    se = unbiased.std(ddof=1) / np.sqrt(draws)
    assert abs(unbiased.mean() - truth) < 4 * se
    assert abs(linear.mean() - truth) < 4 * linear.std(ddof=1) / np.sqrt(draws)
    # E[V] = MMD^2 + (1 - E k(X, X'))/n + (1 - E k(Y, Y'))/n for a kernel with k(x, x) = 1.
    bias = 2 * (1 - _gaussian_mean_kernel(mu1, mu1, 1.0, 1.0, h, d)) / n
    assert abs(biased.mean() - (truth + bias)) < 4 * biased.std(ddof=1) / np.sqrt(draws)
    assert biased.mean() - truth > 10 * se


@pytest.mark.parametrize("backend", ["dense", "tiled"])
def test_energy_distance_matches_scipy_in_one_dimension(small_tiles, backend):
    rng = np.random.default_rng(5)
    u, v = rng.normal(size=23), rng.normal(size=17) * 2 + 0.3
    expected = scipy.stats.energy_distance(u, v)
    assert energy_distance(u, v, backend=backend).item() == pytest.approx(expected, rel=1e-10)
    wu, wv = rng.random(23) + 0.05, rng.random(17) + 0.05
    expected_w = scipy.stats.energy_distance(u, v, wu, wv)
    got = energy_distance(u, v, x_weights=wu / wu.sum(), y_weights=wv / wv.sum(), backend=backend)
    assert got.item() == pytest.approx(expected_w, rel=1e-10)
    ties = np.round(u, 1)  # duplicated values
    assert energy_distance(ties, v, backend=backend).item() == pytest.approx(
        scipy.stats.energy_distance(ties, v), rel=1e-10)


def test_energy_distance_is_the_mmd_with_the_energy_kernel():
    x, y = _samples()
    torch.testing.assert_close(energy_distance(x, y), mmd(x, y, kernel="energy"), rtol=1e-12, atol=0)


def test_mmd_is_the_root_of_the_biased_mmd2():
    x, y = _samples()
    torch.testing.assert_close(mmd(x, y) ** 2, mmd2(x, y, estimator="biased"), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", ["dense", "tiled"])
def test_gradcheck_public_distances(small_tiles, backend):
    x, y = (torch.from_numpy(s).requires_grad_(True) for s in _samples(7, 6, 2))
    for estimator in ("biased", "unbiased", "linear"):
        # A fixed bandwidth: the median heuristic depends on the points but is detached on purpose.
        assert torch.autograd.gradcheck(
            lambda p, q: mmd2(p, q, bandwidth=1.2, estimator=estimator, backend=backend), [x, y])
    assert torch.autograd.gradcheck(lambda p, q: mmd(p, q, kernel="laplacian", bandwidth=0.8, backend=backend), [x, y])
    assert torch.autograd.gradcheck(lambda p, q: energy_distance(p, q, backend=backend), [x, y])
    a = torch.full((7,), 1 / 7, dtype=torch.float64, requires_grad=True)
    b = torch.full((6,), 1 / 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p, q, wa, wb: mmd2(p, q, bandwidth=1.2, estimator="unbiased", backend=backend, x_weights=wa, y_weights=wb),
        [x, y, a, b], atol=1e-6)


def test_distances_of_identical_sets_have_zero_value_and_finite_gradient():
    x = torch.from_numpy(_samples()[0]).requires_grad_(True)
    for fn in (lambda p: mmd(p, p.detach()), lambda p: energy_distance(p, p.detach())):
        value = fn(x)
        assert value.item() == 0.0
        (grad,) = torch.autograd.grad(value, x)
        assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) == 0.0


@pytest.mark.parametrize("backend", ["dense", "tiled"])
def test_float32_small_mmd2_matches_float64(small_tiles, backend):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 3, generator=g).float()
    y = (x + 1e-3 * torch.randn(300, 3, generator=g) + 1e-3).float()
    reference = mmd2(x.double(), y.double(), bandwidth=1.0, estimator="biased", backend=backend).item()
    assert 1e-8 < reference < 1e-6
    value = mmd2(x, y, bandwidth=1.0, estimator="biased", backend=backend)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference, rel=0.03)


def test_witness_mean_gap_is_the_biased_mmd2_and_matches_numpy():
    x, y = _samples()
    witness = mmd_witness(x, y, bandwidth=0.9)
    assert isinstance(witness, Witness) and witness.metric == "mmd"
    torch.testing.assert_close(witness.mean_gap(x, y), mmd2(x, y, bandwidth=0.9, estimator="biased"),
                               rtol=1e-10, atol=1e-12)
    z = np.random.default_rng(7).normal(size=(5, 3))
    expected = _numpy_gram("gaussian", z, x, 0.9).mean(1) - _numpy_gram("gaussian", z, y, 0.9).mean(1)
    np.testing.assert_allclose(witness(z).numpy(), expected, rtol=1e-10)
    tiled = mmd_witness(x, y, bandwidth=0.9, backend="tiled")
    np.testing.assert_allclose(tiled(z).numpy(), expected, rtol=1e-10)
    zt = torch.from_numpy(z).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: witness(q), [zt])


def test_median_bandwidth_is_resolved_on_the_pooled_sample():
    x, y = _samples()
    h = median_bandwidth(torch.from_numpy(x), torch.from_numpy(y))
    torch.testing.assert_close(mmd2(x, y), mmd2(x, y, bandwidth=h), rtol=1e-12, atol=0)
    torch.testing.assert_close(mmd2(x, y, kernel=GaussianKernel()), mmd2(x, y, bandwidth=h), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_errors_naming_the_argument():
    x, y = _samples()
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        mmd2(bad, y)
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        energy_distance(x, bad)
    with pytest.raises(ValueError, match="x is empty"):
        mmd(np.zeros((0, 3)), y)
    with pytest.raises(ValueError, match="x and y must have the same point dimension"):
        mmd2(x, y[:, :2])
    with pytest.raises(ValueError, match="x_weights must be non-negative"):
        mmd2(x, y, estimator="biased", x_weights=np.r_[-0.1, np.full(12, 1.1 / 12)])
    with pytest.raises(ValueError, match="y_weights must sum to 1"):
        energy_distance(x, y, y_weights=np.ones(10))
    with pytest.raises(ValueError, match="y_weights must have one weight per point"):
        mmd(x, y, y_weights=np.full(4, 0.25))
    with pytest.raises(ValueError, match="kernel 'rbf'"):
        mmd2(x, y, kernel="rbf")
    with pytest.raises(ValueError, match="backend 'cuda'"):
        mmd(x, y, backend="cuda")
    with pytest.raises(ValueError, match="estimator 'quadratic'"):
        mmd2(x, y, estimator="quadratic")
    with pytest.raises(ValueError, match="bandwidth"):
        mmd2(x, y, bandwidth=0.0)
    with pytest.raises(ValueError, match="x must have at least 2 points for the unbiased"):
        mmd2(x[:1], y)
    with pytest.raises(ValueError, match="y must have at least 2 points for the linear"):
        mmd2(x, y[:1], estimator="linear")
    with pytest.raises(ValueError, match="weights are not supported by the linear"):
        mmd2(x, y, estimator="linear", x_weights=np.full(13, 1 / 13))
    with pytest.raises(ValueError, match="x_weights put all mass on one point"):
        mmd2(x, y, x_weights=np.r_[1.0, np.zeros(12)])
    with pytest.raises(ValueError, match="z must have points of dimension 3"):
        mmd_witness(x, y)(np.zeros((2, 4)))


def test_single_points_work_for_the_biased_estimator_and_metrics():
    x, y = _samples()
    assert mmd2(x[:1], y[:1], estimator="biased").item() >= 0
    assert energy_distance(x[:1], y[:1]).item() == pytest.approx(np.sqrt(2 * np.linalg.norm(x[0] - y[0])))


# ---------------------------------------------------------------------------------- property tests

_cloud = st.integers(min_value=0, max_value=2**31 - 1).map(
    lambda seed: np.random.default_rng(seed).normal(size=(np.random.default_rng(seed).integers(2, 8), 2))
    * np.random.default_rng(seed + 1).uniform(0.2, 3.0)
)
_PROPERTY = settings(max_examples=30, deadline=None)


def _metric(name):
    if name == "energy":
        return lambda p, q: energy_distance(p, q).item()
    return lambda p, q: mmd(p, q, kernel=name, bandwidth=1.0).item()


@_PROPERTY
@given(x=_cloud, y=_cloud, z=_cloud, name=st.sampled_from(["gaussian", "laplacian", "energy"]))
def test_metric_axioms(x, y, z, name):
    d = _metric(name)
    dxy, dyx, dxz, dzy = d(x, y), d(y, x), d(x, z), d(z, y)
    assert dxy >= 0
    assert dxy == pytest.approx(dyx, rel=1e-9, abs=1e-12)
    assert d(x, x) == 0.0
    assert dxy <= dxz + dzy + 1e-9
    assert mmd2(x, y, bandwidth=1.0, estimator="biased").item() >= -1e-12


@_PROPERTY
@given(x=_cloud, y=_cloud, seed=st.integers(0, 1000),
       estimator=st.sampled_from(["biased", "unbiased"]))
def test_invariances(x, y, seed, estimator):
    rng = np.random.default_rng(seed)
    base = mmd2(x, y, estimator=estimator).item()  # median bandwidth: also invariant
    assert mmd2(y, x, estimator=estimator).item() == pytest.approx(base, rel=1e-9, abs=1e-12)
    perm_x, perm_y = rng.permutation(len(x)), rng.permutation(len(y))
    assert mmd2(x[perm_x], y[perm_y], estimator=estimator).item() == pytest.approx(base, rel=1e-9, abs=1e-12)
    shift = rng.normal(size=2) * 5
    for name in ("gaussian", "laplacian", "energy"):
        ref = mmd2(x, y, kernel=name, estimator=estimator).item()
        moved = mmd2(x + shift, y + shift, kernel=name, estimator=estimator).item()
        assert moved == pytest.approx(ref, rel=1e-8, abs=1e-10)
    rotation, _ = np.linalg.qr(rng.normal(size=(2, 2)))
    rotated = mmd2(x @ rotation, y @ rotation, estimator=estimator).item()
    assert rotated == pytest.approx(base, rel=1e-8, abs=1e-10)
    ed = energy_distance(x, y).item()  # a square root: rounding noise of ~1e-16 becomes ~1e-8
    assert energy_distance(x @ rotation + shift, y @ rotation + shift).item() == pytest.approx(ed, rel=1e-6, abs=1e-7)
