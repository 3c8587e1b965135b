"""The one loop: recipe losses equal their IPM definitions, siamese augmentation, batching, resume."""

import pytest
import torch
import torch.nn.functional as F

from ipmcondense.augment import DifferentiableSiameseAugmentation, dsa_strategy_for
from ipmcondense.condensation.api import condense
from ipmcondense.condensation.discrepancies import (
    GradientCosineDiscrepancy,
    GradientMSEDiscrepancy,
    MeanEmbeddingDiscrepancy,
)
from ipmcondense.condensation.engine import (
    build_discrepancy,
    build_extra_terms,
    build_feature_map,
    matching_loss,
    siamese_augment,
)
from ipmcondense.condensation.recipes import get_recipe, resolve_config
from ipmcondense.data import load_dataset
from ipmcondense.features import EmbeddingFeatures, GradientFeatures
from ipmcondense.ipm.mean_embedding import mean_embedding_distance
from ipmcondense.nets import get_network


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _net(width=16, seed=0, classes=10):
    torch.manual_seed(seed)
    return get_network("convnet", 1, classes, (8, 8), width=width)


def _batches(digits, n_real=6, ipc=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    real, rl = [], []
    for c in range(10):
        idx = torch.nonzero(digits.train_labels == c).flatten()
        pick = idx[torch.randperm(idx.numel(), generator=g)[:n_real]]
        real.append(digits.train_images[pick])
        rl.append(torch.full((n_real,), c))
    syn = torch.randn(10 * ipc, 1, 8, 8, generator=g)
    return torch.cat(real), torch.cat(rl), syn, torch.arange(10).repeat_interleave(ipc)


def test_dm_loss_is_sum_of_squared_mean_embedding_distances(digits):
    net = _net().requires_grad_(False)
    real, rl, syn, sl = _batches(digits)
    loss = matching_loss(net, EmbeddingFeatures(), MeanEmbeddingDiscrepancy(), real, rl, syn, sl).total
    expected = sum(
        mean_embedding_distance(net.embed(real[rl == c]), net.embed(syn[sl == c]), squared=True) for c in range(10)
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def _mean_gradients(net, x, y):
    loss = F.cross_entropy(net(x), y)
    return torch.autograd.grad(loss, list(net.parameters()))


def test_dc_gradient_mse_is_squared_norm_of_mean_gradient_difference(digits):
    net = _net()
    real, rl, syn, sl = _batches(digits)
    loss = matching_loss(net, GradientFeatures(), GradientMSEDiscrepancy(), real, rl, syn, sl).total
    expected = 0.0
    for c in range(10):
        gr = torch.cat([g.flatten() for g in _mean_gradients(net, real[rl == c], rl[rl == c])])
        gs = torch.cat([g.flatten() for g in _mean_gradients(net, syn[sl == c], sl[sl == c])])
        expected = expected + ((gr - gs) ** 2).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_dc_gradient_cosine_is_reference_match_loss(digits):
    net = _net()
    real, rl, syn, sl = _batches(digits)
    loss = matching_loss(net, GradientFeatures(), GradientCosineDiscrepancy(), real, rl, syn, sl).total
    expected = 0.0
    for c in range(10):
        for gr, gs in zip(_mean_gradients(net, real[rl == c], rl[rl == c]), _mean_gradients(net, syn[sl == c], sl[sl == c])):
            if gr.dim() == 1:
                continue  # reference: biases and norm affine contribute 0
            gr, gs = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)
            expected = expected + (1 - (gr * gs).sum(-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6)).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


class _SpyAugmentation:
    """Records which draw each batch was augmented with; adds the draw's value (differentiable)."""

    def __init__(self):
        self.calls = []

    def draw(self, generator=None, device=None):
        return float(torch.rand((), generator=generator))

    def apply(self, x, draw):
        self.calls.append((draw, x.shape[0]))
        return x + draw


def test_siamese_augmentation_shares_one_draw_per_class_between_real_and_synthetic(digits):
    real, rl, syn, sl = _batches(digits)
    spy = _SpyAugmentation()
    real_aug, syn_aug = siamese_augment(spy, real, rl, syn, sl, torch.Generator().manual_seed(0))
    assert len(spy.calls) == 20
    draws = [spy.calls[2 * c][0] for c in range(10)]
    for c in range(10):
        assert spy.calls[2 * c][0] == spy.calls[2 * c + 1][0]  # real and synthetic of class c: same draw
        torch.testing.assert_close(real_aug[rl == c], real[rl == c] + draws[c])
        torch.testing.assert_close(syn_aug[sl == c], syn[sl == c] + draws[c])
    assert len(set(draws)) == 10  # a new draw per class


def test_dsa_in_engine_is_siamese_and_loss_differentiable(digits):
    real, rl, syn, sl = _batches(digits)
    aug = DifferentiableSiameseAugmentation(dsa_strategy_for(digits))
    syn = syn.requires_grad_(True)
    real_aug, syn_aug = siamese_augment(aug, real, rl, syn, sl, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    for c in range(10):
        draw = aug.draw(g)
        joint = aug.apply(torch.cat([real[rl == c], syn[sl == c].detach()]), draw)
        torch.testing.assert_close(real_aug[rl == c], joint[:6])
        torch.testing.assert_close(syn_aug[sl == c].detach(), joint[6:])
    net = _net().requires_grad_(False)
    loss = matching_loss(net, EmbeddingFeatures(), MeanEmbeddingDiscrepancy(), real_aug, rl, syn_aug, sl).total
    (grad,) = torch.autograd.grad(loss, [syn])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_dm_loss_gradcheck_wrt_synthetic_images(digits):
    torch.manual_seed(0)
    net = get_network("convnet-d1", 1, 10, (8, 8), width=4).double().requires_grad_(False)
    real, rl, syn, sl = _batches(digits, n_real=3, ipc=1)
    real = real.double()
    syn = syn.double().requires_grad_(True)

    def f(s):
        return matching_loss(net, EmbeddingFeatures(), MeanEmbeddingDiscrepancy(), real, rl, s, sl).total

    assert torch.autograd.gradcheck(f, (syn,))


@pytest.mark.parametrize("method", ["dm", "m3d", "dc", "cafe", "datadam", "idm"])
def test_class_batched_and_per_class_loop_give_the_same_loss(digits, method):
    recipe = get_recipe(method)
    config = resolve_config(recipe, "digits")
    fm, disc, extras = build_feature_map(recipe, config), build_discrepancy(recipe, config), build_extra_terms(recipe, config)
    net = _net(width=32).requires_grad_(fm.needs_parameter_gradients)
    real, rl, syn, sl = _batches(digits)
    syn = syn.requires_grad_(True)
    a = matching_loss(net, fm, disc, real, rl, syn, sl, class_batching=True, extra_terms=extras)
    b = matching_loss(net, fm, disc, real, rl, syn, sl, class_batching=False, extra_terms=extras)
    torch.testing.assert_close(a.total, b.total, rtol=1e-5, atol=1e-5)
    for x, y in zip(a.per_class, b.per_class):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    ga, = torch.autograd.grad(a.total, [syn])
    gb, = torch.autograd.grad(b.total, [syn])
    torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-3 * float(ga.abs().max()))


def test_mismatched_class_blocks_are_rejected(digits):
    real, rl, syn, sl = _batches(digits)
    with pytest.raises(ValueError, match="same class blocks"):
        matching_loss(_net(), EmbeddingFeatures(), MeanEmbeddingDiscrepancy(), real, rl, syn[:4], sl[:4])


_TINY = {"batch_real": 8, "outer_loop": 2, "inner_loop": 1, "train_steps": 1, "batch_pool": 4}


@pytest.mark.parametrize("method", ["dm", "dc", "idm"])
def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path, method):
    kwargs = dict(ipc=1, seed=3, progress=False, **_TINY)
    straight = condense(method, "digits", iterations=4, out=tmp_path / "a", **kwargs)
    condense(method, "digits", iterations=2, out=tmp_path / "b", **kwargs)
    resumed = condense(method, "digits", iterations=4, out=tmp_path / "b", resume=True, **kwargs)
    assert torch.equal(straight.images, resumed.images)
    assert straight.metrics["loss_history"] == resumed.metrics["loss_history"]
    on_disk = torch.load(tmp_path / "b" / "synthetic.pt", weights_only=False)
    assert torch.equal(on_disk["images"], straight.images)
