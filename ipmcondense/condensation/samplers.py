r"""Parameter samplers: where the network parameters :math:`\theta` of the outer expectation come from.

The outer loss is :math:`E_{\theta \sim \text{sampler}} \sum_c D(\phi_\theta(A(S_c)), \phi_\theta(A(T_c)))`.
A sampler is asked for networks once per *iteration* (:meth:`ParameterSampler.draw`); the engine then
takes :meth:`ParameterSampler.steps_per_draw` image steps on them, calling
:meth:`ParameterSampler.between_steps` between consecutive steps (DC's inner training) and
:meth:`ParameterSampler.after_steps` after the last one (IDM's pool training).

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
               of training it on the current synthetic set (DC, DSA)
pool           a pool of networks partly trained on real data after each image step,
               refreshed over time (IDM)
fresh_watched  fresh network; image steps and epochs of training it on S alternate until its
               real-data accuracy stops changing / has changed enough (CAFE)
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
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.components import Component, Registry, option
from ipmcondense.ipm._validation import check_positive_int, check_positive_number
from ipmcondense.nets import build_isolated, draw_seed
from ipmcondense.training import shuffled_batches, train_on_batches

__all__ = [
    "SamplerContext",
    "ParameterSampler",
    "FreshSampler",
    "FreshInnerSampler",
    "PoolSampler",
    "AccuracyWatchedSampler",
    "real_accuracy_per_class",
    "AccuracyMeter",
    "running_accuracy_percent",
    "ACCURACY_METER_ATTRIBUTE",
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
        class_shard: class-parallel condensation: this rank's
            :class:`~ipmcondense.condensation.parallel.ClassShard` (``real_batches`` then holds its classes only,
            and a sampler that trains a network on real data sums its gradients over the ranks); ``None``: one
            process.
    """

    build_network: Callable[[], nn.Module]
    device: torch.device
    generator: torch.Generator
    real_batches: Any
    augmentation: Any
    synthetic: Callable[[], tuple[Tensor, Tensor]]
    parameter_gradients: bool
    class_shard: Any = None


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

    def keep_stepping(self, networks: list[nn.Module], ctx: SamplerContext, step: int) -> bool:
        """Asked after image step ``step`` (before :meth:`between_steps`): ``False`` ends the draw early
        (CAFE's accuracy watch); by default every one of :meth:`steps_per_draw` steps is taken."""
        return True

    def after_steps(self, networks: list[nn.Module], ctx: SamplerContext) -> None:
        """Called once after the last image step of a draw (IDM trains its pool here)."""

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


@dataclass
class AccuracyMeter:
    """Running top-1 training accuracy of one pool network (IDM's ``torchnet`` ``ClassErrorMeter(accuracy=True)``).

    ``add(logits, labels)`` counts the batch; :meth:`percent` is ``100 * correct / seen`` (the meter's
    ``value()[0]``), ``0`` before anything was counted (IDM: ``value()[0] if n != 0 else 0``).
    """

    correct: int = 0
    seen: int = 0

    def add(self, logits: Tensor, labels: Tensor) -> None:
        """Count one batch: its top-1 hits among ``labels.shape[0]`` images."""
        self.correct += int((logits.detach().argmax(dim=1) == labels).sum())
        self.seen += int(labels.shape[0])

    def percent(self) -> float:
        """``100 * correct / seen``, or 0 before any batch was counted."""
        return 100.0 * self.correct / self.seen if self.seen else 0.0

    def reset(self) -> None:
        """Forget every counted batch."""
        self.correct = self.seen = 0


#: attribute under which a pool network carries its :class:`AccuracyMeter` (read by IDM's ``synthetic_ce``)
ACCURACY_METER_ATTRIBUTE = "pool_accuracy_meter"


def running_accuracy_percent(net: nn.Module) -> float:
    """The pool network's running training accuracy in percent (0 for a network that no pool trained)."""
    meter = getattr(net, ACCURACY_METER_ATTRIBUTE, None)
    return meter.percent() if meter is not None else 0.0


