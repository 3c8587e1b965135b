"""Networks used as feature maps and as evaluation models, all sized to the input images.

Every network built by :func:`get_network` offers the same interface:

* ``forward(x) -> (B, num_classes)`` logits, equal to ``classifier(embed(x))``;
* ``embed(x) -> (B, feature_dim)``: the flattened features that enter the classifier;
* ``layer_features(x) -> list[Tensor]``: the activation of each block, before pooling, in order
  (4-D maps for convolutional blocks; 2-D hidden layers for the MLP);
* ``feature_dim: int`` and ``classifier: nn.Linear`` (the final layer).

Parameters are initialised by PyTorch's defaults, so ``torch.manual_seed`` (or a seeded
``torch.random.fork_rng`` block) set by the caller controls them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from ipmcondense.ipm._validation import check_choice
from ipmcondense.nets.alexnet import AlexNet
from ipmcondense.nets.convnet import ConvNet
from ipmcondense.nets.lenet import LeNet
from ipmcondense.nets.mlp import MLP
from ipmcondense.nets.resnet import BasicBlock, ResNet18

__all__ = [
    "NETWORK_NAMES",
    "get_network",
    "build_isolated",
    "draw_seed",
    "ConvNet",
    "MLP",
    "LeNet",
    "AlexNet",
    "ResNet18",
    "BasicBlock",
]

# Each name maps to (class, default keyword arguments); explicit **kwargs override the defaults.
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "convnet": (ConvNet, {}),
    **{f"convnet-d{depth}": (ConvNet, {"depth": depth}) for depth in (1, 2, 3, 4)},
    **{f"convnet-w{width}": (ConvNet, {"width": width}) for width in (32, 64, 128, 256)},
    "convnet-bn": (ConvNet, {"norm": "batchnorm"}),
    "convnet-ln": (ConvNet, {"norm": "layernorm"}),
    "convnet-gn": (ConvNet, {"norm": "groupnorm"}),
    "convnet-nn": (ConvNet, {"norm": "none"}),
    "convnet-mp": (ConvNet, {"pooling": "maxpool"}),
    "mlp": (MLP, {}),
    "lenet": (LeNet, {}),
    "alexnet": (AlexNet, {}),
    "resnet18": (ResNet18, {"norm": "instancenorm"}),
    "resnet18-bn": (ResNet18, {"norm": "batchnorm"}),
}

NETWORK_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_network(
    name: str,
    channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    **kwargs: Any,
) -> nn.Module:
    """Build the network called ``name`` for ``channels x image_size`` images and ``num_classes``.

    Names (case-insensitive): ``"convnet"`` (ConvNet-3: width 128, depth 3, instance norm, ReLU,
    average pooling), ``"convnet-d1"`` .. ``"convnet-d4"`` (depth), ``"convnet-w32/64/128/256"``
    (width), ``"convnet-bn"`` / ``"-ln"`` / ``"-gn"`` / ``"-nn"`` (batch, layer, group, no norm),
    ``"convnet-mp"`` (max pooling), ``"mlp"``, ``"lenet"``, ``"alexnet"``, ``"resnet18"`` (instance
    norm) and ``"resnet18-bn"``.

    Args:
        name: one of :data:`NETWORK_NAMES`.
        channels: input channels.
        num_classes: number of classes.
        image_size: ``(H, W)`` of the inputs.
        **kwargs: constructor arguments that override the variant's defaults (for ConvNet:
            ``width``, ``depth``, ``norm``, ``activation``, ``pooling``; MLP: ``hidden``,
            ``activation``; ResNet18: ``norm``).

    Raises:
        ValueError: unknown ``name`` (the message lists the known names) or invalid geometry.
    """
    key = name.lower().strip() if isinstance(name, str) else name
    check_choice(key, NETWORK_NAMES, "network name")
    cls, defaults = _REGISTRY[key]
    return cls(channels, num_classes, image_size, **{**defaults, **kwargs})


_Built = TypeVar("_Built")


def draw_seed(generator: torch.Generator) -> int:
    """A network seed in ``[0, 2**62)`` drawn from ``generator`` (one ``randint`` draw)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def build_isolated(build: Callable[[], _Built], seed: int | None = None) -> _Built:
    """``build()`` under ``torch.manual_seed(seed)`` (or the current state if ``None``), global RNG restored.

    The one way the library constructs seeded networks: the initialisation depends on ``seed`` only,
    and the caller's global random state is the same afterwards (``torch.random.fork_rng``, CPU).
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        return build()
