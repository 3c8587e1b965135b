"""Tests of the networks: shapes on every geometry, reference sizes and the shared interface."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ipmcondense.nets import NETWORK_NAMES, ConvNet, get_network

GEOMETRIES = [(1, (8, 8)), (1, (28, 28)), (3, (32, 32))]


def _images(channels, size, batch=3, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, channels, *size, generator=generator, dtype=dtype)


def _n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", NETWORK_NAMES)
@pytest.mark.parametrize("channels,size", GEOMETRIES)
def test_interface_shapes_and_classifier_consistency(name, channels, size):
    net = get_network(name, channels, 7, size).eval()
    x = _images(channels, size)
    logits = net(x)
    embedding = net.embed(x)
    assert logits.shape == (3, 7)
    assert embedding.shape == (3, net.feature_dim)
    assert isinstance(net.classifier, nn.Linear)
    assert net.classifier.in_features == net.feature_dim
    assert net.classifier.out_features == 7
    torch.testing.assert_close(logits, net.classifier(embedding))
    assert torch.isfinite(logits).all()
    features = net.layer_features(x)
    assert isinstance(features, list) and len(features) >= 1
    for f in features:
        assert f.shape[0] == 3 and f.dim() in (2, 4)


@pytest.mark.parametrize(
    "size,channels,expected",
    [((32, 32), 3, 2048), ((28, 28), 1, 2048), ((8, 8), 1, 128)],
)
def test_convnet3_embedding_dimension(size, channels, expected):
    net = get_network("convnet", channels, 10, size)
    assert net.feature_dim == expected
    assert net.embed(_images(channels, size)).shape == (3, expected)


def test_convnet_parameter_counts_match_reference():
    # VICO-UoE ConvNet-3: 320,010 parameters on CIFAR-10, 504,420 on CIFAR-100.
    assert _n_params(get_network("convnet", 3, 10, (32, 32))) == 320_010
    assert _n_params(get_network("convnet", 3, 100, (32, 32))) == 504_420


def test_convnet_on_digits_is_128x1x1():
    net = get_network("convnet", 1, 10, (8, 8))
    assert net.feature_shape == (128, 1, 1)


def test_instancenorm_is_one_group_per_channel_and_equals_instance_norm():
    for name in ("convnet", "resnet18"):
        net = get_network(name, 3, 10, (32, 32))
        norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
        assert norms, name
        for m in norms:
            assert m.num_groups == m.num_channels and m.affine
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    # With the default affine (1, 0), GroupNorm(C, C) is instance normalisation.
    norm = nn.GroupNorm(16, 16)
    h = torch.randn(4, 16, 5, 5)
    torch.testing.assert_close(norm(h), F.instance_norm(h, eps=norm.eps))


def test_batchnorm_variants_use_batchnorm():
    for name in ("convnet-bn", "resnet18-bn"):
        net = get_network(name, 3, 10, (32, 32))
        assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        assert not any(isinstance(m, nn.GroupNorm) for m in net.modules())


def test_convnet_matches_a_functional_reimplementation():
    # Independent reference: the reference ConvNet written with torch.nn.functional ops.
    net = get_network("convnet", 1, 10, (28, 28)).double()
    x = _images(1, (28, 28), dtype=torch.float64)
    h = x
    for index, block in enumerate(net.blocks):
        conv, norm = block[0], block[1]
        h = F.conv2d(h, conv.weight, conv.bias, padding=3 if index == 0 else 1)
        h = F.group_norm(h, 128, norm.weight, norm.bias, eps=norm.eps)
        h = F.avg_pool2d(F.relu(h), 2)
    expected = h.reshape(3, -1)
    torch.testing.assert_close(net.embed(x), expected)
    torch.testing.assert_close(net(x), expected @ net.classifier.weight.T + net.classifier.bias)


def test_convnet_layer_features_are_block_activations_before_pooling():
    net = get_network("convnet", 3, 10, (32, 32))
    x = _images(3, (32, 32))
    features = net.layer_features(x)
    shapes = [tuple(f.shape) for f in features]
    assert shapes == [(3, 128, 32, 32), (3, 128, 16, 16), (3, 128, 8, 8)]
    assert all((f >= 0).all() for f in features)  # ReLU outputs
    torch.testing.assert_close(F.avg_pool2d(features[-1], 2).flatten(1), net.embed(x))
    torch.testing.assert_close(F.avg_pool2d(features[0], 2), net.pools[0](features[0]))


@pytest.mark.parametrize(
    "name,expected",
    [
        ("mlp", [(3, 128), (3, 128)]),
        ("lenet", [(3, 6, 28, 28), (3, 16, 10, 10)]),
        (
            "alexnet",
            [(3, 128, 32, 32), (3, 192, 16, 16), (3, 256, 8, 8), (3, 192, 8, 8), (3, 192, 8, 8)],
        ),
        (
            "resnet18",
            [(3, 64, 32, 32), (3, 64, 32, 32), (3, 128, 16, 16), (3, 256, 8, 8), (3, 512, 4, 4)],
        ),
    ],
)
def test_layer_features_shapes(name, expected):
    net = get_network(name, 3, 10, (32, 32))
    assert [tuple(f.shape) for f in net.layer_features(_images(3, (32, 32)))] == expected


def test_mlp_last_layer_feature_is_embedding():
    net = get_network("mlp", 1, 10, (8, 8))
    x = _images(1, (8, 8))
    torch.testing.assert_close(net.layer_features(x)[-1], net.embed(x))


def test_depth_and_width_variants():
    for depth in (1, 2, 3, 4):
        net = get_network(f"convnet-d{depth}", 3, 10, (32, 32))
        assert len(net.layer_features(_images(3, (32, 32)))) == depth
        assert net.feature_dim == 128 * (32 // 2**depth) ** 2
    for width in (32, 64, 128, 256):
        assert get_network(f"convnet-w{width}", 3, 10, (32, 32)).feature_dim == width * 16
    # Depth 4 on 8x8 digits: pooling stops at 1x1 instead of failing.
    assert get_network("convnet-d4", 1, 10, (8, 8)).feature_shape == (128, 1, 1)
    mp_net = get_network("convnet-mp", 3, 10, (32, 32))
    assert any(isinstance(m, nn.MaxPool2d) for m in mp_net.modules())
    nn_net = get_network("convnet-nn", 3, 10, (32, 32))
    norm_types = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)
    assert not any(isinstance(m, norm_types) for m in nn_net.modules())


def test_kwargs_override_variant_defaults():
    net = get_network("convnet-d2", 3, 10, (32, 32), width=16)
    assert isinstance(net, ConvNet) and net.width == 16 and net.depth == 2
    assert net.feature_dim == 16 * 8 * 8


def test_name_is_case_insensitive():
    assert isinstance(get_network("ConvNet", 3, 10, (32, 32)), ConvNet)


def test_unknown_name_lists_the_known_names():
    with pytest.raises(ValueError, match="convnet") as info:
        get_network("vgg11", 3, 10, (32, 32))
    assert "vgg11" in str(info.value) and "resnet18" in str(info.value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"channels": 0}, "channels"),
        ({"num_classes": -1}, "num_classes"),
        ({"image_size": (32,)}, "image_size"),
        ({"image_size": (0, 32)}, "image_size"),
    ],
)
def test_invalid_geometry_raises(kwargs, match):
    arguments = {"channels": 3, "num_classes": 10, "image_size": (32, 32), **kwargs}
    with pytest.raises(ValueError, match=match):
        get_network("convnet", **arguments)


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="norm"):
        get_network("convnet", 3, 10, (32, 32), norm="weird")
    with pytest.raises(ValueError, match="pooling"):
        get_network("convnet", 3, 10, (32, 32), pooling="weird")
    with pytest.raises(ValueError, match="depth"):
        get_network("convnet", 3, 10, (32, 32), depth=0)


@pytest.mark.parametrize("name", ["convnet", "mlp", "lenet", "alexnet", "resnet18"])
def test_wrong_input_shape_names_x(name):
    net = get_network(name, 1, 10, (28, 28))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 1, 28, 28\)"):
        net(torch.randn(2, 3, 32, 32))


def test_initialisation_follows_the_callers_seed():
    torch.manual_seed(123)
    a = get_network("convnet", 3, 10, (32, 32))
    torch.manual_seed(123)
    b = get_network("convnet", 3, 10, (32, 32))
    c = get_network("convnet", 3, 10, (32, 32))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        torch.testing.assert_close(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_gradients_reach_the_inputs(name):
    net = get_network(name, 1, 10, (8, 8))
    x = _images(1, (8, 8)).requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x).square().sum(), x)
    assert grad.shape == x.shape
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradient_matching_double_backward_through_convnet():
    # Gradient matching differentiates a parameter gradient w.r.t. the synthetic images.
    net = get_network("convnet", 1, 10, (8, 8))
    params = [p for p in net.parameters() if p.requires_grad]
    real_x, real_y = _images(1, (8, 8), batch=6), torch.arange(6) % 2
    syn_x = torch.randn(2, 1, 8, 8, requires_grad=True)
    syn_y = torch.tensor([0, 1])
    g_real = torch.autograd.grad(F.cross_entropy(net(real_x), real_y), params)
    g_syn = torch.autograd.grad(F.cross_entropy(net(syn_x), syn_y), params, create_graph=True)
    match = sum((gs - gr).square().sum() for gs, gr in zip(g_syn, g_real))
    (grad_syn,) = torch.autograd.grad(match, syn_x)
    assert torch.isfinite(grad_syn).all() and grad_syn.abs().sum() > 0


def test_convnet_double_backward_is_exact_in_float64():
    net = get_network("convnet", 1, 3, (8, 8), width=4, depth=2).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: net(t), (x,))
    # Softplus keeps the check away from the ReLU kinks' measure-zero non-smoothness.
    assert torch.autograd.gradgradcheck(lambda t: F.softplus(net(t)).sum(), (x,))


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
def test_float64_follows_input_dtype(name):
    net = get_network(name, 1, 10, (8, 8)).double()
    assert net(_images(1, (8, 8), dtype=torch.float64)).dtype == torch.float64
