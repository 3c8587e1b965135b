r"""Training expert trajectories on the real data (the buffers MTT matches), resumable and atomic.

:func:`train_experts` trains ``n_experts`` networks with SGD on the real training set and stores each
one's parameters after every epoch. Every file is written atomically (:mod:`ipmcondense.files`), an
interrupted run resumes where it stopped, and corrupt expert files are retrained. Every network
trains through the library's one training loop (:func:`ipmcondense.training.train_epoch`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ipmcondense._version import __version__
from ipmcondense.augment import DifferentiableSiameseAugmentation
from ipmcondense.autodiff import FlatParameters
from ipmcondense.files import atomic_torch_save, atomic_write_json
from ipmcondense.ipm._validation import check_positive_int
from ipmcondense.nets import build_isolated, get_network
from ipmcondense.training import train_epoch

from .buffer import (
    BUFFER_FORMAT,
    BUFFER_FORMAT_VERSION,
    BUFFER_METADATA_FILE,
    ExpertBufferMismatchError,
    _expert_seed,
    _load_expert_file,
    _mismatches,
    _settings,
    _valid_expert,
    expert_file_name,
)

__all__ = ["train_experts", "ExpertTrainingReport"]


@dataclass
class ExpertTrainingReport:
    """Summary of a :func:`train_experts` call.

    Attributes:
        out_dir: the buffer directory.
        dataset, arch, epochs, num_params: the buffer's settings.
        n_experts: experts present in the buffer after the call.
        trained: indices trained by this call; ``skipped``: indices found complete and kept;
        retrained_corrupt: indices whose files were unreadable or inconsistent and were retrained.
        test_accuracy: final test accuracy of each expert in the buffer, by index.
        seconds: wall time of the call; size_bytes: total size of the expert files.
    """

    out_dir: str
    dataset: str
    arch: str
    epochs: int
    num_params: int
    n_experts: int
    trained: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    retrained_corrupt: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary."""
        return asdict(self)


