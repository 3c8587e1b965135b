"""The user's own data and the publisher's files: MNIST-format ``.gz`` files, image folders, arrays.

Three readers, each returning a :class:`~ipmcondense.data.datasets.LabelledImages` (normalised,
float32, CPU) and none of them writing anything next to the files it reads:

* :func:`load_idx_dataset`: MNIST and Fashion-MNIST from the four files as the publisher ships them
  (``train-images-idx3-ubyte.gz`` ...), read directly from the ``.gz`` after an MD5 check against
  torchvision's list of official checksums (or from already extracted files). No flag, no network,
  and the root may be read-only.
* :func:`load_image_folder`: a torchvision ``ImageFolder`` tree (one folder per class, any image
  format PIL reads, any size), resized and centre-cropped to ``image_size``; split into train/test
  by ``train/`` and ``test/`` sub-folders when present, else by a seeded stratified fraction.
* :func:`load_array_file`: a ``.npz`` or ``.pt`` file with arrays ``x`` (``(N, C, H, W)`` or
  ``(N, H, W)``, uint8 in 0..255 or float) and ``y`` (integer labels), or ``x_train``/``y_train``/
  ``x_test``/``y_test``. ``.pt`` files are read with ``torch.load(weights_only=True)``.

User datasets are normalised with the per-channel mean and standard deviation of their training
split (pixel scale [0, 1]; a constant channel gets std 1), recorded in ``mean``/``std``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ipmcondense.data.datasets import DatasetNotFoundError, LabelledImages

__all__ = [
    "DEFAULT_SPLIT_SEED",
    "DEFAULT_TEST_FRACTION",
    "IMAGE_EXTENSIONS",
    "check_image_size",
    "load_array_file",
    "load_idx_dataset",
    "load_image_folder",
    "load_torch_file",
    "resize_images",
]

#: File endings read as images in an image folder (case-insensitive); other files are ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp")
#: Fraction of each class held out as the test split when a folder or file has no split of its own.
DEFAULT_TEST_FRACTION = 0.2
#: Seed of that split (``torch.Generator().manual_seed(seed)``, one permutation per class).
DEFAULT_SPLIT_SEED = 0

_IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def check_image_size(image_size: Any) -> tuple[int, int] | None:
    """``None``, an int ``S`` (-> ``(S, S)``) or a pair ``(H, W)`` of positive ints, as a pair."""
    if image_size is None:
        return None
    if isinstance(image_size, (list, tuple)) and len(image_size) == 2:
        pair = tuple(image_size)
    else:
        pair = (image_size, image_size)
    for value in pair:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"image_size (--image-size) must be a positive integer or (H, W), got {image_size!r}")
    return int(pair[0]), int(pair[1])


def torch_load_weights_only(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with the errors a user can act on.

    A file that needs pickled Python code (classes, functions) is refused with an explanation; a
    corrupt or foreign file raises ``ValueError`` naming it.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        match = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if match is None:
            raise ValueError(f"{what} {str(path)!r} is corrupt or not a torch file (it cannot be unpickled)") from err
        raise ValueError(
            f"{what} {str(path)!r} holds pickled Python objects ({match.group(1)}), not only tensors and plain "
            "containers; ipmcondense loads the files it is given with torch.load(weights_only=True) and refuses "
            "to run code stored in a file. Save tensors, dicts, lists, strings and numbers only"
        ) from err
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{what} {str(path)!r} is corrupt or not a torch file ({type(err).__name__}: {first})") from err


def load_torch_file(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Load a user's ``.pt`` file with ``weights_only=True`` (see ``torch_load_weights_only``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what} {str(file)!r}: no such file")
    return torch_load_weights_only(file, what)


def resize_images(images: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Resize ``(N, C, H, W)`` images to cover ``image_size``, then centre-crop to it.

    Scale factor ``max(h / H, w / W)`` (aspect ratio kept; bilinear with antialiasing), then the
    central ``h x w`` window. Linear in the pixels, so it commutes with a per-channel normalisation.
    Images already of size ``image_size`` are returned unchanged.
    """
    h, w = image_size
    height, width = int(images.shape[-2]), int(images.shape[-1])
    if (height, width) == (h, w):
        return images
    scale = max(h / height, w / width)
    new = (max(h, round(height * scale)), max(w, round(width * scale)))
    out = F.interpolate(images.float(), size=new, mode="bilinear", align_corners=False, antialias=True)
    top, left = (new[0] - h) // 2, (new[1] - w) // 2
    return out[..., top : top + h, left : left + w].contiguous()


