"""The standard evaluation protocol of dataset condensation, with every deviation an explicit option.

A condensed set :math:`S` is judged by training fresh networks on :math:`S` alone and measuring their
accuracy on the full real test set. :class:`EvaluationProtocol` reproduces the VICO-UoE protocol
(DC/DSA/DM, ``utils.py: evaluate_synset``) exactly by default:

- network ``arch="convnet"`` (ConvNet-3, width 128, instance norm, ReLU, average pooling), freshly
  initialised with PyTorch's defaults from a recorded seed;
- SGD with learning rate 0.01, momentum 0.9, weight decay 5e-4, batch 256, cross-entropy on hard labels;
- ``Epoch = 1000`` with augmentation (DSA with independent per-sample parameters, one family per
  batch) and ``Epoch = 300`` without; the loop runs over **Epoch + 1** epochs;
- after epoch ``Epoch // 2 + 1`` has been trained, the learning rate is multiplied by 0.1 and the
  optimizer is **re-created** (its momentum buffers are reset), so epochs ``0 .. Epoch//2+1`` use
  ``lr`` and epochs ``Epoch//2+2 .. Epoch`` use ``0.1 lr`` (see
  :meth:`EvaluationProtocol.learning_rate_schedule`);
- the test accuracy on the full test set (batch 256, eval mode) is measured once, at the end.

Deviations used by other codebases are named options: ``learned_lr`` (MTT, DATM), ``learned_schedule``
(DD: the distilled schedule of plain gradient steps replayed instead of the epoch loop), ``soft_labels``
(DATM, soft cross-entropy), ``zca`` (MTT/KIP/FRePo-style ZCA whitening fitted on the real training
set in pixel scale, :class:`~ipmcondense.whitening.DatasetWhitening`), ``arch`` (any :func:`ipmcondense.nets.get_network` name) and ``epochs``.

Model ``i`` of :func:`evaluate_synthetic` uses seed ``seed + i`` for its initialisation, its
shuffling and its augmentation, so every accuracy is reproducible on a given device.

Cost per model: ``(Epoch + 1) * ceil(n / 256)`` SGD steps on ``n`` training images plus one pass over
the test set; data are moved to the device once, and a set of ``n <= 256`` images is one batch per
epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ipmcondense.distributed import all_gather_objects, items_of_rank
from ipmcondense.augment import DifferentiableSiameseAugmentation, NoAugmentation, dsa_strategy_for
from ipmcondense.ipm._validation import check_choice, check_positive, check_positive_int
from ipmcondense.nets import NETWORK_NAMES, build_isolated, get_network
from ipmcondense.training import PRECISIONS, autocast, train_epoch, train_on_batches
from ipmcondense.whitening import DatasetWhitening, ZCAWhitening  # noqa: F401 (ZCAWhitening re-exported)

__all__ = [
    "LearnedSchedule",
    "EvaluationProtocol",
    "EvaluationResult",
    "build_network",
    "train_network",
    "classification_accuracy",
    "train_and_test",
    "evaluate_synthetic",
]

EpochCallback = Callable[[int, torch.optim.Optimizer, Tensor], None]


@dataclass(frozen=True)
class LearnedSchedule:
    r"""A training schedule learned together with a synthetic set (DD, Wang et al. 2018).

    Training replays it on a fresh network: for :math:`t = 0, \dots, T-1` one plain gradient step
    :math:`\theta \leftarrow \theta - \eta_t \nabla_\theta \mathrm{CE}(f_\theta(X_{B_t}), Y_{B_t})`
    (no momentum, no weight decay, no augmentation), as ssnl/dataset-distillation's ``evaluate_steps``.

    Attributes:
        batches: ``T`` tuples of indices into the synthetic set, :math:`B_t`.
        step_sizes: ``T`` positive step sizes :math:`\eta_t`.
    """

    batches: tuple[tuple[int, ...], ...]
    step_sizes: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "batches", tuple(tuple(int(i) for i in b) for b in self.batches))
        object.__setattr__(self, "step_sizes", tuple(float(v) for v in self.step_sizes))
        if not self.step_sizes or len(self.batches) != len(self.step_sizes):
            raise ValueError(
                f"learned_schedule needs one batch per step size and at least one step, got {len(self.batches)} "
                f"batches and {len(self.step_sizes)} step sizes"
            )
        for value in self.step_sizes:
            check_positive(value, "learned_schedule step size")
        if any(not b or min(b) < 0 for b in self.batches):
            raise ValueError("every learned_schedule batch must hold at least one non-negative image index")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearnedSchedule:
        """From :meth:`to_dict` (as saved in ``synthetic.pt``)."""
        return cls(batches=tuple(tuple(b) for b in data["batches"]), step_sizes=tuple(data["step_sizes"]))

    def to_dict(self) -> dict[str, Any]:
        """``{"batches": [[...], ...], "step_sizes": [...]}`` (JSON- and ``weights_only``-loadable)."""
        return {"batches": [list(b) for b in self.batches], "step_sizes": list(self.step_sizes)}


@dataclass
class EvaluationProtocol:
    """How a condensed set is evaluated; the defaults are the VICO-UoE protocol (DC, DSA, DM).

    Attributes:
        arch: network name for :func:`ipmcondense.nets.get_network` (default ``"convnet"``).
        epochs: ``Epoch``; ``None`` means 1000 with augmentation and 300 without. The loop trains
            ``Epoch + 1`` epochs.
        lr: SGD learning rate before the decay (0.01).
        momentum: SGD momentum (0.9).
        weight_decay: SGD weight decay (5e-4).
        batch_size: training batch size (256).
        augmentation: ``"dsa"`` (per-sample DSA) or ``"none"``.
        learned_lr: deviation (MTT/DATM): a learned learning rate used instead of ``lr``.
        learned_schedule: deviation (DD): a :class:`LearnedSchedule` replayed instead of the epoch loop
            (``epochs``, ``lr``, ``momentum``, ``weight_decay``, ``batch_size`` and ``augmentation`` are then unused).
        soft_labels: deviation (DATM): train with soft cross-entropy on ``(n, num_classes)`` label
            distributions instead of hard labels.
        zca: deviation (MTT/KIP/RFAD/RCIG/FRePo): whiten inputs with
            :class:`~ipmcondense.whitening.DatasetWhitening` (``eps=0.1``) fitted on the dataset's real
            training images in pixel scale; the test images are whitened, and the training images too
            unless the caller says they already are (``inputs_whitened``).
        zca_eps: the ZCA regulariser (0.1 as in MTT).
        dsa_strategy: DSA strategy; ``None`` means :func:`ipmcondense.augment.dsa_strategy_for`
            the dataset (flip dropped for digit-like data).
        test_batch_size: batch size of the final test pass (256).
        lr_decay: factor applied to the learning rate at the decay point (0.1).
        precision: ``"float32"`` (the reference) or ``"bfloat16"``: deviation (library option, the
            ``fast`` profile of ``benchmarks/time_to_accuracy.py``): the networks' forward passes in
            training and test run under bfloat16 autocast (:func:`ipmcondense.training.autocast`).
    """

    arch: str = "convnet"
    epochs: int | None = None
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    augmentation: str = "dsa"
    learned_lr: float | None = None
    learned_schedule: LearnedSchedule | None = None
    soft_labels: bool = False
    zca: bool = False
    zca_eps: float = 0.1
    dsa_strategy: str | None = None
    test_batch_size: int = 256
    lr_decay: float = 0.1
    precision: str = "float32"

    def __post_init__(self) -> None:
        key = self.arch.lower().strip() if isinstance(self.arch, str) else self.arch
        self.arch = check_choice(key, NETWORK_NAMES, "arch")
        check_choice(self.augmentation, ("dsa", "none"), "augmentation")
        check_choice(self.precision, PRECISIONS, "precision")
        if self.epochs is not None and (
            isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0
        ):
            raise ValueError(f"epochs must be a non-negative integer or None, got {self.epochs!r}")
        for name in ("batch_size", "test_batch_size"):
            check_positive_int(getattr(self, name), name)
        check_positive(self.lr, "lr")
        check_positive(self.momentum, "momentum", allow_zero=True)
        check_positive(self.weight_decay, "weight_decay", allow_zero=True)
        check_positive(self.lr_decay, "lr_decay")
        check_positive(self.zca_eps, "zca_eps")
        if self.learned_lr is not None:
            check_positive(self.learned_lr, "learned_lr")
        if self.learned_schedule is not None and not isinstance(self.learned_schedule, LearnedSchedule):
            raise TypeError(f"learned_schedule must be a LearnedSchedule or None, got {type(self.learned_schedule).__name__}")
        if self.dsa_strategy is not None:
            DifferentiableSiameseAugmentation(self.dsa_strategy)  # validates the family names

    @property
    def total_epochs(self) -> int:
        """``Epoch``: the configured value, else 1000 with augmentation and 300 without."""
        if self.epochs is not None:
            return self.epochs
        return 1000 if self.augmentation == "dsa" else 300

    @property
    def decay_epoch(self) -> int:
        """``Epoch // 2 + 1``: the epoch after which the learning rate drops and SGD is re-created."""
        return self.total_epochs // 2 + 1

    @property
    def base_lr(self) -> float:
        """The learning rate before the decay: ``learned_lr`` when given, else ``lr``."""
        return float(self.learned_lr) if self.learned_lr is not None else float(self.lr)

    def learning_rate_schedule(self) -> list[float]:
        """Learning rate of each of the ``Epoch + 1`` epochs.

        ``base_lr`` for epochs ``0 .. Epoch//2 + 1`` and ``lr_decay * base_lr`` afterwards (the
        reference loop decays after training epoch ``Epoch//2 + 1``: ``if ep in [Epoch//2+1]`` at
        the end of the epoch). With ``Epoch <= 1`` no epoch follows the decay point.
        """
        base, decay = self.base_lr, self.decay_epoch
        return [base if epoch <= decay else base * self.lr_decay for epoch in range(self.total_epochs + 1)]

    def augmentation_for(self, dataset: Any) -> DifferentiableSiameseAugmentation | NoAugmentation:
        """The training augmentation for ``dataset`` (per-sample DSA, or the identity)."""
        if self.augmentation == "none":
            return NoAugmentation()
        strategy = self.dsa_strategy if self.dsa_strategy is not None else dsa_strategy_for(dataset)
        return DifferentiableSiameseAugmentation(strategy)

    def to_dict(self) -> dict[str, Any]:
        """All fields plus the resolved ``total_epochs`` and ``base_lr`` (JSON-serialisable)."""
        out = asdict(self)
        out["total_epochs"] = self.total_epochs
        out["base_lr"] = self.base_lr
        return out


