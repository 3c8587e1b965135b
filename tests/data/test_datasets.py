"""Tests of dataset loading (digits, MNIST from the raw files, a CIFAR-10-layout folder), of
user tensors, and of the class-balanced sampler."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ipmcondense.data import (
    DATASET_NAMES,
    DIGITS_MEAN,
    DIGITS_STD,
    NORMALISATION,
    ClassBalancedSampler,
    DatasetNotFoundError,
    from_tensors,
    load_dataset,
)

SHARED_DATA = Path(os.environ.get("IPMCONDENSE_TEST_DATA", "/work/shared/data"))


def _copy_raw(tmp_path_factory, folder: str) -> Path:
    source = SHARED_DATA / folder / "raw"
    if not source.is_dir() or len(list(source.glob("*.gz"))) != 4:
        pytest.skip(f"raw {folder} files not available under {SHARED_DATA}")
    root = tmp_path_factory.mktemp(folder.lower())
    shutil.copytree(source, root / folder / "raw")
    return root


def _load_offline(name: str, root: Path):
    """download=True only extracts: the md5s of the copied files match, so no URL is opened."""

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to use the network")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("urllib.request.urlopen", no_network)
        return load_dataset(name, root, download=True)


@pytest.fixture(scope="session")
def mnist(tmp_path_factory):
    return _load_offline("mnist", _copy_raw(tmp_path_factory, "MNIST"))


# ---------------------------------------------------------------- digits


def test_digits_split_is_fixed_stratified_and_normalised():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_dataset("digits")
    assert data.train_images.shape == (1437, 1, 8, 8) and data.test_images.shape == (360, 1, 8, 8)
    assert data.train_images.dtype == torch.float32 and data.train_labels.dtype == torch.int64
    assert data.num_classes == 10 and data.class_names == tuple(str(i) for i in range(10))
    assert data.channels == 1 and data.image_size == (8, 8) and data.is_digits_like
    # Independent recomputation of the documented split and statistics with NumPy.
    bunch = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.images / 16.0, bunch.target, test_size=0.2, stratify=bunch.target, random_state=0
    )
    assert DIGITS_MEAN[0] == pytest.approx(x_train.mean(), abs=1e-7)
    assert DIGITS_STD[0] == pytest.approx(x_train.std(), abs=1e-7)
    np.testing.assert_array_equal(data.train_labels.numpy(), y_train)
    np.testing.assert_array_equal(data.test_labels.numpy(), y_test)
    np.testing.assert_allclose(data.denormalise(data.test_images)[:, 0].numpy(), x_test, atol=1e-6)
    # Stratified: every class keeps about a fifth of its images in the test split.
    full = np.bincount(bunch.target)
    test_counts = np.bincount(data.test_labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * full) <= 1)
    assert float(data.train_images.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(data.train_images.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)


def test_digits_loading_is_deterministic():
    a, b = load_dataset("digits"), load_dataset("DIGITS")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)


# ---------------------------------------------------------------- MNIST (real files, offline)


def test_mnist_shapes_labels_and_normalisation(mnist):
    assert mnist.name == "mnist" and mnist.num_classes == 10 and mnist.is_digits_like
    assert mnist.train_images.shape == (60000, 1, 28, 28)
    assert mnist.test_images.shape == (10000, 1, 28, 28)
    assert mnist.train_labels.dtype == torch.int64
    counts = torch.bincount(mnist.train_labels, minlength=10)
    assert counts[0] == 5923 and counts.sum() == 60000
    assert torch.bincount(mnist.test_labels, minlength=10)[0] == 980
    assert int(mnist.train_labels[0]) == 5  # the first MNIST training digit is a 5
    assert mnist.mean == (0.1307,) and mnist.std == (0.3081,)
    assert float(mnist.train_images.mean()) == pytest.approx(0.0, abs=2e-3)
    assert float(mnist.train_images.std()) == pytest.approx(1.0, abs=2e-3)


def test_mnist_denormalise_recovers_8bit_pixels(mnist):
    pixels = mnist.denormalise(mnist.train_images[:16]) * 255
    assert float(pixels.min()) == pytest.approx(0.0, abs=1e-3)
    assert float(pixels.max()) == pytest.approx(255.0, abs=1e-3)
    torch.testing.assert_close(pixels, pixels.round(), atol=2e-3, rtol=0)


def test_mnist_compressed_only_is_read_without_download(tmp_path_factory, mnist):
    root = _copy_raw(tmp_path_factory, "MNIST")
    data = load_dataset("mnist", root)
    assert torch.equal(data.test_images, mnist.test_images) and torch.equal(data.train_labels, mnist.train_labels)
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == sorted(
        p.name for p in (SHARED_DATA / "MNIST" / "raw").iterdir()
    )  # nothing extracted next to the files


@pytest.mark.slow
def test_fashion_mnist_from_raw_files(tmp_path_factory):
    data = _load_offline("fashion-mnist", _copy_raw(tmp_path_factory, "FashionMNIST"))
    assert data.train_images.shape == (60000, 1, 28, 28)
    assert data.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    assert not data.is_digits_like and data.class_names[0] == "T-shirt/top"
    assert float(data.train_images.mean()) == pytest.approx(0.0, abs=2e-3)
    assert float(data.train_images.std()) == pytest.approx(1.0, abs=3e-3)


# ---------------------------------------------------------------- CIFAR-10 (no real files offline)


def _write_fake_cifar10(root: Path, per_batch: int) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return written


def test_cifar10_from_a_torchvision_layout_folder(tmp_path, monkeypatch):
    # Same layout and format as the real files; only the md5 check is bypassed.
    written = _write_fake_cifar10(tmp_path, per_batch=4)
    monkeypatch.setattr("torchvision.datasets.cifar.CIFAR10._check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    data = load_dataset("cifar10", tmp_path)
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (4, 3, 32, 32)
    assert data.channels == 3 and data.image_size == (32, 32) and not data.is_digits_like
    assert data.class_names == tuple(f"class{i}" for i in range(10))
    raw, labels = written["test_batch"]
    assert data.test_labels.tolist() == labels
    # Row layout of the pickles is (C=3, H=32, W=32) per image: red plane first.
    mean, std = NORMALISATION["cifar10"]
    mean_, std_ = np.array(mean)[:, None, None], np.array(std)[:, None, None]
    expected = (raw.reshape(4, 3, 32, 32) / 255.0 - mean_) / std_
    np.testing.assert_allclose(data.test_images.numpy(), expected, rtol=1e-5, atol=1e-5)
    first_train = written["data_batch_1"][0][0].reshape(3, 32, 32)
    np.testing.assert_allclose(
        data.denormalise(data.train_images[0]).numpy() * 255, first_train, atol=1e-3
    )


def test_cifar10_shaped_user_tensors_via_from_tensors():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(50, 3, 32, 32, generator=generator)
    test = torch.randn(20, 3, 32, 32, generator=generator)
    train_labels, test_labels = torch.arange(50) % 10, torch.arange(20) % 10
    mean, std = NORMALISATION["cifar10"]
    data = from_tensors("cifar10", train, train_labels, test, test_labels, mean=mean, std=std)
    assert data.num_classes == 10 and data.channels == 3 and data.image_size == (32, 32)
    assert data.train_images is train  # no copy
    assert not data.is_digits_like
    pixels = data.denormalise(train)
    torch.testing.assert_close(pixels[:, 1], train[:, 1] * std[1] + mean[1])
    assert "tensor" not in repr(data)  # the repr does not print the images


def test_from_tensors_defaults_and_validation():
    x, y = torch.zeros(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    data = from_tensors("svhn", x, y, x, y)
    assert data.num_classes == 3 and data.mean == (0.0,) and data.std == (1.0,)
    assert data.is_digits_like and data.class_names == ("0", "1", "2")
    torch.testing.assert_close(data.denormalise(x + 1), x + 1)
    assert from_tensors("mine", x, y, x, y, num_classes=5).num_classes == 5
    with pytest.raises(ValueError, match="train_labels"):
        from_tensors("mine", x, y[:5], x, y)
    with pytest.raises(ValueError, match="test_labels"):
        from_tensors("mine", x, y, x, y + 3, num_classes=3)
    with pytest.raises(ValueError, match="train_images"):
        from_tensors("mine", torch.full_like(x, float("nan")), y, x, y)
    with pytest.raises(ValueError, match="train_images"):
        from_tensors("mine", x[:, 0], y, x, y)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        from_tensors("mine", x, y, torch.zeros(6, 3, 4, 4), y)
    with pytest.raises(TypeError, match="train_labels"):
        from_tensors("mine", x, y.float(), x, y)
    with pytest.raises(ValueError, match="std"):
        from_tensors("mine", x, y, x, y, std=(0.0,))
    with pytest.raises(ValueError, match="mean"):
        from_tensors("mine", x, y, x, y, mean=(0.1, 0.2))


def test_denormalise_rejects_wrong_channels():
    data = load_dataset("digits")
    with pytest.raises(ValueError, match="images"):
        data.denormalise(torch.zeros(2, 3, 8, 8))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist", "fashion-mnist"])
def test_missing_root_error_names_root_dataset_and_remedy(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and repr(name) in message
    assert "--data-root" in message and "--download" not in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_no_root_error():
    with pytest.raises(DatasetNotFoundError, match="no root was given.*download=True"):
        load_dataset("cifar10")


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="cifar100") as info:
        load_dataset("imagenet")
    assert all(name in str(info.value) for name in DATASET_NAMES)


# ---------------------------------------------------------------- sampler


def _indexed_set(counts):
    """Images whose single pixel is their own index, so a draw can be traced back to its source."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1)
    return images, labels


