"""The user's own data: the publisher's MNIST files as shipped (read-only), image folders, .npz/.pt
arrays, resizing, and the errors for each way such data can be wrong."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from ipmcondense.data import DatasetNotFoundError, load_dataset
from ipmcondense.data.files import load_array_file, load_image_folder, resize_images

SHARED_DATA = Path(os.environ.get("IPMCONDENSE_TEST_DATA", "/work/shared/data"))


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def _raw_copy(tmp_path: Path, folder: str = "MNIST") -> Path:
    source = SHARED_DATA / folder / "raw"
    if not source.is_dir() or len(list(source.glob("*.gz"))) != 4:
        pytest.skip(f"raw {folder} files not available under {SHARED_DATA}")
    shutil.copytree(source, tmp_path / folder / "raw")
    return tmp_path


def _make_read_only(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        path.chmod(stat.S_IRUSR | (stat.S_IXUSR if path.is_dir() else 0))
    root.chmod(stat.S_IRUSR | stat.S_IXUSR)


def _restore(root: Path) -> None:
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


# ---------------------------------------------------------------- MNIST as the publisher ships it


def test_mnist_gz_files_are_read_in_place_from_a_read_only_root(tmp_path):
    root = _raw_copy(tmp_path)
    before = _listing(root)
    _make_read_only(root)
    try:
        data = load_dataset("mnist", root)  # no flag, no download, nothing written
    finally:
        _restore(root)
    assert _listing(root) == before
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert int(data.train_labels[0]) == 5 and torch.bincount(data.test_labels)[0] == 980
    assert data.class_names[0] == "0 - zero" and data.mean == (0.1307,)
    # the bytes of the first test image, straight from the compressed file
    with gzip.open(root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", "rb") as f:
        first = np.frombuffer(f.read(16 + 784), dtype=np.uint8)[16:].reshape(28, 28)
    pixels = data.denormalise(data.test_images[0])[0] * 255
    np.testing.assert_allclose(pixels.numpy(), first, atol=2e-3)


def test_mnist_found_from_the_raw_folder_and_from_extracted_files(tmp_path):
    root = _raw_copy(tmp_path)
    raw = root / "MNIST" / "raw"
    for name in ("t10k-labels-idx1-ubyte", "train-labels-idx1-ubyte"):  # torchvision's extracted form
        with gzip.open(raw / f"{name}.gz", "rb") as src:
            (raw / name).write_bytes(src.read())
        (raw / f"{name}.gz").unlink()
    data = load_dataset("mnist", raw)  # the raw folder itself as root
    assert data.train_labels.shape == (60000,) and int(data.train_labels[0]) == 5


def test_damaged_gz_names_the_file_and_the_checksum(tmp_path):
    root = _raw_copy(tmp_path)
    target = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*MD5"):
        load_dataset("mnist", root)


def test_a_missing_file_is_listed(tmp_path):
    root = _raw_copy(tmp_path)
    (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", root)


def test_missing_dataset_errors_name_only_real_options(tmp_path):
    from ipmcondense.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("mnist", "fashion-mnist", "cifar10", "svhn"):
        with pytest.raises(DatasetNotFoundError) as info:
            load_dataset(name, tmp_path)
        message = str(info.value)
        assert "--download" not in message and "--data-root" in message
        for command in ("condense", "evaluate", "experts", "distance"):
            assert "--data-root" in commands[command]._option_string_actions


# ---------------------------------------------------------------- image folders


def _write_folder(root: Path, counts: dict[str, int], size=(6, 6), mode="L", seed=0) -> dict[str, list]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        written[name] = []
        for i in range(n):
            shape = size if mode == "L" else (*size, 3)
            array = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(array, mode=mode).save(root / name / f"img{i}.png")
            written[name].append(array)
    return written


def test_image_folder_seeded_stratified_split_and_normalisation(tmp_path):
    written = _write_folder(tmp_path / "shapes", {"circle": 5, "square": 10, "triangle": 6})
    (tmp_path / "shapes" / "circle" / "notes.txt").write_text("not an image, ignored")
    data = load_dataset(f"imagefolder:{tmp_path / 'shapes'}")
    assert data.class_names == ("circle", "square", "triangle") and data.num_classes == 3
    assert data.channels == 1 and data.image_size == (6, 6)
    assert torch.bincount(data.test_labels).tolist() == [1, 2, 1]  # round(0.2 n) per class
    assert torch.bincount(data.train_labels).tolist() == [4, 8, 5]
    assert float(data.train_images.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(data.train_images.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    # every original image comes back exactly (in pixel scale), in the split it was assigned to
    pixels = torch.cat([data.denormalise(data.train_images), data.denormalise(data.test_images)]) * 255
    expected = sorted(a.tobytes() for arrays in written.values() for a in arrays)
    got = sorted(p[0].round().to(torch.uint8).numpy().tobytes() for p in pixels)
    assert got == expected
    # the name loads the same dataset again; the split is seeded
    again = load_dataset(data.name)
    assert data.name == f"imagefolder:{(tmp_path / 'shapes').resolve()}"
    assert torch.equal(again.test_images, data.test_images) and torch.equal(again.train_labels, data.train_labels)
    other = load_image_folder(tmp_path / "shapes", split_seed=1)
    assert not torch.equal(other.test_images, data.test_images)


def test_image_folder_split_by_train_and_test_folders_in_colour(tmp_path):
    _write_folder(tmp_path / "set" / "train", {"a": 3, "b": 2}, size=(5, 7), mode="RGB")
    _write_folder(tmp_path / "set" / "test", {"b": 2}, size=(5, 7), mode="RGB", seed=1)
    data = load_dataset(f"imagefolder:{tmp_path / 'set'}")
    assert data.train_images.shape == (5, 3, 5, 7) and data.test_images.shape == (2, 3, 5, 7)
    assert data.test_labels.tolist() == [1, 1] and data.class_names == ("a", "b")
    _write_folder(tmp_path / "set" / "test", {"zebra": 1}, size=(5, 7), mode="RGB")
    with pytest.raises(ValueError, match="zebra"):
        load_dataset(f"imagefolder:{tmp_path / 'set'}")


def test_image_folder_of_mixed_sizes_needs_and_obeys_image_size(tmp_path):
    _write_folder(tmp_path / "f", {"a": 3}, size=(6, 6))
    _write_folder(tmp_path / "f", {"b": 3}, size=(12, 8), seed=1)
    with pytest.raises(ValueError, match="--image-size"):
        load_dataset(f"imagefolder:{tmp_path / 'f'}")
    data = load_dataset(f"imagefolder:{tmp_path / 'f'}", image_size=4)
    assert data.image_size == (4, 4) and data.train_images.shape[1] == 1
    with pytest.raises(ValueError, match="image_size"):
        load_dataset(f"imagefolder:{tmp_path / 'f'}", image_size=0)


def test_resize_covers_then_centre_crops():
    x = torch.arange(2 * 1 * 4 * 8, dtype=torch.float32).view(2, 1, 4, 8)
    assert resize_images(x, (4, 8)) is x
    out = resize_images(x, (2, 2))
    assert out.shape == (2, 1, 2, 2)
    # covering scale 1/2: (2, 4) then the central 2 columns; a constant image stays constant
    const = torch.full((1, 3, 10, 6), 0.25)
    torch.testing.assert_close(resize_images(const, (3, 3)), torch.full((1, 3, 3, 3), 0.25))


@pytest.mark.parametrize(
    "problem, match",
    [
        ("empty_class", r"class folder .*/empty' is empty"),
        ("single_class", "single class"),
        ("unreadable", r"cannot read image .*broken\.png"),
        ("mixed_channels", r"mixed channel counts"),
        ("no_classes", "no class sub-folders"),
    ],
)
def test_image_folder_errors(tmp_path, problem, match):
    root = tmp_path / "data"
    _write_folder(root, {"a": 3} if problem == "single_class" else {"a": 3, "b": 3})
    if problem == "empty_class":
        (root / "empty").mkdir()
    elif problem == "unreadable":
        (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    elif problem == "mixed_channels":
        _write_folder(root, {"c": 2}, mode="RGB")
    elif problem == "no_classes":
        shutil.rmtree(root)
        root.mkdir()
    with pytest.raises(ValueError, match=match):
        load_dataset(f"imagefolder:{root}")


def test_missing_folder_and_plain_folder_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="imagefolder:"):
        load_dataset(str(tmp_path))


# ---------------------------------------------------------------- .npz / .pt arrays


def test_npz_with_x_and_y_uint8(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 5, 5), dtype=np.uint8)
    y = np.arange(30) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_dataset(str(tmp_path / "d.npz"))
    assert data.channels == 1 and data.num_classes == 3 and data.image_size == (5, 5)
    assert data.train_images.shape[0] + data.test_images.shape[0] == 30
    assert torch.bincount(data.test_labels).tolist() == [2, 2, 2]
    pixels = data.denormalise(torch.cat([data.train_images, data.test_images])) * 255
    assert sorted(p.round().to(torch.uint8).numpy().tobytes() for p in pixels[:, 0]) == sorted(a.tobytes() for a in x)
    assert load_dataset(data.name).name == data.name


def test_pt_with_explicit_splits_and_resize(tmp_path):
    g = torch.Generator().manual_seed(0)
    payload = {
        "x_train": torch.rand(12, 3, 8, 8, generator=g), "y_train": torch.arange(12) % 2,
        "x_test": torch.rand(4, 3, 8, 8, generator=g), "y_test": torch.tensor([0, 1, 0, 1]),
    }
    torch.save(payload, tmp_path / "d.pt")
    data = load_array_file(tmp_path / "d.pt", image_size=4)
    assert data.train_images.shape == (12, 3, 4, 4) and data.test_images.shape == (4, 3, 4, 4)
    torch.testing.assert_close(
        data.denormalise(data.test_images), resize_images(payload["x_test"], (4, 4)), atol=1e-5, rtol=0
    )


class _Payload:
    """Any class: pickling it needs code, which weights_only refuses."""


@pytest.mark.parametrize(
    "payload, error, match",
    [
        ({"x": np.zeros((6, 5, 5, 3), np.uint8), "y": np.arange(6) % 2}, ValueError, "channels-last"),
        ({"x": np.full((6, 4, 4), np.nan, np.float32), "y": np.arange(6) % 2}, ValueError, "NaN"),
        ({"x": np.zeros((6, 4, 4), np.uint8), "y": np.arange(6) * 0.5}, TypeError, "integer"),
        ({"x": np.zeros((6, 4, 4), np.uint8), "y": np.arange(5)}, ValueError, r"shape \(6,\)"),
        ({"x": np.zeros((6, 4, 4), np.uint8), "y": -np.ones(6, np.int64)}, ValueError, "negative"),
        ({"x": np.zeros((6, 4, 4), np.uint8), "y": np.zeros(6, np.int64)}, ValueError, "single class"),
        ({"x": np.zeros((6, 4, 4), np.uint8), "y": np.arange(6) % 2 * 2}, ValueError, "class '1' has no"),
        ({"x": np.zeros((6, 4, 4), np.int32), "y": np.arange(6) % 2}, TypeError, "uint8"),
        ({"images": np.zeros((6, 4, 4), np.uint8)}, ValueError, "keys x and y"),
    ],
)
def test_array_file_errors(tmp_path, payload, error, match):
    np.savez(tmp_path / "d.npz", **payload)
    with pytest.raises(error, match=match):
        load_dataset(str(tmp_path / "d.npz"))


def test_pt_needing_pickled_code_is_refused_with_an_explanation(tmp_path):
    torch.save({"x": torch.zeros(4, 1, 2, 2), "y": torch.tensor([0, 1, 0, 1]), "extra": _Payload()}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match=r"pickled Python objects.*weights_only=True"):
        load_dataset(str(tmp_path / "d.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt or not a torch file"):
        load_dataset(str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_dataset(str(tmp_path / "absent.npz"))


def test_built_in_dataset_resized(tmp_path):
    digits = load_dataset("digits")
    big = load_dataset("digits", image_size=16)
    assert big.image_size == (16, 16) and big.name == "digits" and big.mean == digits.mean
    torch.testing.assert_close(big.train_images.mean(), digits.train_images.mean(), atol=0.02, rtol=0)
