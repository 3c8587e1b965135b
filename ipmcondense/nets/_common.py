"""Checks and small building blocks shared by the networks of :mod:`ipmcondense.nets`.

Private module: the names are not part of the public API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ipmcondense.ipm._validation import check_positive_int, check_choice

__all__ = [
    "NORM_NAMES",
    "ACTIVATION_NAMES",
    "check_geometry",
    "check_images",
    "make_norm",
    "make_activation",
    "halve",
    "run_block",
]

NORM_NAMES = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTIVATION_NAMES = ("relu", "leakyrelu", "sigmoid", "swish")


def check_geometry(
    channels: Any, num_classes: Any, image_size: Any
) -> tuple[int, int, tuple[int, int]]:
    """Validate the ``(channels, num_classes, image_size)`` triple that sizes every network."""
    channels = check_positive_int(channels, "channels")
    num_classes = check_positive_int(num_classes, "num_classes")
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if not isinstance(image_size, Sequence) or len(image_size) != 2:
        raise ValueError(f"image_size must be a pair (height, width), got {image_size!r}")
    height = check_positive_int(image_size[0], "image_size[0] (height)")
    width = check_positive_int(image_size[1], "image_size[1] (width)")
    return channels, num_classes, (height, width)


def check_images(x: Any, channels: int, image_size: tuple[int, int], name: str = "x") -> Tensor:
    """Raise a clear error unless ``x`` is a floating tensor of images shaped ``(..., C, H, W)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images, got {type(x).__name__}")
    expected = (channels, *image_size)
    if x.dim() < 3 or tuple(x.shape[-3:]) != expected:
        raise ValueError(
            f"{name} must have shape (batch, {expected[0]}, {expected[1]}, {expected[2]}) for this "
            f"network, got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    return x


def make_norm(norm: str, channels: int, spatial: tuple[int, int]) -> nn.Module:
    """The normalisation layer of the reference implementations, by name.

    ``"instancenorm"`` is ``GroupNorm(C, C, affine=True)`` (one group per channel, as the reference
    ConvNet), ``"groupnorm"`` is ``GroupNorm(4, C)`` when 4 divides C, ``"layernorm"`` normalises
    over ``(C, H, W)`` with an elementwise affine map, ``"none"`` is the identity.
    """
    check_choice(norm, NORM_NAMES, "norm")
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        return nn.LayerNorm([channels, *spatial], elementwise_affine=True)
    if norm == "groupnorm":
        groups = 4 if channels % 4 == 0 else 1
        return nn.GroupNorm(groups, channels, affine=True)
    return nn.Identity()


def make_activation(activation: str) -> nn.Module:
    """``relu``, ``leakyrelu`` (slope 0.01), ``sigmoid`` or ``swish`` (SiLU)."""
    check_choice(activation, ACTIVATION_NAMES, "activation")
    if activation == "relu":
        return nn.ReLU()
    if activation == "leakyrelu":
        return nn.LeakyReLU(0.01)
    if activation == "sigmoid":
        return nn.Sigmoid()
    return nn.SiLU()


def halve(spatial: tuple[int, int]) -> tuple[tuple[int, int], bool]:
    """Size after a 2x2/stride-2 pooling, and whether to pool at all.

    Pooling is skipped (returns the size unchanged and ``False``) once either side is below 2, so
    that deep networks stay defined on tiny inputs such as the 8x8 scikit-learn digits.
    """
    h, w = spatial
    if h < 2 or w < 2:
        return spatial, False
    return (h // 2, w // 2), True



def run_block(block: nn.Module, h: Tensor) -> Tensor:
    """``block(h)``; without autograd, the ReLUs of a ``Sequential`` block act in place on the fresh tensor before them.

    The value is the same bit for bit (``relu_`` and ``relu`` compute the same maximum). In place, the
    activation needs no new tensor of the size of the block's output: on a CPU a large fresh tensor is
    fresh memory from the kernel (page faults, zero-filling), the cost that made the whole-batch real
    side of DM slower than the reference's loop (whose ConvNet builds ``ReLU(inplace=True)``). Only without
    autograd (``torch.is_grad_enabled()`` false) and never on the block's input ``h`` itself: with autograd
    the modules run as built, so no saved tensor is ever overwritten.
    """
    if torch.is_grad_enabled() or not isinstance(block, nn.Sequential):
        return block(h)
    out = h
    for module in block:
        if type(module) is nn.ReLU and out is not h:
            out = torch.relu_(out)
        else:
            out = module(out)
    return out


class ConvBlockNetwork(nn.Module):
    """Base of the networks built as ``blocks[i] -> pools[i]`` stages, a head, and a linear classifier.

    Subclasses set ``channels``, ``image_size``, ``blocks`` and ``pools`` (``nn.ModuleList``s of equal
    length), ``classifier`` and ``feature_dim``, and may override :meth:`head` (identity flattening
    by default) which maps the last pooled feature map to the embedding.
    """

    channels: int
    image_size: tuple[int, int]
    blocks: nn.ModuleList
    pools: nn.ModuleList
    classifier: nn.Linear
    feature_dim: int

    def head(self, h: Tensor) -> Tensor:
        """Embedding from the last pooled feature map: flattened ``(B, C*h*w)``."""
        return h.flatten(-3)

    def layer_features(self, x: Tensor) -> list[Tensor]:
        """Activation of every block, before its pooling: one ``(B, C, h, w)`` tensor per block."""
        h = check_images(x, self.channels, self.image_size)
        outputs = []
        for block, pool in zip(self.blocks, self.pools):
            h = run_block(block, h)
            outputs.append(h)
            h = pool(h)
        return outputs

    def embed(self, x: Tensor) -> Tensor:
        """The features before the classifier: ``(B, feature_dim)``."""
        h = check_images(x, self.channels, self.image_size)
        for block, pool in zip(self.blocks, self.pools):
            h = pool(run_block(block, h))
        return self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` = ``classifier(embed(x))``."""
        return self.classifier(self.embed(x))
