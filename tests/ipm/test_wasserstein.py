"""Tests of exact, Sinkhorn and sliced Wasserstein distances against scipy, POT, LPs and closed forms."""

import numpy as np
import ot
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import sqrtm
from scipy.optimize import linprog
from scipy.stats import norm

from ipmcondense.ipm.wasserstein import sliced_wasserstein, wasserstein, wasserstein_1d


def sample(n, d, seed, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def probabilities(n, seed):
    w = np.random.default_rng(seed).random(n) + 0.05
    return w / w.sum()


def lp_reference(x, y, a, b, p):
    """Brute-force transport LP with a dense constraint matrix (independent of the library code)."""
    n, m = len(a), len(b)
    cost = np.linalg.norm(x[:, None, :] - y[None, :, :], axis=-1) ** p
    a_eq = np.zeros((n + m, n * m))
    for i in range(n):
        a_eq[i, i * m:(i + 1) * m] = 1
    for j in range(m):
        a_eq[n + j, j::m] = 1
    result = linprog(cost.ravel(), A_eq=a_eq, b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs")
    return result.fun ** (1 / p)


# --- 1-D ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_1d_w1_matches_scipy_with_weights(seed):
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=7), rng.normal(size=11) + 0.4
    a, b = probabilities(7, seed), probabilities(11, seed + 10)
    ours = wasserstein_1d(torch.tensor(u), torch.tensor(v), 1, torch.tensor(a), torch.tensor(b))
    assert float(ours) == pytest.approx(scipy.stats.wasserstein_distance(u, v, a, b), abs=1e-12)
    unweighted = wasserstein(torch.tensor(u), torch.tensor(v), p=1)
    assert float(unweighted) == pytest.approx(scipy.stats.wasserstein_distance(u, v), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_1d_w2_matches_pot_and_sorting(seed):
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=9), rng.exponential(size=13)
    a, b = probabilities(9, seed), probabilities(13, seed + 1)
    ours = wasserstein_1d(torch.tensor(u), torch.tensor(v), 2, torch.tensor(a), torch.tensor(b))
    reference = ot.emd2(a, b, (u[:, None] - v[None, :]) ** 2) ** 0.5
    assert float(ours) == pytest.approx(reference, abs=1e-10)
    w = rng.normal(size=9)  # equal sizes, uniform weights: match sorted samples
    brute = np.mean((np.sort(u) - np.sort(w)) ** 2) ** 0.5
    assert float(wasserstein_1d(torch.tensor(u), torch.tensor(w), 2)) == pytest.approx(brute, abs=1e-12)


def test_1d_gaussian_closed_form():
    levels = (np.arange(4000) + 0.5) / 4000  # quantile discretisation of N(1, 2^2) and N(-0.5, 0.5^2)
    u, v = 1 + 2 * norm.ppf(levels), -0.5 + 0.5 * norm.ppf(levels)
    closed = ((1 + 0.5) ** 2 + (2 - 0.5) ** 2) ** 0.5
    assert float(wasserstein_1d(torch.tensor(u), torch.tensor(v), 2)) == pytest.approx(closed, rel=1e-3)


# --- exact in d > 1 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, 1.5])
@pytest.mark.parametrize("seed", range(3))
def test_exact_matches_lp_and_pot_with_weights(p, seed):
    x, y = sample(6, 3, seed).numpy(), sample(9, 3, seed + 100, shift=0.5).numpy()
    a, b = probabilities(6, seed), probabilities(9, seed + 7)
    ours = float(wasserstein(torch.tensor(x), torch.tensor(y), p=p, x_weights=torch.tensor(a),
                             y_weights=torch.tensor(b)))
    assert ours == pytest.approx(lp_reference(x, y, a, b, p), abs=1e-8)
    cost = ot.dist(x, y, metric="euclidean") ** p
    assert ours == pytest.approx(ot.emd2(a, b, cost) ** (1 / p), abs=1e-8)


@pytest.mark.parametrize("p", [1, 2])
def test_exact_assignment_matches_pot(p):
    x, y = sample(25, 4, 0), sample(25, 4, 1, shift=1.0)
    cost = ot.dist(x.numpy(), y.numpy(), metric="euclidean") ** p
    reference = ot.emd2(np.full(25, 0.04), np.full(25, 0.04), cost) ** (1 / p)
    assert float(wasserstein(x, y, p=p)) == pytest.approx(reference, abs=1e-10)


def test_gaussian_closed_form_via_the_optimal_map():
    # y_i = T(x_i) with T the Gaussian OT map (gradient of a convex function, hence cyclically monotone):
    # the identity assignment is optimal, so W2^2 = mean |x_i - T(x_i)|^2 exactly, and it estimates the
    # closed form |m1 - m2|^2 + tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2) to Monte-Carlo accuracy.
    rng = np.random.default_rng(0)
    m1, m2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    s1, s2 = np.array([[2.0, 0.6], [0.6, 1.0]]), np.array([[1.0, -0.3], [-0.3, 0.5]])
    r1 = np.real(sqrtm(s1))
    r1_inv = np.linalg.inv(r1)
    transport = r1_inv @ np.real(sqrtm(r1 @ s2 @ r1)) @ r1_inv
    x = rng.multivariate_normal(m1, s1, size=400)
    y = m2 + (x - m1) @ transport.T
    r2 = np.real(sqrtm(s2))
    closed = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * np.real(sqrtm(r2 @ s1 @ r2)))
    exact = float(wasserstein(torch.tensor(x), torch.tensor(y), p=2)) ** 2
    assert exact == pytest.approx(np.mean(np.sum((x - y) ** 2, axis=1)), rel=1e-10)
    assert exact == pytest.approx(closed, rel=0.1)
    sinkhorn = float(wasserstein(torch.tensor(x[:150]), torch.tensor(y[:150]), p=2, method="sinkhorn",
                                 blur=0.01, scaling=0.9)) ** 2
    assert sinkhorn == pytest.approx(np.mean(np.sum((x[:150] - y[:150]) ** 2, axis=1)), rel=0.02)


