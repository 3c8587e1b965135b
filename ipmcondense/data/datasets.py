"""Labelled image datasets as whole-split tensors, normalised per channel.

Condensation touches every training image many times, so each split is loaded once into a float32
tensor ``(N, C, H, W)`` (normalised with the dataset's standard per-channel mean and standard
deviation) with int64 labels ``(N,)``. Memory: ``4 N C H W`` bytes per split (MNIST train: 188 MB,
CIFAR-10 train: 614 MB).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASET_NAMES",
    "DIGITS_MEAN",
    "DIGITS_SPLIT_SEED",
    "DIGITS_STD",
    "DIGITS_TEST_FRACTION",
    "NORMALISATION",
    "DatasetNotFoundError",
    "LabelledImages",
    "from_tensors",
    "load_dataset",
]

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn")

#: Fixed split of the scikit-learn digits: ``train_test_split(test_size=0.2, stratify=y,
#: random_state=0)`` -> 1437 training and 360 test images (every class 139..146 / 35..37).
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
#: Mean and standard deviation of all pixels of the digits training split, after scaling to [0, 1].
DIGITS_MEAN = (0.30538339,)
DIGITS_STD = (0.37611917,)

#: Per-channel (mean, std) of the images scaled to [0, 1], as the reference implementations.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": (DIGITS_MEAN, DIGITS_STD),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2861,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

_DIGITS_LIKE = frozenset({"digits", "mnist", "svhn"})

# Where torchvision expects each dataset under ``root`` (used in error messages).
_LAYOUT = {
    "mnist": "MNIST/raw/",
    "fashion-mnist": "FashionMNIST/raw/",
    "cifar10": "cifar-10-batches-py/",
    "cifar100": "cifar-100-python/",
    "svhn": "train_32x32.mat and test_32x32.mat",
}


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A dataset is not present under the given root (and was not to be downloaded)."""


