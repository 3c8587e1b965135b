"""DCGM (issue 18, method 3): latents and generator trained with DM, a GAN term and two contrastive terms.

Pins: each term against an independent NumPy loop; the gradient of a step reaches the latents and the generator
and never the discriminator (which only its own hinge step moves); with every DCGM weight and lr_generator at 0
the row is the plain latent DM (glad) bit for bit; resume bit-for-bit (the discriminator and its Adam state are
checkpointed); the discriminator of a generator run's checkpoint is the starting one; bad input names the option.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ipmcondense.condensation.api import condense
from ipmcondense.condensation.dcgm import GeneratorAdversary
from ipmcondense.condensation.extra_terms import (
    ClassContrast,
    get_extra_term,
    inter_class_discrimination_loss,
    intra_class_diversity_loss,
)
from ipmcondense.condensation.recipes import get_recipe
from ipmcondense.condensation.synthetic import build_synthetic_set
from ipmcondense.data import load_dataset
from ipmcondense.generators import ConditionalDiscriminator, load_generator
from ipmcondense.nets import build_isolated, get_network

GENERATOR_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "generator-digits-tiny"
KW = {"progress": False, "generator": str(GENERATOR_DIR), "batch_real": 8}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _intra_numpy(syn, real, syn_classes, real_classes, tau):
    total, count = 0.0, 0
    for c in sorted(set(syn_classes)):
        members = [i for i, k in enumerate(syn_classes) if k == c]
        centre = np.mean([real[j] for j, k in enumerate(real_classes) if k == c], axis=0)
        for i in members:
            pos = np.exp(_cos(syn[i], centre) / tau)
            neg = sum(np.exp(_cos(syn[i], syn[j]) / tau) for j in members if j != i)
            total += -np.log(pos / (pos + neg))
            count += 1
    return total / count


def _inter_numpy(syn, real, syn_classes, real_classes, tau):
    classes = sorted(set(syn_classes))
    mu_s = {c: np.mean([syn[i] for i, k in enumerate(syn_classes) if k == c], axis=0) for c in classes}
    mu_t = {c: np.mean([real[i] for i, k in enumerate(real_classes) if k == c], axis=0) for c in classes}
    total = 0.0
    for c in classes:
        pos = np.exp(_cos(mu_s[c], mu_t[c]) / tau)
        neg = sum(np.exp(_cos(mu_s[c], mu_s[o]) / tau) for o in classes if o != c)
        total += -np.log(pos / (pos + neg))
    return total / len(classes)


def test_the_two_contrastive_terms_against_numpy_loops():
    g = torch.Generator().manual_seed(0)
    syn = torch.randn(9, 5, generator=g, dtype=torch.float64)  # classes of 3, 2 and 4 samples
    real = torch.randn(7, 5, generator=g, dtype=torch.float64)
    syn_classes, real_classes = [0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 2, 2]
    syn_seg, real_seg = [slice(0, 3), slice(3, 5), slice(5, 9)], [slice(0, 2), slice(2, 5), slice(5, 7)]
    for tau in (0.1, 0.7):
        intra = intra_class_diversity_loss(syn, real, syn_seg, real_seg, tau)
        inter = inter_class_discrimination_loss(syn, real, syn_seg, real_seg, tau)
        assert float(intra) == pytest.approx(_intra_numpy(syn.numpy(), real.numpy(), syn_classes, real_classes, tau),
                                             rel=1e-10)
        assert float(inter) == pytest.approx(_inter_numpy(syn.numpy(), real.numpy(), syn_classes, real_classes, tau),
                                             rel=1e-10)
    # one sample per class: no class-mates, the intra-class term is exactly 0
    one = [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert float(intra_class_diversity_loss(syn[:3], real, one, real_seg, 0.1)) == 0.0
    # the intra-class gradient pushes class-mates apart: a small step along -grad lowers their mutual cosine
    two = torch.tensor([[1.0, 0.2, 0.0], [1.0, 0.0, 0.2]], dtype=torch.float64, requires_grad=True)
    centre = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)
    (grad,) = torch.autograd.grad(intra_class_diversity_loss(two, centre, [slice(0, 2)], [slice(0, 1)], 0.5), two)
    moved = two.detach() - 0.05 * grad
    assert _cos(moved[0].numpy(), moved[1].numpy()) < _cos(two[0].detach().numpy(), two[1].detach().numpy())


def test_the_extra_terms_use_the_step_networks_embedding(digits):
    net = build_isolated(lambda: get_network("convnet-d2", 1, 10, (8, 8)), 4)
    real = torch.cat([digits.train_images[digits.train_labels == c][:4] for c in range(3)])
    syn = torch.cat([digits.train_images[digits.train_labels == c][10:12] for c in range(3)]).requires_grad_(True)
    rs, ss = [slice(4 * c, 4 * c + 4) for c in range(3)], [slice(2 * c, 2 * c + 2) for c in range(3)]
    labels_r, labels_s = torch.arange(3).repeat_interleave(4), torch.arange(3).repeat_interleave(2)
    with torch.no_grad():
        fr, fs = net.embed(real).flatten(1), net.embed(syn).flatten(1)
    intra = ClassContrast(0.3, 0.0, 0.2)(net, real, labels_r, syn, labels_s, rs, ss)
    inter = ClassContrast(0.0, 0.7, 0.2)(net, real, labels_r, syn, labels_s, rs, ss)
    both = ClassContrast(0.3, 0.7, 0.2)(net, real, labels_r, syn, labels_s, rs, ss)
    assert float(intra) == pytest.approx(0.3 * float(intra_class_diversity_loss(fs, fr, ss, rs, 0.2)), rel=1e-5)
    assert float(inter) == pytest.approx(0.7 * float(inter_class_discrimination_loss(fs, fr, ss, rs, 0.2)), rel=1e-5)
    assert float(both) == pytest.approx(float(intra) + float(inter), rel=1e-6)
    assert torch.autograd.grad(both, syn)[0].abs().sum() > 0
    assert float(ClassContrast(0.0, 0.0)(net, real, labels_r, syn, labels_s, rs, ss)) == 0.0
    one_weight = get_extra_term("class_contrast", 0.3)
    assert (one_weight.intra_weight, one_weight.inter_weight, one_weight.temperature) == (0.3, 0.3, 0.1)


def _gan_set(digits, ipc=2, **options):
    labels = torch.arange(10).repeat_interleave(ipc)
    images = torch.stack([digits.train_images[digits.train_labels == c][:ipc] for c in range(10)]).flatten(0, 1)
    config = {"generator": str(GENERATOR_DIR), "latent_init": "gaussian", "inversion_steps": 0, "inversion_lr": 0.1,
              "lr_generator": 1e-3, "gan_weight": 0.5, "lr_discriminator": 1e-3, **options}
    return build_synthetic_set("latent_gan", images, labels, 10, config, rng=torch.Generator().manual_seed(3))


class _RealBatches:
    def __init__(self, digits):
        self.digits = digits

    def sample(self, n):
        x = torch.cat([self.digits.train_images[self.digits.train_labels == c][:n] for c in range(10)])
        return x, torch.arange(10).repeat_interleave(n)


def test_gradients_reach_latents_and_generator_never_the_discriminator(digits):
    syn = _gan_set(digits)
    ctx = SimpleNamespace(generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                          real_batches=_RealBatches(digits))
    adversary = syn.decoder_training(ctx)
    assert isinstance(adversary, GeneratorAdversary) and syn.discriminator_state is None  # the fixture: no checkpoint
    trained = syn.image_parameters() + [p for g in syn.extra_parameter_groups() for p in g["params"]]
    d_params = list(adversary.discriminator.parameters())
    assert trained[0] is syn.latents and len(trained) == 1 + len(list(syn.decoder.parameters()))
    assert not {id(p) for p in trained} & {id(p) for p in d_params}
    d_before = [p.detach().clone() for p in d_params]
    loss = adversary.loss()
    with torch.no_grad():  # w_gan * (-mean D(G(z, y), y)), computed directly (eval: the spectral-norm vectors
        adversary.discriminator.eval()  # the loss's forward has just updated, without a further power step)
        expected = -0.5 * adversary.discriminator(syn.decoder(syn.latents, syn.labels), syn.labels).mean()
        adversary.discriminator.train()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    grads = torch.autograd.grad(loss, trained, allow_unused=True)
    assert grads[0].abs().sum() > 0 and sum(float(g.abs().sum()) for g in grads[1:] if g is not None) > 0
    assert all(p.grad is None for p in d_params) and all(torch.equal(a, b) for a, b in zip(d_before, d_params))
    # the discriminator's own step moves it (and nothing of the set)
    kept = [p.detach().clone() for p in trained]
    adversary.after_step()
    assert not all(torch.equal(a, b.detach()) for a, b in zip(d_before, d_params))
    assert all(torch.equal(a, b.detach()) for a, b in zip(kept, trained))


def test_the_row_trains_the_generator_and_zero_weights_are_the_latent_dm(tmp_path):
    row = get_recipe("dcgm")
    assert (row.synthetic, row.feature_map, row.discrepancy, row.sampler) == ("latent_gan", "embedding",
                                                                                "mean_embedding", "fresh")
    assert row.extra_terms == ("class_contrast",)
    off = {"gan_weight": 0.0, "intra_weight": 0.0, "inter_weight": 0.0, "lr_generator": 0.0}
    plain = condense("dcgm", "digits", ipc=2, iterations=3, seed=1, **KW, **off)
    glad = condense("glad", "digits", ipc=2, iterations=3, seed=1, **KW)
    assert torch.equal(plain.images, glad.images) and plain.metrics["loss_history"] == glad.metrics["loss_history"]
    # the full row: the saved set holds a generator that moved away from the run's, and decodes its images
    full = condense("dcgm", "digits", ipc=2, iterations=3, seed=1, out=tmp_path / "d", lr_generator=0.01, **KW)
    saved = torch.load(tmp_path / "d" / "synthetic.pt", weights_only=True)
    assert saved["synthetic"] == "latent_gan"
    start = load_generator(GENERATOR_DIR)
    stored = {k[len("decoder."):]: v for k, v in saved["stored"].items() if k.startswith("decoder.")}
    assert not torch.equal(stored["fc.weight"], start.state_dict()["fc.weight"])
    start.load_state_dict(stored)
    with torch.no_grad():
        assert torch.equal(start(saved["stored"]["latents"], saved["stored"]["labels"]), full.images)
    assert not torch.equal(full.images, glad.images)


def test_resume_is_bit_for_bit(tmp_path):
    kw = {"ipc": 1, "seed": 2, **KW}
    straight = condense("dcgm", "digits", iterations=2, **kw)
    condense("dcgm", "digits", iterations=1, out=tmp_path / "r", **kw)
    resumed = condense("dcgm", "digits", iterations=2, out=tmp_path / "r", resume=True, **kw)
    assert torch.equal(straight.images, resumed.images)
    assert straight.metrics["loss_history"] == resumed.metrics["loss_history"]


def test_the_discriminator_starts_from_the_generator_runs_checkpoint(digits, tmp_path):
    import shutil

    from ipmcondense.generators.runs import _CHECKPOINT_FORMAT

    run = tmp_path / "g"
    shutil.copytree(GENERATOR_DIR, run)
    gen = load_generator(run)
    saved = build_isolated(lambda: ConditionalDiscriminator(10, 1, (8, 8), gen.width), 11).state_dict()
    torch.save({"format": _CHECKPOINT_FORMAT, "discriminator": saved}, run / "checkpoint.pt")
    labels = torch.arange(10)
    images = torch.stack([digits.train_images[digits.train_labels == c][0] for c in range(10)])
    config = {"generator": str(run), "latent_init": "gaussian", "inversion_steps": 0, "inversion_lr": 0.1,
              "lr_generator": 1e-4, "gan_weight": 0.1, "lr_discriminator": 2e-4}
    syn = build_synthetic_set("latent_gan", images, labels, 10, config)
    ctx = SimpleNamespace(generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), real_batches=None)
    adversary = GeneratorAdversary(syn, ctx)
    assert all(torch.equal(v, saved[k]) for k, v in adversary.discriminator.state_dict().items())
    torch.save({"format": "something else"}, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="not an ipmcondense generator checkpoint"):
        build_synthetic_set("latent_gan", images, labels, 10, config)


def test_bad_input_names_the_option(digits):
    for key, value in (("gan_weight", -1.0), ("lr_generator", -0.1), ("lr_discriminator", 0.0)):
        with pytest.raises(ValueError, match=key):
            _gan_set(digits, **{key: value})
    for key, value in (("intra_weight", -1.0), ("inter_weight", float("nan")), ("dcgm_temperature", 0.0)):
        with pytest.raises(ValueError, match=key):
            condense("dcgm", "digits", ipc=1, iterations=1, **KW, **{key: value})
    with pytest.raises(ValueError, match="needs a generator"):
        condense("dcgm", "digits", ipc=1, iterations=1, progress=False)
    with pytest.raises(ValueError, match="'latent_gan'"):
        condense("dm", "digits", ipc=1, iterations=1, progress=False, generator=load_generator(GENERATOR_DIR))
