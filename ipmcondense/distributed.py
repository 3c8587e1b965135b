"""Running on several processes with ``torch.distributed`` (gloo on the CPU, NCCL on GPUs; launched by ``torchrun``).

``torchrun --nproc_per_node N -m ipmcondense ...`` starts ``N`` processes and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each; :func:`init_from_env` reads them and joins the
process group. Without those variables nothing is initialised and every function here answers as a world of
one process (rank 0), so single-process behaviour is unchanged.

What the library distributes (see ``docs/guides/distributed.md``):

* condensation: ranks own disjoint class blocks (:func:`classes_of_rank`); a network replicated on every rank
  whose training batch is split by class (IDM's pool, MTT's student) sums the ranks' gradients
  (:func:`sum_over_ranks`, :func:`copy_to_ranks` for the backward pass);
* evaluation: the models of the protocol are spread over the ranks (:func:`items_of_rank`);
* distances: the kernel sums and mean embeddings of :mod:`ipmcondense.ipm.sharded`, partial sums reduced in
  float64 (:func:`all_reduce_float64`).

Files are written by rank 0 only, atomically (:func:`atomic_write_on_rank_zero`), and every rank waits until
the file is complete.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ipmcondense.ipm.sharded import (
    all_gather_rows,
    all_reduce_float64,
    communication_device,
    distributed_world,
    row_block,
)

__all__ = [
    "WorldInfo",
    "world_from_env",
    "launched_by_torchrun",
    "init_from_env",
    "teardown",
    "launched",
    "is_active",
    "rank",
    "world_size",
    "is_rank_zero",
    "barrier",
    "classes_of_rank",
    "items_of_rank",
    "row_block",
    "all_reduce_float64",
    "all_gather_rows",
    "all_gather_objects",
    "broadcast_object",
    "communication_device",
    "atomic_write_on_rank_zero",
    "local_device",
    "sum_over_ranks",
    "copy_to_ranks",
]

#: how long a collective waits for a missing rank before it fails (a killed rank makes the others fail, not hang)
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class WorldInfo:
    """This process's place in the job: ``rank`` in ``[0, world_size)``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError as err:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from err


def world_from_env() -> WorldInfo:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as set by ``torchrun`` (``(0, 1, 0)`` when they are absent)."""
    info = WorldInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise ValueError(f"RANK={info.rank} and WORLD_SIZE={info.world_size} do not describe a process of the job")
    return info


def launched_by_torchrun() -> bool:
    """Whether the launcher's variables (``WORLD_SIZE`` and ``MASTER_ADDR``) are set."""
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


_OWNED = False  # whether init_from_env created the process group (then teardown destroys it)


def init_from_env(device: str | torch.device | None = None, timeout: Any = DEFAULT_TIMEOUT) -> WorldInfo:
    """Join the process group described by the launcher's environment, if any; return this process's place.

    Backend: ``nccl`` when ``device`` is a CUDA device (each process then uses ``cuda:LOCAL_RANK``), else
    ``gloo``. ``timeout`` (a ``datetime.timedelta``): how long a collective waits for a missing rank. Already
    initialised (by the caller): nothing is done. Not launched by ``torchrun``: nothing is done and
    ``WorldInfo()`` (rank 0 of 1) is returned.
    """
    global _OWNED
    if dist.is_available() and dist.is_initialized():
        return WorldInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    info = world_from_env()
    if not launched_by_torchrun():
        return info
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run in one process")
    use_cuda = device is not None and torch.device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=info.rank, world_size=info.world_size,
                            timeout=timeout)
    _OWNED = True
    return info


def teardown() -> None:
    """Leave the process group if :func:`init_from_env` created it."""
    global _OWNED
    if _OWNED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


@contextlib.contextmanager
def launched(device: str | torch.device | None = None) -> Iterator[WorldInfo]:
    """``with launched(device) as world:`` -- :func:`init_from_env` on entry, :func:`teardown` on exit."""
    info = init_from_env(device)
    try:
        yield info
    finally:
        teardown()


def is_active() -> bool:
    """Whether a process group with more than one process is initialised."""
    return distributed_world()[1] > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return distributed_world()[0]


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return distributed_world()[1]


def is_rank_zero() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_active():
        dist.barrier()


def local_device(device: str | torch.device | None) -> str | torch.device | None:
    """``device`` with a CUDA device pinned to this process's GPU (``cuda`` becomes ``cuda:LOCAL_RANK``).

    Outside a process group ``device`` is returned unchanged (the caller validates it); an unknown device
    string raises ``ValueError`` naming ``device``.
    """
    if device is None or not is_active():
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a torch device ({err})") from None
    if dev.type == "cuda" and dev.index is None and is_active():
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return dev


def items_of_rank(n_items: int, rank_: int | None = None, world: int | None = None) -> list[int]:
    """The items ``i`` of ``range(n_items)`` with ``i % world == rank`` (round robin: balanced when items cost
    the same, e.g. the models of an evaluation)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(range(r, int(n_items), w))


def classes_of_rank(num_classes: int, rank_: int | None = None, world: int | None = None) -> range:
    """The contiguous block of classes rank ``rank_`` of ``world`` owns (sizes differ by at most one).

    Raises ``ValueError`` when there are more ranks than classes (a rank would own nothing).
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if w > num_classes:
        raise ValueError(
            f"class-parallel condensation needs at most one rank per class: {w} ranks for {num_classes} classes; "
            f"launch at most {num_classes} processes"
        )
    block = row_block(num_classes, r, w)
    return range(block.start, block.stop)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = tensor.detach().clone()
        device = communication_device()
        sent = total.to(device)
        dist.all_reduce(sent, op=dist.ReduceOp.SUM)
        return sent.to(tensor.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class _CopyToRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _SumOverRanks.apply(grad)


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_r x_r` over the ranks (an ``all_reduce``), differentiable for a *replicated* downstream.

    The computation after the sum must run identically on every rank (its gradient with respect to the sum
    is the same everywhere), so the backward pass is the identity: rank ``r`` receives
    :math:`\partial L / \partial x_r = \partial L / \partial \sum_s x_s`. Paired with :func:`copy_to_ranks`
    on the replicated input that the partial sums were computed from (tensor parallelism's
    reduce/copy pair). Without a process group: ``tensor`` itself. Cost: one all-reduce of ``tensor``.
    """
    if not is_active():
        return tensor
    return _SumOverRanks.apply(tensor)


def copy_to_ranks(tensor: torch.Tensor) -> torch.Tensor:
    r"""``tensor`` (a value replicated on every rank) entering a per-rank computation: the identity forward,
    and a backward that sums the ranks' gradients, so the replicated value receives
    :math:`\sum_r \partial L_r / \partial x` on every rank. Without a process group: ``tensor`` itself.
    Cost: one all-reduce of the gradient in the backward pass."""
    if not is_active():
        return tensor
    return _CopyToRanks.apply(tensor)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, source: int = 0) -> Any:
    """Rank ``source``'s ``obj`` on every rank; ``obj`` without a process group."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def atomic_write_on_rank_zero(write: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Call ``write(*args, **kwargs)`` (an atomic writer of :mod:`ipmcondense.files`) on rank 0 only; every rank
    returns once the file is complete. If the write fails on rank 0 it raises there, and the other ranks raise
    an ``OSError`` quoting rank 0's error (no rank is left waiting)."""
    failure: BaseException | None = None
    if is_rank_zero():
        try:
            write(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = err
    message = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message is not None:
        raise OSError(f"rank 0 could not write its file ({message})")
