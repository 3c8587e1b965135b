r"""The one optimizer loop shared by every recipe.

Each iteration draws networks :math:`\theta` from the recipe's sampler and takes
``sampler.steps_per_draw()`` image steps on them. One image step:

1. sample a class-balanced real batch ``T`` (``batch_real`` images per class, class-blocked);
2. draw ONE siamese augmentation per class and apply it to that class's real and synthetic images;
3. compute the features of *all classes in one forward pass* per side (``class_batching=True``;
   ``False`` runs the reference's per-class loop, same value) and the loss
   :math:`L(S) = \sum_\theta \sum_c \sum_b w_b D(\phi^b_\theta(A_c(T_c)), \phi^b_\theta(A_c(S_c)))`
   plus the recipe's extra terms;
4. one SGD step (momentum 0.5, ``lr_images``) on the synthetic set's parameters.

Reproducibility: every random choice (real batches, augmentation draws, network initialisation,
inner-loop shuffles, sliced projections) comes from ONE ``torch.Generator`` seeded with ``seed``;
checkpoints store its state, the synthetic set, the optimizer state, the sampler state, the iteration
and the history, so ``resume=True`` continues bit-for-bit on CPU.
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

from ipmcondense import __version__
from ipmcondense.features import FeatureMap, get_feature_map, segments_from_labels

from .discrepancies import Discrepancy, ExtraTerm, get_discrepancy, get_extra_term
from .outputs import CHECKPOINT_FILE, CHECKPOINT_FORMAT, atomic_torch_save
from .recipes import Recipe
from .samplers import ParameterSampler, SamplerContext, get_sampler
from .synthetic import SyntheticSet

__all__ = [
    "MatchingLoss",
    "matching_loss",
    "siamese_augment",
    "build_feature_map",
    "build_discrepancy",
    "build_extra_terms",
    "build_sampler",
    "build_augmentation",
    "CondensationEngine",
    "EngineHistory",
]


@dataclass
class MatchingLoss:
    """The loss of one image step on one network: ``total = sum(per_class) + sum(extras)``."""

    total: Tensor
    per_class: list[Tensor]
    extras: list[Tensor]


def matching_loss(
    net: nn.Module,
    feature_map: FeatureMap,
    discrepancy: Discrepancy,
    real_images: Tensor,
    real_labels: Tensor,
    synthetic_images: Tensor,
    synthetic_labels: Tensor,
    *,
    class_batching: bool = True,
    extra_terms: Sequence[ExtraTerm] = (),
    generator: torch.Generator | None = None,
) -> MatchingLoss:
    r""":math:`\sum_c \sum_b w_b D(\phi^b(T_c), \phi^b(S_c))` + extra terms, for class-blocked inputs.

    Both sides must hold the same classes in the same block order. With ``class_batching`` the feature
    map sees all classes of one side in one batch (one forward pass); otherwise it is called once per
    class and side (the reference loop). Both give the same value up to floating-point rounding (for
    networks without batch statistics). Extra terms always see the whole batch.

    Cost: per side one (batched) or ``n_classes`` (loop) feature-map calls; the discrepancy per class.
    """
    real_segments = segments_from_labels(real_labels)
    syn_segments = segments_from_labels(synthetic_labels)
    real_classes = [int(real_labels[s.start]) for s in real_segments]
    syn_classes = [int(synthetic_labels[s.start]) for s in syn_segments]
    if real_classes != syn_classes:
        raise ValueError(
            f"real and synthetic batches must hold the same class blocks in the same order, got "
            f"{real_classes} and {syn_classes}"
        )
    per_class: list[Tensor] = []
    if class_batching:
        fr = feature_map(net, real_images, real_labels, real_segments, differentiable=False)
        fs = feature_map(net, synthetic_images, synthetic_labels, syn_segments, differentiable=True)
        for i, (rs, ss) in enumerate(zip(real_segments, syn_segments)):
            per_class.append(_class_term(fr, fs, i, rs, ss, discrepancy, generator))
    else:
        for rs, ss in zip(real_segments, syn_segments):
            r_rows, s_rows = slice(0, rs.stop - rs.start), slice(0, ss.stop - ss.start)
            fr = feature_map(net, real_images[rs], real_labels[rs], [r_rows], differentiable=False)
            fs = feature_map(net, synthetic_images[ss], synthetic_labels[ss], [s_rows], differentiable=True)
            per_class.append(_class_term(fr, fs, 0, r_rows, s_rows, discrepancy, generator))
    extras = [
        term(net, real_images, real_labels, synthetic_images, synthetic_labels, real_segments, syn_segments)
        for term in extra_terms
    ]
    total = torch.stack(per_class).sum()
    for e in extras:
        total = total + e
    return MatchingLoss(total, per_class, extras)


def _class_term(fr, fs, index, real_rows, syn_rows, discrepancy, generator) -> Tensor:
    term = None
    for br, bs in zip(fr, fs):
        value = bs.weight * discrepancy(br.segment(index, real_rows), bs.segment(index, syn_rows), generator=generator)
        term = value if term is None else term + value
    return term


def siamese_augment(
    augmentation: Any,
    real_images: Tensor,
    real_labels: Tensor,
    synthetic_images: Tensor,
    synthetic_labels: Tensor,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Apply one augmentation draw per class to that class's real AND synthetic images (siamese).

    Draws are taken class by class from ``generator`` in class order. Differentiable in both inputs.
    """
    real_segments = segments_from_labels(real_labels)
    syn_segments = segments_from_labels(synthetic_labels)
    real_out, syn_out = [], []
    for rs, ss in zip(real_segments, syn_segments):
        draw = augmentation.draw(generator)
        real_out.append(augmentation.apply(real_images[rs], draw))
        syn_out.append(augmentation.apply(synthetic_images[ss], draw))
    return torch.cat(real_out), torch.cat(syn_out)


