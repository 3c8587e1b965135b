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
``idm``                        the pool is replicated (same seeds and picks); a pool network's training step
                               back-propagates the own classes' rows of the class-balanced batch (their part
                               of the batch mean) and sums the parameter gradients over the ranks
                               (:meth:`ClassShard.train_replicated`); the accuracy meters' counts are summed;
                               the ``synthetic_ce`` term is a sum over classes (each rank adds its own)
``mtt``                        the student is replicated: every step sums the ranks' gradients of their own
                               rows and the reverse pass sums their Hessian-vector products
                               (:func:`ipmcondense.autodiff.sgd_step` with ``owned``); the loss is the same
                               on every rank (not summed)
``discrepancy="sliced"``       nothing: the other classes' projection seeds are drawn and dropped around this
                               rank's calls (:class:`DrawsOfEveryClass`)
``real_batches="dream"``       nothing more: each class's k-means runs on its owner with the seed one process
                               draws for it (:class:`ClassShardDreamBatches`); checkpoints gather the picks
``mtt`` with ``soft_labels``   as ``mtt``; the label logits are rows of S: each rank steps its own, and they are
                               exchanged with the images (:meth:`ClassShard.row_parameters`)
``kip``, ``rfad``, ``dd``,     the whole S (and the learned label rows) on every rank in every step, its
``esp``, ``rcig``              gradient summed over the ranks (:class:`WholeSetOnEveryRank`); the inner problem
                               (KRR, unrolled or implicit training, RCIG's pool) replicated; the real-data loss
                               split by class; the replicated parameters' (temperature, step sizes) gradients
                               summed; RCIG's tangent gradient summed before its solve, its clipping norms
                               taken over the whole gradients
``idc``, ``pool_augment``      as ``idm``; the per-sample augmentation of a pool network's batch is drawn for
                               the whole batch, the own rows kept
                               (:meth:`ClassShard.own_rows_of_whole_batch_augmentation`); multi-formation's
                               stored rows are exchanged by class block (:meth:`ClassShard.row_labels`)
``haba``                       as ``mtt`` for the bases (rows of S by class block); the hallucinators
                               (:meth:`~ipmcondense.condensation.synthetic.SyntheticSet.shared_parameters`) are
                               replicated, their MTT gradient summed over the ranks; the club term and the
                               extractor's training run on the whole bases on every rank
``cafe``                       every class's prototype rebuilt on every rank (its gradient summed into the
                               owner's) for the discrimination term; the watched network's per-class accuracies
                               gathered in class order; S exchanged before its training, as DC's
``lcmat``                      the loss gap of the perturbation and its parameter gradient summed over the
                               ranks, so every rank moves the network alike
``dcc``                        each rank's sum of its classes' mean gradients, all-reduced (identity backward);
                               the joint cosine is the same on every rank (``joint_over_ranks`` of
                               :func:`~ipmcondense.condensation.matching.matching_loss`)
``glad``, ``itgan``            the latents are rows of S owned by class block, decoded by the fixed generator
                               (eval mode: each row alone) and exchanged like pixel rows; itgan's
                               ``anchor_features`` term is a sum over rows: each rank adds its rows' distances
                               divided by the whole ``n``
``wmdd``                       the ``pretrained`` teacher is trained replicated as a pool network
                               (:meth:`ClassShard.train_replicated`, its per-sample augmentation drawn for the whole
                               batch); the ``w2_barycenter``'s initial atoms of the other classes are drawn and
                               dropped (:class:`DrawsOfEveryClass`); ``class_norm_statistics`` (a mean over
                               classes) and ``teacher_ce`` (a mean over S's rows) are added as per-rank shares
``channel_efficient``          the channel-wise stored tensors are rows of S (``ipc`` per class), owned by class
                               block and exchanged as multi-formation's; the network's inner training is DC's
``dcgm``                       the latents as glad's; the learned generator is replicated, the gradients it gets
                               through the own rows summed over the ranks by the engine (a synthetic set with
                               ``shared_gradients_are_rank_shares``); the GAN term is a share of its mean over the
                               rows; ``class_contrast``'s intra-class term a share of its sum over the rows, its
                               inter-class term built on every class's synthetic centre (gathered from the owners,
                               gradient summed back) and a share of its mean over the classes; the discriminator is
                               replicated, each rank back-propagating its rows' share of both hinge means and the
                               gradients summed before its Adam step
=============================  ===============================================================================

DM, DC (also with DREAM's batches or the sliced discrepancy), GLaD, IT-GAN, channel_efficient: bit for bit (DCGM's
latents and generator: to 2e-5 of their largest magnitude, measured 5e-8). IDM and MTT: a sum over ranks replaces a sum inside one batch, so the sets agree up to
float32 rounding (IDM: 1e-6 of the largest pixel after 3 iterations; MTT: exact in float64, 1e-4 of the
largest pixel in float32, below float32's own error of the MTT gradient). KIP, RFAD, DD, ESP, RCIG, DCC, IDC,
HaBa, CAFE, LCMat, WMDD, DCGM and MTT with soft labels: the real batch's sum and S's gradient are sums of per-rank partial sums; the
images, learned label rows, step sizes, temperatures and helper networks agree with one process to 2e-5 of
their largest magnitude after 1-3 iterations (measured at most 6e-6, KIP under Adam; 3e-6 or less for the
others); RCIG's pool models, trained by Adam on S, to 5e-4 (ten of their Adam steps).

Not supported, with the reason (:func:`check_class_parallel`): for the objectives other than matching and MTT,
a synthetic set other than pixels (HaBa's bases under MTT excepted); a joint discrepancy (``dcc``'s) composed
with extra terms; real batches other than ``random`` and ``dream``; networks with batch normalisation (their
features would depend on which classes share the batch). Every registered row runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense import distributed

from .real_batches import RealBatchSelector
from .recipes import MatchingRecipe, Recipe

__all__ = ["ClassShard", "WholeSetOnEveryRank", "ClassShardRealBatches", "ClassShardDreamBatches", "DrawsOfEveryClass", "check_class_parallel", "UNSUPPORTED_REASONS"]

#: why a row cannot be split over classes, quoted by the error that names the recipe; empty, since no row is
#: refused by name any more and the remaining refusals are by axis (see check_class_parallel)
UNSUPPORTED_REASONS = {
}
_SUPPORTED_SAMPLERS = ("fresh", "fresh_inner", "pool", "fresh_watched", "pretrained")
#: extra terms with a class-parallel form: sums over the classes' segments of S (each rank adds its own) or over
#: the real rows against every class's prototype (gathered from their owners)
_CLASS_SEPARABLE_TERMS = ("synthetic_ce", "prototype_discrimination", "anchor_features", "class_norm_statistics",
                          "teacher_ce", "class_contrast")
#: matching recipes' synthetic sets whose stored rows belong to one class each, each decoded alone (multiformation,
#: channelwise: ipc stored tensors per class, upsampled; latent: a fixed generator, batch norm on running statistics)
_CLASS_BLOCKED_SYNTHETIC = ("pixels", "multiformation", "channelwise", "latent", "latent_gan")
#: objectives (besides matching) with a class-parallel form: MTT's student sums the ranks' gradients; the
#: objectives coupling all of S solve their inner problem on the whole S on every rank (:class:`WholeSetOnEveryRank`)
_CLASS_PARALLEL_OBJECTIVES = ("mtt", "kip", "rfad", "dd", "esp", "rcig")


def check_class_parallel(recipe: Recipe, config: dict[str, Any], network: nn.Module, world_size: int,
                         num_classes: int) -> None:
    """Raise ``ValueError`` naming the recipe (and the axis) when the row cannot run class-parallel."""
    if recipe.is_selection:
        return
    base = recipe.name.split("+", 1)[0]
    problem = UNSUPPORTED_REASONS.get(base)
    if problem is not None:
        pass
    elif not isinstance(recipe, MatchingRecipe):
        objective = getattr(recipe, "objective", "?")
        if objective not in _CLASS_PARALLEL_OBJECTIVES:
            problem = f"objective {objective!r} couples all classes"
        elif recipe.synthetic != "pixels" and not (objective == "mtt" and recipe.synthetic == "haba"):
            problem = f"synthetic {recipe.synthetic!r} is not class-blocked pixels"
    elif any(term not in _CLASS_SEPARABLE_TERMS for term in recipe.extra_terms):
        problem = f"its extra terms {list(recipe.extra_terms)} see every class"
    elif recipe.sampler not in _SUPPORTED_SAMPLERS:
        problem = f"sampler {recipe.sampler!r} trains networks on every class"
    elif recipe.discrepancy == "gradient_cosine_joint" and recipe.extra_terms:
        problem = (f"its extra terms {list(recipe.extra_terms)} are per-rank shares, its joint discrepancy the same "
                   "on every rank")
    elif recipe.synthetic not in _CLASS_BLOCKED_SYNTHETIC:
        problem = (f"synthetic {recipe.synthetic!r} is not class-blocked "
                   f"({', '.join(repr(s) for s in _CLASS_BLOCKED_SYNTHETIC)})")
    elif (recipe.real_batches or "random") not in ("random", "dream"):
        problem = f"real_batches {recipe.real_batches!r} is not supported (only 'random' and 'dream')"
    if problem is None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules()):
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

    def row_labels(self, tensor: Tensor, labels: Tensor) -> Tensor:
        """The class of each row of a per-row tensor of the synthetic set: ``labels`` (the decoded rows') when
        the row counts agree, else equal class blocks (a stored tensor with fewer rows per class than the
        decoded set, e.g. multi-formation's ``ipc`` stored images per class)."""
        rows = tensor.shape[0]
        if rows == labels.shape[0]:
            return labels
        if rows % self.num_classes:
            raise ValueError(f"a per-row tensor of {rows} rows is not made of {self.num_classes} equal class blocks")
        return torch.arange(self.num_classes, device=labels.device).repeat_interleave(rows // self.num_classes)

    def own_rows(self, labels: Tensor) -> Tensor:
        """Indices of this rank's rows (in order)."""
        return torch.nonzero(self.owned(labels), as_tuple=True)[0]

    def _merged(self, tensor: Tensor, labels: Tensor) -> Tensor:
        """The tensor whose rows come from their owners: all-reduce of the own rows, zeros elsewhere (exact)."""
        mask = self.owned(self.row_labels(tensor, labels)).to(tensor.device).reshape(-1, *([1] * (tensor.dim() - 1)))
        mine = torch.where(mask, tensor.detach(), torch.zeros((), dtype=tensor.dtype, device=tensor.device))
        device = distributed.communication_device()
        sent = mine.to(device)
        torch.distributed.all_reduce(sent, op=torch.distributed.ReduceOp.SUM)
        return sent.to(tensor.device)

    @staticmethod
    def row_parameters(synthetic: Any) -> list[nn.Parameter]:
        """The synthetic set's per-row parameters, whose rows belong to the classes of ``synthetic.labels``: the
        stored images and the learned labels (KIP/RFAD/RCIG's ``label_values``, MTT's ``soft_labels`` logits)."""
        shared = {id(p) for p in synthetic.shared_parameters()}
        rows = [p for p in synthetic.image_parameters() if id(p) not in shared]
        for name in ("label_values", "label_logits"):
            value = getattr(synthetic, name, None)
            if value is not None:
                rows.append(value)
        return rows

    def synchronise(self, synthetic: Any) -> None:
        """Give every rank every class block of the synthetic set (one all-reduce of its stored images and of
        its learned label rows, if any)."""
        with torch.no_grad():
            for param in self.row_parameters(synthetic):
                param.copy_(self._merged(param, synthetic.labels))

    def merged_optimizer_state(self, optimizer: torch.optim.Optimizer, synthetic: Any) -> dict[str, Any]:
        """The optimizer's state dict with every per-row buffer of the images merged from the owners
        (what a single process would hold); a collective: every rank calls it."""
        state = optimizer.state_dict()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        images = {id(p) for p in self.row_parameters(synthetic)}
        for index, param in enumerate(params):
            if id(param) not in images or index not in state["state"]:
                continue
            entry = dict(state["state"][index])
            for key, value in entry.items():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    entry[key] = self._merged(value, synthetic.labels)
            state["state"][index] = entry
        return state

    def own_rows_of_whole_batch_augmentation(self, augmentation: Any, counts: list[int], n_per_class: int) -> Any:
        r"""A per-sample augmentation of this rank's rows of a class-balanced batch, drawn as for the whole batch.

        One process augments the whole batch of :math:`\sum_c \min(n, N_c)` images with ``augmentation(x,
        generator=g)`` (one family per call, independent parameters per sample, drawn for the batch size). The
        returned ``augment(own, generator=g)`` places the own rows at their offset in a batch of that size (the
        other rows zero), augments it with the same draws and keeps the own rows: each sample is transformed
        alone (DSA's transforms are per sample), so the own rows get what one process gives them and the
        generator advances as in one process. Cost: the augmentation of the whole batch size on every rank.

        Args:
            augmentation: the recipe's per-sample augmentation (``__call__(x, generator=)``).
            counts: every class's number of training images (the batch takes ``min(n, N_c)`` of class ``c``).
            n_per_class: ``n``.
        """
        sizes = [min(int(n_per_class), int(c)) for c in counts]
        start, total = sum(sizes[: self.classes.start]), sum(sizes)

        def augment(own: Tensor, generator: torch.Generator | None = None) -> Tensor:
            whole = own.new_zeros((total, *own.shape[1:]))
            whole[start:start + own.shape[0]] = own
            return augmentation(whole, generator=generator)[start:start + own.shape[0]]

        return augment

    def train_replicated(self, network: nn.Module, optimizer: torch.optim.Optimizer,
                         batches: Iterable[tuple[Tensor, Tensor]], global_batch_size: int,
                         meter: Any = None, augmentation: Any = None, generator: torch.Generator | None = None,
                         ) -> None:
        r"""Train a network replicated on every rank on real batches split over the ranks by class.

        Each ``(images, labels)`` batch holds this rank's classes only (the rows of one class-balanced batch of
        ``global_batch_size`` images in all); the step minimises the batch's mean cross-entropy
        :math:`\frac{1}{|B|}\sum_{i \in B} \ell_i = \sum_r \frac{1}{|B|}\sum_{i \in B_r} \ell_i`: each rank
        back-propagates its own part, the parameter gradients are summed over the ranks (one all-reduce of the
        flattened gradient per step) and every rank takes the same optimiser step, so the replicas stay equal.
        ``meter`` (an :class:`~ipmcondense.condensation.samplers.AccuracyMeter`) counts every rank's hits: the
        counts of the batches are summed over the ranks at the end (one all-reduce). Equal to the one-process
        training up to the rounding of the split sum. ``augmentation`` (with ``generator``): applied to each
        batch first (:meth:`own_rows_of_whole_batch_augmentation`). Cost per step: the forward/backward of the
        own rows and an all-reduce of the parameter count.
        """
        from ipmcondense.training import train_on_batches

        before = (meter.correct, meter.seen) if meter is not None else (0, 0)

        def own_part_of_mean_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
            if meter is not None:
                meter.add(logits, labels)
            return F.cross_entropy(logits, labels, reduction="sum") / global_batch_size

        network.requires_grad_(True)
        network.train()
        train_on_batches(network, _RankSummedSteps(optimizer), batches, loss_fn=own_part_of_mean_cross_entropy,
                         augmentation=augmentation, generator=generator)
        if meter is not None:
            counts = torch.tensor([meter.correct - before[0], meter.seen - before[1]], dtype=torch.float64)
            counts = distributed.all_reduce_float64(counts)
            meter.correct, meter.seen = before[0] + int(counts[0]), before[1] + int(counts[1])

    def keep_own_optimizer_rows(self, optimizer: torch.optim.Optimizer, synthetic: Any) -> None:
        """Zero the other ranks' rows of the images' optimizer buffers (after loading a merged checkpoint), so
        this rank's step leaves those rows where their owner put them."""
        images = {id(p) for p in self.row_parameters(synthetic)}
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) not in images:
                    continue
                mask = self.owned(self.row_labels(param, synthetic.labels)).to(param.device)
                mask = mask.reshape(-1, *([1] * (param.dim() - 1)))
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, Tensor) and value.shape == param.shape:
                        value.mul_(mask.to(value.dtype))


