"""Tests of the Sinkhorn divergence and its witness against geomloss, POT and closed forms."""

import numpy as np
import ot
import pytest
import torch
from geomloss import SamplesLoss
from hypothesis import given, settings
from hypothesis import strategies as st

from ipmcondense.ipm import sinkhorn as sinkhorn_module
from ipmcondense.ipm.sinkhorn import SinkhornWitness, sinkhorn_divergence, sinkhorn_witness


def clouds(n=12, m=15, d=2, seed=0, dtype=torch.float64, shift=0.7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(m, d, generator=g, dtype=dtype) * 0.8 + shift
    return x, y


def weights(n, seed, dtype=torch.float64):
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=dtype) + 0.1
    return w / w.sum()


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("blur,scaling", [(0.05, 0.5), (0.3, 0.8)])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_geomloss(p, blur, scaling, weighted):
    x, y = clouds()
    a, b = (weights(12, 1), weights(15, 2)) if weighted else (None, None)
    ours = sinkhorn_divergence(x, y, p=p, blur=blur, scaling=scaling, x_weights=a, y_weights=b)
    loss = SamplesLoss("sinkhorn", p=p, blur=blur, scaling=scaling, backend="tensorized")
    a_ref = torch.full((12,), 1 / 12, dtype=x.dtype) if a is None else a
    b_ref = torch.full((15,), 1 / 15, dtype=x.dtype) if b is None else b
    reference = loss(a_ref, x, b_ref, y)
    assert abs(float(ours) - float(reference)) < 1e-6


@pytest.mark.parametrize("reach", [None, 1.0])
def test_matches_geomloss_raw_and_unbalanced(reach):
    x, y = clouds(seed=3)
    for debias in (True, False):
        ours = sinkhorn_divergence(x, y, blur=0.1, reach=reach, debias=debias)
        reference = SamplesLoss("sinkhorn", blur=0.1, reach=reach, debias=debias)(x, y)
        assert abs(float(ours) - float(reference)) < 1e-6


def test_gradient_is_geomloss_envelope_gradient():
    x, y = clouds(seed=4)
    x1, y1 = x.clone().requires_grad_(), y.clone().requires_grad_()
    x2, y2 = x.clone().requires_grad_(), y.clone().requires_grad_()
    sinkhorn_divergence(x1, y1, blur=0.1).backward()
    SamplesLoss("sinkhorn", blur=0.1)(x2, y2).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(y1.grad, y2.grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("p,atol", [(2, 1e-5), (1, 1e-4)])
def test_gradcheck_where_the_loop_converges(p, atol):
    # Envelope gradients are exact at convergence; with blur above the diameter the loop converges fast.
    x, y = clouds(5, 6, seed=1)
    x, y = (0.3 * x).requires_grad_(), (0.3 * y).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: sinkhorn_divergence(a, b, p=p, blur=5.0), (x, y), eps=1e-6, atol=atol, rtol=1e-3
    )


@pytest.mark.parametrize("p", [1, 2])
def test_small_blur_approaches_wasserstein_power_over_p(p):
    x, y = clouds(15, 15, seed=5)
    cost = ot.dist(x.numpy(), y.numpy(), metric="sqeuclidean" if p == 2 else "euclidean")
    exact = ot.emd2(np.full(15, 1 / 15), np.full(15, 1 / 15), cost) / p
    value = float(sinkhorn_divergence(x, y, p=p, blur=0.005, scaling=0.95))
    assert value == pytest.approx(exact, rel=0.02)


def test_large_blur_approaches_half_energy_distance():
    x, y = clouds(10, 13, seed=6)
    dist = lambda u, v: torch.cdist(u, v)  # noqa: E731
    energy_half = dist(x, y).mean() - 0.5 * dist(x, x).mean() - 0.5 * dist(y, y).mean()
    value = sinkhorn_divergence(x, y, p=1, blur=1e4)
    assert float(value) == pytest.approx(float(energy_half), rel=1e-2)


