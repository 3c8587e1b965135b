"""Channel-efficient multi-formation: the ``channelwise`` parameterisation and the ``channel_efficient`` row."""

import pytest
import torch
import torch.nn.functional as F

from ipmcondense.condensation.api import condense, evaluate
from ipmcondense.condensation.recipes import NORMALISED, compose_recipe, get_recipe
from ipmcondense.condensation.synthetic import (
    ChannelwiseSet,
    MultiFormationSet,
    PixelSet,
    build_synthetic_set,
    decode_channelwise,
)


def _stored(classes=3, ipc=2, channels=1, factor=2, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(classes * ipc, factor * factor * channels, size, size, generator=g)


def test_shapes_label_replication_and_decode_against_a_per_image_loop():
    classes, ipc, ch, f = 3, 2, 2, 2
    stored = _stored(classes, ipc, ch, f)
    s = ChannelwiseSet(stored, classes, factor=f, image_channels=ch)
    out = s.images()
    assert out.shape == (classes * ipc * f * f, ch, 8, 8) and s.images_per_class == ipc * f * f and s.ipc == ipc
    assert torch.equal(s.labels, torch.arange(classes).repeat_interleave(ipc * f * f))
    for c in range(classes):
        for g in range(f * f):
            for r in range(ipc):
                group = stored[c * ipc + r, g * ch:(g + 1) * ch][None]
                expected = F.interpolate(group, scale_factor=f, mode="bilinear", align_corners=False)[0]
                assert torch.equal(out[c * ipc * f * f + g * ipc + r], expected)
    # one stored tensor holds one image's numbers and decodes into factor**2 images: R^n -> R^{4n}
    assert stored[0].numel() == ch * 8 * 8 and out[: f * f].numel() == 4 * stored[0].numel()


def test_decoded_family_equals_idc_tiles_of_the_reindexed_storage():
    """Channel group g of a stored tensor is tile g of IDC's stored image: the same decoded images."""
    classes, ipc, ch, f = 2, 3, 1, 2
    stored = _stored(classes, ipc, ch, f)
    tiles = torch.zeros(classes * ipc, ch, 8, 8)
    for r in range(classes * ipc):
        for g in range(f * f):
            i, j = divmod(g, f)
            tiles[r, :, i * 4:(i + 1) * 4, j * 4:(j + 1) * 4] = stored[r, g * ch:(g + 1) * ch]
    a = ChannelwiseSet(stored, classes, factor=f, image_channels=ch).images()
    b = MultiFormationSet(tiles, classes, factor=f).images()
    assert torch.equal(a, b)


def test_gradients_reach_every_stored_number_and_match_gradcheck():
    stored = _stored(2, 1, 1, 2).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: decode_channelwise(x, 2, 1), (stored,))
    s = ChannelwiseSet(_stored(2, 1, 1, 2), 2)
    weights = torch.randn(s.images().shape, generator=torch.Generator().manual_seed(1))
    (s.images() * weights).sum().backward()
    assert s.image_parameters() == [s.stored] and bool((s.stored.grad != 0).all())


def test_decode_is_a_pure_function_of_the_stored_parameters():
    a = ChannelwiseSet(_stored(seed=2), 3)
    b = ChannelwiseSet(torch.zeros_like(a.stored), 3)
    assert not torch.equal(a.images(), b.images())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.images(), b.images()) and torch.equal(a.images(), a.images())


def test_factor_one_is_pixels_exactly():
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(3).repeat_interleave(2)
    one = build_synthetic_set("channelwise", images, labels, 3, {"factor": 1})
    assert torch.equal(one.images(), PixelSet(images, labels, 3).images()) and torch.equal(one.labels, labels)


def test_init_puts_each_group_of_real_images_into_its_channel_group():
    classes, ipc, f = 2, 1, 2
    images = torch.randn(classes * ipc * f * f, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(classes).repeat_interleave(ipc * f * f)
    s = build_synthetic_set("channelwise", images, labels, classes, {"factor": f})
    assert s.stored.shape == (classes * ipc, f * f, 4, 4)
    for c in range(classes):
        for g in range(f * f):
            assert torch.equal(s.stored[c, g], images[c * f * f + g, 0, ::2, ::2])  # nearest shrink, decode order


def test_bad_input_names_the_option():
    with pytest.raises(ValueError, match="image_channels = 4 x 3 = 12 channels.*got 4.*3 channel"):
        ChannelwiseSet(_stored(channels=1), 3, factor=2, image_channels=3)  # 1-channel storage, RGB data
    with pytest.raises(ValueError, match="got 3: the stored set does not fit data with 1 channel"):
        decode_channelwise(torch.zeros(1, 3, 4, 4), 2, 1)
    with pytest.raises(ValueError, match="factor 3 must divide the image size 8x8"):
        build_synthetic_set("channelwise", torch.zeros(9, 1, 8, 8), torch.zeros(9, dtype=torch.long), 1, {"factor": 3})
    with pytest.raises(ValueError, match="factor must be a positive integer"):
        decode_channelwise(torch.zeros(1, 4, 4, 4), 0, 1)
    with pytest.raises(ValueError, match="factor 3 must divide the image size 8x8"):
        condense("channel_efficient", "digits", ipc=1, iterations=1, factor=3, progress=False)


def test_the_row_runs_saves_the_stored_tensors_and_evaluates(tmp_path):
    row = get_recipe("channel_efficient")
    assert (row.synthetic, row.feature_map, row.discrepancy, row.augmentation) == (
        "channelwise", "gradients", "gradient_cosine", "dsa")
    assert row.relation_to_ipm == NORMALISED and "no paper" in row.source
    kw = {"ipc": 1, "seed": 3, "progress": False, "batch_real": 8, "outer_loop": 1, "inner_loop": 1,
          "lr_images": 0.01}  # the same image step for both rows (the digits budgets differ)
    r = condense("channel_efficient", "digits", iterations=2, out=tmp_path / "ce", **kw)
    assert r.images.shape == (40, 1, 8, 8) and torch.equal(r.labels, torch.arange(10).repeat_interleave(4))
    saved = torch.load(tmp_path / "ce" / "synthetic.pt", weights_only=True)
    assert saved["stored"]["stored"].shape == (10, 4, 4, 4)
    assert 0.0 <= evaluate(tmp_path / "ce", models=1, epochs=2, save=False)["accuracy_mean"] <= 1.0
    # the same run on IDC's tile layout takes the same steps (the layouts are a re-indexing of each other)
    tiles = condense("dsa", "digits", synthetic="multiformation", factor=2, iterations=2, **kw)
    assert torch.allclose(r.images, tiles.images, atol=1e-6)


def test_dm_composes_with_channelwise():
    row = compose_recipe("dm", synthetic="channelwise")
    assert row.name == "dm+synthetic=channelwise"
    r = condense("dm", "digits", synthetic="channelwise", iterations=2, ipc=1, progress=False, batch_real=8)
    assert r.images.shape == (40, 1, 8, 8) and len(r.metrics["loss_history"]) == 2
