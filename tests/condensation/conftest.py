"""Shared fixtures of the condensation tests: the bundled digits and class-blocked batches of them."""

import pytest
import torch

from ipmcondense.data import load_dataset


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture
def class_batch(digits):
    """``class_batch(n, seed)``: ``n`` random training digits of each class, in class blocks 0..9."""

    def draw(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        xs, ys = [], []
        for c in range(digits.num_classes):
            idx = torch.nonzero(digits.train_labels == c).flatten()
            xs.append(digits.train_images[idx[torch.randperm(idx.numel(), generator=g)[:n]]])
            ys.append(torch.full((n,), c))
        return torch.cat(xs), torch.cat(ys)

    return draw


#: the network of the small expert buffer below (narrow, so the buffer trains in seconds)
EXPERT_ARCH = "convnet-w32"


@pytest.fixture(scope="session")
def small_expert_buffer(tmp_path_factory, digits):
    """Two digits experts of ``convnet-w32``, two epochs each (HaBa and ESP tests)."""
    from ipmcondense.trajectories import train_experts

    out = tmp_path_factory.mktemp("small-experts")
    train_experts(digits, 2, 2, out, arch=EXPERT_ARCH, progress=False, seed=0)
    return out
