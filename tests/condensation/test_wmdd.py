"""WMDD (Liu et al.): the free-support W_2 barycenter, the barycenter discrepancy, the per-class
normalisation-statistics term, the pretrained-teacher sampler and the row (issue 11 item 7)."""

import numpy as np
import ot
import pytest
import torch
from torch import nn

from ipmcondense.condensation.api import condense
from ipmcondense.condensation.discrepancies import BarycenterDiscrepancy
from ipmcondense.condensation.extra_terms import ClassNormStatistics, TeacherCrossEntropy
from ipmcondense.condensation.recipes import APPROXIMATE, get_recipe
from ipmcondense.condensation.samplers import PretrainedSampler, SamplerContext
from ipmcondense.features import segments_from_labels
from ipmcondense.ipm import free_support_barycenter


# ------------------------------------------------------------------------------------------ the barycenter
def test_barycenter_equals_pot_free_support_barycenter():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(60, 4, generator=g, dtype=torch.float64)
    init = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ours = free_support_barycenter(points, 6, init=init)
    reference = ot.lp.free_support_barycenter([points.numpy()], [np.full(60, 1 / 60)], init.numpy(),
                                              b=np.full(6, 1 / 6), numItermax=100, stopThr=1e-12)
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-12)


def test_barycenter_in_one_dimension_is_the_quantile_cell_means():
    # k atoms of n = k * r sorted points: the optimal k-point W_2 quantisation puts atom j at the mean of the
    # j-th block of r consecutive order statistics
    g = torch.Generator().manual_seed(1)
    points = torch.randn(24, 1, generator=g, dtype=torch.float64)
    atoms = free_support_barycenter(points, 4, init=torch.tensor([[-1.0], [-0.3], [0.3], [1.0]], dtype=torch.float64))
    expected = points.flatten().sort().values.reshape(4, 6).mean(dim=1)
    torch.testing.assert_close(atoms.flatten().sort().values, expected, rtol=0, atol=1e-12)


def test_barycenter_with_one_atom_per_point_is_the_measure_and_with_one_atom_its_mean():
    points = torch.randn(7, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    atoms = free_support_barycenter(points, 7, generator=torch.Generator().manual_seed(3))
    order = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    torch.testing.assert_close(order(atoms), order(points), rtol=0, atol=1e-12)
    torch.testing.assert_close(free_support_barycenter(points, 1).flatten(), points.mean(dim=0))
    with pytest.raises(ValueError, match="n_atoms"):
        free_support_barycenter(points, 8)
    with pytest.raises(ValueError, match="init"):
        free_support_barycenter(points, 2, init=torch.zeros(3, 3))


# ------------------------------------------------------------------------------------------ the discrepancy
def test_discrepancy_is_sqrt_m_times_w2_to_the_barycenter():
    g = torch.Generator().manual_seed(4)
    real = torch.randn(40, 5, generator=g, dtype=torch.float64)
    synthetic = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    value = BarycenterDiscrepancy()(real, synthetic, generator=torch.Generator().manual_seed(5))
    atoms = free_support_barycenter(real, 4, generator=torch.Generator().manual_seed(5))
    w2_squared = ot.emd2(np.full(4, 0.25), np.full(4, 0.25), ot.dist(synthetic.detach().numpy(), atoms.numpy()))
    assert float(value.detach()) == pytest.approx(np.sqrt(4 * w2_squared), rel=1e-10)
    value.backward()
    assert synthetic.grad is not None and torch.isfinite(synthetic.grad).all()
    # zero when the synthetic points are the barycenter's atoms, in any order
    on_atoms = atoms[torch.tensor([2, 0, 3, 1])].clone()
    assert float(BarycenterDiscrepancy()(real, on_atoms, generator=torch.Generator().manual_seed(5))) < 1e-12
    with pytest.raises(ValueError, match="batch_real"):
        BarycenterDiscrepancy()(real[:3], synthetic.detach())


# ------------------------------------------------------------------------------------------ the extra terms
class _OneBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean(dim=(2, 3)))


