"""Feature maps on networks: each block equals its definition computed directly."""

import pytest
import torch
import torch.nn.functional as F

from ipmcondense.features import (
    AttentionFeatures,
    EmbeddingFeatures,
    FeatureBlock,
    GradientFeatures,
    LayerFeatures,
    attention_map,
    get_feature_map,
    segments_from_labels,
)
from ipmcondense.nets import get_network


def _net(seed=0, width=16):
    torch.manual_seed(seed)
    return get_network("convnet", 1, 3, (8, 8), width=width).double()


def _batch(n_per_class=4, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(classes * n_per_class, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return x, y


def test_segments_from_labels():
    assert segments_from_labels(torch.tensor([0, 0, 1, 1, 1, 2])) == [slice(0, 2), slice(2, 5), slice(5, 6)]
    assert segments_from_labels(torch.tensor([4])) == [slice(0, 1)]


def test_embedding_features_equal_embed_and_keep_graph_only_when_differentiable():
    net, (x, y) = _net(), _batch()
    x.requires_grad_(True)
    (block,) = EmbeddingFeatures()(net, x, y, segments_from_labels(y), differentiable=True)
    torch.testing.assert_close(block.values, net.embed(x))
    assert block.values.requires_grad
    (real,) = EmbeddingFeatures()(net, x, y, segments_from_labels(y), differentiable=False)
    assert not real.values.requires_grad


def test_attention_map_matches_formula():
    f = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    a = f.abs().sum(1).reshape(2, -1)
    expected = a / a.norm(dim=1, keepdim=True)
    torch.testing.assert_close(attention_map(f, 1.0), expected)
    torch.testing.assert_close(attention_map(f, 2.0).norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_attention_features_skip_last_layer_and_weight_blocks():
    net, (x, y) = _net(), _batch()
    blocks = AttentionFeatures(attention_weight=100.0, embedding_weight=1.0)(
        net, x, y, segments_from_labels(y), differentiable=False
    )
    layers = net.layer_features(x)
    assert [b.name for b in blocks] == [f"attention{i}" for i in range(len(layers) - 1)] + ["embedding"]
    assert [b.weight for b in blocks] == [100.0] * (len(layers) - 1) + [1.0]
    torch.testing.assert_close(blocks[0].values, attention_map(layers[0]))


def test_layer_features_weights_align_to_last_layers():
    net, (x, y) = _net(), _batch()
    blocks = LayerFeatures(layer_weights=(0.1, 1.0), embedding_weight=2.0)(
        net, x, y, segments_from_labels(y), differentiable=False
    )
    n = len(net.layer_features(x))
    assert [b.name for b in blocks] == [f"layer{n - 2}", f"layer{n - 1}", "embedding"]
    assert [b.weight for b in blocks] == [0.1, 1.0, 2.0]


def _reference_class_gradients(net, x, y):
    out = []
    for s in segments_from_labels(y):
        loss = F.cross_entropy(net(x[s]), y[s])
        out.append(torch.autograd.grad(loss, list(net.parameters())))
    return out


@pytest.mark.parametrize("equal_segments", [True, False])
def test_mean_gradient_features_equal_per_class_autograd(equal_segments):
    net, (x, y) = _net(), _batch()
    if not equal_segments:  # unequal class sizes take the per-class loop
        x, y = x[1:], y[1:]
    blocks = GradientFeatures()(net, x, y, segments_from_labels(y), differentiable=False)
    reference = _reference_class_gradients(net, x, y)
    assert all(b.per_class and b.parameter_gradient for b in blocks)
    for j, block in enumerate(blocks):
        expected = torch.stack([g[j] for g in reference])
        torch.testing.assert_close(block.values, expected, rtol=1e-9, atol=1e-12)


def test_per_sample_gradients_average_to_the_mean_gradient():
    net, (x, y) = _net(), _batch(n_per_class=2)
    per_sample = GradientFeatures(mode="per_sample")(net, x, y, segments_from_labels(y), differentiable=False)
    mean = GradientFeatures()(net, x, y, segments_from_labels(y), differentiable=False)
    for ps, m in zip(per_sample, mean):
        assert ps.values.shape[0] == x.shape[0]
        torch.testing.assert_close(ps.values.reshape(3, 2, *ps.values.shape[1:]).mean(1), m.values)


def test_gradient_features_are_differentiable_wrt_images_gradcheck():
    net = get_network("convnet-d1", 1, 2, (4, 4), width=3).double()
    y = torch.tensor([0, 0, 1, 1])
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(images):
        blocks = GradientFeatures()(net, images, y, segments_from_labels(y), differentiable=True)
        return sum((b.values ** 2).sum() for b in blocks)

    assert torch.autograd.gradcheck(f, (x,))


def test_segment_of_per_class_block():
    block = FeatureBlock("g", torch.arange(6.0).reshape(3, 2), per_class=True)
    torch.testing.assert_close(block.segment(1, slice(5, 9)), torch.tensor([[2.0, 3.0]]))


def test_get_feature_map_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="feature map"):
        get_feature_map("pixels-of-doom")
    with pytest.raises(TypeError, match="gradients"):
        get_feature_map("gradients", nonsense=1)
    with pytest.raises(ValueError, match="gradient mode"):
        GradientFeatures(mode="sometimes")


def test_gradient_features_batch_classes_with_vmap_only_on_small_cpu_inputs(monkeypatch):
    from ipmcondense.features import VMAP_MAX_PIXELS_CPU, GradientFeatures, segments_from_labels
    from ipmcondense.nets import get_network

    def forbidden(*args, **kwargs):
        raise AssertionError("this path must not be taken")

    labels = torch.arange(3).repeat_interleave(2)
    for size, banned in ((8, "_class_loop"), (28, "_class_batched")):
        assert (size * size <= VMAP_MAX_PIXELS_CPU) == (size == 8)
        net = get_network("convnet-w32", 1, 3, (size, size))
        images = torch.randn(6, 1, size, size)
        with monkeypatch.context() as patched:
            patched.setattr(GradientFeatures, banned, staticmethod(forbidden))
            blocks = GradientFeatures()(net, images, labels, segments_from_labels(labels), differentiable=False)
        assert blocks[0].values.shape[0] == 3  # one mean gradient per class either way
