"""The ``synthetic`` axis: parameterisations decode stored parameters into class-blocked images; extras."""

import pytest
import torch

from ipmcondense.condensation.synthetic import (
    SYNTHETIC_NAMES,
    MultiFormationSet,
    PixelSet,
    SyntheticExtras,
    build_synthetic_set,
)


def _start(n_per_class=2, classes=3):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n_per_class * classes, 1, 4, 4, generator=g)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return images, labels


def test_pixels_is_registered_and_decodes_to_its_parameters():
    assert "pixels" in SYNTHETIC_NAMES
    images, labels = _start()
    s = build_synthetic_set("pixels", images, labels, 3, {})
    assert isinstance(s, PixelSet) and torch.equal(s.images(), images)
    assert s.image_parameters() == [s.pixels] and s.ipc == 2 and s.images_per_class == 2
    assert s.class_slice(1) == slice(2, 4)
    (s.images() ** 2).sum().backward()
    assert torch.equal(s.pixels.grad, 2 * images)


def test_decode_is_a_pure_function_of_the_stored_parameters():
    images, labels = _start()
    a = build_synthetic_set("pixels", images, labels, 3, {})
    b = build_synthetic_set("pixels", torch.zeros_like(images), labels, 3, {})
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.images(), b.images()) and torch.equal(a.labels, b.labels)


def test_extras_are_learnable_and_grouped_for_the_optimiser():
    images, labels = _start()
    extras = SyntheticExtras(learning_rate=0.01, lr_lr=1e-5, label_logits=torch.zeros(6, 3), lr_labels=2.0)
    s = build_synthetic_set("pixels", images, labels, 3, {}, extras)
    groups = s.extra_parameter_groups()
    assert [g["params"][0] for g in groups] == [s.learning_rate, s.label_logits]
    assert [(g["lr"], g["momentum"]) for g in groups] == [(1e-5, 0.5), (2.0, 0.9)]
    assert s.learned_learning_rate() == pytest.approx(0.01)
    torch.testing.assert_close(s.training_labels(), torch.full((6, 3), 1 / 3))


def test_a_set_without_extras_trains_on_its_hard_labels():
    images, labels = _start()
    s = build_synthetic_set("pixels", images, labels, 3, {})
    assert s.extra_parameter_groups() == [] and s.learned_learning_rate() is None
    assert torch.equal(s.training_labels(), labels)
    with pytest.raises(ValueError, match="no learnable soft labels"):
        s.soft_labels()


def test_bad_input_names_the_argument():
    images, labels = _start()
    with pytest.raises(ValueError, match="unknown synthetic set 'latent2'; expected one of: 'pixels'"):
        build_synthetic_set("latent2", images, labels, 3, {})
    with pytest.raises(ValueError, match="images must have shape"):
        PixelSet(images[0], labels, 3)
    with pytest.raises(ValueError, match="same number of images for each of 4 classes"):
        PixelSet(images, labels, 4)
    with pytest.raises(ValueError, match="label_logits must have shape"):
        PixelSet(images, labels, 3, SyntheticExtras(label_logits=torch.zeros(5, 3)))
    with pytest.raises(ValueError, match="at most one of label_logits"):
        PixelSet(images, labels, 3, SyntheticExtras(label_logits=torch.zeros(6, 3), label_values=torch.zeros(6, 3)))
    with pytest.raises(ValueError, match="learning_rate must be a positive finite number"):
        PixelSet(images, labels, 3, SyntheticExtras(learning_rate=-1.0))


# ------------------------------------------------------------------------------ multi-formation (IDC)
def _idc_decode_reference(stored, ipc, classes, factor):
    """IDC's decode_zoom written out as loops, applied class by class (tile-major within a class)."""
    out = []
    size = stored.shape[-2:]
    s = stored.shape[-1] // factor
    for c in range(classes):
        block = stored[c * ipc:(c + 1) * ipc]
        crops = [block[:, :, i * s:(i + 1) * s, j * s:(j + 1) * s] for i in range(factor) for j in range(factor)]
        out.append(torch.nn.Upsample(size=size, mode="bilinear")(torch.cat(crops)))
    return torch.cat(out)