class PoolSampler(ParameterSampler):
    r"""IDM's pool of networks partly trained on real data (Zhao et al. CVPR'23, ``IDM_cifar10.py``).

    The pool starts with ``initial_pool`` freshly initialised networks; at every iteration that is a
    multiple of ``generate_interval`` another joins it (the oldest leaves when it holds ``pool_size``).
    With ``pool_train_after_step`` (IDM) one iteration is:

    1. ``loss_networks`` networks drawn at random from the pool are the image step's networks (frozen);
    2. after the image step(s), ``fetch`` networks drawn at random again (independently of step 1) are
       each trained ``train_steps`` SGD steps (lr ``lr_pool``, momentum 0.9, weight decay 5e-4, IDM's
       ``--net_decay``) on real batches of ``batch_pool`` images per class, with the per-sample augmentation
       only when ``pool_augment`` (IDM: none).

    Every network carries an :class:`AccuracyMeter` of its training batches (the logits of each batch
    before its SGD step), reset for the whole pool every ``accuracy_reset_interval`` iterations (IDM resets
    its meters at every evaluation, ``--eval_interval``); IDM's ``synthetic_ce`` term reads it in percent
    (:func:`running_accuracy_percent`).

    Without ``pool_train_after_step`` (the defaults, which keep the sampler's earlier behaviour; the IDC row's
    documented deviation) the pool starts empty and the ``fetch`` networks drawn at step 1 are trained
    (with augmentation when ``pool_augment``) first and then used by the image step. The ``idm`` row sets
    IDM's ``initial_pool=3``, ``pool_train_after_step=True``, ``pool_augment=False``.

    Class-parallel (``ctx.class_shard``): every rank holds the same pool (same seeds, same picks); a pool
    network is trained on each rank's classes' rows of the class-balanced batch with the gradients summed over
    the ranks (:meth:`~ipmcondense.condensation.parallel.ClassShard.train_replicated`), and the accuracy
    meters count every rank's hits, so the replicas and the meters stay those of one process (up to the
    rounding of the split sums).

    Deviations from IDM: training batches are class-balanced (``batch_pool`` per class, 26 x 10 = 260)
    instead of 256 images drawn uniformly over the training set; the meters are reset on a fixed
    schedule, not by the evaluation.
    """

    name = "pool"

    @dataclass(frozen=True)
    class Options:
        pool_size: int = option(100, "IDM command.txt: --net_num 100")
        generate_interval: int = option(5, "IDM command.txt: --net_generate_interval 5")
        fetch: int = option(2, "IDM: --fetch_net_num 2 (networks trained per iteration)")
        train_steps: int = option(10, "IDM: --model_train_steps 10")
        lr_pool: float = option(0.01, "IDM: --lr_net 0.01")
        batch_pool: int = option(26, "IDM: --trained_bs 256 (here per class, 26 x 10 classes)")
        loss_networks: int = option(1, "IDM command.txt: --train_net_num 1 (networks the image step uses)")
        initial_pool: int = option(0, "0: the first draw creates the first network; the idm row sets IDM's 3")
        pool_train_after_step: bool = option(False, "False: train, then use (the idc row); the idm row sets True")
        pool_augment: bool = option(True, "True: DSA per sample (the idc row); the idm row sets IDM's False")
        accuracy_reset_interval: int = option(100, "IDM command.txt: --eval_interval 100 resets the accuracy meters")

    def __init__(
        self,
        pool_size: int = 100,
        generate_interval: int = 5,
        fetch: int = 2,
        train_steps: int = 10,
        lr_pool: float = 0.01,
        batch_pool: int = 26,
        loss_networks: int = 1,
        initial_pool: int = 0,
        pool_train_after_step: bool = False,
        pool_augment: bool = True,
        accuracy_reset_interval: int = 100,
    ) -> None:
        for name, value in (("pool_size", pool_size), ("generate_interval", generate_interval), ("fetch", fetch),
                            ("loss_networks", loss_networks), ("accuracy_reset_interval", accuracy_reset_interval)):
            check_positive_int(value, name)
        for name, value in (("train_steps", train_steps), ("initial_pool", initial_pool)):
            check_positive_int(value, name, allow_zero=True)
        for name, value in (("pool_train_after_step", pool_train_after_step), ("pool_augment", pool_augment)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.pool_size, self.generate_interval, self.fetch = int(pool_size), int(generate_interval), int(fetch)
        self.train_steps, self.lr_pool, self.batch_pool = int(train_steps), float(lr_pool), int(batch_pool)
        self.loss_networks, self.initial_pool = int(loss_networks), int(initial_pool)
        self.train_after_step, self.augment = pool_train_after_step, pool_augment
        self.accuracy_reset_interval = int(accuracy_reset_interval)
        self.pool: list[tuple[nn.Module, torch.optim.Optimizer]] = []
        self.iteration = 0

    def _optimizer(self, net):
        return torch.optim.SGD(net.parameters(), lr=self.lr_pool, momentum=0.9, weight_decay=5e-4)

    def _add_network(self, ctx):
        net = fresh_network(ctx)
        setattr(net, ACCURACY_METER_ATTRIBUTE, AccuracyMeter())
        self.pool.append((net, self._optimizer(net)))
        if len(self.pool) > self.pool_size:
            self.pool.pop(0)

    def _pick(self, k, ctx):
        return torch.randperm(len(self.pool), generator=ctx.generator)[: min(k, len(self.pool))].tolist()

    def _train(self, net, opt, ctx):
        meter = getattr(net, ACCURACY_METER_ATTRIBUTE)

        def counted_cross_entropy(logits, labels):
            meter.add(logits, labels)
            return F.cross_entropy(logits, labels)

        # training batches stay uniform under a loss-side selector (dream); duck-typed selectors: sample
        draw_real = getattr(ctx.real_batches, "sample_for_training", ctx.real_batches.sample)
        batches = (draw_real(self.batch_pool) for _ in range(self.train_steps))
        if ctx.class_shard is not None:  # class-parallel: own classes' rows, gradients summed over the ranks
            augment = None
            if self.augment:  # per-sample draws for the whole batch, the own rows kept
                augment = ctx.class_shard.own_rows_of_whole_batch_augmentation(ctx.augmentation,
                                                                               ctx.real_batches.counts, self.batch_pool)
            ctx.class_shard.train_replicated(net, opt, batches, ctx.real_batches.global_batch_size(self.batch_pool),
                                             meter=meter, augmentation=augment, generator=ctx.generator)
            return
        net.requires_grad_(True)
        net.train()
        train_on_batches(net, opt, batches, augmentation=ctx.augmentation if self.augment else None,
                         generator=ctx.generator, loss_fn=counted_cross_entropy)

    def draw(self, ctx):
        if self.iteration == 0 and not self.pool:
            for _ in range(min(self.initial_pool, self.pool_size)):
                self._add_network(ctx)
        if self.iteration and self.iteration % self.accuracy_reset_interval == 0:
            for net, _ in self.pool:
                getattr(net, ACCURACY_METER_ATTRIBUTE).reset()
        if not self.pool or self.iteration % self.generate_interval == 0:
            self._add_network(ctx)
        self.iteration += 1
        if self.train_after_step:
            return [_freeze(self.pool[i][0], ctx) for i in self._pick(self.loss_networks, ctx)]
        nets = []
        for i in self._pick(self.fetch, ctx):
            net, opt = self.pool[i]
            self._train(net, opt, ctx)
            nets.append(_freeze(net, ctx))
        return nets

    def after_steps(self, networks, ctx):
        if not self.train_after_step:
            return
        for i in self._pick(self.fetch, ctx):
            net, opt = self.pool[i]
            self._train(net, opt, ctx)
            _freeze(net, ctx)

    def state_dict(self):
        return {
            "iteration": self.iteration,
            "networks": [copy.deepcopy(net.state_dict()) for net, _ in self.pool],
            "optimizers": [copy.deepcopy(opt.state_dict()) for _, opt in self.pool],
            "meters": [(m.correct, m.seen) for m in (getattr(net, ACCURACY_METER_ATTRIBUTE) for net, _ in self.pool)],
        }

    def load_state_dict(self, state, ctx):
        self.iteration = int(state["iteration"])
        self.pool = []
        meters = state.get("meters", [(0, 0)] * len(state["networks"]))
        for net_state, opt_state, (correct, seen) in zip(state["networks"], state["optimizers"], meters):
            net = fresh_network_from_state(ctx, net_state)
            setattr(net, ACCURACY_METER_ATTRIBUTE, AccuracyMeter(int(correct), int(seen)))
            opt = self._optimizer(net)
            opt.load_state_dict(opt_state)
            self.pool.append((net, opt))


def fresh_network_from_state(ctx: SamplerContext, state: dict[str, Tensor]) -> nn.Module:
    """A network built without touching any generator, then loaded from ``state``."""
    net = build_isolated(ctx.build_network)
    net.load_state_dict(state)
    return net.to(ctx.device)


class AccuracyWatchedSampler(ParameterSampler):
    r"""CAFE's accuracy-watched loops (Wang et al. CVPR'22, ``distill.py``): a fresh network per iteration,
    image steps and network training alternated until the network's real-data accuracy says when to stop.

    After every image step the network's accuracy on a fresh real batch (``watch_batch`` images per class,
    no augmentation) is recorded as CAFE's running value :math:`a_k = \bar m_k + a_{k-1} / C` (the reference
    adds the ``C`` per-class accuracies to the previous value before dividing by ``C``; :math:`a_0 = 0`).
    Once ``watch_window`` values are recorded, the iteration ends when their spread
    :math:`\max - \min` is below ``outer_stop_spread`` (``lambda_1``: the network no longer changes what
    the image steps see); otherwise the oldest value leaves the window and the network is trained: epochs
    over the current synthetic set (``SGD(lr_net)``, batch ``batch_train``, per-sample augmentation), each
    followed by the same running accuracy on a fresh real batch, until a full window of ``watch_window``
    values spreads more than ``inner_stop_spread`` (``lambda_2``: the network has moved enough). Both
    watches restart (window emptied, :math:`a = 0`) for every network update and every iteration.

    The reference loops have no bound; ``max_steps_per_network`` image steps and ``max_inner_epochs``
    epochs per update cap them here (a library guard against a network whose accuracy never moves).
    Cost per iteration: at least ``watch_window`` image steps and ``(watch_window - 1) * watch_window``
    epochs on S, plus one forward pass of ``C * watch_batch`` real images per step and per epoch.
    """

    name = "fresh_watched"

    @dataclass(frozen=True)
    class Options:
        watch_window: int = option(10, "CAFE distill.py: windows of 10 accuracies (len(acc_watcher) == 10)")
        outer_stop_spread: float = option(0.04, "CAFE distill.py: --lambda_1 0.04 (stop the image updates)")
        inner_stop_spread: float = option(0.03, "CAFE distill.py: --lambda_2 0.03 (stop the network updates)")
        watch_batch: int = option(128, "CAFE distill.py: get_images(c, 128) per accuracy check")
        max_steps_per_network: int = option(100, "library cap (the reference loop is unbounded)")
        max_inner_epochs: int = option(100, "library cap (the reference loop is unbounded)")
        lr_net: float = option(0.01, "DC main.py: --lr_net 0.01")
        batch_train: int = option(256, "DC main.py: --batch_train 256")

    def __init__(self, watch_window: int = 10, outer_stop_spread: float = 0.04, inner_stop_spread: float = 0.03,
                 watch_batch: int = 128, max_steps_per_network: int = 100, max_inner_epochs: int = 100,
                 lr_net: float = 0.01, batch_train: int = 256) -> None:
        self.watch_window = check_positive_int(watch_window, "watch_window")
        self.watch_batch = check_positive_int(watch_batch, "watch_batch")
        self.max_steps_per_network = check_positive_int(max_steps_per_network, "max_steps_per_network")
        self.max_inner_epochs = check_positive_int(max_inner_epochs, "max_inner_epochs")
        self.batch_train = check_positive_int(batch_train, "batch_train")
        self.outer_stop_spread = check_positive_number(outer_stop_spread, "outer_stop_spread", allow_zero=True)
        self.inner_stop_spread = check_positive_number(inner_stop_spread, "inner_stop_spread", allow_zero=True)
        self.lr_net = check_positive_number(lr_net, "lr_net")
        self._optimizer: torch.optim.Optimizer | None = None
        self._outer = _AccuracyWatch(self.watch_window)

    def steps_per_draw(self):
        return self.max_steps_per_network

    def draw(self, ctx):
        net = fresh_network(ctx)
        self._optimizer = torch.optim.SGD(net.parameters(), lr=self.lr_net)
        self._outer = _AccuracyWatch(self.watch_window)
        return [_freeze(net, ctx)]

    def keep_stepping(self, networks, ctx, step):
        spread = self._outer.add(real_accuracy_per_class(networks[0], ctx, self.watch_batch))
        return spread is None or spread >= self.outer_stop_spread

    def between_steps(self, networks, ctx, step):
        images, labels = ctx.synthetic()
        for net in networks:
            inner = _AccuracyWatch(self.watch_window)
            for _ in range(self.max_inner_epochs):
                batches = [
                    (images[index], labels[index])
                    for index in shuffled_batches(images.shape[0], self.batch_train, ctx.generator, images.device)
                ]
                _train_steps(net, self._optimizer, batches, ctx.augmentation, ctx.generator)
                spread = inner.add(real_accuracy_per_class(net, ctx, self.watch_batch))
                if spread is not None and spread > self.inner_stop_spread:
                    break
            _freeze(net, ctx)


class _AccuracyWatch:
    """CAFE's ``acc_watcher``: running value ``a = mean_c m_c + a / C``; :meth:`add` returns the spread of a
    full window (then drops the oldest value) or ``None`` while the window fills."""

    def __init__(self, window: int) -> None:
        self.window, self.values, self.running = window, [], 0.0

    def add(self, per_class: Tensor) -> float | None:
        self.running = (self.running + float(per_class.sum())) / per_class.numel()
        self.values.append(self.running)
        if len(self.values) < self.window:
            return None
        spread = max(self.values) - min(self.values)
        self.values.pop(0)
        return spread


@torch.no_grad()
def real_accuracy_per_class(net: nn.Module, ctx: SamplerContext, n_per_class: int) -> Tensor:
    """Accuracy of ``net`` on a fresh class-balanced real batch, one value per class (CAFE's accuracy check)."""
    draw_real = getattr(ctx.real_batches, "sample_for_training", ctx.real_batches.sample)
    images, labels = draw_real(n_per_class)
    correct = (net(images).argmax(dim=1) == labels).float()
    classes = torch.unique(labels)
    per_class = torch.stack([correct[labels == c].mean() for c in classes])
    if ctx.class_shard is not None:  # class-parallel: every rank's classes, gathered in class order (exact)
        from ipmcondense.distributed import all_gather_rows

        per_class = all_gather_rows(per_class)
    return per_class
class PretrainedSampler(ParameterSampler):
    r"""One network trained on the real data once, then used frozen for every iteration (WMDD's teacher).

    At the first draw a fresh network (seed from the run's generator) is trained for ``pretrain_steps``
    SGD steps (momentum 0.9, weight decay 1e-4, cosine decay of ``lr_pretrain`` to 0 over the steps, as
    WMDD's ``pretrain.py --opt sgd --lr-scheduler cosine --wd 1e-4``) on class-balanced real batches of
    ``batch_pretrain`` images per class with per-sample augmentation; it is then put in eval mode, frozen
    and returned by every draw. Its parameters are checkpointed. Cost: ``pretrain_steps`` training steps
    once; nothing per iteration.

    Class-parallel (``ctx.class_shard``): the network is replicated; each step back-propagates the own classes'
    rows of the class-balanced batch (their share of its mean, the per-sample augmentation drawn for the whole
    batch) and sums the gradients over the ranks (:meth:`~ipmcondense.condensation.parallel.ClassShard.train_replicated`),
    so every rank holds the one-process teacher up to the rounding of the split sum.
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
        shard = ctx.class_shard
        if shard is not None:  # class-parallel: own classes' rows, the gradients summed over the ranks (replicated)
            augment = None if ctx.augmentation is None else shard.own_rows_of_whole_batch_augmentation(
                ctx.augmentation, ctx.real_batches.counts, self.batch_pretrain)
            whole = ctx.real_batches.global_batch_size(self.batch_pretrain)
        for _ in range(self.pretrain_steps):
            if shard is not None:
                shard.train_replicated(net, optimizer, [draw_real(self.batch_pretrain)], whole, augmentation=augment,
                                       generator=ctx.generator)
            else:
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
for _cls in (FreshSampler, FreshInnerSampler, PoolSampler, AccuracyWatchedSampler, PretrainedSampler,
             NoNetworkSampler):
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
