"""Issue 13: the peers' own expectations (scipy, POT, geomloss, dcor, alibi-detect), and the defects they found.

Every reference here is independent of the package: scipy, POT, geomloss, brute-force NumPy formulas.
"""

import warnings

import numpy as np
import ot
import pytest
import scipy.stats as st
import torch
from geomloss import SamplesLoss
from scipy.spatial.distance import cdist

from ipmcondense.ipm import (
    distance,
    energy_distance,
    max_sliced_wasserstein,
    mmd2,
    mmd2_from_kernel_matrix,
    otdd,
    sinkhorn_divergence,
    sliced_wasserstein,
    transport_plan,
    two_sample_test,
    wasserstein,
    wasserstein_1d,
)
from ipmcondense.ipm.kernels import GaussianKernel, squared_distances


def _energy_reference(x, y, exponent=1.0, a=None, b=None):
    """Brute-force V-statistic energy distance (float64), dcor's formula with its square root."""
    a = np.full(len(x), 1 / len(x)) if a is None else a
    b = np.full(len(y), 1 / len(y)) if b is None else b
    d = lambda u, v: cdist(u, v) ** exponent  # noqa: E731
    return np.sqrt(2 * a @ d(x, y) @ b - a @ d(x, x) @ a - b @ d(y, y) @ b)


def _gaussian_mmd2_reference(x, y, h):
    k = lambda u, v: np.exp(-cdist(u, v, "sqeuclidean") / (2 * h * h))  # noqa: E731
    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * k(x, y).mean())


def _far_point_clouds(seed=0, far=1e4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 2))
    x[0] = far
    return x, rng.normal(size=(200, 2)) + 0.3


# ---------------------------------------------------------------------------------------------------
# Defect 1: energy distance with one far point


def test_energy_distance_with_a_far_zero_weight_point_matches_scipy():
    expected = st.energy_distance([1.0, 2.0, 1e5], [1.0, 1.0], u_weights=[0.5, 0.5, 0.0])
    from_arrays = energy_distance(np.array([1.0, 2.0, 1e5]), np.array([1.0, 1.0]),
                                  x_weights=np.array([0.5, 0.5, 0.0]))
    from_lists = energy_distance([1.0, 2.0, 1e5], [1.0, 1.0], x_weights=[0.5, 0.5, 0.0])
    assert from_lists.dtype == torch.float64  # Python floats are kept in double precision
    assert float(from_arrays) == pytest.approx(expected, rel=1e-13)
    assert float(from_lists) == pytest.approx(expected, rel=1e-13)
    # the same in 2-D (the kernel-sum path, not the 1-D CDF formula), on both backends
    x2, y2 = np.array([[1.0, 0], [2, 0], [1e5, 0]]), np.array([[1.0, 0], [1, 0]])
    for backend in ("dense", "tiled"):
        value = energy_distance(x2, y2, x_weights=[0.5, 0.5, 0.0], backend=backend)
        assert float(value) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("backend", ["dense", "tiled"])
def test_float32_energy_distance_survives_a_far_point(backend):
    x, y = _far_point_clouds()
    expected = _energy_reference(x, y)
    value = energy_distance(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32),
                            backend=backend)
    # it was exactly 0.0 (every near distance zeroed); dcor in float32 errs by 2e-5
    assert abs(float(value) - expected) / expected < 2e-5


# ---------------------------------------------------------------------------------------------------
# Defect 2: Gaussian MMD^2 and squared distances with large norms


@pytest.mark.parametrize("backend", ["dense", "tiled"])
def test_float32_gaussian_mmd2_survives_a_far_point(backend):
    x, y = _far_point_clouds()
    expected = _gaussian_mmd2_reference(x, y, 1.0)
    value = mmd2(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), bandwidth=1.0,
                 backend=backend)
    assert abs(float(value) - expected) / abs(expected) < 1e-5  # was 4e-3


def test_squared_distances_are_accurate_far_from_the_origin():
    rng = np.random.default_rng(3)
    near, far = rng.normal(size=(50, 8)), rng.normal(size=(50, 8)) + 3e3  # a cluster far away
    x = np.concatenate([near, far])
    expected = cdist(x, x, "sqeuclidean")
    xt = torch.tensor(x, dtype=torch.float32)
    d2 = squared_distances(xt, xt).double().numpy()
    within_far = np.s_[50:, 50:]
    # cancellation in |x|^2 + |y|^2 - 2<x, y> loses everything at norms 1e7 in float32; the direct
    # recomputation gives cdist's float32 accuracy
    relative = np.abs(d2[within_far] - expected[within_far]) / np.maximum(expected[within_far], 1e-12)
    off_diagonal = ~np.eye(50, dtype=bool)
    assert relative[off_diagonal].max() < 1e-3
    assert np.all(np.diag(d2) == 0)


