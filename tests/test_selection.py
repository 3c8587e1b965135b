"""Tests of the coreset baselines (ipmcondense.selection)."""

import itertools

import numpy as np
import pytest
import torch

from ipmcondense.data import from_tensors, load_dataset
from ipmcondense.selection import (
    SELECTION_METHODS,
    embed_images,
    herding_indices,
    kcenter_indices,
    select_herding,
    select_kcenter,
    select_random,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _flat(x):
    return x.reshape(x.shape[0], -1)


def _is_row_of(rows, pool):
    """Every row of ``rows`` occurs exactly in ``pool``."""
    return all(bool((pool == r).all(dim=1).any()) for r in rows)


@pytest.mark.parametrize("method", ["random", "herding", "kcenter"])
def test_shapes_class_blocks_real_images_and_determinism(digits, method):
    select = SELECTION_METHODS[method]
    images, labels = select(digits, 3, seed=1)
    assert images.shape == (30, 1, 8, 8) and labels.shape == (30,)
    assert torch.equal(labels, torch.arange(10).repeat_interleave(3))
    for c in range(10):
        block = _flat(images[3 * c : 3 * c + 3])
        pool = _flat(digits.train_images[digits.train_labels == c])
        assert _is_row_of(block, pool)
        assert torch.unique(block, dim=0).shape[0] == 3  # no repeats
    again, _ = select(digits, 3, seed=1)
    assert torch.equal(images, again)


def test_random_depends_on_seed(digits):
    a, _ = select_random(digits, 2, seed=0)
    b, _ = select_random(digits, 2, seed=1)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("method", ["random", "herding", "kcenter"])
def test_ipc_larger_than_class_raises_naming_ipc(digits, method):
    smallest = int(torch.bincount(digits.train_labels).min())
    with pytest.raises(ValueError, match="ipc"):
        SELECTION_METHODS[method](digits, smallest + 1, seed=0)
    with pytest.raises(ValueError, match="ipc"):
        SELECTION_METHODS[method](digits, 0, seed=0)


def test_herding_mean_error_smaller_than_random(digits):
    identity = lambda x: _flat(x)  # noqa: E731 - pixel embedding, checked by brute force below
    ipc = 5
    herd, _ = select_herding(digits, ipc, seed=0, feature_network=identity)

    def mean_error(images):
        errors = []
        for c in range(10):
            class_mean = _flat(digits.train_images[digits.train_labels == c]).double().mean(0)
            subset_mean = _flat(images[ipc * c : ipc * (c + 1)]).double().mean(0)
            errors.append(float(((subset_mean - class_mean) ** 2).sum()))
        return np.mean(errors)

    random_errors = [mean_error(select_random(digits, ipc, seed=s)[0]) for s in range(10)]
    assert mean_error(herd) < 0.5 * np.mean(random_errors)


def test_herding_default_embedding_beats_random_in_its_embedding(digits):
    from ipmcondense.selection import _default_network

    network = _default_network(digits, 0, digits.train_images.device)
    herd, _ = select_herding(digits, 4, seed=0)
    herd_again, _ = select_herding(digits, 4, seed=0, feature_network=network)
    assert torch.equal(herd, herd_again)  # the default network is the seeded ConvNet

    class_means = [
        embed_images(digits.train_images[digits.train_labels == c], network).mean(0) for c in range(10)
    ]

    def mean_error(images):
        features = embed_images(images, network)
        blocks = features.reshape(10, 4, -1).mean(1)
        return sum(float(((blocks[c] - class_means[c]) ** 2).sum()) for c in range(10))

    random_errors = [mean_error(select_random(digits, 4, seed=s)[0]) for s in range(5)]
    assert mean_error(herd) < np.mean(random_errors)


def test_herding_indices_brute_force_greedy():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(12, 3, generator=g, dtype=torch.float64)
    got = herding_indices(features, 4).tolist()
    mean = features.mean(0).numpy()
    chosen = []
    for _ in range(4):
        candidates = [i for i in range(12) if i not in chosen]
        errs = [np.sum((mean - features[chosen + [i]].numpy().mean(0)) ** 2) for i in candidates]
        chosen.append(candidates[int(np.argmin(errs))])
    assert got == chosen


def test_kcenter_picks_farthest_point_hand_made():
    # one class, points on a line: start at 0 -> farthest 10 -> then 5 (distance 5 beats 1 or 9).
    points = torch.tensor([[0.0], [1.0], [5.0], [9.0], [10.0]], dtype=torch.float64)
    assert kcenter_indices(points, 3, first=0).tolist() == [0, 4, 2]
    images = points.reshape(5, 1, 1, 1).float()
    labels = torch.zeros(5, dtype=torch.long)
    dataset = from_tensors("line", images, labels, images, labels, num_classes=1)
    chosen, _ = select_kcenter(dataset, 2, seed=0, feature_network=lambda x: x.reshape(x.shape[0], -1))
    first = float(chosen[0])
    assert float(chosen[1]) == (10.0 if first <= 5.0 else 0.0)  # the farthest from the random start


def test_kcenter_covering_radius_is_within_factor_two_of_optimum():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(9, 2, generator=g, dtype=torch.float64)
    dist = torch.cdist(features, features)
    k = 3

    def radius(centres):
        return float(dist[:, list(centres)].min(dim=1).values.max())

    optimum = min(radius(c) for c in itertools.combinations(range(9), k))
    for first in range(9):
        assert radius(kcenter_indices(features, k, first=first).tolist()) <= 2 * optimum + 1e-12


def test_embed_images_rejects_non_finite():
    with pytest.raises(ValueError, match="NaN"):
        embed_images(torch.zeros(3, 1, 2, 2), lambda x: torch.full((x.shape[0], 2), float("nan")))


def test_kmeans_picks_the_point_nearest_each_cluster_centre():
    from ipmcondense.selection import kmeans_indices

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    points = torch.cat([c + 0.5 * torch.randn(20, 2, generator=g, dtype=torch.float64) for c in centres])
    # three well separated clusters: k-means finds them, and each pick is the row nearest its cluster mean
    chosen = sorted(kmeans_indices(points, 3, seed=0).tolist())
    expected = []
    for k in range(3):
        block = points[20 * k : 20 * k + 20]
        expected.append(20 * k + int(torch.cdist(block.mean(0, keepdim=True), block).argmin()))
    assert chosen == sorted(expected)
    assert len(set(kmeans_indices(points, 60, seed=1).tolist())) == 60  # every centre its own row
    with pytest.raises(ValueError, match="k must be in"):
        kmeans_indices(points, 61)


def test_kmeans_init_is_a_working_choice_of_condense():
    from ipmcondense.condensation.api import condense

    result = condense("dm", "digits", ipc=2, iterations=0, init="kmeans", progress=False, seed=0)
    digits = load_dataset("digits")
    train = digits.train_images.reshape(digits.train_images.shape[0], -1)
    for image, label in zip(result.images, result.labels):
        match = (train == image.reshape(1, -1)).all(dim=1)
        assert bool(match.any()) and int(digits.train_labels[match][0]) == int(label)
