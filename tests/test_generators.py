"""The generators trained here (issue 18): shapes, training with atomic checkpoints and bit-for-bit resume,
loading, the user-generator check, and the random-ConvNet MMD quality score against numpy/scipy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, pdist
from torch import nn

from ipmcondense.data import LabelledImages, load_dataset
from ipmcondense.generators import (
    ConditionalDiscriminator,
    ConditionalGenerator,
    check_generator,
    load_generator,
    random_convnet_mmd2,
    train_generator,
    upsampling_plan,
)
from ipmcondense.nets import build_isolated, get_network

TINY = {"width": 8, "latent_dim": 8, "batch_size": 64, "progress": False}


@pytest.fixture(scope="module")
def small_digits():
    """300 training and 60 test digits: a GAN epoch in well under a second."""
    ds = load_dataset("digits")
    return LabelledImages(name="digits", train_images=ds.train_images[:300], train_labels=ds.train_labels[:300],
                          test_images=ds.test_images[:60], test_labels=ds.test_labels[:60], num_classes=10,
                          mean=ds.mean, std=ds.std, class_names=ds.class_names)


@pytest.mark.parametrize("size, plan", [((8, 8), (2, 2, 2)), ((28, 28), (7, 7, 2)), ((32, 32), (4, 4, 3))])
def test_generator_and_discriminator_are_sized_to_the_images(size, plan):
    assert upsampling_plan(size) == plan
    g = ConditionalGenerator(5, 3, 2, size, width=4, mean=(0.5, 0.1), std=(0.25, 2.0)).eval()
    y = torch.tensor([0, 2, 1, 2])
    x = g(torch.randn(4, 5), y)
    assert x.shape == (4, 2, *size)
    pixels = x * g.std + g.mean  # outputs live in the normalised space: denormalised they are sigmoid pixels
    assert bool((pixels > 0).all() and (pixels < 1).all())
    d = ConditionalDiscriminator(3, 2, size, width=4)
    assert d(x, y).shape == (4,)


def test_bad_sizes_and_arguments_are_named():
    with pytest.raises(ValueError, match="image_size 7x7"):
        upsampling_plan((7, 7))
    with pytest.raises(ValueError, match="latent_dim"):
        ConditionalGenerator(0, 3, 1, (8, 8))
    g = ConditionalGenerator(4, 3, 1, (8, 8), width=4)
    with pytest.raises(ValueError, match="z must have shape"):
        g(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


def test_training_writes_the_run_and_resume_is_bit_for_bit(small_digits, tmp_path):
    straight = train_generator(small_digits, tmp_path / "a", epochs=2, **TINY)
    for name in ("generator.pt", "checkpoint.pt", "samples.png", "metrics.json"):
        assert (tmp_path / "a" / name).exists()
    assert not list((tmp_path / "a").glob(".*tmp*"))  # atomic writes leave no temporary files
    assert (tmp_path / "a" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert len(metrics["history"]["loss_d"]) == 2 and metrics["epochs"] == 2
    assert set(metrics["quality"]) >= {"generated_vs_test_mmd2", "train_vs_test_mmd2", "embedding"}

    train_generator(small_digits, tmp_path / "b", epochs=1, **TINY)
    resumed = train_generator(small_digits, tmp_path / "b", epochs=2, resume=True, **TINY)
    for (k, v), (k2, v2) in zip(straight.generator.state_dict().items(), resumed.generator.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert metrics["history"]["loss_g"] == resumed.metrics["history"]["loss_g"]

    loaded = load_generator(tmp_path / "a")
    z, y = torch.randn(6, 8), torch.arange(6)
    assert torch.equal(loaded(z, y), straight.generator(z, y))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_run_directory_errors(small_digits, tmp_path):
    train_generator(small_digits, tmp_path / "run", epochs=1, **TINY)
    with pytest.raises(ValueError, match="already holds a generator run"):
        train_generator(small_digits, tmp_path / "run", epochs=1, **TINY)
    with pytest.raises(ValueError, match="settings differ.*width"):
        train_generator(small_digits, tmp_path / "run", epochs=2, resume=True, **{**TINY, "width": 16})
    with pytest.raises(ValueError, match="no generator checkpoint"):
        train_generator(small_digits, tmp_path / "empty", epochs=1, resume=True, **TINY)
    with pytest.raises(ValueError, match="epochs"):
        train_generator(small_digits, None, epochs=0, **TINY)
    with pytest.raises(ValueError, match="kind"):
        train_generator(small_digits, None, kind="vae", epochs=1, **TINY)
    with pytest.raises(FileNotFoundError, match="ipmcondense generator"):
        load_generator(tmp_path / "nothing")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="bad.pt"):
        load_generator(tmp_path / "bad.pt")


def test_user_generators_are_checked():
    class Linear(nn.Module):
        latent_dim = 3

        def __init__(self):
            super().__init__()
            self.map = nn.Linear(3 + 2, 4)

        def forward(self, z, labels):
            return self.map(torch.cat([z, nn.functional.one_hot(labels, 2).float()], 1)).view(-1, 1, 2, 2)

    g = Linear()
    assert check_generator(g, 2, (1, 2, 2)) is g
    with pytest.raises(ValueError, match=r"images \(2, 1, 3, 3\)"):
        check_generator(g, 2, (1, 3, 3))
    with pytest.raises(TypeError, match="nn.Module"):
        check_generator(lambda z, y: z, 2, (1, 2, 2))
    del Linear.latent_dim
    with pytest.raises(ValueError, match="latent_dim"):
        check_generator(g, 2, (1, 2, 2))


def test_quality_score_equals_an_independent_numpy_mmd():
    rng = torch.Generator().manual_seed(1)
    a = torch.randn(30, 1, 8, 8, generator=rng)
    b = torch.randn(25, 1, 8, 8, generator=rng) + 0.5
    net = build_isolated(lambda: get_network("convnet", 1, 10, (8, 8)), 0).eval()
    with torch.no_grad():
        fa, fb = net.embed(a).double().numpy(), net.embed(b).double().numpy()
    h = np.median(pdist(np.concatenate([fa, fb])))
    k = lambda u, v: np.exp(-cdist(u, v, "sqeuclidean") / (2 * h * h))  # noqa: E731
    kaa, kbb, kab = k(fa, fa), k(fb, fb), k(fa, fb)
    n, m = len(fa), len(fb)
    expected = ((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                - 2 * kab.mean())
    assert random_convnet_mmd2(a, b, 10) == pytest.approx(expected, rel=1e-6)
    # two halves of the real digits score far lower than digits against noise
    digits = load_dataset("digits").train_images
    noise_score = random_convnet_mmd2(digits[:100], a, 10)
    assert abs(random_convnet_mmd2(digits[:100], digits[100:200], 10)) < 0.1 * noise_score
    with pytest.raises(ValueError, match="same image shape"):
        random_convnet_mmd2(a, torch.randn(5, 1, 4, 4), 10)


# ------------------------------------------------------------------------------------------- DiM


def test_logit_matching_is_dims_mean_squared_log_softmax_gap():
    a, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)

    def log_softmax(v):
        v = v.numpy()
        return v - np.log(np.exp(v).sum(1, keepdims=True))

    expected = 0.01 * np.mean((log_softmax(a) - log_softmax(b)) ** 2)
    from ipmcondense.generators import logit_matching_loss

    assert float(logit_matching_loss(a, b)) == pytest.approx(expected, rel=1e-12)
    assert float(logit_matching_loss(a, a + 3.0)) == pytest.approx(0.0, abs=1e-12)  # shift-invariant, like softmax


def test_dim_fine_tunes_resumes_and_any_ipc_is_sampled(small_digits, tmp_path, capsys):
    from ipmcondense.cli import main
    from ipmcondense.condensation.api import evaluate
    from ipmcondense.generators import distill_into_generator

    train_generator(small_digits, tmp_path / "gan", epochs=1, **TINY)
    kw = {"match_train_steps": 1, "lr": 1e-3, "progress": False, "pool_archs": ("convnet-w32",)}
    straight = distill_into_generator(small_digits, tmp_path / "gan", tmp_path / "dim", epochs=2, **kw)
    assert straight.metrics["distilled"] == "dim" and len(straight.metrics["history"]["loss_match"]) == 2
    distill_into_generator(small_digits, tmp_path / "gan", tmp_path / "half", epochs=1, **kw)
    resumed = distill_into_generator(small_digits, tmp_path / "gan", tmp_path / "half", epochs=2, resume=True, **kw)
    for (k, v), v2 in zip(straight.generator.state_dict().items(), resumed.generator.state_dict().values()):
        assert torch.equal(v, v2), k
    assert not torch.equal(straight.generator.fc.weight, load_generator(tmp_path / "gan").fc.weight)
    assert all(v > 0 for v in straight.metrics["history"]["loss_match"])
    # the sample count is free: any ipc is drawn from the distilled generator
    sizes = [evaluate(tmp_path / "dim", dataset=small_digits, models=1, epochs=1, ipc=k, save=False)["train_size"]
             for k in (1, 7)]
    assert sizes == [10, 70]
    with pytest.raises(ValueError, match="pass ipc"):
        evaluate(tmp_path / "dim", dataset=small_digits, models=1, epochs=1)
    with pytest.raises(ValueError, match="has no checkpoint.pt"):
        (tmp_path / "bare").mkdir()
        (tmp_path / "bare" / "generator.pt").write_bytes((tmp_path / "gan" / "generator.pt").read_bytes())
        distill_into_generator(small_digits, tmp_path / "bare", None, epochs=1, **kw)
    assert main(["evaluate", str(tmp_path / "dim"), "--ipc", "2", "--models", "1", "--epochs", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["train_size"] == 20
