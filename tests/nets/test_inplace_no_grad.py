"""The no-autograd path of the block networks: ReLUs in place, the same numbers bit for bit (issue 16)."""

from __future__ import annotations

import torch
from torch import nn

from ipmcondense.condensation.extra_terms import class_norm_statistics
from ipmcondense.nets import get_network
from ipmcondense.nets._common import run_block


def _net(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return get_network(arch, 1, 10, (28, 28))


def test_no_grad_embed_and_layers_equal_the_autograd_pass_bit_for_bit():
    net = _net("convnet")
    x = torch.randn(7, 1, 28, 28)
    with torch.enable_grad():
        emb, layers = net.embed(x), net.layer_features(x)
    with torch.no_grad():
        emb0, layers0 = net.embed(x), net.layer_features(x)
    assert torch.equal(emb0, emb.detach())
    assert all(torch.equal(a, b.detach()) for a, b in zip(layers0, layers))
    with torch.inference_mode():
        assert torch.equal(net(x), net.classifier(emb).detach())


def test_no_grad_relu_acts_in_place_and_never_on_the_input():
    block = nn.Sequential(nn.Identity(), nn.ReLU())  # the ReLU's input IS the block's input here
    h = torch.randn(4, 3, 5, 5)
    before = h.clone()
    with torch.no_grad():
        out = run_block(block, h)
    assert torch.equal(h, before)  # the caller's tensor is untouched
    assert torch.equal(out, before.relu())
    conv = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        fresh = conv[0](h)
        out = run_block(conv, h)
    assert torch.equal(out, fresh.relu())
    calls = []
    conv[0].register_forward_hook(lambda _m, _a, y: calls.append(y))
    with torch.no_grad():
        out = run_block(conv, h)
    assert out.data_ptr() == calls[0].data_ptr()  # the activation reused the convolution's output
    assert bool((out >= 0).all())


def test_norm_inputs_seen_by_hooks_are_not_overwritten_by_the_in_place_relu():
    net = _net("convnet")
    x = torch.randn(6, 1, 28, 28)
    segments = [slice(0, 3), slice(3, 6)]
    with torch.enable_grad():
        expected = class_norm_statistics(net, x, segments)
    with torch.no_grad():
        got = class_norm_statistics(net, x, segments)
    for a, b in zip(expected, got):
        for (m1, v1), (m2, v2) in zip(a, b):
            assert torch.equal(m1.detach(), m2) and torch.equal(v1.detach(), v2)


def test_training_through_the_block_is_unchanged():
    """With autograd on, the modules run as built: gradients equal a plain Sequential pass."""
    net = _net("convnet")
    x = torch.randn(5, 1, 28, 28, requires_grad=True)
    loss = net(x).square().sum()
    (gx,) = torch.autograd.grad(loss, x)
    h = x
    for block, pool in zip(net.blocks, net.pools):
        h = pool(block(h))
    (gx_plain,) = torch.autograd.grad(net.classifier(h.flatten(1)).square().sum(), x)
    assert torch.equal(gx, gx_plain)
