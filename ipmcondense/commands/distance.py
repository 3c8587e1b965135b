"""``ipmcondense distance A B``: a distance between two datasets, printed as one JSON object.

``A`` and ``B`` are files or built-in dataset splits:

* ``.pt``: a tensor of points, or a dict with ``"images"``/``"labels"`` or ``"x"``/``"y"``, or a
  ``(points, labels)`` pair (loaded with ``torch.load(weights_only=True)``);
* ``.npy``: an array of points; ``.npz``: arrays ``x``/``y`` or ``images``/``labels`` (or one array);
* ``NAME:SPLIT``: a split of a built-in dataset, e.g. ``digits:train``, ``mnist:test``
  (:func:`ipmcondense.data.load_dataset`, with ``--data-root`` for the torchvision datasets).

Output: ``{"metric", "value", "settings", "n_a", "n_b", "seconds"}`` on stdout, where ``n_a``/``n_b``
are the numbers of points compared (after ``--max-samples``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ipmcondense.ipm.dataset_distance import DATASET_METRICS, distance

__all__ = ["register", "load_points", "run_distance"]

_SPLITS = ("train", "test")


def _bandwidth(text: str) -> float | str:
    if text == "median":
        return text
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"bandwidth must be 'median' or a positive number, got {text!r}") from err
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"bandwidth must be 'median' or a positive number, got {text!r}")
    return value


def register(subparsers: Any) -> None:
    """Add the ``distance`` subcommand to the CLI's ``subparsers``."""
    parser = subparsers.add_parser(
        "distance",
        help="distance between two datasets (files or built-in splits), printed as JSON",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "a", metavar="A", help="first dataset: a .pt/.npy/.npz file or NAME:SPLIT (e.g. digits:train)"
    )
    parser.add_argument("b", metavar="B", help="second dataset, same forms as A")
    parser.add_argument("--metric", default="mmd", choices=DATASET_METRICS,
                        help="distance (default: mmd, the root of the biased MMD^2)")
    parser.add_argument("--kernel", default=None, help="kernel for mmd/mmd2 (default: gaussian)")
    parser.add_argument("--bandwidth", type=_bandwidth, default=None,
                        help="kernel bandwidth for mmd/mmd2: 'median' (default) or a positive number")
    parser.add_argument("--estimator", default=None, choices=("unbiased", "biased", "linear"),
                        help="MMD^2 estimator for mmd2 (default: unbiased)")
    parser.add_argument("--p", type=float, default=None, help="order p for wasserstein/sliced/sinkhorn/otdd")
    parser.add_argument("--blur", type=float, default=None, help="Sinkhorn blur for sinkhorn/otdd")
    parser.add_argument("--labels", action="store_true",
                        help="use the labels: class-conditional distance (otdd always uses them)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="compare seeded random subsets of at most N points per dataset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsampling (default: 0)")
    parser.add_argument("--data-root", default=None, help="folder of the torchvision datasets (mnist, cifar10, ...)")
    parser.add_argument("--device", default=None, help="torch device to compute on (default: where the data is)")
    parser.set_defaults(func=run_distance)


def _from_mapping(data: dict, source: str) -> tuple[Any, Any]:
    for points_key, labels_key in (("images", "labels"), ("x", "y")):
        if points_key in data:
            return data[points_key], data.get(labels_key)
    if len(data) == 1:
        return next(iter(data.values())), None
    raise ValueError(
        f"{source}: expected arrays 'images' (and 'labels') or 'x' (and 'y'), found keys {sorted(data)}"
    )


def load_points(spec: str, data_root: str | None = None) -> tuple[Tensor, Tensor | None]:
    """Points and labels (or ``None``) from a ``.pt``/``.npy``/``.npz`` file or a ``NAME:SPLIT`` spec."""
    path = Path(spec).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".pt":
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # torch raises several types for corrupt files
                raise ValueError(f"{spec}: cannot read this .pt file ({err})") from err
            if isinstance(data, dict):
                points, labels = _from_mapping(data, spec)
            elif isinstance(data, (tuple, list)) and len(data) == 2:
                points, labels = data
            else:
                points, labels = data, None
        elif suffix == ".npy":
            points, labels = np.load(path, allow_pickle=False), None
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                points, labels = _from_mapping({k: archive[k] for k in archive.files}, spec)
        else:
            raise ValueError(f"{spec}: unsupported file type {suffix!r}; use .pt, .npy or .npz")
        points = torch.as_tensor(points) if not isinstance(points, Tensor) else points
        labels = torch.as_tensor(labels) if labels is not None and not isinstance(labels, Tensor) else labels
        return points, labels
    if ":" in spec and not path.exists():
        name, _, split = spec.rpartition(":")
        if split not in _SPLITS:
            raise ValueError(f"{spec}: the split must be one of {', '.join(_SPLITS)}, e.g. digits:train")
        from ipmcondense.data import load_dataset

        dataset = load_dataset(name, data_root)
        if split == "train":
            return dataset.train_images, dataset.train_labels
        return dataset.test_images, dataset.test_labels
    raise FileNotFoundError(f"{spec}: no such file (expected a .pt/.npy/.npz file or NAME:SPLIT like digits:train)")


def run_distance(args: argparse.Namespace) -> int:
    """Compute the distance described by the parsed arguments and print the JSON result."""
    start = time.perf_counter()
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max-samples must be a positive integer, got {args.max_samples}")
    points_a, labels_a = load_points(args.a, args.data_root)
    points_b, labels_b = load_points(args.b, args.data_root)
    if args.device is not None:
        device = torch.device(args.device)
        points_a, points_b = points_a.to(device), points_b.to(device)
    options: dict[str, Any] = {}
    for name in ("kernel", "bandwidth", "estimator", "p", "blur"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    use_labels = args.labels or args.metric == "otdd"
    if use_labels:
        missing = [spec for spec, labels in ((args.a, labels_a), (args.b, labels_b)) if labels is None]
        if missing:
            raise ValueError(f"labels are needed (--labels or --metric otdd) but {', '.join(missing)} has none")
    with torch.no_grad():
        value = distance(
            points_a, points_b, args.metric,
            labels_a if use_labels else None, labels_b if use_labels else None,
            class_conditional=use_labels if args.metric != "otdd" else None,
            max_samples=args.max_samples, seed=args.seed, **options,
        )
    n_a, n_b = points_a.shape[0], points_b.shape[0]
    if args.max_samples is not None:
        n_a, n_b = min(n_a, args.max_samples), min(n_b, args.max_samples)
    settings = {
        "a": args.a, "b": args.b, "labels": use_labels, "max_samples": args.max_samples, "seed": args.seed,
        **{k: v for k, v in options.items()},
    }
    result = {
        "metric": args.metric,
        "value": float(value),
        "settings": settings,
        "n_a": int(n_a),
        "n_b": int(n_b),
        "seconds": round(time.perf_counter() - start, 4),
    }
    print(json.dumps(result))
    return 0
