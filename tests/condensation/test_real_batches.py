"""The ``real_batches`` axis: selectors draw class-blocked real batches from the run's generator."""

import pytest
import torch

from ipmcondense.condensation.real_batches import REAL_BATCH_NAMES, RandomRealBatches, build_real_batches


def _data():
    labels = torch.tensor([0, 1, 2] * 5 + [1, 1])
    images = torch.arange(labels.numel(), dtype=torch.float32).reshape(-1, 1, 1, 1)
    return images, labels


def test_random_draws_distinct_images_of_each_class_in_class_blocks():
    images, labels = _data()
    sel = build_real_batches("random", {}, images=images, labels=labels, num_classes=3,
                             generator=torch.Generator().manual_seed(0))
    assert isinstance(sel, RandomRealBatches) and "random" in REAL_BATCH_NAMES
    x, y = sel.sample(3)
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    picked = x.flatten().long()
    assert torch.equal(labels[picked], y) and picked.unique().numel() == 9


def test_same_generator_state_gives_the_same_batches():
    images, labels = _data()
    draws = []
    for _ in range(2):
        sel = build_real_batches("random", {}, images=images, labels=labels, num_classes=3,
                                 generator=torch.Generator().manual_seed(4))
        draws.append([sel.sample(2)[0] for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(*draws))
    assert not torch.equal(draws[0][0], draws[0][1]) or not torch.equal(draws[0][1], draws[0][2])


def test_a_small_class_gives_all_of_its_images_and_unknown_names_are_errors():
    images, labels = _data()
    sel = build_real_batches("random", {}, images=images, labels=labels, num_classes=3,
                             generator=torch.Generator().manual_seed(0))
    x, y = sel.sample(7)
    assert torch.bincount(y).tolist() == [5, 7, 5]
    with pytest.raises(ValueError, match="unknown real-batch selector 'dream'; expected one of: 'random'"):
        build_real_batches("dream", {}, images=images, labels=labels, num_classes=3,
                           generator=torch.Generator())
