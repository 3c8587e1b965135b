"""``ipmcondense distance A B``: a distance between two datasets, printed as one JSON object.

``A`` and ``B`` are files, image folders or built-in dataset splits:

* ``.pt``: a tensor of points, or a dict with ``"images"``/``"labels"`` or ``"x"``/``"y"``, or a
  ``(points, labels)`` pair (loaded with ``torch.load(weights_only=True)``), taken as given;
* ``.npy``: an array of points; ``.npz``: arrays ``x``/``y`` or ``images``/``labels`` (or one array);
* ``NAME:SPLIT``: a split of a built-in dataset, e.g. ``digits:train``, ``mnist:test``
  (:func:`ipmcondense.data.load_dataset`, with ``--data-root`` for mnist, cifar10, ...);
* ``imagefolder:PATH``: every image of a folder with one sub-folder per class (labels: the sorted
  class folder names), or ``imagefolder:PATH:train`` / ``:test`` for one split of it
  (:func:`ipmcondense.data.files.load_image_folder`).

Images from built-in splits and image folders are compared in pixel space (values in [0, 1], the
dataset's normalisation undone), so a folder and a built-in split are comparable; ``--image-size N``
resizes and centre-crops them to NxN first. ``--features`` maps images before the distance:
``pixels`` (default, flattened), ``convnet`` (the embedding of a randomly initialised ConvNet-3,
seeded by ``--seed``: the random-network features of distribution matching) or a TorchScript file
(``torch.jit.save`` of a module mapping ``(N, C, H, W)`` images to ``(N, ...)`` features; TorchScript
is code, so only pass files you trust).

Output: ``{"metric", "value", "settings", "n_a", "n_b", "seconds"}`` on stdout, where ``n_a``/``n_b``
are the numbers of points compared (after ``--max-samples``).

Under ``torchrun --nproc_per_node W`` the rows of both datasets are split into ``W`` contiguous blocks; each
rank maps its block through ``--features`` and the kernel sums (``mmd``, ``mmd2``: biased or unbiased) or
mean embeddings (``mean_embedding``) are computed by :mod:`ipmcondense.ipm.sharded`, partial sums reduced in
float64: the value equals the one-process value up to float64 rounding. Rank 0 prints. Other metrics and
``--labels`` are refused under ``torchrun``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ipmcondense.commands._common import resolve_device
from ipmcondense.ipm.dataset_distance import DATASET_METRICS, distance

__all__ = ["load_points", "register", "run_distance"]

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
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="resize and centre-crop images of folders and built-in splits to NxN")
    parser.add_argument("--features", default="pixels", metavar="MAP",
                        help="feature map applied to images first: pixels (default), convnet (random ConvNet-3 "
                        "embedding, seeded by --seed) or a TorchScript .pt file")
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


def _image_points(spec: str, data_root: str | None, image_size: int | None) -> tuple[Tensor, Tensor] | None:
    """Pixel-space images and labels for ``imagefolder:PATH[:SPLIT]`` and ``NAME:SPLIT``, else ``None``."""
    from ipmcondense.data import load_dataset

    if spec.lower().startswith("imagefolder:"):
        folder, split = spec.split(":", 1)[1], None
        head, _, tail = folder.rpartition(":")
        if tail in _SPLITS and head and not Path(folder).expanduser().is_dir():
            folder, split = head, tail
        dataset = load_dataset(f"imagefolder:{folder}", image_size=image_size)
        parts = [split] if split is not None else list(_SPLITS)
    elif ":" in spec and not Path(spec).expanduser().exists():
        name, _, split = spec.rpartition(":")
        if split not in _SPLITS:
            raise ValueError(f"{spec}: the split must be one of {', '.join(_SPLITS)}, e.g. digits:train")
        from ipmcondense.data import DATASET_NAMES

        if name.lower().replace("_", "-") not in (*DATASET_NAMES, "fashionmnist"):
            raise ValueError(
                f"{spec}: unknown dataset {name!r}; expected one of: {', '.join(DATASET_NAMES)} (as NAME:SPLIT), "
                "imagefolder:PATH, or a .pt/.npy/.npz file"
            )
        dataset = load_dataset(name, data_root, image_size=image_size)
        parts = [split]
    else:
        return None
    images = [dataset.denormalise(getattr(dataset, f"{part}_images")) for part in parts]
    labels = [getattr(dataset, f"{part}_labels") for part in parts]
    return torch.cat(images), torch.cat(labels)


def load_points(
    spec: str, data_root: str | None = None, image_size: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """Points and labels (or ``None``) from a ``.pt``/``.npy``/``.npz`` file, ``imagefolder:PATH[:SPLIT]``
    or a ``NAME:SPLIT`` spec (images of folders and built-in splits in pixel space, see the module doc)."""
    path = Path(spec).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".pt":
            from ipmcondense.data.files import torch_load_weights_only

            data = torch_load_weights_only(path, "distance input")
            if isinstance(data, dict):
                points, labels = _from_mapping(data, spec)
            elif isinstance(data, (tuple, list)) and len(data) == 2:
                points, labels = data
            else:
                points, labels = data, None
        elif suffix in (".npy", ".npz"):
            try:
                if suffix == ".npy":
                    points, labels = np.load(path, allow_pickle=False), None
                else:
                    with np.load(path, allow_pickle=False) as archive:
                        points, labels = _from_mapping({k: archive[k] for k in archive.files}, spec)
            except ValueError as err:
                if "pickle" in str(err):
                    raise ValueError(f"{spec}: holds pickled objects, which are refused (allow_pickle=False)") from err
                raise
            except (OSError, EOFError) as err:
                raise ValueError(f"{spec}: corrupt or not a {suffix} file ({type(err).__name__}: {err})") from err
            except Exception as err:
                raise ValueError(f"{spec}: corrupt or not a {suffix} file ({type(err).__name__}: {err})") from err
        else:
            raise ValueError(f"{spec}: unsupported file type {suffix!r}; use .pt, .npy or .npz")
        points = _as_tensor(points, spec, "points")
        labels = _as_tensor(labels, spec, "labels") if labels is not None else None
        return points, labels
    found = _image_points(spec, data_root, image_size)
    if found is not None:
        return found
    raise FileNotFoundError(
        f"{spec}: no such file (expected a .pt/.npy/.npz file, imagefolder:PATH or NAME:SPLIT like digits:train)"
    )


def _as_tensor(value: Any, spec: str, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype == object:
        raise TypeError(f"{spec}: the {what} are an object array; store numbers")
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{spec}: the {what} are not an array of numbers ({type(value).__name__})") from err


def feature_map(name: str, seed: int) -> Any:
    """The ``--features`` map: ``None`` for pixels, else a callable from ``(N, C, H, W)`` images to ``(N, d)``."""
    if name == "pixels":
        return None
    if name == "convnet":
        from ipmcondense.nets import get_network

        def convnet(images: Tensor) -> Tensor:
            if images.dim() != 4:
                raise ValueError(f"--features convnet needs images (N, C, H, W), got points of shape {tuple(images.shape)}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = get_network("convnet", int(images.shape[1]), 10, (int(images.shape[2]), int(images.shape[3])))
            net = net.to(images.device).eval()
            return torch.cat([net.embed(chunk.float()) for chunk in images.split(256)])

        return convnet
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"--features {name!r}: expected pixels, convnet or a TorchScript file (no such file)")
    try:
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; it is what users have
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise ValueError(
            f"--features {name!r} is not a TorchScript module (save one with torch.jit.save(torch.jit.script(m), PATH)): "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        ) from err
    module.eval()

    def scripted(images: Tensor) -> Tensor:
        module.to(images.device)
        try:
            out = torch.cat([module(chunk) for chunk in images.split(256)])
        except Exception as err:
            raise ValueError(f"--features {name!r} failed on inputs of shape {tuple(images.shape)}: {err}") from err
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != images.shape[0]:
            raise ValueError(f"--features {name!r} must return one feature row per image")
        return out.reshape(out.shape[0], -1)

    return scripted


def _subsample(points: Tensor, labels: Tensor | None, n: int, seed: int) -> tuple[Tensor, Tensor | None]:
    if points.shape[0] <= n:
        return points, labels
    keep = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return points[keep.to(points.device)], None if labels is None else labels[keep.to(labels.device)]


def run_distance(args: argparse.Namespace) -> int:
    """Compute the distance described by the parsed arguments and print the JSON result."""
    start = time.perf_counter()
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max-samples must be a positive integer, got {args.max_samples}")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be a positive integer, got {args.image_size}")
    from ipmcondense.distributed import local_device, world_size

    device = resolve_device(args.device)
    if world_size() > 1:
        device = local_device(device)
    features = feature_map(args.features, args.seed)
    points_a, labels_a = load_points(args.a, args.data_root, args.image_size)
    points_b, labels_b = load_points(args.b, args.data_root, args.image_size)
    if device is not None:
        points_a, points_b = points_a.to(device), points_b.to(device)
    max_samples = args.max_samples
    if world_size() > 1:
        return _run_sharded(args, points_a, points_b, features, start)
    if features is not None:
        if max_samples is not None:  # subsample before the (costly) feature map; one seed for both sides,
            # so a dataset compared with itself gets the same subset (as in the library's distance)
            points_a, labels_a = _subsample(points_a, labels_a, max_samples, args.seed)
            points_b, labels_b = _subsample(points_b, labels_b, max_samples, args.seed)
            max_samples = None
        with torch.no_grad():
            points_a, points_b = features(points_a), features(points_b)
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
            max_samples=max_samples, seed=args.seed, **options,
        )
    n_a, n_b = points_a.shape[0], points_b.shape[0]
    if args.max_samples is not None:
        n_a, n_b = min(n_a, args.max_samples), min(n_b, args.max_samples)
    settings = {
        "a": args.a, "b": args.b, "labels": use_labels, "features": args.features, "image_size": args.image_size,
        "max_samples": args.max_samples, "seed": args.seed,
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


_SHARDED_METRICS = ("mmd", "mmd2", "mean_embedding")


def _run_sharded(args: argparse.Namespace, points_a: Tensor, points_b: Tensor, features: Any, start: float) -> int:
    """The distance with the rows split over the ranks of the ``torchrun`` job (see the module docstring)."""
    from ipmcondense.distributed import is_rank_zero, rank, row_block, world_size
    from ipmcondense.ipm.sharded import sharded_mean_embedding_distance, sharded_mmd2

    if args.metric not in _SHARDED_METRICS or args.labels:
        raise ValueError(
            f"under torchrun the distance is sharded for --metric {', '.join(_SHARDED_METRICS)} without --labels; "
            f"got --metric {args.metric}{' --labels' if args.labels else ''}: run it in one process"
        )
    if args.max_samples is not None:  # the same seeded subsets as in one process, before sharding
        points_a, _ = _subsample(points_a, None, args.max_samples, args.seed)
        points_b, _ = _subsample(points_b, None, args.max_samples, args.seed)
    world = world_size()
    for name, points in (("A", points_a), ("B", points_b)):
        if points.shape[0] < world:
            raise ValueError(f"{name} has {points.shape[0]} points, fewer than the {world} processes")
    local_a = points_a[row_block(points_a.shape[0], rank(), world)]
    local_b = points_b[row_block(points_b.shape[0], rank(), world)]
    with torch.no_grad():
        if features is not None:
            local_a, local_b = features(local_a), features(local_b)
        if args.metric == "mean_embedding":
            value = sharded_mean_embedding_distance(local_a.reshape(local_a.shape[0], -1),
                                                    local_b.reshape(local_b.shape[0], -1))
        else:
            estimator = "biased" if args.metric == "mmd" else (args.estimator or "unbiased")
            if estimator == "linear":
                raise ValueError("--estimator linear is not sharded (it pairs consecutive points): run it in one process")
            value = sharded_mmd2(local_a, local_b, kernel=args.kernel or "gaussian",
                                 bandwidth="median" if args.bandwidth is None else args.bandwidth, estimator=estimator)
            if args.metric == "mmd":
                value = value.clamp_min(0).sqrt()
    options = {k: getattr(args, k) for k in ("kernel", "bandwidth", "estimator") if getattr(args, k) is not None}
    result = {
        "metric": args.metric,
        "value": float(value),
        "settings": {"a": args.a, "b": args.b, "labels": False, "features": args.features,
                     "image_size": args.image_size, "max_samples": args.max_samples, "seed": args.seed,
                     "processes": world, **options},
        "n_a": int(points_a.shape[0]),
        "n_b": int(points_b.shape[0]),
        "seconds": round(time.perf_counter() - start, 4),
    }
    if is_rank_zero():
        print(json.dumps(result))
    return 0