def test_sample_is_class_blocked_with_matching_labels():
    images, labels = _indexed_set([7, 9, 8, 10])
    sampler = ClassBalancedSampler(images, labels, 4, generator=torch.Generator().manual_seed(0))
    batch, batch_labels = sampler.sample(5)
    assert batch.shape == (20, 1, 1, 1) and batch_labels.dtype == torch.int64
    assert batch_labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    source = batch.view(-1).long()
    assert torch.equal(labels[source], batch_labels)  # every image really has its label
    for c in range(4):
        block = source[batch_labels == c]
        assert len(set(block.tolist())) == 5  # without replacement


def test_small_class_is_capped_not_repeated():
    images, labels = _indexed_set([2, 6])
    sampler = ClassBalancedSampler(images, labels, 2, generator=torch.Generator().manual_seed(0))
    assert sampler.class_counts == (2, 6)
    batch, batch_labels = sampler.sample(4)
    assert batch_labels.tolist() == [0, 0, 1, 1, 1, 1]
    drawn = sorted(batch[:2].view(-1).long().tolist())
    assert drawn == sorted(sampler.indices_of_class(0).tolist())
    assert sampler.sample_class(0, 10).shape == (2, 1, 1, 1)


def test_sampling_is_deterministic_under_a_seeded_generator():
    images, labels = _indexed_set([20, 20, 20])

    def draws(seed):
        generator = torch.Generator().manual_seed(seed)
        sampler = ClassBalancedSampler(images, labels, 3, generator=generator)
        return [sampler.sample(4)[0] for _ in range(3)] + [sampler.sample_class(1, 5)]

    first, again, other = draws(11), draws(11), draws(12)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert not torch.equal(first[0], first[1])  # successive draws differ


