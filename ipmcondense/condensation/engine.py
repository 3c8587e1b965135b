r"""The one optimizer loop shared by every recipe.

Each iteration draws networks :math:`\theta` from the recipe's sampler and takes
``sampler.steps_per_draw()`` image steps on them. One image step asks the recipe's *objective*
(:mod:`ipmcondense.condensation.objectives`) for the loss and its gradients, then takes one optimiser
step (``optimizer_images``: SGD with momentum ``momentum_images``, or Adam; step ``lr_images``) on
the synthetic set's parameters, its learnable extras and the objective's own parameters (each group
with its own step). For the ``"matching"`` objective one step is:

1. draw a class-balanced real batch ``T`` from the row's ``real_batches`` selector (``batch_real`` images
   per class, class-blocked; the selector has seen the iteration's networks through ``observe``);
2. draw ONE siamese augmentation per class and apply it to that class's real and synthetic images;
3. compute the features of *all classes in one forward pass* per side (``class_batching=True``;
   ``False`` runs the reference's per-class loop, same value) and the loss
   :math:`L(S) = \sum_\theta \sum_c \sum_b w_b D(\phi^b_\theta(A_c(T_c)), \phi^b_\theta(A_c(S_c)))`
   plus the recipe's extra terms.

Other objectives: trajectory matching against an expert buffer (MTT), kernel ridge regression
(KIP, RFAD), unrolled (DD, ESP) and implicit (RCIG) bilevel objectives.

A parameterisation with losses of its own (HaBa's hallucinators:
:meth:`~ipmcondense.condensation.synthetic.SyntheticSet.decoder_training`) adds its loss to every step's
loss (gradient on the learnable tensors above) and updates its helpers after the optimiser step; their
state is checkpointed with the rest.

Non-finite values: a non-finite loss or gradient raises :class:`FloatingPointError` *before* the
step (nothing changed in memory; the last checkpoint on disk is kept); so does a learned quantity
(e.g. MTT's learning rate) that becomes non-finite after a step.

Reproducibility: every random choice (real batches, augmentation draws, network initialisation,
inner-loop shuffles, sliced projections) comes from ONE ``torch.Generator`` seeded with ``seed``;
checkpoints store its state, the synthetic set, the optimizer state, the sampler state, the iteration
and the history, so ``resume=True`` continues bit-for-bit on CPU.

Class-parallel (``shard`` given; :mod:`ipmcondense.condensation.parallel`): each rank of a
``torch.distributed`` job computes the loss of its own classes; the loss value and the non-finite checks
are all-reduced, the class blocks of S are exchanged before the sampler's between-step training, before a
checkpoint (written by rank 0, holding every rank's rows and optimizer buffers) or an evaluation, and at
the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ipmcondense import distributed
from ipmcondense._version import __version__

from .matching import (  # noqa: F401  (matching_loss & co. stay importable from here)
    MatchingLoss,
    build_augmentation,
    build_discrepancy,
    build_extra_terms,
    build_feature_map,
    matching_loss,
    siamese_augment,
)
from .objectives import Objective, ObjectiveContext, get_objective_class
from .outputs import CHECKPOINT_FILE, CHECKPOINT_FORMAT, atomic_torch_save
from .parallel import ClassShard, ClassShardDreamBatches, ClassShardRealBatches
from .real_batches import RealBatchSelector, build_real_batches
from .recipes import Recipe
from .samplers import SAMPLERS, ParameterSampler, SamplerContext
from .synthetic import SyntheticSet

__all__ = [
    "build_sampler",
    "build_real_batch_selector",
    "build_objective",
    "build_optimizer",
    "CondensationEngine",
    "EngineHistory",
]


def build_sampler(recipe: Recipe, config: dict[str, Any], ipc: int) -> ParameterSampler:
    """The row's parameter sampler (options from the flat hyperparameters; ``ipc`` for DC's loop table)."""
    return SAMPLERS.get(recipe.sampler).from_config(config, ipc=ipc)


def build_real_batch_selector(recipe: Recipe, config: dict[str, Any], dataset: Any, generator: torch.Generator,
                              device: torch.device, classes: range | None = None) -> RealBatchSelector:
    """The row's real-batch selector over the dataset's training images on ``device``.

    A row that draws no real batches itself (``real_batches=None``, e.g. MTT) still gets the ``random``
    selector, for samplers that train networks on real data; it draws nothing unless asked. With
    ``classes`` (class-parallel condensation) it keeps the images of those classes only
    (:class:`~ipmcondense.condensation.parallel.ClassShardRealBatches`,
    :class:`~ipmcondense.condensation.parallel.ClassShardDreamBatches`).
    """
    name = recipe.real_batches or "random"
    if classes is not None and name == "dream":
        return ClassShardDreamBatches(dataset.train_images.to(device), dataset.train_labels.to(device),
                                      dataset.num_classes, generator, classes,
                                      interval=int(config.get("dream_interval") or 10),
                                      max_iter=int(config.get("dream_max_iter") or 100))
    if classes is not None:
        return ClassShardRealBatches(dataset.train_images.to(device), dataset.train_labels.to(device),
                                     dataset.num_classes, generator, classes)
    return build_real_batches(name, config, images=dataset.train_images.to(device),
                              labels=dataset.train_labels.to(device), num_classes=dataset.num_classes,
                              generator=generator)


def build_objective(ctx: ObjectiveContext) -> Objective:
    """The recipe's objective (:mod:`ipmcondense.condensation.objectives`) on the engine's context."""
    return get_objective_class(ctx.recipe.objective)(ctx)


def build_optimizer(groups: list[dict[str, Any]], config: dict[str, Any]) -> torch.optim.Optimizer:
    """``optimizer_images``: ``"sgd"`` (momentum ``momentum_images``, the default) or ``"adam"`` (KIP, DD;
    betas ``adam_betas``, DD's (0.5, 0.999)).

    Groups may carry their own ``lr`` (and, for SGD, ``momentum``: MTT's learning rate uses 0.5).
    """
    from ipmcondense.ipm._validation import check_choice

    name = check_choice(config.get("optimizer_images") or "sgd", ("sgd", "adam"), "optimizer_images")
    if name == "adam":
        groups = [{k: v for k, v in g.items() if k != "momentum"} for g in groups]
        betas = tuple(config.get("adam_betas") or (0.9, 0.999))
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {config.get('adam_betas')!r}")
        return torch.optim.Adam(groups, lr=float(config["lr_images"]), betas=(float(betas[0]), float(betas[1])))
    return torch.optim.SGD(groups, lr=float(config["lr_images"]), momentum=float(config["momentum_images"]))


# ------------------------------------------------------------------------------------- the loop


@dataclass
class EngineHistory:
    """What the loop records: one entry per finished iteration."""

    losses: list[float] = field(default_factory=list)
    iteration_seconds: list[float] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "iteration_seconds": list(self.iteration_seconds),
                "evaluations": list(self.evaluations)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EngineHistory:
        return cls(list(state["losses"]), list(state["iteration_seconds"]), list(state["evaluations"]))


class CondensationEngine:
    """Runs one recipe on one dataset: the loop, checkpoints and periodic evaluation.

    Args:
        recipe: the registry row (axes).
        config: resolved hyperparameters (:func:`ipmcondense.condensation.recipes.resolve_config`).
        dataset: a :class:`ipmcondense.data.LabelledImages`.
        synthetic: the synthetic set (already on ``device``).
        build_network: builds one feature network on the CPU (default initialisation).
        seed: seeds the run's generator.
        device: where everything runs.
        out: run directory for checkpoints (``None``: no checkpoints).
        progress: show a tqdm progress bar.
        evaluate: ``fn(images, labels) -> dict`` for periodic evaluation (``config["eval_every"]``).
        shard: this rank's classes in class-parallel condensation (``None``: one process, all classes).
    """

    def __init__(
        self,
        recipe: Recipe,
        config: dict[str, Any],
        dataset: Any,
        synthetic: SyntheticSet,
        build_network: Callable[[], nn.Module],
        *,
        seed: int,
        device: torch.device,
        out: Path | None = None,
        progress: bool = True,
        evaluate: Callable[[Tensor, Tensor], dict[str, Any]] | None = None,
        shard: ClassShard | None = None,
    ) -> None:
        self.recipe, self.config, self.dataset = recipe, config, dataset
        self.shard = shard
        classes = None if shard is None else shard.classes
        self.synthetic = synthetic
        self.device = device
        self.out, self.progress, self.evaluate_fn = out, progress, evaluate
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed))
        self.sampler = build_sampler(recipe, config, synthetic.ipc)
        self.augmentation = build_augmentation(recipe, dataset)
        self.real_batches = build_real_batch_selector(recipe, config, dataset, self.generator, device, classes)
        objective_context = ObjectiveContext(
            recipe=recipe, config=config, dataset=dataset, synthetic=synthetic, generator=self.generator,
            device=device, real_batches=self.real_batches, augmentation=self.augmentation,
            build_network=build_network, classes=classes,
        )
        self.objective = build_objective(objective_context)
        # the parameterisation's own losses and helpers (HaBa's hallucinator terms), or None
        self.decoder_training = synthetic.decoder_training(objective_context)
        # the matching objective's feature map / discrepancy / extra terms (None for other objectives)
        self.feature_map = getattr(self.objective, "feature_map", None)
        self.discrepancy = getattr(self.objective, "discrepancy", None)
        self.extra_terms = getattr(self.objective, "extra_terms", [])
        self.context = SamplerContext(
            build_network=build_network,
            device=device,
            generator=self.generator,
            real_batches=self.real_batches,
            augmentation=self.augmentation,
            synthetic=lambda: (self.synthetic.images().detach(), self.synthetic.labels),
            parameter_gradients=bool(self.feature_map is not None and self.feature_map.needs_parameter_gradients),
            class_shard=shard,
        )
        groups = [{"params": synthetic.image_parameters(), "lr": float(config["lr_images"])}]
        groups += synthetic.extra_parameter_groups()
        groups += self.objective.parameter_groups()
        self.optimizer = build_optimizer(groups, config)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.iteration = 0
        self.history = EngineHistory()

    # ---------------------------------------------------------------------------------- one step
    def image_step(self, networks: Sequence[nn.Module]) -> float:
        """One image step on ``networks`` (see the module docstring); returns the loss value."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        total, grads = self.objective.loss_and_gradients(networks, params)
        if self.decoder_training is not None:
            decoder_loss = self.decoder_training.loss()
            decoder_grads = torch.autograd.grad(decoder_loss, params, allow_unused=True)
            grads = [b if a is None else (a if b is None else a + b) for a, b in zip(grads, decoder_grads)]
            total = total.detach() + decoder_loss.detach()
        if self.shard is not None and getattr(self.synthetic, "shared_gradients_are_rank_shares", False):
            # class-parallel: a learned decoder's weights (DCGM's generator) got this rank's share: sum over the ranks
            shared = {id(p) for p in self.synthetic.shared_parameters()}
            grads = [distributed.sum_over_ranks(torch.zeros_like(p) if g is None else g.detach()) if id(p) in shared
                     else g for p, g in zip(params, grads)]
        grads_finite = all(g is None or bool(torch.isfinite(g).all()) for g in grads)
        if self.shard is not None:  # the loss of all classes; every rank sees a non-finite value anywhere
            replicated = self.objective.loss_replicated_over_ranks  # every rank holds the whole loss (MTT)
            partial = torch.zeros((), dtype=torch.float64) if replicated else total.detach().double().cpu()
            reduced = distributed.all_reduce_float64(
                torch.stack([partial, torch.tensor(0.0 if grads_finite else 1.0, dtype=torch.float64)]))
            total = total.detach() if replicated else reduced[0]
            grads_finite = bool(reduced[1] == 0)
        if not bool(torch.isfinite(total.detach())):
            raise FloatingPointError(
                f"the {self.recipe.name} loss became {float(total)} at iteration {self.iteration}; "
                f"lower lr_images (now {self.config['lr_images']}){self._kept()}"
            )
        if not grads_finite:
            raise FloatingPointError(
                f"the {self.recipe.name} gradients became non-finite at iteration {self.iteration}; "
                f"lower lr_images (now {self.config['lr_images']}){self._kept()}"
            )
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.decoder_training is not None:
            self.decoder_training.after_step()
        try:
            self.objective.check_after_step(self.iteration)
        except FloatingPointError as err:
            raise FloatingPointError(f"{err}{self._kept()}") from err
        return float(total.detach())

    def _kept(self) -> str:
        if self.out is not None and (self.out / CHECKPOINT_FILE).exists():
            return f" (the last checkpoint, {self.out / CHECKPOINT_FILE}, is kept)"
        return ""

    def _set_learning_rate(self) -> None:
        total = int(self.config["iterations"])
        passed = sum(1 for f in self.config["lr_decay_at"] if self.iteration >= int(round(f * total)))
        factor = float(self.config["lr_decay"]) ** passed
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor

    def run_iteration(self) -> float:
        """One iteration: draw networks, take up to ``steps_per_draw`` image steps (fewer when the sampler's
        ``keep_stepping`` says stop); returns the mean loss."""
        self._set_learning_rate()
        networks = self.sampler.draw(self.context)
        self.real_batches.observe(networks)
        steps = self.sampler.steps_per_draw()
        losses = []
        for k in range(steps):
            losses.append(self.image_step(networks))
            if k == steps - 1 or not self.sampler.keep_stepping(networks, self.context, k):
                break
            self.synchronise()
            self.sampler.between_steps(networks, self.context, k)
        self.sampler.after_steps(networks, self.context)
        self.iteration += 1
        return sum(losses) / len(losses)

    def synchronise(self) -> None:
        """Class-parallel: give every rank every class block of S (a collective; nothing in one process)."""
        if self.shard is not None:
            self.shard.synchronise(self.synthetic)

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-for-bit resume needs (class-parallel: a collective, the merged state of all ranks)."""
        self.synchronise()
        optimizer = (self.optimizer.state_dict() if self.shard is None
                     else self.shard.merged_optimizer_state(self.optimizer, self.synthetic))
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "iteration": self.iteration,
            "synthetic": {k: v.detach().cpu().clone() for k, v in self.synthetic.state_dict().items()},
            "optimizer": optimizer,
            "generator": self.generator.get_state(),
            "sampler": self.sampler.state_dict(),
            "real_batches": self.real_batches.state_dict(),
            "objective": self.objective.state_dict(),
            "decoder_training": {} if self.decoder_training is None else self.decoder_training.state_dict(),
            "history": self.history.state_dict(),
            "config": dict(self.config),
            "recipe": self.recipe.axes(),
        }
        if self.shard is not None:
            state["world_size"] = self.shard.world_size
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_world = int(state.get("world_size", 1))
        world = 1 if self.shard is None else self.shard.world_size
        if saved_world != world:
            raise ValueError(f"the checkpoint was written by {saved_world} process(es), this run has {world}: "
                             f"resume with the same number of processes (torchrun --nproc_per_node {saved_world})")
        self.synthetic.load_state_dict(state["synthetic"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.shard is not None:
            self.shard.keep_own_optimizer_rows(self.optimizer, self.synthetic)
        self.generator.set_state(state["generator"])
        self.sampler.load_state_dict(state["sampler"], self.context)
        self.real_batches.load_state_dict(state.get("real_batches", {}))
        self.objective.load_state_dict(state.get("objective", {}))
        if self.decoder_training is not None:
            self.decoder_training.load_state_dict(state.get("decoder_training", {}))
        self.history = EngineHistory.from_state(state["history"])
        self.iteration = int(state["iteration"])

    def save_checkpoint(self) -> None:
        if self.out is None:
            return
        if self.shard is None:
            atomic_torch_save(self.state_dict(), self.out / CHECKPOINT_FILE)
        else:
            distributed.atomic_write_on_rank_zero(atomic_torch_save, self.state_dict(), self.out / CHECKPOINT_FILE)

    # ---------------------------------------------------------------------------------- the loop
    def run(self) -> EngineHistory:
        """Iterate until ``config["iterations"]``, checkpointing and evaluating as configured."""
        from tqdm.auto import tqdm

        total = int(self.config["iterations"])
        every = int(self.config["checkpoint_every"]) or max(1, math.ceil(total / 20))
        eval_every = int(self.config["eval_every"] or 0)
        bar = tqdm(total=total, initial=self.iteration, disable=not self.progress, desc=f"condense {self.recipe.name}",
                   unit="it", dynamic_ncols=True)
        try:
            while self.iteration < total:
                start = time.perf_counter()
                loss = self.run_iteration()
                self.history.losses.append(loss)
                self.history.iteration_seconds.append(time.perf_counter() - start)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}")
                if eval_every and self.evaluate_fn is not None and self.iteration % eval_every == 0:
                    self.synchronise()
                    result = self.evaluate_fn(self.synthetic.images().detach(), self.synthetic.training_labels())
                    self.history.evaluations.append({"iteration": self.iteration, **result})
                    bar.write(f"iteration {self.iteration}: accuracy {100 * result['accuracy_mean']:.2f}%")
                if self.iteration % every == 0 or self.iteration == total:
                    self.save_checkpoint()
            self.synchronise()
        finally:
            bar.close()
        return self.history