def test_multiformation_decodes_like_idc_decode_zoom_with_replicated_labels():
    g = torch.Generator().manual_seed(1)
    stored = torch.randn(3 * 2, 2, 8, 8, generator=g)
    s = MultiFormationSet(stored, 3, factor=2)
    assert "multiformation" in SYNTHETIC_NAMES
    assert s.ipc == 2 and s.images_per_class == 8 and s.images().shape == (24, 2, 8, 8)
    assert torch.equal(s.labels, torch.arange(3).repeat_interleave(8))
    torch.testing.assert_close(s.images(), _idc_decode_reference(stored, 2, 3, 2))
    # the first decoded image of class 1 is the top-left tile of class 1's first stored image, upsampled
    tile = stored[2:3, :, :4, :4]
    torch.testing.assert_close(s.images()[s.class_slice(1)][0:1],
                               torch.nn.functional.interpolate(tile, size=(8, 8), mode="bilinear"))


def test_multiformation_gradients_reach_every_stored_pixel():
    stored = torch.randn(2 * 1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    s = MultiFormationSet(stored, 2, factor=4)
    assert s.image_parameters() == [s.stored]
    w = torch.randn(s.images().shape, generator=torch.Generator().manual_seed(3))
    (s.images() * w).sum().backward()
    assert s.stored.grad is not None and s.stored.grad.shape == stored.shape
    assert bool((s.stored.grad != 0).all())


def test_multiformation_decode_is_a_pure_function_of_the_stored_parameters():
    images = torch.randn(2 * 4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(2).repeat_interleave(4)
    a = build_synthetic_set("multiformation", images, labels, 2, {"factor": 2})
    b = build_synthetic_set("multiformation", torch.zeros_like(images), labels, 2, {"factor": 2})
    assert not torch.equal(a.images(), b.images())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.images(), b.images()) and torch.equal(a.labels, b.labels)
    assert set(a.state_dict()) == {"labels", "stored"}


def test_multiformation_factor_one_is_pixels_exactly():
    images, labels = _start()
    s = build_synthetic_set("multiformation", images, labels, 3, {"factor": 1})
    assert torch.equal(s.images(), build_synthetic_set("pixels", images, labels, 3, {}).images())
    assert s.images_per_class == s.ipc == 2


def test_multiformation_init_tiles_real_images_in_decode_order():
    # constant images survive the nearest shrink and the bilinear upsampling exactly, so decode(init(x)) == x
    classes, ipc, factor = 2, 3, 2
    values = torch.randn(classes * ipc * factor**2, generator=torch.Generator().manual_seed(5))
    images = values.view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()
    labels = torch.arange(classes).repeat_interleave(ipc * factor**2)
    s = build_synthetic_set("multiformation", images, labels, classes, {"factor": factor})
    assert s.stored.shape == (classes * ipc, 1, 8, 8)
    torch.testing.assert_close(s.images(), images, rtol=0, atol=1e-6)
    # IDC init='mix': group k of the class's images fills tile k (row-major) of every stored image
    torch.testing.assert_close(s.stored[ipc, 0, 4:, :4], images[ipc * factor**2 + 2 * ipc, 0, :4, :4])
    assert MultiFormationSet.initial_images_per_class(ipc, MultiFormationSet.Options(factor=3)) == ipc * 9


def test_multiformation_bad_input_names_the_option():
    images = torch.randn(2 * 4, 1, 8, 8)
    labels = torch.arange(2).repeat_interleave(4)
    with pytest.raises(ValueError, match="factor 3 must divide the image size 8x8"):
        build_synthetic_set("multiformation", images, labels, 2, {"factor": 3})
    with pytest.raises(ValueError, match="factor must be a positive integer"):
        build_synthetic_set("multiformation", images, labels, 2, {"factor": 0})
    with pytest.raises(ValueError, match="factor must be a positive integer"):
        MultiFormationSet.initial_images_per_class(1, MultiFormationSet.Options(factor=2.0))
    with pytest.raises(ValueError, match="factor\\*\\*2 = 16 initial images per stored image"):
        build_synthetic_set("multiformation", images, labels, 2, {"factor": 4})
