r"""The objective axis: what one image step of the engine minimises.

The engine (:mod:`ipmcondense.condensation.engine`) asks the recipe's :class:`Objective` for the loss
of one step and its gradients with respect to the learnable tensors (the synthetic set's parameters
and the objective's own, e.g. a temperature), then takes one optimiser step. Everything else (the
loop, checkpoints, resume, outputs, evaluation) is shared.

===========  =================================================================  ==============================
name         loss of one step                                                   relation to an IPM
===========  =================================================================  ==============================
matching     :math:`\sum_c D(\phi_\theta(A(T_c)), \phi_\theta(A(S_c)))` (+ extras;  exact / normalised IPM per the
             LCMat curvature term with ``lcmat_weight > 0``)                    discrepancy (see the row)
mtt          :math:`\|\theta^S_N - \theta^*_{t+M}\|^2/\|\theta^*_t - \theta^*_{t+M}\|^2`  first-order approximation:
                                                                                accumulated gradient matching
kip          :math:`\tfrac12 \mathrm{mean}(Y_T - K_{TS}(K_{SS}+\lambda I)^{-1}Y_S)^2`     not an IPM (regression loss,
                                                                                RKHS witness class)
rfad         Platt-scaled CE of the KRR predictions, random-feature NNGP        not an IPM (as KIP)
dd           :math:`\mathrm{CE}(f_{\theta_N(S)}(X_T), Y_T)`, :math:`\theta_N` = N   not an IPM (bilevel)
             unrolled SGD steps on S with learnable step sizes
rcig         :math:`\mathrm{CE}(X_T W^*(S), Y_T)`, :math:`W^* = \arg\min_W` a convex  not an IPM (bilevel)
             inner loss on S, gradient by implicit differentiation
===========  =================================================================  ==============================

Randomness: every draw (real batches, expert samples, networks, augmentations, unroll mini-batches)
comes from the engine's one generator, so ``resume=True`` continues bit-for-bit.
"""

from __future__ import annotations

import copy
import math
from abc import ABC
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.ipm._validation import check_choice

from .matching import (
    build_discrepancy,
    build_extra_terms,
    build_feature_map,
    matching_loss,
    siamese_augment,
)
from .synthetic import LearnedExtrasPixelSet, PixelSet, SyntheticSet

if TYPE_CHECKING:
    from .recipes import Recipe

__all__ = [
    "ObjectiveContext",
    "Objective",
    "MatchingObjective",
    "TrajectoryMatchingObjective",
    "KernelInducingPointsObjective",
    "RandomFeatureKRRObjective",
    "UnrolledBilevelObjective",
    "ImplicitBilevelObjective",
    "OBJECTIVES",
    "OBJECTIVE_NAMES",
    "KERNEL_NAMES",
    "get_objective_class",
    "lcmat_perturbation",
    "build_kernel",
    "unrolled_task_loss",
    "conjugate_gradient",
    "neumann_series",
    "implicit_hypergradient",
    "solve_inner_linear",
    "inner_linear_loss",
]

#: Kernels the ``kip`` objective accepts (``config["kernel"]``).
KERNEL_NAMES = ("fc_ntk", "fc_nngp", "empirical_ntk", "rf_nngp")


@dataclass
class ObjectiveContext:
    """What an objective may use (all owned by the engine).

    Attributes:
        recipe: the registry row.
        config: resolved hyperparameters.
        dataset: the :class:`~ipmcondense.data.LabelledImages`.
        synthetic: the synthetic set.
        generator: the run's only generator.
        device: where everything runs.
        real_sampler: ``sample(n_per_class) -> (images, labels)``, class-blocked.
        augmentation: the recipe's augmentation (siamese ``draw``/``apply`` and per-sample ``__call__``).
        build_network: builds one network of ``config["arch"]`` on the CPU (default initialisation).
    """

    recipe: Recipe
    config: dict[str, Any]
    dataset: Any
    synthetic: SyntheticSet
    generator: torch.Generator
    device: torch.device
    real_sampler: Any
    augmentation: Any
    build_network: Callable[[], nn.Module]


