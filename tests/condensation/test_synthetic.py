"""The ``synthetic`` axis: parameterisations decode stored parameters into class-blocked images; extras."""

import pytest
import torch

from ipmcondense.condensation.synthetic import (
    SYNTHETIC_NAMES,
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
