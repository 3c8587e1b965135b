r"""Distances between datasets that are split over the ranks of a ``torch.distributed`` process group.

Each rank holds a part (a *shard*) of each dataset, e.g. the rows :func:`row_block` gives it or the
indices of a :class:`torch.utils.data.DistributedSampler`; the functions here return, on every rank, the
value the single-process function would return on the concatenated datasets. Partial sums are reduced
in float64 with ``all_reduce``, so the result equals the single-process value up to float64 rounding
(about 1e-14 relative; the tests ask for 1e-10 in float64).

* :func:`sharded_mmd2` -- the MMD kernel sums split by **row blocks**: rank ``r`` computes
  :math:`\sum_{i \in I_r} \sum_j k(x_i, x_j)`, :math:`\sum_{i \in J_r}\sum_j k(y_i, y_j)` and
  :math:`\sum_{i \in I_r}\sum_j k(x_i, y_j)` (its own rows against all columns, through the tiled
  kernel sums of :mod:`ipmcondense.ipm._kernel_sums`), and the three float64 partial sums are all-reduced.
  The points (``O((n + m) d)``) are all-gathered; the Gram matrix (``O((n + m)^2)``) never exists on
  any rank, and the ``O((n + m)^2 d)`` work is divided by the world size.
* :func:`sharded_mean_embedding` / :func:`sharded_mean_embedding_distance` -- per-rank float64 sums
  :math:`\sum_i \phi(x_i)` and counts, all-reduced; only ``O(D)`` numbers travel. With the random
  features of :class:`~ipmcondense.ipm.RandomFeatureNNGP` (``feature_map=kernel.features``) the squared
  distance is the random-feature MMD² (biased).
* :func:`streaming_mean_embedding` -- the same sums accumulated batch by batch over any iterable
  (an :class:`~torch.utils.data.IterableDataset` that never fits in memory), optionally reduced over ranks.

Without an initialised process group (or with world size 1) every function computes the single-process
value, so the same script runs with and without ``torchrun``. Values, not gradients: the collectives
carry no autograd graph, so every result here is computed without gradient.

The NCCL backend needs its tensors on the current CUDA device; the functions move what they send to
``communication_device()`` and back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._kernel_sums import BACKENDS, kernel_sum
from ._validation import as_point_pair, check_choice
from .kernels import Kernel, get_kernel

__all__ = [
    "row_block",
    "distributed_world",
    "communication_device",
    "all_reduce_float64",
    "all_gather_rows",
    "sharded_mmd2",
    "sharded_mean_embedding",
    "sharded_mean_embedding_distance",
    "streaming_mean_embedding",
]

_ESTIMATORS = ("biased", "unbiased")


def row_block(n: int, rank: int, world_size: int) -> slice:
    """The rows ``[start, stop)`` of ``n`` that rank ``rank`` of ``world_size`` owns: contiguous blocks whose
    sizes differ by at most one (the first ``n % world_size`` ranks hold one more row).

    Unlike :class:`~torch.utils.data.DistributedSampler` (which pads with repeated rows when ``n`` is not
    a multiple of the world size), every row is owned by exactly one rank, so sums over the blocks are the
    sums over the data.
    """
    for name, value in (("n", n), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "n" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'n' else 'positive'} integer, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def distributed_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (the default group), ``(0, 1)`` without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def communication_device(group: Any = None) -> torch.device:
    """Where the tensors of a collective must live: the current CUDA device for NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_float64(value: Tensor, group: Any = None) -> Tensor:
    """The sum over the ranks of ``value``, computed in float64 (a new tensor on ``value``'s device).

    Without a process group (or with one rank) the float64 copy of ``value`` itself.
    """
    total = value.detach().to(torch.float64).clone()
    if distributed_world(group)[1] == 1:
        return total
    sent = total.to(communication_device(group))
    dist.all_reduce(sent, op=dist.ReduceOp.SUM, group=group)
    return sent.to(value.device)


