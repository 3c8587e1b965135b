"""Dataset-level distances: input kinds, class-conditional aggregation, the label-aware OT distance."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ipmcondense.ipm.dataset_distance import distance, otdd
from ipmcondense.ipm.mmd import mmd
from ipmcondense.ipm.wasserstein import wasserstein


def _labelled(n=36, d=3, classes=3, seed=0, shift=0.0):
    """Class c ~ N(2 c e_1 + shift, I): well separated class-conditionals."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, 0] += 2.0 * labels + shift
    return x, labels


class _PairDataset(Dataset):
    def __init__(self, x, labels):
        self.x, self.labels = x, labels

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i].numpy(), int(self.labels[i])


@pytest.mark.parametrize("metric", ["mmd", "energy", "wasserstein", "sinkhorn", "sliced", "mean_embedding"])
def test_dataset_against_itself_is_zero_pooled_and_class_conditional(metric):
    x, labels = _labelled()
    assert distance(x, x, metric).item() == pytest.approx(0.0, abs=1e-6)
    assert distance(x, x, metric, labels, labels).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("outer", ["sinkhorn", "exact"])
def test_otdd_of_a_dataset_with_itself_is_zero(outer):
    x, labels = _labelled()
    assert distance(x, x, "otdd", labels, labels, outer=outer).item() == pytest.approx(0.0, abs=1e-5)
    # the same holds with different sizes per class and a subsample (same seed on both sides)
    x2, labels2 = _labelled(n=50, seed=1)
    value = distance(x2, x2, "otdd", labels2, labels2, outer=outer, max_samples=30, seed=4)
    assert value.item() == pytest.approx(0.0, abs=1e-5)


def test_otdd_is_scale_equivariant_with_the_default_relative_blur():
    x, lx = _labelled(n=20, seed=0)
    y, ly = _labelled(n=16, seed=1, shift=0.5)
    base = distance(x, y, "otdd", lx, ly).item()
    assert distance(3 * x, 3 * y, "otdd", lx, ly).item() == pytest.approx(3 * base, rel=1e-6)


def test_pooled_matches_the_functional_metric():
    x, _ = _labelled(seed=0)
    y, _ = _labelled(n=30, seed=1, shift=0.5)
    assert distance(x, y, "mmd", bandwidth=1.5).item() == pytest.approx(mmd(x, y, bandwidth=1.5).item(), rel=1e-12)
    assert distance(x, y, "wasserstein", p=2).item() == pytest.approx(wasserstein(x, y, p=2).item(), rel=1e-12)


def test_class_conditional_is_the_proportion_weighted_sum():
    x, lx = _labelled(n=36, seed=0)
    y, ly = _labelled(n=30, seed=1, shift=0.5)
    ly = ly.clone()
    ly[:4] = 0  # unequal class proportions in b
    expected = 0.0
    for c in range(3):
        weight = 0.5 * ((lx == c).double().mean() + (ly == c).double().mean())
        expected += weight * mmd(x[lx == c], y[ly == c], bandwidth=1.0)
    value = distance(x, y, "mmd", lx, ly, bandwidth=1.0)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    # class_conditional=False ignores the labels
    pooled = distance(x, y, "mmd", lx, ly, class_conditional=False, bandwidth=1.0)
    assert pooled.item() == pytest.approx(mmd(x, y, bandwidth=1.0).item(), rel=1e-12)


def test_otdd_is_symmetric():
    x, lx = _labelled(n=24, seed=0)
    y, ly = _labelled(n=18, seed=1, shift=0.7)
    for outer in ("sinkhorn", "exact"):
        forward = distance(x, y, "otdd", lx, ly, outer=outer)
        backward = distance(y, x, "otdd", ly, lx, outer=outer)
        assert forward.item() == pytest.approx(backward.item(), rel=1e-6)
        assert forward.item() > 0


def test_otdd_is_invariant_to_renaming_classes():
    x, lx = _labelled(n=24, seed=0)
    y, ly = _labelled(n=18, seed=1, shift=0.7)
    base = distance(x, y, "otdd", lx, ly).item()
    rename = torch.tensor([7, 2, 5])
    assert distance(x, y, "otdd", rename[lx], rename[ly]).item() == pytest.approx(base, rel=1e-9)
    # labels are compared through the distributions they name: renaming one side only changes nothing
    other = torch.tensor([1, 0, 2])
    assert distance(x, y, "otdd", lx, other[ly]).item() == pytest.approx(base, rel=1e-9)


def test_otdd_grows_when_labels_are_shuffled():
    x, lx = _labelled(n=36, seed=0)
    y, ly = _labelled(n=36, seed=1)  # a fresh sample of the same labelled distribution
    shuffled = ly[torch.randperm(36, generator=torch.Generator().manual_seed(0))]
    same_law = distance(x, y, "otdd", lx, ly).item()
    wrong_labels = distance(x, y, "otdd", lx, shuffled).item()
    assert wrong_labels > same_law + 0.5
    # the pooled (label-blind) distance cannot see the difference
    assert distance(x, y, "wasserstein", p=2).item() == distance(x, y, "wasserstein", p=2).item()


def test_otdd_with_one_label_reduces_to_wasserstein():
    x, _ = _labelled(n=20, seed=0)
    y, _ = _labelled(n=15, seed=1, shift=1.0)
    zx, zy = torch.zeros(20, dtype=torch.long), torch.zeros(15, dtype=torch.long)
    w2 = wasserstein(x, y, p=2).item()
    plain = distance(x, y, "otdd", zx, zy, outer="exact", label_weight=0.0).item()
    assert plain == pytest.approx(w2, rel=1e-9)
    # with the label term, the single label distance W_2(a, b) is added to every cost: sqrt(2) W_2
    labelled = distance(x, y, "otdd", zx, zy, outer="exact").item()
    assert labelled == pytest.approx(2**0.5 * w2, rel=1e-9)
    # the debiased Sinkhorn outer problem approaches the exact value for a small blur (geomloss' loop: its
    # averaged symmetric updates need ~2000 iterations at eps = 0.01 here)
    sinkhorn = distance(x, y, "otdd", zx, zy, label_weight=0.0, blur=0.1, max_iterations=2000).item()
    assert sinkhorn == pytest.approx(w2, rel=0.02)


