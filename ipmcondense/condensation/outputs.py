"""Files a condensation run writes, always atomically (temporary file + :func:`os.replace`).

A run directory ``out`` holds

* ``synthetic.pt``: ``{"images", "labels", "training_labels", "learning_rate", "learned_schedule", "config",
  "recipe", "dataset", "ipc", "version", "format"}`` (``learned_schedule``: DD's batches and step sizes, or ``None``) (images in the dataset's normalised space, on CPU);
* ``metrics.json``: loss history, timings, evaluation results;
* ``synthetic.png``: a grid of the denormalised images, one row per class;
* ``checkpoint.pt``: everything needed to resume bit-for-bit (see :mod:`ipmcondense.condensation.engine`);
* ``evaluation.json``: written by :func:`ipmcondense.condensation.api.evaluate`.

A crash can never leave a half-written file under one of these names.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ipmcondense.data.files import torch_load_weights_only
from ipmcondense.files import atomic_torch_save, atomic_write
from ipmcondense.files import atomic_write_json as _atomic_write_json

__all__ = [
    "SYNTHETIC_FILE",
    "METRICS_FILE",
    "GRID_FILE",
    "CHECKPOINT_FILE",
    "EVALUATION_FILE",
    "RUN_FILES",
    "SYNTHETIC_FORMAT",
    "CHECKPOINT_FORMAT",
    "atomic_torch_save",
    "atomic_write_json",
    "save_image_grid",
    "load_synthetic",
    "load_checkpoint",
    "synthetic_path",
]

SYNTHETIC_FILE = "synthetic.pt"
METRICS_FILE = "metrics.json"
GRID_FILE = "synthetic.png"
CHECKPOINT_FILE = "checkpoint.pt"
EVALUATION_FILE = "evaluation.json"
RUN_FILES = (SYNTHETIC_FILE, METRICS_FILE, GRID_FILE, CHECKPOINT_FILE, EVALUATION_FILE)
SYNTHETIC_FORMAT = "ipmcondense-synthetic-v1"
CHECKPOINT_FORMAT = "ipmcondense-checkpoint-v1"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON atomically (tensors/tuples converted, non-finite floats as strings)."""
    _atomic_write_json(_jsonable(obj), path)


def save_image_grid(images: Tensor, ipc: int, path: str | os.PathLike, denormalise=None) -> None:
    """Save a PNG grid, one row of ``ipc`` images per class, atomically.

    Args:
        images: ``(N, C, H, W)`` class-blocked images in normalised space.
        ipc: images per class (row length).
        path: the ``.png`` file.
        denormalise: maps normalised images back to ``[0, 1]`` pixel space (the dataset's), or ``None``.
    """
    from torchvision.utils import save_image

    pixels = images.detach().cpu().float()
    if denormalise is not None:
        pixels = denormalise(pixels)
    pixels = pixels.clamp(0.0, 1.0)
    atomic_write(path, lambda handle: save_image(pixels, handle, nrow=max(1, int(ipc)), padding=1, format="png"))


def synthetic_path(path: str | os.PathLike) -> Path:
    """``path/synthetic.pt`` for a run directory, ``path`` itself for a file."""
    p = Path(path)
    return p / SYNTHETIC_FILE if p.is_dir() else p


def load_synthetic(path: str | os.PathLike) -> dict[str, Any]:
    """Load a ``synthetic.pt`` (or the one in a run directory); clear errors for missing/corrupt files."""
    file = synthetic_path(path)
    if not file.exists():
        raise FileNotFoundError(f"no synthetic set at {file}: run `ipmcondense condense --out {Path(path)}` first")
    data = torch_load_weights_only(file, "synthetic set")  # refuses pickled code; names corrupt files
    if not isinstance(data, dict) or data.get("format") != SYNTHETIC_FORMAT:
        raise ValueError(f"{file} is not an ipmcondense synthetic set (format {SYNTHETIC_FORMAT!r} expected)")
    images, labels = data.get("images"), data.get("labels")
    if (not isinstance(data.get("config"), dict) or not isinstance(images, Tensor) or images.dim() != 4
            or not images.is_floating_point() or not isinstance(labels, Tensor) or labels.shape[:1] != images.shape[:1]):
        raise ValueError(f"{file} is damaged: it needs 'config' (a dict), 'images' (N, C, H, W) and N 'labels'")
    return data


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a ``checkpoint.pt``; a corrupt or foreign file raises ``ValueError`` naming it."""
    file = Path(path)
    try:
        data = torch_load_weights_only(file, "checkpoint")  # refuses pickled code; names corrupt files
    except ValueError as err:
        raise ValueError(f"{err}; delete it to start over") from err
    required = ("format", "iteration", "synthetic", "optimizer", "generator", "config", "sampler")
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT or any(k not in data for k in required):
        raise ValueError(f"checkpoint {file} is corrupt or not an ipmcondense checkpoint; delete it to start over")
    return data