def all_gather_rows(local: Tensor, group: Any = None) -> Tensor:
    """The row-wise concatenation, in rank order, of every rank's ``local`` ``(n_r, ...)`` (shards may differ
    in length; the trailing shape and dtype must agree). Without a process group: ``local``."""
    rank, world = distributed_world(group)
    if world == 1:
        return local
    device = communication_device(group)
    sizes = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    gathered_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(gathered_sizes, sizes, group=group)
    counts = [int(s) for s in gathered_sizes]
    longest = max(counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.detach().to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(local.device)


def _diagonal_sum(x: Tensor, kernel: Kernel) -> Tensor:
    """:math:`\\sum_i k(x_i, x_i)` in float64."""
    return kernel.paired(x, x).double().sum()


def sharded_mmd2(
    x_local: Any,
    y_local: Any,
    kernel: str | Kernel = "gaussian",
    bandwidth: float | str = "median",
    estimator: str = "biased",
    backend: str = "auto",
    group: Any = None,
) -> Tensor:
    r""":math:`\mathrm{MMD}^2_k` between two datasets each split over the ranks (this rank's rows given).

    Equals :func:`ipmcondense.ipm.mmd2` ``(X, Y, kernel, bandwidth, estimator)`` of the concatenations
    ``X = cat(x_local over ranks)``, ``Y = cat(y_local over ranks)``:
    ``"biased"`` (V-statistic) :math:`\frac{1}{n^2}\sum_{i,i'} k(x_i, x_{i'}) + \frac{1}{m^2}\sum_{j,j'}
    k(y_j, y_{j'}) - \frac{2}{nm}\sum_{i,j} k(x_i, y_j)`; ``"unbiased"`` (U-statistic) with the diagonals
    dropped and :math:`n(n-1)`, :math:`m(m-1)` in the denominators. A ``"median"`` bandwidth is resolved on
    the gathered pooled sample, as the single-process function does.

    Split: this rank's rows against all columns, three float64 partial sums, one ``all_reduce``. Cost per
    rank: ``O((n_r + m_r)(n + m) d)`` time; memory ``O((n + m) d)`` for the gathered points plus one tile;
    communication: the points once (all-gather) and three float64 numbers. Uniform weights only; every rank
    must hold at least one point of each dataset. Returns a
    0-d float64 tensor (no gradient), the same on every rank.
    """
    check_choice(estimator, _ESTIMATORS, "estimator")
    check_choice(backend, BACKENDS, "backend")
    x_local, y_local = as_point_pair(x_local, y_local, ("x_local", "y_local"))
    with torch.no_grad():
        xs, ys = all_gather_rows(x_local, group), all_gather_rows(y_local, group)
        n, m = xs.shape[0], ys.shape[0]
        if estimator == "unbiased" and min(n, m) < 2:
            raise ValueError(f"the unbiased estimator needs at least 2 points per dataset, got {n} and {m}")
        if isinstance(kernel, Kernel) and bandwidth == "median":
            bandwidth = None
        k = get_kernel(kernel, bandwidth).resolved(xs, ys)
        if estimator == "biased" and xs.shape == ys.shape and torch.equal(xs, ys):
            return torch.zeros((), dtype=torch.float64, device=x_local.device)
        parts = torch.stack([kernel_sum(x_local, xs, k, backend=backend), kernel_sum(y_local, ys, k, backend=backend),
                             kernel_sum(x_local, ys, k, backend=backend)])
        if estimator == "unbiased":
            parts = parts - torch.stack([_diagonal_sum(x_local, k), _diagonal_sum(y_local, k), _zero(x_local)])
        xx, yy, xy = all_reduce_float64(parts, group)
        if estimator == "biased":
            return xx / n**2 + yy / m**2 - 2.0 * xy / (n * m)
        return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m)


def _zero(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.float64, device=like.device)


def _feature_rows(points: Tensor, feature_map: Callable[[Tensor], Tensor] | None) -> Tensor:
    if feature_map is None:
        return points.reshape(points.shape[0], -1)
    out = feature_map(points)
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != points.shape[0]:
        raise ValueError("feature_map must return a tensor with one row per point")
    return out.reshape(out.shape[0], -1)


def sharded_mean_embedding(
    local: Tensor,
    feature_map: Callable[[Tensor], Tensor] | None = None,
    group: Any = None,
    batch_size: int = 1024,
) -> tuple[Tensor, int]:
    r"""``(mean, n)``: :math:`\frac1n \sum_i \phi(x_i)` over the rows of every rank (float64, ``(D,)``) and ``n``.

    Each rank sums :math:`\phi` over its rows in float64 (``batch_size`` rows at a time through
    ``feature_map``; ``None`` flattens); the sums and counts are all-reduced. Communication: ``D + 1``
    float64 numbers. No gradient.
    """
    if not isinstance(local, Tensor) or local.dim() < 1:
        raise ValueError("local must be a tensor of shape (n, ...)")
    return streaming_mean_embedding(local.split(max(1, int(batch_size))) if local.shape[0] else [local],
                                    feature_map, group=group, reduce=True)


