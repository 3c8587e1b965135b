"""The 'mtt' objective in the engine: expert buffers, zero loss on the expert's own path, first order, resume, CLI."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from ipmcondense.cli import main
from ipmcondense.condensation.api import condense, evaluate
from ipmcondense.condensation.engine import CondensationEngine
from ipmcondense.condensation.objectives import TrajectoryMatchingObjective
from ipmcondense.condensation.recipes import FIRST_ORDER, RECIPES, get_recipe, resolve_config
from ipmcondense.data import load_dataset
from ipmcondense.condensation.objectives import trajectory_matching_loss
from ipmcondense.trajectories import ExpertSample, train_experts

ARCH = "convnet-w32"
MTT = {"arch": ARCH, "max_start_epoch": 2, "expert_epochs": 1, "syn_steps": 3, "lr_images": 10.0}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def buffer_dir(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("experts")
    train_experts(digits, 2, 3, out, arch=ARCH, progress=False, seed=0)
    return out


def _engine(digits, buffer_dir, ipc=1, augmentation="none", **overrides):
    recipe = dataclasses.replace(get_recipe("mtt"), augmentation=augmentation)
    config = resolve_config(recipe, "digits", {**MTT, "experts": str(buffer_dir), **overrides})
    config = TrajectoryMatchingObjective.prepare_config(config, digits)
    g = torch.Generator().manual_seed(0)
    from ipmcondense.condensation.synthetic import build_synthetic_set, initial_images

    images, labels = initial_images(digits, ipc, "real", g)
    extras = TrajectoryMatchingObjective.synthetic_extras(images, labels, digits, config)
    synthetic = build_synthetic_set("pixels", images, labels, digits.num_classes, config, extras)
    return CondensationEngine(recipe, config, digits, synthetic, lambda: None, seed=0, device=torch.device("cpu"),
                              progress=False)


def _params(engine):
    return [p for g in engine.optimizer.param_groups for p in g["params"]]


def _sgd_path(engine, start, lr, steps):
    """Full-batch SGD on the synthetic set, written independently of trajectories.unrolled_sgd."""
    net = engine.objective.template
    x, y = engine.synthetic.images().detach(), engine.synthetic.labels
    theta = start.clone()
    from ipmcondense.autodiff import load_flat_parameters

    for _ in range(steps):
        load_flat_parameters(net, theta)
        loss = F.cross_entropy(net(x), y)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        theta = theta - lr * torch.cat([g.flatten() for g in grads])
    return theta


def test_loss_is_zero_when_the_student_follows_the_expert(digits, buffer_dir):
    engine = _engine(digits, buffer_dir)
    start = engine.objective.buffer.snapshot(0, 0)
    target = _sgd_path(engine, start, float(engine.synthetic.learning_rate.detach()), 3)
    engine.objective.buffer.sample = lambda *a, **k: ExpertSample(0, 0, start, target)
    loss, grads = engine.objective.loss_and_gradients([], _params(engine))
    assert float(loss) < 1e-9
    # anywhere else on the expert path it is positive
    engine.objective.buffer.sample = lambda *a, **k: ExpertSample(0, 0, start, engine.objective.buffer.snapshot(0, 1))
    assert float(engine.objective.loss_and_gradients([], _params(engine))[0]) > 1e-3


@pytest.mark.parametrize("memory_lean", [False, True])
def test_first_order_is_accumulated_gradient_matching(digits, buffer_dir, memory_lean):
    """As lr -> 0 the MTT loss against an expert that moved along the real gradient tends to
    ||g_S - g_T||^2 / ||g_T||^2 (normalised gradient matching, accumulated over the N steps)."""
    engine = _engine(digits, buffer_dir, memory_lean=memory_lean)
    net = engine.objective.template
    start = engine.objective.buffer.snapshot(0, 1)
    real, rl = engine.real_batches.sample(8)

    def grad_at(x, y):
        from ipmcondense.autodiff import load_flat_parameters

        load_flat_parameters(net, start)
        return torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))])

    g_t = grad_at(real, rl)
    g_s = grad_at(engine.synthetic.images().detach(), engine.synthetic.labels)
    expected = float(((g_s - g_t) ** 2).sum() / (g_t**2).sum())
    errors = []
    for lr in (1e-2, 1e-3, 1e-4):
        with torch.no_grad():
            engine.synthetic.learning_rate.fill_(lr)
        target = start - lr * 3 * g_t
        engine.objective.buffer.sample = lambda *a, t=target, **k: ExpertSample(0, 1, start, t)
        loss, _ = engine.objective.loss_and_gradients([], _params(engine))
        errors.append(abs(float(loss) - expected) / expected)
    assert errors[2] < errors[0] and errors[2] < 0.02


def test_memory_lean_gives_the_same_gradients(digits, buffer_dir):
    grads = []
    for lean in (False, True):
        engine = _engine(digits, buffer_dir, ipc=2, augmentation="dsa", memory_lean=lean, soft_labels=True)
        engine.generator.manual_seed(5)
        loss, g = engine.objective.loss_and_gradients([], _params(engine))
        grads.append((loss, g))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-6)


@pytest.mark.slow
def test_runs_end_to_end_learns_lr_and_decreases_the_loss(digits, buffer_dir, tmp_path):
    kwargs = dict(ipc=2, progress=False, seed=1, experts=buffer_dir, **MTT)
    before = condense("mtt", "digits", iterations=0, **kwargs)
    after = condense("mtt", "digits", iterations=8, out=tmp_path / "run", **kwargs)
    assert not torch.equal(before.images, after.images)
    assert after.learning_rate is not None and after.learning_rate != pytest.approx(0.01, rel=1e-9)
    saved = torch.load(tmp_path / "run" / "synthetic.pt", weights_only=False)
    assert saved["learning_rate"] == pytest.approx(after.learning_rate)

    engine = _engine(digits, buffer_dir, ipc=2, augmentation="dsa")
    buffer = engine.objective.buffer

    def fixed_loss(result):
        from ipmcondense.autodiff import unrolled_sgd

        total = 0.0
        for k in range(2):
            for t in range(2):
                end = unrolled_sgd(engine.objective.template, buffer.snapshot(k, t), result.images, result.labels,
                                   result.learning_rate or 0.01, 3, create_graph=False)
                total += float(trajectory_matching_loss(end, buffer.snapshot(k, t), buffer.snapshot(k, t + 1)))
        return total

    assert fixed_loss(after) < fixed_loss(before)
    report = evaluate(tmp_path / "run", models=1, epochs=2, save=False)
    assert report["protocol"]["learned_lr"] == pytest.approx(after.learning_rate)
    assert evaluate(tmp_path / "run", models=1, epochs=2, save=False, learned_lr=False)["protocol"]["learned_lr"] is None


def test_soft_labels_are_learned_and_used_for_evaluation(digits, buffer_dir):
    result = condense("mtt", "digits", ipc=1, iterations=2, progress=False, experts=buffer_dir, soft_labels=True,
                      lr_labels=10.0, **MTT)
    assert result.training_labels.shape == (10, 10)
    torch.testing.assert_close(result.training_labels.sum(1), torch.ones(10))
    assert evaluate(result, models=1, epochs=1, save=False)["protocol"]["soft_labels"] is True


@pytest.mark.slow
def test_resume_is_bit_for_bit(buffer_dir, tmp_path):
    kwargs = dict(ipc=1, seed=3, progress=False, experts=buffer_dir, checkpoint_every=1, **MTT)
    straight = condense("mtt", "digits", iterations=4, out=tmp_path / "a", **kwargs)
    condense("mtt", "digits", iterations=2, out=tmp_path / "b", **kwargs)
    resumed = condense("mtt", "digits", iterations=4, out=tmp_path / "b", resume=True, **kwargs)
    assert torch.equal(straight.images, resumed.images)
    assert straight.learning_rate == resumed.learning_rate
    assert straight.metrics["loss_history"] == resumed.metrics["loss_history"]


def test_missing_and_mismatched_buffers_are_clear_errors(buffer_dir, tmp_path):
    with pytest.raises(ValueError, match="needs an expert buffer.*ipmcondense experts --dataset digits"):
        condense("mtt", "digits", ipc=1, iterations=1, out=tmp_path / "x", progress=False, arch=ARCH)
    with pytest.raises(ValueError, match="no expert buffer.*ipmcondense experts"):
        condense("mtt", "digits", ipc=1, iterations=1, out=tmp_path / "x", progress=False, arch=ARCH,
                 experts=tmp_path / "nothing")
    with pytest.raises(ValueError, match="arch 'convnet-w32' \\(buffer\\) vs 'convnet'"):
        condense("mtt", "digits", ipc=1, iterations=1, out=tmp_path / "x", progress=False, experts=buffer_dir,
                 arch="convnet")
    with pytest.raises(ValueError, match="max_start_epoch"):
        condense("mtt", "digits", ipc=1, iterations=1, out=tmp_path / "x", progress=False,
                 **{**MTT, "max_start_epoch": 3, "expert_epochs": 2}, experts=buffer_dir)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_non_finite_learned_lr_is_a_clear_error_and_the_checkpoint_is_kept(buffer_dir, tmp_path, monkeypatch):
    kwargs = dict(ipc=1, seed=4, progress=False, experts=buffer_dir, checkpoint_every=1, **MTT)
    straight = condense("mtt", "digits", iterations=4, out=tmp_path / "a", **kwargs)
    original = TrajectoryMatchingObjective.loss_and_gradients
    calls = []

    def poisoned(self, networks, params):
        loss, grads = original(self, networks, params)
        calls.append(1)
        if len(calls) == 3:
            grads = [g if p is not self.ctx.synthetic.learning_rate else torch.full_like(g, float("nan"))
                     for g, p in zip(grads, params)]
        return loss, grads

    monkeypatch.setattr(TrajectoryMatchingObjective, "loss_and_gradients", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite.*checkpoint"):
        condense("mtt", "digits", iterations=4, out=tmp_path / "b", **kwargs)
    monkeypatch.setattr(TrajectoryMatchingObjective, "loss_and_gradients", original)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["iteration"] == 2
    resumed = condense("mtt", "digits", iterations=4, out=tmp_path / "b", resume=True, **kwargs)
    assert torch.equal(resumed.images, straight.images)

    engine_lr = torch.nn.Parameter(torch.tensor(float("inf")))
    objective = TrajectoryMatchingObjective.__new__(TrajectoryMatchingObjective)
    objective.config = {"lr_lr": 1e-5}
    objective.ctx = type("C", (), {"synthetic": type("S", (), {"learning_rate": engine_lr})})
    with pytest.raises(FloatingPointError, match="learned synthetic learning rate became inf"):
        objective.check_after_step(7)


def test_registry_row_and_cli(buffer_dir, tmp_path, capsys):
    row = RECIPES["mtt"]
    assert row.objective == "mtt" and row.relation_to_ipm == FIRST_ORDER and "accumulated gradient" in row.why
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name in ("mtt", "kip", "rfad", "dd", "rcig", "lcmat"):
        assert name in rows and rows[name]["relation_to_ipm"] and rows[name]["objective"]
    out = tmp_path / "cli-mtt"
    argv = ["condense", "--method", "mtt", "--ipc", "1", "--out", str(out), "--iterations", "2", "--no-progress",
            "--arch", ARCH, "--set", "max_start_epoch=2", "--set", "syn_steps=2"]
    assert main(argv + ["--experts", str(buffer_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "mtt"
    assert (out / "synthetic.pt").exists()
    code = main(["condense", "--method", "mtt", "--ipc", "1", "--out", str(tmp_path / "other"), "--arch", ARCH,
                 "--no-progress"])
    assert code == 2 and "--experts DIR" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