def test_diagonal_gaussians_on_product_grids():
    # Product measures with a separable cost: W2^2 is the sum of the 1-D W2^2 of the coordinates.
    levels = norm.ppf((np.arange(20) + 0.5) / 20)
    grid = np.stack(np.meshgrid(levels, levels, indexing="ij"), -1).reshape(-1, 2)
    x = np.array([0.0, 1.0]) + grid * np.array([1.0, 2.0])
    y = np.array([1.0, -1.0]) + grid * np.array([0.5, 1.5])
    per_axis = sum(
        float(wasserstein_1d(torch.tensor(x[:, k]), torch.tensor(y[:, k]), 2)) ** 2 for k in range(2)
    )
    exact = float(wasserstein(torch.tensor(x), torch.tensor(y), p=2)) ** 2
    assert exact == pytest.approx(per_axis, rel=1e-9)
    closed = 1 + 4 + 0.5**2 + 0.5**2
    assert exact == pytest.approx(closed, rel=0.02)


def test_exact_gradient_matches_finite_differences():
    # The plan is locally constant at a generic point, so the value is smooth there.
    x, y = sample(5, 2, 3).requires_grad_(), sample(7, 2, 4).requires_grad_()
    y_square = sample(5, 2, 9).requires_grad_()
    a, b = torch.tensor(probabilities(5, 1)), torch.tensor(probabilities(7, 2))
    for p in (1, 2):
        assignment = lambda u, v: wasserstein(u, v, p=p)  # noqa: E731
        linear_program = lambda u, v: wasserstein(u, v, p=p, x_weights=a, y_weights=b)  # noqa: E731
        assert torch.autograd.gradcheck(assignment, (x, y_square), eps=1e-6, atol=1e-6)
        assert torch.autograd.gradcheck(linear_program, (x, y), eps=1e-6, atol=1e-6)