@torch.no_grad()
def _accuracy(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    was_training = net.training
    net.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = net(images[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    net.train(was_training)
    return correct / max(1, images.shape[0])


def _expert_network(arch: str, dataset: Any, seed: int) -> nn.Module:
    return build_isolated(
        lambda: get_network(arch, dataset.channels, dataset.num_classes, tuple(dataset.image_size)), seed
    )


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def _train_one_expert(
    dataset: Any,
    arch: str,
    epochs: int,
    lr: float,
    batch_size: int,
    augmentation: DifferentiableSiameseAugmentation | None,
    expert_seed: int,
    device: torch.device,
    images: Tensor,
    labels: Tensor,
    on_epoch: Callable[[], None],
) -> tuple[Tensor, list[float], float]:
    net = _expert_network(arch, dataset, expert_seed).to(device)
    layout = FlatParameters(net)
    generator = torch.Generator(device=device).manual_seed(expert_seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    trajectory = torch.empty(epochs + 1, layout.numel, dtype=torch.float32)
    trajectory[0] = layout.flatten(net).float().cpu()
    train_loss: list[float] = []
    n = images.shape[0]
    net.train()
    for epoch in range(epochs):
        losses = train_epoch(net, optimizer, images, labels, batch_size, generator, augmentation=augmentation)
        total = torch.zeros((), device=device)
        for loss, size in zip(losses, _batch_sizes(n, batch_size)):
            total += loss * size
        train_loss.append(float(total) / n)
        if not math.isfinite(train_loss[-1]):
            raise ValueError(
                f"expert training diverged (loss {train_loss[-1]} at epoch {epoch + 1}); lower lr (got {lr})"
            )
        trajectory[epoch + 1] = layout.flatten(net).float().cpu()
        on_epoch()
    test_images = dataset.test_images.to(device)
    test_labels = dataset.test_labels.to(device)
    return trajectory, train_loss, _accuracy(net, test_images, test_labels)


def train_experts(
    dataset: Any,
    n_experts: int,
    epochs: int,
    out_dir: str | os.PathLike,
    arch: str = "convnet",
    lr: float = 0.01,
    batch_size: int = 256,
    augment: bool = True,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str | None = None,
    zca_eps: float | None = None,
    whitening: Any = None,
) -> ExpertTrainingReport:
    r"""Train ``n_experts`` networks on the real training set and store their trajectories (MTT buffer).

    Each expert is a fresh ``arch`` network trained with plain SGD (step ``lr``, no momentum, no
    weight decay, no decay of the step; MTT's ``buffer.py`` with ``--mom 0 --l2 0``) for ``epochs``
    epochs of shuffled mini-batches of ``batch_size``, each batch augmented with DSA (independent
    per-sample parameters, strategy :func:`~ipmcondense.augment.dsa_strategy_for`) unless
    ``augment=False``. Its parameters are recorded at initialisation and after every epoch.

    On disk (``out_dir``): ``expert_{k:03d}.pt`` holds ``{"trajectory": float32 (epochs + 1, P),
    "metadata": {...}}`` (per-epoch train loss, test accuracy, seed, settings), and ``buffer.json``
    the buffer's settings and the list of completed experts. Every file is written atomically
    (temporary file + ``os.replace``), so an interruption never leaves a half-written expert.

    Resuming: calling again with the same ``out_dir`` keeps every complete expert (files untouched),
    retrains missing or unreadable ones and adds experts up to ``n_experts``. Expert ``k`` is seeded
    from ``(seed, k)`` alone, so an extended buffer equals one trained in one go.

    Args:
        dataset: a :class:`~ipmcondense.data.LabelledImages`.
        n_experts: number of experts the buffer should hold.
        epochs: training epochs per expert (``epochs + 1`` snapshots).
        out_dir: buffer directory (created if missing).
        arch: network name for :func:`~ipmcondense.nets.get_network`.
        lr: SGD step size (MTT's ``lr_teacher``).
        batch_size: real mini-batch size.
        augment: DSA during training.
        seed: base seed (initialisation, shuffling, augmentation of every expert).
        progress: tqdm progress bar on stderr.
        device: where to train (default: the dataset's device).
        zca_eps: train on the ZCA-whitened data (:class:`~ipmcondense.whitening.DatasetWhitening` fitted on
            the full training set with this regulariser; MTT ``buffer.py --zca``, eps 0.1); the test
            accuracy is measured on the whitened test set. ``None`` (default): no whitening. Recorded in
            the buffer's settings, so a whitened buffer is never mixed with a plain one.
        whitening: an already fitted :class:`~ipmcondense.whitening.DatasetWhitening` to use instead of fitting
            one on ``dataset`` (e.g. fitted on the full training set when ``dataset`` is a subset); its
            ``eps`` is recorded as ``zca_eps``.

    Returns:
        An :class:`ExpertTrainingReport`.

    Raises:
        ExpertBufferMismatchError: ``out_dir`` holds a buffer made with other settings (the message
            lists them).

    Cost: ``n_experts * epochs`` epochs of training (about 3 network passes per image each) and
    ``4 n_experts (epochs + 1) P`` bytes on disk.
    """
    started = time.perf_counter()
    n_experts = check_positive_int(n_experts, "n_experts")
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for attr in ("name", "train_images", "train_labels", "test_images", "test_labels", "num_classes"):
        if not hasattr(dataset, attr):
            raise TypeError(
                f"dataset must be a LabelledImages (from ipmcondense.data.load_dataset), got {type(dataset).__name__}"
            )
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a network name, got {type(arch).__name__}")
    arch = arch.lower().strip()
    device = torch.device(device) if device is not None else dataset.train_images.device
    if whitening is not None:
        if zca_eps is not None and float(zca_eps) != whitening.eps:
            raise ValueError(f"zca_eps ({zca_eps}) differs from the given whitening's eps ({whitening.eps})")
        zca_eps = whitening.eps
    elif zca_eps is not None:
        from ipmcondense.whitening import DatasetWhitening

        whitening = DatasetWhitening(dataset, zca_eps)
    if whitening is not None:
        dataset = whitening.whitened_dataset(dataset)
    template = _expert_network(arch, dataset, 0)
    settings = _settings(dataset, arch, epochs, lr, batch_size, augment, int(seed), FlatParameters(template).numel,
                         zca_eps)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / BUFFER_METADATA_FILE
    previous: dict[str, Any] = {}
    if meta_path.exists():
        try:
            previous = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ExpertBufferMismatchError(
                f"{meta_path} is unreadable ({err}); remove it (the expert files are kept and checked) "
                "or use another --out directory"
            ) from err
        if previous.get("format") != BUFFER_FORMAT:
            raise ExpertBufferMismatchError(f"{meta_path} is not an ipmcondense expert buffer")
        diff = _mismatches(previous, settings)
        if diff:
            raise ExpertBufferMismatchError(
                f"the expert buffer in {str(out)!r} was made with other settings: {'; '.join(diff)}. "
                "Rerun with the buffer's settings to extend it, or pick another --out directory."
            )

    report = ExpertTrainingReport(
        out_dir=str(out), dataset=dataset.name, arch=arch, epochs=epochs,
        num_params=settings["num_params"], n_experts=0,
    )
    # leftovers of an interrupted write
    for tmp in out.glob("*.tmp"):
        tmp.unlink()

    expert_seeds = {k: _expert_seed(seed, k) for k in range(n_experts)}
    completed: dict[int, dict[str, Any]] = {}
    to_train: list[int] = []
    previous_entries = {int(e["index"]): e for e in previous.get("experts", []) if isinstance(e, dict) and "index" in e}
    highest_previous = max(previous_entries, default=-1)
    for k in range(max(n_experts, highest_previous + 1)):
        path = out / expert_file_name(k)
        seed_k = expert_seeds.get(k, _expert_seed(seed, k))
        if _valid_expert(path, k, settings, seed_k):
            meta = _load_expert_file(path)["metadata"]
            completed[k] = {"index": k, "file": path.name, "seed": seed_k, "test_accuracy": meta.get("test_accuracy")}
            if k < n_experts:
                report.skipped.append(k)
        elif k < n_experts:
            if path.exists():
                report.retrained_corrupt.append(k)
            to_train.append(k)

    def write_metadata() -> None:
        payload = {
            "format": BUFFER_FORMAT,
            "format_version": BUFFER_FORMAT_VERSION,
            **settings,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "n_experts": len(completed),
            "experts": [completed[k] for k in sorted(completed)],
            "library_version": __version__,
            "torch_version": torch.__version__,
        }
        atomic_write_json(payload, meta_path, sort_keys=True)

    write_metadata()
    images = dataset.train_images.to(device)
    labels = dataset.train_labels.to(device)
    augmentation = DifferentiableSiameseAugmentation(settings["dsa_strategy"]) if augment else None
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(to_train) * epochs, disable=not progress, desc=f"experts {dataset.name}/{arch}",
        unit="epoch", file=sys.stderr,
    )
    try:
        for k in to_train:
            trajectory, train_loss, test_accuracy = _train_one_expert(
                dataset, arch, epochs, lr, batch_size, augmentation, expert_seeds[k], device, images, labels,
                lambda: bar.update(1),
            )
            meta = {
                "index": k,
                "seed": expert_seeds[k],
                "settings": settings,
                "train_loss": train_loss,
                "test_accuracy": test_accuracy,
                "library_version": __version__,
            }
            path = out / expert_file_name(k)
            atomic_torch_save({"trajectory": trajectory.contiguous(), "metadata": meta}, path)
            completed[k] = {"index": k, "file": path.name, "seed": expert_seeds[k], "test_accuracy": test_accuracy}
            report.trained.append(k)
            write_metadata()
    finally:
        bar.close()

    report.n_experts = len(completed)
    report.test_accuracy = [float(completed[k]["test_accuracy"]) for k in sorted(completed)]
    report.size_bytes = int(sum((out / completed[k]["file"]).stat().st_size for k in completed))
    report.seconds = time.perf_counter() - started
    return report

