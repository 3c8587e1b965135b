"""Differentiable siamese augmentation (DSA) of image batches.

Dataset condensation compares a synthetic set :math:`S` with the real set :math:`T` through a network
``phi``; with augmentation the compared quantities are :math:`\\phi(A_\\omega(S))` and
:math:`\\phi(A_\\omega(T))`, where the *same* random transformation :math:`\\omega` is applied to both
sides (siamese) and :math:`A_\\omega` is differentiable in the images, so that gradients reach the
synthetic pixels (Zhao & Bilen, ICML 2021).

Families (the strategy string ``"color_crop_cutout_flip_scale_rotate"`` lists them):

- ``scale``: :math:`x \\mapsto x \\circ M^{-1}`, :math:`M = \\operatorname{diag}(s_x, s_y)`,
  :math:`s_\\cdot \\sim U[1/r, r]`, ``r = ratio_scale``; bilinear resampling with zero padding.
- ``rotate``: rotation by :math:`\\alpha \\sim U[-\\rho, \\rho]` degrees, ``rho = ratio_rotate``.
- ``crop``: integer translation by :math:`t_x, t_y \\in \\{-k, \\dots, k\\}`,
  :math:`k = \\lfloor r H + 1/2 \\rfloor`, ``r = ratio_crop_pad``; vacated pixels are zero.
- ``cutout``: a square of side :math:`\\lfloor r H + 1/2 \\rfloor` (``r = ratio_cutout``) at a uniform
  random centre is set to zero (clipped at the border).
- ``flip``: horizontal flip with probability ``prob_flip``.
- ``color``: brightness, saturation and contrast, applied together in this order:
  :math:`x + (b - 1/2)\\beta`; :math:`(x - \\bar x_{c})\\,s\\sigma + \\bar x_{c}`
  (:math:`\\bar x_c` the mean over channels); :math:`(x - \\bar x)(c + \\gamma) + \\bar x`
  (:math:`\\bar x` the mean over channels and pixels), with :math:`b, s, c \\sim U[0, 1]` and
  :math:`\\beta, \\sigma, \\gamma` = ``brightness, saturation, contrast``.

As in the reference (``aug_mode='S'``), one call applies ONE family chosen uniformly from the
strategy. :meth:`DifferentiableSiameseAugmentation.draw` returns that family with one parameter set
shared by every sample of any batch (siamese use: apply the same draw to real and synthetic batches of
different sizes); :meth:`DifferentiableSiameseAugmentation.__call__` draws independent parameters per
sample (the training augmentation of the evaluation protocol).

Every transform is linear in the pixels for fixed parameters, hence differentiable (bilinear
resampling, masks, gathers and affine maps). Cost: :math:`O(N C H W)` time and memory per call.
Randomness comes only from an explicit :class:`torch.Generator` (or torch's global generator when
``None`` is passed), never from the clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DSA_PARAMS",
    "DSA_FAMILIES",
    "DEFAULT_DSA_STRATEGY",
    "DIGIT_LIKE_DATASETS",
    "AugmentationDraw",
    "DifferentiableSiameseAugmentation",
    "NoAugmentation",
    "dsa_strategy_for",
    "parse_strategy",
]

#: Reference defaults of ``ParamDiffAug`` (VICO-UoE/DatasetCondensation, ``utils.py``).
DSA_PARAMS: Mapping[str, float] = MappingProxyType(
    {
        "prob_flip": 0.5,
        "ratio_scale": 1.2,
        "ratio_rotate": 15.0,
        "ratio_crop_pad": 0.125,
        "ratio_cutout": 0.5,
        "brightness": 1.0,
        "saturation": 2.0,
        "contrast": 0.5,
    }
)

#: Families understood in a strategy string, in the reference order.
DSA_FAMILIES: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")

#: The reference strategy string for colour images.
DEFAULT_DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"

#: Dataset names whose DSA strategy drops ``flip`` (digits are not mirror-symmetric).
DIGIT_LIKE_DATASETS: tuple[str, ...] = ("digits", "mnist", "svhn")

_IDENTITY = "identity"


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """Split a strategy string such as ``"color_crop_flip"`` into its families, checking each name.

    Raises:
        ValueError: on an empty strategy or an unknown family name.
    """
    if not isinstance(strategy, str):
        raise TypeError(
            f"strategy must be a string such as {DEFAULT_DSA_STRATEGY!r}, got {type(strategy).__name__}"
        )
    families = tuple(part for part in strategy.split("_") if part)
    if not families:
        raise ValueError(f"strategy must name at least one family of {DSA_FAMILIES}, got {strategy!r}")
    for family in families:
        if family not in DSA_FAMILIES:
            raise ValueError(
                f"unknown augmentation family {family!r} in strategy {strategy!r}; "
                f"expected families from: {', '.join(DSA_FAMILIES)}"
            )
    return families


def dsa_strategy_for(dataset: Any, strategy: str = DEFAULT_DSA_STRATEGY) -> str:
    """Return the DSA strategy for ``dataset``: ``strategy`` without ``flip`` for digit-like data.

    Args:
        dataset: a dataset name (``"mnist"``, ``"cifar10"``, ...) or an object with an
            ``is_digits_like`` attribute (e.g. :class:`ipmcondense.data.LabelledImages`).
        strategy: the strategy to start from (default the reference one).
    """
    families = parse_strategy(strategy)
    if isinstance(dataset, str):
        digit_like = dataset.lower() in DIGIT_LIKE_DATASETS
    elif hasattr(dataset, "is_digits_like"):
        digit_like = bool(dataset.is_digits_like)
    else:
        raise TypeError(
            "dataset must be a dataset name or an object with an 'is_digits_like' attribute, "
            f"got {type(dataset).__name__}"
        )
    if digit_like:
        families = tuple(f for f in families if f != "flip")
    return "_".join(families)


@dataclass(frozen=True)
class AugmentationDraw:
    """One augmentation family and one parameter set, shared by every sample of a batch.

    Attributes:
        family: one of :data:`DSA_FAMILIES` or ``"identity"``.
        parameters: name -> tensor of shape ``(1,)`` (one value for the whole batch). Names per family:
            ``scale``: ``scale_x, scale_y``; ``rotate``: ``angle`` (radians); ``crop``:
            ``fraction_x, fraction_y`` in ``[0, 1)`` mapped to integer shifts at apply time (or
            ``shift_x, shift_y`` int64 pixels when built by hand); ``cutout``: ``fraction_x,
            fraction_y`` mapped to the square's centre (or ``centre_x, centre_y`` pixels);
            ``flip``: ``flip`` (bool); ``color``: ``brightness`` (additive offset),
            ``saturation`` and ``contrast`` (multipliers); ``identity``: none.
    """

    family: str
    parameters: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "AugmentationDraw":
        """Return the same draw with its parameters on ``device``."""
        return AugmentationDraw(self.family, {k: v.to(device) for k, v in self.parameters.items()})


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64) * (high - low) + low


def _randint(n: int, low: int, high: int, generator: torch.Generator | None) -> Tensor:
    """Integers uniform in ``[low, high)``."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(low, high, (n,), generator=generator, device=device)


