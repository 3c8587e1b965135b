"""Permutation two-sample tests: statistics, p-value formula, calibration, power, determinism."""

import itertools

import numpy as np

import pytest
import torch
from torch import nn

from ipmcondense.ipm.kernels import GaussianKernel
from ipmcondense.ipm.mean_embedding import mean_embedding_distance
from ipmcondense.ipm.mmd import energy_distance, mmd2
from ipmcondense.ipm.sinkhorn import sinkhorn_divergence
from ipmcondense.ipm.two_sample import TwoSampleTestResult, two_sample_test


def _samples(n=12, m=10, d=2, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) + shift
    return x, y


def test_observed_statistics_equal_the_functional_distances():
    x, y = _samples(shift=0.5)
    assert two_sample_test(x, y, "mmd", 10, seed=0).statistic == pytest.approx(mmd2(x, y).item(), rel=1e-9)
    biased = two_sample_test(x, y, "mmd", 10, seed=0, estimator="biased", bandwidth=0.7)
    assert biased.statistic == pytest.approx(mmd2(x, y, bandwidth=0.7, estimator="biased").item(), rel=1e-9)
    laplace = two_sample_test(x, y, "mmd", 10, seed=0, kernel="laplacian")
    assert laplace.statistic == pytest.approx(mmd2(x, y, kernel="laplacian").item(), rel=1e-9)
    module = two_sample_test(x, y, "mmd", 10, seed=0, kernel=GaussianKernel(1.3))
    assert module.statistic == pytest.approx(mmd2(x, y, kernel=GaussianKernel(1.3)).item(), rel=1e-9)
    energy = two_sample_test(x, y, "energy", 10, seed=0)
    assert energy.statistic == pytest.approx(energy_distance(x, y).item(), rel=1e-9)
    phi = nn.Linear(2, 3).double()
    embedded = two_sample_test(x, y, "mean_embedding", 10, seed=0, feature_map=phi)
    assert embedded.statistic == pytest.approx(mean_embedding_distance(x, y, phi).item(), rel=1e-9)


@pytest.mark.parametrize("statistic, options", [
    ("mmd", {}), ("mmd", {"estimator": "biased"}), ("energy", {}), ("mean_embedding", {}),
])
def test_null_samples_are_statistics_of_splits_and_p_value_formula(statistic, options):
    # Tiny case: 3 + 3 points have only 20 splits; brute-force all of them with the functional
    # distances and check that every null sample is one of them and the p-value follows the formula.
    x, y = _samples(n=3, m=3, shift=1.0, seed=1)
    pooled = torch.cat([x, y])
    reference = {
        "mmd": lambda a, b: mmd2(a, b, bandwidth=_pooled_median(pooled), **options),
        "energy": energy_distance,
        "mean_embedding": mean_embedding_distance,
    }[statistic]
    split_values = torch.tensor([
        reference(pooled[list(c)], pooled[[i for i in range(6) if i not in c]]).item()
        for c in itertools.combinations(range(6), 3)
    ], dtype=torch.float64)
    result = two_sample_test(x, y, statistic, n_permutations=400, seed=3, **options)
    assert result.statistic == pytest.approx(split_values[0].item(), rel=1e-9)
    distance_to_splits = (result.null_samples[:, None] - split_values[None, :]).abs().min(1).values
    assert distance_to_splits.max() < 1e-9
    exceed = (result.null_samples >= result.statistic - 1e-9).sum().item()
    assert result.p_value == pytest.approx((1 + exceed) / 401)
    # the permutation distribution approaches the exact one (uniform over the 20 splits)
    exact = (split_values >= split_values[0] - 1e-9).double().mean().item()
    assert abs(exceed / 400 - exact) < 4 * (exact * (1 - exact) / 400) ** 0.5 + 1e-12