def test_sliced_gradcheck_with_fixed_seed():
    x, y = sample(5, 3, 5).requires_grad_(), sample(6, 3, 6).requires_grad_()
    assert torch.autograd.gradcheck(lambda u, v: sliced_wasserstein(u, v, n_projections=9, seed=2), (x, y),
                                    eps=1e-6, atol=1e-6)


# --- sliced --------------------------------------------------------------------------------------------


def test_sliced_same_seed_same_value_and_bounded_by_exact():
    x, y = sample(20, 5, 0), sample(30, 5, 1, shift=0.3)
    first = sliced_wasserstein(x, y, n_projections=50, seed=7)
    assert float(first) == float(sliced_wasserstein(x, y, n_projections=50, seed=7))
    assert float(first) != float(sliced_wasserstein(x, y, n_projections=50, seed=8))
    for p in (1, 2):  # each projection is 1-Lipschitz, so every Monte-Carlo estimate is <= W_p
        assert float(sliced_wasserstein(x, y, 50, p=p, seed=1)) <= float(wasserstein(x, y, p=p)) + 1e-12


def test_sliced_in_one_dimension_is_exact():
    u, v = sample(8, 1, 0), sample(5, 1, 1)
    b = torch.tensor(probabilities(5, 3))
    for p in (1, 2):
        sliced = sliced_wasserstein(u, v, n_projections=3, p=p, seed=0, y_weights=b)
        assert float(sliced) == pytest.approx(float(wasserstein_1d(u, v, p, None, b)), abs=1e-12)


def test_sliced_matches_pot_in_expectation():
    x, y = sample(200, 3, 0), sample(200, 3, 1, shift=0.5)
    ours = float(sliced_wasserstein(x, y, n_projections=2000, p=2, seed=0))
    pot = float(ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), n_projections=2000, seed=0))
    assert ours == pytest.approx(pot, rel=0.03)


def test_sliced_seed_none_follows_torch_global_generator():
    x, y = sample(10, 3, 0), sample(10, 3, 1)
    torch.manual_seed(123)
    first = sliced_wasserstein(x, y, n_projections=5)
    torch.manual_seed(123)
    assert float(first) == float(sliced_wasserstein(x, y, n_projections=5))


# --- properties ----------------------------------------------------------------------------------------

small_sizes = st.integers(1, 5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=small_sizes, m=small_sizes, k=small_sizes, p=st.sampled_from([1, 2]))
def test_exact_metric_axioms(seed, n, m, k, p):
    x, y, z = sample(n, 3, seed), sample(m, 3, seed + 1, shift=0.5), sample(k, 3, seed + 2)
    xy, yx = float(wasserstein(x, y, p=p)), float(wasserstein(y, x, p=p))
    assert xy >= 0 and xy == pytest.approx(yx, abs=1e-9)
    assert float(wasserstein(x, x, p=p)) == pytest.approx(0.0, abs=1e-9)
    assert xy <= float(wasserstein(x, z, p=p)) + float(wasserstein(z, y, p=p)) + 1e-9


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=small_sizes, m=small_sizes, k=small_sizes)
def test_sliced_metric_axioms_with_the_same_seed(seed, n, m, k):
    x, y, z = sample(n, 3, seed), sample(m, 3, seed + 1), sample(k, 3, seed + 2)
    sw = lambda u, v: float(sliced_wasserstein(u, v, n_projections=20, seed=seed))  # noqa: E731
    assert sw(x, y) >= 0 and sw(x, y) == pytest.approx(sw(y, x), abs=1e-12)
    assert sw(x, x) == 0.0
    assert sw(x, y) <= sw(x, z) + sw(z, y) + 1e-12


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), m=st.integers(1, 6),
       scale=st.floats(-3, 3).filter(lambda c: abs(c) > 1e-2))
