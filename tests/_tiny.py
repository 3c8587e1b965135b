"""Tiny smooth networks and data shared by the unroll, trajectory-matching and expert-buffer tests."""

import torch

from ipmcondense.nets import get_network

DT = torch.float64



def tiny_net(seed: int = 0, width: int = 4, depth: int = 2, activation: str = "swish", dtype=DT):
    """A small smooth ConvNet for 1x8x8 inputs and 4 classes (smooth so finite differences are clean)."""
    torch.manual_seed(seed)
    return get_network("convnet", 1, 4, (8, 8), width=width, depth=depth, activation=activation).to(dtype)


def tiny_data(n: int = 12, seed: int = 1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    labels = torch.arange(n) % 4
    return images, labels


