"""DCC: DC's matching distance on the gradient of the loss over all classes jointly."""

import pytest
import torch
import torch.nn.functional as F

from ipmcondense.condensation.api import condense
from ipmcondense.condensation.discrepancies import GradientCosineDiscrepancy, GradientCosineJointDiscrepancy
from ipmcondense.condensation.engine import matching_loss
from ipmcondense.condensation.recipes import NORMALISED, get_recipe
from ipmcondense.data import load_dataset
from ipmcondense.features import GradientFeatures
from ipmcondense.nets import get_network


@pytest.fixture(scope="module")
def batches():
    digits = load_dataset("digits")
    g = torch.Generator().manual_seed(0)
    real, rl = [], []
    for c in range(10):
        idx = torch.nonzero(digits.train_labels == c).flatten()
        real.append(digits.train_images[idx[torch.randperm(idx.numel(), generator=g)[:6]]])
        rl.append(torch.full((6,), c))
    syn = torch.randn(20, 1, 8, 8, generator=g)
    return torch.cat(real), torch.cat(rl), syn, torch.arange(10).repeat_interleave(2)


def _net():
    torch.manual_seed(0)
    return get_network("convnet", 1, 10, (8, 8), width=16)


def _cosine_rows(gr, gs):
    gr, gs = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)
    return (1 - (gr * gs).sum(-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6)).sum()


@pytest.mark.parametrize("class_batching", [True, False])
def test_with_a_single_class_dcc_equals_dc(batches, class_batching):
    real, rl, syn, sl = batches
    net = _net()
    r, s = rl == 3, sl == 3
    args = (real[r], rl[r], syn[s], sl[s])
    dc = matching_loss(net, GradientFeatures(), GradientCosineDiscrepancy(), *args, class_batching=class_batching)
    dcc = matching_loss(net, GradientFeatures(), GradientCosineJointDiscrepancy(), *args,
                        class_batching=class_batching)
    torch.testing.assert_close(dcc.total, dc.total, rtol=1e-6, atol=1e-6)


def test_dcc_matches_the_gradient_of_the_joint_loss(batches):
    real, rl, syn, sl = batches
    net = _net()
    dcc = matching_loss(net, GradientFeatures(), GradientCosineJointDiscrepancy(), real, rl, syn, sl).total
    params = list(net.parameters())
    # DCC main.py: the real gradient averaged over classes; the synthetic one of the CE on the whole set
    g_real = [sum(gs) / 10 for gs in zip(*(torch.autograd.grad(F.cross_entropy(net(real[rl == c]), rl[rl == c]),
                                                               params) for c in range(10)))]
    g_syn = torch.autograd.grad(F.cross_entropy(net(syn), sl), params)
    expected = sum(_cosine_rows(a, b) for a, b in zip(g_real, g_syn) if a.dim() > 1)
    torch.testing.assert_close(dcc, expected, rtol=1e-4, atol=1e-5)
    dc = matching_loss(net, GradientFeatures(), GradientCosineDiscrepancy(), real, rl, syn, sl).total
    assert abs(float(dc.detach()) - float(dcc.detach())) > 1e-3  # with several classes it is a different loss


def test_dcc_row_runs():
    row = get_recipe("dcc")
    assert row.axes()["discrepancy"] == "gradient_cosine_joint" and row.relation_to_ipm == NORMALISED
    r = condense("dcc", "digits", ipc=1, iterations=1, progress=False, batch_real=8, outer_loop=2, inner_loop=1)
    assert r.images.shape == (10, 1, 8, 8) and all(torch.isfinite(torch.tensor(r.metrics["loss_history"])))
