"""Parameter samplers: options from the flat table, DC's loop table, seeded draws, pool state."""

import pytest
import torch
from torch import nn

from ipmcondense.condensation.recipes import get_recipe, resolve_config
from ipmcondense.nets import build_isolated, draw_seed

from ipmcondense.condensation.samplers import (
    SAMPLER_NAMES,
    SAMPLERS,
    FreshInnerSampler,
    ACCURACY_METER_ATTRIBUTE,
    PoolSampler,
    SamplerContext,
    dc_loops,
    get_sampler,
)


def _ctx(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(2).repeat_interleave(4)
    images = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))

    class _Batches:
        def sample(self, n):
            return images[: 2 * n], labels[: 2 * n]

    return SamplerContext(build_network=lambda: nn.Linear(3, 2), device=torch.device("cpu"), generator=g,
                          real_batches=_Batches(), augmentation=lambda x, generator=None: x,
                          synthetic=lambda: (images, labels), parameter_gradients=False)


def test_registry_and_dc_loop_defaults():
    assert SAMPLER_NAMES == ("fresh", "fresh_inner", "pool", "fresh_watched", "pretrained", "none")
    s = SAMPLERS.get("fresh_inner").from_config({"outer_loop": None, "inner_loop": None}, ipc=10)
    assert isinstance(s, FreshInnerSampler) and (s.outer_loop, s.inner_loop) == dc_loops(10) == (10, 50)
    s = get_sampler("fresh_inner", ipc=10, outer_loop=3, inner_loop=0, lr_net=0.5)
    assert (s.outer_loop, s.inner_loop, s.lr_net, s.batch_train) == (3, 0, 0.5, 256)
    assert dc_loops(7) == (1, 1) and dc_loops(35) == (30, 20)
    with pytest.raises(ValueError, match="unknown sampler 'magic'"):
        get_sampler("magic", ipc=1)


def test_fresh_draws_depend_on_the_run_generator_only():
    a = get_sampler("fresh", ipc=1).draw(_ctx(0))[0]
    torch.manual_seed(123)  # the global RNG must not matter
    b = get_sampler("fresh", ipc=1).draw(_ctx(0))[0]
    c = get_sampler("fresh", ipc=1).draw(_ctx(1))[0]
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    assert not a.weight.requires_grad


def test_pool_state_round_trips():
    ctx = _ctx()
    pool = get_sampler("pool", ipc=1, pool_size=2, generate_interval=1, fetch=1, train_steps=1, batch_pool=2)
    assert isinstance(pool, PoolSampler)
    for _ in range(3):
        pool.draw(ctx)
    assert len(pool.pool) == 2
    state = pool.state_dict()
    other = SAMPLERS.get("pool").from_config({"pool_size": 2, "generate_interval": 1, "fetch": 1, "train_steps": 1,
                                              "batch_pool": 2})
    other.load_state_dict(state, ctx)
    assert other.iteration == 3
    for (n1, _), (n2, _) in zip(pool.pool, other.pool):
        assert torch.equal(n1.weight, n2.weight)
        m1, m2 = getattr(n1, ACCURACY_METER_ATTRIBUTE), getattr(n2, ACCURACY_METER_ATTRIBUTE)
        assert (m1.correct, m1.seen) == (m2.correct, m2.seen)


def _recording_ctx():
    ctx = _ctx()
    calls = []

    def augmentation(x, generator=None):
        calls.append(x.shape[0])
        return x

    ctx.augmentation = augmentation
    return ctx, calls