# ------------------------------------------------------------------------------ builders from a config


def build_feature_map(recipe: Recipe, config: dict[str, Any]) -> FeatureMap:
    name = recipe.feature_map
    options: dict[str, Any] = {}
    if name == "layers":
        options = {"layer_weights": config["layer_weights"], "embedding_weight": config["embedding_weight"]}
    elif name == "attention":
        options = {
            "power": config["attention_power"],
            "attention_weight": config["attention_weight"],
            "embedding_weight": config["embedding_weight"],
        }
    elif name == "gradients":
        options = {"mode": config["gradient_mode"]}
    return get_feature_map(name, **options)


def build_discrepancy(recipe: Recipe, config: dict[str, Any]) -> Discrepancy:
    name = recipe.discrepancy
    options: dict[str, Any] = {}
    if name == "mmd":
        options = {"bandwidth": config["bandwidth"], "estimator": config["estimator"]}
    elif name == "sinkhorn":
        options = {"blur": config["blur"]}
    elif name == "sliced":
        options = {"n_projections": config["n_projections"]}
    return get_discrepancy(name, **options)


def build_extra_terms(recipe: Recipe, config: dict[str, Any]) -> list[ExtraTerm]:
    weight_key = {"synthetic_ce": "ce_weight", "prototype_discrimination": "inner_weight"}
    return [get_extra_term(name, config[weight_key[name]]) for name in recipe.extra_terms]


def build_sampler(recipe: Recipe, config: dict[str, Any], ipc: int) -> ParameterSampler:
    keys = ("outer_loop", "inner_loop", "lr_net", "batch_train", "pool_size", "generate_interval", "fetch",
            "train_steps", "lr_pool", "batch_pool")
    return get_sampler(recipe.sampler, ipc=ipc, **{k: config[k] for k in keys})


