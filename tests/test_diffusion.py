"""The diffusion generator and minimax diffusion (issue 18): the forward process against its closed form, the
epsilon loss, the samplers (DDIM with eta 1 over every step is the ancestral chain; determinism), bit-for-bit
resume, the minimax terms against a numpy loop on a tiny memory bank, and bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ipmcondense.data import LabelledImages, load_dataset
from ipmcondense.generators import (
    ConditionalUNet,
    DiffusionGenerator,
    MinimaxMemory,
    NoiseSchedule,
    ddim_sample,
    ddpm_sample,
    epsilon_loss,
    load_generator,
    minimax_finetune,
    minimax_terms,
    q_sample,
    train_generator,
)

TINY = {"kind": "diffusion", "width": 8, "batch_size": 64, "timesteps": 50, "sample_steps": 4, "progress": False}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster than two and immune to an oversubscribed machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_digits():
    """300 training and 60 test digits: a tiny diffusion epoch in well under a second."""
    ds = load_dataset("digits")
    return LabelledImages(name="digits", train_images=ds.train_images[:300], train_labels=ds.train_labels[:300],
                          test_images=ds.test_images[:60], test_labels=ds.test_labels[:60], num_classes=10,
                          mean=ds.mean, std=ds.std, class_names=ds.class_names)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_forward_noising_is_the_closed_form_q(kind):
    T = 100
    s = NoiseSchedule(T, kind)
    if kind == "linear":
        betas = np.linspace(1e-3, 0.2, T)  # Ho et al.'s 1e-4 .. 0.02 at T = 1000, scaled by 1000 / T
        abar = np.cumprod(1 - betas)
    else:  # the cumulative product telescopes to f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) pi/2)
        f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
        abar = f[1:] / f[0]
        abar[-1] = abar[-2] * (1 - min(0.999, 1 - f[-1] / f[-2]))
    np.testing.assert_allclose(s.alphas_cumprod.double().numpy(), abar, rtol=2e-5)
    # q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): empirical moments of 40000 draws
    x0 = torch.tensor([0.7, -0.3]).view(1, 2, 1, 1).expand(40000, 2, 1, 1)
    gen = torch.Generator().manual_seed(0)
    for t in (0, 30, T - 1):
        xt = q_sample(s, x0, torch.full((40000,), t), torch.randn(x0.shape, generator=gen))
        np.testing.assert_allclose(xt.mean(0).flatten().numpy(), np.sqrt(abar[t]) * np.array([0.7, -0.3]), atol=0.015)
        np.testing.assert_allclose(xt.var(0).flatten().numpy(), [1 - abar[t]] * 2, rtol=0.03, atol=2e-4)


def test_epsilon_loss_and_the_predicted_clean_image():
    torch.manual_seed(0)
    model = DiffusionGenerator(3, 1, (8, 8), width=8, timesteps=20, sample_steps=4)
    x0, y = torch.rand(5, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3, 0])
    t, noise = torch.tensor([0, 4, 9, 19, 12]), torch.randn(5, 1, 8, 8)
    per_sample, x0_hat = epsilon_loss(model, x0, y, t, noise)
    abar = model.schedule.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    xt = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    with torch.no_grad():
        eps = model.unet(xt.float(), t, y).double()
    np.testing.assert_allclose(per_sample.double().detach().numpy(), ((noise - eps) ** 2).mean((1, 2, 3)).numpy(),
                               rtol=1e-4)
    np.testing.assert_allclose(x0_hat.detach().double().numpy(), ((xt - (1 - abar).sqrt() * eps) / abar.sqrt()).numpy(),
                               rtol=1e-3, atol=1e-4)
    # an oracle network that predicts the true noise has zero loss and recovers x0 exactly
    oracle = SimpleNamespace(schedule=model.schedule, unet=lambda xt_, t_, y_: noise)
    loss, rec = epsilon_loss(oracle, x0, y, torch.tensor([0, 4, 9, 12, 6]), noise)  # abar_19 ~ 1e-7: float32 noise
    assert float(loss.abs().max()) == 0.0
    torch.testing.assert_close(rec, x0, atol=2e-5, rtol=0)


@pytest.mark.parametrize("size", [(8, 8), (28, 28), (32, 32)])
def test_unet_is_sized_to_the_images(size):
    net = ConditionalUNet(10, 3, size, width=8)
    x = torch.randn(2, 3, *size)
    assert net(x, torch.tensor([0, 999]), torch.tensor([1, 10])).shape == x.shape  # label 10: the null class


def test_samplers_are_deterministic_and_ddim_with_eta_one_is_the_ancestral_chain():
    torch.manual_seed(0)
    model = DiffusionGenerator(3, 1, (8, 8), width=8, timesteps=12, sample_steps=4, guidance=2.0).eval()
    y, z = torch.tensor([0, 1, 2]), torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ancestral = ddpm_sample(model, y, z, torch.Generator().manual_seed(5))
        ddim_full = ddim_sample(model, y, z, 12, eta=1.0, rng=torch.Generator().manual_seed(5))
        other_seed = ddpm_sample(model, y, z, torch.Generator().manual_seed(6))
    torch.testing.assert_close(ddim_full, ancestral, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ancestral, other_seed)
    g1 = model(z.flatten(1), y)
    assert torch.equal(g1, model(z.flatten(1), y))  # G(z, y): DDIM with eta 0 is a function of the noise
    assert not torch.equal(g1, model(z.flatten(1) + 0.5, y))
    with pytest.raises(ValueError, match="z must have shape"):
        model(torch.randn(3, 10), y)


def test_training_writes_the_run_and_resume_is_bit_for_bit(small_digits, tmp_path):
    straight = train_generator(small_digits, tmp_path / "a", epochs=2, **TINY)
    for name in ("generator.pt", "checkpoint.pt", "samples.png", "metrics.json"):
        assert (tmp_path / "a" / name).exists()
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["kind"] == "diffusion" and metrics["latent_dim"] == 64 and len(metrics["history"]["loss_diffusion"]) == 2
    train_generator(small_digits, tmp_path / "b", epochs=1, **TINY)
    resumed = train_generator(small_digits, tmp_path / "b", epochs=2, resume=True, **TINY)
    for (k, v), v2 in zip(straight.generator.state_dict().items(), resumed.generator.state_dict().values()):
        assert torch.equal(v, v2), k
    loaded = load_generator(tmp_path / "a")
    assert isinstance(loaded, DiffusionGenerator) and not loaded.training
    z, y = torch.randn(4, 64), torch.arange(4)
    assert torch.equal(loaded(z, y), straight.generator(z, y))
    with pytest.raises(ValueError, match="settings differ.*schedule"):
        train_generator(small_digits, tmp_path / "b", epochs=3, resume=True, **{**TINY, "schedule": "cosine"})


def _numpy_minimax(emb, labels, real, generated, lp, ln):
    def cos(u, v):
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    classes = sorted(set(labels.tolist()))
    pos = neg = 0.0
    for c in classes:
        if generated[c] is None:
            continue
        rows = [e for e, lab in zip(emb, labels) if lab == c]
        pos += (1 - min(cos(e, r) for e in rows for r in real[c])) * lp / len(classes)
        neg += max(cos(e, g) for e in rows for g in generated[c]) * ln / len(classes)
    return pos, neg


def test_minimax_terms_equal_a_numpy_loop_on_a_tiny_memory_bank():
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    labels = torch.tensor([0, 2, 2, 1, 0, 2, 1])
    real = [torch.randn(3, 5, dtype=torch.float64, generator=gen), None, torch.randn(4, 5, dtype=torch.float64, generator=gen)]
    generated = [torch.randn(2, 5, dtype=torch.float64, generator=gen), None, torch.randn(4, 5, dtype=torch.float64, generator=gen)]
    pos, neg = minimax_terms(emb, labels, real, generated, 0.002, 0.008)
    ref = _numpy_minimax(emb.numpy(), labels.numpy(), [None if r is None else r.numpy() for r in real],
                         [None if g is None else g.numpy() for g in generated], 0.002, 0.008)
    assert (float(pos), float(neg)) == pytest.approx(ref, rel=1e-12)
    # class 1 has an empty bank: it adds nothing but still divides by |C_B| = 3 (the official code)
    assert float(pos) < 0.002 * 2 / 3 * 2 + 1e-12
    # the memory is a per-class FIFO of the last `size` rows
    memory = MinimaxMemory(3, 3)
    for k in range(3):
        memory.update(torch.tensor([0, 0, 1]), torch.full((3, 2), float(k)) + torch.arange(3.0)[:, None],
                      -torch.full((3, 2), float(k)))
    assert memory.real[0][:, 0].tolist() == [2.0, 2.0, 3.0] and memory.real[1][:, 0].tolist() == [2.0, 3.0, 4.0]
    assert memory.generated[2] is None and memory.generated[0].shape == (3, 2)


def test_minimax_fine_tunes_resumes_and_any_ipc_is_sampled(small_digits, tmp_path, capsys):
    from ipmcondense.cli import main
    from ipmcondense.condensation.api import evaluate

    train_generator(small_digits, tmp_path / "ddpm", epochs=1, **TINY)
    kw = {"progress": False, "memory_size": 8}
    straight = minimax_finetune(small_digits, tmp_path / "ddpm", tmp_path / "mm", epochs=2, **kw)
    history = straight.metrics["history"]
    assert straight.metrics["distilled"] == "minimax" and len(history["loss_representativeness"]) == 2
    assert all(v > 0 for v in history["loss_representativeness"] + history["loss_diversity"])
    minimax_finetune(small_digits, tmp_path / "ddpm", tmp_path / "half", epochs=1, **kw)
    resumed = minimax_finetune(small_digits, tmp_path / "ddpm", tmp_path / "half", epochs=2, resume=True, **kw)
    for (k, v), v2 in zip(straight.generator.state_dict().items(), resumed.generator.state_dict().values()):
        assert torch.equal(v, v2), k
    # DiffFit: only biases, norms and the class embedding moved
    before, after = load_generator(tmp_path / "ddpm").state_dict(), straight.generator.state_dict()
    assert torch.equal(before["unet.inp.weight"], after["unet.inp.weight"])
    assert not torch.equal(before["unet.inp.bias"], after["unet.inp.bias"])
    assert not torch.equal(before["unet.class_embedding.weight"], after["unet.class_embedding.weight"])
    sizes = [evaluate(tmp_path / "mm", dataset=small_digits, models=1, epochs=1, ipc=k, save=False)["train_size"]
             for k in (1, 3)]
    assert sizes == [10, 30]
    with pytest.raises(ValueError, match="ipc"):
        evaluate(tmp_path / "mm", dataset=small_digits, models=1, epochs=1, ipc=0, save=False)
    assert main(["evaluate", str(tmp_path / "mm"), "--ipc", "2", "--models", "1", "--epochs", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["train_size"] == 20


def test_the_commands_train_and_fine_tune(tmp_path, capsys):
    from ipmcondense.cli import main

    assert main(["generator", "--kind", "diffusion", "--dataset", "digits", "--out", str(tmp_path / "g"), "--epochs",
                 "1", "--width", "8", "--timesteps", "20", "--sample-steps", "2", "--batch-size", "256",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "diffusion" and summary["epochs"] == 1
    assert main(["minimax", "--generator", str(tmp_path / "g"), "--dataset", "digits", "--out", str(tmp_path / "m"),
                 "--epochs", "1", "--memory-size", "4", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "minimax" and summary["quality"]["n_generated"] == 360


def test_bad_input_is_named(small_digits, tmp_path):
    from ipmcondense.generators import distill_into_generator

    with pytest.raises(ValueError, match="kind"):
        train_generator(small_digits, None, **{**TINY, "kind": "vae"}, epochs=1)
    for bad, match in (({"schedule": "quadratic"}, "schedule"), ({"sample_steps": 60}, "sample_steps"),
                       ({"class_dropout": 1.0}, "class_dropout"), ({"timesteps": 0}, "timesteps")):
        with pytest.raises(ValueError, match=match):
            train_generator(small_digits, None, epochs=1, **{**TINY, **bad})
    train_generator(small_digits, tmp_path / "gan", kind="gan", epochs=1, width=8, latent_dim=8, progress=False)
    with pytest.raises(ValueError, match="needs a diffusion generator"):
        minimax_finetune(small_digits, tmp_path / "gan", None, epochs=1, progress=False)
    train_generator(small_digits, tmp_path / "ddpm", epochs=1, **TINY)
    with pytest.raises(ValueError, match="DiM fine-tunes a GAN"):
        distill_into_generator(small_digits, tmp_path / "ddpm", None, epochs=1, progress=False)
    for bad, match in (({"trainable": "lora"}, "trainable"), ({"memory_size": 0}, "memory_size"),
                       ({"lambda_pos": -1.0}, "lambda_pos"), ({"epochs": 0}, "epochs")):
        with pytest.raises(ValueError, match=match):
            minimax_finetune(small_digits, tmp_path / "ddpm", None, progress=False, **bad)
    with pytest.raises(ValueError, match="sample_steps"):
        DiffusionGenerator(2, 1, (8, 8), timesteps=5, sample_steps=6)