def test_exact_invariances(seed, n, m, scale):
    x, y = sample(n, 3, seed), sample(m, 3, seed + 1)
    base = float(wasserstein(x, y, p=2))
    shift = sample(1, 3, seed + 2)
    rotation, _ = torch.linalg.qr(sample(3, 3, seed + 3))
    perm_x, perm_y = torch.randperm(n), torch.randperm(m)
    assert float(wasserstein(x + shift, y + shift, p=2)) == pytest.approx(base, abs=1e-9)
    assert float(wasserstein(x @ rotation, y @ rotation, p=2)) == pytest.approx(base, abs=1e-9)
    assert float(wasserstein(x[perm_x], y[perm_y], p=2)) == pytest.approx(base, abs=1e-9)
    assert float(wasserstein(scale * x, scale * y, p=1)) == pytest.approx(
        abs(scale) * float(wasserstein(x, y, p=1)), rel=1e-9, abs=1e-9)


# --- degenerate inputs, devices, errors ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "sinkhorn", "sliced"])
@pytest.mark.parametrize("p", [1, 2])
def test_identical_and_duplicated_clouds_give_zero_and_finite_gradients(method, p):
    x = sample(6, 2, 0)
    for u, v in ((x, x), (torch.cat([x, x[:2]]), torch.cat([x, x[:2]])), (x[:1], x[:1])):
        u = u.clone().requires_grad_()
        value = wasserstein(u, v, p=p, method=method, seed=0)
        value.backward()
        assert float(value.detach()) == pytest.approx(0.0, abs=1e-6)
        assert torch.isfinite(u.grad).all()


@pytest.mark.parametrize("method", ["exact", "sliced"])
def test_single_points(method):
    x, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    expected = 5.0 if method == "exact" else None
    value = float(wasserstein(x, y, p=2, method=method, seed=0))
    if expected is not None:
        assert value == pytest.approx(expected)
    else:
        assert 0 < value <= 5.0 + 1e-6


@pytest.mark.parametrize("method", ["exact", "sinkhorn", "sliced"])
def test_device_and_dtype_follow_input(method):
    x, y = sample(6, 2, 0).float(), sample(7, 2, 1).float()
    value = wasserstein(x, y, p=2, method=method, seed=0)
    assert value.device == x.device and value.dtype == torch.float32 and value.shape == ()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"method": "emd"}, ValueError, "method"),
        ({"p": 0.5}, ValueError, "p must be >= 1"),
        ({"p": 3, "method": "sinkhorn"}, ValueError, "p must be 1 or 2"),
        ({"method": "sinkhorn", "blur": -1.0}, ValueError, "blur"),
        ({"method": "sliced", "n_projections": 0}, ValueError, "n_projections"),
        ({"method": "sliced", "n_projections": 2.5}, TypeError, "n_projections"),
        ({"method": "sliced", "seed": "a"}, TypeError, "seed"),
        ({"x_weights": torch.full((6,), 0.5)}, ValueError, "x_weights"),
        ({"y_weights": -torch.ones(7) / 7}, ValueError, "y_weights"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    x, y = sample(6, 2, 0), sample(7, 2, 1)
    with pytest.raises(error, match=match):
        wasserstein(x, y, **kwargs)


def test_bad_points_are_named():
    x, y = sample(6, 2, 0), sample(7, 2, 1)
    bad = y.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        wasserstein(x, bad)
    with pytest.raises(ValueError, match="x is empty"):
        sliced_wasserstein(torch.zeros(0, 2), y)
    with pytest.raises(ValueError, match="same point dimension"):
        wasserstein(x, sample(3, 4, 2))
    with pytest.raises(ValueError, match="one-dimensional"):
        wasserstein_1d(x, y)


def test_exact_sizes_beyond_memory_are_refused_with_advice(monkeypatch):
    from ipmcondense.ipm import _ot

    monkeypatch.setattr(_ot, "_available_memory", lambda: 10**6)  # 1 MB: 64 bytes x 2001^2 do not fit
    big = torch.zeros(2001, 2)
    with pytest.raises(ValueError, match="GiB.*sinkhorn.*sliced"):
        wasserstein(big, big)
    with pytest.raises(ValueError, match="available"):
        wasserstein(torch.zeros(600, 2), torch.zeros(500, 2))
