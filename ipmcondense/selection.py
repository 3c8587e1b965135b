"""Coreset baselines: subsets of real training images chosen per class.

Condensed sets are compared with real subsets of the same size (``ipc`` images per class) evaluated
by the same protocol (:func:`ipmcondense.evaluation.evaluate_synthetic`). Four selections:

- :func:`select_random`: ``ipc`` images per class uniformly without replacement (seeded).
- :func:`select_herding`: greedy mean matching in an embedding :math:`\\phi` (Welling 2009; the
  herding baseline of the DC paper): with :math:`\\mu_c` the mean embedding of class :math:`c`, step
  :math:`k` adds :math:`\\arg\\min_i \\| \\mu_c - \\tfrac1k (\\sum_{j \\in S} \\phi(x_j) + \\phi(x_i)) \\|`
  over unselected :math:`i`. This greedily minimises the linear-kernel MMD (mean-embedding IPM)
  between the subset and the class.
- :func:`select_kcenter`: farthest-first traversal (Gonzalez; Sener & Savarese's k-center greedy):
  start from a seeded random point, then repeatedly add the point farthest (Euclidean, in
  :math:`\\phi`) from the selected set, a 2-approximation of the minimax covering radius.
- :func:`select_kmeans`: the real image nearest to each of ``ipc`` k-means centres of the class
  (scikit-learn, seeded), DREAM's representative initialisation.

Embedding: by default a ConvNet (``"convnet"`` for the dataset's shape) freshly initialised with
``torch.manual_seed(seed)`` and used untrained, through its ``embed`` (the features before the
classifier). The DC paper used a network *trained* on the full data; pass such a network (any
module with ``embed``, or any callable ``images -> (n, d)``) as ``feature_network`` to reproduce it.

Output: ``(images, labels)`` with ``num_classes * ipc`` real training images in class blocks
``[class 0 (ipc), class 1 (ipc), ...]`` (within a block, in selection order), on the dataset's device.
Cost: herding :math:`O(ipc\\, n_c\\, d)` and k-center :math:`O(ipc\\, n_c\\, d)` per class after one
embedding pass over the training set (:math:`O(N)` network forwards, batched).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ipmcondense.nets import build_isolated, get_network

__all__ = [
    "select_random",
    "select_herding",
    "select_kcenter",
    "select_kmeans",
    "herding_indices",
    "kcenter_indices",
    "kmeans_indices",
    "embed_images",
    "SELECTION_METHODS",
]

FeatureNetwork = nn.Module | Callable[[Tensor], Tensor]


def _check_ipc(dataset: Any, ipc: Any) -> list[Tensor]:
    """Return per-class index tensors, after checking ``ipc`` against every class size."""
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc (images per class) must be a positive integer, got {ipc!r}")
    labels = dataset.train_labels
    per_class = [torch.nonzero(labels == c, as_tuple=False)[:, 0] for c in range(dataset.num_classes)]
    sizes = [int(idx.numel()) for idx in per_class]
    if ipc > min(sizes):
        smallest = min(range(len(sizes)), key=sizes.__getitem__)
        raise ValueError(
            f"ipc={ipc} exceeds the number of training images of class {smallest} ({sizes[smallest]}); "
            f"choose ipc <= {sizes[smallest]}"
        )
    return per_class


def _gather(dataset: Any, chosen: list[Tensor]) -> tuple[Tensor, Tensor]:
    index = torch.cat(chosen)
    return dataset.train_images[index], dataset.train_labels[index]


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def select_random(dataset: Any, ipc: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``ipc`` training images per class drawn uniformly without replacement (``seed`` fixes them).

    Raises:
        ValueError: ``ipc`` is not positive or exceeds the size of a class.
    """
    per_class = _check_ipc(dataset, ipc)
    generator = _generator(seed)
    chosen = [idx[torch.randperm(idx.numel(), generator=generator)[:ipc].to(idx.device)] for idx in per_class]
    return _gather(dataset, chosen)