def test_duplicated_points_still_give_exact_zeros_and_finite_gradients():
    x = torch.tensor([[1e3, 2.0], [1e3, 2.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1e3, 2.0], [5.0, 5.0]], dtype=torch.float64)
    value = energy_distance(x, y, backend="tiled")
    value.backward()
    assert torch.isfinite(x.grad).all()
    assert float(energy_distance(x.detach()[:1], y[:1])) == 0.0


# ---------------------------------------------------------------------------------------------------
# Defect 3: exact OT with POT's network simplex


def _gaussian_tail_problem(seed):
    rng = np.random.default_rng(seed)
    n, m = 30, 25
    x, y = rng.normal(size=(n, 2)), rng.normal(size=(m, 2)) + 0.5
    a = np.exp(-0.5 * (np.linspace(-7, 7, n)) ** 2)  # tail weights near 1e-11
    b = rng.random(m) + 1e-3
    return x, y, a / a.sum(), b / b.sum()


@pytest.mark.parametrize("seed", range(15))
def test_exact_wasserstein_with_tiny_weights_matches_pot(seed):
    x, y, a, b = _gaussian_tail_problem(seed)
    assert a.min() < 1e-10
    expected = ot.emd2(a, b, cdist(x, y) ** 2, numItermax=10**7)
    value = wasserstein(x, y, p=2, x_weights=a, y_weights=b) ** 2
    assert float(value) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_weighted_exact_ot_beyond_the_old_size_limit_matches_pot():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(600, 3)), rng.normal(size=(500, 3))  # 300,000 pairs: refused before
    a, b = rng.random(600), rng.random(500)
    a, b = a / a.sum(), b / b.sum()
    expected = ot.emd2(a, b, cdist(x, y), numItermax=10**7)
    assert float(wasserstein(x, y, p=1, x_weights=a, y_weights=b)) == pytest.approx(expected, rel=1e-12)


def test_exact_plan_is_pots_and_has_the_marginals():
    x, y, a, b = _gaussian_tail_problem(0)
    plan = transport_plan(x, y, p=2, x_weights=a, y_weights=b).numpy()
    cost = cdist(x, y) ** 2
    assert plan.shape == (30, 25) and (plan >= 0).all()
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-15)
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-15)
    assert (plan * cost).sum() == pytest.approx(ot.emd2(a, b, cost, numItermax=10**7), rel=1e-13)


def test_exact_gradient_in_the_weights_is_pots():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 2)), rng.normal(size=(9, 2))
    a0, b0 = rng.random(12), rng.random(9)
    a = torch.tensor(a0 / a0.sum(), requires_grad=True)
    b = torch.tensor(b0 / b0.sum(), requires_grad=True)
    wasserstein(x, y, p=1, x_weights=a, y_weights=b).backward()
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ot.emd2(a_ref, b_ref, torch.tensor(cdist(x, y))).backward()
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-10, atol=1e-12)


def test_exact_weights_must_sum_to_one_and_the_error_says_how_to_normalise():
    with pytest.raises(ValueError, match=r"x_weights must sum to 1.*x_weights / x_weights.sum\(\)"):
        wasserstein([[0.0, 0.0], [1.0, 1.0]], [[0.0, 1.0]], x_weights=[1.0, 1.0])


# ---------------------------------------------------------------------------------------------------
# Sinkhorn: plans, unbalanced OT, weight gradients


def test_sinkhorn_plan_matches_pot_at_convergence():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 2)), rng.normal(size=(15, 2)) + 0.5
    blur = 1.0
    plan = transport_plan(x, y, p=2, method="sinkhorn", blur=blur).numpy()
    reference = ot.sinkhorn(np.full(20, 1 / 20), np.full(15, 1 / 15), cdist(x, y, "sqeuclidean") / 2,
                            reg=blur**2, stopThr=1e-13, numItermax=100_000)
    np.testing.assert_allclose(plan, reference, rtol=1e-4, atol=1e-9)


