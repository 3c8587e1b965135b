"""The ``real_batches`` axis: how the real images of each step are drawn.

A :class:`RealBatchSelector` answers ``sample(n_per_class) -> (images, labels)`` with a class-blocked
batch of real training images on the run's device, drawing every random choice from the run's one
generator (so a resumed run draws the same batches). Objectives and samplers call it; none of them
knows how the batch was chosen.

Registered selectors (:data:`REAL_BATCH_SELECTORS`): ``random`` (uniform without replacement within
each class, the references' ``get_images``) and ``dream`` (DREAM's representative batches: per class, the
real images nearest to the k-means centres of the current network's embeddings). A new selector is a
subclass with a ``name``, an ``Options`` dataclass and :meth:`~RealBatchSelector.sample`, plus a
registry entry; :meth:`~RealBatchSelector.state_dict` carries whatever it caches across steps.

The protocol has two hooks beyond :meth:`~RealBatchSelector.sample`:

* :meth:`~RealBatchSelector.observe`: the engine calls it with the networks of every draw, right after
  the sampler returns them and before the iteration's first image step, so a selector can look at the
  current feature map (the network objects stay live: training between steps updates them in place);
* :meth:`~RealBatchSelector.sample_for_training`: the real images a sampler trains its networks on
  (IDM's pool, IDC's real-data network). Uniform for every selector: ``dream`` picks the batches of the
  *loss* only, as DREAM does (its network is trained on random real batches).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ipmcondense.components import Component, Registry, option

__all__ = ["RealBatchSelector", "RandomRealBatches", "DreamRealBatches", "REAL_BATCH_SELECTORS", "REAL_BATCH_NAMES",
           "build_real_batches", "kmeans_representatives"]


class RealBatchSelector(Component, ABC):
    """Draws class-blocked batches of real images (a component: ``name``, ``Options``).

    Args:
        images: ``(N, C, H, W)`` real training images on the run's device.
        labels: ``(N,)`` int64 labels.
        num_classes: number of classes.
        generator: the run's generator.
    """

    kind = "real-batch selector"

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, generator: torch.Generator) -> None:
        self.images, self.labels = images, labels
        self.num_classes, self.generator = int(num_classes), generator

    @classmethod
    def from_options(cls, options: Any, *, images: Tensor, labels: Tensor, num_classes: int,
                     generator: torch.Generator, **context: Any) -> RealBatchSelector:
        return cls(images, labels, num_classes, generator)

    @abstractmethod
    def sample(self, n_per_class: int) -> tuple[Tensor, Tensor]:
        """``(images, labels)``: up to ``n_per_class`` real images of every class, in class blocks 0..C-1."""

    def sample_for_training(self, n_per_class: int) -> tuple[Tensor, Tensor]:
        """Real images a sampler trains its networks on (default: :meth:`sample`)."""
        return self.sample(n_per_class)

    def observe(self, networks: Sequence[nn.Module]) -> None:
        """The networks of the current draw (called by the engine after every draw; default: ignored)."""

    def state_dict(self) -> dict[str, Any]:
        """State beyond the run's generator, for checkpoints (nothing by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class RandomRealBatches(RealBatchSelector):
    """``random``: ``n`` images of each class drawn uniformly without replacement (all of a smaller class).

    The references' ``get_images(c, n)``: a random permutation of the class, its first ``n`` entries.
    Cost: ``O(N_c)`` per class for the permutation and one gather. Via
    :class:`ipmcondense.data.ClassBalancedSampler`.
    """

    name = "random"

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, generator: torch.Generator) -> None:
        from ipmcondense.data import ClassBalancedSampler

        super().__init__(images, labels, num_classes, generator)
        self._sampler = ClassBalancedSampler(images, labels, num_classes, generator)

    def sample(self, n_per_class: int) -> tuple[Tensor, Tensor]:
        return self._sampler.sample(n_per_class)


