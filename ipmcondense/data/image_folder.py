"""User images in the torchvision ``ImageFolder`` layout (one folder per class), read into a dataset.

:func:`load_image_folder` is re-exported by :mod:`ipmcondense.data.files`, where it is documented.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ipmcondense.data.datasets import LabelledImages
from ipmcondense.data.files import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_FRACTION,
    IMAGE_EXTENSIONS,
    _normalised_dataset,
    _stratified_split,
    check_image_size,
    resize_images,
)


# --------------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------------


def _class_folders(folder: Path, source: str) -> list[Path]:
    classes = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not classes:
        raise ValueError(f"{source}: {str(folder)!r} has no class sub-folders (expected <folder>/<class>/<image>)")
    return classes


def _image_files(class_folder: Path, source: str) -> list[Path]:
    files = sorted(
        p for p in class_folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(
            f"{source}: class folder {str(class_folder)!r} is empty (no {'/'.join(IMAGE_EXTENSIONS)} files); "
            "remove it or add images"
        )
    return files


_CHANNELS_OF_MODE = {"1": 1, "L": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "F": 1, "LA": 1}


def _read_image(path: Path) -> tuple[np.ndarray, int]:
    """An image as uint8 ``(H, W, C)`` with ``C`` 1 (grey modes) or 3 (colour modes, alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            channels = _CHANNELS_OF_MODE.get(mode, 3)
            if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                array = np.asarray(img, dtype=np.float64)
                top = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
                array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None]
            else:
                array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
                if array.ndim == 2:
                    array = array[..., None]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"cannot read image {str(path)!r} ({type(err).__name__}: {err})") from err
    return array, channels


def _load_images(files: list[Path], image_size: tuple[int, int] | None, source: str) -> Tensor:
    """Images as float ``(N, C, H, W)`` in [0, 1], one channel count, resized to ``image_size``."""
    arrays, first_of = [], {}
    for path in files:
        array, channels = _read_image(path)
        first_of.setdefault(channels, path)
        if len(first_of) > 1:
            grey, colour = first_of.get(1), first_of.get(3)
            raise ValueError(
                f"{source}: mixed channel counts: {str(grey)!r} is greyscale (1 channel) but {str(colour)!r} is "
                "colour (3 channels); convert all images to one mode (e.g. PIL Image.convert('RGB'))"
            )
        arrays.append((path, array))
    if image_size is None:
        sizes = {}
        for path, array in arrays:
            sizes.setdefault(array.shape[:2], path)
        if len(sizes) > 1:
            (s1, p1), (s2, p2) = list(sizes.items())[:2]
            raise ValueError(
                f"{source}: images have different sizes ({str(p1)!r} is {s1[0]}x{s1[1]}, {str(p2)!r} is "
                f"{s2[0]}x{s2[1]}); pass --image-size N (image_size=N) to resize and centre-crop them to NxN"
            )
        return torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for _, a in arrays]).float().div_(255.0)
    out = []
    for _, array in arrays:
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        out.append(resize_images(x, image_size).clamp_(0.0, 1.0)[0])
    return torch.stack(out)


def _folder_split(
    folder: Path, class_names: list[str] | None, image_size: tuple[int, int] | None, source: str
) -> tuple[Tensor, Tensor, list[str]]:
    classes = _class_folders(folder, source)
    names = [p.name for p in classes]
    if class_names is not None:
        unknown = [n for n in names if n not in class_names]
        if unknown:
            raise ValueError(f"{source}: test class {unknown[0]!r} has no folder in the train split ({', '.join(class_names)})")
        names_for_labels = class_names
    else:
        names_for_labels = names
    files, labels = [], []
    for path in classes:
        found = _image_files(path, source)
        files.extend(found)
        labels.extend([names_for_labels.index(path.name)] * len(found))
    return _load_images(files, image_size, source), torch.tensor(labels, dtype=torch.long), names


def load_image_folder(
    path: str | os.PathLike[str],
    image_size: int | tuple[int, int] | None = None,
    *,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> LabelledImages:
    """A dataset from an image folder (torchvision ``ImageFolder`` layout).

    Layouts: ``PATH/<class>/<image>`` (split into train/test by a seeded stratified ``test_fraction``
    of every class: ``round(n * test_fraction)`` images, at most ``n - 1``), or ``PATH/train/<class>/...``
    and ``PATH/test/<class>/...`` (split by folder; every test class must exist in train). Classes are
    the sorted folder names; images are the files ending in :data:`IMAGE_EXTENSIONS` (others are
    ignored), read with PIL: grey modes give 1 channel, colour modes 3 (alpha dropped).

    Args:
        path: the folder.
        image_size: ``S`` or ``(H, W)``: resize to cover it and centre-crop (:func:`resize_images`);
            ``None`` requires all images to have one size.
        test_fraction, split_seed: the seeded split, when the folder has no ``train``/``test``.

    Returns:
        A :class:`LabelledImages` named ``"imagefolder:<absolute path>"`` (that name loads it again),
        normalised with the training split's per-channel mean and std.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        ValueError: no class folders, an empty class, a single class, an unreadable image (named),
            mixed channel counts or mixed sizes without ``image_size``.
    """
    folder = Path(path).expanduser()
    source = f"image folder {str(path)!r}"
    if not folder.is_dir():
        raise FileNotFoundError(f"{source}: no such folder (expected imagefolder:PATH with PATH/<class>/<image>)")
    size = check_image_size(image_size)
    name = f"imagefolder:{folder.resolve()}"
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        train_x, train_y, names = _folder_split(folder / "train", None, size, source)
        test_x, test_y, _ = _folder_split(folder / "test", names, size, source)
        if train_x.shape[1:] != test_x.shape[1:]:
            raise ValueError(
                f"{source}: train images are {tuple(train_x.shape[1:])} but test images {tuple(test_x.shape[1:])} "
                "(channels, height, width); pass --image-size N, or convert them to one mode"
            )
        return _normalised_dataset(name, (train_x, train_y), (test_x, test_y), names, source)
    images, labels, names = _folder_split(folder, None, size, source)
    if len(names) < 2:
        raise ValueError(f"{source}: found a single class ({names[0]!r}); condensation and evaluation need at least 2")
    train_idx, test_idx = _stratified_split(labels, test_fraction, split_seed, source)
    return _normalised_dataset(
        name, (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx]), names, source
    )