class WholeSetOnEveryRank:
    r"""What an objective that couples all of S (KIP, RFAD, DD, ESP, RCIG) does on one rank of a class-parallel run.

    Such an objective solves an inner problem on the WHOLE synthetic set (a kernel ridge regression, an unrolled
    or implicit training) and scores it by a mean over a class-balanced real batch, which splits over the
    ranks' classes:

    .. math:: L(S) = \frac{1}{|T|}\sum_{i \in T} \ell_i(S) = \sum_r \underbrace{\frac{|T_r|}{|T|}\,
              \frac{1}{|T_r|}\sum_{i \in T_r} \ell_i(S)}_{L_r(S)}.

    Rank ``r`` keeps ownership of its class blocks of S (only its rows are stepped) and of its real images. It
    rebuilds the whole S from the owners' rows (:meth:`rows`: one all-reduce of its own rows, zeros elsewhere,
    exact), computes the inner problem replicated (the same draws and arithmetic as every other rank and as one
    process) and its partial loss :math:`L_r` on its real rows (:meth:`share`). The backward pass of
    :meth:`rows` sums the ranks' gradients with respect to the whole S (one all-reduce: the autograd-aware
    all-gather of ``torch.distributed.nn``, written as an all-reduce so that class blocks of unequal size need
    no padding) and keeps the own rows, so each owner steps its rows with :math:`\nabla L = \sum_r \nabla L_r`
    and the other rows get a zero gradient (their optimiser buffers stay zero). A parameter replicated on every
    rank (RFAD/RCIG's temperature, DD/ESP's step sizes) enters the partial loss through :meth:`shared`, so it
    receives :math:`\sum_r \nabla L_r` on every rank and stays equal everywhere. Where a replicated
    computation is differentiated as a whole (RCIG's inner problem) it takes :meth:`rows` with
    ``summed=False`` (the gradient is already the total on every rank). Without a process group (``classes``
    ``None``) every method returns its input: the one-process arithmetic is untouched.

    Equal to one process up to the rounding of the split sums (the forward values of S are exact; the real
    batch's sum and the gradient of S are each a sum of ``W`` partial sums instead of one). Cost per step: two
    all-reduces of S (and of the learned label rows) and one of each replicated parameter's gradient.

    Args:
        classes: this rank's classes (``None``: one process).
        labels: the hard labels of S's rows (class blocks).
        real_batches: the rank's real-batch selector (``global_batch_size`` gives :math:`|T|`).
    """

    def __init__(self, classes: range | None, labels: Tensor, real_batches: Any) -> None:
        self.classes, self.real_batches = classes, real_batches
        self.active = classes is not None
        self.owned = None if classes is None else (labels >= classes.start) & (labels < classes.stop)

    @classmethod
    def of_context(cls, ctx: Any) -> WholeSetOnEveryRank:
        """The helper for an objective's :class:`~ipmcondense.condensation.objectives.ObjectiveContext`."""
        return cls(ctx.classes, ctx.synthetic.labels, ctx.real_batches)

    def rows(self, tensor: Tensor, *, summed: bool = True) -> Tensor:
        """The whole ``tensor`` (rows of S) from the owners' rows; its gradient reaches the own rows only, summed
        over the ranks (``summed=True``: a per-rank partial loss is differentiated) or as it is (``False``: a
        replicated computation is differentiated)."""
        if not self.active:
            return tensor
        mask = self.owned.to(tensor.device).reshape(-1, *([1] * (tensor.dim() - 1)))
        whole = distributed.sum_over_ranks(torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype,
                                                                                  device=tensor.device)))
        return distributed.copy_to_ranks(whole) if summed else whole

    def shared(self, tensor: Tensor) -> Tensor:
        """A tensor replicated on every rank entering the partial loss: its gradient is summed over the ranks."""
        return distributed.copy_to_ranks(tensor) if self.active else tensor

    def share(self, mean_loss: Tensor, own_rows: int, n_per_class: int) -> Tensor:
        """:math:`L_r`: the mean loss over this rank's ``own_rows`` real rows weighted by their share of the whole
        class-balanced batch of ``n_per_class`` images per class (the engine sums the ranks' values)."""
        if not self.active:
            return mean_loss
        return mean_loss * (int(own_rows) / self.real_batches.global_batch_size(int(n_per_class)))

    def once(self, value: Tensor) -> Tensor:
        """A term computed identically on every rank (from :meth:`rows` and :meth:`shared` inputs), counted once
        in the ranks' sum: ``value / W`` (its gradient, summed over the ranks, is the term's gradient)."""
        if not self.active:
            return value
        return value / distributed.world_size()

    def norm(self, tensor: Tensor, rows: bool) -> Tensor:
        """The Euclidean norm of a whole gradient: of a row parameter's (each rank holds its own rows, zeros
        elsewhere: the squared norms are summed over the ranks in float64) or of a replicated one's."""
        if not self.active or not rows:
            return tensor.norm()
        squared = distributed.all_reduce_float64(tensor.detach().double().pow(2).sum().reshape(1))
        return squared.sqrt().reshape(()).to(device=tensor.device, dtype=tensor.dtype)


