"""ZCA whitening through condensation, expert training and evaluation; MTT's per-setting table (issue 11 item 4)."""

import json

import numpy as np
import pytest
import torch

import ipmcondense.evaluation as evaluation
from ipmcondense.condensation.api import condense, evaluate
from ipmcondense.condensation.recipes import get_recipe, resolve_config
from ipmcondense.evaluation import EvaluationProtocol, evaluate_synthetic
from ipmcondense.trajectories import ExpertBuffer, train_experts
from ipmcondense.whitening import DatasetWhitening

# ------------------------------------------------------------------ MTT's per-setting table, as the authors give it
# DC-BENCH methods/tm/readme.md ("All the sota parameters are provided by the author"), one command per setting:
# (dataset, ipc): (syn_steps, expert_epochs, max_start_epoch, lr_img, lr_lr, lr_teacher, --zca, batch_syn)
MTT_COMMANDS = {
    ("cifar10", 1): (50, 2, 2, 100.0, 1e-7, 0.01, True, None),
    ("cifar10", 10): (30, 2, 20, 100.0, 1e-5, 0.001, True, None),
    ("cifar10", 50): (30, 2, 40, 1000.0, 1e-5, 0.001, False, None),
    ("cifar100", 1): (20, 3, 20, 1000.0, 1e-5, 0.01, True, None),
    ("cifar100", 10): (20, 2, 20, 1000.0, 1e-5, 0.01, False, None),
    ("cifar100", 50): (80, 2, 40, 1000.0, 1e-5, 0.01, True, 125),
}


@pytest.mark.parametrize(("dataset", "ipc"), sorted(MTT_COMMANDS))
def test_mtt_rows_are_the_authors_commands(dataset, ipc):
    syn_steps, expert_epochs, max_start, lr_img, lr_lr, lr_teacher, zca, batch_syn = MTT_COMMANDS[(dataset, ipc)]
    config = resolve_config(get_recipe("mtt"), dataset, ipc=ipc)
    assert config["syn_steps"] == syn_steps and config["expert_epochs"] == expert_epochs
    assert config["max_start_epoch"] == max_start
    assert config["lr_images"] == lr_img and config["lr_lr"] == lr_lr and config["lr_teacher"] == lr_teacher
    assert config["zca"] is zca and config["zca_eps"] == 0.1
    assert config["batch_syn"] == batch_syn
    assert config["momentum_images"] == 0.5  # distill.py: SGD(image_syn, momentum=0.5)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_rfad_and_rcig_whiten_cifar_and_nothing_else_does(dataset):
    for method in ("rfad", "rcig"):
        assert resolve_config(get_recipe(method), dataset, ipc=10)["zca"] is True
    for method in ("dm", "dc", "kip"):
        assert resolve_config(get_recipe(method), dataset, ipc=10)["zca"] is False
    for other in ("digits", "mnist", "fashion-mnist"):
        for method in ("mtt", "rfad", "rcig"):
            assert resolve_config(get_recipe(method), other, ipc=10)["zca"] is False


# ----------------------------------------------------------------------------------- the whitening itself
def _pixels(digits):
    return (digits.train_images * torch.tensor(digits.std).view(-1, 1, 1) + torch.tensor(digits.mean).view(-1, 1, 1))


@pytest.mark.parametrize("eps", [0.1, 1e-9])
def test_whitened_training_set_has_identity_covariance_up_to_eps(digits, eps):
    whitening = DatasetWhitening(digits, eps)
    white = whitening.transform(digits.train_images.double()).reshape(len(digits.train_images), -1).numpy()
    # independent reference: numpy eigh of the pixel-scale covariance (divisor N - 1, as kornia)
    pixels = _pixels(digits).double().reshape(len(digits.train_images), -1).numpy()
    lam, u = np.linalg.eigh(np.cov(pixels, rowvar=False))
    lam = np.clip(lam, 0.0, None)
    expected = (u * (lam / (lam + eps))) @ u.T
    np.testing.assert_allclose(np.cov(white, rowvar=False), expected, atol=1e-6)
    np.testing.assert_allclose(white.mean(axis=0), 0.0, atol=1e-6)
    if eps < 1e-6:
        # identity on the span of the data (digits has constant border pixels: zero-variance directions stay 0)
        support = lam > 1e-6
        projector = u[:, support] @ u[:, support].T
        np.testing.assert_allclose(np.cov(white, rowvar=False), projector, atol=1e-3)
    # the map is ZCA: symmetric, so whitened digits stay close to the originals (vs any rotated whitening)
    w = whitening.zca.whitening.numpy()
    np.testing.assert_allclose(w, w.T, atol=1e-10)
    back = whitening.to_pixels(whitening.transform(digits.train_images[:5]))
    torch.testing.assert_close(back, _pixels(digits)[:5], atol=1e-5, rtol=1e-5)


def test_whitened_dataset_keeps_labels_and_whitens_both_splits(digits):
    whitening = DatasetWhitening(digits, 0.1)
    white = whitening.whitened_dataset(digits)
    assert white.name == digits.name and torch.equal(white.train_labels, digits.train_labels)
    torch.testing.assert_close(white.test_images, whitening.transform(digits.test_images))
    assert white.mean == (0.0,) and white.std == (1.0,)
    with pytest.raises(ValueError, match="eps"):
        DatasetWhitening(digits, 0.0)


# ------------------------------------------------------------------------- condensation and evaluation
def test_condensation_runs_in_the_whitened_space(digits):
    plain = condense("random", "digits", ipc=2, progress=False, seed=3)
    white = condense("random", "digits", ipc=2, progress=False, seed=3, zca=True)
    assert white.config["zca"] is True and white.config["zca_eps"] == 0.1
    torch.testing.assert_close(white.images, DatasetWhitening(digits, 0.1).transform(plain.images))