def build_augmentation(recipe: Recipe, dataset: Any) -> Any:
    from ipmcondense.augment import DifferentiableSiameseAugmentation, NoAugmentation, dsa_strategy_for

    if recipe.augmentation == "dsa":
        return DifferentiableSiameseAugmentation(dsa_strategy_for(dataset))
    return NoAugmentation()


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
    ) -> None:
        from ipmcondense.data import ClassBalancedSampler

        self.recipe, self.config, self.dataset = recipe, config, dataset
        self.synthetic = synthetic
        self.device = device
        self.out, self.progress, self.evaluate_fn = out, progress, evaluate
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed))
        self.feature_map = build_feature_map(recipe, config)
        self.discrepancy = build_discrepancy(recipe, config)
        self.extra_terms = build_extra_terms(recipe, config)
        self.sampler = build_sampler(recipe, config, synthetic.ipc)
        self.augmentation = build_augmentation(recipe, dataset)
        self.real_sampler = ClassBalancedSampler(
            dataset.train_images.to(device), dataset.train_labels.to(device), dataset.num_classes, self.generator
        )
        self.context = SamplerContext(
            build_network=build_network,
            device=device,
            generator=self.generator,
            real_sampler=self.real_sampler,
            augmentation=self.augmentation,
            synthetic=lambda: (self.synthetic.images().detach(), self.synthetic.labels),
            parameter_gradients=self.feature_map.needs_parameter_gradients,
        )
        groups = [{"params": synthetic.image_parameters(), "lr": float(config["lr_images"])}]
        groups += synthetic.extra_parameter_groups()
        self.optimizer = torch.optim.SGD(groups, lr=float(config["lr_images"]), momentum=float(config["momentum_images"]))
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.iteration = 0
        self.history = EngineHistory()

    # ---------------------------------------------------------------------------------- one step
    def image_step(self, networks: Sequence[nn.Module]) -> float:
        """One image step on ``networks`` (see the module docstring); returns the loss value."""
        cfg = self.config
        real, real_labels = self.real_sampler.sample(int(cfg["batch_real"]))
        syn, syn_labels = self.synthetic.images(), self.synthetic.labels
        real_aug, syn_aug = siamese_augment(self.augmentation, real, real_labels, syn, syn_labels, self.generator)
        total = None
        for net in networks:
            result = matching_loss(
                net, self.feature_map, self.discrepancy, real_aug, real_labels, syn_aug, syn_labels,
                class_batching=bool(cfg["class_batching"]), extra_terms=self.extra_terms,
                generator=self.generator,
            )
            total = result.total if total is None else total + result.total
        if not bool(torch.isfinite(total.detach())):
            raise FloatingPointError(
                f"the {self.recipe.name} loss became {float(total)} at iteration {self.iteration}; "
                f"lower lr_images (now {cfg['lr_images']})"
            )
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grads = torch.autograd.grad(total, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total.detach())

    def _set_learning_rate(self) -> None:
        total = int(self.config["iterations"])
        passed = sum(1 for f in self.config["lr_decay_at"] if self.iteration >= int(round(f * total)))
        factor = float(self.config["lr_decay"]) ** passed
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor

    def run_iteration(self) -> float:
        """One iteration: draw networks, take ``steps_per_draw`` image steps; returns the mean loss."""
        self._set_learning_rate()
        networks = self.sampler.draw(self.context)
        steps = self.sampler.steps_per_draw()
        losses = []
        for k in range(steps):
            losses.append(self.image_step(networks))
            if k < steps - 1:
                self.sampler.between_steps(networks, self.context, k)
        self.iteration += 1
        return sum(losses) / len(losses)

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-for-bit resume needs."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "iteration": self.iteration,
            "synthetic": {k: v.detach().cpu().clone() for k, v in self.synthetic.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "sampler": self.sampler.state_dict(),
            "history": self.history.state_dict(),
            "config": dict(self.config),
            "recipe": self.recipe.axes(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.synthetic.load_state_dict(state["synthetic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.sampler.load_state_dict(state["sampler"], self.context)
        self.history = EngineHistory.from_state(state["history"])
        self.iteration = int(state["iteration"])

    def save_checkpoint(self) -> None:
        if self.out is not None:
            atomic_torch_save(self.state_dict(), self.out / CHECKPOINT_FILE)

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
                    result = self.evaluate_fn(self.synthetic.images().detach(), self.synthetic.training_labels())
                    self.history.evaluations.append({"iteration": self.iteration, **result})
                    bar.write(f"iteration {self.iteration}: accuracy {100 * result['accuracy_mean']:.2f}%")
                if self.iteration % every == 0 or self.iteration == total:
                    self.save_checkpoint()
        finally:
            bar.close()
        return self.history
