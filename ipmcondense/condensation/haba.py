r"""HaBa (Liu et al., NeurIPS 2022): the synthetic set factorised into bases and hallucinators.

The stored set is ``ipc`` bases per class :math:`b_{c,i} \in R^{C_b \times H \times W}` and ``n_hallucinators``
small networks :math:`h_j` shared by all classes; the decoded set is every pair,
:math:`\{h_j(b_{c,i})\}_{j, i}` with the label :math:`c` of the basis (labels replicated ``n_hallucinators``
times). A hallucinator is HaBa's ``StyleTranslator``: a :math:`k \times k` convolution (no padding)
:math:`C_b \to C`, a per-position affine map :math:`x \mapsto \sigma \odot x + \mu` (:math:`\sigma` init 1,
:math:`\mu` init 0) and a :math:`k \times k` transposed convolution :math:`C \to C` back to :math:`H \times W`.

Both bases and hallucinators receive the gradient of the row's loss (MTT in the paper, any objective here)
through the decoded images. HaBa adds an adversarial pair of losses (:class:`HallucinatorTraining`), run by
the engine around every image step:

* on the synthetic side (added to the step's loss): the *club* term
  :math:`\lambda_{club}\, \mathrm{mean}_i\, (\cos(e(h_{j_0}(b_i)), e(h_{j_1}(b_i))) + 1)/2` for two distinct
  random hallucinators :math:`j_0 \neq j_1`: hallucinations of one basis should look different to the
  extractor :math:`e`;
* on the extractor :math:`e` (a ConvNet of the row's ``arch`` with its own SGD, step ``lr_extractor``,
  momentum 0.9), after the image step, on a fresh pair: the task loss
  :math:`\lambda_{cls}\, \mathrm{CE}(\mathrm{logits}, [y; y])`, the likelihood term
  :math:`\lambda_{lik}\, \mathrm{mean}_i (1 - \cos(e_0, e_1))/2` and the supervised contrastive loss
  :func:`supervised_contrastive_loss` of the normalised embeddings (:math:`\lambda_{con}`, temperature 0.07).

Sources: ``Huage001/DatasetFactorization`` ``distill_fac.py`` (losses, weights, optimisers, order),
``utils.py: StyleTranslator``, ``contrastive_loss.py: SupConLoss, Extractor``; scripts
``run_cifar10_ipc{1,10,50}_style5.sh``. Deviations are listed in the ``haba`` row's ``source``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.components import option
from ipmcondense.ipm._validation import check_positive_int, check_positive_number
from ipmcondense.nets import build_isolated, draw_seed

from .synthetic import SyntheticExtras, SyntheticSet, SyntheticTraining

__all__ = ["StyleHallucinator", "HaBaSet", "HallucinatorTraining", "supervised_contrastive_loss"]


class StyleHallucinator(nn.Module):
    r"""HaBa's hallucinator (``StyleTranslator``): conv :math:`k \times k` -> per-position affine -> transposed conv.

    :math:`h(b) = \mathrm{ConvT}_{C \to C}\big(\sigma \odot \mathrm{Conv}_{C_b \to C}(b) + \mu\big)`, with
    :math:`\sigma, \mu \in R^{C \times (H-k+1) \times (W-k+1)}` (init 1 and 0); maps ``(n, C_b, H, W)`` to
    ``(n, C, H, W)``. Parameters: :math:`k^2 (C_b C + C^2) + 2C + 2C(H-k+1)(W-k+1)`. Cost per image:
    two convolutions, :math:`O(k^2 C (C_b + C) H W)`.
    """

    def __init__(self, basis_channels: int, channels: int, image_size: tuple[int, int], kernel_size: int = 3) -> None:
        super().__init__()
        h, w = image_size
        if not 1 <= kernel_size <= min(h, w):
            raise ValueError(f"hallucinator_kernel must be in [1, {min(h, w)}] for {h}x{w} images, got {kernel_size}")
        self.encode = nn.Conv2d(basis_channels, channels, kernel_size)
        self.scale = nn.Parameter(torch.ones(1, channels, h - kernel_size + 1, w - kernel_size + 1))
        self.shift = nn.Parameter(torch.zeros(1, channels, h - kernel_size + 1, w - kernel_size + 1))
        self.decode = nn.ConvTranspose2d(channels, channels, kernel_size)

    def forward(self, bases: Tensor) -> Tensor:
        return self.decode(self.scale * self.encode(bases) + self.shift)


def supervised_contrastive_loss(features: Tensor, labels: Tensor, temperature: float = 0.07,
                                base_temperature: float = 0.07) -> Tensor:
    r"""Supervised contrastive loss (Khosla et al. 2020; HaBa's ``SupConLoss``, ``contrast_mode='all'``).

    ``features``: ``(n, V, d)`` (``V`` views per sample, usually L2-normalised); ``labels``: ``(n,)``. With
    :math:`z_a` the :math:`N = nV` anchors, :math:`P(a)` the other anchors of the same label and
    :math:`s_{ab} = z_a \cdot z_b / \tau`:

    .. math:: \mathcal L = -\frac{\tau}{\tau_b} \frac1N \sum_a \frac{1}{|P(a)|} \sum_{p \in P(a)}
        \Big(s_{ap} - \log \sum_{b \neq a} e^{s_{ab}}\Big).

    Every anchor needs a positive (``V >= 2`` guarantees one). Cost: :math:`O(N^2 d)`.
    """
    if features.dim() != 3 or features.shape[1] < 2:
        raise ValueError(f"features must have shape (n, views >= 2, d), got {tuple(features.shape)}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
    n, views, _ = features.shape
    anchors = torch.cat(torch.unbind(features, dim=1), dim=0)  # view-major, as HaBa's torch.cat(unbind)
    anchor_labels = labels.repeat(views)
    logits = anchors @ anchors.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(n * views, dtype=torch.bool, device=features.device)
    positives = (anchor_labels[:, None] == anchor_labels[None, :]) & not_self
    log_denominator = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denominator
    mean_positive = (log_prob * positives).sum(1) / positives.sum(1)
    return -(temperature / base_temperature) * mean_positive.mean()


class HaBaSet(SyntheticSet):
    r"""``haba``: bases x hallucinators (module docstring); ``ipc`` bases per class, ``ipc * n_hallucinators`` images.

    Layout of a class block: hallucinator-major, :math:`h_0(b_{c,0..ipc-1}), h_1(\dots), \dots`. Decoding is a
    pure, differentiable function of the stored parameters (bases and hallucinator weights); the gradient of
    every loss reaches both. With ``lr_hallucinators=None`` (HaBa's scripts: ``lr_style = lr_img``) the
    hallucinators are optimised with the bases (``lr_images``); else in a group of their own.
    Storage: ``num_classes * ipc * C_b * H * W`` numbers plus the hallucinators' weights. Decoding costs
    ``n_hallucinators`` hallucinator passes over the bases.

    Args:
        bases: ``(num_classes * ipc, C_b, H, W)`` class-blocked bases.
        num_classes: number of classes.
        hallucinators: the ``n_hallucinators >= 2`` hallucinators.
        options: the :class:`Options`.
        extras: learnable extras sized to the *decoded* set, or ``None``.
    """

    name = "haba"
    uses_generator = True

    @dataclass(frozen=True)
    class Options:
        n_hallucinators: int = option(5, "HaBa run_cifar10_ipc*_style5.sh: --n_style 5")
        hallucinator_kernel: int = option(3, "HaBa distill_fac.py: StyleTranslator(..., kernel_size=3)")
        basis_channels: int | None = option(None, "None: the data's channels; 1: HaBa --single_channel")
        lr_hallucinators: float | None = option(None, "None: lr_images (HaBa scripts: --lr_style 100 = --lr_img)")
        haba_club_weight: float = option(0.1, "HaBa scripts: --lambda_club_content 0.1")
        haba_cls_weight: float = option(1.0, "HaBa scripts: --lambda_cls_content 1.")
        haba_likelihood_weight: float = option(0.1, "HaBa scripts: --lambda_likeli_content 0.1")
        haba_contrast_weight: float = option(0.1, "HaBa scripts: --lambda_contrast_content 0.1")
        haba_temperature: float = option(0.07, "HaBa contrastive_loss.py: SupConLoss(temperature=0.07)")
        lr_extractor: float = option(0.001, "HaBa distill_fac.py: SGD(sim_content_net, lr=0.001, momentum=0.9)")

    def __init__(self, bases: Tensor, num_classes: int, hallucinators: Sequence[StyleHallucinator], options: Any,
                 extras: SyntheticExtras | None = None) -> None:
        if bases.dim() != 4 or bases.shape[0] % num_classes:
            raise ValueError(
                f"bases must have shape (num_classes * ipc, C, H, W) for {num_classes} classes, got {tuple(bases.shape)}"
            )
        n_h = len(hallucinators)
        ipc = bases.shape[0] // num_classes
        super().__init__(torch.arange(num_classes).repeat_interleave(ipc * n_h), num_classes, ipc, extras)
        self.options = options
        self.bases = nn.Parameter(bases.detach().clone().float())
        self.hallucinators = nn.ModuleList(hallucinators)
        self._register_extras()

    @staticmethod
    def check_options(options: Any) -> None:
        """Raise ``ValueError`` naming the first bad HaBa option."""
        if check_positive_int(options.n_hallucinators, "n_hallucinators") < 2:
            raise ValueError(
                f"n_hallucinators must be at least 2 (HaBa's contrastive terms compare two distinct hallucinators "
                f"of one basis), got {options.n_hallucinators}"
            )
        check_positive_int(options.hallucinator_kernel, "hallucinator_kernel")
        if options.basis_channels is not None:
            check_positive_int(options.basis_channels, "basis_channels")
        if options.lr_hallucinators is not None:
            check_positive_number(options.lr_hallucinators, "lr_hallucinators")
        for key in ("haba_club_weight", "haba_cls_weight", "haba_likelihood_weight", "haba_contrast_weight"):
            check_positive_number(getattr(options, key), key, allow_zero=True)
        check_positive_number(options.haba_temperature, "haba_temperature")
        check_positive_number(options.lr_extractor, "lr_extractor")

    @classmethod
    def from_images(cls, images, labels, num_classes, options, extras=None, generator=None):
        """Bases start at ``images`` (HaBa ``--pix_init real``; the channel mean with ``basis_channels=1``, as
        ``--single_channel``); hallucinator ``j`` is initialised (PyTorch's default init) from a seed drawn from
        ``generator``."""
        cls.check_options(options)
        if images.dim() != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        channels = images.shape[1]
        basis_channels = options.basis_channels or channels
        if basis_channels == channels:
            bases = images
        elif basis_channels == 1:
            bases = images.mean(dim=1, keepdim=True)
        else:
            raise ValueError(
                f"basis_channels must be None (the data's {channels}), {channels} or 1 (HaBa --single_channel), "
                f"got {basis_channels}"
            )
        size = (int(images.shape[2]), int(images.shape[3]))
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        hallucinators = [
            build_isolated(lambda: StyleHallucinator(basis_channels, channels, size, options.hallucinator_kernel),
                           draw_seed(generator))
            for _ in range(options.n_hallucinators)
        ]
        return cls(bases, num_classes, hallucinators, options, extras)

    def images(self) -> Tensor:
        decoded = torch.stack([h(self.bases) for h in self.hallucinators], dim=0)  # (n_h, n_bases, C, H, W)
        decoded = decoded.reshape(len(self.hallucinators), self.num_classes, self.ipc, *decoded.shape[2:])
        return decoded.transpose(0, 1).reshape(-1, *decoded.shape[3:])

    def hallucinate(self, j: int, bases: Tensor | None = None) -> Tensor:
        """:math:`h_j` applied to ``bases`` (default: all bases, class-blocked)."""
        return self.hallucinators[j](self.bases if bases is None else bases)

    def image_parameters(self) -> list[nn.Parameter]:
        if self.options.lr_hallucinators is None:
            return [self.bases, *self.hallucinators.parameters()]
        return [self.bases]

    def extra_parameter_groups(self) -> list[dict[str, Any]]:
        groups = super().extra_parameter_groups()
        if self.options.lr_hallucinators is not None:
            groups.append({"params": list(self.hallucinators.parameters()), "lr": float(self.options.lr_hallucinators)})
        return groups

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.hallucinators.parameters())

    def basis_labels(self) -> Tensor:
        """``(num_classes * ipc,)`` labels of the bases."""
        return torch.arange(self.num_classes, device=self.bases.device).repeat_interleave(self.ipc)

    def decoder_training(self, ctx: Any) -> HallucinatorTraining:
        return HallucinatorTraining(self, ctx)


class HallucinatorTraining(SyntheticTraining):
    """HaBa's adversarial losses around each image step (module docstring), on the engine's context ``ctx``.

    :meth:`loss` is the club term (differentiable in bases and hallucinators, not in the extractor);
    :meth:`after_step` trains the extractor one SGD step on the task + likelihood + contrastive losses of a
    fresh pair of hallucinations (the synthetic set detached). Every random choice (hallucinator pairs,
    augmentation, the extractor's initialisation) comes from the run's generator; the extractor and its
    optimiser state are checkpointed.
    """

    def __init__(self, synthetic: HaBaSet, ctx: Any) -> None:
        self.synthetic, self.ctx, self.options = synthetic, ctx, synthetic.options
        self.extractor = build_isolated(ctx.build_network, draw_seed(ctx.generator)).to(ctx.device)
        for p in self.extractor.parameters():
            p.requires_grad_(True)
        self.optimizer = torch.optim.SGD(self.extractor.parameters(), lr=float(self.options.lr_extractor), momentum=0.9)

    def _bases(self) -> Tensor:
        """All bases; class-parallel: rebuilt from their owners' rows on every rank (the club term and the
        extractor's training are then computed alike on every rank; the gradient reaches the own rows only)."""
        if getattr(self.ctx, "classes", None) is None:
            return self.synthetic.bases
        from .parallel import WholeSetOnEveryRank

        whole = WholeSetOnEveryRank(self.ctx.classes, self.synthetic.basis_labels(), self.ctx.real_batches)
        return whole.rows(self.synthetic.bases, summed=False)

    def _pair(self) -> tuple[Tensor, Tensor]:
        """Two distinct random hallucinations of every basis, augmented per sample: ``(2 n, C, H, W)`` and labels."""
        syn, gen = self.synthetic, self.ctx.generator
        j0, j1 = (int(j) for j in torch.randperm(len(syn.hallucinators), generator=gen)[:2])
        bases = self._bases()
        x = torch.cat([syn.hallucinate(j0, bases), syn.hallucinate(j1, bases)], dim=0)
        augmentation = self.ctx.augmentation
        if augmentation is not None:
            x = augmentation(x, generator=torch.Generator(device=x.device).manual_seed(draw_seed(gen)))
        return x, syn.basis_labels()

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        embedding = self.extractor.embed(x).flatten(1)
        return self.extractor.classifier(embedding), embedding

    def loss(self) -> Tensor:
        x, _ = self._pair()
        _, embedding = self._embed(x)
        e0, e1 = embedding.chunk(2)
        return self.options.haba_club_weight * ((F.cosine_similarity(e0, e1) + 1.0) / 2.0).mean()

    def extractor_loss(self, x: Tensor, labels: Tensor) -> Tensor:
        """The extractor's loss on a pair ``x = [h_{j0}(B); h_{j1}(B)]`` with basis labels ``labels``."""
        o = self.options
        logits, embedding = self._embed(x)
        e0, e1 = embedding.chunk(2)
        task = F.cross_entropy(logits, torch.cat([labels, labels]))
        likelihood = ((1.0 - F.cosine_similarity(e0, e1)) / 2.0).mean()
        views = torch.stack([F.normalize(e0, dim=1), F.normalize(e1, dim=1)], dim=1)
        contrast = supervised_contrastive_loss(views, labels, o.haba_temperature, o.haba_temperature)
        return o.haba_cls_weight * task + o.haba_likelihood_weight * likelihood + o.haba_contrast_weight * contrast

    def after_step(self) -> None:
        with torch.no_grad():
            x, labels = self._pair()
        value = self.extractor_loss(x.detach(), labels)
        if not bool(torch.isfinite(value.detach())):
            raise FloatingPointError(f"HaBa's extractor loss became {float(value)}; lower lr_extractor")
        self.optimizer.zero_grad(set_to_none=True)
        value.backward()
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"extractor": {k: v.detach().cpu().clone() for k, v in self.extractor.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.extractor.load_state_dict(state["extractor"])
            self.optimizer.load_state_dict(state["optimizer"])