def _check_images(x: Any, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    return x


class DifferentiableSiameseAugmentation:
    """Differentiable siamese augmentation with the reference ``ParamDiffAug`` semantics.

    Args:
        strategy: families joined by ``_`` (default ``"color_crop_cutout_flip_scale_rotate"``); use
            :func:`dsa_strategy_for` to drop ``flip`` for digit-like data.
        params: overrides of :data:`DSA_PARAMS` (unknown keys raise ``ValueError``).

    Example:
        >>> aug = DifferentiableSiameseAugmentation("color_crop")
        >>> g = torch.Generator().manual_seed(0)
        >>> draw = aug.draw(g)
        >>> real, syn = torch.randn(8, 3, 16, 16), torch.randn(2, 3, 16, 16)
        >>> a, b = aug.apply(real, draw), aug.apply(syn, draw)   # same transform on both
    """

    def __init__(
        self, strategy: str = DEFAULT_DSA_STRATEGY, params: Mapping[str, float] | None = None
    ) -> None:
        self.families = parse_strategy(strategy)
        self.strategy = "_".join(self.families)
        merged = dict(DSA_PARAMS)
        for key, value in dict(params or {}).items():
            if key not in DSA_PARAMS:
                raise ValueError(
                    f"unknown DSA parameter {key!r} in params; expected keys: {', '.join(DSA_PARAMS)}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"params[{key!r}] must be a finite number, got {value!r}")
            merged[key] = float(value)
        if merged["ratio_scale"] < 1.0:
            raise ValueError(f"params['ratio_scale'] must be >= 1, got {merged['ratio_scale']}")
        if not 0.0 <= merged["prob_flip"] <= 1.0:
            raise ValueError(f"params['prob_flip'] must be in [0, 1], got {merged['prob_flip']}")
        self.params: Mapping[str, float] = MappingProxyType(merged)

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.params.items() if v != DSA_PARAMS[k]}
        extra = f", params={changed}" if changed else ""
        return f"{type(self).__name__}(strategy={self.strategy!r}{extra})"

    # ----------------------------------------------------------------------------------- drawing
    def _choose_family(self, generator: torch.Generator | None) -> str:
        index = int(_randint(1, 0, len(self.families), generator).item())
        return self.families[index]

    def _draw_parameters(self, family: str, n: int, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Draw ``n`` independent parameter sets of ``family``.

        The integer pixel parameters of ``crop`` and ``cutout`` depend on the image size, so they are
        drawn as fractions in ``[0, 1)`` and mapped to pixels by :meth:`_pixel_parameters`; a draw is
        therefore valid for images of any size.
        """
        p = self.params
        if family == "scale":
            r = p["ratio_scale"]
            return {
                "scale_x": _uniform(n, 1.0 / r, r, generator),
                "scale_y": _uniform(n, 1.0 / r, r, generator),
            }
        if family == "rotate":
            limit = math.radians(p["ratio_rotate"])
            return {"angle": _uniform(n, -limit, limit, generator)}
        if family in ("crop", "cutout"):
            return {
                "fraction_x": _uniform(n, 0.0, 1.0, generator),
                "fraction_y": _uniform(n, 0.0, 1.0, generator),
            }
        if family == "flip":
            return {"flip": _uniform(n, 0.0, 1.0, generator) < p["prob_flip"]}
        if family == "color":
            return {
                "brightness": (_uniform(n, 0.0, 1.0, generator) - 0.5) * p["brightness"],
                "saturation": _uniform(n, 0.0, 1.0, generator) * p["saturation"],
                "contrast": _uniform(n, 0.0, 1.0, generator) + p["contrast"],
            }
        raise ValueError(
            f"unknown augmentation family {family!r}; expected one of: {', '.join(DSA_FAMILIES)}"
        )

    def _pixel_parameters(
        self, family: str, params: Mapping[str, Tensor], height: int, width: int
    ) -> dict[str, Tensor]:
        """Map crop/cutout fractions to integer pixels for ``height x width`` images (reference ranges).

        ``crop``: shifts uniform on :math:`\\{-k, \\dots, k\\}`,
        :math:`k = \\lfloor r_{crop} H + 1/2 \\rfloor`;
        ``cutout``: centres uniform on :math:`\\{0, \\dots, H - s \\bmod 2\\}`, with
        :math:`s = \\lfloor r_{cutout} H + 1/2 \\rfloor` the side (as ``randint(0, H + 1 - s % 2)``).
        Other families pass through.
        """
        if "fraction_x" not in params:
            return dict(params)
        fx, fy = params["fraction_x"], params["fraction_y"]
        p = self.params
        if family == "crop":
            kx, ky = int(width * p["ratio_crop_pad"] + 0.5), int(height * p["ratio_crop_pad"] + 0.5)
            return {
                "shift_x": (fx * (2 * kx + 1)).floor().long().clamp(max=2 * kx) - kx,
                "shift_y": (fy * (2 * ky + 1)).floor().long().clamp(max=2 * ky) - ky,
            }
        sx, sy = int(width * p["ratio_cutout"] + 0.5), int(height * p["ratio_cutout"] + 0.5)
        nx, ny = width + 1 - sx % 2, height + 1 - sy % 2
        return {
            "centre_x": (fx * nx).floor().long().clamp(max=nx - 1),
            "centre_y": (fy * ny).floor().long().clamp(max=ny - 1),
        }

    def draw(
        self, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> AugmentationDraw:
        """Choose one family and ONE parameter set for every sample of any batch (siamese use).

        The draw holds no image size: apply it to real and synthetic batches of any sizes (and, for
        ``crop``/``cutout``, images of any resolution: the integer pixel parameters are derived from
        stored fractions at :meth:`apply` time).

        Args:
            generator: source of randomness (``None``: torch's global generator).
            device: where the parameter tensors live (default the generator's device).
        """
        family = self._choose_family(generator)
        draw = AugmentationDraw(family, self._draw_parameters(family, 1, generator))
        return draw.to(device) if device is not None else draw

    # ---------------------------------------------------------------------------------- applying
    def apply(self, x: Tensor, draw: AugmentationDraw) -> Tensor:
        """Apply ``draw`` (one parameter set) to every sample of ``x``; differentiable in ``x``.

        Applying the same draw to ``a`` and ``b`` equals applying it to ``torch.cat([a, b])``.

        Args:
            x: images ``(N, C, H, W)``, any floating dtype and device.
            draw: from :meth:`draw`, or built by hand (crop/cutout may then give pixel parameters
                ``shift_x, shift_y`` / ``centre_x, centre_y`` directly).
        """
        x = _check_images(x)
        n, _, height, width = x.shape
        family = draw.family
        if family == _IDENTITY:
            return x
        if family not in self.families:
            raise ValueError(
                f"draw.family {family!r} is not in this augmentation's strategy {self.strategy!r}"
            )
        params = self._pixel_parameters(family, draw.parameters, height, width)
        batch = {k: v.to(x.device).reshape(-1)[:1].expand(n) for k, v in params.items()}
        return _apply_family(x, family, batch, self.params)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment ``x`` with one family (chosen per call) and independent parameters per sample.

        This is the reference evaluation mode (``seed=-1``): the family is shared by the batch, the
        random parameters are not. Differentiable in ``x``.
        """
        x = _check_images(x)
        n, _, height, width = x.shape
        family = self._choose_family(generator)
        params = self._pixel_parameters(family, self._draw_parameters(family, n, generator), height, width)
        params = {k: v.to(x.device) for k, v in params.items()}
        return _apply_family(x, family, params, self.params)


class NoAugmentation:
    """The identity with the interface of :class:`DifferentiableSiameseAugmentation`.

    Used by recipes and protocols without augmentation; consumes no randomness.
    """

    strategy = ""
    families: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return "NoAugmentation()"

    def draw(
        self, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> AugmentationDraw:
        """Return the identity draw."""
        return AugmentationDraw(_IDENTITY, {})

    def apply(self, x: Tensor, draw: AugmentationDraw) -> Tensor:
        """Return ``x`` unchanged."""
        return _check_images(x)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return ``x`` unchanged."""
        return _check_images(x)


# ------------------------------------------------------------------------------ the transforms
def _apply_family(
    x: Tensor, family: str, params: Mapping[str, Tensor], config: Mapping[str, float]
) -> Tensor:
    """Apply ``family`` with per-sample parameters (each tensor of shape ``(N,)``)."""
    if family == "scale":
        return _scale(x, params["scale_x"], params["scale_y"])
    if family == "rotate":
        return _rotate(x, params["angle"])
    if family == "crop":
        return _translate(x, params["shift_x"], params["shift_y"])
    if family == "cutout":
        side_x = int(x.shape[3] * config["ratio_cutout"] + 0.5)
        side_y = int(x.shape[2] * config["ratio_cutout"] + 0.5)
        return _cutout(x, params["centre_x"], params["centre_y"], side_x, side_y)
    if family == "flip":
        return _flip(x, params["flip"])
    if family == "color":
        return _colour(x, params["brightness"], params["saturation"], params["contrast"])
    raise ValueError(
        f"unknown augmentation family {family!r}; expected one of: {', '.join(DSA_FAMILIES)}"
    )


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample ``x`` on the grid ``theta @ [u, v, 1]`` (bilinear, zeros outside, align_corners)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _scale(x: Tensor, scale_x: Tensor, scale_y: Tensor) -> Tensor:
    zero = torch.zeros_like(scale_x)
    theta = torch.stack(
        [torch.stack([scale_x, zero, zero], dim=1), torch.stack([zero, scale_y, zero], dim=1)], dim=1
    )
    return _affine(x, theta.to(x.dtype))


def _rotate(x: Tensor, angle: Tensor) -> Tensor:
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, sin, zero], dim=1), torch.stack([-sin, cos, zero], dim=1)], dim=1)
    return _affine(x, theta.to(x.dtype))


def _translate(x: Tensor, shift_x: Tensor, shift_y: Tensor) -> Tensor:
    """``out[n, :, i, j] = x[n, :, i + shift_y[n], j + shift_x[n]]``, zero outside the image."""
    n, _, height, width = x.shape
    pad = max(int(shift_x.abs().max().item()) if n else 0, int(shift_y.abs().max().item()) if n else 0)
    if pad == 0:
        return x
    padded = F.pad(x, [pad, pad, pad, pad])
    rows = torch.arange(height, device=x.device).unsqueeze(0) + pad + shift_y.long().unsqueeze(1)  # (N, H)
    cols = torch.arange(width, device=x.device).unsqueeze(0) + pad + shift_x.long().unsqueeze(1)  # (N, W)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    # Advanced indexing (differentiable): channels-last gather, then back to (N, C, H, W).
    out = padded.permute(0, 2, 3, 1)[batch, rows.unsqueeze(2), cols.unsqueeze(1)]
    return out.permute(0, 3, 1, 2)


def _cutout(x: Tensor, centre_x: Tensor, centre_y: Tensor, side_x: int, side_y: int) -> Tensor:
    """Zero the square ``[c - side//2, c - side//2 + side)`` in each axis (clipped to the image)."""
    _, _, height, width = x.shape
    start_x = (centre_x.long() - side_x // 2).unsqueeze(1)
    start_y = (centre_y.long() - side_y // 2).unsqueeze(1)
    cols = torch.arange(width, device=x.device).unsqueeze(0)
    rows = torch.arange(height, device=x.device).unsqueeze(0)
    inside_x = (cols >= start_x) & (cols < start_x + side_x)  # (N, W)
    inside_y = (rows >= start_y) & (rows < start_y + side_y)  # (N, H)
    hole = inside_y.unsqueeze(2) & inside_x.unsqueeze(1)  # (N, H, W)
    return x * (~hole).unsqueeze(1).to(x.dtype)


def _flip(x: Tensor, flip: Tensor) -> Tensor:
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def _colour(x: Tensor, brightness: Tensor, saturation: Tensor, contrast: Tensor) -> Tensor:
    b = brightness.to(x.dtype).view(-1, 1, 1, 1)
    s = saturation.to(x.dtype).view(-1, 1, 1, 1)
    c = contrast.to(x.dtype).view(-1, 1, 1, 1)
    x = x + b
    channel_mean = x.mean(dim=1, keepdim=True)
    x = (x - channel_mean) * s + channel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * c + image_mean
