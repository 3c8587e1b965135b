r"""Feature maps :math:`\phi_\theta` on networks: what a witness function of the outer IPM sees.

A condensation recipe compares :math:`\phi_\theta(A(S_c))` with :math:`\phi_\theta(A(T_c))` class by
class. A feature map turns one batch of images (in contiguous class *segments*) into a list of
:class:`FeatureBlock`\ s. A block is either

* *per sample*: ``values`` of shape ``(B, ...)``, one point per image; the discrepancy compares the
  points of a class segment (embeddings, layer features, attention maps, per-sample gradients), or
* *per class*: ``values`` of shape ``(n_segments, ...)``, one aggregated point per segment (the mean
  loss gradient of DC, which is the mean of the per-sample gradients, computed by one backward pass).

Each block carries a weight; a recipe's loss for class ``c`` is
:math:`\sum_b w_b\, D(\text{block}_b(T_c), \text{block}_b(S_c))`.

Every feature map takes ``differentiable``: ``True`` on the synthetic side (the graph to the images is
kept; for gradients ``create_graph=True``), ``False`` on the real side (no graph is built where
possible, values are detached).

Networks follow the :mod:`ipmcondense.nets` interface: ``embed(x)``, ``layer_features(x)``,
``classifier`` and ``forward(x)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.components import Component, Registry, option
from ipmcondense.ipm._validation import check_choice, check_positive

__all__ = [
    "FEATURE_MAPS",
    "FeatureBlock",
    "FeatureMap",
    "EmbeddingFeatures",
    "LayerFeatures",
    "AttentionFeatures",
    "GradientFeatures",
    "FEATURE_MAP_NAMES",
    "get_feature_map",
    "attention_map",
    "segments_from_labels",
]


@dataclass(frozen=True)
class FeatureBlock:
    """One group of features of a batch.

    Attributes:
        name: what the block holds (``"embedding"``, ``"layer2"``, ``"attention0"``, ``"grad:3.weight"``).
        values: ``(B, ...)`` per-sample features, or ``(n_segments, ...)`` per-class aggregates.
        weight: the block's weight in the recipe's loss.
        per_class: ``True`` when row ``i`` aggregates segment ``i`` (one point per class).
        parameter_gradient: ``True`` when the block is the loss gradient of one parameter tensor
            (rows beyond the first axis keep the parameter's shape; used by the row-wise cosine).
    """

    name: str
    values: Tensor
    weight: float = 1.0
    per_class: bool = False
    parameter_gradient: bool = False

    def segment(self, index: int, rows: slice) -> Tensor:
        """The points of segment ``index`` (rows ``rows`` of the batch): ``(n, ...)``."""
        if self.per_class:
            return self.values[index : index + 1]
        return self.values[rows]


def segments_from_labels(labels: Tensor) -> list[slice]:
    """Contiguous runs of equal labels as slices, e.g. ``[0,0,1,1,1] -> [slice(0,2), slice(2,5)]``."""
    n = labels.shape[0]
    if n == 0:
        return []
    change = torch.nonzero(labels[1:] != labels[:-1]).flatten().add(1).tolist()
    bounds = [0, *change, n]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


class FeatureMap(Component, ABC):
    """A map from a network and a batch of images to feature blocks (a component: ``name``, ``Options``)."""

    kind = "feature map"

    #: whether gradients w.r.t. the network parameters are needed (then they must require grad)
    needs_parameter_gradients: bool = False
    name: str = ""

    @abstractmethod
    def __call__(
        self,
        net: nn.Module,
        images: Tensor,
        labels: Tensor,
        segments: Sequence[slice],
        *,
        differentiable: bool,
    ) -> list[FeatureBlock]:
        """Feature blocks of ``images`` (class-blocked as ``segments``) under ``net``."""

    def describe(self) -> str:
        return type(self).__name__


class EmbeddingFeatures(FeatureMap):
    r"""The network's embedding :math:`\phi_\theta(x) = \text{net.embed}(x)` (DM, M3D, IDM).

    Cost: one forward pass of the batch (no graph on the real side).
    """

    name = "embedding"

    def __call__(self, net, images, labels, segments, *, differentiable):
        with torch.set_grad_enabled(differentiable):
            emb = net.embed(images)
        return [FeatureBlock("embedding", emb if differentiable else emb.detach())]


class LayerFeatures(FeatureMap):
    r"""Every block's activation map plus the embedding (CAFE's layer-wise feature alignment).

    Blocks: ``layer{i}`` with values ``(B, C_i * H_i * W_i)`` (the activation before pooling, flattened)
    weighted by ``layer_weights[i]``, and ``embedding`` weighted by ``embedding_weight``. With a
    mean-embedding discrepancy the loss is a weighted sum of linear-kernel IPMs, one per layer.

    Args:
        layer_weights: one weight per layer, or ``None`` for all ones. When shorter than the number of
            layers it weights the *last* layers (CAFE weights its last four feature maps); earlier
            layers get weight 0 and are skipped.
        embedding_weight: weight of the final embedding block.

    Cost: two forward passes (``layer_features`` and ``embed``).
    """

    name = "layers"

    @dataclass(frozen=True)
    class Options:
        layer_weights: tuple[float, ...] | None = option(None, "all ones; CAFE's row sets (0.1, 0.1, 1.0)")
        embedding_weight: float = option(1.0, "CAFE: the embedding term at weight 1")

    def __init__(self, layer_weights: Sequence[float] | None = None, embedding_weight: float = 1.0) -> None:
        self.layer_weights = None if layer_weights is None else tuple(float(w) for w in layer_weights)
        self.embedding_weight = float(embedding_weight)

    def _weights(self, n_layers: int) -> list[float]:
        if self.layer_weights is None:
            return [1.0] * n_layers
        w = list(self.layer_weights[-n_layers:])
        return [0.0] * (n_layers - len(w)) + w

    def __call__(self, net, images, labels, segments, *, differentiable):
        with torch.set_grad_enabled(differentiable):
            layers = net.layer_features(images)
            emb = net.embed(images)
        blocks = []
        for i, (f, w) in enumerate(zip(layers, self._weights(len(layers)))):
            if w == 0.0:
                continue
            v = f.flatten(1)
            blocks.append(FeatureBlock(f"layer{i}", v if differentiable else v.detach(), w))
        if self.embedding_weight:
            blocks.append(FeatureBlock("embedding", emb if differentiable else emb.detach(), self.embedding_weight))
        return blocks


def attention_map(features: Tensor, power: float = 1.0) -> Tensor:
    r"""Spatial attention :math:`a(x) = \text{normalise}_2\big(\sum_{ch} |f_{ch}(x)|^p\big)` (DataDAM).

    Args:
        features: ``(B, C, H, W)`` activations.
        power: the exponent ``p`` (DataDAM: 1).

    Returns:
        ``(B, H * W)`` attention maps of unit L2 norm (eps ``1e-12`` as :func:`torch.nn.functional.normalize`).
    """
    a = features.abs().pow(power).sum(dim=1).flatten(1)
    return F.normalize(a, p=2, dim=1)


class AttentionFeatures(FeatureMap):
    r"""Attention maps of every layer except the last, plus the embedding (DataDAM).

    Blocks: ``attention{i}`` = :func:`attention_map` of layer ``i`` (``(B, H_i W_i)``) weighted by
    ``attention_weight`` (DataDAM: 100), and ``embedding`` weighted by ``embedding_weight``
    (DataDAM: 100 * task_balance 0.01 = 1). With the mean-embedding discrepancy each block's term is
    DataDAM's squared distance between class-mean attention maps.

    Cost: two forward passes (``layer_features`` and ``embed``).
    """

    name = "attention"

    @dataclass(frozen=True)
    class Options:
        attention_power: float = option(1.0, "DataDAM main_DataDAM.py: attention map power p=1")
        attention_weight: float = option(100.0, "DataDAM: attention loss weight 100")
        embedding_weight: float = option(1.0, "DataDAM: 100 x task_balance 0.01")

    @classmethod
    def from_options(cls, options, **context):
        return cls(options.attention_power, options.attention_weight, options.embedding_weight)

    def __init__(self, power: float = 1.0, attention_weight: float = 100.0, embedding_weight: float = 1.0) -> None:
        self.power = check_positive(power, "attention_power")
        self.attention_weight = float(attention_weight)
        self.embedding_weight = float(embedding_weight)

    def __call__(self, net, images, labels, segments, *, differentiable):
        with torch.set_grad_enabled(differentiable):
            layers = net.layer_features(images)
            emb = net.embed(images)
            maps = [attention_map(f, self.power) for f in layers[:-1]]
        blocks = [
            FeatureBlock(f"attention{i}", m if differentiable else m.detach(), self.attention_weight)
            for i, m in enumerate(maps)
        ]
        if self.embedding_weight:
            blocks.append(FeatureBlock("embedding", emb if differentiable else emb.detach(), self.embedding_weight))
        return blocks


#: Largest input (H x W pixels) for which :class:`GradientFeatures` batches the classes with ``vmap`` on the CPU.
VMAP_MAX_PIXELS_CPU = 16 * 16


class GradientFeatures(FeatureMap):
    r"""Loss gradients :math:`\psi_\theta(x, y) = \nabla_\theta\, \ell(f_\theta(x), y)` (DC, DSA).

    ``mode="mean"`` (default): one *per-class* point per parameter tensor, the gradient of the mean
    cross-entropy over the class segment,
    :math:`\bar\psi_c = \nabla_\theta \frac1{n_c}\sum_{i\in c} \ell(f_\theta(x_i), c)`, which equals the mean
    of the per-sample gradients. When all segments have the same size, all classes are computed in
    one batched pass (``torch.func.vmap`` over classes of ``torch.func.grad``); otherwise one forward
    and backward per class. On the CPU the batched pass is used only for inputs of at most
    :data:`VMAP_MAX_PIXELS_CPU` pixels: measured against the loop in one process (DC, IPC 10 on the 8x8
    digits: 1.31x faster; DC, IPC 1 on 28x28 MNIST with 256 real images per class: 0.55x, the vmapped
    convolution weight gradients being slow there). On the synthetic side the result stays differentiable
    w.r.t. the images (double backward). Cost: one forward + backward of the batch; memory one gradient
    copy per class.

    ``mode="per_sample"``: per-sample gradients via :mod:`torch.func` (``vmap(grad(...))``), one point per
    image, for discrepancies that are not linear in the features (MMD, Sinkhorn on gradients).
    Cost: memory ``B x n_parameters`` floats: use small batches.

    Blocks are named ``grad:<parameter name>``, one per parameter tensor, flagged
    ``parameter_gradient=True`` (the row-wise cosine of DC uses each tensor's shape).
    """

    name = "gradients"
    needs_parameter_gradients = True

    @dataclass(frozen=True)
    class Options:
        gradient_mode: str = option("mean", "DC: gradients of the class-mean loss")

    @classmethod
    def from_options(cls, options, **context):
        return cls(options.gradient_mode)

    def __init__(self, mode: str = "mean") -> None:
        self.mode = check_choice(mode, ("mean", "per_sample"), "gradient mode")

    def __call__(self, net, images, labels, segments, *, differentiable):
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("GradientFeatures needs network parameters that require grad")
        if self.mode == "per_sample":
            return self._per_sample(net, named, images, labels, differentiable)
        names = [n for n, _ in named]
        sizes = {s.stop - s.start for s in segments}
        small_enough = images.device.type != "cpu" or images[0].shape[-2:].numel() <= VMAP_MAX_PIXELS_CPU
        if len(segments) > 1 and len(sizes) == 1 and small_enough:
            grads = self._class_batched(net, named, images, labels, len(segments), differentiable)
        else:
            grads = self._class_loop(net, named, images, labels, segments, differentiable)
        return [
            FeatureBlock(f"grad:{n}", g if differentiable else g.detach(), 1.0, per_class=True, parameter_gradient=True)
            for n, g in zip(names, grads)
        ]

    @staticmethod
    def _class_loop(net, named, images, labels, segments, differentiable) -> list[Tensor]:
        """One forward + backward per segment (the reference loop); ``(n_segments, *shape)`` per parameter."""
        params = [p for _, p in named]
        per_param: list[list[Tensor]] = [[] for _ in params]
        with torch.enable_grad():
            for rows in segments:
                loss = F.cross_entropy(net(images[rows]), labels[rows])
                grads = torch.autograd.grad(loss, params, create_graph=differentiable)
                for j, g in enumerate(grads):
                    per_param[j].append(g)
        return [torch.stack(gs) for gs in per_param]

    @staticmethod
    def _class_batched(net, named, images, labels, n_segments, differentiable) -> list[Tensor]:
        """All classes in one batched computation: ``vmap`` over classes of ``grad`` of the class loss.

        The class axis is folded into the batch axis by the batching rules (one forward and one
        backward over the whole batch), and the weight gradients come out per class.
        """
        from torch.func import functional_call, grad, vmap

        params = {n: (p if differentiable else p.detach()) for n, p in named}
        buffers = dict(net.named_buffers())

        def class_loss(ps, x, y):
            return F.cross_entropy(functional_call(net, (ps, buffers), (x,)), y)

        x = images.reshape(n_segments, -1, *images.shape[1:])
        y = labels.reshape(n_segments, -1)
        with torch.set_grad_enabled(differentiable):
            grads = vmap(grad(class_loss), in_dims=(None, 0, 0))(params, x, y)
        return [grads[n] for n, _ in named]

    def _per_sample(self, net, named, images, labels, differentiable):
        from torch.func import functional_call, grad, vmap

        names = [n for n, _ in named]
        params = {n: (p if differentiable else p.detach()) for n, p in named}
        buffers = dict(net.named_buffers())

        def sample_loss(ps, x, y):
            out = functional_call(net, (ps, buffers), (x.unsqueeze(0),))
            return F.cross_entropy(out, y.unsqueeze(0))

        with torch.set_grad_enabled(differentiable):
            grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, images, labels)
        return [
            FeatureBlock(
                f"grad:{n}", grads[n] if differentiable else grads[n].detach(), 1.0, parameter_gradient=True
            )
            for n in names
        ]


#: The registered feature maps by name.
FEATURE_MAPS: Registry = Registry("feature map")
for _cls in (EmbeddingFeatures, LayerFeatures, AttentionFeatures, GradientFeatures):
    FEATURE_MAPS.register(_cls)
FEATURE_MAP_NAMES = FEATURE_MAPS.names


def get_feature_map(name: str, **options) -> FeatureMap:
    """Build a feature map by name (:data:`FEATURE_MAP_NAMES`) with its constructor options.

    Options: ``layers``: ``layer_weights``, ``embedding_weight``; ``attention``: ``power``,
    ``attention_weight``, ``embedding_weight``; ``gradients``: ``mode`` (``"mean"`` | ``"per_sample"``).
    (:meth:`~ipmcondense.components.Component.from_config` builds one from the flat hyperparameters.)
    """
    cls = FEATURE_MAPS.get(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise TypeError(f"bad options for feature map {name!r}: {err}") from err