def test_idm_pool_uses_one_network_then_trains_two_others_after_the_step_without_augmentation():
    ctx, augmented = _recording_ctx()
    pool = SAMPLERS.get("pool").from_config(resolve_config(get_recipe("idm"), "digits", {"train_steps": 3,
                                                                                         "batch_pool": 2}))
    assert (pool.loss_networks, pool.fetch, pool.initial_pool, pool.train_after_step, pool.augment) == (
        1, 2, 3, True, False)
    nets = pool.draw(ctx)
    # 3 initial networks + 1 generated at iteration 0; ONE loss network, untrained at the image step
    assert len(nets) == 1 and len(pool.pool) == 4
    assert any(nets[0] is net for net, _ in pool.pool)
    assert all(getattr(net, ACCURACY_METER_ATTRIBUTE).seen == 0 for net, _ in pool.pool)
    before = [net.weight.detach().clone() for net, _ in pool.pool]
    # replay the training independently on copies of every network: the meter counts each batch's logits
    # before its SGD step (IDM's acc_meter.add(real_logit) after the forward pass)
    images, labels = ctx.real_batches.sample(2)
    expected = []
    for net, opt in pool.pool:
        copy_net = nn.Linear(3, 2)
        copy_net.load_state_dict(net.state_dict())
        copy_opt = torch.optim.SGD(copy_net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        correct = 0
        for _ in range(3):
            logits = copy_net(images)
            correct += int((logits.argmax(1) == labels).sum())
            copy_opt.zero_grad()
            torch.nn.functional.cross_entropy(logits, labels).backward()
            copy_opt.step()
        expected.append((correct, copy_net.weight.detach()))
    pool.after_steps(nets, ctx)
    trained = [i for i, (net, _) in enumerate(pool.pool) if not torch.equal(net.weight, before[i])]
    assert len(trained) == 2 and augmented == []  # fetch_net_num 2, plain real batches
    for i, (net, _) in enumerate(pool.pool):
        meter = getattr(net, ACCURACY_METER_ATTRIBUTE)
        if i in trained:
            assert (meter.correct, meter.seen) == (expected[i][0], 12)  # 3 steps x (2 per class x 2 classes)
            assert meter.percent() == pytest.approx(100 * expected[i][0] / 12)
            torch.testing.assert_close(net.weight, expected[i][1])
        else:
            assert meter.seen == 0 and meter.percent() == 0.0
    assert not nets[0].weight.requires_grad


def test_idm_pool_resets_its_accuracy_meters_on_schedule():
    ctx, _ = _recording_ctx()
    pool = get_sampler("pool", ipc=1, train_steps=1, batch_pool=2, fetch=4, accuracy_reset_interval=2, initial_pool=3,
                       pool_train_after_step=True)
    for _ in range(2):
        pool.after_steps(pool.draw(ctx), ctx)
    assert all(getattr(net, ACCURACY_METER_ATTRIBUTE).seen > 0 for net, _ in pool.pool)
    pool.draw(ctx)  # iteration 2: a reset before the step
    assert all(getattr(net, ACCURACY_METER_ATTRIBUTE).seen == 0 for net, _ in pool.pool)


def test_pool_trained_before_the_step_is_the_idc_rows_mode():
    ctx, augmented = _recording_ctx()
    pool = get_sampler("pool", ipc=1, train_steps=2, batch_pool=2, pool_size=1, fetch=1)  # the defaults: idc's mode
    replay = torch.Generator()
    replay.set_state(ctx.generator.get_state())
    start = build_isolated(ctx.build_network, draw_seed(replay))  # the network the draw creates
    nets = pool.draw(ctx)
    assert len(nets) == 1 and augmented == [4, 4]  # trained (with augmentation) before being used
    assert not torch.equal(nets[0].weight, start.weight)
    pool.after_steps(nets, ctx)
    assert augmented == [4, 4]
    with pytest.raises(TypeError, match="pool_augment must be a bool"):
        get_sampler("pool", ipc=1, pool_augment=1)
    with pytest.raises(ValueError, match="loss_networks must be a positive integer"):
        get_sampler("pool", ipc=1, loss_networks=0)


def test_fresh_sampler_takes_several_steps_per_network_when_asked():
    from ipmcondense.condensation.api import condense

    assert get_sampler("fresh", ipc=1).steps_per_draw() == 1
    assert get_sampler("fresh", ipc=1, steps_per_network=3).steps_per_draw() == 3
    with pytest.raises(ValueError, match="steps_per_network must be a positive integer"):
        get_sampler("fresh", ipc=1, steps_per_network=0)
    one = condense("m3d", "digits", ipc=1, iterations=2, batch_real=4, progress=False, seed=0)
    three = condense("m3d", "digits", ipc=1, iterations=2, batch_real=4, progress=False, seed=0, steps_per_network=3)
    assert not torch.equal(one.images, three.images)  # more image steps per draw moved the set further