def _stratified_split(labels: Tensor, fraction: float, seed: int, source: str) -> tuple[Tensor, Tensor]:
    """Indices (train, test): per class a seeded permutation, ``round(n * fraction)`` of it held out."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"split_seed must be an integer, got {type(seed).__name__}")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n_test = min(round(idx.numel() * fraction), idx.numel() - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx, test_idx = torch.cat(train).sort().values, torch.cat(test).sort().values
    if test_idx.numel() == 0:
        raise ValueError(
            f"{source}: too few images to hold out a test fraction of {fraction} (every class has 1 image); "
            "add images, or give separate train/test splits"
        )
    return train_idx, test_idx


def _normalised_dataset(
    name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    class_names: Sequence[str],
    source: str,
) -> LabelledImages:
    """Pixel-scale ``[0, 1]`` float images -> normalised with the training split's per-channel statistics."""
    train_x, train_y = train
    test_x, test_y = test
    num_classes = len(class_names)
    counts = torch.bincount(train_y, minlength=num_classes)
    empty = [class_names[c] for c in range(num_classes) if counts[c] == 0]
    if empty:
        raise ValueError(f"{source}: class {empty[0]!r} has no training images (every class needs at least one)")
    if num_classes < 2:
        raise ValueError(f"{source}: found a single class ({class_names[0]!r}); condensation and evaluation need at least 2")
    mean = train_x.mean(dim=(0, 2, 3), dtype=torch.float64)
    std = train_x.to(torch.float64).std(dim=(0, 2, 3), unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    m, s = mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)
    return LabelledImages(
        name=name,
        train_images=((train_x - m) / s).float().contiguous(),
        train_labels=train_y.long(),
        test_images=((test_x - m) / s).float().contiguous(),
        test_labels=test_y.long(),
        num_classes=num_classes,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        class_names=tuple(class_names),
    )


# --------------------------------------------------------------------------------------------------
# MNIST-format files as published
# --------------------------------------------------------------------------------------------------


def _idx_folder(key: str, root: Path) -> Path | None:
    """The folder holding the idx files: ``root/<Name>/raw``, ``root/raw`` or ``root`` itself."""
    folder = _IDX_FOLDERS[key]
    for candidate in (root / folder / "raw", root / "raw", root):
        if any((candidate / (stem + ext)).is_file() for stem in _IDX_FILES["train"] for ext in ("", ".gz")):
            return candidate
    return None


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_idx(path: Path, expected_md5: str | None) -> np.ndarray:
    """The array in an idx file (``.gz`` read directly after an MD5 check; never extracted to disk)."""
    if path.suffix == ".gz":
        if expected_md5 is not None:
            actual = _md5(path)
            if actual != expected_md5:
                raise ValueError(
                    f"{str(path)!r} is not the official file: MD5 {actual}, expected {expected_md5}. "
                    "Replace it with the publisher's file (it may be truncated or damaged)"
                )
        try:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        except (OSError, EOFError) as err:
            raise ValueError(f"{str(path)!r} cannot be decompressed ({err})") from err
    else:
        raw = path.read_bytes()
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{str(path)!r} is not an idx file of unsigned bytes (bad header)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise ValueError(f"{str(path)!r} is truncated or damaged: header says shape {shape}, size does not match")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_idx_dataset(key: str, root: str | os.PathLike[str]) -> LabelledImages | None:
    """MNIST or Fashion-MNIST from the publisher's idx files under ``root``, or ``None`` if absent.

    Looks in ``root/MNIST/raw`` (``root/FashionMNIST/raw``), ``root/raw`` and ``root``, for each of the
    four files the extracted form or the ``.gz`` form; a ``.gz`` must match torchvision's official MD5
    and is decompressed in memory. Normalised with the standard constants (``ipmcondense.data.datasets.NORMALISATION``).

    Raises:
        DatasetNotFoundError: some of the four files are present, others missing (lists them).
        ValueError: a file fails its checksum or is not a well-formed idx file (names it).
    """
    from torchvision import datasets as tv

    from ipmcondense.data.datasets import NORMALISATION, _from_uint8_splits

    folder = _idx_folder(key, Path(root).expanduser())
    if folder is None:
        return None
    official = dict((tv.MNIST if key == "mnist" else tv.FashionMNIST).resources)
    arrays: dict[str, np.ndarray] = {}
    missing = []
    for split, stems in _IDX_FILES.items():
        for stem in stems:
            if (folder / stem).is_file():
                arrays[stem] = _read_idx(folder / stem, None)
            elif (folder / f"{stem}.gz").is_file():
                arrays[stem] = _read_idx(folder / f"{stem}.gz", official.get(f"{stem}.gz"))
            else:
                missing.append(f"{stem}.gz")
    if missing:
        raise DatasetNotFoundError(f"dataset {key!r}: {str(folder)!r} lacks {', '.join(missing)} (all four files are needed)")
    splits = {}
    for split, (images_stem, labels_stem) in _IDX_FILES.items():
        images, labels = arrays[images_stem], arrays[labels_stem]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{str(folder)!r}: {images_stem} {images.shape} and {labels_stem} {labels.shape} do not match")
        splits[split] = (torch.from_numpy(images.copy()).unsqueeze(1), labels.astype(np.int64))
    classes = tuple((tv.MNIST if key == "mnist" else tv.FashionMNIST).classes)
    assert key in NORMALISATION
    return _from_uint8_splits(key, splits["train"], splits["test"], len(classes), classes)


