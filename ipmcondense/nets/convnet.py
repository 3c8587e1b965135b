"""ConvNet: the standard network of dataset condensation (Zhao et al., VICO-UoE reference).

Each block is ``Conv2d(3x3) -> norm -> activation -> pool(2x2)``; the flattened output of the last
block is the embedding, followed by one ``nn.Linear`` classifier. The default (ConvNet-3: width 128,
depth 3, instance norm, ReLU, average pooling) has 320,010 parameters on CIFAR-10 and a 2048-d
embedding on 32x32 and 28x28 images, as the reference.
"""

from __future__ import annotations

from torch import nn

from ipmcondense.ipm._validation import check_choice, check_positive_int
from ipmcondense.nets._common import (
    ConvBlockNetwork,
    check_geometry,
    halve,
    make_activation,
    make_norm,
)

__all__ = ["ConvNet", "POOLING_NAMES"]

POOLING_NAMES = ("avgpool", "maxpool", "none")


class ConvNet(ConvBlockNetwork):
    r"""Depth-``depth`` ConvNet of width ``width``, sized to the input.

    Block :math:`\ell`: :math:`h_\ell = \mathrm{pool}(\sigma(\mathrm{norm}(W_\ell * h_{\ell-1})))`
    with 3x3 convolutions; :math:`\mathrm{embed}(x) = \mathrm{vec}(h_{\mathrm{depth}})`;
    :math:`\mathrm{logits} = A\,\mathrm{embed}(x) + b`.

    Sizing rules (documented deviations from the reference are marked):

    * 28x28 input: the first convolution uses padding 3, so the feature map is 32x32 and ConvNet-3
      gives a 128x4x4 = 2048-d embedding (the reference does this for single-channel input; here it
      applies to any 28x28 input). Every other convolution uses padding 1.
    * Pooling is skipped in a block whose input is already below 2 pixels on a side (deviation:
      the reference crashes). ConvNet-3 on 8x8 digits gives 128x1x1; ConvNet-4 on 8x8 pools three
      times and leaves the fourth block at 1x1.

    Args:
        channels: input channels C.
        num_classes: number of classes (classifier outputs).
        image_size: ``(H, W)`` of the input images.
        width: channels of every convolution (128).
        depth: number of blocks (3).
        norm: ``"instancenorm"`` (``GroupNorm(C, C, affine=True)``), ``"batchnorm"``,
            ``"layernorm"``, ``"groupnorm"`` or ``"none"``.
        activation: ``"relu"``, ``"leakyrelu"``, ``"sigmoid"`` or ``"swish"``.
        pooling: ``"avgpool"``, ``"maxpool"`` or ``"none"``.

    Cost: one forward pass of ConvNet-3 on a 32x32x3 image is about 50.7 M multiply-adds.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        *,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        activation: str = "relu",
        pooling: str = "avgpool",
    ) -> None:
        super().__init__()
        channels, num_classes, image_size = check_geometry(channels, num_classes, image_size)
        for value, name in ((width, "width"), (depth, "depth")):
            check_positive_int(value, name)
        check_choice(pooling, POOLING_NAMES, "pooling")
        self.channels = channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.width, self.depth, self.norm, self.activation, self.pooling = (
            width,
            depth,
            norm,
            activation,
            pooling,
        )

        blocks, pools = [], []
        spatial = image_size
        in_channels = channels
        for index in range(depth):
            padding = 3 if index == 0 and image_size == (28, 28) else 1
            spatial = (spatial[0] + 2 * padding - 2, spatial[1] + 2 * padding - 2)
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, width, kernel_size=3, padding=padding),
                    make_norm(norm, width, spatial),
                    make_activation(activation),
                )
            )
            pooled, do_pool = halve(spatial)
            if pooling != "none" and do_pool:
                pools.append(nn.AvgPool2d(2, 2) if pooling == "avgpool" else nn.MaxPool2d(2, 2))
                spatial = pooled
            else:
                pools.append(nn.Identity())
            in_channels = width
        self.blocks = nn.ModuleList(blocks)
        self.pools = nn.ModuleList(pools)
        self.feature_shape: tuple[int, int, int] = (width, *spatial)
        self.feature_dim: int = width * spatial[0] * spatial[1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)
