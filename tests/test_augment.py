"""Tests of the differentiable siamese augmentation (ipmcondense.augment)."""

import math

import numpy as np
import pytest
import torch

from ipmcondense.augment import (
    DEFAULT_DSA_STRATEGY,
    DSA_FAMILIES,
    DSA_PARAMS,
    AugmentationDraw,
    DifferentiableSiameseAugmentation,
    NoAugmentation,
    dsa_strategy_for,
    parse_strategy,
)


def _hand_draw(family, **values):
    """A hand-made draw: floats become float64 tensors, ints int64, bools bool, each of shape (1,)."""
    tensors = {}
    for key, value in values.items():
        tensors[key] = torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else None)
    return AugmentationDraw(family, tensors)


def test_defaults_match_reference():
    assert dict(DSA_PARAMS) == {
        "prob_flip": 0.5,
        "ratio_scale": 1.2,
        "ratio_rotate": 15.0,
        "ratio_crop_pad": 0.125,
        "ratio_cutout": 0.5,
        "brightness": 1.0,
        "saturation": 2.0,
        "contrast": 0.5,
    }
    assert parse_strategy(DEFAULT_DSA_STRATEGY) == ("color", "crop", "cutout", "flip", "scale", "rotate")


@pytest.mark.parametrize("name", ["digits", "mnist", "svhn", "MNIST"])
def test_flip_dropped_for_digit_like(name):
    assert dsa_strategy_for(name) == "color_crop_cutout_scale_rotate"
    aug = DifferentiableSiameseAugmentation(dsa_strategy_for(name))
    assert "flip" not in aug.families
    g = torch.Generator().manual_seed(1)
    assert all(aug.draw(g).family != "flip" for _ in range(200))


def test_flip_kept_for_colour_data_and_duck_typed_dataset():
    assert dsa_strategy_for("cifar10") == DEFAULT_DSA_STRATEGY
    assert dsa_strategy_for("fashion-mnist") == DEFAULT_DSA_STRATEGY

    class Fake:
        is_digits_like = True

    assert "flip" not in dsa_strategy_for(Fake())
    with pytest.raises(TypeError):
        dsa_strategy_for(3)


@pytest.mark.parametrize("strategy", ["color_blur", "", "crop__zoom"])
def test_unknown_family_raises(strategy):
    with pytest.raises(ValueError):
        DifferentiableSiameseAugmentation(strategy)


def test_unknown_param_raises():
    with pytest.raises(ValueError, match="ratio_zoom"):
        DifferentiableSiameseAugmentation(params={"ratio_zoom": 2.0})


def test_draw_of_family_outside_strategy_raises():
    aug = DifferentiableSiameseAugmentation("color")
    with pytest.raises(ValueError):
        aug.apply(torch.zeros(1, 1, 4, 4), AugmentationDraw("flip", {"flip": torch.tensor([True])}))


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_siamese_same_draw_same_transform_any_batch_size(family):
    aug = DifferentiableSiameseAugmentation(family)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(7, 3, 12, 12, generator=g)
    b = torch.randn(2, 3, 12, 12, generator=g)
    for seed in range(5):
        draw = aug.draw(torch.Generator().manual_seed(seed))
        assert draw.family == family
        joint = aug.apply(torch.cat([a, b]), draw)
        torch.testing.assert_close(joint, torch.cat([aug.apply(a, draw), aug.apply(b, draw)]))
        # identical copies -> identical outputs, and every sample gets the same transform
        torch.testing.assert_close(aug.apply(a.clone(), draw), aug.apply(a, draw))
        same = a[:1].expand(4, -1, -1, -1)
        out = aug.apply(same, draw)
        torch.testing.assert_close(out, out[:1].expand_as(out))


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_per_sample_parameters_are_independent(family):
    aug = DifferentiableSiameseAugmentation(family)
    x = torch.randn(1, 3, 16, 16).expand(64, -1, -1, -1).contiguous()
    out = aug(x, torch.Generator().manual_seed(0))
    distinct = {tuple(np.round(o.flatten().numpy(), 5)) for o in out}
    assert len(distinct) >= (2 if family == "flip" else 5)  # flip has exactly two outcomes


