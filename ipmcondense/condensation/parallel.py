r"""Class-parallel condensation: ranks of a ``torch.distributed`` job own disjoint class blocks of S.

Launched with ``torchrun --nproc_per_node W -m ipmcondense condense ...`` (or any caller that initialised a
process group before :func:`ipmcondense.condensation.api.condense`), rank ``r`` owns the classes
:func:`ipmcondense.distributed.classes_of_rank` gives it: their rows of the synthetic set and their real
images (the other classes' real images are dropped on that rank). The per-class matching loss
:math:`\sum_{c} D(\phi_\theta(A_c(T_c)), \phi_\theta(A_c(S_c)))` splits into independent sums over the
class blocks, so each rank computes and differentiates only its own classes' terms.

**Same result as one process.** Every rank consumes the run's ONE generator exactly as a single process
does: it draws the network initialisations (all ranks see the same :math:`\theta`), the permutation of
*every* class for the real batch (:class:`ClassShardRealBatches` keeps the rows of its own classes) and the
siamese augmentation of *every* class (applied to its own). The optimiser step on a rank changes only its
rows (the other rows get a zero gradient: SGD's momentum buffer and Adam's moments stay zero there, so
they do not move). Whenever every class is needed the blocks are exchanged with one ``all_reduce`` of the
rows owned by each rank, zero elsewhere (exact: :math:`x + 0 = x`): before DC's inner loop (its network is
trained on the whole synthetic set, identically on every rank), before a checkpoint or an evaluation and at
the end. So the synthetic set equals the single-process one bit for bit wherever the per-class arithmetic
is the same; the loss history (a float64 all-reduce of per-rank float32 partial sums instead of one float32
sum) agrees to float32 rounding.

Supported rows and what they synchronise (everything else raises a ``ValueError`` naming the recipe):

=============================  ===============================================================================
``dm``, ``m3d``,               fresh frozen networks; nothing but the loss value (8 bytes) per step, and S at
``wasserstein``, ``datadam``   checkpoints / evaluations / the end
``dc``, ``dsa``                S (all classes) before each inner-loop network update: the network is trained
                               on every class, replicated on every rank
=============================  ===============================================================================

Not supported, with the reason: ``dcc`` (one joint discrepancy over all classes), ``cafe`` (its discriminative
extra term sees every class), ``lcmat`` (the network perturbation uses every class), ``idm`` (the model queue is
trained on real batches of every class, and its cross-entropy term sees all of S), ``idc`` (the same queue and a
multi-formation S), ``mtt`` (the student network is trained on all of S in every step), ``kip``/``rfad`` (one
kernel ridge regression over all of S), ``dd``/``rcig`` (bilevel over all of S), the ``sliced`` discrepancy
(it draws projections per class from the generator) and the ``dream`` real batches. Networks with batch
normalisation are refused too (their features would depend on which classes share the batch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ipmcondense import distributed

from .real_batches import RealBatchSelector
from .recipes import MatchingRecipe, Recipe

__all__ = ["ClassShard", "ClassShardRealBatches", "check_class_parallel", "UNSUPPORTED_REASONS"]

#: why a row cannot be split over classes (the error names the recipe and quotes this)
UNSUPPORTED_REASONS = {
    "dcc": "its discrepancy is one joint term over all classes (gradient_cosine_joint)",
    "cafe": "its prototype_discrimination extra term sees every class",
    "lcmat": "its network perturbation is computed from every class",
    "idm": "its model queue is trained on real batches of every class and its synthetic_ce term sees all of S",
    "idc": "its model queue is trained on real batches of every class and S is multi-formation",
    "mtt": "its student network is trained on all of S in every step",
    "kip": "its kernel ridge regression couples all of S",
    "rfad": "its kernel ridge regression couples all of S",
    "dd": "its unrolled inner training uses all of S",
    "rcig": "its implicit inner problem uses all of S",
}
_SUPPORTED_SAMPLERS = ("fresh", "fresh_inner")
_GENERATOR_DISCREPANCIES = ("sliced",)


def check_class_parallel(recipe: Recipe, config: dict[str, Any], network: nn.Module, world_size: int,
                         num_classes: int) -> None:
    """Raise ``ValueError`` naming the recipe (and the axis) when the row cannot run class-parallel."""
    if recipe.is_selection:
        return
    base = recipe.name.split("+", 1)[0]
    problem = None
    if not isinstance(recipe, MatchingRecipe):
        problem = UNSUPPORTED_REASONS.get(base, f"objective {getattr(recipe, 'objective', '?')!r} couples all classes")
    elif recipe.extra_terms:
        problem = UNSUPPORTED_REASONS.get(base, f"its extra terms {list(recipe.extra_terms)} see every class")
    elif recipe.sampler not in _SUPPORTED_SAMPLERS:
        problem = UNSUPPORTED_REASONS.get(base, f"sampler {recipe.sampler!r} trains networks on every class")
    elif recipe.discrepancy == "gradient_cosine_joint":
        problem = UNSUPPORTED_REASONS["dcc"]
    elif recipe.discrepancy in _GENERATOR_DISCREPANCIES:
        problem = f"discrepancy {recipe.discrepancy!r} draws random projections per class from the run's generator"
    elif recipe.synthetic != "pixels":
        problem = f"synthetic {recipe.synthetic!r} is not class-blocked pixels"
    elif (recipe.real_batches or "random") != "random":
        problem = f"real_batches {recipe.real_batches!r} is not supported (only 'random')"
    elif float(config.get("lcmat_weight") or 0.0) > 0:
        problem = UNSUPPORTED_REASONS["lcmat"]
    elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules()):
        problem = f"arch {config.get('arch')!r} has batch normalisation (features would depend on the batch's classes)"
    if problem is not None:
        raise ValueError(
            f"recipe {recipe.name!r} cannot run class-parallel over {world_size} processes: {problem}; "
            "run it in one process (without torchrun)"
        )
    distributed.classes_of_rank(num_classes, 0, world_size)  # more ranks than classes: a clear error


class ClassShard:
    """This rank's classes and the exchanges of the synthetic set's class blocks.

    Args:
        classes: the contiguous block of classes this rank owns.
        num_classes: all classes.
        world_size: number of ranks.
    """

    def __init__(self, classes: range, num_classes: int, world_size: int) -> None:
        self.classes, self.num_classes, self.world_size = classes, int(num_classes), int(world_size)

    @classmethod
    def of_this_rank(cls, num_classes: int) -> ClassShard:
        return cls(distributed.classes_of_rank(num_classes), num_classes, distributed.world_size())

    def owned(self, labels: Tensor) -> Tensor:
        """Boolean mask of the rows whose (hard) label is one of this rank's classes."""
        return (labels >= self.classes.start) & (labels < self.classes.stop)

    def own_rows(self, labels: Tensor) -> Tensor:
        """Indices of this rank's rows (in order)."""
        return torch.nonzero(self.owned(labels), as_tuple=True)[0]

    def _merged(self, tensor: Tensor, labels: Tensor) -> Tensor:
        """The tensor whose rows come from their owners: all-reduce of the own rows, zeros elsewhere (exact)."""
        mask = self.owned(labels).to(tensor.device).reshape(-1, *([1] * (tensor.dim() - 1)))
        mine = torch.where(mask, tensor.detach(), torch.zeros((), dtype=tensor.dtype, device=tensor.device))
        device = distributed.communication_device()
        sent = mine.to(device)
        torch.distributed.all_reduce(sent, op=torch.distributed.ReduceOp.SUM)
        return sent.to(tensor.device)

    def synchronise(self, synthetic: Any) -> None:
        """Give every rank every class block of the synthetic set (one all-reduce of its stored images)."""
        with torch.no_grad():
            for param in synthetic.image_parameters():
                param.copy_(self._merged(param, synthetic.labels))

    def merged_optimizer_state(self, optimizer: torch.optim.Optimizer, synthetic: Any) -> dict[str, Any]:
        """The optimizer's state dict with every per-row buffer of the images merged from the owners
        (what a single process would hold); a collective: every rank calls it."""
        state = optimizer.state_dict()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        images = {id(p) for p in synthetic.image_parameters()}
        for index, param in enumerate(params):
            if id(param) not in images or index not in state["state"]:
                continue
            entry = dict(state["state"][index])
            for key, value in entry.items():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    entry[key] = self._merged(value, synthetic.labels)
            state["state"][index] = entry
        return state

    def keep_own_optimizer_rows(self, optimizer: torch.optim.Optimizer, synthetic: Any) -> None:
        """Zero the other ranks' rows of the images' optimizer buffers (after loading a merged checkpoint), so
        this rank's step leaves those rows where their owner put them."""
        images = {id(p) for p in synthetic.image_parameters()}
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) not in images:
                    continue
                mask = self.owned(synthetic.labels).to(param.device).reshape(-1, *([1] * (param.dim() - 1)))
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, Tensor) and value.shape == param.shape:
                        value.mul_(mask.to(value.dtype))


