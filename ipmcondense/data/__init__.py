"""Datasets as tensors and class-balanced sampling of real images.

Imports only torch, torchvision, NumPy, scikit-learn and :mod:`ipmcondense.ipm`, so the
condensation engine may use it.
"""

from __future__ import annotations

from ipmcondense.data.datasets import (
    DATASET_NAMES,
    DIGITS_MEAN,
    DIGITS_SPLIT_SEED,
    DIGITS_STD,
    DIGITS_TEST_FRACTION,
    NORMALISATION,
    DatasetNotFoundError,
    LabelledImages,
    from_tensors,
    load_dataset,
)
from ipmcondense.data.files import load_array_file, load_image_folder
from ipmcondense.data.sampling import ClassBalancedSampler

__all__ = [
    "DATASET_NAMES",
    "DIGITS_MEAN",
    "DIGITS_SPLIT_SEED",
    "DIGITS_STD",
    "DIGITS_TEST_FRACTION",
    "NORMALISATION",
    "ClassBalancedSampler",
    "DatasetNotFoundError",
    "LabelledImages",
    "from_tensors",
    "load_array_file",
    "load_dataset",
    "load_image_folder",
]