@pytest.mark.parametrize("inner", ["exact", "sinkhorn", "sliced"])
def test_otdd_inner_methods_agree_roughly(inner):
    x, lx = _labelled(n=24, seed=0)
    y, ly = _labelled(n=24, seed=1, shift=0.5)
    exact = distance(x, y, "otdd", lx, ly, inner="exact", outer="exact").item()
    value = distance(x, y, "otdd", lx, ly, inner=inner, outer="exact").item()
    if inner == "sliced":
        assert 0 < value <= exact + 1e-9  # sliced W is a lower bound on every label distance
    else:
        assert value == pytest.approx(exact, rel=0.05)


def test_otdd_handles_different_label_sets_and_is_differentiable():
    x, lx = _labelled(n=24, classes=3, seed=0)
    y, ly = _labelled(n=20, classes=2, seed=1)
    x = x.clone().requires_grad_(True)
    value = distance(x, y, "otdd", lx, ly + 10)
    value.backward()
    assert value.item() > 0 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_numpy_and_dataset_inputs():
    x, labels = _labelled(n=30, seed=0)
    y, ly = _labelled(n=24, seed=1, shift=0.3)
    reference = distance(x, y, "otdd", labels, ly).item()
    from_numpy = distance(x.numpy(), y.numpy(), "otdd", labels.numpy(), ly.numpy()).item()
    assert from_numpy == pytest.approx(reference, rel=1e-9)
    # labels taken from Datasets yielding (x, y) pairs: a custom Dataset and a TensorDataset
    from_datasets = distance(_PairDataset(x, labels), TensorDataset(y, ly), "otdd").item()
    assert from_datasets == pytest.approx(reference, rel=1e-9)
    cc = distance(_PairDataset(x, labels), TensorDataset(y, ly), "energy").item()
    assert cc == pytest.approx(distance(x, y, "energy", labels, ly).item(), rel=1e-9)


def test_feature_map_on_images():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 1, 5, 5, generator=g), torch.randn(10, 1, 5, 5, generator=g) + 0.5
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten())
    with torch.no_grad():
        expected = mmd(conv(x), conv(y), bandwidth=2.0)
        value = distance(x, y, "mmd", feature_map=conv, bandwidth=2.0, feature_batch_size=5)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_subsampling_is_seeded():
    x, lx = _labelled(n=60, seed=0)
    y, ly = _labelled(n=60, seed=1, shift=0.5)
    v1 = distance(x, y, "energy", max_samples=20, seed=3)
    v2 = distance(x, y, "energy", max_samples=20, seed=3)
    v3 = distance(x, y, "energy", max_samples=20, seed=4)
    assert torch.equal(v1, v2) and not torch.equal(v1, v3)
    # a subsample of 60 out of 60 is the whole set
    assert distance(x, y, "energy", max_samples=60).item() == pytest.approx(distance(x, y, "energy").item())


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 4))
def test_otdd_exact_is_a_metric_on_small_sets(seed, classes):
    a, la = _labelled(n=8, classes=classes, seed=seed)
    b, lb = _labelled(n=8, classes=classes, seed=seed + 1, shift=0.4)
    c, lc = _labelled(n=8, classes=classes, seed=seed + 2, shift=-0.4)
    dab = distance(a, b, "otdd", la, lb, outer="exact").item()
    dac = distance(a, c, "otdd", la, lc, outer="exact").item()
    dcb = distance(c, b, "otdd", lc, lb, outer="exact").item()
    assert dab >= 0
    assert dab == pytest.approx(distance(b, a, "otdd", lb, la, outer="exact").item(), rel=1e-9)
    assert dab <= dac + dcb + 1e-9


def test_bad_inputs():
    x, labels = _labelled()
    with pytest.raises(ValueError, match="metric"):
        distance(x, x, "kl")
    with pytest.raises(ValueError, match="same classes.*only in a: \\[2\\]"):
        distance(x, x, "mmd", labels, labels % 2)
    with pytest.raises(ValueError, match="otdd.*labels"):
        distance(x, x, "otdd")
    with pytest.raises(ValueError, match="class_conditional=True needs labels"):
        distance(x, x, "mmd", class_conditional=True)
    with pytest.raises(ValueError, match="labels_a"):
        distance(x, x, "mmd", labels[:5], labels)
    with pytest.raises(ValueError, match="labels_b.*integer"):
        distance(x, x, "mmd", labels, labels + 0.5)
    with pytest.raises(TypeError, match="blur"):
        distance(x, x, "mmd", blur=0.1)
    with pytest.raises(TypeError, match="x_weights"):
        distance(x, x, "energy", x_weights=torch.full((36,), 1 / 36))
    with pytest.raises(TypeError, match="kernel"):
        distance(x, x, "otdd", labels, labels, kernel="gaussian")
    with pytest.raises(ValueError, match="max_samples"):
        distance(x, x, max_samples=0)
    with pytest.raises(ValueError, match="a contains NaN"):
        distance(torch.full((3, 3), float("nan")), x)
    with pytest.raises(ValueError, match="inner"):
        otdd(x, labels, x, labels, inner="gaussian")
    with pytest.raises(ValueError, match="point dimension"):
        distance(x, np.zeros((4, 2)))
