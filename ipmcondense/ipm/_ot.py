r"""The one optimal-transport engine of :mod:`ipmcondense.ipm`: one exact solver, one Sinkhorn loop.

Every OT computation of the package goes through this module:

* :func:`exact_transport` -- the exact discrete problem
  :math:`\min_{\pi \ge 0,\ \pi 1 = a,\ \pi^\top 1 = b} \langle \pi, C \rangle` on a dense cost matrix, solved
  by POT's network simplex (``ot.emd``, C++; Bonneel et al., 2011) in float64 on the CPU. It returns the
  optimal plan and the dual potentials :math:`(u, v)` (centred as POT does), from which
  :func:`envelope_value` builds a differentiable value: :math:`\sum_{ij} \pi^*_{ij} C_{ij}` with the plan held
  constant (gradient in the points, envelope theorem) plus :math:`\langle u, a \rangle + \langle v, b\rangle`
  as the first-order term in the weights (gradient in the weights, as ``ot.emd2``).
  Used by :func:`~ipmcondense.ipm.wasserstein.wasserstein` (``method="exact"``),
  :func:`~ipmcondense.ipm.wasserstein.transport_plan` and the outer/inner problems of
  :func:`~ipmcondense.ipm.dataset_distance.otdd`.
* :func:`sinkhorn_samples` and :func:`sinkhorn_costs` -- geomloss' symmetric log-domain Sinkhorn loop
  (``geomloss._legacy.sinkhorn_divergence.sinkhorn_loop``: :math:`\varepsilon`-scaling from
  :math:`\text{diameter}^p` to :math:`\text{blur}^p`, envelope gradients from a last extrapolation step,
  balanced or unbalanced with :math:`\rho = \text{reach}^p`). On point clouds the loop is reached through
  ``SamplesLoss`` (so values are bit-identical to geomloss, on every geomloss backend); on precomputed cost
  matrices (OTDD's label-augmented costs) the same loop runs with geomloss' dense soft-min.

Private module: the public functions live in :mod:`~ipmcondense.ipm.wasserstein`,
:mod:`~ipmcondense.ipm.sinkhorn` and :mod:`~ipmcondense.ipm.dataset_distance`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._validation import preload_keops_quietly, quiet_stdout

__all__ = [
    "BYTES_PER_EXACT_PAIR",
    "exact_transport",
    "envelope_value",
    "check_exact_size",
    "sinkhorn_samples",
    "sinkhorn_costs",
    "sinkhorn_plan",
    "KEOPS_ERRORS",
]

#: Memory the exact solver needs per pair (i, j): our float64 cost matrix, POT's float64 plan and the
#: network-simplex arc arrays (source, target, cost, flow, state), rounded up.
BYTES_PER_EXACT_PAIR = 64

KEOPS_ERRORS = (NameError, ImportError, OSError)


def _available_memory() -> int | None:
    """Bytes of physical memory currently available, or ``None`` if the platform does not say."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_exact_size(n: int, m: int, hint: str) -> None:
    """Raise a ``ValueError`` if an ``n x m`` exact problem cannot fit the available memory.

    The limit is what memory allows (``BYTES_PER_EXACT_PAIR * n * m`` bytes must fit the physical memory
    available now), not a fixed number of pairs; ``hint`` says what to use instead.
    """
    needed = BYTES_PER_EXACT_PAIR * n * m
    available = _available_memory()
    if available is not None and needed > available:
        raise ValueError(
            f"exact optimal transport between {n} and {m} points needs about {needed / 2**30:.1f} GiB "
            f"(dense {n} x {m} cost and plan plus the network simplex), but only {available / 2**30:.1f} GiB "
            f"are available: {hint}"
        )