def kmeans_representatives(features: Tensor, k: int, *, seed: int, max_iter: int = 100) -> Tensor:
    r"""Indices of the rows of ``features`` ``(n, d)`` nearest to the ``k`` k-means centres (one per centre).

    k-means (scikit-learn ``KMeans``, Lloyd, ``n_init=1``, ``random_state=seed``, at most ``max_iter``
    iterations) gives centres :math:`\mu_1, \dots, \mu_k`; the answer is
    :math:`(\arg\min_i \|x_i - \mu_j\|_2)_{j=1..k}`, in centre order (DREAM ``new_strategy.py: query``).
    Two centres may share their nearest row, so indices can repeat (as in DREAM). Needs ``n >= k``.
    Cost: ``O(max_iter * n * k * d)`` for k-means (float64 on the CPU) plus ``O(n k d)`` for the distances.
    """
    from sklearn.cluster import KMeans

    x = features.detach().double().cpu().numpy()
    if k > x.shape[0]:
        raise ValueError(f"k-means needs at least k={k} points, got {x.shape[0]}")
    km = KMeans(n_clusters=k, n_init=1, max_iter=int(max_iter), random_state=int(seed)).fit(x)
    centres = km.cluster_centers_
    dist = ((centres[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return torch.from_numpy(np.argmin(dist, axis=1).astype(np.int64))


class DreamRealBatches(RealBatchSelector):
    r"""``dream``: representative real batches (DREAM, Liu et al. ICCV'23).

    For a batch of ``n`` images per class: per class ``c``, embed all its real images with the current
    network (``embed`` if the network has one, else its output; no gradient; the first network of the
    last :meth:`observe`), run k-means with ``n`` clusters (:func:`kmeans_representatives`, seeded by a
    number drawn from the run's generator) and return the image nearest to each centre. The batch is
    reused for ``dream_interval`` calls of :meth:`sample` with that ``n`` and then recomputed with the
    network current at that moment (DREAM ``--interval 10``: every 10 inner steps). Caches are kept per
    batch size and are part of :meth:`state_dict`, so a resumed run draws the same batches.

    Fallbacks (documented, warned once per class and size): a class with at most ``n`` images returns
    all of its images (as ``random`` does) since k-means cannot make more clusters than points; before any
    network has been observed the batch is drawn uniformly. Networks are trained on uniform batches
    (:meth:`sample_for_training`), as in DREAM. Cost per refresh: one forward pass over the whole
    training set plus k-means per class; between refreshes, one gather.
    """

    name = "dream"

    @dataclass(frozen=True)
    class Options:
        dream_interval: int = option(10, "DREAM condense.py --interval 10 (inner steps between k-means queries)")
        dream_max_iter: int = option(100, "fast_pytorch_kmeans KMeans max_iter=100, DREAM new_strategy.py")

    @classmethod
    def from_options(cls, options, *, images, labels, num_classes, generator, **context):
        return cls(images, labels, num_classes, generator, interval=options.dream_interval,
                   max_iter=options.dream_max_iter)

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, generator: torch.Generator, *,
                 interval: int = 10, max_iter: int = 100) -> None:
        from ipmcondense.data import ClassBalancedSampler

        for key, value in (("dream_interval", interval), ("dream_max_iter", max_iter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        super().__init__(images, labels, num_classes, generator)
        self.interval, self.max_iter = int(interval), int(max_iter)
        self._uniform = ClassBalancedSampler(images, labels, num_classes, generator)
        self._networks: list[nn.Module] = []
        self._cache: dict[int, dict[str, Any]] = {}  # n -> {"indices": (B,) int64 or None, "age": int}
        self._warned: set[tuple[int, int]] = set()

    def observe(self, networks: Sequence[nn.Module]) -> None:
        self._networks = list(networks)

    def sample_for_training(self, n_per_class: int) -> tuple[Tensor, Tensor]:
        return self._uniform.sample(n_per_class)

    def sample(self, n_per_class: int) -> tuple[Tensor, Tensor]:
        n = int(n_per_class)
        entry = self._cache.get(n)
        if entry is None or entry["age"] >= self.interval:
            entry = {"indices": self._query(n), "age": 0}
            self._cache[n] = entry
        entry["age"] += 1
        if entry["indices"] is None:  # no network yet: uniform, drawn afresh each call
            return self._uniform.sample(n)
        index = entry["indices"].to(self.labels.device)
        return self.images[index], self.labels[index]

    def _query(self, n: int) -> Tensor | None:
        if not self._networks:
            return None
        net = self._networks[0]
        picks = []
        for c in range(self.num_classes):
            idx = self._uniform.indices_of_class(c)
            if idx.numel() <= n:
                if (c, n) not in self._warned:
                    self._warned.add((c, n))
                    warnings.warn(f"dream: class {c} has {idx.numel()} training images, not more than the batch of "
                                  f"{n} per class (batch_real): all of them are used", stacklevel=3)
                picks.append(idx.cpu())
                continue
            with torch.no_grad():
                embed = getattr(net, "embed", net)
                feats = torch.cat([embed(self.images[idx[i:i + 512]]) for i in range(0, idx.numel(), 512)])
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
            picks.append(idx.cpu()[kmeans_representatives(feats.flatten(1), n, seed=seed, max_iter=self.max_iter)])
        return torch.cat(picks)

    def state_dict(self) -> dict[str, Any]:
        return {"cache": {n: {"indices": None if e["indices"] is None else e["indices"].clone(), "age": e["age"]}
                          for n, e in self._cache.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cache = {int(n): {"indices": e["indices"], "age": int(e["age"])}
                       for n, e in state.get("cache", {}).items()}


#: The registered real-batch selectors by name, the ``real_batches`` axis.
REAL_BATCH_SELECTORS: Registry = Registry("real-batch selector")
REAL_BATCH_SELECTORS.register(RandomRealBatches)
REAL_BATCH_SELECTORS.register(DreamRealBatches)
REAL_BATCH_NAMES = REAL_BATCH_SELECTORS.names


def build_real_batches(name: str, config: dict[str, Any], *, images: Tensor, labels: Tensor, num_classes: int,
                       generator: torch.Generator) -> RealBatchSelector:
    """The ``name`` selector (:data:`REAL_BATCH_NAMES`) over the given real images, options from ``config``."""
    return REAL_BATCH_SELECTORS.get(name).from_config(config, images=images, labels=labels, num_classes=num_classes,
                                                      generator=generator)