def test_norm_statistics_term_against_numpy_and_zero_when_statistics_agree():
    torch.manual_seed(0)
    net = _OneBatchNorm().eval()
    g = torch.Generator().manual_seed(6)
    real, syn = torch.randn(8, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    real_labels, syn_labels = torch.tensor([0] * 5 + [1] * 3), torch.tensor([0, 0, 1, 1])
    term = ClassNormStatistics(0.5)
    args = (segments_from_labels(real_labels), segments_from_labels(syn_labels))
    value = term(net, real, real_labels, syn, syn_labels, *args)

    with torch.no_grad():
        zr, zs = net.conv(real).numpy(), net.conv(syn).numpy()
    expected = 0.0
    for r_rows, s_rows in ((slice(0, 5), slice(0, 2)), (slice(5, 8), slice(2, 4))):
        mr, ms = zr[r_rows].mean(axis=(0, 2, 3)), zs[s_rows].mean(axis=(0, 2, 3))
        vr, vs = zr[r_rows].var(axis=(0, 2, 3)), zs[s_rows].var(axis=(0, 2, 3))
        expected += (np.linalg.norm(ms - mr) + np.linalg.norm(vs - vr)) / 2
    assert float(value) == pytest.approx(0.5 * expected, rel=1e-5)
    # the same images on both sides: identical statistics, zero loss
    same = term(net, syn, syn_labels, syn, syn_labels, args[1], args[1])
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="normalisation"):
        term(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), real, real_labels, syn, syn_labels, *args)


def test_teacher_cross_entropy_is_the_weighted_mean_cross_entropy():
    net = _OneBatchNorm().eval()
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 0, 1, 1])
    value = TeacherCrossEntropy(2.0)(net, x, y, x, y, [], [])
    assert float(value) == pytest.approx(2.0 * float(nn.functional.cross_entropy(net(x), y)), rel=1e-6)


# ------------------------------------------------------------------------------------------ sampler and row
class _Batches:
    def __init__(self, digits):
        self.x, self.y = digits.train_images, digits.train_labels

    def sample(self, n):
        idx = torch.cat([torch.nonzero(self.y == c).flatten()[:n] for c in range(10)])
        return self.x[idx], self.y[idx]


def test_pretrained_sampler_trains_once_and_keeps_the_network(digits):
    from ipmcondense.nets import get_network

    ctx = SamplerContext(build_network=lambda: get_network("mlp", 1, 10, (8, 8)), device=torch.device("cpu"),
                         generator=torch.Generator().manual_seed(0), real_batches=_Batches(digits),
                         augmentation=None, synthetic=lambda: None, parameter_gradients=False)
    sampler = PretrainedSampler(pretrain_steps=60, lr_pretrain=0.05, batch_pretrain=5)
    first = sampler.draw(ctx)[0]
    state = torch.get_rng_state()
    assert sampler.draw(ctx)[0] is first and not first.training
    assert not any(p.requires_grad for p in first.parameters())
    accuracy = (first(digits.test_images).argmax(1) == digits.test_labels).float().mean()
    assert float(accuracy) > 0.5  # trained (chance is 0.1)
    other = PretrainedSampler(pretrain_steps=60, lr_pretrain=0.05, batch_pretrain=5)
    other.load_state_dict(sampler.state_dict(), ctx)
    torch.testing.assert_close(other.draw(ctx)[0](digits.test_images), first(digits.test_images))
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="pretrain_steps"):
        PretrainedSampler(pretrain_steps=-1)


def test_row_composes_the_components_and_decreases_its_loss():
    row = get_recipe("wmdd")
    assert (row.feature_map, row.discrepancy, row.sampler) == ("embedding", "w2_barycenter", "pretrained")
    assert row.extra_terms == ("class_norm_statistics", "teacher_ce") and row.relation_to_ipm == APPROXIMATE
    assert row.defaults["init"] == "noise" and row.defaults["lr_images"] == 0.25
    result = condense("wmdd", "digits", ipc=2, iterations=6, progress=False, pretrain_steps=20, batch_real=8)
    losses = result.metrics["loss_history"]
    assert losses[-1] < losses[0]
