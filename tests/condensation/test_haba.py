"""HaBa: bases x hallucinators (``haba`` synthetic set), its adversarial losses, the ``haba`` row and DM + HaBa."""

import math

import pytest
import torch
import torch.nn.functional as F

from ipmcondense.augment import NoAugmentation
from ipmcondense.condensation.api import condense
from ipmcondense.condensation.haba import (
    HaBaSet,
    HallucinatorTraining,
    StyleHallucinator,
    supervised_contrastive_loss,
)
from ipmcondense.condensation.recipes import APPROXIMATE, compose_recipe, get_recipe
from ipmcondense.condensation.synthetic import build_synthetic_set
from ipmcondense.nets import get_network

from .conftest import EXPERT_ARCH

_MTT = {"arch": EXPERT_ARCH, "max_start_epoch": 1, "expert_epochs": 1, "syn_steps": 2, "lr_images": 10.0,
        "n_hallucinators": 2, "ipc": 1, "seed": 5, "progress": False}


def _set(classes=3, ipc=2, n_h=3, seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(classes * ipc, 1, 8, 8, generator=g)
    labels = torch.arange(classes).repeat_interleave(ipc)
    config = {"n_hallucinators": n_h, **options}
    return build_synthetic_set("haba", images, labels, classes, config, rng=torch.Generator().manual_seed(seed))


def test_decoded_set_is_every_hallucinator_of_every_basis_with_replicated_labels():
    s = _set()
    assert isinstance(s, HaBaSet)
    out = s.images()
    assert out.shape == (3 * 2 * 3, 1, 8, 8) and s.images_per_class == 6 and s.ipc == 2
    assert torch.equal(s.labels, torch.arange(3).repeat_interleave(6))
    for c in range(3):
        for j in range(3):
            for i in range(2):
                expected = s.hallucinators[j](s.bases[c * 2 + i][None])[0]
                assert torch.allclose(out[c * 6 + j * 2 + i], expected, atol=1e-6)


def test_hallucinator_is_haba_style_translator():
    h = StyleHallucinator(1, 3, (8, 8), kernel_size=3)
    with torch.no_grad():
        h.scale.normal_()
        h.shift.normal_()
    x = torch.randn(4, 1, 8, 8)
    inner = F.conv2d(x, h.encode.weight, h.encode.bias)
    assert inner.shape == (4, 3, 6, 6)  # no padding: (H - k + 1) x (W - k + 1), per-position affine
    expected = F.conv_transpose2d(h.scale * inner + h.shift, h.decode.weight, h.decode.bias)
    assert torch.allclose(h(x), expected, atol=1e-6) and h(x).shape == (4, 3, 8, 8)
    count = sum(p.numel() for p in h.parameters())
    assert count == 9 * (1 * 3 + 3 * 3) + 3 + 3 + 2 * 3 * 6 * 6


def test_gradients_reach_the_bases_and_every_hallucinator_weight():
    s = _set()
    weights = torch.randn(s.images().shape, generator=torch.Generator().manual_seed(1))
    (s.images() * weights).sum().backward()
    assert s.bases.grad is not None and bool((s.bases.grad != 0).any())
    assert all(p.grad is not None and bool((p.grad != 0).any()) for p in s.hallucinators.parameters())
    # lr_hallucinators None: one group with the bases (HaBa lr_style = lr_img); else a group of their own
    assert len(s.image_parameters()) == 1 + len(list(s.hallucinators.parameters()))
    t = _set(lr_hallucinators=0.5)
    assert t.image_parameters() == [t.bases] and t.extra_parameter_groups()[-1]["lr"] == 0.5


def test_decode_is_a_pure_function_of_the_stored_parameters():
    a, b = _set(seed=0), _set(seed=1)
    assert not torch.equal(a.images(), b.images())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.images(), b.images())
    assert {k.split(".")[0] for k in a.state_dict()} == {"labels", "bases", "hallucinators"}


def _brute_supcon(features, labels, tau):
    n, views, _ = features.shape
    z = [features[i, v] for v in range(views) for i in range(n)]
    y = [int(labels[i]) for v in range(views) for i in range(n)]
    total = 0.0
    for a in range(len(z)):
        denominator = math.log(sum(math.exp(float(z[a] @ z[b]) / tau) for b in range(len(z)) if b != a))
        positives = [p for p in range(len(z)) if p != a and y[p] == y[a]]
        total += -sum(float(z[a] @ z[p]) / tau - denominator for p in positives) / len(positives)
    return total / len(z)


def test_supervised_contrastive_loss_equals_a_brute_force_loop():
    g = torch.Generator().manual_seed(2)
    features = F.normalize(torch.randn(5, 2, 4, generator=g, dtype=torch.float64), dim=2)
    labels = torch.tensor([0, 1, 0, 2, 1])
    for tau in (0.07, 0.5):
        got = float(supervised_contrastive_loss(features, labels, tau, tau))
        assert got == pytest.approx(_brute_supcon(features, labels, tau), rel=1e-9)
    with pytest.raises(ValueError, match="views >= 2"):
        supervised_contrastive_loss(features[:, :1], labels)


