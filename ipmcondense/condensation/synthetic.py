r"""The ``synthetic`` axis: how the condensed set S is stored and decoded into the images the loss sees.

A :class:`SyntheticSet` owns the *stored* parameters (what the optimiser updates and checkpoints hold)
and decodes them into training examples with :meth:`SyntheticSet.images` (differentiable, class-blocked)
and ``labels``. The loop, the objectives and the evaluation never know how the images
are stored: evaluation reads the decoded images only (``synthetic.pt`` holds them next to the stored
parameters). Decoding composes with the feature map, so every matching recipe over a parameterised set
is the IPM of the *pushed-forward* set: :math:`d_F(\mathrm{decode}_\#\,\nu_S, \mu_T)`.

Registered parameterisations (:data:`SYNTHETIC_SETS`): ``pixels`` (every image a free tensor),
``multiformation`` (IDC: every stored image decoded into ``factor**2`` upsampled tiles), ``channelwise``
(channel-efficient multi-formation: ``factor**2`` low-resolution images stored in the channels of one
stored tensor), ``haba`` (HaBa: bases decoded by learnable hallucinators, :mod:`.haba`) and ``latent``
(GLaD, IT-GAN: latent vectors decoded by a fixed generator, :math:`S = G_\#\,\nu_Z`). A new
one is a subclass with a ``name``, an ``Options`` dataclass, :meth:`~SyntheticSet.images` and
:meth:`~SyntheticSet.from_images` (how to start from real or noise images), plus a registry entry.

Learnable extras requested by an objective (:class:`SyntheticExtras`: a training step size for MTT,
soft-label logits for DATM-style MTT, regression labels for KIP/RFAD) live on the base class, so every
parameterisation supports them: :meth:`SyntheticSet.extra_parameter_groups` returns their optimiser
groups and :meth:`SyntheticSet.training_labels` what the evaluation network is trained on.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.components import Component, Registry, option
from ipmcondense.ipm._validation import check_choice

__all__ = [
    "SyntheticSet",
    "SyntheticExtras",
    "SyntheticTraining",
    "PixelSet",
    "MultiFormationSet",
    "ChannelwiseSet",
    "decode_channelwise",
    "LatentSet",
    "LATENT_INITS",
    "SYNTHETIC_SETS",
    "SYNTHETIC_NAMES",
    "build_synthetic_set",
    "INIT_CHOICES",
    "initial_images",
]

INIT_CHOICES = ("real", "noise", "herding", "kcenter", "kmeans", "random")


@dataclass(frozen=True)
class SyntheticExtras:
    r"""Learnable extras an objective asks the synthetic set to carry (see the module docstring).

    Attributes:
        learning_rate: initial learnable training step size :math:`\eta` (MTT), or ``None``; optimised by
            SGD with step ``lr_lr`` and momentum 0.5 (MTT's ``syn_lr``); saved with the set and used by the
            evaluation protocol (``learned_lr``).
        label_logits: initial ``(n, C)`` logits :math:`z` of learnable soft labels
            :math:`\mathrm{softmax}(z)` (DATM), or ``None``; SGD with step ``lr_labels``, momentum 0.9.
        label_values: initial ``(n, C)`` learnable regression targets (KIP/RFAD ``learn_labels``; init
            centred one-hot), or ``None``; step ``lr_labels``. Evaluation trains on the hard labels.
    """

    learning_rate: float | None = None
    lr_lr: float = 1e-5
    label_logits: Tensor | None = None
    label_values: Tensor | None = None
    lr_labels: float = 1.0


class SyntheticTraining(ABC):
    """What a parameterisation with helpers of its own adds to every image step (HaBa's hallucinator losses).

    Built by :meth:`SyntheticSet.decoder_training` on the engine's objective context. The engine adds
    :meth:`loss` to the objective's loss (its gradient reaches the synthetic set's parameters only), takes the
    optimiser step, then calls :meth:`after_step` (which may train the decoder's own adversary with its own
    optimiser), and checkpoints :meth:`state_dict`.
    """

    @abstractmethod
    def loss(self) -> Tensor:
        """A differentiable scalar added to the step's loss."""

    def after_step(self) -> None:
        """Update the helpers after the image step (default: nothing)."""

    def state_dict(self) -> dict[str, Any]:
        """State for checkpoints (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class SyntheticSet(Component, nn.Module, ABC):
    """A learnable synthetic dataset: stored parameters decoded into class-blocked training images.

    Decoded images are returned in class blocks of equal size: rows ``[c * k, (c + 1) * k)`` belong to
    class ``c`` with ``k = images_per_class`` (``ipc`` for pixels; a decoder may produce more).

    Args:
        labels: ``(n,)`` int64 hard labels of the decoded images, in class blocks.
        num_classes: number of classes.
        ipc: stored images per class (the budget).
        extras: learnable extras (:class:`SyntheticExtras`), or ``None``.
    """

    kind = "synthetic set"
    #: whether :meth:`from_images` takes a ``generator`` (a parameterisation with random initial weights)
    uses_generator: bool = False

    def __init__(self, labels: Tensor, num_classes: int, ipc: int, extras: SyntheticExtras | None = None) -> None:
        nn.Module.__init__(self)
        if labels.dim() != 1 or labels.shape[0] % num_classes:
            raise ValueError(
                f"labels must be a vector holding the same number of images for each of {num_classes} classes, "
                f"got shape {tuple(labels.shape)}"
            )
        self.register_buffer("labels", labels.to(torch.int64).clone())
        self.num_classes = int(num_classes)
        self.ipc = int(ipc)
        self.images_per_class = labels.shape[0] // num_classes
        self._init_extras(extras or SyntheticExtras())

    # ------------------------------------------------------------------ the parameterisation
    @classmethod
    @abstractmethod
    def from_images(cls, images: Tensor, labels: Tensor, num_classes: int, options: Any,
                    extras: SyntheticExtras | None = None) -> SyntheticSet:
        """A set whose decoded images start at (or from) ``images`` ``(num_classes * ipc, C, H, W)``."""

    @classmethod
    def initial_images_per_class(cls, ipc: int, options: Any) -> int:
        """How many initial images per class :meth:`from_images` takes for ``ipc`` stored images per class.

        ``ipc`` by default; a decoder that starts from more real images than it stores (multi-formation
        tiles ``factor**2`` real images into one stored image) says so here. The engine draws this many
        initial images per class, so the extras an objective sizes on the initial images match the decoded set.
        """
        return int(ipc)

    @abstractmethod
    def images(self) -> Tensor:
        """Decoded images ``(n, C, H, W)``, differentiable w.r.t. the stored parameters."""

    @abstractmethod
    def image_parameters(self) -> list[nn.Parameter]:
        """The stored parameters that encode the images (optimised with the recipe's ``lr_images``)."""

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the decoder shared by every class (HaBa's hallucinators; none by default): in
        class-parallel condensation they are replicated on every rank, not owned by class blocks."""
        return []

    def decoder_training(self, ctx: Any) -> SyntheticTraining | None:
        """The losses and helper updates this parameterisation adds to every step (``None``: none; HaBa: some).

        ``ctx`` is the engine's :class:`~ipmcondense.condensation.objectives.ObjectiveContext`.
        """
        return None

    def class_slice(self, c: int) -> slice:
        """Rows of class ``c`` in :meth:`images` and ``labels``."""
        if not 0 <= c < self.num_classes:
            raise ValueError(f"class index c must be in [0, {self.num_classes}), got {c}")
        return slice(c * self.images_per_class, (c + 1) * self.images_per_class)

    # ------------------------------------------------------------------------- the extras
    def _init_extras(self, extras: SyntheticExtras) -> None:
        if extras.label_logits is not None and extras.label_values is not None:
            raise ValueError("pass at most one of label_logits (soft labels) and label_values (regression labels)")
        n = self.labels.shape[0]
        for name in ("label_logits", "label_values"):
            value = getattr(extras, name)
            if value is not None and tuple(value.shape) != (n, self.num_classes):
                raise ValueError(f"{name} must have shape ({n}, {self.num_classes}), got {tuple(value.shape)}")
        self._extras = extras

    def _register_extras(self) -> None:
        """Create the extras' parameters (called by subclasses after their stored parameters)."""
        extras = self._extras
        self.learning_rate = None
        if extras.learning_rate is not None:
            lr = extras.learning_rate
            if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
                raise ValueError(f"learning_rate must be a positive finite number, got {lr!r}")
            self.learning_rate = nn.Parameter(torch.tensor(float(lr)))
        self.label_logits = None if extras.label_logits is None else nn.Parameter(
            extras.label_logits.detach().clone().float())
        self.label_values = None if extras.label_values is None else nn.Parameter(
            extras.label_values.detach().clone().float())
        self.lr_lr, self.lr_labels = float(extras.lr_lr), float(extras.lr_labels)

    def extra_parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups for the learnable extras (learning rate, soft labels, regression labels)."""
        groups: list[dict[str, Any]] = []
        if self.learning_rate is not None:
            groups.append({"params": [self.learning_rate], "lr": self.lr_lr, "momentum": 0.5})
        if self.label_logits is not None:
            groups.append({"params": [self.label_logits], "lr": self.lr_labels, "momentum": 0.9})
        if self.label_values is not None:
            groups.append({"params": [self.label_values], "lr": self.lr_labels})
        return groups

    def soft_labels(self) -> Tensor:
        r""":math:`\mathrm{softmax}(z)` ``(n, C)``, differentiable in the logits (requires ``label_logits``)."""
        if self.label_logits is None:
            raise ValueError("this synthetic set has no learnable soft labels (label_logits is None)")
        return torch.softmax(self.label_logits, dim=1)

    def training_labels(self) -> Tensor:
        """Targets the evaluation network is trained on: soft labels if learned, else the hard labels."""
        if self.label_logits is not None:
            return self.soft_labels().detach()
        return self.labels

    def learned_learning_rate(self) -> float | None:
        """The learned training step size, or ``None``."""
        return None if self.learning_rate is None else float(self.learning_rate.detach())


class PixelSet(SyntheticSet):
    """``pixels``: every synthetic image is a free ``(C, H, W)`` tensor (DC, DSA, DM, MTT, KIP, ...).

    Storage equals the decoded size: ``num_classes * ipc * C * H * W`` numbers (plus the extras);
    decoding is the identity, free.

    Args:
        images: ``(num_classes * ipc, C, H, W)`` initial images (normalised space), class-blocked.
        labels: matching hard labels.
        num_classes: number of classes.
        extras: learnable extras, or ``None``.
    """

    name = "pixels"

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, extras: SyntheticExtras | None = None) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if images.shape[0] % num_classes:
            raise ValueError(
                f"images must hold the same number of images for each of {num_classes} classes, "
                f"got {images.shape[0]} images"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},) for {num_classes} classes x ipc "
                f"{images.shape[0] // num_classes}, got {tuple(labels.shape)}"
            )
        super().__init__(labels, num_classes, images.shape[0] // num_classes, extras)
        self.pixels = nn.Parameter(images.detach().clone().float())
        self._register_extras()

    @classmethod
    def from_images(cls, images, labels, num_classes, options, extras=None):
        return cls(images, labels, num_classes, extras)

    def images(self) -> Tensor:
        return self.pixels

    def image_parameters(self) -> list[nn.Parameter]:
        return [self.pixels]


class MultiFormationSet(SyntheticSet):
    r"""``multiformation``: IDC's uniform multi-formation; each stored image decodes into ``factor**2`` images.

    A stored image :math:`x \in R^{C \times H \times W}` is cut into a ``factor`` x ``factor`` grid of tiles
    of size :math:`(H/f) \times (W/f)`, and every tile is upsampled back to :math:`H \times W` by bilinear
    interpolation (``align_corners=False``, torch's ``nn.Upsample(mode='bilinear')``):

    .. math:: \mathrm{decode}(x)_{(i, j)} = \mathrm{up}_{H \times W}\big(x[:, iH/f:(i+1)H/f,\ jW/f:(j+1)W/f]\big),
        \quad 0 \le i, j < f.

    Layout (IDC ``condense.py: decode_zoom``, applied per class): the decoded block of class ``c`` is
    tile-major, tile ``k = i f + j`` of all ``ipc`` stored images of the class, then tile ``k + 1``; labels
    are replicated, so a class holds ``images_per_class = ipc * factor**2`` decoded images for ``ipc``
    stored ones. Factor 1 is the identity (no interpolation), i.e. ``pixels``. Unlike IDC, a factor that
    does not divide the image size is an error (IDC pads with 0.5). Decoding is a pure, differentiable
    function of ``stored``; the bilinear upsampling is linear, so the gradient of every loss reaches
    the stored pixels. Storage: ``num_classes * ipc * C * H * W`` numbers; decoding costs one
    interpolation of ``num_classes * ipc * factor**2`` tiles, ``O(n_decoded * C * H * W)``.

    Args:
        stored: ``(num_classes * ipc, C, H, W)`` stored images (normalised space), class-blocked.
        num_classes: number of classes.
        factor: tiles per side (``factor**2`` decoded images per stored image).
        extras: learnable extras sized to the *decoded* set, or ``None``.
    """

    name = "multiformation"

    @dataclass(frozen=True)
    class Options:
        factor: int = option(2, "IDC (Kim et al. ICML'22) --factor 2, condense.py decode_zoom")

    def __init__(self, stored: Tensor, num_classes: int, factor: int = 2,
                 extras: SyntheticExtras | None = None) -> None:
        factor = _check_factor(factor, tuple(stored.shape))
        if stored.shape[0] % num_classes:
            raise ValueError(
                f"stored must hold the same number of images for each of {num_classes} classes, "
                f"got {stored.shape[0]} images"
            )
        ipc = stored.shape[0] // num_classes
        labels = torch.arange(num_classes).repeat_interleave(ipc * factor * factor)
        super().__init__(labels, num_classes, ipc, extras)
        self.factor = factor
        self.stored = nn.Parameter(stored.detach().clone().float())
        self._register_extras()

    @classmethod
    def initial_images_per_class(cls, ipc: int, options: Any) -> int:
        factor = _check_factor(options.factor)
        return int(ipc) * factor * factor

    @classmethod
    def from_images(cls, images, labels, num_classes, options, extras=None):
        """IDC's ``init='mix'``: per class, ``factor**2`` groups of ``ipc`` images, group ``k`` shrunk (nearest,
        IDC's ``F.interpolate`` default) into tile ``k`` (row-major) of the ``ipc`` stored images.

        ``images``: ``(num_classes * ipc * factor**2, C, H, W)`` class-blocked; decoding the result gives
        back (a blurred copy of) ``images`` in the same order. Noise initial images are tiled the same way.
        """
        factor, _, ipc = _check_tiled_start("multiformation", "stored image", options.factor, images, labels,
                                             num_classes)
        _, ch, h, w = images.shape
        sh, sw = h // factor, w // factor
        small = F.interpolate(images.detach().float(), size=(sh, sw), mode="nearest")
        # (C, f, f, ipc, ch, sh, sw) -> (C, ipc, ch, f, sh, f, sw): tile k = i f + j of stored image r
        small = small.reshape(num_classes, factor, factor, ipc, ch, sh, sw)
        stored = small.permute(0, 3, 4, 1, 5, 2, 6).reshape(num_classes * ipc, ch, h, w)
        return cls(stored, num_classes, factor, extras)

    def images(self) -> Tensor:
        if self.factor == 1:
            return self.stored
        f, (n, ch, h, w) = self.factor, self.stored.shape
        tiles = self.stored.reshape(self.num_classes, self.ipc, ch, f, h // f, f, w // f)
        tiles = tiles.permute(0, 3, 5, 1, 2, 4, 6).reshape(n * f * f, ch, h // f, w // f)
        return F.interpolate(tiles, size=(h, w), mode="bilinear", align_corners=False)

    def image_parameters(self) -> list[nn.Parameter]:
        return [self.stored]


def decode_channelwise(stored: Tensor, factor: int, image_channels: int) -> Tensor:
    r"""Channel-efficient multi-formation decoder :math:`f_c: R^n \to R^{f^2 n}` (a pure function).

    ``stored``: ``(m, f**2 * image_channels, h, w)``; channel group :math:`g` (channels
    ``[g C, (g + 1) C)``, :math:`C` = ``image_channels``) of stored tensor :math:`r` is one image of size
    :math:`h \times w`, upsampled bilinearly (``align_corners=False``) to :math:`f h \times f w`. Returns
    ``(m * f**2, C, f h, f w)`` in group-major order (all ``m`` images of group 0, then group 1, ...), the
    order :class:`ChannelwiseSet` lays out per class. Factor 1 returns ``stored`` itself.
    Cost: one interpolation, ``O(m f^2 C h w f^2)``.

    Raises:
        ValueError: ``stored`` is not 4-D, or its channel count is not ``factor**2 * image_channels``.
    """
    factor = _check_channelwise_stored(stored, factor, image_channels)
    f2 = factor * factor
    if factor == 1:
        return stored
    m, _, h, w = stored.shape
    groups = stored.reshape(m, f2, image_channels, h, w).transpose(0, 1).reshape(m * f2, image_channels, h, w)
    return F.interpolate(groups, size=(h * factor, w * factor), mode="bilinear", align_corners=False)


class ChannelwiseSet(SyntheticSet):
    r"""``channelwise``: channel-efficient multi-formation; ``factor**2`` images live in the channels of one tensor.

    One stored tensor has the storage of one image, :math:`n = C H W` numbers, laid out as
    ``(factor**2 * C, H / factor, W / factor)``: channel group :math:`g` holds a :math:`C`-channel image at
    :math:`1/f` resolution, decoded by bilinear upsampling (:func:`decode_channelwise`), so
    :math:`f_c: R^n \to R^{f^2 n}` (for 1-channel data and factor 2: a 4-channel half-resolution tensor
    decoded into four full images). Labels are replicated; a class holds ``ipc * factor**2`` decoded images,
    group-major (group 0 of all ``ipc`` stored tensors of the class, then group 1, ...).

    Design choices (no official code is known; implemented from the definition
    :math:`f_c: R^n \to R^{4n}`, see ``docs/guides/condensation.md``): the low-resolution images go into the
    *channel* axis at reduced resolution, so the storage is exactly one image's and the decoder is the
    parameter-free bilinear upsampler of IDC (a learned decoder would add storage); the start is IDC's
    ``init='mix'`` (``factor**2`` real images per stored tensor, shrunk by nearest-neighbour). With these
    choices the set of decoded images is the same as ``multiformation``'s: the channel layout is a fixed
    re-indexing (pixel-unshuffle of each tile into a channel group) of IDC's tile layout, and every
    optimiser of the library acts coordinate-wise, so the two parameterisations take the same steps
    (tested). What differs is the stored tensor (a ``factor**2 * C``-channel low-resolution tensor, what
    ``synthetic.pt`` holds under ``"stored"``) and the checks on it.

    Decoding is a pure, differentiable (linear) function of ``stored``; factor 1 is ``pixels``.

    Args:
        stored: ``(num_classes * ipc, factor**2 * image_channels, H / factor, W / factor)``, class-blocked.
        num_classes: number of classes.
        factor: resolution divisor (``factor**2`` decoded images per stored tensor).
        image_channels: channels :math:`C` of the data (and of each decoded image).
        extras: learnable extras sized to the *decoded* set, or ``None``.
    """

    name = "channelwise"

    @dataclass(frozen=True)
    class Options:
        factor: int = option(2, "channel-efficient multi-formation: f_c R^n -> R^{4n}, four images per stored one")

    def __init__(self, stored: Tensor, num_classes: int, factor: int = 2, image_channels: int = 1,
                 extras: SyntheticExtras | None = None) -> None:
        factor = _check_channelwise_stored(stored, factor, image_channels)
        if stored.shape[0] % num_classes:
            raise ValueError(
                f"stored must hold the same number of tensors for each of {num_classes} classes, "
                f"got {stored.shape[0]}"
            )
        ipc = stored.shape[0] // num_classes
        labels = torch.arange(num_classes).repeat_interleave(ipc * factor * factor)
        super().__init__(labels, num_classes, ipc, extras)
        self.factor, self.image_channels = factor, int(image_channels)
        self.stored = nn.Parameter(stored.detach().clone().float())
        self._register_extras()

    @classmethod
    def initial_images_per_class(cls, ipc: int, options: Any) -> int:
        factor = _check_factor(options.factor)
        return int(ipc) * factor * factor

    @classmethod
    def from_images(cls, images, labels, num_classes, options, extras=None):
        """Per class, ``factor**2`` groups of ``ipc`` images; group ``g`` is shrunk (nearest) into channel group ``g``.

        ``images``: ``(num_classes * ipc * factor**2, C, H, W)`` class-blocked (a factor must divide H and W);
        decoding the result gives back (a blurred copy of) ``images`` in the same order.
        """
        factor, f2, ipc = _check_tiled_start("channelwise", "stored tensor", options.factor, images, labels,
                                             num_classes)
        _, ch, h, w = images.shape
        small = F.interpolate(images.detach().float(), size=(h // factor, w // factor), mode="nearest")
        # (C, f2, ipc, ch, h', w') -> (C, ipc, f2 * ch, h', w'): group g of stored tensor r
        small = small.reshape(num_classes, f2, ipc, ch, h // factor, w // factor).transpose(1, 2)
        stored = small.reshape(num_classes * ipc, f2 * ch, h // factor, w // factor)
        return cls(stored, num_classes, factor, ch, extras)

    def images(self) -> Tensor:
        f2 = self.factor * self.factor
        decoded = decode_channelwise(self.stored, self.factor, self.image_channels)
        if self.factor == 1:
            return decoded
        # decode_channelwise is group-major over all stored tensors; regroup per class (class-blocked)
        per = decoded.reshape(f2, self.num_classes, self.ipc, *decoded.shape[1:]).transpose(0, 1)
        return per.reshape(-1, *decoded.shape[1:])

    def image_parameters(self) -> list[nn.Parameter]:
        return [self.stored]


def _check_channelwise_stored(stored: Tensor, factor: Any, image_channels: Any) -> int:
    factor = _check_factor(factor)
    if isinstance(image_channels, bool) or not isinstance(image_channels, int) or image_channels < 1:
        raise ValueError(f"image_channels must be a positive integer, got {image_channels!r}")
    if not isinstance(stored, Tensor) or stored.dim() != 4:
        raise ValueError(f"stored must be a tensor of shape (N, factor**2 * channels, h, w), got "
                         f"{tuple(getattr(stored, 'shape', ()))}")
    f2 = factor * factor
    if stored.shape[1] != f2 * image_channels:
        raise ValueError(
            f"channelwise with factor {factor} stores factor**2 * image_channels = {f2} x {image_channels} = "
            f"{f2 * image_channels} channels per stored tensor (one image of {image_channels} channel(s) per channel "
            f"group), got {stored.shape[1]}: the stored set does not fit data with {image_channels} channel(s)"
        )
    return factor


def _check_tiled_start(name: str, unit: str, factor: Any, images: Tensor, labels: Tensor,
                       num_classes: int) -> tuple[int, int, int]:
    """``(factor, factor**2, ipc)`` for a decoder that stores ``factor**2`` class-blocked initial images per
    ``unit``; errors name the set ``name`` and what does not divide or is out of order."""
    factor = _check_factor(factor, tuple(images.shape))
    f2 = factor * factor
    n = images.shape[0]
    if n % (num_classes * f2):
        raise ValueError(
            f"{name} with factor {factor} starts from factor**2 = {f2} initial images per {unit}: "
            f"{n} images for {num_classes} classes is not a multiple of {num_classes * f2}"
        )
    expected = torch.arange(num_classes).repeat_interleave(n // num_classes)
    if labels.shape != (n,) or not torch.equal(labels.cpu().to(torch.int64), expected):
        raise ValueError(f"labels must be {n // num_classes} class-blocked labels per class, in order 0..C-1")
    return factor, f2, n // (num_classes * f2)


def _check_factor(factor: Any, shape: tuple[int, ...] | None = None) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer (tiles per side), got {factor!r}")
    if shape is not None:
        if len(shape) != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {shape}")
        if shape[2] % factor or shape[3] % factor:
            raise ValueError(
                f"factor {factor} must divide the image size {shape[2]}x{shape[3]} (multi-formation cuts each "
                f"stored image into a factor x factor grid); choose a divisor such as "
                f"{max(d for d in range(1, min(shape[2], shape[3]) + 1) if shape[2] % d == 0 == shape[3] % d and d <= factor)}"
            )
    return factor


LATENT_INITS = ("gaussian", "inversion")


class LatentSet(SyntheticSet):
    r"""``latent``: every synthetic image is :math:`G(z_i, y_i)` for a stored latent :math:`z_i` of a *fixed* generator.

    The stored parameters are the latents ``(n, d)`` (``d = G.latent_dim``) and the labels; the generator
    ``G`` (eval mode, ``requires_grad=False``) is not optimised. Decoding, :math:`x_i = G(z_i, y_i)`, is a pure
    function of the stored latents (batch norm uses running statistics), and the gradient of any loss
    reaches the latents by the chain rule through ``G``: :math:`\nabla_{z_i} L = J_G(z_i)^\top \nabla_{x_i} L`.
    Every matching recipe over this set is the IPM of the pushed-forward set,
    :math:`d_F(G_\#\hat\nu_Z, \mu_T)`: the witness class sees only images on the generator's range
    (GLaD, Cazenavette et al. CVPR'23; IT-GAN, Zhao & Bilen 2022).

    Initialisation (``latent_init``): ``"gaussian"``, :math:`z \sim N(0, I)` drawn from the run's initial
    generator (GLaD ``glad_utils.prepare_latents``: ``zs = torch.randn``); ``"inversion"``, GAN inversion of
    the initial images ``x_i`` (IT-GAN): from a Gaussian draw, ``inversion_steps`` Adam steps (step
    ``inversion_lr``) on :math:`\frac1n\sum_i \|G(z_i, y_i) - x_i\|^2`. The initial images are kept as
    ``anchors`` (IT-GAN's regulariser compares the decoded set with them).

    Storage: ``n * d`` numbers plus the generator (``state_dict`` holds its weights too, so a saved set is
    self-contained). Cost of decoding: one generator forward pass on ``n`` latents.

    Args:
        latents: ``(num_classes * ipc, d)`` initial latents, class-blocked.
        labels: ``(num_classes * ipc,)`` class-blocked labels.
        num_classes: number of classes.
        generator: an ``nn.Module`` with an integer ``latent_dim`` mapping ``(z, labels)`` to normalised images
            (:func:`ipmcondense.generators.check_generator`).
        anchors: the images the latents were initialised from (``None``: none kept).
        extras: learnable extras, or ``None``.
    """

    name = "latent"
    needs_generator = True

    @dataclass(frozen=True)
    class Options:
        generator: str = option("", "a generator run directory (`ipmcondense generator --out DIR`); Python also "
                                    "accepts an nn.Module")
        latent_init: str = option("gaussian", "GLaD glad_utils.prepare_latents: zs = torch.randn (inversion: IT-GAN)")
        inversion_steps: int = option(200, "IT-GAN inverts for 5000 iterations (its released z files); 200 here, "
                                           "enough for the small generators trained here")
        inversion_lr: float = option(0.1, "IT-GAN: GAN inversion lr_z 0.1 (GANInversion_final_*_lrz0.100)")

    def __init__(self, latents: Tensor, labels: Tensor, num_classes: int, generator: nn.Module,
                 anchors: Tensor | None = None, extras: SyntheticExtras | None = None) -> None:
        if latents.dim() != 2:
            raise ValueError(f"latents must have shape (N, latent_dim), got {tuple(latents.shape)}")
        if labels.shape != (latents.shape[0],):
            raise ValueError(f"labels must have shape ({latents.shape[0]},) to match latents, got {tuple(labels.shape)}")
        latent_dim = getattr(generator, "latent_dim", None)
        if latents.shape[1] != latent_dim:
            raise ValueError(f"latents have dimension {latents.shape[1]} but the generator's latent_dim is {latent_dim!r}")
        super().__init__(labels, num_classes, latents.shape[0] // num_classes, extras)
        generator.eval()
        generator.requires_grad_(False)
        self.decoder = generator
        self.latents = nn.Parameter(latents.detach().clone() if latents.is_floating_point() else latents.float())
        self.register_buffer("anchors", None if anchors is None else anchors.detach().clone().float())
        self._register_extras()

    @classmethod
    def from_images(cls, images, labels, num_classes, options, extras=None, *, generator=None, rng=None):
        """Latents for the initial ``images``: Gaussian or inverted (``options.latent_init``); see the class docstring.

        ``generator``: an ``nn.Module`` (used as given) or ``None`` (``options.generator``, a run directory, is
        loaded); ``rng``: the ``torch.Generator`` of the Gaussian draw (seeded 0 if ``None``).
        """
        z, generator = cls._initial_latents(images, labels, num_classes, options, generator, rng)
        return cls(z, labels, num_classes, generator, anchors=images.detach().float(), extras=extras)

    @staticmethod
    def _initial_latents(images, labels, num_classes, options, generator, rng) -> tuple[Tensor, nn.Module]:
        """The initial latents ``(n, d)`` and the checked generator (:meth:`from_images`)."""
        from ipmcondense.generators import check_generator, load_generator

        check_choice(options.latent_init, LATENT_INITS, "latent_init")
        if generator is None:
            if not options.generator:
                raise ValueError(
                    "synthetic 'latent' needs a generator: --generator DIR (a run of `ipmcondense generator`) on the "
                    "command line, generator=DIR or generator=<nn.Module> in Python"
                )
            generator = load_generator(options.generator)
        images = images.detach().float()
        generator = check_generator(generator, num_classes, tuple(images.shape[1:]))
        rng = rng if rng is not None else torch.Generator().manual_seed(0)
        z = torch.randn(images.shape[0], generator.latent_dim, generator=rng)
        if options.latent_init == "inversion":
            z = invert_generator(generator, images, labels, z, int(options.inversion_steps), float(options.inversion_lr))
        return z, generator

    def train(self, mode: bool = True) -> LatentSet:
        """Set the module's mode; the fixed generator always stays in ``eval()`` mode (pure decoding)."""
        super().train(mode)
        self.decoder.eval()  # the generator is fixed: running batch-norm statistics, always
        return self

    def images(self) -> Tensor:
        return self.decoder(self.latents, self.labels)

    def image_parameters(self) -> list[nn.Parameter]:
        return [self.latents]


def invert_generator(generator: nn.Module, images: Tensor, labels: Tensor, start: Tensor, steps: int,
                     lr: float) -> Tensor:
    r"""GAN inversion: ``steps`` Adam steps (step ``lr``) from ``start`` on :math:`\frac1n\sum_i \|G(z_i, y_i) - x_i\|^2`.

    Returns the latents ``(n, d)`` (detached). ``steps = 0`` returns ``start``. Cost: ``steps`` forward and
    backward passes of the generator on ``n`` latents.
    """
    from ipmcondense.ipm._validation import check_positive_int, check_positive_number

    steps = check_positive_int(steps, "inversion_steps", allow_zero=True)
    lr = check_positive_number(lr, "inversion_lr")
    device = images.device
    z = start.detach().clone().to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = (generator(z, labels.to(device)) - images).pow(2).flatten(1).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return z.detach()


#: The registered synthetic-set parameterisations by name, the ``synthetic`` axis.
SYNTHETIC_SETS: Registry = Registry("synthetic set")
SYNTHETIC_SETS.register(PixelSet)
SYNTHETIC_SETS.register(MultiFormationSet)
SYNTHETIC_SETS.register(ChannelwiseSet)
SYNTHETIC_SETS.register(LatentSet)
from .haba import HaBaSet  # noqa: E402  (haba builds on the classes above)

SYNTHETIC_SETS.register(HaBaSet)
from .dcgm import LatentGANSet  # noqa: E402  (builds on LatentSet)

SYNTHETIC_SETS.register(LatentGANSet)
SYNTHETIC_NAMES = SYNTHETIC_SETS.names


def build_synthetic_set(
    name: str, images: Tensor, labels: Tensor, num_classes: int, config: dict[str, Any],
    extras: SyntheticExtras | None = None, *, generator: nn.Module | None = None,
    rng: torch.Generator | None = None,
) -> SyntheticSet:
    """The ``name`` parameterisation (:data:`SYNTHETIC_NAMES`) started from ``images``, options from ``config``.

    ``generator`` (an ``nn.Module``) reaches a parameterisation that decodes through a generator
    (``latent``); ``rng`` seeds the random draws of a parameterisation that has some (the latent start,
    HaBa's hallucinator weights; ``None``: a fixed seed); the others ignore them.
    """
    cls = SYNTHETIC_SETS.get(name)
    if getattr(cls, "needs_generator", False):  # latent, latent_gan
        return cls.from_images(images, labels, num_classes, cls.options_from(config), extras, generator=generator, rng=rng)
    if generator is not None:
        raise ValueError(f"generator is only used by synthetic 'latent', not {name!r}")
    if cls.uses_generator:
        return cls.from_images(images, labels, num_classes, cls.options_from(config), extras, generator=rng)
    return cls.from_images(images, labels, num_classes, cls.options_from(config), extras)


def initial_images(
    dataset: Any,
    ipc: int,
    init: str,
    generator: torch.Generator,
    *,
    seed: int = 0,
    arch: str = "convnet",
) -> tuple[Tensor, Tensor]:
    """Initial synthetic images ``(num_classes * ipc, C, H, W)`` and labels, in class blocks.

    ``init``: ``"real"`` (random real training images of each class, drawn with ``generator``),
    ``"noise"`` (standard normal pixels in normalised space, drawn with ``generator``), or a selection
    baseline from :mod:`ipmcondense.selection`: ``"random"``, ``"herding"``, ``"kcenter"``, ``"kmeans"``,
    seeded with ``seed``; herding, k-center and k-means embed with an untrained ``arch`` network.
    """
    check_choice(init, INIT_CHOICES, "init")
    images, labels = dataset.train_images, dataset.train_labels
    num_classes = int(dataset.num_classes)
    out_labels = torch.arange(num_classes).repeat_interleave(ipc)
    if init == "noise":
        shape = (num_classes * ipc, *images.shape[1:])
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return noise, out_labels
    if init == "real":
        picks = []
        for c in range(num_classes):
            idx = torch.nonzero(labels.cpu() == c).flatten()
            if idx.numel() < ipc:
                raise ValueError(f"ipc {ipc} is larger than class {c}, which has {idx.numel()} training images")
            perm = torch.randperm(idx.numel(), generator=generator)[:ipc]
            picks.append(idx[perm])
        order = torch.cat(picks)
        return images.cpu()[order].float().clone(), out_labels
    from ipmcondense import selection

    fn = selection.SELECTION_METHODS[init]
    sel_images, sel_labels = fn(dataset, ipc, seed, **({} if init == "random" else {"arch": arch}))
    return sel_images.detach().cpu().float().clone(), sel_labels.detach().cpu().to(torch.int64).clone()