def test_every_image_of_a_class_can_be_drawn():
    images, labels = _indexed_set([5, 5])
    sampler = ClassBalancedSampler(images, labels, 2, generator=torch.Generator().manual_seed(0))
    seen = {int(sampler.sample_class(1, 1)) for _ in range(200)}
    assert seen == set(sampler.indices_of_class(1).tolist())


def test_images_of_class_and_counts_on_digits():
    data = load_dataset("digits")
    sampler = ClassBalancedSampler(data.train_images, data.train_labels, 10)
    assert sampler.class_counts == tuple(torch.bincount(data.train_labels).tolist())
    sevens = sampler.images_of_class(7)
    torch.testing.assert_close(sevens, data.train_images[data.train_labels == 7])
    batch, batch_labels = sampler.sample(10)
    assert batch.shape == (100, 1, 8, 8) and batch.device == data.train_images.device
    assert batch_labels.tolist() == sum(([c] * 10 for c in range(10)), [])


def test_sampler_validation():
    images, labels = _indexed_set([3, 3])
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        ClassBalancedSampler(images, labels, 3)
    with pytest.raises(ValueError, match="labels"):
        ClassBalancedSampler(images, labels[:-1], 2)
    with pytest.raises(ValueError, match="labels must lie"):
        ClassBalancedSampler(images, labels + 1, 2)
    with pytest.raises(TypeError, match="labels"):
        ClassBalancedSampler(images, labels.float(), 2)
    with pytest.raises(TypeError, match="generator"):
        ClassBalancedSampler(images, labels, 2, generator=0)
    sampler = ClassBalancedSampler(images, labels, 2)
    with pytest.raises(ValueError, match="n_per_class"):
        sampler.sample(0)
    with pytest.raises(ValueError, match="class c"):
        sampler.sample_class(2, 1)
    with pytest.raises(ValueError, match="class c"):
        sampler.images_of_class(-1)
