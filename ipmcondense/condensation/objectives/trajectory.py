r"""The ``mtt`` objective: matching training trajectories (Cazenavette et al. 2022), and its loss.

:func:`trajectory_matching_loss` is MTT's normalised parameter distance; :func:`trajectory_matching_loss_and_grads`
computes it and its gradients by a reverse pass with recomputation (TESLA-like memory). The unroll itself
is :func:`ipmcondense.autodiff.unrolled_sgd`; expert buffers come from :mod:`ipmcondense.trajectories`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ipmcondense.autodiff import (
    Augmenter,
    FlatParameters,
    check_unroll_inputs,
    make_unroll_plan,
    sgd_step,
    step_size_at,
    unrolled_sgd,
)
from ipmcondense.components import option

from ..synthetic import SyntheticExtras
from .base import Objective, ObjectiveContext, check_options

__all__ = [
    "TrajectoryMatchingObjective",
    "trajectory_matching_loss",
    "trajectory_matching_loss_and_grads",
    "TrajectoryMatchingGradients",
]


def trajectory_matching_loss(student_end: Tensor, expert_start: Tensor, expert_target: Tensor) -> Tensor:
    r"""MTT's normalised parameter-matching loss.

    .. math::
        \mathcal{L} = \frac{\|\hat\theta_N - \theta^*_{t+M}\|_2^2}{\|\theta^*_t - \theta^*_{t+M}\|_2^2}

    (MTT also divides both norms by the parameter count, which cancels). Zero when the student lands
    on the expert's target; 1 when it does not move. Differentiable in ``student_end``.
    Cost: :math:`O(P)`.

    Raises:
        ValueError: shapes differ, non-finite values, or ``expert_start`` equals ``expert_target``
            (the normaliser is zero: pick ``expert_epochs >= 1`` on a trajectory that moves).
    """
    for name, value in (("student_end", student_end), ("expert_start", expert_start), ("expert_target", expert_target)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {type(value).__name__}")
    if not (student_end.shape == expert_start.shape == expert_target.shape):
        raise ValueError(
            "student_end, expert_start and expert_target must have the same shape, got "
            f"{tuple(student_end.shape)}, {tuple(expert_start.shape)} and {tuple(expert_target.shape)}"
        )
    target = expert_target.detach()
    normaliser = (expert_start.detach() - target).pow(2).sum()
    value = float(normaliser)
    if not math.isfinite(value):
        raise ValueError("expert_start and expert_target must be finite")
    if value == 0.0:
        raise ValueError(
            "expert_start equals expert_target, so the trajectory-matching normaliser is zero; "
            "use expert_epochs >= 1 on a trajectory whose parameters change"
        )
    return (student_end - target).pow(2).sum() / normaliser


class TrajectoryMatchingGradients(NamedTuple):
    """Result of :func:`trajectory_matching_loss_and_grads` (all detached).

    Attributes:
        loss: the trajectory-matching loss (0-d).
        images_grad: :math:`\\partial\\mathcal{L}/\\partial X`, shaped like ``images``.
        lrs_grad: :math:`\\partial\\mathcal{L}/\\partial \\eta`, shaped like ``lrs``.
        labels_grad: :math:`\\partial\\mathcal{L}/\\partial Y` for soft labels, else ``None``.
        student_end: the student's final parameters :math:`\\theta_N`.
    """

    loss: Tensor
    images_grad: Tensor
    lrs_grad: Tensor
    labels_grad: Tensor | None
    student_end: Tensor


def trajectory_matching_loss_and_grads(
    net: nn.Module,
    expert_start: Tensor,
    expert_target: Tensor,
    images: Tensor,
    labels: Tensor,
    lrs: Tensor | float,
    steps: int,
    batch_size: int | None = None,
    augment: Augmenter | None = None,
    generator: torch.Generator | None = None,
    soft_labels: bool = False,
    *,
    owned: Tensor | None = None,
) -> TrajectoryMatchingGradients:
    r"""MTT loss and its gradients by a reverse pass with recomputation (TESLA-like memory).

    Forward: the student unroll of :func:`unrolled_sgd` from :math:`\theta_0 = \theta^*_t` without
    graphs, keeping only the iterates :math:`\theta_0, \dots, \theta_{N-1}`. Backward: with the
    adjoint :math:`a_N = \partial\mathcal{L}/\partial\theta_N = 2(\theta_N - \theta^*_{t+M}) / D`,
    walk :math:`i = N-1, \dots, 0`, rebuild step :math:`i`'s graph
    :math:`\theta_{i+1} = \theta_i - \eta_i g_i(\theta_i, X, Y)` alone and take one vector-Jacobian
    product

    .. math::
        a_i = a_{i+1} - \eta_i H_i a_{i+1}, \quad
        \nabla_X \mathrel{+}= -\eta_i \big(\partial_X g_i\big)^{\!\top} a_{i+1}, \quad
        \nabla_{\eta_i} = -\langle g_i, a_{i+1} \rangle,

    (and likewise for soft labels). The result equals the gradient of the full unroll of
    :func:`unrolled_sgd` + :func:`trajectory_matching_loss` (same batches and augmentations for the
    same ``generator`` state) up to floating-point rounding.

    Args: as :func:`unrolled_sgd`; ``expert_start`` / ``expert_target`` are :math:`\theta^*_t` and
    :math:`\theta^*_{t+M}` (``(P,)``), the student starts at ``expert_start``. ``owned`` (class-parallel):
    this rank's rows of ``images``; every step sums the ranks' gradients of their own rows and the reverse
    pass sums their Hessian-vector products (:func:`~ipmcondense.autodiff.sgd_step`), so the iterates and
    adjoints are replicated and ``images_grad`` is nonzero on the own rows only.

    Returns:
        :class:`TrajectoryMatchingGradients`. To feed an optimizer, set ``images.grad`` (or call
        ``decoded_images.backward(images_grad)`` when the images are decoded from other parameters).

    Cost: about 1.5x the time of the full unroll (every step's forward and backward are run twice);
    memory: :math:`N` parameter vectors (:math:`NP` numbers) plus the graph of a single step,
    instead of the activations and graphs of all :math:`N` steps.
    """
    layout = FlatParameters(net)
    theta0, images, labels, lrs, steps, batch_size = check_unroll_inputs(
        layout, expert_start, images, labels, lrs, steps, batch_size, soft_labels
    )
    layout.check_vector(expert_target, "expert_target")
    plan = make_unroll_plan(images.shape[0], steps, batch_size, augment, generator, images.device)

    images_leaf = images.detach().requires_grad_(True)
    lrs_leaf = lrs.detach().requires_grad_(True)
    labels_leaf = labels.detach().requires_grad_(True) if soft_labels else labels.detach()

    # forward without graphs: keep theta_0 .. theta_{N-1}
    iterates: list[Tensor | None] = []
    theta = theta0.detach()
    for step in range(steps):
        iterates.append(theta)
        nxt = sgd_step(
            net, layout, theta.detach().requires_grad_(True), images_leaf.detach(), labels_leaf.detach(),
            step_size_at(lrs_leaf.detach(), step), plan, step, augment, create_graph=False, owned=owned,
        )
        theta = nxt.detach()
    student_end = theta

    end = student_end.requires_grad_(True)
    loss = trajectory_matching_loss(end, expert_start.detach(), expert_target.detach())
    (adjoint,) = torch.autograd.grad(loss, end)
    student_end = student_end.detach()

    images_grad = torch.zeros_like(images_leaf)
    lrs_grad = torch.zeros_like(lrs_leaf)
    labels_grad = torch.zeros_like(labels_leaf) if soft_labels else None
    for step in reversed(range(steps)):
        theta_i = iterates[step].detach().requires_grad_(True)  # type: ignore[union-attr]
        nxt = sgd_step(
            net, layout, theta_i, images_leaf, labels_leaf, step_size_at(lrs_leaf, step), plan, step, augment,
            create_graph=True, owned=owned,
        )
        inputs = [theta_i, images_leaf, lrs_leaf] + ([labels_leaf] if soft_labels else [])
        grads = torch.autograd.grad(nxt, inputs, grad_outputs=adjoint, allow_unused=True)
        adjoint = grads[0].detach()
        if grads[1] is not None:
            images_grad += grads[1]
        if grads[2] is not None:
            lrs_grad += grads[2]
        if soft_labels and grads[3] is not None:
            labels_grad += grads[3]
        iterates[step] = None  # release memory as we go
    return TrajectoryMatchingGradients(loss.detach(), images_grad, lrs_grad, labels_grad, student_end)


class TrajectoryMatchingObjective(Objective):
    r"""MTT: match an expert's parameter trajectory with N student steps on S (Cazenavette et al. 2022).

    Each step: draw an expert and a start epoch :math:`t \sim U\{0, \dots, T^+ - 1\}` from the buffer
    (``max_start_epoch`` :math:`T^+`, default every valid start), start the student at
    :math:`\theta^*_t`, take ``syn_steps`` :math:`N` differentiable SGD steps on the synthetic set
    (mini-batches of ``batch_syn``, default all; per-sample DSA when the row augments) with the
    learnable step size :math:`\eta` of the synthetic set, and return
    :math:`\|\theta^S_N - \theta^*_{t+M}\|^2 / \|\theta^*_t - \theta^*_{t+M}\|^2` (``expert_epochs`` :math:`M`).

    Options: ``memory_lean=True`` computes the same gradients by a reverse pass with recomputation
    (:func:`trajectory_matching_loss_and_grads`, memory of N parameter
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
    uses_real_batches = False
    #: in class-parallel condensation the student (hence the loss) is replicated on every rank
    loss_replicated_over_ranks = True

    @dataclass(frozen=True)
    class Options:
        experts: str | None = option(None, "a buffer made by `ipmcondense experts` (MTT buffer.py)")
        syn_steps: int = option(20, "MTT distill.py: --syn_steps 20 (CIFAR-10 IPC 10 row)")
        expert_epochs: int = option(2, "MTT distill.py: --expert_epochs 2")
        max_start_epoch: int | None = option(None, "None: every valid start; MTT: --max_start_epoch 20")
        batch_syn: int | None = option(None, "None: the whole synthetic set per student step (MTT default)")
        lr_teacher: float | None = option(None, "None: the buffer's training lr (MTT --lr_teacher 0.01)")
        lr_lr: float = option(1e-5, "MTT distill.py: --lr_lr 1e-05")
        memory_lean: bool = option(False, "TESLA-style reverse pass with recomputation")
        soft_labels: bool = option(False, "DATM-style learned soft labels")
        lr_labels: float = option(2.0, "DATM: --lr_y 2.0")

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
        check_options(config, integers=("syn_steps", "expert_epochs"))
        if config["expert_epochs"] > buffer.epochs:
            raise ValueError(
                f"expert_epochs ({config['expert_epochs']}) exceeds the {buffer.epochs} epochs of the expert buffer "
                f"at {config['experts']!r}"
            )
        largest = buffer.epochs - config["expert_epochs"] + 1
        if config["max_start_epoch"] is not None:
            check_options(config, integers=("max_start_epoch",))
            if config["max_start_epoch"] > largest:
                raise ValueError(
                    f"max_start_epoch ({config['max_start_epoch']}) + expert_epochs ({config['expert_epochs']}) - 1 "
                    f"exceeds the {buffer.epochs} epochs of the expert buffer; use max_start_epoch <= {largest}"
                )
        if config["batch_syn"] is not None:
            check_options(config, integers=("batch_syn",))
        if config["lr_teacher"] is None:
            config["lr_teacher"] = buffer.lr
        check_options(config, ("lr_teacher", "lr_lr", "lr_labels"))
        return config

    @classmethod
    def synthetic_extras(cls, images, labels, dataset, config):
        logits = None
        if config["soft_labels"]:
            buffer = _open_buffer(config, dataset)
            expert = buffer.network(0, buffer.epochs).eval()
            with torch.no_grad():
                logits = expert(images.float()).detach()
        return SyntheticExtras(learning_rate=float(config["lr_teacher"]), lr_lr=float(config["lr_lr"]),
                               label_logits=logits, lr_labels=float(config["lr_labels"]))

    def _labels(self) -> Tensor:
        syn = self.ctx.synthetic
        return syn.soft_labels() if self.config["soft_labels"] else syn.labels

    def loss_and_gradients(self, networks, params):
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
        owned = None
        if ctx.classes is not None:  # class-parallel: own rows' gradients, summed over the ranks in every step
            owned = (syn.labels >= ctx.classes.start) & (syn.labels < ctx.classes.stop)
        if cfg["memory_lean"]:
            result = trajectory_matching_loss_and_grads(
                self.template, sample.params_start, sample.params_target, images.detach(), labels.detach(),
                lr.detach(), steps, batch, self.augment, ctx.generator, soft, owned=owned,
            )
            outputs, seeds = [images, lr], [result.images_grad, result.lrs_grad.reshape(lr.shape)]
            if soft:
                outputs.append(labels)
                seeds.append(result.labels_grad)
            grads = torch.autograd.grad(outputs, params, grad_outputs=seeds, allow_unused=True)
            return result.loss, self._summed_shared_gradients(params, list(grads))
        end = unrolled_sgd(
            self.template, sample.params_start, images, labels, lr, steps, batch, self.augment, ctx.generator, soft,
            owned=owned,
        )
        total = trajectory_matching_loss(end, sample.params_start, sample.params_target)
        grads = torch.autograd.grad(total, params, allow_unused=True)
        return total.detach(), self._summed_shared_gradients(params, list(grads))

    def _summed_shared_gradients(self, params: list, grads: list) -> list:
        """Class-parallel: the gradient of a decoder parameter shared by every class (HaBa's hallucinators) is
        each rank's share (through its own images' rows), so it is summed over the ranks; one process: as is."""
        if self.ctx.classes is None:
            return grads
        from ipmcondense.distributed import sum_over_ranks

        shared = {id(p) for p in self.ctx.synthetic.shared_parameters()}
        for i, p in enumerate(params):
            if id(p) in shared:
                grads[i] = sum_over_ranks(torch.zeros_like(p) if grads[i] is None else grads[i].detach())
        return grads

    def check_after_step(self, iteration):
        lr = self.ctx.synthetic.learning_rate
        if not bool(torch.isfinite(lr.detach())):
            raise FloatingPointError(
                f"the learned synthetic learning rate became {float(lr.detach())} at iteration {iteration}; "
                f"lower lr_lr (now {self.config['lr_lr']}) or lr_images"
            )


def _open_buffer(config: dict[str, Any], dataset: Any, method: str = "mtt"):
    from ipmcondense.trajectories import ExpertBuffer

    path = config.get("experts")
    if path is None:
        raise ValueError(
            f"method {method!r} needs an expert buffer: pass --experts DIR (Python: experts=DIR). Make one with: "
            f"ipmcondense experts --dataset {dataset.name} --arch {config['arch']} --n-experts K --epochs E --out DIR"
        )
    if not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
        raise TypeError(f"experts must be a directory path, got {type(path).__name__}")
    buffer = ExpertBuffer(path, dataset=dataset, arch=config["arch"])
    wanted = float(config["zca_eps"]) if config.get("zca") else None
    if buffer.zca_eps != wanted:
        have = "plain data" if buffer.zca_eps is None else f"ZCA-whitened data (eps {buffer.zca_eps})"
        need = "plain data (zca false)" if wanted is None else f"ZCA-whitened data (zca true, zca_eps {wanted})"
        flag = "" if wanted is None else f" --zca --zca-eps {wanted}"
        raise ValueError(
            f"the expert buffer at {str(path)!r} was trained on {have}, but this run condenses {need}: the student "
            f"must see the experts' inputs. Make a matching buffer with: ipmcondense experts --dataset "
            f"{dataset.name} --arch {config['arch']}{flag} --n-experts K --epochs E --out DIR"
        )
    return buffer