@torch.no_grad()
def embed_images(images: Tensor, feature_network: FeatureNetwork, batch_size: int = 512) -> Tensor:
    """``(n, d)`` float64 embeddings of ``images``: ``feature_network.embed`` if present, else the call.

    Modules are put in eval mode for the pass (and restored afterwards).
    """
    embed = getattr(feature_network, "embed", feature_network)
    was_training = isinstance(feature_network, nn.Module) and feature_network.training
    if isinstance(feature_network, nn.Module):
        feature_network.eval()
    try:
        chunks = [
            embed(images[start : start + batch_size]) for start in range(0, images.shape[0], batch_size)
        ]
    finally:
        if was_training:
            feature_network.train()
    features = torch.cat(chunks).reshape(images.shape[0], -1).to(torch.float64)
    if not bool(torch.isfinite(features).all()):
        raise ValueError("feature_network produced NaN or inf embeddings")
    return features


def _default_network(dataset: Any, seed: int, device: torch.device, arch: str = "convnet") -> nn.Module:
    network = build_isolated(
        lambda: get_network(arch, dataset.channels, dataset.num_classes, tuple(dataset.image_size)), seed
    )
    return network.to(device)


def herding_indices(features: Tensor, k: int) -> Tensor:
    """Greedy herding: ``k`` row indices of ``features`` ``(n, d)`` whose running mean tracks the mean.

    Step :math:`t = 1..k` picks :math:`\\arg\\min_i \\|\\mu - (s_{t-1} + f_i) / t\\|^2` over unselected
    rows, :math:`s` the sum of selected rows. Ties go to the lowest index. Cost :math:`O(k n d)`.
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    mean = features.mean(dim=0)
    running = torch.zeros_like(mean)
    available = torch.ones(n, dtype=torch.bool, device=features.device)
    chosen = []
    for step in range(1, k + 1):
        error = ((mean - (running + features) / step) ** 2).sum(dim=1)
        error = error.masked_fill(~available, float("inf"))
        best = int(torch.argmin(error))
        chosen.append(best)
        available[best] = False
        running = running + features[best]
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


def kcenter_indices(features: Tensor, k: int, first: int = 0) -> Tensor:
    """Farthest-first traversal: start at row ``first``, then add the row farthest from the chosen set.

    Distances are Euclidean; ties go to the lowest index. Cost :math:`O(k n d)`.
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if not 0 <= first < n:
        raise ValueError(f"first must be in [0, {n}), got {first}")
    chosen = [first]
    distance = ((features - features[first]) ** 2).sum(dim=1)
    for _ in range(k - 1):
        distance[chosen] = -1.0
        best = int(torch.argmax(distance))
        chosen.append(best)
        distance = torch.minimum(distance, ((features - features[best]) ** 2).sum(dim=1))
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


def _embedding_selection(
    dataset: Any,
    ipc: int,
    seed: int,
    feature_network: FeatureNetwork | None,
    batch_size: int,
    pick: Callable[[Tensor, torch.Generator], Tensor],
    arch: str = "convnet",
) -> tuple[Tensor, Tensor]:
    per_class = _check_ipc(dataset, ipc)
    generator = _generator(seed)
    network = feature_network
    if network is None:
        network = _default_network(dataset, seed, dataset.train_images.device, arch)
    chosen = []
    for idx in per_class:
        features = embed_images(dataset.train_images[idx], network, batch_size)
        chosen.append(idx[pick(features, generator).to(idx.device)])
    return _gather(dataset, chosen)


