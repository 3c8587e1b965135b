"""LeNet-5 style network (the reference ``LeNet``: conv 6 -> conv 16 -> fc 120 -> fc 84)."""

from __future__ import annotations

from torch import Tensor, nn

from ipmcondense.nets._common import ConvBlockNetwork, check_geometry, halve

__all__ = ["LeNet"]


class LeNet(ConvBlockNetwork):
    r"""Two 5x5 convolutions (6 and 16 channels, ReLU, 2x2 max pooling) and three linear layers.

    ``embed(x)`` is the 84-d output of the second hidden linear layer (after ReLU), as the
    reference ``LeNet.embed``; the classifier is ``Linear(84, num_classes)``.

    Sizing rules (the reference pads the first convolution by 2 for single-channel input, which
    keeps 28x28 MNIST at 28x28; here): a convolution uses padding 2 ("same") when its input is
    smaller than 32 pixels on a side (first convolution) or smaller than 10 (second convolution),
    padding 0 otherwise; pooling is skipped below 2 pixels. So 28x28 and 32x32 both reach 16x5x5
    (400 features), and 8x8 digits reach 16x2x2 (64 features) instead of failing.

    Cost: about 0.65 M multiply-adds per 32x32x3 image.
    """

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        channels, num_classes, image_size = check_geometry(channels, num_classes, image_size)
        self.channels = channels
        self.num_classes = num_classes
        self.image_size = image_size
        spatial = image_size
        blocks, pools = [], []
        for in_ch, out_ch, same_below in ((channels, 6, 32), (6, 16, 10)):
            padding = 2 if min(spatial) < same_below else 0
            spatial = (spatial[0] + 2 * padding - 4, spatial[1] + 2 * padding - 4)
            blocks.append(nn.Sequential(nn.Conv2d(in_ch, out_ch, 5, padding=padding), nn.ReLU()))
            pooled, do_pool = halve(spatial)
            pools.append(nn.MaxPool2d(2, 2) if do_pool else nn.Identity())
            spatial = pooled
        self.blocks = nn.ModuleList(blocks)
        self.pools = nn.ModuleList(pools)
        self.conv_feature_shape: tuple[int, int, int] = (16, *spatial)
        self.fully_connected = nn.Sequential(
            nn.Linear(16 * spatial[0] * spatial[1], 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
        )
        self.feature_dim: int = 84
        self.classifier = nn.Linear(84, num_classes)

    def head(self, h: Tensor) -> Tensor:
        """84-d hidden representation before the classifier: ``(B, 84)``."""
        return self.fully_connected(h.flatten(-3))