class ClassShardRealBatches(RealBatchSelector):
    """The ``random`` real batches restricted to this rank's classes, drawing as the full selector does.

    For every class ``c`` of ALL classes it draws ``randperm(N_c)`` from the run's generator (as
    :class:`ipmcondense.data.ClassBalancedSampler` does), keeping the first ``n`` indices of its own classes
    only; so the generator advances exactly as in one process and the own classes get the same images.
    Holds the images of its own classes only. Cost per class: ``O(N_c)`` for the permutation.
    """

    name = "random"

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, generator: torch.Generator,
                 classes: range) -> None:
        labels = labels.to(torch.long)
        keep = (labels >= classes.start) & (labels < classes.stop)
        own_images, own_labels = images[keep.to(images.device)], labels[keep]
        super().__init__(own_images, own_labels.to(images.device), num_classes, generator)
        self.classes = classes
        self.counts = [int(v) for v in torch.bincount(labels.cpu(), minlength=num_classes)]
        self._indices = {c: torch.nonzero(self.labels == c, as_tuple=True)[0] for c in classes}
        empty = [c for c, n in enumerate(self.counts) if n == 0]
        if empty:
            raise ValueError(f"labels has no example of class(es) {empty}")

    def sample(self, n_per_class: int) -> tuple[Tensor, Tensor]:
        n = int(n_per_class)
        device = self.generator.device
        picks, sizes = [], []
        for c in range(self.num_classes):
            order = torch.randperm(self.counts[c], generator=self.generator, device=device)
            if c in self.classes:
                pool = self._indices[c]
                picks.append(pool[order[: min(n, pool.numel())].to(pool.device)])
                sizes.append(picks[-1].numel())
        index = torch.cat(picks)
        labels = torch.repeat_interleave(torch.tensor(list(self.classes), device=index.device),
                                         torch.tensor(sizes, device=index.device))
        return self.images[index], labels