def test_call_is_deterministic_under_seeded_generator():
    aug = DifferentiableSiameseAugmentation()
    x = torch.randn(6, 3, 10, 10)
    for seed in range(8):
        a = aug(x, torch.Generator().manual_seed(seed))
        b = aug(x, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        d1 = aug.draw(torch.Generator().manual_seed(seed))
        d2 = aug.draw(torch.Generator().manual_seed(seed))
        assert d1.family == d2.family
        torch.testing.assert_close(aug.apply(x, d1), aug.apply(x, d2), rtol=0, atol=0)


def test_draw_chooses_every_family_roughly_uniformly():
    aug = DifferentiableSiameseAugmentation()
    g = torch.Generator().manual_seed(0)
    counts = {f: 0 for f in DSA_FAMILIES}
    for _ in range(1200):
        counts[aug.draw(g).family] += 1
    assert all(150 < c < 250 for c in counts.values()), counts


@pytest.mark.parametrize(
    "family,params",
    [
        ("scale", {"scale_x": 1.2, "scale_y": 0.9}),
        ("rotate", {"angle": math.radians(10.0)}),
        ("crop", {"shift_x": 1, "shift_y": -1}),
        ("cutout", {"centre_x": 3, "centre_y": 2}),
        ("flip", {"flip": True}),
        ("color", {"brightness": 0.2, "saturation": 1.5, "contrast": 0.8}),
    ],
)
def test_each_family_changes_the_image_and_is_differentiable(family, params):
    aug = DifferentiableSiameseAugmentation(family)
    draw = _hand_draw(family, **params)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    out = aug.apply(x, draw)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    assert torch.autograd.gradcheck(lambda t: aug.apply(t, draw), (x,))
    # per-sample path too
    assert torch.autograd.gradcheck(lambda t: aug(t, torch.Generator().manual_seed(4)), (x,))


def test_identity_cases():
    x = torch.randn(3, 3, 8, 8)
    flip = DifferentiableSiameseAugmentation("flip")
    torch.testing.assert_close(flip.apply(x, AugmentationDraw("flip", {"flip": torch.tensor([False])})), x)
    crop = DifferentiableSiameseAugmentation("crop")
    zero_shift = AugmentationDraw("crop", {"shift_x": torch.tensor([0]), "shift_y": torch.tensor([0])})
    torch.testing.assert_close(crop.apply(x, zero_shift), x)
    scale = DifferentiableSiameseAugmentation("scale")
    unit = {"scale_x": torch.tensor([1.0]), "scale_y": torch.tensor([1.0])}
    torch.testing.assert_close(scale.apply(x, AugmentationDraw("scale", unit)), x, atol=1e-5, rtol=0)
    none = NoAugmentation()
    assert none.apply(x, none.draw(torch.Generator())) is x
    assert none(x) is x


def test_transforms_against_brute_force():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float64).reshape(2, 1, 5, 5) + 1.0
    # crop: out[i, j] = x[i + sy, j + sx], zero outside
    crop = DifferentiableSiameseAugmentation("crop")
    out = crop.apply(x, _hand_draw("crop", shift_x=2, shift_y=-1))
    expected = torch.zeros_like(x)
    for i in range(5):
        for j in range(5):
            si, sj = i - 1, j + 2
            if 0 <= si < 5 and 0 <= sj < 5:
                expected[:, :, i, j] = x[:, :, si, sj]
    torch.testing.assert_close(out, expected)
    # cutout: side int(5 * 0.5 + 0.5) = 3, square starting at centre - 1
    cut = DifferentiableSiameseAugmentation("cutout")
    out = cut.apply(x, _hand_draw("cutout", centre_x=0, centre_y=2))
    expected = x.clone()
    expected[:, :, 1:4, 0:2] = 0.0
    torch.testing.assert_close(out, expected)
    # flip mirrors the width axis
    flip = DifferentiableSiameseAugmentation("flip")
    torch.testing.assert_close(flip.apply(x, _hand_draw("flip", flip=True)), x.flip(3))
    # rotation by 90 degrees on a square grid with align_corners is an exact index rotation
    rot = DifferentiableSiameseAugmentation("rotate")
    out = rot.apply(x, _hand_draw("rotate", angle=math.pi / 2))
    quarter_turns = (torch.rot90(x, 1, dims=(2, 3)), torch.rot90(x, -1, dims=(2, 3)))
    assert any(torch.allclose(out, turned) for turned in quarter_turns)


def test_colour_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64)
    b, s, c = 0.3, 1.7, 0.6
    aug = DifferentiableSiameseAugmentation("color")
    out = aug.apply(x, _hand_draw("color", brightness=b, saturation=s, contrast=c))
    y = x.numpy() + b
    y = (y - y.mean(axis=1, keepdims=True)) * s + y.mean(axis=1, keepdims=True)
    m = y.mean(axis=(1, 2, 3), keepdims=True)
    y = (y - m) * c + m
    np.testing.assert_allclose(out.numpy(), y, rtol=1e-12)


def test_parameter_ranges_follow_reference():
    aug = DifferentiableSiameseAugmentation()
    g = torch.Generator().manual_seed(0)
    p = aug._draw_parameters("scale", 2000, g)
    assert p["scale_x"].min() >= 1 / 1.2 and p["scale_x"].max() <= 1.2
    p = aug._draw_parameters("rotate", 2000, g)
    assert p["angle"].abs().max() <= math.radians(15.0) and p["angle"].abs().max() > math.radians(14.0)
    px = aug._pixel_parameters("crop", aug._draw_parameters("crop", 2000, g), 32, 32)
    assert set(px["shift_x"].tolist()) == set(range(-4, 5))  # int(32 * 0.125 + 0.5) = 4
    px = aug._pixel_parameters("cutout", aug._draw_parameters("cutout", 4000, g), 32, 32)
    assert set(px["centre_y"].tolist()) == set(range(0, 33))  # side 16 even -> randint(0, 33)
    p = aug._draw_parameters("color", 2000, g)
    assert p["brightness"].abs().max() <= 0.5 and 0 <= p["saturation"].min() and p["saturation"].max() <= 2.0
    assert 0.5 <= p["contrast"].min() and p["contrast"].max() <= 1.5
    flips = aug._draw_parameters("flip", 4000, g)["flip"].double().mean()
    assert 0.45 < float(flips) < 0.55


def test_rejects_non_image_input():
    aug = DifferentiableSiameseAugmentation()
    with pytest.raises(ValueError):
        aug(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError):
        aug(torch.zeros(1, 1, 8, 8, dtype=torch.int64))
