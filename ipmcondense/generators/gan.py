r"""A small class-conditional DCGAN-style GAN, sized to the dataset's images (8x8 digits, 28x28, 32x32).

:class:`ConditionalGenerator` maps latents :math:`z \in R^d` and class labels :math:`y` to images in the
dataset's *normalised* space (the space every other part of the library works in):

.. math:: G(z, y) = \big(\sigma(g([z, e_y])) - m\big) / s,

with :math:`e_y` the one-hot label, :math:`g` a fully connected layer to a ``base x base`` map followed by
``k`` blocks (nearest 2x up-sampling, 3x3 convolution, batch norm, ReLU) and a 3x3 convolution to the
image channels, :math:`\sigma` the logistic sigmoid (pixels in [0, 1]) and ``m, s`` the dataset's
per-channel mean and standard deviation. ``k`` is the largest of 3, 2, 1 that leaves a base of at least
2 pixels dividing both sides (8x8: 2x2 base, k = 2; 28x28: 7x7, k = 2; 32x32: 4x4, k = 3). In ``eval()``
mode batch norm uses its running statistics, so decoding is a pure function of ``(z, y)``.

:class:`ConditionalDiscriminator` is a projection discriminator (Miyato & Koyama, ICLR'18) with spectral
normalisation on every layer: :math:`D(x, y) = w^\top h(x) + \langle E_y, h(x)\rangle + b`, trained
with the hinge loss (:func:`hinge_losses`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["ConditionalGenerator", "ConditionalDiscriminator", "hinge_losses", "upsampling_plan"]


def upsampling_plan(image_size: Sequence[int]) -> tuple[int, int, int]:
    """``(base_height, base_width, k)``: the base map and the number of 2x up-samplings for ``image_size``."""
    h, w = (int(v) for v in image_size)
    for k in (3, 2, 1):
        f = 2**k
        if h % f == 0 and w % f == 0 and h // f >= 2 and w // f >= 2:
            return h // f, w // f, k
    raise ValueError(
        f"image_size {h}x{w} cannot be reached by 2x up-sampling from a base of at least 2x2; the GAN needs sides "
        "divisible by 2 and at least 4 (e.g. 8, 28, 32)"
    )


class ConditionalGenerator(nn.Module):
    """The generator :math:`G(z, y)` of the module docstring; outputs normalised images ``(B, C, H, W)``.

    Args:
        latent_dim: dimension ``d`` of the latent ``z``.
        num_classes: number of classes (one-hot conditioning).
        channels: image channels.
        image_size: ``(H, W)``.
        width: channels of the last block (the first has ``2 * width``).
        mean, std: the dataset's per-channel normalisation (pixel scale [0, 1]).

    Cost: one forward pass is ``O(B * width^2 * H * W)``.
    """

    def __init__(self, latent_dim: int, num_classes: int, channels: int, image_size: Sequence[int], width: int = 64,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        for value, name in ((latent_dim, "latent_dim"), (num_classes, "num_classes"), (channels, "channels"),
                            (width, "width")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.latent_dim, self.num_classes, self.channels, self.width = latent_dim, num_classes, channels, width
        self.image_size = tuple(int(v) for v in image_size)
        bh, bw, k = upsampling_plan(self.image_size)
        self.base = (bh, bw)
        widths = [max(width, (2 * width) // 2**i) for i in range(k + 1)]
        self.fc = nn.Linear(latent_dim + num_classes, widths[0] * bh * bw)
        self.fc_norm = nn.BatchNorm2d(widths[0])
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(widths[i], widths[i + 1], 3, padding=1),
                          nn.BatchNorm2d(widths[i + 1]), nn.ReLU())
            for i in range(k)
        )
        self.to_pixels = nn.Conv2d(widths[-1], channels, 3, padding=1)
        mean = [0.0] * channels if mean is None else [float(v) for v in mean]
        std = [1.0] * channels if std is None else [float(v) for v in std]
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"mean and std need {channels} values each (std positive), got {mean} and {std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def architecture(self) -> dict:
        """The constructor's arguments (what :func:`ipmcondense.generators.load_generator` rebuilds from)."""
        return {"latent_dim": self.latent_dim, "num_classes": self.num_classes, "channels": self.channels,
                "image_size": list(self.image_size), "width": self.width,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        if labels.shape != (z.shape[0],):
            raise ValueError(f"labels must have shape ({z.shape[0]},) to match z, got {tuple(labels.shape)}")
        onehot = F.one_hot(labels.long(), self.num_classes).to(z.dtype)
        h = self.fc(torch.cat([z, onehot], dim=1)).view(z.shape[0], -1, *self.base)
        h = F.relu(self.fc_norm(h))
        for block in self.blocks:
            h = block(h)
        pixels = torch.sigmoid(self.to_pixels(h))
        return (pixels - self.mean) / self.std


class ConditionalDiscriminator(nn.Module):
    """Projection discriminator with spectral normalisation (module docstring): ``(B, C, H, W), (B,) -> (B,)``."""

    def __init__(self, num_classes: int, channels: int, image_size: Sequence[int], width: int = 64) -> None:
        super().__init__()
        _, _, k = upsampling_plan(image_size)
        widths = [width] + [min(4 * width, width * 2 ** (i + 1)) for i in range(k)]
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(channels, widths[0], 3, padding=1)), nn.LeakyReLU(0.2)]
        for i in range(k):
            layers += [spectral_norm(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.linear = spectral_norm(nn.Linear(widths[-1], 1))
        self.embedding = spectral_norm(nn.Embedding(num_classes, widths[-1]))

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        h = self.features(images).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embedding(labels.long()) * h).sum(dim=1)


def hinge_losses(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    r"""The discriminator's hinge loss :math:`E[\max(0, 1 - D(x))] + E[\max(0, 1 + D(G(z)))]`."""
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()