# --------------------------------------------------------------------------------------------------
# .npz / .pt arrays
# --------------------------------------------------------------------------------------------------


def _as_pixels(x: Any, key: str, source: str) -> Tensor:
    """``(N, C, H, W)``/``(N, H, W)`` uint8 (0..255) or float array -> float32 ``(N, C, H, W)`` pixels."""
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{source}: {key!r} is an object array; store a numeric array")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{source}: {key!r} must be an array of images, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[0] == 0 or min(x.shape[1:]) == 0:
        raise ValueError(f"{source}: {key!r} must have shape (N, C, H, W) or (N, H, W) with N > 0, got {tuple(x.shape)}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4) and x.shape[1] > 4:
        raise ValueError(
            f"{source}: {key!r} has shape {tuple(x.shape)}, which looks channels-last (N, H, W, C); "
            "store it as (N, C, H, W) (e.g. x.transpose(0, 3, 1, 2))"
        )
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = x.float()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{source}: {key!r} contains NaN or inf values")
        return x
    raise TypeError(f"{source}: {key!r} must be uint8 (0..255) or floating point, got dtype {x.dtype}")


def _as_labels(y: Any, n: int, key: str, source: str) -> Tensor:
    if isinstance(y, np.ndarray):
        if y.dtype == object:
            raise TypeError(f"{source}: {key!r} is an object array; store integer labels")
        y = torch.from_numpy(np.ascontiguousarray(y))
    if not isinstance(y, Tensor):
        raise TypeError(f"{source}: {key!r} must be an array of integer labels, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{source}: {key!r} must hold integer class indices, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{source}: {key!r} must have shape ({n},) to match the images, got {tuple(y.shape)}")
    y = y.long()
    if int(y.min()) < 0:
        raise ValueError(f"{source}: {key!r} holds negative labels (min {int(y.min())}); labels must be 0..K-1")
    return y


def load_array_file(
    path: str | os.PathLike[str],
    image_size: int | tuple[int, int] | None = None,
    *,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> LabelledImages:
    """A dataset from a ``.npz`` or ``.pt`` file of arrays.

    Keys: ``x`` and ``y`` (split into train/test by a seeded stratified ``test_fraction``, as
    :func:`load_image_folder`), or ``x_train``, ``y_train``, ``x_test``, ``y_test``. Images
    ``(N, C, H, W)`` or ``(N, H, W)``, uint8 (divided by 255) or float (taken as pixel values); labels
    integers ``0..K-1`` (``K = max + 1``; every class needs a training image). ``.npz`` is read with
    ``allow_pickle=False`` and ``.pt`` with ``torch.load(weights_only=True)`` (a dict of tensors).

    Returns:
        A :class:`LabelledImages` named by the file's absolute path (that name loads it again).
    """
    file = Path(path).expanduser()
    source = f"dataset file {str(path)!r}"
    if not file.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    suffix = file.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(file, allow_pickle=False) as archive:
                data: Any = {k: archive[k] for k in archive.files}
        except ValueError as err:
            raise ValueError(f"{source}: holds pickled objects, which are refused (allow_pickle=False): {err}") from err
        except Exception as err:
            raise ValueError(f"{source} is corrupt or not a .npz archive ({type(err).__name__}: {err})") from err
    elif suffix == ".pt":
        data = torch_load_weights_only(file, "dataset file")
    else:
        raise ValueError(f"{source}: unsupported file type {suffix!r}; use .npz or .pt with arrays x and y")
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a dict of arrays with keys x and y (or x_train, y_train, x_test, y_test)")  # noqa: TRY004 - wrong file content is a bad value
    size = check_image_size(image_size)
    name = str(file.resolve())
    if all(k in data for k in ("x_train", "y_train", "x_test", "y_test")):
        train_x = _as_pixels(data["x_train"], "x_train", source)
        test_x = _as_pixels(data["x_test"], "x_test", source)
        train_y = _as_labels(data["y_train"], train_x.shape[0], "y_train", source)
        test_y = _as_labels(data["y_test"], test_x.shape[0], "y_test", source)
    elif "x" in data and "y" in data:
        images = _as_pixels(data["x"], "x", source)
        labels = _as_labels(data["y"], images.shape[0], "y", source)
        train_idx, test_idx = _stratified_split(labels, test_fraction, split_seed, source)
        train_x, train_y, test_x, test_y = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
    else:
        raise ValueError(
            f"{source}: expected keys x and y (or x_train, y_train, x_test, y_test), found {sorted(map(str, data))}"
        )
    if size is not None:
        train_x, test_x = resize_images(train_x, size), resize_images(test_x, size)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(f"{source}: train images are {tuple(train_x.shape[1:])} but test images {tuple(test_x.shape[1:])}")
    num_classes = int(max(int(train_y.max()), int(test_y.max()))) + 1
    return _normalised_dataset(name, (train_x, train_y), (test_x, test_y), [str(c) for c in range(num_classes)], source)


# the image-folder reader lives in its own module; it is part of this module's interface
from ipmcondense.data.image_folder import load_image_folder  # noqa: E402