def test_single_diracs_give_the_cost():
    x = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    assert float(sinkhorn_divergence(x, y, p=2)) == pytest.approx(4.0, abs=1e-8)  # |x - y|^2 / 2
    # geomloss' p = 1 cost is sqrt(max(|x - y|^2, 1e-8)): the self-costs are 1e-4, not 0.
    assert float(sinkhorn_divergence(x, y, p=1)) == pytest.approx(8**0.5 - 1e-4, abs=1e-8)


@pytest.mark.parametrize("p", [1, 2])
def test_identical_and_duplicated_clouds_are_zero_without_nan(p):
    x, _ = clouds(8, 8, seed=7)
    duplicated = torch.cat([x, x[:3]])
    single = x[:1]
    for u, v in ((x, x), (duplicated, duplicated), (single, single)):
        u = u.clone().requires_grad_()
        value = sinkhorn_divergence(u, v, p=p)
        value.backward()
        assert abs(float(value.detach())) < 1e-6
        assert torch.isfinite(u.grad).all()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), m=st.integers(1, 8), p=st.sampled_from([1, 2]))
def test_symmetric_and_nonnegative(seed, n, m, p):
    x, y = clouds(n, m, d=3, seed=seed)
    forward = float(sinkhorn_divergence(x, y, p=p, blur=0.2, scaling=0.9))
    backward = float(sinkhorn_divergence(y, x, p=p, blur=0.2, scaling=0.9))
    assert forward >= -1e-6
    assert forward == pytest.approx(backward, abs=1e-6, rel=1e-4)


def test_translation_invariance():
    x, y = clouds(seed=8)
    shift = torch.tensor([3.0, -2.0], dtype=x.dtype)
    base = sinkhorn_divergence(x, y, blur=0.1, scaling=0.9)
    moved = sinkhorn_divergence(x + shift, y + shift, blur=0.1, scaling=0.9)
    assert float(moved) == pytest.approx(float(base), rel=1e-6)


def test_grad_mode_of_caller_is_preserved():
    x, y = clouds()
    with torch.no_grad():
        sinkhorn_divergence(x.requires_grad_(), y)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


def test_device_and_dtype_follow_input():
    x, y = clouds(dtype=torch.float32)
    value = sinkhorn_divergence(x, y)
    assert value.device == x.device and value.dtype == torch.float32 and value.shape == ()


def test_auto_backend_is_tensorized_on_cpu_even_when_large():
    big = torch.zeros(6000, 1)
    assert sinkhorn_module._resolve_backend("auto", big, big) == "tensorized"
    assert sinkhorn_module._resolve_backend("auto", big[:10], big[:10]) == "tensorized"


def test_unusable_keops_falls_back_with_warning(monkeypatch):
    x, y = clouds()
    monkeypatch.setattr(sinkhorn_module, "_keops_usable", lambda: False)
    with pytest.warns(RuntimeWarning, match="KeOps"):
        value = sinkhorn_divergence(x, y, backend="online")
    assert float(value) == pytest.approx(float(sinkhorn_divergence(x, y, backend="tensorized")), abs=1e-12)


def test_keops_name_error_at_run_time_falls_back(monkeypatch):
    from geomloss._legacy import samples_loss

    def broken(*args, **kwargs):
        raise NameError("name 'generic_logsumexp' is not defined")

    monkeypatch.setattr(sinkhorn_module, "_keops_usable", lambda: True)
    monkeypatch.setitem(samples_loss.routines["sinkhorn"], "online", broken)
    x, y = clouds()
    with pytest.warns(RuntimeWarning, match="NameError"):
        value = sinkhorn_divergence(x, y, backend="online")
    assert float(value) == pytest.approx(float(sinkhorn_divergence(x, y)), abs=1e-12)


