"""Parameter samplers: options from the flat table, DC's loop table, seeded draws, pool state."""

import pytest
import torch
from torch import nn

from ipmcondense.condensation.samplers import (
    SAMPLER_NAMES,
    SAMPLERS,
    FreshInnerSampler,
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
    assert SAMPLER_NAMES == ("fresh", "fresh_inner", "pool", "none")
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


def test_fresh_sampler_takes_several_steps_per_network_when_asked():
    from ipmcondense.condensation.api import condense

    assert get_sampler("fresh", ipc=1).steps_per_draw() == 1
    assert get_sampler("fresh", ipc=1, steps_per_network=3).steps_per_draw() == 3
    with pytest.raises(ValueError, match="steps_per_network must be a positive integer"):
        get_sampler("fresh", ipc=1, steps_per_network=0)
    one = condense("m3d", "digits", ipc=1, iterations=2, batch_real=4, progress=False, seed=0)
    three = condense("m3d", "digits", ipc=1, iterations=2, batch_real=4, progress=False, seed=0, steps_per_network=3)
    assert not torch.equal(one.images, three.images)  # more image steps per draw moved the set further