def test_evaluation_is_told_the_inputs_are_whitened(digits, tmp_path, monkeypatch):
    seen = []
    real = evaluation._train_and_test_prepared

    def spy(images, labels, test_images, test_labels, dataset, protocol, seed, callback):
        seen.append((images.clone(), test_images.clone(), protocol))
        return real(images, labels, test_images, test_labels, dataset, protocol, seed, callback)

    monkeypatch.setattr(evaluation, "_train_and_test_prepared", spy)
    result = condense("dm", "digits", ipc=1, iterations=1, progress=False, zca=True, eval_every=1, eval_epochs=0,
                      out=tmp_path / "run", batch_real=8)
    report = evaluate(tmp_path / "run", models=1, epochs=0, save=False)
    assert report["protocol"]["zca"] is True and report["protocol"]["zca_eps"] == 0.1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]
    assert saved["zca"] is True
    whitened_test = DatasetWhitening(digits, 0.1).transform(digits.test_images)
    assert len(seen) == 2  # the in-run evaluation and evaluate()
    for images, test_images, protocol in seen:
        assert protocol.zca
        torch.testing.assert_close(test_images, whitened_test)  # the test set whitened once, consistently
    torch.testing.assert_close(seen[1][0], result.images)  # the whitened synthetic set, not whitened twice


def test_evaluate_synthetic_whitens_plain_inputs_once(digits, monkeypatch):
    seen = []
    real = evaluation._train_and_test_prepared
    monkeypatch.setattr(evaluation, "_train_and_test_prepared",
                        lambda x, *a: seen.append(x.clone()) or real(x, *a))
    x, y = digits.train_images[:20], digits.train_labels[:20]
    protocol = EvaluationProtocol(arch="convnet-d2", epochs=0, zca=True)
    whitening = DatasetWhitening(digits, 0.1)
    evaluate_synthetic(x, y, digits, protocol, n_models=1)
    evaluate_synthetic(whitening.transform(x), y, digits, protocol, n_models=1, inputs_whitened=True,
                       whitening=whitening)
    torch.testing.assert_close(seen[0], whitening.transform(x))
    torch.testing.assert_close(seen[1], seen[0])
    with pytest.raises(ValueError, match="zca_eps"):
        evaluate_synthetic(x, y, digits, EvaluationProtocol(arch="convnet-d2", epochs=0, zca=True, zca_eps=0.5),
                           n_models=1, whitening=whitening)


def test_bad_zca_options_are_named(digits):
    with pytest.raises(TypeError, match="zca"):
        condense("random", "digits", ipc=1, progress=False, zca="yes")
    with pytest.raises(ValueError, match="zca_eps"):
        condense("random", "digits", ipc=1, progress=False, zca=True, zca_eps=-1.0)


# ------------------------------------------------------------------------------------ experts and MTT
@pytest.fixture(scope="module")
def whitened_buffer(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("zca-experts")
    train_experts(digits, 1, 1, out, arch="mlp", progress=False, seed=0, zca_eps=0.1, augment=False)
    return out


def test_experts_train_on_whitened_data_and_mtt_checks_it(digits, whitened_buffer, tmp_path):
    buffer = ExpertBuffer(whitened_buffer)
    assert buffer.zca_eps == 0.1
    # the expert's first epoch from the same seed differs from one trained on plain data
    plain_dir = tmp_path / "plain"
    train_experts(digits, 1, 1, plain_dir, arch="mlp", progress=False, seed=0, augment=False)
    plain = ExpertBuffer(plain_dir)
    assert plain.zca_eps is None
    assert torch.equal(buffer.snapshot(0, 0), plain.snapshot(0, 0))  # same initialisation
    assert not torch.allclose(buffer.snapshot(0, 1), plain.snapshot(0, 1))
    mtt = dict(arch="mlp", max_start_epoch=1, expert_epochs=1, syn_steps=2, lr_images=10.0, ipc=1,
               progress=False)
    result = condense("mtt", "digits", iterations=1, experts=whitened_buffer, zca=True, **mtt)
    assert result.config["zca"] is True
    with pytest.raises(ValueError, match="--zca"):
        condense("mtt", "digits", iterations=1, experts=plain_dir, zca=True, **mtt)
    with pytest.raises(ValueError, match="ZCA-whitened data"):
        condense("mtt", "digits", iterations=1, experts=whitened_buffer, **mtt)


def test_experts_take_a_whitening_fitted_elsewhere(digits, tmp_path):
    whitening = DatasetWhitening(digits, 0.1)  # e.g. fitted on the full set while the experts see a subset
    with pytest.raises(ValueError, match="zca_eps"):
        train_experts(digits, 1, 1, tmp_path / "x", arch="mlp", progress=False, zca_eps=0.5, whitening=whitening)


def test_benchmark_grid_trains_whitened_experts_for_whitened_mtt_cells():
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from grid.plan import plan_cells
        from grid.profiles import Profile
    finally:
        sys.path.remove(str(root / "benchmarks"))
    profile = Profile(name="t", description="", experts={"*": {"n_experts": 1, "epochs": 2}})
    cells = {c.ipc: c for c in plan_cells(profile, ["cifar10"], [1, 50], ["mtt"], upper_bound=False,
                                          dataset_cache={"cifar10": (None, None)})}
    assert cells[1].experts["zca_eps"] == 0.1 and cells[1].key["hyperparameters"]["zca"] is True
    assert "zca_eps" not in cells[50].experts  # DC-BENCH's IPC 50 command has no --zca
