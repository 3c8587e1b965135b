r"""DCGM (Zhang et al., arXiv 2309.07698, "Dataset Condensation via Generative Model"): the condensed set is a
generator *and* its latent codes, both learned, kept realistic by a GAN loss.

The stored set is ``ipc`` latents per class :math:`z_{c,i}` and the generator :math:`G_\psi` they are decoded
by, :math:`S = \{G_\psi(z_{c,i}, c)\}`. Unlike ``latent`` (GLaD, IT-GAN: a fixed generator) the gradient of
every loss reaches both the latents and the generator's weights :math:`\psi` (:class:`LatentGANSet`). The
``dcgm`` row's loss per step is

.. math:: L = \underbrace{\sum_c \big\|\bar\phi_\theta(A(S_c)) - \bar\phi_\theta(A(T_c))\big\|^2}_{\text{DM feature matching}}
    + w_{intra} L_{intra} + w_{inter} L_{inter} + w_{gan} \big(-\tfrac1{|S|}\textstyle\sum_i D(G_\psi(z_i, y_i), y_i)\big),

the intra-class diversity and inter-class discrimination terms being the extra term ``class_contrast`` in the
step network's embedding (:class:`~ipmcondense.condensation.extra_terms.ClassContrast`) and the last the generator's
adversarial loss against a class-conditional discriminator :math:`D` (:class:`GeneratorAdversary`). After each
step of (latents, generator) the discriminator takes one Adam step on the hinge loss
:math:`E[\max(0, 1 - D(x, y))] + E[\max(0, 1 + D(G_\psi(z_i, y_i), y_i))]` of a real batch (``ipc`` real
images per class) against the detached condensed set. The discriminator is never updated by the
(latents, generator) step, and the generator never by the discriminator's.

The discriminator starts from the generator run's ``checkpoint.pt`` when there is one (the GAN it was trained
with, :func:`ipmcondense.generators.train_generator`), else (a user's ``nn.Module`` or a run without a
checkpoint) from a fresh :class:`~ipmcondense.generators.ConditionalDiscriminator` seeded from the run's
random generator. With ``gan_weight = intra_weight = inter_weight = lr_generator = 0`` the row is the plain
latent DM (``glad``) step for step (tested).

Source: no official code of DCGM is public (searched the code index, its authors and the
awesome-dataset-distillation list, which has no code link for it); the row is built from the paper's
abstract: condensing into a generative model (latents and generator learned), a GAN-style realism term, an
intra-class loss "pushing each sample away from the others of the same class" and an inter-class loss
"widening the gap between the centres of different classes". The exact contrastive forms, their feature
space (the step network's embedding), temperatures and weights are this library's choices; see the row's
``source``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.components import option
from ipmcondense.ipm._validation import check_positive_number
from ipmcondense.nets import build_isolated, draw_seed

from .synthetic import LatentSet, SyntheticExtras, SyntheticTraining

__all__ = ["LatentGANSet", "GeneratorAdversary", "generator_adversarial_loss"]


def generator_adversarial_loss(scores: Tensor) -> Tensor:
    r"""The generator's hinge-GAN loss :math:`-\frac1n \sum_i D(x_i, y_i)` from the discriminator's ``(n,)`` scores."""
    return -scores.mean()


class LatentGANSet(LatentSet):
    r"""``latent_gan``: latents decoded by a generator that is trained too, with a discriminator (module docstring).

    The latents are optimised with ``lr_images``, the generator's weights in a group of their own with
    ``lr_generator`` (0: the generator stays fixed, as ``latent``). Decoding keeps the generator in ``eval()``
    mode (batch norm with the running statistics of its GAN training, so decoding stays a pure function of
    the stored latents and weights; the batch-norm affine weights are trained). The saved set holds the
    latents and the trained generator's weights (``state_dict``). Cost of decoding: one generator pass.

    Args:
        latents, labels, num_classes, generator, anchors, extras: as :class:`LatentSet`.
        options: the :class:`Options`.
        discriminator_state: the ``state_dict`` of the discriminator to start from (``None``: a fresh one).
    """

    name = "latent_gan"

    @dataclass(frozen=True)
    class Options(LatentSet.Options):
        lr_generator: float = option(1e-4, "DCGM trains the generator with the latents; no value released, this "
                                           "library's choice (SGD with momentum_images, as the latents)")
        gan_weight: float = option(0.1, "DCGM's realism (GAN) term; no value released, this library's choice")
        lr_discriminator: float = option(2e-4, "the stage-1 GAN's Adam(2e-4, betas (0.5, 0.999)) "
                                               "(ipmcondense.generators.train_generator)")

    def __init__(self, latents: Tensor, labels: Tensor, num_classes: int, generator: nn.Module, options: Any,
                 anchors: Tensor | None = None, extras: SyntheticExtras | None = None,
                 discriminator_state: dict[str, Tensor] | None = None) -> None:
        self.check_options(options)
        super().__init__(latents, labels, num_classes, generator, anchors=anchors, extras=extras)
        self.options = options
        self.discriminator_state = discriminator_state
        self.decoder.requires_grad_(float(options.lr_generator) > 0)

    @staticmethod
    def check_options(options: Any) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        for key in ("lr_generator", "gan_weight"):
            check_positive_number(getattr(options, key), key, allow_zero=True)
        check_positive_number(options.lr_discriminator, "lr_discriminator")

    @classmethod
    def from_images(cls, images, labels, num_classes, options, extras=None, *, generator=None, rng=None):
        """As :meth:`LatentSet.from_images`; also reads the discriminator of the generator run's ``checkpoint.pt``
        (when ``generator`` is a run directory that has one)."""
        cls.check_options(options)
        given = generator
        z, generator = cls._initial_latents(images, labels, num_classes, options, generator, rng)
        state = None if given is not None else _saved_discriminator(Path(options.generator))
        return cls(z, labels, num_classes, generator, options, anchors=images.detach().float(), extras=extras,
                   discriminator_state=state)

    def extra_parameter_groups(self) -> list[dict[str, Any]]:
        groups = super().extra_parameter_groups()
        if float(self.options.lr_generator) > 0:
            groups.append({"params": list(self.decoder.parameters()), "lr": float(self.options.lr_generator)})
        return groups

    #: in class-parallel condensation every loss reaches the generator's weights through this rank's rows only (a
    #: share), so the engine sums their gradients over the ranks
    shared_gradients_are_rank_shares = True

    def shared_parameters(self) -> list[nn.Parameter]:
        """The generator's weights when they are learned (``lr_generator > 0``): replicated on every rank in
        class-parallel condensation, their gradients summed over the ranks."""
        return list(self.decoder.parameters()) if float(self.options.lr_generator) > 0 else []

    def decoder_training(self, ctx: Any) -> GeneratorAdversary | None:
        if float(self.options.gan_weight) == 0:
            return None
        return GeneratorAdversary(self, ctx)


def _saved_discriminator(run: Path) -> dict[str, Tensor] | None:
    """The discriminator weights of a generator run's ``checkpoint.pt``, or ``None`` when it has none."""
    from ipmcondense.data.files import torch_load_weights_only
    from ipmcondense.generators.runs import _CHECKPOINT_FORMAT, GENERATOR_CHECKPOINT_FILE

    file = (run if run.is_dir() else run.parent) / GENERATOR_CHECKPOINT_FILE
    if not file.exists():
        return None
    data = torch_load_weights_only(file, "generator checkpoint")
    if not isinstance(data, dict) or data.get("format") != _CHECKPOINT_FORMAT or "discriminator" not in data:
        raise ValueError(f"{file} is not an ipmcondense generator checkpoint with a discriminator")
    return data["discriminator"]