def test_non_finite_result_raises(monkeypatch):
    x, y = clouds()
    monkeypatch.setattr(sinkhorn_module, "_run_geomloss", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="not finite"):
        sinkhorn_divergence(x, y)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"p": 3}, "p must be 1 or 2"),
        ({"blur": 0.0}, "blur"),
        ({"blur": float("nan")}, "blur"),
        ({"scaling": 1.0}, "scaling"),
        ({"scaling": 0.0}, "scaling"),
        ({"reach": -1.0}, "reach"),
        ({"backend": "keops"}, "backend"),
        ({"x_weights": torch.full((12,), 0.5)}, "x_weights"),
        ({"y_weights": torch.ones(3)}, "y_weights"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    x, y = clouds()
    with pytest.raises(ValueError, match=match):
        sinkhorn_divergence(x, y, **kwargs)


def test_bad_points_are_named():
    x, y = clouds()
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        sinkhorn_divergence(bad, y)
    with pytest.raises(ValueError, match="y is empty"):
        sinkhorn_divergence(x, torch.zeros(0, 2))
    with pytest.raises(ValueError, match="same point dimension"):
        sinkhorn_divergence(x, torch.zeros(4, 3))
    with pytest.raises(TypeError, match="debias"):
        sinkhorn_divergence(x, y, debias="yes")


# --- witness -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_witness_dual_value_equals_divergence(p, weighted):
    x, y = clouds(seed=9)
    a, b = (weights(12, 3), weights(15, 4)) if weighted else (None, None)
    value = sinkhorn_divergence(x, y, p=p, blur=0.1, scaling=0.9, x_weights=a, y_weights=b)
    witness = sinkhorn_witness(x, y, p=p, blur=0.1, scaling=0.9, x_weights=a, y_weights=b)
    assert isinstance(witness, SinkhornWitness) and witness.metric == "sinkhorn"
    dual = witness.dual_value(x, y, x_weights=a, y_weights=b)
    assert float(dual) == pytest.approx(float(value), rel=1e-3)


def test_witness_potentials_match_geomloss_on_the_samples():
    x, y = clouds(seed=10)
    witness = sinkhorn_witness(x, y, blur=0.2, scaling=0.9)
    f_ref, g_ref = SamplesLoss("sinkhorn", blur=0.2, scaling=0.9, potentials=True)(x, y)
    # The extension is the soft C-transform of the final potentials: one Sinkhorn step from geomloss' own.
    torch.testing.assert_close(witness.potential_x(x), f_ref.reshape(-1), atol=1e-2, rtol=0)
    torch.testing.assert_close(witness.potential_y(y), g_ref.reshape(-1), atol=1e-2, rtol=0)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("blur", [0.05, 0.5])
def test_witness_mean_gap_bounds_the_divergence_by_convexity(p, blur):
    x, y = clouds(seed=11)
    value = float(sinkhorn_divergence(x, y, p=p, blur=blur, scaling=0.9))
    gap = float(sinkhorn_witness(x, y, p=p, blur=blur, scaling=0.9).mean_gap(x, y))
    assert gap >= value * (1 - 1e-3)


def test_witness_mean_gap_is_twice_the_divergence_in_the_kernel_limit():
    x, y = clouds(seed=12)
    value = float(sinkhorn_divergence(x, y, p=2, blur=100.0))
    gap = float(sinkhorn_witness(x, y, p=2, blur=100.0).mean_gap(x, y))
    assert gap == pytest.approx(2 * value, rel=1e-3)


def test_witness_is_finite_far_away_and_differentiable():
    x, y = clouds(seed=13)
    witness = sinkhorn_witness(x, y, blur=0.05)
    z = torch.tensor([[0.0, 0.0], [50.0, -80.0], [1e3, 1e3]], dtype=torch.float64, requires_grad=True)
    values = witness(z)
    assert values.shape == (3,) and torch.isfinite(values).all()
    values.sum().backward()
    assert torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="dimension 2"):
        witness(torch.zeros(2, 3))


def test_witness_of_identical_clouds_is_flat():
    x, _ = clouds(seed=14)
    witness = sinkhorn_witness(x, x, blur=0.1)
    assert float(witness.mean_gap(x, x)) == pytest.approx(0.0, abs=1e-8)
    assert torch.isfinite(witness(x)).all()


def test_unrelated_runtime_errors_are_not_swallowed(monkeypatch):
    from geomloss._legacy import samples_loss

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(sinkhorn_module, "_keops_usable", lambda: True)
    monkeypatch.setitem(samples_loss.routines["sinkhorn"], "online", out_of_memory)
    x, y = clouds()
    with pytest.raises(RuntimeError, match="out of memory"):
        sinkhorn_divergence(x, y, backend="online")