@dataclass
class LabelledImages:
    """A labelled image dataset held as tensors.

    Attributes:
        name: dataset name (e.g. ``"cifar10"``).
        train_images: ``(N, C, H, W)`` float tensor, normalised with ``mean``/``std``.
        train_labels: ``(N,)`` int64 labels in ``[0, num_classes)``.
        test_images: ``(M, C, H, W)`` float tensor, normalised the same way.
        test_labels: ``(M,)`` int64 labels.
        num_classes: number of classes.
        mean: per-channel mean that was subtracted (pixel scale [0, 1]).
        std: per-channel standard deviation that was divided by.
        class_names: one name per class.
    """

    name: str
    train_images: Tensor = field(repr=False)
    train_labels: Tensor = field(repr=False)
    test_images: Tensor = field(repr=False)
    test_labels: Tensor = field(repr=False)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise TypeError(f"num_classes must be an int, got {type(self.num_classes).__name__}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        self.train_images, self.train_labels = _check_split(
            self.train_images, self.train_labels, self.num_classes, "train"
        )
        self.test_images, self.test_labels = _check_split(
            self.test_images, self.test_labels, self.num_classes, "test"
        )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                "train_images and test_images must have the same (C, H, W), got "
                f"{tuple(self.train_images.shape[1:])} and {tuple(self.test_images.shape[1:])}"
            )
        channels = self.train_images.shape[1]
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        for values, label in ((self.mean, "mean"), (self.std, "std")):
            if len(values) != channels:
                raise ValueError(f"{label} needs one value per channel ({channels}), got {values}")
            if not all(np.isfinite(values)):
                raise ValueError(f"{label} must be finite, got {values}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        self.class_names = tuple(str(c) for c in self.class_names)
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names needs one name per class ({self.num_classes}), "
                f"got {len(self.class_names)}"
            )

    @property
    def channels(self) -> int:
        """Number of image channels C."""
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Image height and width ``(H, W)``."""
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @property
    def is_digits_like(self) -> bool:
        """True for digits, MNIST and SVHN, where a horizontal flip changes the class."""
        return self.name.lower() in _DIGITS_LIKE

    def denormalise(self, images: Tensor) -> Tensor:
        """Undo the normalisation: ``images * std + mean`` per channel (pixel scale [0, 1]).

        Works on any ``(..., C, H, W)`` tensor, on its device and dtype, and is differentiable.
        """
        if not isinstance(images, Tensor) or images.dim() < 3 or images.shape[-3] != self.channels:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must have shape (..., {self.channels}, H, W), got {shape}")
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        return images * std + mean

    def to(self, device: torch.device | str) -> LabelledImages:
        """A copy whose four tensors live on ``device``."""
        return LabelledImages(
            name=self.name,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
            num_classes=self.num_classes,
            mean=self.mean,
            std=self.std,
            class_names=self.class_names,
        )


def _check_split(images: Any, labels: Any, num_classes: int, split: str) -> tuple[Tensor, Tensor]:
    name_x, name_y = f"{split}_images", f"{split}_labels"
    if not isinstance(images, Tensor):
        raise TypeError(f"{name_x} must be a torch.Tensor, got {type(images).__name__}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name_y} must be a torch.Tensor, got {type(labels).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name_x} must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name_x} is empty")
    if not images.is_floating_point():
        raise TypeError(f"{name_x} must be a floating tensor, got dtype {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name_x} contains NaN or inf values")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{name_y} must have shape ({images.shape[0]},) to match {name_x}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name_y} must hold integer class indices, got dtype {labels.dtype}")
    labels = labels.long()
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name_y} must lie in [0, {num_classes}) (num_classes={num_classes}), "
            f"got values in [{low}, {high}]"
        )
    if labels.device != images.device:
        raise ValueError(f"{name_x} is on {images.device} but {name_y} is on {labels.device}")
    return images, labels


def from_tensors(
    name: str,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    num_classes: int | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
) -> LabelledImages:
    """Wrap user tensors as a :class:`LabelledImages` (no copy, no normalisation applied).

    Images are taken as given (already normalised); ``mean``/``std`` only record how they were
    normalised, for :meth:`LabelledImages.denormalise`, and default to 0 and 1 (identity).

    Args:
        name: a name for the dataset (``"mnist"``, ``"svhn"`` or ``"digits"`` make it digit-like).
        train_images, test_images: ``(N, C, H, W)`` float tensors on one device.
        train_labels, test_labels: ``(N,)`` integer tensors (cast to int64).
        num_classes: number of classes; default ``max(label) + 1`` over both splits.
        mean, std: per-channel normalisation that was applied (defaults: 0 and 1).
        class_names: one name per class (default ``"0"``, ``"1"``, ...).

    Raises:
        ValueError / TypeError: shapes, dtypes, non-finite values or labels out of range,
        with the offending argument named.
    """
    for labels, label_name in ((train_labels, "train_labels"), (test_labels, "test_labels")):
        if not isinstance(labels, Tensor) or labels.numel() == 0:
            raise ValueError(f"{label_name} must be a non-empty tensor of class indices")
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    is_image_batch = isinstance(train_images, Tensor) and train_images.dim() == 4
    channels = train_images.shape[1] if is_image_batch else 1
    if class_names is None:
        class_names = tuple(map(str, range(num_classes)))
    return LabelledImages(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=num_classes,
        mean=tuple(mean) if mean is not None else (0.0,) * channels,
        std=tuple(std) if std is not None else (1.0,) * channels,
        class_names=tuple(class_names),
    )


def _normalise_uint8(
    images: Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """uint8 ``(N, C, H, W)`` images -> float32 ``(x / 255 - mean) / std`` per channel."""
    x = torch.as_tensor(images).float().div_(255.0)
    x.sub_(torch.tensor(mean).view(-1, 1, 1)).div_(torch.tensor(std).view(-1, 1, 1))
    return x


def _from_uint8_splits(
    name: str,
    train: tuple[Tensor | np.ndarray, Any],
    test: tuple[Tensor | np.ndarray, Any],
    num_classes: int,
    class_names: Sequence[str],
) -> LabelledImages:
    """A dataset from uint8 ``(N, C, H, W)`` splits, normalised with the standard constants."""
    mean, std = NORMALISATION[name]
    return LabelledImages(
        name=name,
        train_images=_normalise_uint8(train[0], mean, std),
        train_labels=torch.as_tensor(np.asarray(train[1]), dtype=torch.long),
        test_images=_normalise_uint8(test[0], mean, std),
        test_labels=torch.as_tensor(np.asarray(test[1]), dtype=torch.long),
        num_classes=num_classes,
        mean=mean,
        std=std,
        class_names=class_names,
    )


def _load_digits() -> LabelledImages:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # values 0..16 -> [0, 1]
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    mean, std = DIGITS_MEAN[0], DIGITS_STD[0]

    def to_tensor(x: np.ndarray) -> Tensor:
        return ((torch.from_numpy(np.ascontiguousarray(x)) - mean) / std).unsqueeze(1)

    return LabelledImages(
        name="digits",
        train_images=to_tensor(x_train),
        train_labels=torch.from_numpy(y_train),
        test_images=to_tensor(x_test),
        test_labels=torch.from_numpy(y_test),
        num_classes=10,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        class_names=tuple(str(int(c)) for c in bunch.target_names),
    )


def _missing_data_error(
    name: str, root: Path | None, download: bool, cause: Exception | None
) -> DatasetNotFoundError:
    where = "no root was given" if root is None else f"root {str(root)!r} does not hold it"
    message = (
        f"dataset {name!r} not found: {where} (torchvision layout: <root>/{_LAYOUT[name]}). "
        "Pass --data-root (data_root=...) pointing at a folder in that layout"
    )
    if name in ("mnist", "fashion-mnist"):
        message += (
            "; the publisher's four .gz files are read as they are (checksums verified, nothing written), "
            "also from a read-only folder"
        )
    else:
        tv_class = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN"}[name]
        message += (
            f"; to fetch the files once, run torchvision.datasets.{tv_class}(ROOT, download=True) in Python "
            "(or load_dataset(..., download=True))"
        )
    if cause is not None:
        detail = str(cause).strip()
        message += f" (torchvision: {detail.splitlines()[0] if detail else type(cause).__name__})"
    return DatasetNotFoundError(message)


def _load_torchvision(name: str, root: Path, download: bool) -> LabelledImages:
    from torchvision import datasets

    def build(train: bool) -> Any:
        if name == "mnist":
            return datasets.MNIST(str(root), train=train, download=download)
        if name == "fashion-mnist":
            return datasets.FashionMNIST(str(root), train=train, download=download)
        if name == "cifar10":
            return datasets.CIFAR10(str(root), train=train, download=download)
        if name == "cifar100":
            return datasets.CIFAR100(str(root), train=train, download=download)
        return datasets.SVHN(str(root), split="train" if train else "test", download=download)

    if name in ("mnist", "fashion-mnist"):
        from ipmcondense.data.files import load_idx_dataset

        found = load_idx_dataset(name, root)
        if found is not None:
            return found
        if not download:
            raise _missing_data_error(name, root, download, None)
    try:
        train_set, test_set = build(True), build(False)
    except (RuntimeError, OSError) as err:
        raise _missing_data_error(name, root, download, err) from err

    def arrays(split: Any) -> tuple[Tensor | np.ndarray, Any]:
        if name in ("mnist", "fashion-mnist"):
            return split.data.unsqueeze(1), split.targets  # uint8 (N, 28, 28) -> (N, 1, 28, 28)
        if name in ("cifar10", "cifar100"):
            # NHWC -> NCHW
            return np.ascontiguousarray(split.data.transpose(0, 3, 1, 2)), split.targets
        return split.data, split.labels  # SVHN: uint8 (N, 3, 32, 32), label 10 already mapped to 0

    if name == "svhn":
        num_classes, class_names = 10, tuple(map(str, range(10)))
    else:
        class_names = tuple(train_set.classes)
        num_classes = len(class_names)
    return _from_uint8_splits(name, arrays(train_set), arrays(test_set), num_classes, class_names)


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    image_size: int | tuple[int, int] | None = None,
    test_fraction: float | None = None,
    split_seed: int | None = None,
) -> LabelledImages:
    """Load a whole dataset into normalised tensors: a built-in name or the user's own data.

    ``name`` is one of

    * ``"digits"``: scikit-learn ``load_digits`` (1797 images 1x8x8, values 0..16, bundled with
      scikit-learn, needs no root). Pixels are divided by 16, then normalised with the mean and
      standard deviation of all training pixels, :data:`DIGITS_MEAN` = 0.30538339 and
      :data:`DIGITS_STD` = 0.37611917. Fixed stratified split
      ``train_test_split(test_size=0.2, stratify=y, random_state=0)``: 1437 training and 360 test
      images.
    * ``"mnist"``, ``"fashion-mnist"`` (1x28x28): the publisher's four files under ``root``
      (``<root>/MNIST/raw/``, ``<root>/FashionMNIST/raw/``; ``.gz`` read directly after an MD5 check,
      nothing is written, the folder may be read-only; see
      :func:`ipmcondense.data.files.load_idx_dataset`).
    * ``"cifar10"``, ``"cifar100"``, ``"svhn"`` (3x32x32) through torchvision from ``root``
      (torchvision layout), downloaded there when ``download=True``. Built-in datasets are scaled to
      [0, 1] and normalised with the standard constants (:data:`NORMALISATION`).
    * ``"imagefolder:PATH"``: an image folder, one sub-folder per class
      (:func:`ipmcondense.data.files.load_image_folder`).
    * a path to a ``.npz`` or ``.pt`` file with arrays ``x`` and ``y``
      (:func:`ipmcondense.data.files.load_array_file`).

    The ``name`` of the returned dataset loads it again (an absolute path for the user's data).

    Args:
        name: dataset name (case-insensitive; ``_`` may replace ``-``) or one of the forms above.
        root: folder of the built-in datasets (ignored for ``"digits"`` and the user's data).
        download: let torchvision download the files into ``root`` (CIFAR, SVHN; MNIST when absent).
        image_size: ``S`` or ``(H, W)``: resize (covering, bilinear, antialiased) and centre-crop every
            image to it. Needed for folders of mixed image sizes; optional elsewhere.
        test_fraction, split_seed: the seeded stratified split of user data that has no split of its
            own (defaults :data:`~ipmcondense.data.files.DEFAULT_TEST_FRACTION` = 0.2 and 0).

    Returns:
        A :class:`LabelledImages` with float32 images on the CPU.

    Raises:
        ValueError: unknown ``name`` (the message lists the forms), bad ``image_size``, or bad user data
            (an empty class, a single class, an unreadable image, mixed channel counts, ...; named).
        DatasetNotFoundError: the data are not under ``root`` (a ``FileNotFoundError`` and a
            ``ValueError``); the message names the dataset and root and says how to provide them.
        FileNotFoundError: a user folder or file does not exist.
    """
    from ipmcondense.data import files

    if not isinstance(name, str):
        raise TypeError(f"dataset must be a name or a path (str), got {type(name).__name__}")
    size = files.check_image_size(image_size)
    split = {}
    if test_fraction is not None:
        split["test_fraction"] = test_fraction
    if split_seed is not None:
        split["split_seed"] = split_seed
    spec = name.strip()
    if spec.lower().startswith("imagefolder:"):
        folder = spec.split(":", 1)[1]
        if not folder:
            raise ValueError("dataset 'imagefolder:' needs a folder: imagefolder:PATH")
        return files.load_image_folder(folder, size, **split)
    if Path(spec).expanduser().is_dir():
        raise ValueError(f"dataset {name!r} is a folder; write imagefolder:{spec} to load it as an image folder")
    if Path(spec).suffix.lower() in (".npz", ".pt") or (os.sep in spec and Path(spec).expanduser().exists()):
        return files.load_array_file(spec, size, **split)
    key = spec.lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key not in DATASET_NAMES:
        raise ValueError(
            f"unknown dataset {name!r}; expected one of: {', '.join(map(repr, DATASET_NAMES))}, "
            "imagefolder:PATH (one sub-folder per class), or a .npz/.pt file with arrays x and y"
        )
    if key == "digits":
        data = _load_digits()
    elif root is None:
        raise _missing_data_error(key, None, download, None)
    else:
        data = _load_torchvision(key, Path(root).expanduser(), download)
    if size is not None and size != data.image_size:
        data = LabelledImages(
            name=data.name,
            train_images=files.resize_images(data.train_images, size),
            train_labels=data.train_labels,
            test_images=files.resize_images(data.test_images, size),
            test_labels=data.test_labels,
            num_classes=data.num_classes,
            mean=data.mean,
            std=data.std,
            class_names=data.class_names,
        )
    return data