class _Ctx:
    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)
        self.device = torch.device("cpu")
        self.augmentation = NoAugmentation()
        self.build_network = lambda: get_network("convnet-w32", 1, 3, (8, 8))


def test_club_term_compares_two_distinct_hallucinators_and_spares_the_extractor():
    s = _set(n_h=2)
    training = HallucinatorTraining(s, _Ctx())
    value = training.loss()
    e = training.extractor.embed
    e0, e1 = e(s.hallucinate(0)).flatten(1), e(s.hallucinate(1)).flatten(1)
    expected = 0.1 * ((F.cosine_similarity(e0, e1) + 1) / 2).mean()  # a pair j0 == j1 would give 0.1
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-5) and float(value.detach()) < 0.0999
    grads = torch.autograd.grad(value, [s.bases, *s.hallucinators.parameters()], allow_unused=True)
    assert all(g is not None for g in grads)
    assert not any(p.requires_grad and p.grad is not None for p in training.extractor.parameters())


def test_extractor_step_trains_on_task_likelihood_and_supcon_and_leaves_the_set_alone():
    s = _set(n_h=2)
    training = HallucinatorTraining(s, _Ctx())
    x = torch.cat([s.hallucinate(0), s.hallucinate(1)]).detach()
    labels = s.basis_labels()
    logits = training.extractor(x)
    emb = training.extractor.embed(x).flatten(1)
    e0, e1 = emb.chunk(2)
    views = torch.stack([F.normalize(e0, dim=1), F.normalize(e1, dim=1)], dim=1).double()
    expected = (F.cross_entropy(logits, torch.cat([labels, labels]))
                + 0.1 * ((1 - F.cosine_similarity(e0, e1)) / 2).mean()
                + 0.1 * _brute_supcon(views.detach(), labels, 0.07))
    got = training.extractor_loss(x, labels).detach()
    assert float(got) == pytest.approx(float(expected.detach()), rel=1e-4)
    before_set = {k: v.clone() for k, v in s.state_dict().items()}
    before = [p.detach().clone() for p in training.extractor.parameters()]
    training.after_step()
    assert all(torch.equal(v, s.state_dict()[k]) for k, v in before_set.items())
    assert any(not torch.equal(a, b) for a, b in zip(before, training.extractor.parameters()))


def test_haba_row_is_mtt_on_the_hallucinated_set_and_resumes_bit_for_bit(small_expert_buffer, tmp_path):
    row = get_recipe("haba")
    assert (row.objective, row.synthetic, row.relation_to_ipm) == ("mtt", "haba", APPROXIMATE)
    assert row.defaults["momentum_images"] == 0.95 and row.defaults["n_hallucinators"] == 5
    assert "DatasetFactorization" in row.source and "Deviations" in row.source
    kw = {**_MTT, "experts": str(small_expert_buffer), "checkpoint_every": 1}
    straight = condense("haba", "digits", iterations=3, out=tmp_path / "a", **kw)
    assert straight.images.shape == (20, 1, 8, 8)
    saved = torch.load(tmp_path / "a" / "synthetic.pt", weights_only=True)
    assert saved["stored"]["bases"].shape == (10, 1, 8, 8) and "hallucinators.0.scale" in saved["stored"]
    checkpoint = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    assert set(checkpoint["decoder_training"]) == {"extractor", "optimizer"}
    partial = condense("haba", "digits", iterations=1, out=tmp_path / "b", **kw)
    assert not torch.equal(partial.images, straight.images)
    resumed = condense("haba", "digits", iterations=3, out=tmp_path / "b", resume=True, **kw)
    assert torch.equal(straight.images, resumed.images)
    assert straight.metrics["loss_history"] == resumed.metrics["loss_history"]


def test_dm_composes_with_haba_and_its_gradient_moves_the_hallucinators():
    assert compose_recipe("dm", synthetic="haba").name == "dm+synthetic=haba"
    kw = {"ipc": 1, "progress": False, "batch_real": 8, "n_hallucinators": 2, "lr_hallucinators": 0.01, "seed": 1}
    start = condense("dm", "digits", synthetic="haba", iterations=0, out=None, **kw)
    r = condense("dm", "digits", synthetic="haba", iterations=2, **kw)
    assert r.images.shape == (20, 1, 8, 8) and all(math.isfinite(v) for v in r.metrics["loss_history"])
    assert not torch.equal(start.images, r.images)


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="n_hallucinators must be at least 2"):
        _set(n_h=1)
    with pytest.raises(ValueError, match="basis_channels must be None"):
        _set(basis_channels=2)
    with pytest.raises(ValueError, match="hallucinator_kernel must be in"):
        _set(hallucinator_kernel=9)
    with pytest.raises(ValueError, match="haba_temperature"):
        _set(haba_temperature=0.0)
    one = _set(basis_channels=1)
    assert one.bases.shape[1] == 1