def exact_transport(
    cost: Tensor | np.ndarray, a: Tensor | np.ndarray | None, b: Tensor | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Optimal plan and dual potentials of :math:`\min_{\pi \in \Pi(a, b)} \langle \pi, C \rangle`.

    Solved by POT's network simplex (``ot.emd``) in float64 on the CPU, exact up to float64 rounding
    (errors near 1e-15 on well-scaled costs). ``a``/``b`` ``None`` mean uniform; they are renormalised to
    sum to exactly 1 (callers have checked them to 1e-5). Zero and tiny (1e-300) weights are fine.

    Returns:
        ``(plan, u, v)``: the ``(n, m)`` plan, and potentials with :math:`u_i + v_j \le C_{ij}` (equality on
        the support of the plan), each centred to mean zero, so that :math:`\langle u, a\rangle + \langle
        v, b\rangle` plus the constant :math:`\bar u + \bar v` is the optimal value.

    Raises:
        RuntimeError: if the network simplex does not report an optimal solution.

    Cost: :math:`O(nm)` memory; time typically :math:`O(nm \cdot \min(n, m))` or less.
    """
    with quiet_stdout():  # POT imports pykeops, which prints notices on stdout
        import ot

    c = cost.detach().to("cpu", torch.float64).numpy() if isinstance(cost, Tensor) else np.asarray(cost, np.float64)
    c = np.ascontiguousarray(c)
    n, m = c.shape
    a_np = _as_mass(a, n)
    b_np = _as_mass(b, m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the result code below is checked instead
        plan, log = ot.emd(a_np, b_np, c, numItermax=max(100_000, 100 * (n + m) ** 2), log=True,
                           check_marginals=False)
    if log.get("result_code", 1) != 1:
        raise RuntimeError(f"the exact optimal transport solver (network simplex) failed: {log.get('warning')}")
    u = np.asarray(log["u"], dtype=np.float64)
    v = np.asarray(log["v"], dtype=np.float64)
    return np.asarray(plan, dtype=np.float64), u - u.mean(), v - v.mean()


def _as_mass(w: Tensor | np.ndarray | None, n: int) -> np.ndarray:
    if w is None:
        return np.full(n, 1.0 / n)
    values = w.detach().to("cpu", torch.float64).numpy() if isinstance(w, Tensor) else np.asarray(w, np.float64)
    return np.ascontiguousarray(values / values.sum())


def envelope_value(
    plan: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    pair_cost: Any,
    a: Tensor | None,
    b: Tensor | None,
    like: Tensor,
) -> Tensor:
    r"""Differentiable optimal value :math:`\sum_{ij} \pi^*_{ij} c_{ij}` from an exact solution.

    ``pair_cost(rows, cols)`` returns the torch costs :math:`c_{ij}` of the listed pairs (differentiable in
    the points); only the support of the plan is evaluated. When the weights ``a``/``b`` require a gradient,
    :math:`\langle u, a - \text{sg}(a)\rangle + \langle v, b - \text{sg}(b)\rangle` (zero in value) adds the
    dual potentials as their gradient, exactly as ``ot.emd2`` does.
    """
    rows, cols = np.nonzero(plan > 0)
    device, dtype = like.device, like.dtype
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.as_tensor(cols, dtype=torch.long, device=device)
    masses = torch.as_tensor(plan[rows, cols], dtype=dtype, device=device)
    value = (masses * pair_cost(rows_t, cols_t)).sum()
    for w, potential in ((a, u), (b, v)):
        if w is not None and w.requires_grad:
            dual = torch.as_tensor(potential, dtype=w.dtype, device=w.device)
            value = value + (dual * (w - w.detach())).sum().to(dtype)
    return value


# --------------------------------------------------------------------------------------------------
# Sinkhorn: geomloss' loop.


def _diameter(x: Tensor, y: Tensor) -> float:
    """geomloss' diameter estimate: the diagonal of the bounding box of both clouds."""
    both = torch.cat((x.detach(), y.detach()), dim=0)
    return float((both.max(dim=0).values - both.min(dim=0).values).norm())


def sinkhorn_samples(
    x: Tensor,
    y: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    p: int,
    blur: float,
    scaling: float,
    reach: float | None,
    backend: str,
    debias: bool,
    potentials: bool,
) -> Any:
    """One call to ``geomloss.SamplesLoss("sinkhorn")`` on point clouds, with the caller's grad mode kept.

    geomloss switches autograd off for its loop and back on at the end, which would leave autograd enabled
    for a caller inside ``torch.no_grad()``; the context manager restores the caller's mode. If KeOps fails
    at run time (e.g. a missing compiler), the call is repeated on the ``"tensorized"`` backend.
    """
    preload_keops_quietly()
    with quiet_stdout():
        from geomloss import SamplesLoss

    diameter = _diameter(x, y)
    # Degenerate clouds (e.g. one point each, identical) have diameter 0 and break geomloss' schedule
    # (log 0); any diameter <= blur gives the one-temperature schedule [blur^p, blur^p].
    diameter_arg = None if diameter > blur else blur

    def call(chosen: str) -> Any:
        loss = SamplesLoss(
            "sinkhorn", p=p, blur=blur, reach=reach, diameter=diameter_arg, scaling=scaling,
            debias=debias, potentials=potentials, backend=chosen,
        )
        with torch.set_grad_enabled(torch.is_grad_enabled()):
            return loss(a, x, b, y)

    if backend != "online":
        return call(backend)
    try:
        return call("online")
    except (*KEOPS_ERRORS, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "keops" not in str(err).lower():
            raise
        warnings.warn(
            f"KeOps failed ({type(err).__name__}: {err}); the Sinkhorn divergence falls back to the dense "
            "'tensorized' backend",
            RuntimeWarning,
            stacklevel=3,
        )
        return call("tensorized")


def sinkhorn_costs(
    cost_xy: Tensor,
    cost_xx: Tensor | None,
    cost_yy: Tensor | None,
    a: Tensor,
    b: Tensor,
    *,
    p: float,
    blur: float,
    scaling: float,
    reach: float | None = None,
    diameter: float | None = None,
    extra_iterations: int = 0,
    debias: bool = True,
    potentials: bool = False,
) -> Any:
    r"""geomloss' Sinkhorn loop on precomputed cost matrices (``(n, m)``, ``(n, n)``, ``(m, m)``).

    The temperature schedule is geomloss' (``epsilon_schedule``: from :math:`\text{diameter}^p` down to
    :math:`\text{blur}^p`, the blur multiplied by ``scaling`` per step), followed by ``extra_iterations``
    updates at the final :math:`\varepsilon = \text{blur}^p`. ``diameter`` ``None`` means
    :math:`(\max C)^{1/p}`. The three problems (a-b, a-a, b-b) run the same updates, so identical inputs give
    exactly 0. Gradients with respect to the costs (and so the points) are geomloss' envelope gradients: the
    loop runs without autograd and one last extrapolation step is differentiated. Returns the debiased
    :math:`S_\varepsilon` (or the raw :math:`\mathrm{OT}_\varepsilon` with ``debias=False``) as a 0-d tensor.
    """
    preload_keops_quietly()
    with quiet_stdout():
        from geomloss._legacy.sinkhorn_divergence import epsilon_schedule, log_weights, sinkhorn_cost, sinkhorn_loop
        from geomloss._legacy.sinkhorn_samples import softmin_tensorized

    if diameter is None:
        costs = [cost_xy] + ([cost_xx, cost_yy] if debias else [])
        diameter = float(max(float(c.detach().max()) for c in costs)) ** (1.0 / p) if costs else 0.0
    diameter = max(diameter, blur)
    eps = blur**p
    rho = None if reach is None else reach**p
    eps_list = [float(e) for e in epsilon_schedule(p, diameter, blur, scaling)] + [eps] * int(extra_iterations)
    # Envelope gradients: d OT / d C = plan. The f-update sees C_xy with its graph and the g-update a
    # detached transpose (otherwise the plan would be counted twice); a self-cost C_xx depends on its points
    # through both indices, so it enters with half its gradient (value unchanged).
    batch = [cost_xy[None], cost_xy.detach().T.contiguous()[None]]
    cxx = _half_gradient(cost_xx)[None] if debias else None
    cyy = _half_gradient(cost_yy)[None] if debias else None
    a_b, b_b = a[None], b[None]
    with torch.set_grad_enabled(torch.is_grad_enabled()):
        f_aa, g_bb, g_ab, f_ba = sinkhorn_loop(
            softmin_tensorized, log_weights(a_b), log_weights(b_b), cxx, cyy, batch[0], batch[1],
            eps_list, rho, debias=debias,
        )
        if potentials:  # raw potentials (f_ba, g_ab) of OT_eps(a, b)
            return f_ba.reshape(-1), g_ab.reshape(-1)
        value = sinkhorn_cost(eps, rho, a_b, b_b, f_aa, g_bb, g_ab, f_ba, batch=True, debias=debias)
    return value.reshape(())


def _half_gradient(t: Tensor) -> Tensor:
    """``t`` in value, half of its gradient in the backward pass."""
    detached = t.detach()
    return detached + 0.5 * (t - detached) if t.requires_grad else detached


def sinkhorn_plan(
    x: Tensor,
    y: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    p: int,
    blur: float,
    scaling: float,
    reach: float | None,
    iterations: int,
) -> Tensor:
    r"""Entropic transport plan :math:`\pi_{ij} = a_i b_j \exp((f_i + g_j - C_{ij}) / \varepsilon)`.

    :math:`(f, g)` are the raw (not debiased) potentials of :math:`\mathrm{OT}_\varepsilon(\alpha, \beta)`
    from geomloss' loop (its :math:`\varepsilon`-scaling schedule, then ``iterations`` more updates at the
    final temperature, so that the marginals converge), :math:`C = \|x - y\|^p / p` (geomloss' smoothed
    cost :math:`\sqrt{\max(\|x - y\|^2, 10^{-8})}` for ``p=1``) and :math:`\varepsilon = \text{blur}^p`.
    Dense ``(n, m)``, no gradient.
    """
    with torch.no_grad():
        x, y, a, b = x.detach(), y.detach(), a.detach(), b.detach()
        d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        cost = d2 / 2 if p == 2 else d2.clamp_min(1e-8).sqrt()
        diameter = _diameter(x, y)
        f, g = sinkhorn_costs(
            cost, None, None, a, b, p=p, blur=blur, scaling=scaling, reach=reach,
            diameter=diameter if diameter > blur else blur, extra_iterations=iterations, debias=False,
            potentials=True,
        )
        eps = blur**p
        log_a = torch.where(a > 0, a.clamp_min(torch.finfo(a.dtype).tiny).log(), torch.full_like(a, -torch.inf))
        log_b = torch.where(b > 0, b.clamp_min(torch.finfo(b.dtype).tiny).log(), torch.full_like(b, -torch.inf))
        return torch.exp(log_a[:, None] + log_b[None, :] + (f[:, None] + g[None, :] - cost) / eps)
