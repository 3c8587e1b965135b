"""The objective protocol: what one image step of the engine asks for, and the run context it may use."""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ipmcondense.components import Component
from ipmcondense.ipm._validation import check_positive_int, check_positive_number
from ipmcondense.nets import build_isolated, draw_seed

from ..real_batches import RealBatchSelector
from ..synthetic import SyntheticExtras, SyntheticSet

if TYPE_CHECKING:
    from ..recipes import Recipe

__all__ = ["ObjectiveContext", "Objective", "draw_network", "check_options"]


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
        real_batches: the ``real_batches`` axis: ``sample(n_per_class) -> (images, labels)``, class-blocked.
        augmentation: the recipe's augmentation (siamese ``draw``/``apply`` and per-sample ``__call__``).
        build_network: builds one network of ``config["arch"]`` on the CPU (default initialisation).
        classes: the classes this rank owns in class-parallel condensation
            (:mod:`ipmcondense.condensation.parallel`); ``None``: all (one process).
    """

    recipe: Recipe
    config: dict[str, Any]
    dataset: Any
    synthetic: SyntheticSet
    generator: torch.Generator
    device: torch.device
    real_batches: RealBatchSelector
    augmentation: Any
    build_network: Callable[[], nn.Module]
    classes: range | None = None


def draw_network(ctx: ObjectiveContext, build: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A network initialised from a seed drawn from the run's generator (global RNG untouched)."""
    return build_isolated(build or ctx.build_network, draw_seed(ctx.generator)).to(ctx.device)


def check_options(config: dict[str, Any], positive: tuple[str, ...] = (), *, integers: tuple[str, ...] = (),
                  non_negative: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError`` naming the first option of ``config`` that is not a positive (or non-negative) number
    (``integers``: positive integers)."""
    for key in integers:
        check_positive_int(config[key], key)
    for key in positive:
        check_positive_number(config[key], key)
    for key in non_negative:
        check_positive_number(config[key], key, allow_zero=True)


class Objective(Component, ABC):
    """One value on the objective axis (a component: ``name``, ``Options``, built on the run's context).

    Subclasses implement :meth:`loss` (a differentiable scalar) or override
    :meth:`loss_and_gradients` (when the gradient is not obtained by plain backpropagation: the
    memory-lean MTT reverse pass, RCIG's implicit gradient).

    Class attributes:
        name: registry key.
        relation_to_ipm: one sentence, as in the recipe row.
    """

    kind = "objective"
    relation_to_ipm: str = ""
    #: the parameter sampler the objective needs when a row does not name one
    default_sampler: str = "none"
    #: whether the objective draws real batches (the ``real_batches`` axis applies)
    uses_real_batches: bool = True
    #: in class-parallel condensation, ``False`` when each rank's loss is the sum over its own classes (the
    #: engine sums the ranks' values) and ``True`` when every rank computes the same whole loss (MTT's student)
    loss_replicated_over_ranks: bool = False

    def __init__(self, ctx: ObjectiveContext) -> None:
        self.ctx = ctx
        self.config = ctx.config

    # ---------------------------------------------------------------- before the engine exists
    @classmethod
    def prepare_config(cls, config: dict[str, Any], dataset: Any) -> dict[str, Any]:
        """Validate the objective's hyperparameters (before any output is written); may fill defaults."""
        return config

    @classmethod
    def synthetic_extras(cls, images: Tensor, labels: Tensor, dataset: Any, config: dict[str, Any]) -> SyntheticExtras | None:
        """Learnable extras the synthetic set must carry for this objective (none by default)."""
        return None

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

    def learned_schedule(self) -> Any:
        """The training schedule learned with the set (a :class:`~ipmcondense.evaluation.LearnedSchedule`, DD),
        which the evaluation replays; ``None`` (the default) for the standard protocol."""
        return None

    def check_after_step(self, iteration: int) -> None:
        """Raise if the optimiser step left a learnable quantity invalid (default: nothing to check)."""

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """State beyond the synthetic set, optimiser and generator (for checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