class _RankSummedSteps:
    """An optimizer whose ``step`` first sums every parameter's gradient over the ranks (one all-reduce of
    the flattened gradients; a missing gradient counts as zero)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])
        device = distributed.communication_device()
        sent = flat.to(device)
        torch.distributed.all_reduce(sent, op=torch.distributed.ReduceOp.SUM)
        summed = sent.to(flat.device)
        offset = 0
        for p in params:
            p.grad = summed[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.optimizer.step()


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
        #: the index in the whole training set of each kept image (for checkpoints in the one-process format)
        self.global_index = torch.nonzero(keep.cpu(), as_tuple=True)[0]
        self.counts = [int(v) for v in torch.bincount(labels.cpu(), minlength=num_classes)]
        self._indices = {c: torch.nonzero(self.labels == c, as_tuple=True)[0] for c in classes}
        empty = [c for c, n in enumerate(self.counts) if n == 0]
        if empty:
            raise ValueError(f"labels has no example of class(es) {empty}")

    def global_batch_size(self, n_per_class: int) -> int:
        """The size of the whole class-balanced batch (every class, every rank) of ``n_per_class`` per class."""
        return sum(min(int(n_per_class), count) for count in self.counts)

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


class ClassShardDreamBatches(ClassShardRealBatches):
    r"""DREAM's representative real batches (:class:`~ipmcondense.condensation.real_batches.DreamRealBatches`)
    for this rank's classes, equal to the one-process batches of those classes.

    DREAM's k-means is per class, so the owner of a class embeds that class's images and clusters them alone;
    the k-means seed of *every* class with more than ``n`` images is drawn from the run's generator in class
    order (the other ranks' seeds are drawn and dropped), and the uniform batches (before the first network,
    and for training) are :class:`ClassShardRealBatches`', so the generator advances as in one process.
    The cached picks are exchanged for a checkpoint (:meth:`state_dict` is a collective: every rank's picks,
    as indices into the whole training set, concatenated in class order: the one-process format) and each rank
    keeps its own classes' picks on resume. Cost per refresh: one forward pass over the own classes' images
    and their k-means (the work splits over the ranks).
    """

    name = "dream"

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, generator: torch.Generator,
                 classes: range, *, interval: int = 10, max_iter: int = 100) -> None:
        super().__init__(images, labels, num_classes, generator, classes)
        for key, value in (("dream_interval", interval), ("dream_max_iter", max_iter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        self.interval, self.max_iter = int(interval), int(max_iter)
        self._networks: list[nn.Module] = []
        self._cache: dict[int, dict[str, Any]] = {}  # n -> {"indices": own picks (local) or None, "age": int}
        self._warned: set[int] = set()

    def observe(self, networks: Any) -> None:
        self._networks = list(networks)

    def sample_for_training(self, n_per_class: int) -> tuple[Tensor, Tensor]:
        return super().sample(n_per_class)

    def sample(self, n_per_class: int) -> tuple[Tensor, Tensor]:
        n = int(n_per_class)
        entry = self._cache.get(n)
        if entry is None or entry["age"] >= self.interval:
            entry = {"indices": self._query(n), "age": 0}
            self._cache[n] = entry
        entry["age"] += 1
        if entry["indices"] is None:  # no network yet: uniform, drawn afresh each call
            return super().sample(n)
        index = entry["indices"].to(self.labels.device)
        return self.images[index], self.labels[index]

    def _query(self, n: int) -> Tensor | None:
        import warnings

        from .real_batches import kmeans_representatives

        if not self._networks:
            return None
        net = self._networks[0]
        picks = []
        for c in range(self.num_classes):
            own = c in self.classes
            if self.counts[c] <= n:  # DREAM's fallback: all of the class's images (no seed drawn)
                if own:
                    if n not in self._warned:
                        self._warned.add(n)
                        warnings.warn(f"dream: class {c} has {self.counts[c]} training images, not more than the "
                                      f"batch of {n} per class (batch_real): all of them are used", stacklevel=3)
                    picks.append(self._indices[c].cpu())
                continue
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
            if not own:
                continue
            idx = self._indices[c]
            with torch.no_grad():
                embed = getattr(net, "embed", net)
                feats = torch.cat([embed(self.images[idx[i:i + 512]]) for i in range(0, idx.numel(), 512)])
            picks.append(idx.cpu()[kmeans_representatives(feats.flatten(1), n, seed=seed, max_iter=self.max_iter)])
        return torch.cat(picks)

    def state_dict(self) -> dict[str, Any]:
        own = {n: {"indices": None if e["indices"] is None else self.global_index[e["indices"].cpu()],
                   "age": e["age"]} for n, e in sorted(self._cache.items())}
        gathered = distributed.all_gather_objects(own)  # ranks own contiguous class blocks, in rank order
        cache = {}
        for n, entry in own.items():
            parts = [rank_cache[n]["indices"] for rank_cache in gathered]
            cache[n] = {"indices": None if entry["indices"] is None else torch.cat(parts), "age": entry["age"]}
        return {"cache": cache}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        local_of = {int(g): i for i, g in enumerate(self.global_index.tolist())}
        self._cache = {}
        for n, entry in state.get("cache", {}).items():
            indices = entry["indices"]
            if indices is not None:
                indices = torch.tensor([local_of[int(g)] for g in indices.tolist() if int(g) in local_of],
                                       dtype=torch.long)
            self._cache[int(n)] = {"indices": indices, "age": int(entry["age"])}


class DrawsOfEveryClass:
    """A discrepancy that draws from the run's generator at every call (``drop_draws``: the ``sliced``
    projections' seed, the ``w2_barycenter``'s initial atoms, a ``randperm`` of the class's real rows), called for
    this rank's classes only, consuming the generator as one process that calls it for every class:
    ``before(generator)`` makes and drops the draws of the classes before this rank's block, ``after(generator)``
    those of the classes after it (``calls_per_class`` calls per class: one per feature block; class ``c``'s calls
    on ``real_rows[c]`` real points).

    One process draws, per network, class 0's draws, then class 1's, ...; the rank's own calls come in the
    middle, with the draws one process gives them. Cost: the dropped draws (one number per call for ``sliced``,
    a permutation of the class's real batch for ``w2_barycenter``).
    """

    def __init__(self, discrepancy: Any, classes: range, num_classes: int, calls_per_class: int,
                 real_rows: list[int]) -> None:
        self.discrepancy, self.classes = discrepancy, classes
        self.num_classes, self.calls_per_class = int(num_classes), int(calls_per_class)
        self.real_rows = [int(r) for r in real_rows]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.discrepancy, name)

    def __call__(self, real: Tensor, synthetic: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return self.discrepancy(real, synthetic, generator=generator)

    def _drop(self, generator: torch.Generator, classes: range) -> None:
        for c in classes:
            for _ in range(self.calls_per_class):
                self.discrepancy.drop_draws(generator, self.real_rows[c])

    def before(self, generator: torch.Generator) -> None:
        self._drop(generator, range(self.classes.start))

    def after(self, generator: torch.Generator) -> None:
        self._drop(generator, range(self.classes.stop, self.num_classes))