def _draw_network(ctx: ObjectiveContext, build: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A network initialised from a seed drawn from the run's generator (global RNG untouched)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = (build or ctx.build_network)()
    return net.to(ctx.device)


def _positive(config: dict[str, Any], key: str, *, integer: bool = False, allow_zero: bool = False) -> Any:
    value = config[key]
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value != value or value < 0 or (value == 0 and not allow_zero):
        kind = "integer" if integer else "number"
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{key} must be a {bound} {kind}, got {value!r}")
    return value


class Objective(ABC):
    """One value on the objective axis.

    Subclasses implement :meth:`loss` (a differentiable scalar) or override
    :meth:`loss_and_gradients` (when the gradient is not obtained by plain backpropagation: the
    memory-lean MTT reverse pass, RCIG's implicit gradient).

    Class attributes:
        name: registry key.
        relation_to_ipm: one sentence, as in the recipe row.
    """

    name: str = ""
    relation_to_ipm: str = ""

    def __init__(self, ctx: ObjectiveContext) -> None:
        self.ctx = ctx
        self.config = ctx.config

    # ---------------------------------------------------------------- before the engine exists
    @classmethod
    def prepare_config(cls, config: dict[str, Any], dataset: Any) -> dict[str, Any]:
        """Validate the objective's hyperparameters (before any output is written); may fill defaults."""
        return config

    @classmethod
    def build_synthetic(cls, images: Tensor, labels: Tensor, dataset: Any, config: dict[str, Any]) -> SyntheticSet:
        """The synthetic set this objective optimises (raw pixels by default)."""
        return PixelSet(images, labels, dataset.num_classes)

    # ---------------------------------------------------------------------------- one step
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups for the objective's own learnable tensors (none by default)."""
        return []

    def loss(self, networks: Sequence[nn.Module]) -> Tensor:
        """The loss of one step on the sampler's ``networks`` (differentiable)."""
        raise TypeError(f"objective {self.name!r} computes its gradients in loss_and_gradients")

    def loss_and_gradients(self, networks: Sequence[nn.Module], params: Sequence[Tensor]) -> tuple[Tensor, list]:
        """``(loss, [d loss / d p for p in params])`` (``None`` for unused parameters)."""
        total = self.loss(networks)
        grads = torch.autograd.grad(total, list(params), allow_unused=True)
        return total.detach(), list(grads)

    def check_after_step(self, iteration: int) -> None:
        """Raise if the optimiser step left a learnable quantity invalid (default: nothing to check)."""

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """State beyond the synthetic set, optimiser and generator (for checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


# ==================================================================================== matching
def lcmat_perturbation(
    net: nn.Module, real_images: Tensor, real_labels: Tensor, synthetic_images: Tensor, synthetic_labels: Tensor,
    rho: float,
) -> nn.Module:
    r"""A copy of ``net`` moved to :math:`\theta + \rho\, g / \|g\|`, the worst case of the loss gap to first order.

    :math:`g = \nabla_\theta\, |\ell_T(\theta) - \ell_S(\theta)|` (detached) with :math:`\ell_T, \ell_S`
    the mean cross-entropies of the real and synthetic batches: one normalised ascent step of the
    loss gap over the ball :math:`\|\epsilon\| \le \rho` (LCMat's estimate of the worst case). Cost: one
    forward + backward per side and one parameter copy.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    with torch.enable_grad():
        gap = F.cross_entropy(net(real_images.detach()), real_labels) - F.cross_entropy(
            net(synthetic_images.detach()), synthetic_labels
        )
        grads = torch.autograd.grad(gap.abs(), params, allow_unused=True)
    norm = torch.sqrt(sum((g * g).sum() for g in grads if g is not None))
    moved = copy.deepcopy(net)
    if float(norm) > 0:
        with torch.no_grad():
            for p, g in zip((q for q in moved.parameters() if q.requires_grad), grads):
                if g is not None:
                    p.add_(g, alpha=float(rho) / float(norm))
    return moved


class MatchingObjective(Objective):
    r"""Feature matching: :math:`\sum_\theta \sum_c \sum_b w_b D(\phi^b_\theta(A_c(T_c)), \phi^b_\theta(A_c(S_c)))` + extras.

    One step: a class-balanced real batch (``batch_real`` per class), one siamese augmentation draw per
    class, :func:`~ipmcondense.condensation.matching.matching_loss` on every network of the draw
    (exactly the engine's behaviour before objectives existed).

    **LCMat** (``lcmat_weight`` :math:`\lambda > 0`, gradient feature maps): the loss on each network
    becomes :math:`GM(\theta) + \lambda\, (GM(\theta + \rho\hat g) - GM(\theta))`, with
    :math:`\theta + \rho\hat g` from :func:`lcmat_perturbation` (``lcmat_rho``): the gap between
    gradient matching at the estimated worst point of the parameter ball and at its centre, a
    curvature (second-order) penalty; for :math:`\lambda \le 1` the loss is the convex combination
    :math:`(1-\lambda) GM(\theta) + \lambda GM(\theta + \rho\hat g)`, so it never rewards a mismatch.
    Cost: about twice the plain matching loss.
    """

    name = "matching"
    relation_to_ipm = "as the discrepancy of the row (exact IPM, normalised variant or approximation)"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.feature_map = build_feature_map(ctx.recipe, ctx.config)
        self.discrepancy = build_discrepancy(ctx.recipe, ctx.config)
        self.extra_terms = build_extra_terms(ctx.recipe, ctx.config)
        self.lcmat_weight = float(ctx.config.get("lcmat_weight") or 0.0)
        self.lcmat_rho = float(ctx.config.get("lcmat_rho") or 0.0)
        if self.lcmat_weight > 0 and not self.feature_map.needs_parameter_gradients:
            raise ValueError("lcmat_weight > 0 needs a gradient-matching recipe (feature map 'gradients')")

    @classmethod
    def prepare_config(cls, config, dataset):
        weight = config.get("lcmat_weight")
        if weight is not None:
            _positive(config, "lcmat_weight", allow_zero=True)
            if weight > 0:
                _positive(config, "lcmat_rho")
        return config

    def loss(self, networks):
        cfg, ctx = self.config, self.ctx
        real, real_labels = ctx.real_sampler.sample(int(cfg["batch_real"]))
        syn, syn_labels = ctx.synthetic.images(), ctx.synthetic.labels
        real_aug, syn_aug = siamese_augment(ctx.augmentation, real, real_labels, syn, syn_labels, ctx.generator)
        total = None
        for net in networks:
            value = self._one(net, real_aug, real_labels, syn_aug, syn_labels)
            if self.lcmat_weight > 0:
                moved = lcmat_perturbation(net, real_aug, real_labels, syn_aug, syn_labels, self.lcmat_rho)
                centre = value if not self.extra_terms else self._one(net, real_aug, real_labels, syn_aug, syn_labels,
                                                                      extras=False)
                value = value + self.lcmat_weight * (
                    self._one(moved, real_aug, real_labels, syn_aug, syn_labels, extras=False) - centre
                )
            total = value if total is None else total + value
        return total

    def _one(self, net, real, real_labels, syn, syn_labels, extras=True):
        return matching_loss(
            net, self.feature_map, self.discrepancy, real, real_labels, syn, syn_labels,
            class_batching=bool(self.config["class_batching"]),
            extra_terms=self.extra_terms if extras else (), generator=self.ctx.generator,
        ).total


# ======================================================================= trajectory matching
class TrajectoryMatchingObjective(Objective):
    r"""MTT: match an expert's parameter trajectory with N student steps on S (Cazenavette et al. 2022).

    Each step: draw an expert and a start epoch :math:`t \sim U\{0, \dots, T^+ - 1\}` from the buffer
    (``max_start_epoch`` :math:`T^+`, default every valid start), start the student at
    :math:`\theta^*_t`, take ``syn_steps`` :math:`N` differentiable SGD steps on the synthetic set
    (mini-batches of ``batch_syn``, default all; per-sample DSA when the row augments) with the
    learnable step size :math:`\eta` of the synthetic set, and return
    :math:`\|\theta^S_N - \theta^*_{t+M}\|^2 / \|\theta^*_t - \theta^*_{t+M}\|^2` (``expert_epochs`` :math:`M`).

    Options: ``memory_lean=True`` computes the same gradients by a reverse pass with recomputation
    (:func:`~ipmcondense.trajectories.trajectory_matching_loss_and_grads`, memory of N parameter
    vectors + one step's graph, TESLA-like); ``soft_labels=True`` learns DATM-style logits (soft
    cross-entropy in the unroll; initialised from the last snapshot of expert 0 on the initial images).

    **Relation to an IPM**: a first-order approximation. As :math:`\eta \to 0`,
    :math:`(\theta^S_N - \theta^*_t)/\eta \to -\sum_{i<N} \nabla_\theta \ell_{B_i}(\theta^*_t; S)`: the loss
    compares an accumulated synthetic gradient with the expert's displacement, i.e. gradient matching
    accumulated along the trajectory (tested against the accumulated gradient).

    Cost: N forward + backward passes on ``batch_syn`` images plus the meta-backward (~2 more per step);
    memory grows with N unless ``memory_lean``.
    """

    name = "mtt"
    relation_to_ipm = "first-order approximation: accumulated gradient matching along the expert trajectory"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        from ipmcondense.augment import DifferentiableSiameseAugmentation, dsa_strategy_for

        self.buffer = _open_buffer(ctx.config, ctx.dataset)
        self.template = self.buffer.build_network().to(ctx.device)
        self.augment = (
            DifferentiableSiameseAugmentation(dsa_strategy_for(ctx.dataset)) if ctx.recipe.augmentation == "dsa" else None
        )

    @classmethod
    def prepare_config(cls, config, dataset):
        buffer = _open_buffer(config, dataset)
        config = dict(config)
        config["experts"] = str(config["experts"])
        for key in ("syn_steps", "expert_epochs"):
            _positive(config, key, integer=True)
        if config["expert_epochs"] > buffer.epochs:
            raise ValueError(
                f"expert_epochs ({config['expert_epochs']}) exceeds the {buffer.epochs} epochs of the expert buffer "
                f"at {config['experts']!r}"
            )
        largest = buffer.epochs - config["expert_epochs"] + 1
        if config["max_start_epoch"] is not None:
            _positive(config, "max_start_epoch", integer=True)
            if config["max_start_epoch"] > largest:
                raise ValueError(
                    f"max_start_epoch ({config['max_start_epoch']}) + expert_epochs ({config['expert_epochs']}) - 1 "
                    f"exceeds the {buffer.epochs} epochs of the expert buffer; use max_start_epoch <= {largest}"
                )
        if config["batch_syn"] is not None:
            _positive(config, "batch_syn", integer=True)
        if config["lr_teacher"] is None:
            config["lr_teacher"] = buffer.lr
        _positive(config, "lr_teacher")
        _positive(config, "lr_lr")
        _positive(config, "lr_labels")
        return config

    @classmethod
    def build_synthetic(cls, images, labels, dataset, config):
        logits = None
        if config["soft_labels"]:
            buffer = _open_buffer(config, dataset)
            expert = buffer.network(0, buffer.epochs).eval()
            with torch.no_grad():
                logits = expert(images.float()).detach()
        return LearnedExtrasPixelSet(
            images, labels, dataset.num_classes, learning_rate=float(config["lr_teacher"]),
            lr_lr=float(config["lr_lr"]), label_logits=logits, lr_labels=float(config["lr_labels"]),
        )

    def _labels(self) -> Tensor:
        syn = self.ctx.synthetic
        return syn.soft_labels() if self.config["soft_labels"] else syn.labels

    def loss_and_gradients(self, networks, params):
        from ipmcondense.trajectories import (
            trajectory_matching_loss,
            trajectory_matching_loss_and_grads,
            unrolled_sgd,
        )

        cfg, ctx, syn = self.config, self.ctx, self.ctx.synthetic
        sample = self.buffer.sample(
            ctx.generator, max_start_epoch=cfg["max_start_epoch"], expert_epochs=int(cfg["expert_epochs"]),
            device=ctx.device,
        )
        images, labels, lr = syn.images(), self._labels(), syn.learning_rate
        if not bool(torch.isfinite(lr.detach())):
            raise FloatingPointError(f"the learned synthetic learning rate is {float(lr.detach())}; lower lr_lr")
        soft = bool(cfg["soft_labels"])
        steps, batch = int(cfg["syn_steps"]), cfg["batch_syn"]
        params = list(params)
        if cfg["memory_lean"]:
            result = trajectory_matching_loss_and_grads(
                self.template, sample.params_start, sample.params_target, images.detach(), labels.detach(),
                lr.detach(), steps, batch, self.augment, ctx.generator, soft,
            )
            outputs, seeds = [images, lr], [result.images_grad, result.lrs_grad.reshape(lr.shape)]
            if soft:
                outputs.append(labels)
                seeds.append(result.labels_grad)
            grads = torch.autograd.grad(outputs, params, grad_outputs=seeds, allow_unused=True)
            return result.loss, list(grads)
        end = unrolled_sgd(
            self.template, sample.params_start, images, labels, lr, steps, batch, self.augment, ctx.generator, soft,
        )
        total = trajectory_matching_loss(end, sample.params_start, sample.params_target)
        grads = torch.autograd.grad(total, params, allow_unused=True)
        return total.detach(), list(grads)

    def check_after_step(self, iteration):
        lr = self.ctx.synthetic.learning_rate
        if not bool(torch.isfinite(lr.detach())):
            raise FloatingPointError(
                f"the learned synthetic learning rate became {float(lr.detach())} at iteration {iteration}; "
                f"lower lr_lr (now {self.config['lr_lr']}) or lr_images"
            )


def _open_buffer(config: dict[str, Any], dataset: Any):
    from ipmcondense.trajectories import ExpertBuffer

    path = config.get("experts")
    if path is None:
        raise ValueError(
            "method 'mtt' needs an expert buffer: pass --experts DIR (Python: experts=DIR). Make one with: "
            f"ipmcondense experts --dataset {dataset.name} --arch {config['arch']} --n-experts K --epochs E --out DIR"
        )
    if not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
        raise TypeError(f"experts must be a directory path, got {type(path).__name__}")
    return ExpertBuffer(path, dataset=dataset, arch=config["arch"])


# ============================================================================ kernel methods
def build_kernel(
    name: str,
    input_shape: Sequence[int],
    *,
    depth: int = 1,
    network: nn.Module | None = None,
    network_factory: Callable[[torch.Generator], nn.Module] | None = None,
    n_models: int = 8,
) -> nn.Module:
    """A kernel on flattened images ``(n, prod(input_shape))`` for KRR objectives.

    ``"fc_ntk"`` / ``"fc_nngp"``: closed-form kernels of a fully connected ReLU network of ``depth``
    hidden layers (:class:`~ipmcondense.ipm.neural_kernels.FullyConnectedNTK`); ``"empirical_ntk"``:
    :class:`~ipmcondense.ipm.neural_kernels.EmpiricalNTK` of ``network`` (mean over outputs);
    ``"rf_nngp"``: :class:`~ipmcondense.ipm.neural_kernels.RandomFeatureNNGP` of ``n_models`` networks from
    ``network_factory`` (scale 2, offset 0.01 as RFAD).
    """
    from ipmcondense.ipm.neural_kernels import (
        EmpiricalNTK,
        FullyConnectedNNGP,
        FullyConnectedNTK,
        RandomFeatureNNGP,
    )

    check_choice(name, KERNEL_NAMES, "kernel")
    if name == "fc_ntk":
        return FullyConnectedNTK(depth)
    if name == "fc_nngp":
        return FullyConnectedNNGP(depth)
    if name == "empirical_ntk":
        if network is None:
            raise ValueError("kernel 'empirical_ntk' needs a network")
        return EmpiricalNTK(network, input_shape=tuple(input_shape), output_reduction="mean")
    if network_factory is None:
        raise ValueError("kernel 'rf_nngp' needs a network_factory")
    return RandomFeatureNNGP(network_factory, n_models, input_shape=tuple(input_shape), scale=2.0, offset=0.01)


def _random_convnet_factory(dataset: Any, width: int) -> Callable[[torch.Generator], nn.Module]:
    """RFAD's networks: ConvNet without normalisation, NNGP (Gaussian) initialisation from the generator."""
    from ipmcondense.ipm.neural_kernels import gaussian_init_
    from ipmcondense.nets import get_network

    def factory(generator: torch.Generator) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            net = get_network("convnet-nn", dataset.channels, dataset.num_classes, tuple(dataset.image_size), width=width)
        return gaussian_init_(net, generator=generator)

    return factory


class KernelInducingPointsObjective(Objective):
    r"""KIP: kernel ridge regression from S to a real batch T (Nguyen et al. 2021).

    .. math:: L(S) = \tfrac12\, \mathrm{mean}\big(Y_T - K_{TS}(K_{SS} + \lambda I)^{-1} Y_S\big)^2,
              \quad \lambda = \mathrm{krr\_reg}\cdot \mathrm{tr}(K_{SS})/|S|

    (:func:`~ipmcondense.ipm.kernel_regression.krr_loss`, solved in float64), with class-balanced real
    targets (``batch_real`` per class), centred one-hot :math:`Y_T`, :math:`Y_S` centred one-hot or
    learned (``learn_labels``). ``kernel``: ``"fc_ntk"`` (default; ``kernel_depth`` hidden layers),
    ``"fc_nngp"``, ``"empirical_ntk"`` (of a fresh ``arch`` network per step) or ``"rf_nngp"``
    (``n_models`` random no-norm ConvNets of width ``rf_width``, fresh per step).

    **Relation to an IPM**: none. The predictor lies in the RKHS of the kernel (the witness class of
    the MMD with that kernel), but the loss is a label regression error of the fitted predictor, not a
    supremum of mean differences.

    Cost: :math:`O(|S|^2 + |S||T|)` kernel entries + an :math:`O(|S|^3)` solve per step.
    """

    name = "kip"
    relation_to_ipm = "not an IPM: KRR regression loss, witness class an RKHS"
    loss_name = "mse"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        ds = ctx.dataset
        self.input_shape = (ds.channels, *ds.image_size)
        self.kernel_name = ctx.config["kernel"]
        self.kernel = None
        if self.kernel_name in ("fc_ntk", "fc_nngp"):
            self.kernel = build_kernel(self.kernel_name, self.input_shape, depth=int(ctx.config["kernel_depth"]))
        elif self.kernel_name == "rf_nngp":
            self.kernel = build_kernel(
                "rf_nngp", self.input_shape, n_models=int(ctx.config["n_models"]),
                network_factory=_random_convnet_factory(ds, int(ctx.config["rf_width"])),
            ).to(ctx.device)

    @classmethod
    def prepare_config(cls, config, dataset):
        check_choice(config["kernel"], KERNEL_NAMES, "kernel")
        _positive(config, "kernel_depth", integer=True)
        _positive(config, "n_models", integer=True)
        _positive(config, "rf_width", integer=True)
        _positive(config, "krr_reg", allow_zero=True)
        _positive(config, "lr_labels")
        if config["kernel"] == "empirical_ntk":
            from ipmcondense.nets import get_network

            with torch.random.fork_rng(devices=[]):
                net = get_network(config["arch"], dataset.channels, dataset.num_classes, tuple(dataset.image_size))
            kernel = build_kernel("empirical_ntk", (dataset.channels, *dataset.image_size), network=net.eval())
        elif config["kernel"] == "rf_nngp":
            kernel = build_kernel("rf_nngp", (dataset.channels, *dataset.image_size), n_models=1,
                                  network_factory=_random_convnet_factory(dataset, int(config["rf_width"])))
        else:
            kernel = build_kernel(config["kernel"], (dataset.channels, *dataset.image_size),
                                  depth=int(config["kernel_depth"]))
        probe = dataset.train_images[:2].float().reshape(2, -1)
        value = kernel(probe, probe)
        if tuple(value.shape) != (2, 2):
            raise ValueError(f"kernel {config['kernel']!r} returned shape {tuple(value.shape)} for 2 points")
        return config

    @classmethod
    def build_synthetic(cls, images, labels, dataset, config):
        if not config["learn_labels"]:
            return PixelSet(images, labels, dataset.num_classes)
        from ipmcondense.ipm.kernel_regression import centred_one_hot

        return LearnedExtrasPixelSet(
            images, labels, dataset.num_classes, label_values=centred_one_hot(labels, dataset.num_classes),
            lr_labels=float(config["lr_labels"]),
        )

    def _support_labels(self) -> Tensor:
        from ipmcondense.ipm.kernel_regression import centred_one_hot

        syn = self.ctx.synthetic
        if getattr(syn, "label_values", None) is not None:
            return syn.label_values
        return centred_one_hot(syn.labels, self.ctx.dataset.num_classes, dtype=torch.float32)

    def _kernel_for_step(self) -> nn.Module:
        if self.kernel_name == "empirical_ntk":
            return build_kernel("empirical_ntk", self.input_shape, network=_draw_network(self.ctx).eval())
        if self.kernel_name == "rf_nngp":
            self.kernel.resample(generator=self.ctx.generator)
        return self.kernel

    def _krr_options(self) -> dict[str, Any]:
        return {"reg": float(self.config["krr_reg"]), "loss": "mse"}

    def loss(self, networks):
        from ipmcondense.ipm.kernel_regression import krr_loss

        ctx = self.ctx
        kernel = self._kernel_for_step()
        real, real_labels = ctx.real_sampler.sample(int(self.config["batch_real"]))
        support = ctx.synthetic.images()
        return krr_loss(
            kernel, support.reshape(support.shape[0], -1), self._support_labels(),
            real.reshape(real.shape[0], -1), real_labels, **self._krr_options(),
        )


class RandomFeatureKRRObjective(KernelInducingPointsObjective):
    r"""RFAD: KRR with the random-feature NNGP of ``n_models`` random ConvNets and a Platt-scaled CE (Loo et al. 2022).

    Kernel :math:`k(x, x') = 2\langle\phi(x), \phi(x')\rangle + 0.01` with :math:`\phi` the concatenated,
    :math:`1/\sqrt{M d}`-scaled embeddings of ``n_models`` no-norm ConvNets of width ``rf_width`` with
    NNGP initialisation, drawn afresh every step from the run's generator; ridge ``krr_reg``
    (relative, 5e-3); loss :math:`\mathrm{CE}(e^{\tau}\hat Y_T, y_T)` with a learnable log-temperature
    :math:`\tau` (init 0, SGD step ``lr_temperature``).

    **Relation to an IPM**: none (as KIP); the kernel is the one whose MMD DM estimates.
    Cost: ``n_models`` forward passes on :math:`|S| + |T|` images + an :math:`O(|S|^3)` solve.
    """

    name = "rfad"
    relation_to_ipm = "not an IPM: KRR (Platt-scaled CE) with a random-feature NNGP kernel"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.log_temperature = nn.Parameter(torch.zeros((), dtype=torch.float64, device=ctx.device))

    @classmethod
    def prepare_config(cls, config, dataset):
        config = super().prepare_config(config, dataset)
        _positive(config, "lr_temperature")
        return config

    def parameter_groups(self):
        return [{"params": [self.log_temperature], "lr": float(self.config["lr_temperature"])}]

    def _krr_options(self):
        return {"reg": float(self.config["krr_reg"]), "loss": "platt", "log_temperature": self.log_temperature}

    def state_dict(self):
        return {"log_temperature": self.log_temperature.detach().cpu().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.log_temperature.copy_(state["log_temperature"])


# ===================================================================== unrolled bilevel (DD)
def unrolled_task_loss(
    net: nn.Module,
    flat_params_start: Tensor,
    images: Tensor,
    labels: Tensor,
    raw_lrs: Tensor,
    real_images: Tensor,
    real_labels: Tensor,
) -> Tensor:
    r"""DD's outer loss :math:`\mathrm{CE}(f_{\theta_N}(X_T), Y_T)` after ``len(raw_lrs)`` unrolled SGD steps on S.

    :math:`\theta_{i+1} = \theta_i - \mathrm{softplus}(r_i) \nabla_\theta \mathrm{CE}(f_{\theta_i}(X_S), Y_S)`
    (full synthetic batch each step, :func:`~ipmcondense.trajectories.unrolled_sgd`), differentiable in
    the images and the raw step sizes :math:`r` (the hypergradient, through Hessian-vector products).
    Cost: N forward + backward passes on S, the meta-backward, one forward on the real batch.
    """
    from ipmcondense.trajectories import functional_forward, unrolled_sgd

    lrs = F.softplus(raw_lrs)
    end = unrolled_sgd(net, flat_params_start, images, labels, lrs, int(raw_lrs.numel()))
    return F.cross_entropy(functional_forward(net, end, real_images), real_labels)


class UnrolledBilevelObjective(Objective):
    r"""DD: dataset distillation by back-propagation through training (Wang et al. 2018).

    Each step: :math:`\theta_0` = a fresh initialisation from the sampler (``dd_init="fresh"``, the
    reference's ``unknown_init``) or one initialisation fixed for the run (``"fixed"``); ``dd_steps``
    SGD steps on the whole synthetic set with learnable per-step step sizes
    :math:`\eta_i = \mathrm{softplus}(r_i)` (init ``dd_lr_init``, own step ``lr_lrs``); the loss is
    :func:`unrolled_task_loss` on a class-balanced real batch.

    **Relation to an IPM**: none: a performance-oriented bilevel objective (the real-data loss of the
    network trained on S).

    Cost: ``dd_steps`` forward + backward passes on S with graphs kept (memory linear in the steps).
    """

    name = "dd"
    relation_to_ipm = "not an IPM: bilevel objective (real-data loss after unrolled training on S)"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        from ipmcondense.trajectories import flatten_parameters

        steps = int(ctx.config["dd_steps"])
        init = float(ctx.config["dd_lr_init"])
        raw = math.log(math.expm1(init))  # softplus^{-1}
        self.raw_lrs = nn.Parameter(torch.full((steps,), raw, device=ctx.device))
        with torch.random.fork_rng(devices=[]):
            self.template = ctx.build_network().to(ctx.device)
        self.fixed_start = None
        if ctx.config["dd_init"] == "fixed":
            self.fixed_start = flatten_parameters(_draw_network(ctx))

    @classmethod
    def prepare_config(cls, config, dataset):
        _positive(config, "dd_steps", integer=True)
        _positive(config, "dd_lr_init")
        _positive(config, "lr_lrs")
        check_choice(config["dd_init"], ("fresh", "fixed"), "dd_init")
        return config

    def parameter_groups(self):
        return [{"params": [self.raw_lrs], "lr": float(self.config["lr_lrs"])}]

    def learned_step_sizes(self) -> Tensor:
        """:math:`\\mathrm{softplus}(r)`, the current per-step learning rates."""
        return F.softplus(self.raw_lrs.detach())

    def loss(self, networks):
        from ipmcondense.trajectories import flatten_parameters

        ctx = self.ctx
        if self.fixed_start is not None:
            start = self.fixed_start
        else:
            if not networks:
                raise ValueError("objective 'dd' with dd_init='fresh' needs a sampler that draws networks")
            start = flatten_parameters(networks[0])
        real, real_labels = ctx.real_sampler.sample(int(self.config["batch_real"]))
        return unrolled_task_loss(
            self.template, start, ctx.synthetic.images(), ctx.synthetic.labels, self.raw_lrs, real, real_labels,
        )

    def check_after_step(self, iteration):
        if not bool(torch.isfinite(self.raw_lrs.detach()).all()):
            raise FloatingPointError(f"the learned step sizes of 'dd' became non-finite at iteration {iteration}")

    def state_dict(self):
        state = {"raw_lrs": self.raw_lrs.detach().cpu().clone()}
        if self.fixed_start is not None:
            state["fixed_start"] = self.fixed_start.detach().cpu().clone()
        return state

    def load_state_dict(self, state):
        with torch.no_grad():
            self.raw_lrs.copy_(state["raw_lrs"])
        if "fixed_start" in state:
            self.fixed_start = state["fixed_start"].to(self.ctx.device)


# ===================================================================== implicit bilevel (RCIG)
def conjugate_gradient(
    hvp: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 20, tolerance: float = 1e-20
) -> Tensor:
    r"""Solve :math:`H x = b` for symmetric positive definite :math:`H` given only :math:`v \mapsto Hv`.

    Plain conjugate gradients from :math:`x_0 = 0`, at most ``iterations`` steps, stopping when
    :math:`\|r\|^2 \le \mathrm{tolerance} \cdot \|b\|^2`. Exact after ``dim`` steps in exact arithmetic.
    Cost: one Hessian-vector product per iteration.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum()
    stop = tolerance * rr
    for _ in range(int(iterations)):
        if float(rr) <= float(stop) or float(rr) == 0.0:
            break
        hp = hvp(p)
        alpha = rr / (p * hp).sum()
        x = x + alpha * p
        r = r - alpha * hp
        rr_new = (r * r).sum()
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def neumann_series(hvp: Callable[[Tensor], Tensor], b: Tensor, alpha: float, iterations: int = 20) -> Tensor:
    r""":math:`H^{-1} b \approx \alpha \sum_{k=0}^{K} (I - \alpha H)^k b` (truncated Neumann series).

    Converges for :math:`0 < \alpha < 2/\lambda_{max}(H)` with error :math:`O((1 - \alpha\lambda_{min})^{K})`.
    Cost: one Hessian-vector product per term.
    """
    term = b.clone()
    total = b.clone()
    for _ in range(int(iterations)):
        term = term - alpha * hvp(term)
        total = total + term
    return alpha * total


def _largest_eigenvalue(hvp: Callable[[Tensor], Tensor], like: Tensor, iterations: int = 30) -> float:
    """Power iteration from a fixed start (no randomness): an estimate of :math:`\\lambda_{max}(H)`."""
    v = torch.ones_like(like)
    v = v / v.norm()
    value = 0.0
    for _ in range(iterations):
        w = hvp(v)
        value = float((v * w).sum())
        norm = w.norm()
        if float(norm) == 0.0:
            return 0.0
        v = w / norm
    return value


def implicit_hypergradient(
    inner_loss: Callable[[Tensor], Tensor],
    outer_loss: Callable[[Tensor], Tensor],
    solution: Tensor,
    hyperparameters: Sequence[Tensor],
    *,
    solver: str = "cg",
    iterations: int = 20,
    alpha: float | None = None,
) -> tuple[Tensor, list[Tensor | None]]:
    r"""Hypergradient of :math:`L_{out}(w^*(\lambda))` at an inner optimum :math:`w^* = \arg\min_w L_{in}(w, \lambda)`.

    By the implicit function theorem (:math:`\nabla_w L_{in}(w^*, \lambda) = 0`, Hessian
    :math:`H = \nabla^2_w L_{in}` positive definite),

    .. math:: \frac{d L_{out}}{d\lambda} = -\big(\partial_\lambda \nabla_w L_{in}\big)^{\top} v, \qquad H v = \nabla_w L_{out}(w^*),

    with :math:`v` from :func:`conjugate_gradient` (``solver="cg"``) or :func:`neumann_series`
    (``"neumann"``; ``alpha`` default :math:`1/\lambda_{max}(H)` by power iteration). ``inner_loss(w)``
    must depend on the hyperparameters through its graph; ``outer_loss(w)`` is assumed not to depend on
    them directly. Cost: ``iterations`` Hessian-vector products + one mixed second derivative.

    Returns:
        ``(outer loss value, [gradient or None per hyperparameter])``.
    """
    check_choice(solver, ("cg", "neumann"), "solver")
    w = solution.detach().requires_grad_(True)
    with torch.enable_grad():
        outer = outer_loss(w)
        (g_out,) = torch.autograd.grad(outer, w)
        w_inner = solution.detach().requires_grad_(True)
        (g_in,) = torch.autograd.grad(inner_loss(w_inner), w_inner, create_graph=True)

        def hvp(v: Tensor) -> Tensor:
            (hv,) = torch.autograd.grad(g_in, w_inner, grad_outputs=v, retain_graph=True)
            return hv

        if solver == "cg":
            v = conjugate_gradient(hvp, g_out, iterations)
        else:
            step = alpha if alpha is not None else 1.0 / max(_largest_eigenvalue(hvp, g_out), 1e-12)
            v = neumann_series(hvp, g_out, step, iterations)
        grads = torch.autograd.grad(-(g_in * v.detach()).sum(), list(hyperparameters), allow_unused=True)
    return outer.detach(), list(grads)


def inner_linear_loss(weights: Tensor, features: Tensor, targets: Tensor, l2: float, loss: str = "ce") -> Tensor:
    r"""RCIG's convex inner problem on features: a linear model :math:`X W` with ridge :math:`\tfrac{l_2}2\|W\|^2`.

    ``loss="ce"``: :math:`\mathrm{mean}_i\, \mathrm{CE}(x_i^\top W, y_i)` (multinomial logistic regression,
    ``targets`` class indices); ``"mse"``: :math:`\tfrac12 \mathrm{mean}_i \|x_i^\top W - y_i\|^2` (ridge
    regression, ``targets`` ``(n, C)``). Strongly convex in ``W`` for ``l2 > 0``.
    """
    out = features @ weights
    if loss == "ce":
        value = F.cross_entropy(out, targets)
    else:
        value = 0.5 * ((out - targets) ** 2).sum(1).mean()
    return value + 0.5 * l2 * (weights * weights).sum()


def solve_inner_linear(features: Tensor, targets: Tensor, l2: float, loss: str = "ce", iterations: int = 100) -> Tensor:
    """The minimiser of :func:`inner_linear_loss` (closed form for ``"mse"``, L-BFGS for ``"ce"``); detached."""
    x = features.detach()
    d = x.shape[1]
    if loss == "mse":
        n = x.shape[0]
        system = x.T @ x / n + l2 * torch.eye(d, dtype=x.dtype, device=x.device)
        return torch.linalg.solve(system, x.T @ targets.to(x.dtype) / n)
    num_classes = int(targets.max()) + 1 if targets.dim() == 1 else targets.shape[1]
    w = torch.zeros(d, max(num_classes, 2), dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=int(iterations), tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = inner_linear_loss(w, x, targets, l2, loss)
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


class ImplicitBilevelObjective(Objective):
    r"""RCIG-style implicit differentiation around a convex inner optimum (Loo et al. 2023, simplified).

    Each step: a fresh random ``arch`` network from the sampler gives frozen features
    :math:`\phi(x) = [\mathrm{embed}(x)/\sqrt d, 1]` (its last layer linearised: a linear model on the
    features is exactly the network's linearisation in the last layer); the inner problem is the
    convex :func:`inner_linear_loss` (``rcig_l2``) of :math:`W` on the synthetic features, solved by
    L-BFGS (``rcig_inner_steps``); the outer loss is :math:`\mathrm{CE}(\phi(X_T) W^*, y_T)` on a
    class-balanced real batch; its gradient with respect to S is :func:`implicit_hypergradient` with
    ``rcig_solver`` ``"cg"`` or ``"neumann"`` (``rcig_hinv_steps`` Hessian-vector products).

    **Relation to an IPM**: none: a bilevel performance objective.
    Cost: feature passes on S and T, the inner solve (on :math:`d \times C` numbers), the
    inverse-Hessian-vector product and one backward pass through the features of S.
    """

    name = "rcig"
    relation_to_ipm = "not an IPM: bilevel objective with a convex inner problem, implicit gradient"

    @classmethod
    def prepare_config(cls, config, dataset):
        check_choice(config["rcig_solver"], ("cg", "neumann"), "rcig_solver")
        _positive(config, "rcig_l2")
        _positive(config, "rcig_inner_steps", integer=True)
        _positive(config, "rcig_hinv_steps", integer=True)
        return config

    @staticmethod
    def _features(net: nn.Module, images: Tensor) -> Tensor:
        emb = net.embed(images)
        emb = emb.reshape(emb.shape[0], -1) / math.sqrt(emb[0].numel())
        return torch.cat([emb, torch.ones_like(emb[:, :1])], dim=1).double()

    def loss_and_gradients(self, networks, params):
        if not networks:
            raise ValueError("objective 'rcig' needs a sampler that draws networks (e.g. 'fresh')")
        ctx, cfg = self.ctx, self.config
        net = networks[0]
        real, real_labels = ctx.real_sampler.sample(int(cfg["batch_real"]))
        syn_feats = self._features(net, ctx.synthetic.images())
        with torch.no_grad():
            real_feats = self._features(net, real)
        labels = ctx.synthetic.labels
        l2 = float(cfg["rcig_l2"])
        w_star = solve_inner_linear(syn_feats, labels, l2, "ce", int(cfg["rcig_inner_steps"]))
        outer, grads = implicit_hypergradient(
            lambda w: inner_linear_loss(w, syn_feats, labels, l2, "ce"),
            lambda w: F.cross_entropy(real_feats @ w, real_labels),
            w_star, list(params), solver=cfg["rcig_solver"], iterations=int(cfg["rcig_hinv_steps"]),
        )
        grads = [None if g is None else g.to(p.dtype) for g, p in zip(grads, params)]
        return outer.float(), grads


# ======================================================================================= registry
OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        MatchingObjective,
        TrajectoryMatchingObjective,
        KernelInducingPointsObjective,
        RandomFeatureKRRObjective,
        UnrolledBilevelObjective,
        ImplicitBilevelObjective,
    )
}
OBJECTIVE_NAMES = tuple(OBJECTIVES)


def get_objective_class(name: str) -> type[Objective]:
    """The objective class registered as ``name`` (:data:`OBJECTIVE_NAMES`)."""
    check_choice(name, OBJECTIVE_NAMES, "objective")
    return OBJECTIVES[name]