def test_unbalanced_sinkhorn_between_unequal_masses_is_geomloss_and_its_plan_is_pots():
    rng = np.random.default_rng(5)
    x, y = torch.tensor(rng.normal(size=(20, 2))), torch.tensor(rng.normal(size=(15, 2)) + 0.5)
    a, b = torch.tensor(rng.random(20)), torch.tensor(rng.random(15) * 3)  # total masses ~10 and ~22
    blur, reach = 0.7, 2.0
    value = sinkhorn_divergence(x, y, p=2, blur=blur, reach=reach, x_weights=a, y_weights=b)
    reference = SamplesLoss("sinkhorn", p=2, blur=blur, reach=reach, scaling=0.5)(a, x, b, y)
    assert float(value) == float(reference)
    plan = transport_plan(x, y, p=2, method="sinkhorn", blur=blur, reach=reach, x_weights=a, y_weights=b,
                          iterations=3000).numpy()
    pot = ot.unbalanced.sinkhorn_unbalanced(a.numpy(), b.numpy(), cdist(x, y, "sqeuclidean") / 2,
                                            reg=blur**2, reg_m=reach**2, stopThr=1e-13, numItermax=100_000)
    np.testing.assert_allclose(plan, pot, rtol=2e-3, atol=1e-8)
    with pytest.raises(ValueError, match="must sum to 1"):
        sinkhorn_divergence(x, y, x_weights=a, y_weights=b)  # balanced OT keeps refusing unequal masses


def test_sinkhorn_gradient_in_the_weights_matches_finite_differences():
    rng = np.random.default_rng(6)
    x, y = torch.tensor(rng.normal(size=(10, 2))), torch.tensor(rng.normal(size=(8, 2)))
    a0 = torch.tensor(rng.random(10) + 0.5)
    a0 = a0 / a0.sum()
    a = a0.clone().requires_grad_()
    kwargs = dict(p=2, blur=3.0, scaling=0.99)  # a large blur: the loop converges, so gradient = derivative
    sinkhorn_divergence(x, y, x_weights=a, **kwargs).backward()
    direction = torch.tensor(rng.normal(size=10))
    direction -= direction.mean()  # keeps the total mass
    h = 1e-5
    plus = sinkhorn_divergence(x, y, x_weights=a0 + h * direction, **kwargs)
    minus = sinkhorn_divergence(x, y, x_weights=a0 - h * direction, **kwargs)
    assert float(a.grad @ direction) == pytest.approx(float(plus - minus) / (2 * h), rel=1e-4)


def test_otdd_sinkhorn_gradient_matches_finite_differences():
    rng = np.random.default_rng(7)
    fa, fb = torch.tensor(rng.normal(size=(8, 2)), requires_grad=True), torch.tensor(rng.normal(size=(6, 2)))
    la, lb = torch.tensor([0, 1] * 4), torch.tensor([0, 1, 1] * 2)
    kwargs = dict(p=2, blur=1.0, scaling=0.9, max_iterations=300)
    otdd(fa, la, fb, lb, **kwargs).backward()
    direction = torch.tensor(rng.normal(size=(8, 2)))
    h = 1e-5
    with torch.no_grad():
        plus = otdd(fa + h * direction, la, fb, lb, **kwargs)
        minus = otdd(fa - h * direction, la, fb, lb, **kwargs)
    assert float((fa.grad * direction).sum()) == pytest.approx(float(plus - minus) / (2 * h), rel=1e-3)


def test_otdd_tolerance_is_deprecated():
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 1] * 3)
    with pytest.warns(DeprecationWarning, match="tolerance"):
        otdd(x, labels, x, labels, tolerance=1e-4)


# ---------------------------------------------------------------------------------------------------
# Sliced, max-sliced, batched 1-D


def test_sliced_and_max_sliced_with_given_directions_match_pot():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(30, 5)) + 0.2
    a = rng.random(40)
    a /= a.sum()
    directions = rng.normal(size=(25, 5))
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    for p in (1, 2):
        sliced = sliced_wasserstein(x, y, p=p, x_weights=a, directions=directions)
        reference = ot.sliced_wasserstein_distance(x, y, a=a, p=p, projections=unit.T)
        assert float(sliced) == pytest.approx(reference, rel=1e-12)
        maximal = max_sliced_wasserstein(x, y, p=p, x_weights=a, directions=directions)
        reference = ot.max_sliced_wasserstein_distance(x, y, a=a, p=p, projections=unit.T)
        assert float(maximal) == pytest.approx(reference, rel=1e-12)
    assert float(max_sliced_wasserstein(x, y, seed=0)) >= float(sliced_wasserstein(x, y, seed=0))
    with pytest.raises(ValueError, match="directions must have shape"):
        sliced_wasserstein(x, y, directions=np.ones((3, 4)))


