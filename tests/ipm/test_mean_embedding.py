"""Mean-embedding IPM: closed forms, NumPy references, layer aggregation, witness, input checks."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ipmcondense.ipm.mean_embedding import mean_embedding_distance, mean_embedding_witness


def test_identity_feature_map_matches_numpy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(15, 3)) + 0.5
    expected = np.linalg.norm(x.mean(0) - y.mean(0))
    value = mean_embedding_distance(torch.from_numpy(x), torch.from_numpy(y))
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-12)
    squared = mean_embedding_distance(x, y, squared=True)  # NumPy input accepted
    assert squared.item() == pytest.approx(expected**2, rel=1e-12)


def test_weights_match_weighted_means():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(4, 2))
    a = rng.random(6)
    a /= a.sum()
    b = rng.random(4)
    b /= b.sum()
    expected = np.linalg.norm(a @ x - b @ y)
    value = mean_embedding_distance(torch.from_numpy(x), torch.from_numpy(y), x_weights=torch.from_numpy(a),
                                    y_weights=torch.from_numpy(b))
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_images_reach_the_feature_map_unflattened():
    torch.manual_seed(3)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).double()
    x, y = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.randn(7, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = (conv(x).reshape(5, -1).mean(0) - conv(y).reshape(7, -1).mean(0)).norm()
    assert mean_embedding_distance(x, y, conv).item() == pytest.approx(expected.item(), rel=1e-12)


def test_layers_combine_as_root_of_summed_squares():
    torch.manual_seed(4)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64) + 1
    phi1 = nn.Linear(3, 4).double()
    phi2 = torch.tanh
    d1 = mean_embedding_distance(x, y, phi1)
    d2 = mean_embedding_distance(x, y, phi2)
    both = mean_embedding_distance(x, y, [phi1, phi2])
    assert both.item() == pytest.approx((d1**2 + d2**2).sqrt().item(), rel=1e-12)
    squared = mean_embedding_distance(x, y, [phi1, phi2], squared=True)
    assert squared.item() == pytest.approx((d1**2 + d2**2).item(), rel=1e-12)
    # a map returning a list of tensors (like layer_features) counts one term per tensor
    as_list = mean_embedding_distance(x, y, lambda z: [phi1(z), phi2(z)])
    assert as_list.item() == pytest.approx(both.item(), rel=1e-12)


def test_squared_bias_is_trace_of_covariance_over_n():
    # Two samples of the same N(0, I_d): E ||mean_x - mean_y||^2 = d/n + d/m exactly.
    g = torch.Generator().manual_seed(5)
    d, n, m, reps = 4, 10, 20, 4000
    x = torch.randn(reps, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(reps, m, d, generator=g, dtype=torch.float64)
    values = torch.stack([mean_embedding_distance(x[r], y[r], squared=True) for r in range(reps)])
    expected = d / n + d / m
    stderr = values.std() / reps**0.5
    assert abs(values.mean().item() - expected) < 4 * stderr.item()


def test_gradient_in_float64_and_zero_at_identical_samples():
    torch.manual_seed(6)
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mean_embedding_distance(a, b, torch.sin), (x, y))
    z = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    value = mean_embedding_distance(z, z.detach().clone())
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(z.grad).all()


def test_feature_map_parameters_receive_gradients():
    net = nn.Linear(3, 2)
    x, y = torch.randn(6, 3), torch.randn(6, 3) + 1
    mean_embedding_distance(x, y, net).backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_witness_attains_the_distance():
    torch.manual_seed(7)
    conv = nn.Conv2d(1, 3, 2).double()
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randn(5, 1, 4, 4, dtype=torch.float64) + 0.3
    witness = mean_embedding_witness(x, y, conv)
    assert witness.dim == 16
    assert witness.mean_gap(x, y).item() == pytest.approx(mean_embedding_distance(x, y, conv).item(), rel=1e-10)
    # any other unit-norm linear functional of phi has a smaller gap
    with torch.no_grad():
        fx, fy = conv(x).reshape(6, -1), conv(y).reshape(5, -1)
        w = torch.randn(fx.shape[1], dtype=torch.float64)
        w /= w.norm()
        assert (fx @ w).mean() - (fy @ w).mean() <= witness.mean_gap(x, y) + 1e-12


def test_witness_of_identical_samples_is_zero():
    x = torch.randn(4, 3)
    witness = mean_embedding_witness(x, x)
    assert torch.equal(witness(torch.randn(7, 3)), torch.zeros(7))


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 6), st.integers(1, 6), st.integers(1, 4),
    st.integers(0, 2**31 - 1),
)
def test_metric_axioms(n, m, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64)
    z = torch.randn(n + 1, d, generator=g, dtype=torch.float64)
    dxy = mean_embedding_distance(x, y)
    assert dxy >= 0
    assert mean_embedding_distance(x, x) == 0
    assert torch.isclose(dxy, mean_embedding_distance(y, x))
    assert dxy <= mean_embedding_distance(x, z) + mean_embedding_distance(z, y) + 1e-12


def test_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="x contains NaN"):
        mean_embedding_distance(torch.full((2, 3), float("nan")), x)
    with pytest.raises(ValueError, match="y is empty"):
        mean_embedding_distance(x, torch.empty(0, 3))
    with pytest.raises(ValueError, match="same shape"):
        mean_embedding_distance(torch.randn(3, 1, 2, 2), torch.randn(3, 1, 4, 1), nn.Flatten())
    with pytest.raises(ValueError, match="same point dimension"):
        mean_embedding_distance(x, torch.randn(4, 2))
    # without a feature map only the flattened dimension matters
    flat = mean_embedding_distance(torch.ones(2, 1, 2, 2), torch.zeros(3, 4))
    assert flat.item() == pytest.approx(2.0)
    with pytest.raises(TypeError, match="feature_map"):
        mean_embedding_distance(x, x, feature_map=3)
    with pytest.raises(ValueError, match="feature_map"):
        mean_embedding_distance(x, x, feature_map=lambda z: z[:1])
    with pytest.raises(ValueError, match="feature_map.*NaN"):
        mean_embedding_distance(x, x, feature_map=torch.log)  # log of negative numbers
    with pytest.raises(ValueError, match="x_weights"):
        mean_embedding_distance(x, x, x_weights=torch.ones(4))