class GeneratorAdversary(SyntheticTraining):
    """DCGM's GAN term around each step (module docstring), on the engine's context ``ctx``.

    :meth:`loss` is :math:`w_{gan}` times the generator's adversarial loss of the decoded set (differentiable in
    the latents and the generator, not used to update the discriminator); :meth:`after_step` takes one Adam step
    of the discriminator on the hinge loss of ``images_per_class`` real images per class (the run's real-batch
    selector) against the detached decoded set. The discriminator, its optimiser state and its spectral-norm
    vectors are checkpointed.
    """

    def __init__(self, synthetic: LatentGANSet, ctx: Any) -> None:
        from ipmcondense.generators import ConditionalDiscriminator

        self.synthetic, self.ctx, self.options = synthetic, ctx, synthetic.options
        images = synthetic.images().detach()
        width = int(getattr(synthetic.decoder, "width", 64))

        def build() -> nn.Module:
            return ConditionalDiscriminator(synthetic.num_classes, images.shape[1], tuple(images.shape[2:]), width)

        if synthetic.discriminator_state is not None:
            self.discriminator = build()
            self.discriminator.load_state_dict(synthetic.discriminator_state)
        else:
            self.discriminator = build_isolated(build, draw_seed(ctx.generator))
        self.discriminator.to(ctx.device).train()
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=float(self.options.lr_discriminator),
                                          betas=(0.5, 0.999))

    def _own_rows(self) -> Tensor | None:
        """Class-parallel: the indices of this rank's rows of S (``None`` in one process)."""
        classes, labels = getattr(self.ctx, "classes", None), self.synthetic.labels
        if classes is None:
            return None
        return torch.nonzero((labels >= classes.start) & (labels < classes.stop), as_tuple=True)[0]

    def loss(self) -> Tensor:
        syn = self.synthetic
        rows = self._own_rows()
        if rows is not None:  # class-parallel: this rank's rows' share of the mean over every row
            scores = self.discriminator(syn.images()[rows], syn.labels[rows])
            return float(self.options.gan_weight) * -scores.sum() / syn.labels.numel()
        return float(self.options.gan_weight) * generator_adversarial_loss(self.discriminator(syn.images(), syn.labels))

    def discriminator_loss(self, real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor) -> Tensor:
        """The hinge loss of the discriminator, real vs the (detached) condensed images."""
        from ipmcondense.generators import hinge_losses

        return hinge_losses(self.discriminator(real, real_labels), self.discriminator(fake.detach(), fake_labels))

    def after_step(self) -> None:
        syn = self.synthetic
        real, real_labels = self.ctx.real_batches.sample(int(syn.images_per_class))
        with torch.no_grad():
            fake = syn.images()
        rows = self._own_rows()
        if rows is None:
            value = self.discriminator_loss(real, real_labels, fake, syn.labels)
            checked = value.detach()
        else:  # class-parallel: shares of the two means over every rank's rows; the gradients summed over the ranks
            from ipmcondense import distributed

            real_rows = self.ctx.real_batches.global_batch_size(int(syn.images_per_class))
            value = (F.relu(1.0 - self.discriminator(real, real_labels)).sum() / real_rows
                     + F.relu(1.0 + self.discriminator(fake[rows], syn.labels[rows])).sum() / syn.labels.numel())
            checked = distributed.all_reduce_float64(value.detach().double().reshape(1))[0]
        if not bool(torch.isfinite(checked)):
            raise FloatingPointError(f"DCGM's discriminator loss became {float(checked)}; lower lr_discriminator")
        self.optimizer.zero_grad(set_to_none=True)
        value.backward()
        if rows is None:
            self.optimizer.step()
        else:
            from .parallel import _RankSummedSteps

            _RankSummedSteps(self.optimizer).step()

    def state_dict(self) -> dict[str, Any]:
        return {"discriminator": {k: v.detach().cpu().clone() for k, v in self.discriminator.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.optimizer.load_state_dict(state["optimizer"])
