r"""Expert buffers on disk: the SGD trajectories of networks trained on the real data (for MTT).

A buffer directory holds ``buffer.json`` (the settings: dataset, architecture, epochs, learning rate,
batch size, augmentation, seed; the list of completed experts) and one ``expert_XXXX.pt`` per expert
with its ``(epochs + 1, P)`` trajectory of flat parameter vectors. :func:`ipmcondense.trajectories.train_experts`
writes it; :class:`ExpertBuffer` reads it back, checks that it fits the dataset and architecture asked
for, and samples ``(start, target)`` pairs for trajectory matching.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ipmcondense.augment import dsa_strategy_for
from ipmcondense.autodiff import load_flat_parameters
from ipmcondense.data.files import torch_load_weights_only
from ipmcondense.ipm._validation import check_positive_int
from ipmcondense.nets import build_isolated, get_network

__all__ = [
    "ExpertBuffer",
    "ExpertSample",
    "ExpertBufferNotFoundError",
    "ExpertBufferMismatchError",
    "BUFFER_METADATA_FILE",
    "BUFFER_FORMAT",
    "BUFFER_FORMAT_VERSION",
    "expert_file_name",
]

#: Name of the metadata file of an expert buffer directory.
BUFFER_METADATA_FILE = "buffer.json"
#: Value of the ``"format"`` key of ``buffer.json``.
BUFFER_FORMAT = "ipmcondense-expert-buffer"
#: Version of the on-disk layout (bumped on incompatible changes).
BUFFER_FORMAT_VERSION = 1


class ExpertBufferNotFoundError(FileNotFoundError, ValueError):
    """No expert buffer at the given path (the message says how to create one)."""


class ExpertBufferMismatchError(ValueError):
    """An expert buffer was made for another dataset, architecture or training setting."""


def expert_file_name(index: int) -> str:
    """File name of expert ``index`` inside a buffer directory: ``expert_{index:03d}.pt``."""
    return f"expert_{int(index):03d}.pt"


def _create_command(dataset: str = "NAME", arch: str | None = None, path: str | os.PathLike = "DIR") -> str:
    arch_part = f" --arch {arch}" if arch else ""
    return f"ipmcondense experts --dataset {dataset}{arch_part} --n-experts K --epochs E --out {path}"


def _expert_seed(seed: int, index: int) -> int:
    """Independent seed of expert ``index`` of a buffer seeded with ``seed`` (stable when adding experts)."""
    return int(np.random.SeedSequence(entropy=int(seed), spawn_key=(int(index),)).generate_state(1, np.uint64)[0] >> 1)


_SETTING_KEYS = (
    "dataset",
    "image_shape",
    "num_classes",
    "train_size",
    "arch",
    "num_params",
    "epochs",
    "lr",
    "batch_size",
    "augment",
    "dsa_strategy",
    "seed",
    "zca_eps",
)


def _settings(
    dataset: Any, arch: str, epochs: int, lr: float, batch_size: int, augment: bool, seed: int, num_params: int,
    zca_eps: float | None = None,
) -> dict[str, Any]:
    return {
        "dataset": dataset.name,
        "image_shape": [int(s) for s in dataset.train_images.shape[1:]],
        "num_classes": int(dataset.num_classes),
        "train_size": int(dataset.train_images.shape[0]),
        "arch": arch,
        "num_params": int(num_params),
        "epochs": int(epochs),
        "lr": float(lr),
        "batch_size": int(batch_size),
        "augment": bool(augment),
        "dsa_strategy": dsa_strategy_for(dataset) if augment else None,
        "seed": int(seed),
        "zca_eps": None if zca_eps is None else float(zca_eps),
    }


def _mismatches(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    return [
        f"{key}={stored.get(key)!r} (buffer) vs {requested[key]!r} (requested)"
        for key in _SETTING_KEYS
        if stored.get(key) != requested[key]
    ]


def _load_expert_file(path: Path, *, mmap: bool = True) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # noqa: BLE001 - older files or file systems without mmap; errors named below
        data = torch_load_weights_only(path, "expert file")
    if not isinstance(data, dict) or "trajectory" not in data or "metadata" not in data:
        raise ValueError(f"{path} is not an ipmcondense expert file (expected keys 'trajectory' and 'metadata')")
    return data


def _valid_expert(path: Path, index: int, settings: dict[str, Any], expert_seed: int) -> bool:
    """Whether ``path`` holds a complete, readable expert ``index`` made with ``settings``."""
    if not path.is_file():
        return False
    try:
        data = _load_expert_file(path)
        trajectory, meta = data["trajectory"], data["metadata"]
        shape_ok = tuple(trajectory.shape) == (settings["epochs"] + 1, settings["num_params"])
        meta_ok = (
            meta.get("index") == index
            and meta.get("seed") == expert_seed
            and not _mismatches(meta.get("settings", {}), settings)
        )
        return bool(shape_ok and meta_ok and torch.isfinite(trajectory).all())
    except Exception:  # noqa: BLE001 - any unreadable file (truncated zip, bad pickle) is retrained
        return False


class ExpertSample(NamedTuple):
    """One draw from an :class:`ExpertBuffer`: the student's start and the expert's target.

    Attributes:
        expert_index: which expert.
        start_epoch: :math:`t`.
        params_start: :math:`\\theta^*_t` ``(P,)``.
        params_target: :math:`\\theta^*_{t+M}` ``(P,)``.
    """

    expert_index: int
    start_epoch: int
    params_start: Tensor
    params_target: Tensor


class ExpertBuffer:
    """Read access to a directory of expert trajectories written by :func:`~ipmcondense.trajectories.experts.train_experts`.

    Expert files are opened memory-mapped and only the two snapshots of a draw are copied, so a
    buffer larger than memory can be sampled. Experts are addressed by their position
    ``0 .. n_experts - 1`` among the completed ones (equal to the file index ``k`` of
    ``expert_{k:03d}.pt`` unless a buffer has gaps; :meth:`indices` gives the mapping).

    Args:
        path: the buffer directory.
        dataset: optional dataset (a :class:`~ipmcondense.data.LabelledImages` or a name) to check
            against, see :meth:`check_compatible`.
        arch: optional network name to check against.

    Raises:
        ExpertBufferNotFoundError: no directory or no ``buffer.json`` (the message gives the
            ``ipmcondense experts`` command that creates one).
        ExpertBufferMismatchError: incompatible ``dataset`` / ``arch``.
    """

    def __init__(self, path: str | os.PathLike, dataset: Any = None, arch: str | None = None) -> None:
        self.path = Path(path)
        name = getattr(dataset, "name", dataset) if dataset is not None else "NAME"
        meta_path = self.path / BUFFER_METADATA_FILE
        if not self.path.is_dir() or not meta_path.is_file():
            what = "directory" if not self.path.is_dir() else f"{BUFFER_METADATA_FILE} in the directory"
            raise ExpertBufferNotFoundError(
                f"no expert buffer at {str(self.path)!r} (missing {what}); create one with: "
                f"{_create_command(str(name), arch, self.path)}"
            )
        try:
            self.metadata: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ExpertBufferMismatchError(f"{meta_path} is unreadable: {err}") from err
        if self.metadata.get("format") != BUFFER_FORMAT:
            raise ExpertBufferMismatchError(f"{meta_path} is not an ipmcondense expert buffer")
        if int(self.metadata.get("format_version", -1)) > BUFFER_FORMAT_VERSION:
            raise ExpertBufferMismatchError(
                f"{meta_path} has format version {self.metadata.get('format_version')}, newer than this "
                f"library's {BUFFER_FORMAT_VERSION}; upgrade ipmcondense"
            )
        self._files = [self.path / e["file"] for e in self.metadata.get("experts", [])]
        self._indices = [int(e["index"]) for e in self.metadata.get("experts", [])]
        if not self._files:
            raise ExpertBufferNotFoundError(
                f"the expert buffer at {str(self.path)!r} holds no completed expert yet; finish it with: "
                f"{_create_command(self.metadata.get('dataset', 'NAME'), self.metadata.get('arch'), self.path)}"
            )
        self._cache: dict[int, Tensor] = {}
        if dataset is not None or arch is not None:
            self.check_compatible(dataset, arch)

    def __repr__(self) -> str:
        return (
            f"ExpertBuffer({str(self.path)!r}, dataset={self.dataset_name!r}, arch={self.arch!r}, "
            f"n_experts={self.n_experts}, epochs={self.epochs})"
        )

    def __len__(self) -> int:
        return self.n_experts

    # ----------------------------------------------------------------------------- properties
    @property
    def n_experts(self) -> int:
        """Number of completed experts."""
        return len(self._files)

    @property
    def epochs(self) -> int:
        """Training epochs per expert (each trajectory has ``epochs + 1`` snapshots)."""
        return int(self.metadata["epochs"])

    @property
    def num_params(self) -> int:
        """Parameter count ``P`` of the network."""
        return int(self.metadata["num_params"])

    @property
    def arch(self) -> str:
        """Network name."""
        return str(self.metadata["arch"])

    @property
    def zca_eps(self) -> float | None:
        """The ZCA regulariser of the whitened data the experts were trained on; ``None``: not whitened."""
        value = self.metadata.get("zca_eps")
        return None if value is None else float(value)

    @property
    def dataset_name(self) -> str:
        """Name of the dataset the experts were trained on."""
        return str(self.metadata["dataset"])

    @property
    def lr(self) -> float:
        """The experts' SGD step size (MTT's ``lr_teacher``, the usual init of the learnable ``syn_lr``)."""
        return float(self.metadata["lr"])

    # ------------------------------------------------------------------------------- checking
    def check_compatible(self, dataset: Any = None, arch: str | None = None) -> None:
        """Raise :class:`ExpertBufferMismatchError` unless the buffer fits ``dataset`` and ``arch``.

        ``dataset`` may be a name (name compared) or a :class:`~ipmcondense.data.LabelledImages`
        (name, image shape and class count compared); ``arch`` is compared case-insensitively.
        The message names each mismatch and the command that makes a matching buffer.
        """
        problems: list[str] = []
        name = None
        if dataset is not None:
            name = dataset if isinstance(dataset, str) else getattr(dataset, "name", None)
            if name is None:
                raise TypeError(f"dataset must be a name or a LabelledImages, got {type(dataset).__name__}")
            if name.lower() != self.dataset_name.lower():
                problems.append(f"dataset {self.dataset_name!r} (buffer) vs {name!r} (requested)")
            elif not isinstance(dataset, str):
                shape = [int(s) for s in dataset.train_images.shape[1:]]
                if shape != list(self.metadata["image_shape"]):
                    problems.append(f"image shape {self.metadata['image_shape']} (buffer) vs {shape} (requested)")
                if int(dataset.num_classes) != int(self.metadata["num_classes"]):
                    problems.append(
                        f"num_classes {self.metadata['num_classes']} (buffer) vs {dataset.num_classes} (requested)"
                    )
        if arch is not None:
            if not isinstance(arch, str):
                raise TypeError(f"arch must be a network name, got {type(arch).__name__}")
            if arch.lower().strip() != self.arch.lower():
                problems.append(f"arch {self.arch!r} (buffer) vs {arch!r} (requested)")
        if problems:
            raise ExpertBufferMismatchError(
                f"the expert buffer at {str(self.path)!r} does not fit: {'; '.join(problems)}. "
                f"Make a matching buffer with: {_create_command(name or self.dataset_name, arch or self.arch, 'DIR')}"
            )

    # --------------------------------------------------------------------------------- access
    def trajectory(self, expert_index: int) -> Tensor:
        """Expert ``expert_index``'s trajectory, float32 ``(epochs + 1, P)`` (memory-mapped, CPU; do not modify)."""
        position = self._position(expert_index)
        if position not in self._cache:
            path = self._files[position]
            if not path.is_file():
                raise ExpertBufferNotFoundError(
                    f"expert file {str(path)!r} listed in {BUFFER_METADATA_FILE} is missing; rerun "
                    f"{_create_command(self.dataset_name, self.arch, self.path)} to retrain it"
                )
            tensor = _load_expert_file(path)["trajectory"]
            if tuple(tensor.shape) != (self.epochs + 1, self.num_params):
                raise ExpertBufferMismatchError(
                    f"{path} holds a trajectory of shape {tuple(tensor.shape)}, expected "
                    f"({self.epochs + 1}, {self.num_params})"
                )
            self._cache[position] = tensor
        return self._cache[position]

    def _position(self, expert_index: int) -> int:
        if isinstance(expert_index, bool) or not isinstance(expert_index, (int, np.integer)) or not (
            0 <= expert_index < self.n_experts
        ):
            raise ValueError(f"expert_index must be an integer in [0, {self.n_experts}), got {expert_index!r}")
        return int(expert_index)

    def snapshot(
        self,
        expert_index: int,
        epoch: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """A copy of expert ``expert_index``'s flat parameters after ``epoch`` epochs (0 = init): ``(P,)``."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or not 0 <= epoch <= self.epochs:
            raise ValueError(f"epoch must be an integer in [0, {self.epochs}], got {epoch!r}")
        return self.trajectory(expert_index)[int(epoch)].to(device=device, dtype=dtype, copy=True)

    def build_network(self, seed: int = 0) -> nn.Module:
        """A fresh network of the buffer's architecture and input geometry (a template for the student)."""
        channels, height, width = self.metadata["image_shape"]
        return build_isolated(lambda: get_network(self.arch, channels, int(self.metadata["num_classes"]), (height, width)), seed)

    def network(self, expert_index: int, epoch: int, device: torch.device | str | None = None) -> nn.Module:
        """The expert's network after ``epoch`` epochs, as an ``nn.Module`` (e.g. for DATM's soft labels)."""
        net = self.build_network()
        load_flat_parameters(net, self.snapshot(expert_index, epoch))
        return net.to(device) if device is not None else net

    def sample(
        self,
        generator: torch.Generator | None = None,
        max_start_epoch: int | None = None,
        expert_epochs: int = 2,
        *,
        min_start_epoch: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> ExpertSample:
        r"""Draw an expert uniformly and a start epoch :math:`t \sim U\{t_{min}, \dots, T^+ - 1\}`.

        Returns :math:`(k, t, \theta^*_{k,t}, \theta^*_{k,t+M})` with ``M = expert_epochs``.

        Args:
            generator: source of randomness (CPU generator; ``None``: torch's global one).
            max_start_epoch: :math:`T^+` (exclusive upper bound of the start epoch, as MTT's
                ``max_start_epoch``); default ``epochs - expert_epochs + 1`` (every valid start).
            expert_epochs: :math:`M \ge 1`.
            min_start_epoch: lower bound of the start epoch (DATM's window; default 0).
            device, dtype: where and how the two parameter vectors are returned.

        Raises:
            ValueError: an empty range, or ``max_start_epoch - 1 + expert_epochs > epochs``.
        """
        expert_epochs = check_positive_int(expert_epochs, "expert_epochs")
        if expert_epochs > self.epochs:
            raise ValueError(f"expert_epochs must be at most the buffer's epochs ({self.epochs}), got {expert_epochs}")
        if max_start_epoch is None:
            max_start_epoch = self.epochs - expert_epochs + 1
        max_start_epoch = check_positive_int(max_start_epoch, "max_start_epoch")
        if (
            isinstance(min_start_epoch, bool)
            or not isinstance(min_start_epoch, (int, np.integer))
            or min_start_epoch < 0
        ):
            raise ValueError(f"min_start_epoch must be a non-negative integer, got {min_start_epoch!r}")
        if min_start_epoch >= max_start_epoch:
            raise ValueError(
                f"min_start_epoch ({min_start_epoch}) must be below max_start_epoch ({max_start_epoch})"
            )
        if max_start_epoch - 1 + expert_epochs > self.epochs:
            raise ValueError(
                f"max_start_epoch - 1 + expert_epochs = {max_start_epoch - 1 + expert_epochs} exceeds the buffer's "
                f"{self.epochs} epochs; use max_start_epoch <= {self.epochs - expert_epochs + 1}"
            )
        gen_device = generator.device if generator is not None else torch.device("cpu")
        k = int(torch.randint(0, self.n_experts, (1,), generator=generator, device=gen_device).item())
        t = int(
            torch.randint(int(min_start_epoch), max_start_epoch, (1,), generator=generator, device=gen_device).item()
        )
        return ExpertSample(
            k,
            t,
            self.snapshot(k, t, device=device, dtype=dtype),
            self.snapshot(k, t + expert_epochs, device=device, dtype=dtype),
        )

    def indices(self) -> Sequence[int]:
        """The training indices (``expert_{index:03d}.pt``) of the experts, by position."""
        return tuple(self._indices)
