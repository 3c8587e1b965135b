"""Discrepancies equal their IPM definitions, computed independently."""

import numpy as np
import pytest
import torch

from ipmcondense.condensation.discrepancies import (
    DISCREPANCY_NAMES,
    GaussianMMDDiscrepancy,
    GradientCosineDiscrepancy,
    GradientMSEDiscrepancy,
    MeanEmbeddingDiscrepancy,
    get_discrepancy,
)
from ipmcondense.ipm.mean_embedding import mean_embedding_distance
from ipmcondense.ipm.mmd import mmd2


def _clouds(n=7, m=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)


def test_mean_embedding_is_squared_linear_ipm():
    real, syn = _clouds()
    value = MeanEmbeddingDiscrepancy()(real, syn)
    torch.testing.assert_close(value, mean_embedding_distance(real, syn, squared=True))
    # the IPM over the unit ball of linear witnesses is attained at w = normalised mean difference
    diff = real.mean(0) - syn.mean(0)
    w = diff / diff.norm()
    gap = (real @ w).mean() - (syn @ w).mean()
    torch.testing.assert_close(value, gap**2)


def test_mmd_discrepancy_uses_ipm_mmd2():
    real, syn = _clouds()
    value = GaussianMMDDiscrepancy(bandwidth=1.5)(real, syn)
    torch.testing.assert_close(value, mmd2(syn, real, kernel="gaussian", bandwidth=1.5, estimator="biased"))
    # independent NumPy V-statistic
    z = np.concatenate([syn.numpy(), real.numpy()])
    k = np.exp(-((z[:, None] - z[None]) ** 2).sum(-1) / (2 * 1.5**2))
    m = syn.shape[0]
    expected = k[:m, :m].mean() + k[m:, m:].mean() - 2 * k[:m, m:].mean()
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_gradient_mse_is_squared_norm_of_concatenated_mean_difference():
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 3, 3, 3), (4,), (2, 4)]
    real = [torch.randn(1, *s, generator=g, dtype=torch.float64) for s in shapes]
    syn = [torch.randn(1, *s, generator=g, dtype=torch.float64) for s in shapes]
    total = sum(GradientMSEDiscrepancy()(r, s) for r, s in zip(real, syn))
    flat = torch.cat([(r - s).flatten() for r, s in zip(real, syn)])
    torch.testing.assert_close(total, flat.dot(flat))


def _reference_distance_wb(gwr, gws):
    """VICO-UoE utils.py distance_wb, transcribed."""
    shape = gwr.shape
    if len(shape) == 4:
        gwr = gwr.reshape(shape[0], shape[1] * shape[2] * shape[3])
        gws = gws.reshape(shape[0], shape[1] * shape[2] * shape[3])
    elif len(shape) == 3:
        gwr = gwr.reshape(shape[0], shape[1] * shape[2])
        gws = gws.reshape(shape[0], shape[1] * shape[2])
    elif len(shape) == 1:
        return torch.tensor(0, dtype=torch.float)
    return torch.sum(1 - torch.sum(gwr * gws, dim=-1) / (torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1) + 0.000001))


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (6, 4, 2), (10, 7), (6,)])
def test_gradient_cosine_matches_reference_formula(shape):
    g = torch.Generator().manual_seed(2)
    gr, gs = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    value = GradientCosineDiscrepancy()(gr.unsqueeze(0), gs.unsqueeze(0))
    torch.testing.assert_close(value, _reference_distance_wb(gr, gs).to(value.dtype))
    if len(shape) == 1:
        assert value.item() == 0.0


def test_gradient_cosine_is_zero_for_parallel_and_two_for_opposite_rows():
    gr = torch.randn(1, 5, 4)
    assert GradientCosineDiscrepancy()(gr, 3 * gr).item() == pytest.approx(0.0, abs=1e-5)
    assert GradientCosineDiscrepancy()(gr, -gr).item() == pytest.approx(10.0, abs=1e-5)


def test_discrepancies_are_differentiable_wrt_synthetic():
    real, syn = _clouds()
    for name in ("mean_embedding", "mmd2", "gradient_mse"):
        s = syn.clone().requires_grad_(True)
        get_discrepancy(name)(real, s).backward()
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_every_discrepancy_states_its_relation():
    for name in DISCREPANCY_NAMES:
        d = get_discrepancy(name)
        assert d.relation_to_ipm in ("exact IPM", "normalised variant", "approximation / not an IPM")
        assert d.name == name


