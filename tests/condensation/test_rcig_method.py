"""The ``rcig`` row is RCIG's algorithm (Loo et al. ICML'23, yolky/RCIG): a pool trained online on S and reset,
a linearised network with a KRR last layer, learned labels and temperature, the clipped implicit gradient."""

import numpy as np
import pytest
import torch

import ipmcondense.condensation.objectives.bilevel as bilevel
from ipmcondense.autodiff import load_flat_parameters
from ipmcondense.condensation.api import condense
from ipmcondense.condensation.objectives import ImplicitBilevelObjective
from ipmcondense.condensation.objectives.base import draw_network
from ipmcondense.condensation.objectives.bilevel import rcig_inner_loss
from ipmcondense.ipm.kernel_regression import centred_one_hot

TINY = dict(arch="convnet-w32", ipc=1, seed=0, progress=False, batch_real=4, rcig_pool_models=2, rcig_inner_steps=2, rcig_hinv_steps=2)


@pytest.fixture
def captured(monkeypatch):
    """The objectives the runs build, with a copy of their initial pool."""
    built = []
    original = ImplicitBilevelObjective.__init__

    def init(self, ctx):
        original(self, ctx)
        self.initial_pool = self.pool_params.clone()
        built.append(self)

    monkeypatch.setattr(ImplicitBilevelObjective, "__init__", init)
    return built


def test_inner_loss_is_the_krr_self_fit_with_weight_decay_against_numpy():
    g = torch.Generator().manual_seed(0)
    feat, out = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    labels, tangent = torch.randn(6, 3, generator=g), torch.randn(5, generator=g)
    l2 = 0.3
    f, o, y, t = (a.double().numpy() for a in (feat, out, labels, tangent))
    k = f @ f.T
    w = np.linalg.solve(k + l2 * np.eye(6), y - o)
    reference = (0.5 * np.sum((y - o - k @ w) ** 2) + 0.5 * l2 * (np.trace(w.T @ k @ w) + t @ t)) / 18
    np.testing.assert_allclose(float(rcig_inner_loss(feat, out, labels, tangent, l2)), reference, rtol=1e-12)


def test_linearisation_is_exact_at_zero_and_leaves_the_classifier_weight_to_the_krr_head(captured):
    condense("rcig", "digits", iterations=0, **TINY)
    obj = captured[0]
    net = obj.template
    free = obj.tangent_index.numel()
    assert free == obj.layout.numel - net.classifier.weight.numel()
    x = obj.ctx.synthetic.images().detach()
    feat, out = obj.linearised_features_and_outputs(obj.pool_params[0], torch.zeros(free), x)
    load_flat_parameters(net, obj.pool_params[0])
    torch.testing.assert_close(feat, net.embed(x).reshape(x.shape[0], -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out, net(x), rtol=0, atol=1e-6)


def test_pool_model_takes_adam_steps_on_the_synthetic_mse_and_is_reset_after_the_interval(captured):
    condense("rcig", "digits", iterations=0, **{**TINY, "rcig_online_lr": 1e-3})
    obj = captured[0]
    obj.template.double()  # float64, so that Adam's normalisation of near-zero gradients is not float noise
    obj.pool_params, obj.pool_exp_avg, obj.pool_exp_avg_sq = (
        t.double() for t in (obj.pool_params, obj.pool_exp_avg, obj.pool_exp_avg_sq))
    x = obj.ctx.synthetic.images().detach().double()
    y = centred_one_hot(obj.ctx.synthetic.labels, 10, torch.float64) + 0.1
    start = obj.pool_params[1].clone()
    steps = obj.train_pool_model(1, x, y)
    assert 1 <= steps <= 15
    # reference: torch.optim.Adam on a network holding the pool weights
    net = obj.template
    load_flat_parameters(net, start)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((net(x) - y) ** 2).sum() / y.numel()).backward()
        opt.step()
    reference = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(obj.pool_params[1], reference, rtol=1e-9, atol=1e-12)
    assert int(obj.pool_steps[1]) == steps and not torch.equal(obj.pool_params[1], start)
    # the interval reached: a fresh initialisation from the run's generator, moments and counter cleared
    obj.pool_steps[1] = 99
    state = obj.ctx.generator.get_state()
    obj.train_pool_model(1, x, y)
    obj.ctx.generator.set_state(state)
    torch.randint(1, 16, (1,), generator=obj.ctx.generator)
    fresh = torch.cat([p.detach().reshape(-1) for p in draw_network(obj.ctx).parameters()]).double()
    torch.testing.assert_close(obj.pool_params[1], fresh, rtol=0, atol=0)
    assert int(obj.pool_steps[1]) == 0 and not obj.pool_exp_avg[1].any() and not obj.pool_exp_avg_sq[1].any()


def test_a_run_trains_the_pool_online_and_learns_labels_and_temperature(captured):
    result = condense("rcig", "digits", iterations=3, **TINY)
    obj = captured[0]
    moved = [i for i in range(2) if not torch.equal(obj.pool_params[i], obj.initial_pool[i])]
    assert moved and all(int(obj.pool_steps[i]) > 0 for i in moved)
    assert float(obj.log_temperature.detach()) != 0.0
    learned = obj.ctx.synthetic.label_values.detach()
    assert learned.shape == (10, 10) and not torch.allclose(learned, centred_one_hot(result.labels, 10))


def test_the_implicit_gradient_is_used_and_clipped_to_the_direct_gradients_norm(monkeypatch):
    original = bilevel.implicit_hypergradient

    def run(scale):
        def scaled(*args, **kwargs):
            value, grads = original(*args, **kwargs)
            return value, [None if g is None else g * scale for g in grads]

        monkeypatch.setattr(bilevel, "implicit_hypergradient", scaled)
        return condense("rcig", "digits", iterations=2, **TINY)

    plain, huge, without = run(1.0), run(1e6), run(0.0)
    # here the implicit part is larger than the direct one, so clipping makes a 1e6 scale change nothing
    torch.testing.assert_close(huge.images, plain.images, rtol=1e-4, atol=1e-5)
    assert float((without.images - plain.images).abs().max()) > 1e-5


def test_resume_is_bit_for_bit_with_the_pool_in_the_checkpoint(tmp_path):
    kwargs = dict(TINY, checkpoint_every=1, rcig_reset_interval=3)
    straight = condense("rcig", "digits", iterations=4, out=tmp_path / "a", **kwargs)
    condense("rcig", "digits", iterations=2, out=tmp_path / "b", **kwargs)
    resumed = condense("rcig", "digits", iterations=4, out=tmp_path / "b", resume=True, **kwargs)
    assert torch.equal(straight.images, resumed.images)
    assert straight.metrics["loss_history"] == resumed.metrics["loss_history"]


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="rcig_pool_models"):
        condense("rcig", "digits", iterations=1, **{**TINY, "rcig_pool_models": 0})