def _pooled_median(pooled):
    """Median heuristic computed independently (NumPy/SciPy) on the pooled sample."""
    from scipy.spatial.distance import pdist

    return float(np.median(pdist(pooled.numpy())))


def test_calibrated_under_the_null():
    # 200 independent null draws at alpha = 0.05: rejections ~ Binomial(200, <= 0.05).
    rejections = 0
    for draw in range(200):
        x, y = _samples(n=30, m=30, seed=100 + draw)
        rejections += two_sample_test(x, y, "mmd", n_permutations=100, seed=draw).reject(0.05)
    assert 0.02 <= rejections / 200 <= 0.09


def test_power_under_a_shifted_alternative():
    rejections = 0
    for draw in range(30):
        x, y = _samples(n=30, m=30, shift=1.0, seed=1000 + draw)
        rejections += two_sample_test(x, y, "mmd", n_permutations=100, seed=draw).reject(0.05)
    assert rejections / 30 > 0.8
    x, y = _samples(n=30, m=30, shift=1.0, seed=5)
    assert two_sample_test(x, y, "energy", n_permutations=100, seed=0).p_value <= 0.05
    assert two_sample_test(x, y, "mean_embedding", n_permutations=100, seed=0).p_value <= 0.05


def test_smallest_p_value_and_seed_determinism():
    x, y = _samples(n=20, m=20, shift=5.0)
    result = two_sample_test(x, y, n_permutations=50, seed=11)
    assert isinstance(result, TwoSampleTestResult)
    assert result.p_value == pytest.approx(1 / 51)
    assert result.n_permutations == 50 and result.null_samples.shape == (50,)
    again = two_sample_test(x, y, n_permutations=50, seed=11)
    assert torch.equal(result.null_samples, again.null_samples)
    other = two_sample_test(x, y, n_permutations=50, seed=12)
    assert not torch.equal(result.null_samples, other.null_samples)


def test_more_permutations_than_a_chunk_and_float32_input():
    x, y = _samples(n=8, m=9, shift=0.3)
    result = two_sample_test(x.float(), y.float(), "energy", n_permutations=700, seed=0)
    assert result.null_samples.shape == (700,)
    assert result.null_samples.dtype == torch.float64
    assert torch.isfinite(result.null_samples).all()


def test_sinkhorn_statistic():
    x, y = _samples(n=10, m=10, shift=3.0)
    result = two_sample_test(x, y, "sinkhorn", n_permutations=19, seed=0, blur=0.1)
    assert result.statistic == pytest.approx(sinkhorn_divergence(x, y, blur=0.1).item(), rel=1e-6)
    assert result.p_value == pytest.approx(1 / 20)


def test_images_with_a_feature_map():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 1, 4, 4, generator=g), torch.randn(10, 1, 4, 4, generator=g) + 1
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    result = two_sample_test(x, y, "mean_embedding", n_permutations=50, seed=0, feature_map=conv)
    assert result.statistic == pytest.approx(mean_embedding_distance(x, y, conv).item(), rel=1e-5)


def test_bad_inputs():
    x, y = _samples()
    with pytest.raises(ValueError, match="n_permutations"):
        two_sample_test(x, y, n_permutations=0)
    with pytest.raises(ValueError, match="n_permutations"):
        two_sample_test(x, y, n_permutations=2.5)
    with pytest.raises(ValueError, match="statistic"):
        two_sample_test(x, y, statistic="t-test")
    with pytest.raises(TypeError, match="blur"):
        two_sample_test(x, y, statistic="mmd", blur=0.1)
    with pytest.raises(ValueError, match="estimator"):
        two_sample_test(x, y, estimator="linear")
    with pytest.raises(ValueError, match="at least 2"):
        two_sample_test(x[:1], y)
    with pytest.raises(ValueError, match="y contains NaN"):
        two_sample_test(x, torch.full((3, 2), float("inf")))
    with pytest.raises(TypeError, match="seed"):
        two_sample_test(x, y, seed="0")
