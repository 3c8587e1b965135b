r"""Parameter samplers: where the network parameters :math:`\theta` of the outer expectation come from.

The outer loss is :math:`E_{\theta \sim \text{sampler}} \sum_c D(\phi_\theta(A(S_c)), \phi_\theta(A(T_c)))`.
A sampler is asked for networks once per *iteration* (:meth:`ParameterSampler.draw`); the engine then
takes :meth:`ParameterSampler.steps_per_draw` image steps on them, calling
:meth:`ParameterSampler.between_steps` between consecutive steps (DC's inner training).

All randomness (network initialisation, shuffles, pool choices) comes from the run's
``torch.Generator``: a network is initialised by PyTorch's default initialisers inside
:func:`torch.random.fork_rng` seeded with a number drawn from that generator, so the global RNG is
untouched and a resumed run draws exactly the same networks. State that is not in the generator
(the pool) is saved by :meth:`ParameterSampler.state_dict`.

=============  ===========================================================================
name           networks
=============  ===========================================================================
fresh          a new randomly initialised network every iteration (DM, M3D, DataDAM)
fresh_inner    fresh network + ``outer_loop`` image steps alternating with ``inner_loop`` epochs
               of training it on the current synthetic set (DC, DSA, CAFE)
pool           a pool of networks partly trained on real data, refreshed over time (IDM)
pretrained     one network trained on the real data once, frozen for every iteration (WMDD's teacher)
none           no networks: the objective provides its own parameters (MTT's expert buffer,
               closed-form kernels)
=============  ===========================================================================
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ipmcondense.components import Component, Registry, option
from ipmcondense.nets import build_isolated, draw_seed
from ipmcondense.training import shuffled_batches, train_on_batches

__all__ = [
    "SamplerContext",
    "ParameterSampler",
    "FreshSampler",
    "FreshInnerSampler",
    "PoolSampler",
    "PretrainedSampler",
    "NoNetworkSampler",
    "SAMPLERS",
    "SAMPLER_NAMES",
    "get_sampler",
    "dc_loops",
    "fresh_network",
]


@dataclass
class SamplerContext:
    """What a sampler may use.

    Attributes:
        build_network: builds one network on the CPU with PyTorch's default initialisation.
        device: where networks live.
        generator: the run's generator (CPU).
        real_batches: the run's real-batch selector, ``sample(n_per_class) -> (images, labels)`` on ``device``
            (samplers that train networks on real data call ``sample_for_training`` when it has one).
        augmentation: training-time augmentation, ``augmentation(x, generator=...)`` (per-sample draws).
        synthetic: a callable returning the current ``(images, labels)`` of S, detached.
        parameter_gradients: whether the returned networks' parameters must require grad.
    """

    build_network: Callable[[], nn.Module]
    device: torch.device
    generator: torch.Generator
    real_batches: Any
    augmentation: Any
    synthetic: Callable[[], tuple[Tensor, Tensor]]
    parameter_gradients: bool


def fresh_network(ctx: SamplerContext) -> nn.Module:
    """A network initialised from a seed drawn from ``ctx.generator`` (global RNG left untouched)."""
    return build_isolated(ctx.build_network, draw_seed(ctx.generator)).to(ctx.device)


def _freeze(net: nn.Module, ctx: SamplerContext) -> nn.Module:
    net.requires_grad_(ctx.parameter_gradients)
    return net


def _train_steps(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches,
    augmentation,
    generator: torch.Generator,
) -> None:
    net.requires_grad_(True)
    net.train()
    train_on_batches(net, optimizer, batches, augmentation=augmentation, generator=generator)


def dc_loops(ipc: int) -> tuple[int, int]:
    """DC's ``(outer_loop, inner_loop)`` for an IPC (reference ``utils.py: get_loops``).

    1 -> (1, 1), 10 -> (10, 50), 20 -> (20, 25), 30 -> (30, 20), 40 -> (40, 15), 50 -> (50, 10);
    other values: the nearest listed IPC at or below (at least 1 -> (1, 1)), as the published table.
    """
    table = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
    if ipc in table:
        return table[ipc]
    key = max(k for k in table if k <= max(ipc, 1))
    return table[key]


class ParameterSampler(Component, ABC):
    """Draws the networks of one iteration (a component: ``name``, ``Options``, built with the run's ``ipc``)."""

    kind = "sampler"

    def steps_per_draw(self) -> int:
        """Image steps taken on one draw of networks."""
        return 1

    @abstractmethod
    def draw(self, ctx: SamplerContext) -> list[nn.Module]:
        """The networks of the next iteration (the loss sums over them)."""

    def between_steps(self, networks: list[nn.Module], ctx: SamplerContext, step: int) -> None:
        """Called after image step ``step`` when another step on the same networks follows."""

    def state_dict(self) -> dict[str, Any]:
        """State beyond the generator, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: SamplerContext) -> None:
        """Restore :meth:`state_dict`."""


class FreshSampler(ParameterSampler):
    r"""A new randomly initialised network per iteration, parameters frozen (DM, M3D, DataDAM).

    Averaging a mean-embedding IPM over these draws gives an MMD with the random-feature kernel
    :math:`k(x, x') = E_\theta \langle \phi_\theta(x), \phi_\theta(x') \rangle`. ``steps_per_network``
    image steps are taken on each network (M3D's "iteration per random model"; 1 in DM), each with a
    fresh real batch and augmentation draw.
    """

    name = "fresh"

    @dataclass(frozen=True)
    class Options:
        steps_per_network: int = option(1, "DM main_DM.py: one image step per random network")

    def __init__(self, steps_per_network: int = 1) -> None:
        if isinstance(steps_per_network, bool) or not isinstance(steps_per_network, int) or steps_per_network < 1:
            raise ValueError(f"steps_per_network must be a positive integer, got {steps_per_network!r}")
        self.steps_per_network = steps_per_network

    def steps_per_draw(self):
        return self.steps_per_network

    def draw(self, ctx):
        return [_freeze(fresh_network(ctx), ctx)]


class FreshInnerSampler(ParameterSampler):
    """DC/DSA: a fresh network per iteration, trained on the synthetic set between image steps.

    One iteration = ``outer_loop`` image steps; between them the network is trained for
    ``inner_loop`` epochs on the current (detached) synthetic set with ``SGD(lr_net)`` (no momentum),
    batch ``batch_train``, with the recipe's augmentation drawn per sample (the reference uses DSA
    here when DSA is on). Defaults from :func:`dc_loops`.
    """

    name = "fresh_inner"

    @dataclass(frozen=True)
    class Options:
        outer_loop: int | None = option(None, "DC utils.py get_loops(ipc) (dc_loops)")
        inner_loop: int | None = option(None, "DC utils.py get_loops(ipc) (dc_loops)")
        lr_net: float = option(0.01, "DC main.py: --lr_net 0.01")
        batch_train: int = option(256, "DC main.py: --batch_train 256")

    @classmethod
    def from_options(cls, options, *, ipc: int = 1, **context):
        outer, inner = dc_loops(ipc)
        return cls(
            outer_loop=int(options.outer_loop or outer),
            inner_loop=int(inner if options.inner_loop is None else options.inner_loop),
            lr_net=float(options.lr_net),
            batch_train=int(options.batch_train),
        )

    def __init__(self, outer_loop: int, inner_loop: int, lr_net: float = 0.01, batch_train: int = 256) -> None:
        if outer_loop < 1 or inner_loop < 0:
            raise ValueError(f"outer_loop must be >= 1 and inner_loop >= 0, got {outer_loop}, {inner_loop}")
        self.outer_loop, self.inner_loop = int(outer_loop), int(inner_loop)
        self.lr_net, self.batch_train = float(lr_net), int(batch_train)
        self._optimizer: torch.optim.Optimizer | None = None

    def steps_per_draw(self):
        return self.outer_loop

    def draw(self, ctx):
        net = fresh_network(ctx)
        self._optimizer = torch.optim.SGD(net.parameters(), lr=self.lr_net)
        return [_freeze(net, ctx)]

    def between_steps(self, networks, ctx, step):
        images, labels = ctx.synthetic()
        for net in networks:
            for _ in range(self.inner_loop):
                batches = [
                    (images[index], labels[index])
                    for index in shuffled_batches(images.shape[0], self.batch_train, ctx.generator, images.device)
                ]
                _train_steps(net, self._optimizer, batches, ctx.augmentation, ctx.generator)
            _freeze(net, ctx)


class PoolSampler(ParameterSampler):
    """IDM's pool of partly trained networks (simplified, documented).

    The pool holds up to ``pool_size`` networks. Every ``generate_interval`` iterations (and when the
    pool is empty) a freshly initialised network joins it (the oldest leaves when full). Each iteration
    ``fetch`` networks are picked at random; each is trained ``train_steps`` SGD steps (lr ``lr_pool``,
    momentum 0.9, weight decay 5e-4, as IDM's ``--net_decay``) on class-balanced real batches of
    ``batch_pool`` images per class with per-sample augmentation, then used, frozen, for the loss.
    Simplifications vs the reference: no multi-formation "partition and expansion" parameterisation
    here (that belongs to a synthetic-set subclass), and no per-network learning-rate decay.
    """

    name = "pool"

    @dataclass(frozen=True)
    class Options:
        pool_size: int = option(100, "IDM command.txt: --net_num 100")
        generate_interval: int = option(5, "IDM command.txt: --net_generate_interval 5")
        fetch: int = option(2, "IDM: --fetch_net_num 2")
        train_steps: int = option(10, "IDM command.txt: --train_net_num 10")
        lr_pool: float = option(0.01, "IDM: --lr_net 0.01")
        batch_pool: int = option(26, "IDM command.txt: --net_batch 26 (per class)")

    def __init__(
        self,
        pool_size: int = 100,
        generate_interval: int = 5,
        fetch: int = 2,
        train_steps: int = 10,
        lr_pool: float = 0.01,
        batch_pool: int = 26,
    ) -> None:
        self.pool_size, self.generate_interval, self.fetch = int(pool_size), int(generate_interval), int(fetch)
        self.train_steps, self.lr_pool, self.batch_pool = int(train_steps), float(lr_pool), int(batch_pool)
        if min(self.pool_size, self.generate_interval, self.fetch) < 1 or self.train_steps < 0:
            raise ValueError("pool_size, generate_interval and fetch must be >= 1, train_steps >= 0")
        self.pool: list[tuple[nn.Module, torch.optim.Optimizer]] = []
        self.iteration = 0

    def _optimizer(self, net):
        return torch.optim.SGD(net.parameters(), lr=self.lr_pool, momentum=0.9, weight_decay=5e-4)

    def draw(self, ctx):
        if not self.pool or self.iteration % self.generate_interval == 0:
            net = fresh_network(ctx)
            self.pool.append((net, self._optimizer(net)))
            if len(self.pool) > self.pool_size:
                self.pool.pop(0)
        self.iteration += 1
        k = min(self.fetch, len(self.pool))
        picks = torch.randperm(len(self.pool), generator=ctx.generator)[:k].tolist()
        nets = []
        for i in picks:
            net, opt = self.pool[i]
            # training batches stay uniform under a loss-side selector (dream); duck-typed selectors: sample
            draw_real = getattr(ctx.real_batches, "sample_for_training", ctx.real_batches.sample)
            batches = (draw_real(self.batch_pool) for _ in range(self.train_steps))
            _train_steps(net, opt, batches, ctx.augmentation, ctx.generator)
            nets.append(_freeze(net, ctx))
        return nets

    def state_dict(self):
        return {
            "iteration": self.iteration,
            "networks": [copy.deepcopy(net.state_dict()) for net, _ in self.pool],
            "optimizers": [copy.deepcopy(opt.state_dict()) for _, opt in self.pool],
        }

    def load_state_dict(self, state, ctx):
        self.iteration = int(state["iteration"])
        self.pool = []
        for net_state, opt_state in zip(state["networks"], state["optimizers"]):
            net = fresh_network_from_state(ctx, net_state)
            opt = self._optimizer(net)
            opt.load_state_dict(opt_state)
            self.pool.append((net, opt))


def fresh_network_from_state(ctx: SamplerContext, state: dict[str, Tensor]) -> nn.Module:
    """A network built without touching any generator, then loaded from ``state``."""
    net = build_isolated(ctx.build_network)
    net.load_state_dict(state)
    return net.to(ctx.device)


class PretrainedSampler(ParameterSampler):
    r"""One network trained on the real data once, then used frozen for every iteration (WMDD's teacher).

    At the first draw a fresh network (seed from the run's generator) is trained for ``pretrain_steps``
    SGD steps (momentum 0.9, weight decay 1e-4, cosine decay of ``lr_pretrain`` to 0 over the steps, as
    WMDD's ``pretrain.py --opt sgd --lr-scheduler cosine --wd 1e-4``) on class-balanced real batches of
    ``batch_pretrain`` images per class with per-sample augmentation; it is then put in eval mode, frozen
    and returned by every draw. Its parameters are checkpointed. Cost: ``pretrain_steps`` training steps
    once; nothing per iteration.
    """

    name = "pretrained"

    @dataclass(frozen=True)
    class Options:
        pretrain_steps: int = option(
            3000, "WMDD run.sh: 50 pretraining epochs (ImageNette, batch 32); here SGD steps on class-balanced batches")
        lr_pretrain: float = option(0.025, "WMDD run.sh pretrain.py: --lr 0.025 --lr-scheduler cosine")
        batch_pretrain: int = option(3, "WMDD run.sh pretrain.py: --batch-size 32 (about 3 per class for 10 classes)")

    def __init__(self, pretrain_steps: int = 3000, lr_pretrain: float = 0.025, batch_pretrain: int = 3) -> None:
        for name, value in (("pretrain_steps", pretrain_steps), ("batch_pretrain", batch_pretrain)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "pretrain_steps" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'pretrain_steps' else 'positive'} "
                                 f"integer, got {value!r}")
        if not isinstance(lr_pretrain, (int, float)) or isinstance(lr_pretrain, bool) or not lr_pretrain > 0:
            raise ValueError(f"lr_pretrain must be a positive number, got {lr_pretrain!r}")
        self.pretrain_steps, self.lr_pretrain, self.batch_pretrain = pretrain_steps, float(lr_pretrain), batch_pretrain
        self.network: nn.Module | None = None

    def _train(self, ctx: SamplerContext) -> nn.Module:
        net = fresh_network(ctx)
        optimizer = torch.optim.SGD(net.parameters(), lr=self.lr_pretrain, momentum=0.9, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.pretrain_steps, 1))
        draw_real = getattr(ctx.real_batches, "sample_for_training", ctx.real_batches.sample)
        net.requires_grad_(True)
        net.train()
        for _ in range(self.pretrain_steps):
            train_on_batches(net, optimizer, [draw_real(self.batch_pretrain)], augmentation=ctx.augmentation,
                             generator=ctx.generator)
            schedule.step()
        return net

    def draw(self, ctx):
        if self.network is None:
            self.network = self._train(ctx)
        self.network.eval()
        return [_freeze(self.network, ctx)]

    def state_dict(self):
        return {"network": None if self.network is None else copy.deepcopy(self.network.state_dict())}

    def load_state_dict(self, state, ctx):
        self.network = None if state.get("network") is None else fresh_network_from_state(ctx, state["network"])


class NoNetworkSampler(ParameterSampler):
    """Draws no networks (objectives whose parameters come from elsewhere: expert buffers, kernels)."""

    name = "none"

    @classmethod
    def from_options(cls, options, **context):
        return cls()

    def draw(self, ctx):
        return []


#: The registered parameter samplers by name.
SAMPLERS: Registry = Registry("sampler")
for _cls in (FreshSampler, FreshInnerSampler, PoolSampler, PretrainedSampler, NoNetworkSampler):
    SAMPLERS.register(_cls)
SAMPLER_NAMES = SAMPLERS.names


def get_sampler(name: str, *, ipc: int, **options) -> ParameterSampler:
    """Build a sampler by name (:data:`SAMPLER_NAMES`) from (a subset of) the flat hyperparameters.

    Options: ``fresh_inner``: ``outer_loop``, ``inner_loop`` (default ``dc_loops(ipc)``, :func:`dc_loops`), ``lr_net``,
    ``batch_train``; ``pool``: ``pool_size``, ``generate_interval``, ``fetch``, ``train_steps``,
    ``lr_pool``, ``batch_pool``. Options meant for other samplers are ignored; ``None`` means the default.
    """
    cls = SAMPLERS.get(name)
    given = {k: v for k, v in options.items() if v is not None or k in ("outer_loop", "inner_loop")}
    return cls.from_config(given, ipc=ipc)
