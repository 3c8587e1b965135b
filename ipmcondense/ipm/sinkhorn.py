r"""Debiased Sinkhorn divergences and their dual potentials, built on geomloss.

For probability measures :math:`\alpha = \sum_i a_i \delta_{x_i}` and
:math:`\beta = \sum_j b_j \delta_{y_j}`, ground cost :math:`C(x, y) = \tfrac1p \|x - y\|^p` and temperature
:math:`\varepsilon = \text{blur}^p`, the entropic OT cost is

.. math::
    \mathrm{OT}_\varepsilon(\alpha, \beta) = \min_{\pi \in \Pi(\alpha, \beta)}
    \langle \pi, C \rangle + \varepsilon\, \mathrm{KL}(\pi \,|\, \alpha \otimes \beta)

and the debiased Sinkhorn divergence (Feydy et al., 2019) is

.. math::
    S_\varepsilon(\alpha, \beta) = \mathrm{OT}_\varepsilon(\alpha, \beta)
    - \tfrac12 \mathrm{OT}_\varepsilon(\alpha, \alpha) - \tfrac12 \mathrm{OT}_\varepsilon(\beta, \beta).

It interpolates between :math:`W_p^p / p` (blur :math:`\to 0`) and half the energy-type MMD with kernel
:math:`-C` (blur :math:`\to \infty`). geomloss (``SamplesLoss("sinkhorn")``) is the engine: log-domain
Sinkhorn iterations with :math:`\varepsilon`-scaling (from :math:`\text{diameter}^p` down to
:math:`\text{blur}^p`, dividing the blur by ``scaling`` at every step), and envelope-theorem gradients
(the loop runs without autograd, one last differentiable step gives the gradient, so backward memory does
not grow with the number of iterations). This module adds input checks, backend selection with a safe
KeOps fallback, and witness functions (the dual potentials extended to the whole space).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _ot
from ._validation import as_point_pair, as_points, as_weights, check_choice, check_positive, quiet_stdout
from .witness import Witness

__all__ = ["sinkhorn_divergence", "sinkhorn_witness", "SinkhornWitness", "SINKHORN_BACKENDS"]

SINKHORN_BACKENDS = ("auto", "tensorized", "online")

# geomloss' own threshold: below N * M = 5000^2 the dense ("tensorized") backend is fast and fits memory.
_TENSORIZED_MAX_PAIRS = 5000**2

_KEOPS_ERRORS = _ot.KEOPS_ERRORS


def _check_sinkhorn_args(
    p: Any, blur: Any, scaling: Any, reach: Any, backend: Any
) -> tuple[int, float, float, float | None]:
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"p must be 1 or 2 (ground cost |x - y|^p / p), got {p!r}")
    blur_value = check_positive(blur, "blur")
    scaling_value = check_positive(scaling, "scaling")
    if not 0.0 < scaling_value < 1.0:
        raise ValueError(f"scaling must lie strictly between 0 and 1, got {scaling!r}")
    reach_value = None if reach is None else check_positive(reach, "reach")
    check_choice(backend, SINKHORN_BACKENDS, "backend")
    return int(p), blur_value, scaling_value, reach_value


def _uniform(n: int, like: Tensor) -> Tensor:
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)


def _keops_usable() -> bool:
    try:
        with quiet_stdout():
            import pykeops.torch  # noqa: F401
            from geomloss._legacy import sinkhorn_samples
    except _KEOPS_ERRORS:
        return False
    return bool(getattr(sinkhorn_samples, "keops_available", False))


def _resolve_backend(backend: str, x: Tensor, y: Tensor) -> str:
    """Map ``backend`` to a geomloss backend.

    ``"auto"`` keeps the dense ``"tensorized"`` backend on CPU (KeOps' CPU path is several times slower
    than dense torch there) and for small problems, and uses KeOps (``"online"``, linear memory) on CUDA
    when :math:`\\max(n, m)^2 > 5000^2`. An unusable KeOps never surfaces: it falls back to
    ``"tensorized"`` with a warning.
    """
    n, m = x.shape[0], y.shape[0]
    if backend == "auto":
        large = max(n, m) ** 2 > _TENSORIZED_MAX_PAIRS
        backend = "online" if (x.device.type == "cuda" and large) else "tensorized"
    if backend == "online" and not _keops_usable():
        warnings.warn(
            "KeOps is not usable here (pykeops failed to import or compile), so the Sinkhorn divergence "
            "runs on the dense 'tensorized' backend, whose memory grows as (n + m)^2",
            RuntimeWarning,
            stacklevel=3,
        )
        backend = "tensorized"
    return backend


# The one Sinkhorn loop of the package (geomloss', reached through SamplesLoss on point clouds).
_run_geomloss = _ot.sinkhorn_samples


def _prepare(
    x: Any, y: Any, x_weights: Any, y_weights: Any, *, unbalanced: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xs, ys = as_point_pair(x, y)
    a = as_weights(x_weights, xs.shape[0], "x_weights", xs, probability=not unbalanced)
    b = as_weights(y_weights, ys.shape[0], "y_weights", ys, probability=not unbalanced)
    a = _uniform(xs.shape[0], xs) if a is None else a
    b = _uniform(ys.shape[0], ys) if b is None else b
    return xs, ys, a, b


def sinkhorn_divergence(
    x: Any,
    y: Any,
    p: int = 2,
    blur: float = 0.05,
    scaling: float = 0.5,
    reach: float | None = None,
    x_weights: Any = None,
    y_weights: Any = None,
    backend: str = "auto",
    debias: bool = True,
) -> Tensor:
    r"""Debiased Sinkhorn divergence :math:`S_\varepsilon(\alpha, \beta)` between two weighted point clouds.

    Conventions are geomloss' (``SamplesLoss("sinkhorn", p, blur, reach, scaling)``): cost
    :math:`C(x, y) = \|x - y\|^p / p`, temperature :math:`\varepsilon = \text{blur}^p`, and with
    ``reach`` the unbalanced variant with KL marginal penalties of strength :math:`\rho = \text{reach}^p`.
    The value is

    .. math::
        S_\varepsilon(\alpha, \beta) = \langle \alpha, f_{\beta\alpha} - f_{\alpha\alpha} \rangle
        + \langle \beta, g_{\alpha\beta} - g_{\beta\beta} \rangle

    in terms of the dual potentials of the three entropic problems (balanced case). As
    :math:`\text{blur} \to 0` it tends to :math:`W_p^p(\alpha, \beta) / p`; as
    :math:`\text{blur} \to \infty` to :math:`-\tfrac12 \langle \alpha - \beta, C (\alpha - \beta)\rangle`
    (half an energy distance for ``p=1``). For ``p=1`` geomloss smooths the cost at zero,
    :math:`C(x, y) = \sqrt{\max(\|x - y\|^2, 10^{-8})}`, so e.g. two Diracs give :math:`\|x - y\| - 10^{-4}`.
    ``debias=False`` returns the raw
    :math:`\mathrm{OT}_\varepsilon(\alpha, \beta)` instead (positive even for :math:`\alpha = \beta`).

    Estimator: the plug-in value on the empirical measures (biased as an estimate of the population
    divergence, with sample complexity :math:`O(\varepsilon^{-d/2} n^{-1/2})`).

    Negative values: mathematically :math:`S_\varepsilon \ge 0`, but with a small ``blur`` and an
    aggressive ``scaling`` (0.5) the truncated :math:`\varepsilon`-scaling loop can return a slightly negative
    value (geomloss issues #24, #25). It is returned **as computed, not clamped**, so that gradients stay
    informative during optimisation; its magnitude measures the approximation error, and a ``scaling`` of
    0.8-0.9 reduces it. :func:`ipmcondense.ipm.wasserstein.wasserstein` with ``method="sinkhorn"`` clamps at
    zero before taking the root. A non-finite result raises ``FloatingPointError``; nothing returns NaN.

    Gradients with respect to ``x`` and ``y`` are the envelope-theorem gradients that geomloss provides
    (exact at convergence of the Sinkhorn loop). Gradients with respect to the weights are geomloss' too: the
    first variations of :math:`S_\varepsilon` (the potentials :math:`F`, :math:`G` of
    :class:`SinkhornWitness`, up to an additive constant that does not matter for directions keeping the
    total mass).

    Args:
        x: ``(n, d)`` samples of :math:`\alpha` (images are flattened).
        y: ``(m, d)`` samples of :math:`\beta`, on the device of ``x``.
        p: exponent of the ground cost, 1 or 2.
        blur: target blur :math:`\varepsilon^{1/p}` (in the units of the points), positive.
        scaling: ratio between successive blurs in the :math:`\varepsilon`-scaling, in (0, 1); closer to 1
            is slower and more accurate.
        reach: ``None`` for balanced OT, otherwise the positive reach of unbalanced OT
            (geomloss' ``reach``): mass may be created or destroyed at a KL price :math:`\rho = \text{reach}^p`,
            so measures of unequal total mass can be compared.
        x_weights: optional ``(n,)`` probability weights of ``x`` (uniform if ``None``). With ``reach``,
            any non-negative weights of positive total mass (an unnormalised measure).
        y_weights: optional ``(m,)`` weights of ``y``, likewise.
        backend: ``"auto"`` (dense on CPU and for small problems, KeOps on CUDA when
            :math:`\max(n, m) > 5000`), ``"tensorized"`` (dense, :math:`O((n + m)^2)` memory) or ``"online"``
            (KeOps, :math:`O(n + m)` memory; falls back to ``"tensorized"`` with a warning if KeOps is
            unusable).
        debias: return :math:`S_\varepsilon` (default) or the raw :math:`\mathrm{OT}_\varepsilon`.

    Returns:
        A 0-d tensor on ``x.device``, differentiable with respect to ``x`` and ``y``.

    Cost: :math:`O(K (n + m)^2 d)` time, :math:`K \approx \log(\text{diameter}/\text{blur}) /
    \log(1/\text{scaling})` iterations; memory :math:`O((n + m)^2)` tensorized, :math:`O(n + m)` online.
    """
    p, blur_value, scaling_value, reach_value = _check_sinkhorn_args(p, blur, scaling, reach, backend)
    if not isinstance(debias, bool):
        raise TypeError(f"debias must be a bool, got {type(debias).__name__}")
    xs, ys, a, b = _prepare(x, y, x_weights, y_weights, unbalanced=reach_value is not None)
    chosen = _resolve_backend(backend, xs, ys)
    value = _run_geomloss(
        xs, ys, a, b, p=p, blur=blur_value, scaling=scaling_value, reach=reach_value,
        backend=chosen, debias=debias, potentials=False,
    )
    value = value.reshape(())
    if not bool(torch.isfinite(value.detach())):
        raise FloatingPointError(
            f"the Sinkhorn divergence is not finite ({float(value)}); use a larger blur, float64 inputs, or "
            "rescale the points"
        )
    return value


def _soft_c_transform(
    eps: float, p: int, support: Tensor, log_weights: Tensor, potential: Tensor
) -> Callable[[Tensor], Tensor]:
    r"""Return :math:`z \mapsto -\varepsilon \log \sum_j w_j \exp((h_j - C(z, s_j)) / \varepsilon)`."""
    support, log_weights, potential = support.detach(), log_weights.detach(), potential.detach()

    def transform(z: Tensor) -> Tensor:
        z = z.to(dtype=support.dtype, device=support.device)
        squared = ((z[:, None, :] - support[None, :, :]) ** 2).sum(-1)
        # geomloss' costs: |z - s|^2 / 2, and for p = 1 sqrt(max(|z - s|^2, 1e-8)) (smooth at z = s).
        cost = squared / 2 if p == 2 else squared.clamp_min(1e-8).sqrt()
        return -eps * torch.logsumexp(log_weights[None, :] + (potential[None, :] - cost) / eps, dim=1)

    return transform


def _log(w: Tensor) -> Tensor:
    return torch.where(w > 0, w.clamp_min(torch.finfo(w.dtype).tiny).log(), torch.full_like(w, -1e5))


class SinkhornWitness(Witness):
    r"""Witness of the debiased Sinkhorn divergence, with access to the two extended dual potentials.

    ``potential_x(z)`` is :math:`F(z) = f_{\beta\alpha}(z) - f_{\alpha\alpha}(z)` and ``potential_y(z)`` is
    :math:`G(z) = g_{\alpha\beta}(z) - g_{\beta\beta}(z)`, the first variations of :math:`S_\varepsilon` with
    respect to :math:`\alpha` and :math:`\beta`; on the samples,
    :math:`\langle \alpha, F \rangle + \langle \beta, G \rangle = S_\varepsilon(\alpha, \beta)`
    (see :meth:`dual_value`). The witness itself is :math:`w = (F - G) / 2`.
    """

    def __init__(
        self,
        potential_x: Callable[[Tensor], Tensor],
        potential_y: Callable[[Tensor], Tensor],
        *,
        dim: int,
    ) -> None:
        super().__init__(lambda z: 0.5 * (potential_x(z) - potential_y(z)), metric="sinkhorn", dim=dim)
        self._potential_x = potential_x
        self._potential_y = potential_y

    def potential_x(self, z: Any) -> Tensor:
        """The debiased potential :math:`F` of the first measure, evaluated at ``z``."""
        return self._potential_x(self._check_query(z))

    def potential_y(self, z: Any) -> Tensor:
        """The debiased potential :math:`G` of the second measure, evaluated at ``z``."""
        return self._potential_y(self._check_query(z))

    def dual_value(self, x: Any, y: Any, x_weights: Any = None, y_weights: Any = None) -> Tensor:
        r"""Return :math:`\langle \alpha, F \rangle + \langle \beta, G \rangle`, which equals
        :math:`S_\varepsilon` when ``x``, ``y`` (and weights) are the samples the witness was built from."""
        fx, gy = self.potential_x(x), self.potential_y(y)
        a = as_weights(x_weights, fx.shape[0], "x_weights", fx)
        b = as_weights(y_weights, gy.shape[0], "y_weights", gy)
        first = fx.mean() if a is None else (a * fx).sum()
        second = gy.mean() if b is None else (b * gy).sum()
        return first + second

    def _check_query(self, z: Any) -> Tensor:
        points = as_points(z, "z")
        if points.shape[1] != self.dim:
            raise ValueError(
                f"z must have points of dimension {self.dim} (as the samples the witness was built "
                f"from), got shape {tuple(points.shape)}"
            )
        return points


def sinkhorn_witness(
    x: Any,
    y: Any,
    p: int = 2,
    blur: float = 0.05,
    scaling: float = 0.5,
    x_weights: Any = None,
    y_weights: Any = None,
    backend: str = "auto",
) -> SinkhornWitness:
    r"""Witness function of the (balanced, debiased) Sinkhorn divergence: the dual potentials, extended.

    geomloss solves three entropic problems and returns potentials on the samples. Each is extended to any
    point :math:`z` by the soft :math:`C`-transform at the final temperature :math:`\varepsilon =
    \text{blur}^p` (as in geomloss' last Sinkhorn step), e.g.

    .. math::
        f_{\beta\alpha}(z) = -\varepsilon \log \sum_j b_j
        \exp\big((g_{\alpha\beta}(y_j) - C(z, y_j)) / \varepsilon\big), \qquad
        f_{\alpha\alpha}(z) = -\varepsilon \log \sum_i a_i
        \exp\big((f_{\alpha\alpha}(x_i) - C(z, x_i)) / \varepsilon\big),

    and likewise :math:`g_{\alpha\beta}(z)` (a transform over the :math:`x_i` with
    :math:`f_{\beta\alpha}`) and :math:`g_{\beta\beta}(z)`. With :math:`F = f_{\beta\alpha} - f_{\alpha\alpha}`
    and :math:`G = g_{\alpha\beta} - g_{\beta\beta}` (the first variations of :math:`S_\varepsilon` in
    :math:`\alpha` and :math:`\beta`), the returned witness is

    .. math::
        w(z) = \tfrac12 \big(F(z) - G(z)\big).

    Exact identity: :math:`E_\alpha F + E_\beta G = S_\varepsilon(\alpha, \beta)` (available as
    :meth:`SinkhornWitness.dual_value`). :math:`S_\varepsilon` is a convex function of each measure but not
    an IPM, so no single function has a mean gap equal to it. By convexity,
    :math:`S_\varepsilon(\beta, \beta) = 0 \ge S_\varepsilon(\alpha, \beta) + \langle \beta - \alpha, F
    \rangle` and symmetrically for :math:`G`, so the mean gap is an upper bound:
    :math:`E_\alpha w - E_\beta w \ge S_\varepsilon(\alpha, \beta)` (up to the solver's convergence error).
    In the kernel limit (blur :math:`\to \infty`) :math:`w` is the MMD witness of the kernel :math:`-C` and the
    mean gap is exactly :math:`2 S_\varepsilon`; at small blur the ratio depends on the data (typically
    1.4 to 2.3 on Gaussian clouds), because the self-potentials :math:`f_{\alpha\alpha}` extend as soft
    distances to the support of :math:`\alpha`.

    Args:
        x, y, p, blur, scaling, x_weights, y_weights, backend: as in :func:`sinkhorn_divergence` (balanced,
            debiased).

    Returns:
        A :class:`SinkhornWitness`; calling it on ``(k, d)`` points costs :math:`O(k (n + m) d)` time and
        memory and is differentiable with respect to the query points (potentials are constants).

    Cost: two geomloss solves (debiased and raw potentials), as in :func:`sinkhorn_divergence`.
    """
    p, blur_value, scaling_value, _ = _check_sinkhorn_args(p, blur, scaling, None, backend)
    xs, ys, a, b = _prepare(x, y, x_weights, y_weights)
    chosen = _resolve_backend(backend, xs, ys)
    common = dict(p=p, blur=blur_value, scaling=scaling_value, reach=None, backend=chosen, potentials=True)
    with torch.no_grad():
        xd, yd, ad, bd = xs.detach(), ys.detach(), a.detach(), b.detach()
        debiased_f, debiased_g = _run_geomloss(xd, yd, ad, bd, debias=True, **common)
        f_ba, g_ab = _run_geomloss(xd, yd, ad, bd, debias=False, **common)
    f_ba, g_ab = f_ba.reshape(-1), g_ab.reshape(-1)
    f_aa = f_ba - debiased_f.reshape(-1)
    g_bb = g_ab - debiased_g.reshape(-1)
    for name, potential in (("f", f_aa), ("g", g_bb), ("f_ba", f_ba), ("g_ab", g_ab)):
        if not bool(torch.isfinite(potential).all()):
            raise FloatingPointError(
                f"the Sinkhorn potential {name} is not finite; use a larger blur or float64 inputs"
            )
    eps = blur_value**p
    log_a, log_b = _log(ad), _log(bd)
    f_ba_at = _soft_c_transform(eps, p, yd, log_b, g_ab)
    f_aa_at = _soft_c_transform(eps, p, xd, log_a, f_aa)
    g_ab_at = _soft_c_transform(eps, p, xd, log_a, f_ba)
    g_bb_at = _soft_c_transform(eps, p, yd, log_b, g_bb)
    return SinkhornWitness(
        lambda z: f_ba_at(z) - f_aa_at(z),
        lambda z: g_ab_at(z) - g_bb_at(z),
        dim=xs.shape[1],
    )