def test_unknown_discrepancy():
    with pytest.raises(ValueError, match="unknown discrepancy 'kl'.*'mmd2'"):
        get_discrepancy("kl")


def test_old_mmd_spelling_is_mmd2_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'mmd2'"):
        d = get_discrepancy("mmd")
    assert d.name == "mmd2"


def test_options_are_declared_with_defaults_and_build_the_same_discrepancy():
    from ipmcondense.condensation.discrepancies import DISCREPANCIES

    mmd = DISCREPANCIES.get("mmd2").from_config({"bandwidth": 2.0, "estimator": "unbiased", "blur": 9.0})
    assert (mmd.bandwidth, mmd.estimator) == (2.0, "unbiased")
    assert DISCREPANCIES.option_defaults() == {"bandwidth": "median", "estimator": "biased", "blur": 0.05,
                                               "sinkhorn_p": 2, "n_projections": 200,
                                               "barycenter_iterations": 100}


def test_gradient_cosine_is_the_normalised_ipm_by_the_stated_identity():
    # the dc row's `why`: per output row, 1 - cos(a, b) = (IPM^2 - (|a| - |b|)^2) / (2 |a| |b|), IPM = |a - b|
    from ipmcondense.condensation.recipes import get_recipe

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(6, 4, 3, generator=g, dtype=torch.float64), torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    ra, rb = a.reshape(6, -1), b.reshape(6, -1)
    ipm2 = ((ra - rb) ** 2).sum(1)
    na, nb = ra.norm(dim=1), rb.norm(dim=1)
    identity = ((ipm2 - (na - nb) ** 2) / (2 * na * nb)).sum()
    value = GradientCosineDiscrepancy()(a[None], b[None])  # one point each: the class means are a and b
    torch.testing.assert_close(value, identity, rtol=1e-5, atol=1e-6)
    assert "(IPM_r^2 - (|a_r| - |b_r|)^2) / (2 |a_r| |b_r|)" in get_recipe("dc").why


def test_wasserstein_row_uses_p1_and_approaches_w1_at_small_blur():
    from scipy.stats import wasserstein_distance

    from ipmcondense.condensation.matching import build_discrepancy
    from ipmcondense.condensation.recipes import get_recipe, resolve_config

    row = get_recipe("wasserstein")
    disc = build_discrepancy(row, resolve_config(row, "digits", {"blur": 1e-3}))
    assert disc.p == 1 and "W_1" in row.why
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 1, generator=g, dtype=torch.float64)
    syn = 0.5 * torch.randn(30, 1, generator=g, dtype=torch.float64) + 1.0
    w1 = wasserstein_distance(real[:, 0].numpy(), syn[:, 0].numpy())
    disc.scaling = 0.99  # a slow eps-annealing converges; the row keeps geomloss' fast 0.5 (1.126 vs 1.206 here)
    assert float(disc(real, syn)) == pytest.approx(w1, rel=1e-2)
    # the old p=2 default measures W_2^2 / 2, a different number here
    p2 = build_discrepancy(row, resolve_config(row, "digits", {"blur": 1e-3, "sinkhorn_p": 2}))
    p2.scaling = 0.99
    assert abs(float(p2(real, syn)) - w1) > 0.1 * w1


def test_m3d_bandwidth_is_the_median_pairwise_distance_of_the_pooled_class_batch():
    # m3d's `why`: biased Gaussian MMD^2, bandwidth = median heuristic of the pooled real + synthetic batch
    import numpy as np
    from scipy.spatial.distance import pdist

    from ipmcondense.condensation.matching import build_discrepancy
    from ipmcondense.condensation.recipes import get_recipe, resolve_config

    row = get_recipe("m3d")
    disc = build_discrepancy(row, resolve_config(row, "digits"))
    real, syn = _clouds(n=9, m=4, d=6, seed=2)
    z = torch.cat([syn, real]).numpy()
    h = float(np.median(pdist(z)))
    k = lambda a, b: np.exp(-((a[:, None, :] - b[None]) ** 2).sum(-1) / (2 * h * h))  # noqa: E731
    s, r = syn.numpy(), real.numpy()
    expected = k(s, s).mean() + k(r, r).mean() - 2 * k(s, r).mean()
    assert float(disc(real, syn)) == pytest.approx(expected, rel=1e-10)
    assert "median-heuristic bandwidth of the pooled class batch" in row.why
