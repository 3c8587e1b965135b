"""ResNet-18 for small images (CIFAR-style stem), with instance norm or batch norm."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.ipm._validation import check_choice
from ipmcondense.nets._common import check_geometry, check_images, make_norm

__all__ = ["BasicBlock", "ResNet18"]

RESNET_NORMS = ("instancenorm", "batchnorm")


class BasicBlock(nn.Module):
    r"""Residual block :math:`y = \mathrm{ReLU}(N_2 W_2 \,\mathrm{ReLU}(N_1 W_1 x) + S x)`.

    Two 3x3 convolutions (the first with ``stride``); the shortcut :math:`S` is the identity, or a
    1x1 convolution with ``stride`` plus normalisation when the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_channels, (1, 1))
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels, (1, 1))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                make_norm(norm, out_channels, (1, 1)),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    r"""ResNet-18 as in the condensation references: 3x3 stride-1 stem (64 channels), four stages
    of two :class:`BasicBlock` each (64, 128, 256, 512 channels; strides 1, 2, 2, 2), global
    average pooling and ``Linear(512, num_classes)``.

    ``norm="instancenorm"`` uses ``GroupNorm(C, C, affine=True)`` (one group per channel, the
    references' "instancenorm"), ``norm="batchnorm"`` uses ``BatchNorm2d``.

    Sizing: the reference ends with ``avg_pool2d(out, 4)``, which equals global average pooling
    on 32x32 (4x4 final map) and 28x28 input; here the pooling is adaptive (to 1x1), so the
    network is also defined on 8x8 digits (final map 1x1, stride-2 convolutions with padding 1 keep
    a 1x1 map at 1x1). ``embed`` is always 512-d. With ``batchnorm`` in training mode a batch
    needs more than one value per channel (batch size >= 2 on 8x8 input).

    Cost: about 0.56 G multiply-adds per 32x32x3 image; 11.2 M parameters.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        *,
        norm: str = "instancenorm",
    ) -> None:
        super().__init__()
        channels, num_classes, image_size = check_geometry(channels, num_classes, image_size)
        check_choice(norm, RESNET_NORMS, "norm")
        self.channels = channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.norm = norm
        self.stem = nn.Sequential(
            nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False),
            make_norm(norm, 64, image_size),
            nn.ReLU(),
        )
        stages = []
        in_channels = 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    BasicBlock(in_channels, out_channels, stride, norm),
                    BasicBlock(out_channels, out_channels, 1, norm),
                )
            )
            in_channels = out_channels
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim: int = 512
        self.classifier = nn.Linear(512, num_classes)

    def layer_features(self, x: Tensor) -> list[Tensor]:
        """Output of the stem and of each of the four stages (after ReLU): five 4-D tensors."""
        h = self.stem(check_images(x, self.channels, self.image_size))
        outputs = [h]
        for stage in self.stages:
            h = stage(h)
            outputs.append(h)
        return outputs

    def embed(self, x: Tensor) -> Tensor:
        """Globally average-pooled output of the last stage: ``(B, 512)``."""
        h = self.stem(check_images(x, self.channels, self.image_size))
        for stage in self.stages:
            h = stage(h)
        return self.pool(h).flatten(-3)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` = ``classifier(embed(x))``."""
        return self.classifier(self.embed(x))