def select_herding(
    dataset: Any,
    ipc: int,
    seed: int = 0,
    feature_network: FeatureNetwork | None = None,
    *,
    batch_size: int = 512,
    arch: str = "convnet",
) -> tuple[Tensor, Tensor]:
    """Herding selection of ``ipc`` images per class in the embedding of ``feature_network``.

    Args:
        dataset: a :class:`ipmcondense.data.LabelledImages` (training split used).
        ipc: images per class.
        seed: seeds the default (untrained) ConvNet; herding itself is deterministic.
        feature_network: module with ``embed`` or callable ``images -> (n, d)``; default: an untrained
            ``arch`` network initialised with ``seed``.
        batch_size: embedding batch size.
        arch: the default feature network's name (:func:`ipmcondense.nets.get_network`).

    Raises:
        ValueError: ``ipc`` is not positive or exceeds the size of a class.
    """
    return _embedding_selection(
        dataset, ipc, seed, feature_network, batch_size, lambda features, _: herding_indices(features, ipc), arch
    )


def select_kcenter(
    dataset: Any,
    ipc: int,
    seed: int = 0,
    feature_network: FeatureNetwork | None = None,
    *,
    batch_size: int = 512,
    arch: str = "convnet",
) -> tuple[Tensor, Tensor]:
    """k-center greedy selection of ``ipc`` images per class in the embedding of ``feature_network``.

    The first centre of each class is drawn uniformly with a generator seeded by ``seed`` (which
    also seeds the default ConvNet); the rest follow farthest-first. Arguments as
    :func:`select_herding`.
    """

    def pick(features: Tensor, generator: torch.Generator) -> Tensor:
        first = int(torch.randint(features.shape[0], (1,), generator=generator))
        return kcenter_indices(features, ipc, first)

    return _embedding_selection(dataset, ipc, seed, feature_network, batch_size, pick, arch)


def kmeans_indices(features: Tensor, k: int, seed: int = 0, n_init: int = 10) -> Tensor:
    r"""Rows of ``features`` nearest to the ``k`` centres of a k-means clustering (one distinct row per centre).

    scikit-learn's :class:`~sklearn.cluster.KMeans` (k-means++ initialisation, ``n_init`` restarts,
    ``random_state=seed``) on the float64 features; then, centre by centre in order of cluster size
    (largest first), the nearest (Euclidean) row not taken yet. Cost: :math:`O(n_{init}\, t\, k\, n\, d)`
    for the clustering plus :math:`O(k n d)` for the assignment.
    """
    from sklearn.cluster import KMeans

    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    x = features.detach().cpu().to(torch.float64).numpy()
    model = KMeans(n_clusters=k, n_init=n_init, random_state=int(seed)).fit(x)
    centres = torch.from_numpy(model.cluster_centers_)
    sizes = torch.bincount(torch.from_numpy(model.labels_).long(), minlength=k)
    distance = torch.cdist(centres, torch.from_numpy(x))
    taken = torch.zeros(n, dtype=torch.bool)
    chosen = []
    for centre in torch.argsort(sizes, descending=True, stable=True).tolist():
        d = distance[centre].masked_fill(taken, float("inf"))
        best = int(torch.argmin(d))
        taken[best] = True
        chosen.append(best)
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


def select_kmeans(
    dataset: Any,
    ipc: int,
    seed: int = 0,
    feature_network: FeatureNetwork | None = None,
    *,
    batch_size: int = 512,
    arch: str = "convnet",
) -> tuple[Tensor, Tensor]:
    """k-means selection: per class, the real images nearest to ``ipc`` k-means centres in the embedding.

    The representative-sample initialisation of DREAM (Liu et al. 2023) and of several condensation
    codes: cluster each class's embeddings (:func:`kmeans_indices`, seeded with ``seed``) and keep the
    real image nearest to each centre. Arguments as :func:`select_herding`.
    """
    return _embedding_selection(
        dataset, ipc, seed, feature_network, batch_size, lambda features, _: kmeans_indices(features, ipc, seed), arch
    )


#: Name -> selection function, for command lines and benchmarks.
SELECTION_METHODS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "random": select_random,
    "herding": select_herding,
    "kcenter": select_kcenter,
    "kmeans": select_kmeans,
}
