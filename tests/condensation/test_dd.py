"""DD as SsnL/dataset-distillation: its own synthetic batch per unrolled step, several epochs of learned step
sizes, Adam betas (0.5, 0.999), and an evaluation that replays the learned schedule."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ipmcondense.autodiff import flatten_parameters
from ipmcondense.condensation.api import condense, evaluate
from ipmcondense.condensation.engine import build_optimizer
from ipmcondense.condensation.objectives import unrolled_task_loss
from ipmcondense.condensation.objectives.bilevel import dd_step_batches
from ipmcondense.condensation.recipes import get_recipe, resolve_config
from ipmcondense.evaluation import EvaluationProtocol, LearnedSchedule, build_network, train_network


def test_the_set_is_dealt_into_one_class_balanced_batch_per_step():
    labels = torch.arange(3).repeat_interleave(4)  # 3 classes x 4 images
    assert [b.tolist() for b in dd_step_batches(labels, 4)] == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]
    assert [b.tolist() for b in dd_step_batches(labels, 2)] == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]
    # fewer images than steps: the images are reused in turn
    assert [b.tolist() for b in dd_step_batches(labels, 6)][4:] == [[0, 4, 8], [1, 5, 9]]


def test_the_row_is_10_steps_x_3_epochs_with_adam_betas_half():
    row = get_recipe("dd")
    assert (row.defaults["dd_steps"], row.defaults["dd_epochs"]) == (10, 3)
    config = resolve_config(row, "mnist")
    param = nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([{"params": [param], "lr": 0.01}], config)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["betas"] == (0.5, 0.999)
    with pytest.raises(ValueError, match="adam_betas"):
        build_optimizer([{"params": [param], "lr": 0.01}], {**config, "adam_betas": (0.5,)})


def test_each_unrolled_step_trains_on_its_own_batch_with_its_own_step_size():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    start = flatten_parameters(net)
    x = torch.randn(4, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    batches = dd_step_batches(y, 2)
    steps = [batches[t % 2] for t in range(6)]  # 2 batches x 3 epochs
    raw = torch.linspace(-1.0, 0.5, 6, dtype=torch.float64)
    xt, yt = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 2, (7,))
    got = unrolled_task_loss(net, start, x, y, raw, xt, yt, step_batches=steps)
    # independent reference: the plain loop on a copy of the network
    ref = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    ref.load_state_dict(net.state_dict())
    for t in range(6):
        idx = [[0, 2], [1, 3]][t % 2]
        grads = torch.autograd.grad(F.cross_entropy(ref(x[idx]), y[idx]), list(ref.parameters()))
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads):
                p -= F.softplus(raw[t]) * g
    expected = F.cross_entropy(ref(xt), yt)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # the former full-batch unroll is a different function
    full = unrolled_task_loss(net, start, x, y, raw, xt, yt)
    assert abs(float(full.detach()) - float(expected.detach())) > 1e-6


def test_the_evaluation_replays_the_learned_schedule(digits):
    images, labels = digits.train_images[:6], digits.train_labels[:6]
    schedule = LearnedSchedule(batches=((0, 1, 2), (3, 4, 5), (0, 1, 2)), step_sizes=(0.3, 0.1, 0.2))
    protocol = EvaluationProtocol(arch="mlp", learned_schedule=schedule)
    net = build_network(protocol, digits, seed=5)
    reference = build_network(protocol, digits, seed=5)
    train_network(net, images, labels, protocol, torch.Generator().manual_seed(0))
    for batch, eta in zip(schedule.batches, schedule.step_sizes):  # plain gradient steps, nothing else
        idx = list(batch)
        grads = torch.autograd.grad(F.cross_entropy(reference(images[idx]), labels[idx]), list(reference.parameters()))
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads):
                p -= eta * g
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="one batch per step size"):
        LearnedSchedule(batches=((0,),), step_sizes=(0.1, 0.2))
    with pytest.raises(ValueError, match="step size must be positive"):
        LearnedSchedule(batches=((0,),), step_sizes=(-0.1,))


def test_a_dd_run_saves_its_schedule_and_evaluate_replays_it(tmp_path):
    kwargs = dict(ipc=2, iterations=2, batch_real=8, dd_steps=2, dd_epochs=3, progress=False, seed=0, arch="mlp")
    result = condense("dd", "digits", out=tmp_path / "dd", **kwargs)
    schedule = result.learned_schedule
    assert len(schedule.step_sizes) == 6 and schedule.batches[0] == schedule.batches[2] != schedule.batches[1]
    assert len({round(v, 9) for v in schedule.step_sizes}) > 1  # one learned rate per step, not one shared
    report = evaluate(tmp_path / "dd", models=1, save=False)
    assert list(report["protocol"]["learned_schedule"]["step_sizes"]) == list(schedule.step_sizes)
    plain = evaluate(tmp_path / "dd", models=1, save=False, learned_lr=False, epochs=1)
    assert plain["protocol"]["learned_schedule"] is None
