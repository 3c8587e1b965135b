r"""An FID-like sample-quality score computed with the library's own IPM: a KID-style MMD in a random ConvNet.

:func:`random_convnet_mmd2` embeds both image sets with ONE fixed, seeded, *untrained* ConvNet-3
(:func:`ipmcondense.nets.get_network` ``"convnet"``: width 128, instance norm, average pooling; built with
``ipmcondense.nets.build_isolated`` from ``seed``, 0 by default, so every run and every machine use the
same network) and returns the unbiased Gaussian-kernel :math:`\mathrm{MMD}^2` (U-statistic, median-heuristic
bandwidth of the pooled embeddings) between the two embedded sets (:func:`ipmcondense.ipm.mmd2`):

.. math:: \mathrm{score}(A, B) = \widehat{\mathrm{MMD}}^2_{k}\big(\psi_\#\hat\mu_A, \psi_\#\hat\mu_B\big),
    \quad k(u, v) = \exp(-\|u - v\|^2 / (2 h^2)).

It plays the role of FID/KID without an Inception network (none can be downloaded here): lower is better,
0 in expectation for samples of the same distribution (the estimator is unbiased and can be slightly
negative). A random ConvNet's embedding is a fixed, cheap feature map, so scores are comparable between
runs of the same dataset and image size, not with published FID numbers. Cost: one ConvNet forward pass per
image plus :math:`O((n + m)^2 d)` for the kernel sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ipmcondense.ipm import mmd2
from ipmcondense.nets import build_isolated, get_network

__all__ = ["random_convnet_mmd2", "QUALITY_EMBEDDING"]

#: The embedding of the score, in words (saved in the generator's metrics).
QUALITY_EMBEDDING = "untrained ConvNet-3 (width 128, instancenorm, avgpool) seeded with 0; Gaussian MMD^2, unbiased, median bandwidth"


@torch.no_grad()
def random_convnet_mmd2(images_a: Tensor, images_b: Tensor, num_classes: int, *, seed: int = 0,
                        batch_size: int = 500) -> float:
    """The score of the module docstring between ``(n, C, H, W)`` and ``(m, C, H, W)`` normalised images."""
    if images_a.dim() != 4 or images_b.dim() != 4 or images_a.shape[1:] != images_b.shape[1:]:
        raise ValueError(
            f"images_a and images_b must be (N, C, H, W) batches of the same image shape, got "
            f"{tuple(images_a.shape)} and {tuple(images_b.shape)}"
        )
    if images_a.shape[0] < 2 or images_b.shape[0] < 2:
        raise ValueError("the unbiased MMD^2 needs at least 2 images on each side")
    channels, h, w = images_a.shape[1:]
    net = build_isolated(lambda: get_network("convnet", channels, num_classes, (h, w)), seed).to(images_a.device).eval()

    def embed(x: Tensor) -> Tensor:
        return torch.cat([net.embed(x[i:i + batch_size].float()) for i in range(0, x.shape[0], batch_size)])

    return float(mmd2(embed(images_a).double(), embed(images_b).double(), kernel="gaussian", bandwidth="median",
                      estimator="unbiased"))
