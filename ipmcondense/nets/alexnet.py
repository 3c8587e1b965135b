"""Small AlexNet for 32x32 / 28x28 images (the reference ``AlexNet`` of the condensation papers)."""

from __future__ import annotations

from torch import nn

from ipmcondense.nets._common import ConvBlockNetwork, check_geometry, halve

__all__ = ["AlexNet"]

# (out_channels, kernel, pool after this block)
_LAYOUT = ((128, 5, True), (192, 5, True), (256, 3, False), (192, 3, False), (192, 3, True))


class AlexNet(ConvBlockNetwork):
    r"""Five convolutions (128-192-256-192-192, ReLU, no normalisation) and a linear classifier.

    Layout as the reference: conv5x5 -> pool -> conv5x5 -> pool -> conv3x3 -> conv3x3 -> conv3x3
    -> pool, 2x2 max pooling, "same" padding; ``embed`` is the flattened output of the last pooling
    (192x4x4 = 3072-d on 32x32 and on 28x28 input), the classifier ``Linear(feature_dim, C)``.

    Sizing rules: on 28x28 input the first convolution uses padding 4 (32x32 feature map, as the
    reference does for single-channel input), otherwise padding 2; pooling is skipped below 2
    pixels, so 8x8 digits give a 192x1x1 embedding.

    Cost: about 0.13 G multiply-adds per 32x32x3 image.
    """

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        channels, num_classes, image_size = check_geometry(channels, num_classes, image_size)
        self.channels = channels
        self.num_classes = num_classes
        self.image_size = image_size
        spatial = image_size
        in_channels = channels
        blocks, pools = [], []
        for index, (out_channels, kernel, pool_after) in enumerate(_LAYOUT):
            padding = kernel // 2
            if index == 0 and image_size == (28, 28):
                padding = 4
            spatial = (spatial[0] + 2 * padding - kernel + 1, spatial[1] + 2 * padding - kernel + 1)
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, kernel, padding=padding), nn.ReLU()
                )
            )
            pooled, do_pool = halve(spatial)
            if pool_after and do_pool:
                pools.append(nn.MaxPool2d(2, 2))
                spatial = pooled
            else:
                pools.append(nn.Identity())
            in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.pools = nn.ModuleList(pools)
        self.feature_shape: tuple[int, int, int] = (in_channels, *spatial)
        self.feature_dim: int = in_channels * spatial[0] * spatial[1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)