@dataclass
class EvaluationResult:
    """Test accuracies of ``n_models`` networks trained on one condensed set.

    Attributes:
        accuracy_mean: mean test accuracy in ``[0, 1]``.
        accuracy_std: population standard deviation (``ddof=0``, as ``np.std`` in the reference).
        accuracies: one accuracy per model.
        seeds: the seed of each model (``seed + i``).
        n_models: number of models.
        protocol: :meth:`EvaluationProtocol.to_dict` of the protocol used.
        dataset: the dataset's name.
        train_size: number of training images (the condensed set's size).
        wall_seconds: training-plus-test wall time of each model (informative, not reproducible).
    """

    accuracy_mean: float
    accuracy_std: float
    accuracies: list[float]
    seeds: list[int]
    n_models: int
    protocol: dict[str, Any]
    dataset: str = ""
    train_size: int = 0
    wall_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary of every field."""
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.dataset or 'dataset'}: {100 * self.accuracy_mean:.2f} +- {100 * self.accuracy_std:.2f} % "
            f"over {self.n_models} {self.protocol.get('arch', '')} models (n={self.train_size})"
        )


# ----------------------------------------------------------------------------------- building blocks
def _resolve_device(device: torch.device | str | None, like: Tensor) -> torch.device:
    return torch.device(device) if device is not None else like.device


def build_network(
    protocol: EvaluationProtocol, dataset: Any, seed: int, device: torch.device | str | None = None
) -> nn.Module:
    """A fresh ``protocol.arch`` network for ``dataset``, initialised under ``torch.manual_seed(seed)``.

    The global RNG state is restored afterwards (``torch.random.fork_rng``), so building a network
    does not disturb the caller's randomness.
    """
    network = build_isolated(
        lambda: get_network(protocol.arch, dataset.channels, dataset.num_classes, tuple(dataset.image_size)), seed
    )
    return network.to(device) if device is not None else network


def _check_labels(labels: Tensor, n: int, num_classes: int, soft: bool) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"train_labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape[0] != n:
        raise ValueError(f"train_labels must have one entry per training image ({n}), got {labels.shape[0]}")
    if soft:
        if labels.dim() != 2 or labels.shape[1] != num_classes or not labels.is_floating_point():
            raise ValueError(
                f"soft_labels=True needs train_labels of shape (n, {num_classes}) holding class "
                f"distributions, got shape {tuple(labels.shape)} and dtype {labels.dtype}"
            )
        detached = labels.detach()
        if not bool(torch.isfinite(detached).all()) or bool((detached < 0).any()):
            raise ValueError("soft train_labels must be finite and non-negative (apply softmax to logits)")
        if not torch.allclose(detached.sum(dim=1), torch.ones_like(detached[:, 0]), atol=1e-4):
            raise ValueError("each row of soft train_labels must sum to 1 (apply softmax to logits)")
        return detached
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(
            "train_labels must be a vector of integer class indices (n,) for hard labels, got shape "
            f"{tuple(labels.shape)} and dtype {labels.dtype}; pass soft_labels=True for (n, C) distributions"
        )
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"train_labels must lie in [0, {num_classes}), "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels.detach().long()


def train_network(
    network: nn.Module,
    images: Tensor,
    labels: Tensor,
    protocol: EvaluationProtocol,
    generator: torch.Generator,
    augmentation: DifferentiableSiameseAugmentation | NoAugmentation | None = None,
    epoch_callback: EpochCallback | None = None,
) -> nn.Module:
    """Train ``network`` in place on ``(images, labels)`` with the protocol's schedule.

    SGD(``base_lr``, momentum, weight decay) is created at the start; after epoch
    ``protocol.decay_epoch`` it is replaced by a new SGD with ``lr_decay * base_lr`` (fresh momentum
    buffers), as in the reference. Each epoch shuffles with ``torch.randperm(generator)`` and walks
    mini-batches of ``batch_size`` (the last one may be smaller); each batch is augmented with
    independent per-sample parameters. The loss is cross-entropy on hard labels, or on label
    distributions when ``protocol.soft_labels``.

    With ``protocol.learned_schedule`` (DD) the epoch loop is replaced by the replay of that schedule:
    step ``t`` is one plain gradient step (SGD without momentum or weight decay, no augmentation) with
    step size ``step_sizes[t]`` on the images ``batches[t]``; ``epoch_callback`` is called after every step.

    Args:
        network: the model (already on the images' device).
        images: ``(n, C, H, W)`` training images on the training device (detached).
        labels: ``(n,)`` int64 or ``(n, num_classes)`` distributions on the same device.
        protocol: the evaluation protocol.
        generator: drives shuffling and augmentation; must live on the images' device.
        augmentation: callable ``(x, generator) -> x`` (default ``NoAugmentation()``).
        epoch_callback: called as ``epoch_callback(epoch, optimizer, last_batch_loss)`` after each
            epoch, after the decay (the optimizer passed is the one used by the next epoch).
    """
    if protocol.learned_schedule is not None:
        return _replay_schedule(network, images, labels, protocol, epoch_callback)
    augmentation = augmentation if augmentation is not None else NoAugmentation()
    schedule = protocol.learning_rate_schedule()

    def make_optimizer(lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            network.parameters(), lr=lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay
        )

    optimizer = make_optimizer(schedule[0])
    network.train()
    for epoch in range(len(schedule)):
        losses = train_epoch(network, optimizer, images, labels, protocol.batch_size, generator,
                             augmentation=augmentation, precision=protocol.precision)
        loss = losses[-1] if losses else images.new_zeros(())
        if epoch == protocol.decay_epoch and epoch + 1 < len(schedule):
            optimizer = make_optimizer(schedule[epoch + 1])
        if epoch_callback is not None:
            epoch_callback(epoch, optimizer, loss.detach())
    return network


def _replay_schedule(network, images, labels, protocol, epoch_callback):
    schedule = protocol.learned_schedule
    n = images.shape[0]
    if max(max(b) for b in schedule.batches) >= n:
        raise ValueError(f"learned_schedule indexes image {max(max(b) for b in schedule.batches)} but the set "
                         f"holds {n} images")
    optimizer = torch.optim.SGD(network.parameters(), lr=schedule.step_sizes[0], momentum=0.0, weight_decay=0.0)
    network.train()
    for t, (batch, step_size) in enumerate(zip(schedule.batches, schedule.step_sizes)):
        for group in optimizer.param_groups:
            group["lr"] = step_size
        index = torch.tensor(batch, dtype=torch.long, device=images.device)
        losses = train_on_batches(network, optimizer, [(images[index], labels[index])], precision=protocol.precision)
        if epoch_callback is not None:
            epoch_callback(t, optimizer, losses[-1])
    return network


@torch.no_grad()
def classification_accuracy(
    network: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256, *, precision: str = "float32"
) -> float:
    """Top-1 accuracy of ``network`` (in eval mode) on ``(images, labels)``, in batches (forward passes
    under ``precision``, :func:`ipmcondense.training.autocast`)."""
    network.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        with autocast(precision, images.device):
            logits = network(images[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    return correct / max(images.shape[0], 1)


def _prepare_training_set(
    train_images: Tensor,
    train_labels: Tensor,
    dataset: Any,
    protocol: EvaluationProtocol,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    if not isinstance(train_images, Tensor) or train_images.dim() != 4:
        shape = tuple(train_images.shape) if isinstance(train_images, Tensor) else type(train_images).__name__
        raise ValueError(f"train_images must be a tensor of shape (n, C, H, W), got {shape}")
    if train_images.shape[0] == 0:
        raise ValueError("train_images is empty: it needs at least one image")
    expected = (dataset.channels, *tuple(dataset.image_size))
    if tuple(train_images.shape[1:]) != expected:
        raise ValueError(
            f"train_images must have shape (n, {expected[0]}, {expected[1]}, {expected[2]}) like "
            f"the dataset, got {tuple(train_images.shape)}"
        )
    images = train_images.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(images).all()):
        raise ValueError("train_images contains NaN or inf values")
    labels = _check_labels(train_labels, images.shape[0], dataset.num_classes, protocol.soft_labels)
    labels = labels.to(device=device, dtype=torch.float32 if protocol.soft_labels else torch.long)
    return images, labels


def _train_and_test_prepared(
    images: Tensor,
    labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    dataset: Any,
    protocol: EvaluationProtocol,
    seed: int,
    epoch_callback: EpochCallback | None,
) -> float:
    device = images.device
    network = build_network(protocol, dataset, seed, device)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    augmentation = protocol.augmentation_for(dataset)
    train_network(network, images, labels, protocol, generator, augmentation, epoch_callback)
    return classification_accuracy(network, test_images, test_labels, protocol.test_batch_size,
                                   precision=protocol.precision)


def _prepare_test_set(dataset: Any, device: torch.device, zca: DatasetWhitening | None) -> tuple[Tensor, Tensor]:
    test_images = dataset.test_images.to(device=device, dtype=torch.float32)
    if zca is not None:
        test_images = zca.transform(test_images)
    return test_images, dataset.test_labels.to(device=device, dtype=torch.long)


def _fit_zca(dataset: Any, protocol: EvaluationProtocol, whitening: DatasetWhitening | None = None
             ) -> DatasetWhitening | None:
    if not protocol.zca:
        return None
    if whitening is not None:
        if whitening.eps != protocol.zca_eps or whitening.dataset_name != str(dataset.name):
            raise ValueError(
                f"whitening was fitted on {whitening.dataset_name!r} with eps {whitening.eps}, but the protocol "
                f"asks for {dataset.name!r} with zca_eps {protocol.zca_eps}"
            )
        return whitening
    return DatasetWhitening(dataset, protocol.zca_eps)


def train_and_test(
    train_images: Tensor,
    train_labels: Tensor,
    dataset: Any,
    protocol: EvaluationProtocol | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    *,
    inputs_whitened: bool = False,
    epoch_callback: EpochCallback | None = None,
) -> float:
    """Train one fresh network on ``(train_images, train_labels)`` and return its test accuracy.

    Args:
        train_images: ``(n, C, H, W)`` images in the dataset's normalised space (detached inside).
        train_labels: ``(n,)`` class indices, or ``(n, num_classes)`` distributions with
            ``protocol.soft_labels``.
        dataset: a :class:`ipmcondense.data.LabelledImages` (test set, shape, class count).
        protocol: the evaluation protocol (default :class:`EvaluationProtocol()`).
        seed: initialisation, shuffling and augmentation seed of this model.
        device: training device (default the device of ``train_images``).
        inputs_whitened: with ``protocol.zca``, set ``True`` when ``train_images`` are already in the
            ZCA space (e.g. condensed there); otherwise they are whitened like the test set.
        epoch_callback: see :func:`train_network`.

    Returns:
        Test accuracy in ``[0, 1]`` on the full test set, measured once after training.
    """
    protocol = protocol if protocol is not None else EvaluationProtocol()
    device = _resolve_device(device, train_images)
    images, labels = _prepare_training_set(train_images, train_labels, dataset, protocol, device)
    zca = _fit_zca(dataset, protocol)
    if zca is not None and not inputs_whitened:
        images = zca.transform(images)
    test_images, test_labels = _prepare_test_set(dataset, device, zca)
    return _train_and_test_prepared(
        images, labels, test_images, test_labels, dataset, protocol, seed, epoch_callback
    )


def evaluate_synthetic(
    images: Tensor,
    labels: Tensor,
    dataset: Any,
    protocol: EvaluationProtocol | None = None,
    n_models: int = 5,
    seed: int = 0,
    device: torch.device | str | None = None,
    *,
    inputs_whitened: bool = False,
    whitening: DatasetWhitening | None = None,
    spread_over_ranks: bool = False,
) -> EvaluationResult:
    """Train ``n_models`` fresh networks on a condensed set and summarise their test accuracies.

    Model ``i`` uses seed ``seed + i``; the data (and the ZCA transform, with ``protocol.zca``) are
    prepared once. See :func:`train_and_test` for the arguments; ``whitening`` is an already fitted
    :class:`~ipmcondense.whitening.DatasetWhitening` of ``dataset`` to reuse with ``protocol.zca``
    (it must have the protocol's ``zca_eps``).

    ``spread_over_ranks`` (inside an initialised ``torch.distributed`` process group, e.g. under
    ``torchrun``; a collective: every rank calls it with the same arguments): rank ``r`` of ``W`` trains the
    models ``i`` with ``i % W == r`` and the accuracies are all-gathered, so every rank returns the result of
    the serial run (each model keeps its seed ``seed + i``; ``wall_seconds`` are each model's own time).
    Without a process group it is the serial run.

    Returns:
        An :class:`EvaluationResult` (mean, population std, per-model accuracies and seeds, protocol).
    """
    check_positive_int(n_models, "n_models")
    protocol = protocol if protocol is not None else EvaluationProtocol()
    device = _resolve_device(device, images)
    train_images, train_labels = _prepare_training_set(images, labels, dataset, protocol, device)
    zca = _fit_zca(dataset, protocol, whitening)
    if zca is not None and not inputs_whitened:
        train_images = zca.transform(train_images)
    test_images, test_labels = _prepare_test_set(dataset, device, zca)
    seeds = [int(seed) + i for i in range(n_models)]
    mine = items_of_rank(n_models) if spread_over_ranks else list(range(n_models))
    done: dict[int, tuple[float, float]] = {}
    for index in mine:
        start = time.perf_counter()
        accuracy = _train_and_test_prepared(
            train_images, train_labels, test_images, test_labels, dataset, protocol, seeds[index], None
        )
        done[index] = (accuracy, time.perf_counter() - start)
    if spread_over_ranks:
        for part in all_gather_objects(done):
            done.update(part)
    accuracies = [done[i][0] for i in range(n_models)]
    seconds = [done[i][1] for i in range(n_models)]
    return EvaluationResult(
        accuracy_mean=float(np.mean(accuracies)),
        accuracy_std=float(np.std(accuracies)),
        accuracies=accuracies,
        seeds=seeds,
        n_models=n_models,
        protocol=protocol.to_dict(),
        dataset=str(getattr(dataset, "name", "")),
        train_size=int(train_images.shape[0]),
        wall_seconds=seconds,
    )
