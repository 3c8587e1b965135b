"""The ``latent`` synthetic set (GLaD, IT-GAN; issue 18): latents decoded by a fixed generator.

Pins the defining properties: the gradient a loss sends to the latents is the chain rule through G (checked
against forward-mode Jacobian-vector products and the explicit Jacobian, float64); decoding is a pure function
of the stored latents (a saved set re-decodes with the generator loaded from its run directory); resume
re-decodes identically; IT-GAN's inversion and anchor term against direct computations; bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ipmcondense.condensation.api import condense
from ipmcondense.condensation.extra_terms import AnchorFeatureDistance
from ipmcondense.condensation.recipes import get_recipe
from ipmcondense.condensation.synthetic import LatentSet, build_synthetic_set, invert_generator
from ipmcondense.data import load_dataset
from ipmcondense.generators import load_generator
from ipmcondense.nets import build_isolated, get_network

GENERATOR_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "generator-digits-tiny"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _latent_set(digits, init="gaussian", ipc=2, steps=20):
    labels = torch.arange(10).repeat_interleave(ipc)
    images = torch.stack([digits.train_images[digits.train_labels == c][:ipc] for c in range(10)]).flatten(0, 1)
    config = {"generator": str(GENERATOR_DIR), "latent_init": init, "inversion_steps": steps, "inversion_lr": 0.1}
    return build_synthetic_set("latent", images, labels, 10, config, rng=torch.Generator().manual_seed(3)), images


def test_latent_gradient_is_the_chain_rule_through_the_generator(digits):
    syn, _ = _latent_set(digits)
    g64 = load_generator(GENERATOR_DIR).double()
    syn = LatentSet(syn.latents.detach().double(), syn.labels, 10, g64)
    weights = torch.randn(syn.labels.shape[0], 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss_of_images(x):  # any smooth loss of the decoded images
        return (weights * x).sum() + 0.5 * (x**2).sum()

    (grad_z,) = torch.autograd.grad(loss_of_images(syn.images()), syn.latents)
    z, labels = syn.latents.detach(), syn.labels
    x = g64(z, labels)
    dl_dx = weights + x  # gradient of loss_of_images, by hand
    for seed in range(3):  # <grad_z L, v> = <dL/dx, J_G v>, J_G v by forward mode (torch.func.jvp)
        v = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        _, jv = torch.func.jvp(lambda q: g64(q, labels), (z,), (v,))
        assert torch.allclose((grad_z * v).sum(), (dl_dx * jv).sum(), rtol=1e-10, atol=1e-10)
    # and row by row: grad z_i = J_G(z_i)^T dL/dx_i with the explicit Jacobian of one decoded image
    for i in (0, 7):
        jac = torch.autograd.functional.jacobian(lambda q: g64(q.unsqueeze(0), labels[i:i + 1]).flatten(), z[i])
        assert torch.allclose(grad_z[i], jac.t() @ dl_dx[i].flatten(), rtol=1e-10, atol=1e-12)


def test_decoding_is_a_pure_function_of_the_stored_latents(digits, tmp_path):
    syn, _ = _latent_set(digits)
    first = syn.images().detach()
    syn.train()  # the engine may toggle modes: the fixed generator keeps its running statistics
    assert torch.equal(syn.images().detach(), first)
    assert not any(p.requires_grad for p in syn.decoder.parameters()) and syn.image_parameters() == [syn.latents]
    out = tmp_path / "glad"
    result = condense("glad", "digits", ipc=2, iterations=2, seed=1, progress=False, out=out,
                      generator=str(GENERATOR_DIR), batch_real=8)
    saved = torch.load(out / "synthetic.pt", weights_only=True)
    assert saved["synthetic"] == "latent" and saved["config"]["generator"] == str(GENERATOR_DIR)
    decoded = load_generator(GENERATOR_DIR)(saved["stored"]["latents"], saved["stored"]["labels"])
    assert torch.equal(decoded, saved["images"]) and torch.equal(decoded, result.images)


def test_resume_re_decodes_identically(tmp_path):
    kw = {"ipc": 1, "seed": 2, "progress": False, "generator": str(GENERATOR_DIR), "batch_real": 8}
    straight = condense("glad", "digits", iterations=3, **kw)
    condense("glad", "digits", iterations=1, out=tmp_path / "r", **kw)
    resumed = condense("glad", "digits", iterations=3, out=tmp_path / "r", resume=True, **kw)
    assert torch.equal(straight.images, resumed.images)
    assert straight.metrics["loss_history"] == resumed.metrics["loss_history"]


def test_inversion_and_the_anchor_term_against_direct_computations(digits):
    gaussian, images = _latent_set(digits, "gaussian")
    inverted, _ = _latent_set(digits, "inversion", steps=30)
    g = inverted.decoder

    def error(z):
        return (g(z, inverted.labels) - images).pow(2).flatten(1).sum(1).mean()

    assert torch.equal(gaussian.latents, _latent_set(digits, "gaussian")[0].latents)  # seeded by the rng
    assert float(error(inverted.latents.detach())) < 0.8 * float(error(gaussian.latents.detach()))
    # invert_generator is Adam on the mean squared reconstruction error, from the Gaussian start
    z = gaussian.latents.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        error(z).backward()
        opt.step()
    assert torch.allclose(z.detach(), inverted.latents.detach(), atol=1e-6)
    assert torch.equal(invert_generator(g, images, inverted.labels, z.detach(), 0, 0.1), z.detach())

    term = AnchorFeatureDistance(0.3)
    term.bind(inverted)
    net = build_isolated(lambda: get_network("convnet-d2", 1, 10, (8, 8)), 4)
    value = term(net, None, None, None, None, [], [])
    with torch.no_grad():
        expected = 0.3 * ((net.embed(g(inverted.latents, inverted.labels)) - net.embed(images)) ** 2).sum(1).mean()
    assert torch.allclose(value.detach(), expected, rtol=1e-5)
    (grad,) = torch.autograd.grad(value, inverted.latents)
    assert grad.abs().sum() > 0


def test_itgan_row_starts_from_inverted_latents_and_moves_them():
    assert get_recipe("itgan").extra_terms == ("anchor_features",) and get_recipe("itgan").synthetic == "latent"
    kw = {"ipc": 1, "seed": 0, "progress": False, "generator": str(GENERATOR_DIR), "batch_real": 8, "inversion_steps": 5}
    start = condense("itgan", "digits", iterations=0, **kw)
    moved = condense("itgan", "digits", iterations=2, lr_images=0.1, **kw)
    assert start.config["latent_init"] == "inversion" and not torch.equal(start.images, moved.images)


def test_user_module_generator_and_bad_input(digits, tmp_path):
    class Tiny(nn.Module):
        latent_dim = 4

        def __init__(self):
            super().__init__()
            self.map = nn.Linear(4 + 10, 64)

        def forward(self, z, labels):
            return self.map(torch.cat([z, nn.functional.one_hot(labels, 10).float()], 1)).view(-1, 1, 8, 8)

    tiny = build_isolated(Tiny, 0)
    result = condense("dm", "digits", ipc=1, iterations=1, progress=False, synthetic="latent", generator=tiny,
                      batch_real=8, out=tmp_path / "u")
    assert result.config["generator"] == "<module Tiny>" and result.recipe.name == "dm+synthetic=latent"
    stored = torch.load(tmp_path / "u" / "synthetic.pt", weights_only=True)["stored"]
    with torch.no_grad():
        assert torch.equal(result.images, tiny(stored["latents"], stored["labels"]))
    with pytest.raises(ValueError, match="needs a generator"):
        condense("glad", "digits", ipc=1, iterations=1, progress=False)
    with pytest.raises(ValueError, match="generator is used by synthetic 'latent'"):
        condense("dm", "digits", ipc=1, iterations=1, progress=False, generator=tiny)
    with pytest.raises(TypeError, match="generator must be"):
        condense("glad", "digits", ipc=1, iterations=1, progress=False, generator=3)
    with pytest.raises(ValueError, match="latent_init"):
        condense("glad", "digits", ipc=1, iterations=1, progress=False, generator=tiny, latent_init="zeros")
    with pytest.raises(ValueError, match="anchor_features"):
        term = AnchorFeatureDistance(1.0)
        term.bind(build_synthetic_set("pixels", digits.train_images[:10], torch.arange(10), 10, {}))
    with pytest.raises(ValueError, match="latents have dimension"):
        LatentSet(torch.zeros(10, 5), torch.arange(10), 10, tiny)


def test_cli_generator_and_condense_with_a_generator(tmp_path, capsys):
    import json

    from ipmcondense.cli import main

    assert main(["condense", "--method", "glad", "--dataset", "digits", "--ipc", "1", "--iterations", "1",
                 "--generator", str(GENERATOR_DIR), "--batch-real", "8", "--out", str(tmp_path / "c"),
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["method"] == "glad"
    assert main(["generator", "--kind", "gan", "--dataset", "digits", "--epochs", "0", "--out",
                 str(tmp_path / "g")]) == 2
    assert "epochs" in capsys.readouterr().err
