"""The ``real_batches`` axis: selectors draw class-blocked real batches from the run's generator."""

import pytest
import torch
from torch import nn

from ipmcondense.condensation.real_batches import (
    REAL_BATCH_NAMES,
    DreamRealBatches,
    RandomRealBatches,
    build_real_batches,
    kmeans_representatives,
)


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
    with pytest.raises(ValueError, match="unknown real-batch selector 'kmedoids'; expected one of: 'random', 'dream'"):
        build_real_batches("kmedoids", {}, images=images, labels=labels, num_classes=3,
                           generator=torch.Generator())


# ---------------------------------------------------------------------------------------- dream
def _clusters(centres, spread=0.1):
    """Around each centre: the centre itself and the 4 points centre +- spread e_i (their mean is the centre)."""
    points = []
    for c in centres:
        c = torch.tensor(c, dtype=torch.float32)
        points += [c + spread * s * e for e in torch.eye(2) for s in (1.0, -1.0)] + [c]
    return torch.stack(points)  # centre of cluster j at index 5 j + 4


def test_kmeans_representatives_are_the_points_nearest_to_the_centres_on_a_known_toy():
    x = _clusters([(0.0, 0.0), (5.0, 0.0), (0.0, 5.0)])
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(0))
    picks = kmeans_representatives(x[perm], 3, seed=1)
    assert sorted(perm[picks].tolist()) == [4, 9, 14]


class _Flatten(nn.Module):
    """A 'network' whose embedding is the pixels, counting its calls."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale, self.calls = scale, 0

    def embed(self, x):
        self.calls += 1
        return self.scale * x.flatten(1)


def _dream_data():
    # class 0: three clusters of 5 (centres at 5 j + 4); class 1: the same, shifted; class 2: two images only
    x0 = _clusters([(0.0, 0.0), (5.0, 0.0), (0.0, 5.0)])
    x1 = _clusters([(20.0, 0.0), (25.0, 0.0), (20.0, 5.0)])
    x2 = torch.tensor([[50.0, 50.0], [60.0, 60.0]])
    images = torch.cat([x0, x1, x2]).reshape(-1, 1, 1, 2)
    labels = torch.tensor([0] * 15 + [1] * 15 + [2] * 2)
    return images, labels


def test_dream_batch_is_the_images_nearest_to_each_class_centres_refreshed_every_interval():
    images, labels = _dream_data()
    sel = build_real_batches("dream", {"dream_interval": 2}, images=images, labels=labels, num_classes=3,
                             generator=torch.Generator().manual_seed(0))
    assert isinstance(sel, DreamRealBatches) and "dream" in REAL_BATCH_NAMES
    net = _Flatten()
    sel.observe([net])
    with pytest.warns(UserWarning, match="class 2 has 2 training images.*batch_real"):
        x, y = sel.sample(3)
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    flat = images.flatten(1)
    picked = [int(torch.nonzero((flat == row).all(1))[0]) for row in x.flatten(1)]
    assert sorted(picked[:3]) == [4, 9, 14] and sorted(picked[3:6]) == [19, 24, 29]
    assert sorted(picked[6:]) == [30, 31]  # the small class falls back to all of its images
    calls = net.calls
    x_again, _ = sel.sample(3)  # within the interval: the same batch, no new query
    assert torch.equal(x_again, x) and net.calls == calls
    sel.sample(3)  # the interval has passed: a new query with the current network
    assert net.calls > calls


def test_dream_without_a_network_draws_uniformly_and_trains_on_uniform_batches():
    images, labels = _dream_data()
    kwargs = {"images": images, "labels": labels, "num_classes": 3}
    dream = build_real_batches("dream", {}, generator=torch.Generator().manual_seed(0), **kwargs)
    uniform = build_real_batches("random", {}, generator=torch.Generator().manual_seed(0), **kwargs)
    for a, b in zip(dream.sample(2), uniform.sample(2)):  # no network observed yet: the random draw
        assert torch.equal(a, b)
    net = _Flatten()
    dream.observe([net])
    for a, b in zip(dream.sample_for_training(4), uniform.sample(4)):  # training batches stay uniform
        assert torch.equal(a, b)
    assert net.calls == 0


def test_dream_state_round_trips_and_bad_options_name_the_option():
    images, labels = _dream_data()
    kwargs = {"images": images, "labels": labels, "num_classes": 3}
    a = build_real_batches("dream", {}, generator=torch.Generator().manual_seed(0), **kwargs)
    a.observe([_Flatten()])
    with pytest.warns(UserWarning):
        first = a.sample(3)
    b = build_real_batches("dream", {}, generator=torch.Generator().manual_seed(5), **kwargs)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(b.sample(3), first))
    for key, value in (("dream_interval", 0), ("dream_max_iter", -1), ("dream_interval", 2.5)):
        with pytest.raises(ValueError, match=key):
            build_real_batches("dream", {key: value}, generator=torch.Generator(), **kwargs)


def test_dm_with_dream_batches_resumes_bit_for_bit(tmp_path):
    from ipmcondense.condensation.api import condense

    kwargs = {"ipc": 1, "seed": 3, "progress": False, "batch_real": 8, "checkpoint_every": 1,
              "real_batches": "dream", "dream_interval": 2}
    straight = condense("dm", "digits", iterations=3, out=tmp_path / "a", **kwargs)
    condense("dm", "digits", iterations=1, out=tmp_path / "b", **kwargs)
    resumed = condense("dm", "digits", iterations=3, out=tmp_path / "b", resume=True, **kwargs)
    assert straight.config["recipe"]["real_batches"] == "dream"
    assert torch.equal(straight.images, resumed.images)
    assert straight.metrics["loss_history"] == resumed.metrics["loss_history"]