def streaming_mean_embedding(
    batches: Iterable[Any],
    feature_map: Callable[[Tensor], Tensor] | None = None,
    *,
    group: Any = None,
    reduce: bool = True,
) -> tuple[Tensor, int]:
    r"""``(mean, n)`` of :math:`\phi` over a stream of batches that need never fit in memory together.

    ``batches`` yields tensors ``(b, ...)`` or ``(tensor, labels)`` pairs (a ``DataLoader`` over an
    :class:`~torch.utils.data.IterableDataset`, a generator, ...). The running sum
    :math:`\sum_i \phi(x_i)` is kept in float64, so the mean equals the in-memory one up to float64
    rounding whatever the batching. With ``reduce`` and a process group, the sums and counts of all ranks
    are added (each rank streams its own part). Memory: one batch plus ``O(D)``. No gradient.
    """
    total: Tensor | None = None
    count = 0
    with torch.no_grad():
        for batch in batches:
            points = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(points, Tensor):
                points = torch.as_tensor(points)
            if points.shape[0] == 0:
                continue
            features = _feature_rows(points, feature_map)
            if not bool(torch.isfinite(features).all()):
                raise ValueError("the features hold NaN or inf values")
            partial = features.double().sum(0)
            total = partial if total is None else total + partial
            count += int(points.shape[0])
        dims = torch.tensor([-1 if total is None else total.shape[0]], dtype=torch.float64)
        if reduce and distributed_world(group)[1] > 1:
            # ranks without rows still take part: agree on D first
            widest = _all_reduce_max(dims, group)
            d = int(widest.item())
            if d < 0:
                raise ValueError("no rank received any points")
            if total is None:
                total = torch.zeros(d, dtype=torch.float64)
            elif total.shape[0] != d:
                raise ValueError(f"the ranks' features differ in dimension ({total.shape[0]} here, {d} elsewhere)")
            both = all_reduce_float64(torch.cat([total, torch.tensor([float(count)], dtype=torch.float64,
                                                                      device=total.device)]), group)
            total, count = both[:-1], int(round(float(both[-1])))
        if total is None or count == 0:
            raise ValueError("the stream held no points")
        return total / count, count


def _all_reduce_max(value: Tensor, group: Any) -> Tensor:
    sent = value.to(communication_device(group))
    dist.all_reduce(sent, op=dist.ReduceOp.MAX, group=group)
    return sent.cpu()


def sharded_mean_embedding_distance(
    x_local: Tensor,
    y_local: Tensor,
    feature_map: Callable[[Tensor], Tensor] | Sequence[Callable[[Tensor], Tensor]] | None = None,
    squared: bool = False,
    group: Any = None,
) -> Tensor:
    r""":math:`\|\bar\phi(X) - \bar\phi(Y)\|_2` for datasets split over the ranks (uniform weights).

    Equals :func:`ipmcondense.ipm.mean_embedding_distance` of the concatenated datasets with a single
    feature map (``None``: the flattened points); ``squared=True`` gives the squared distance, the biased
    linear-kernel MMD² (the random-feature MMD² for ``feature_map=RandomFeatureNNGP(...).features``).
    A 0-d float64 tensor, the same on every rank. Cost: one feature pass over the local rows; communication
    ``2(D + 1)`` float64 numbers.
    """
    if not isinstance(squared, bool):
        raise TypeError(f"squared must be True or False, got {squared!r}")
    if isinstance(feature_map, (list, tuple)):
        raise TypeError("sharded_mean_embedding_distance takes one feature map (concatenate layers in it)")
    mx, _ = sharded_mean_embedding(x_local, feature_map, group)
    my, _ = sharded_mean_embedding(y_local, feature_map, group)
    if mx.shape != my.shape:
        raise ValueError(f"the features of x and y differ in dimension: {mx.shape[0]} and {my.shape[0]}")
    value = (mx - my).pow(2).sum()
    return value if squared else value.sqrt()