def test_batched_one_dimensional_wasserstein_matches_pot_column_by_column():
    rng = np.random.default_rng(9)
    u, v = rng.normal(size=(50, 4)), rng.normal(size=(35, 4)) * 2
    wu = rng.random((50, 4))
    wu /= wu.sum(0)
    for p in (1, 2, 3):
        ours = wasserstein_1d(u, v, p=p, u_weights=wu, batched=True).numpy()
        reference = ot.wasserstein_1d(u, v, u_weights=wu, p=p) ** (1 / p)
        np.testing.assert_allclose(ours, reference, rtol=1e-12)
    shared = wasserstein_1d(u, v, p=1, u_weights=wu[:, 0], batched=True)
    assert float(shared[2]) == pytest.approx(st.wasserstein_distance(u[:, 2], v[:, 2], u_weights=wu[:, 0]))


# ---------------------------------------------------------------------------------------------------
# 1-D energy distance, dcor's exponent, precomputed kernels, names


def test_one_dimensional_energy_distance_matches_scipy_and_is_differentiable():
    rng = np.random.default_rng(10)
    u, v = rng.normal(size=300), rng.normal(size=200) + 0.3
    wu, wv = rng.random(300), rng.random(200)
    expected = st.energy_distance(u, v, u_weights=wu, v_weights=wv)
    value = energy_distance(u, v, x_weights=wu / wu.sum(), y_weights=wv / wv.sum())
    assert float(value) == pytest.approx(expected, rel=1e-12)
    ut = torch.tensor(u[:20], requires_grad=True)
    vt = torch.tensor(v[:15], requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: energy_distance(s, t), (ut, vt), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("exponent", [0.5, 1.0, 1.5])
def test_energy_distance_exponent_is_dcors(exponent):
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(30, 3)) + 0.4
    expected = _energy_reference(x, y, exponent)
    for backend in ("dense", "tiled"):
        assert float(energy_distance(x, y, exponent=exponent, backend=backend)) == pytest.approx(expected, rel=1e-11)
    u, v = x[:, :1], y[:, :1]  # 1-D with exponent != 1 takes the kernel-sum path
    assert float(energy_distance(u, v, exponent=exponent)) == pytest.approx(_energy_reference(u, v, exponent),
                                                                            rel=1e-11)
    with pytest.raises(ValueError, match="exponent"):
        energy_distance(x, y, exponent=2.0)


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_mmd2_from_a_precomputed_kernel_matrix_equals_mmd2(estimator):
    rng = np.random.default_rng(12)
    x, y = torch.tensor(rng.normal(size=(25, 3))), torch.tensor(rng.normal(size=(20, 3)) + 0.3)
    a = torch.tensor(rng.random(25))
    a = a / a.sum()
    pooled = torch.cat([x, y])
    gram = GaussianKernel(1.2)(pooled, pooled)
    expected = mmd2(x, y, bandwidth=1.2, estimator=estimator, x_weights=a)
    value = mmd2_from_kernel_matrix(gram, 25, estimator=estimator, x_weights=a)
    assert float(value) == pytest.approx(float(expected), rel=1e-12)
    with pytest.raises(ValueError, match="n_x"):
        mmd2_from_kernel_matrix(gram, 45)
    with pytest.raises(ValueError, match="square"):
        mmd2_from_kernel_matrix(gram[:, :10], 5)


def test_mmd_names_say_what_they_compute():
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(20, 2)), rng.normal(size=(20, 2)) + 0.5
    new = two_sample_test(x, y, "mmd2", 20, seed=0)
    old = two_sample_test(x, y, "mmd", 20, seed=0)  # the earlier spelling keeps working
    assert new.statistic == old.statistic == pytest.approx(float(mmd2(x, y)), rel=1e-9)
    assert new.statistic_name == "mmd2"
    squared = float(distance(x, y, "mmd2", estimator="biased"))
    assert float(distance(x, y, "mmd")) == pytest.approx(squared**0.5, rel=1e-9)


def test_no_warning_from_pot_leaks():
    x, y, a, b = _gaussian_tail_problem(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wasserstein(x, y, p=2, x_weights=a, y_weights=b)
