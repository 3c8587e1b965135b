"""Positive-definite (and conditionally negative-definite) kernels as small ``nn.Module`` objects.

A kernel :math:`k(x, y)` is called on two point clouds ``x`` of shape ``(n, d)`` and ``y`` of shape
``(m, d)`` and returns the dense Gram matrix :math:`K_{ij} = k(x_i, y_j)` of shape ``(n, m)``; that is
the *reference* evaluation (``O(nmd)`` time, ``O(nm)`` memory). The memory-bounded kernel sums used by
the distances live in :mod:`ipmcondense.ipm._kernel_sums`, which reads the kernel's structure:

* **radial** kernels :math:`k(x, y) = \\varphi(\\|x - y\\|^2)` (Gaussian, Laplacian, inverse
  multiquadric, energy, mixtures of these) expose the profile :math:`\\varphi` and its derivative, so
  that sums and their gradients can be computed tile by tile from GEMM-based squared distances;
* **dot-product** kernels :math:`k(x, y) = \\psi(\\langle x, y \\rangle)` (linear, polynomial) expose
  :math:`\\psi` and :math:`\\psi'` in the same way;
* any other subclass of :class:`Kernel` only needs ``forward``; it is then evaluated tile by tile with
  recomputation under autograd.

Bandwidths are a positive float or ``"median"`` (the median heuristic on the pooled sample, see
:func:`median_bandwidth`). A resolved bandwidth is a plain float: it is never part of the autograd graph.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._validation import check_choice, check_positive
from .pairwise import (  # noqa: F401  (the geometry lives in .pairwise; these names stay importable here)
    CANCELLATION_RATIO,
    MEDIAN_MAX_POINTS,
    _common_center,
    cancelled_entries,
    direct_squared_distances,
    median_bandwidth,
    safe_sqrt,
    squared_distances,
)

__all__ = [
    "Kernel",
    "RadialKernel",
    "DotProductKernel",
    "GaussianKernel",
    "LaplacianKernel",
    "InverseMultiquadricKernel",
    "EnergyKernel",
    "LinearKernel",
    "PolynomialKernel",
    "MixtureKernel",
    "KERNEL_NAMES",
    "get_kernel",
]

class Kernel(nn.Module, ABC):
    """A kernel :math:`k: \\mathbb{R}^d \\times \\mathbb{R}^d \\to \\mathbb{R}`.

    Subclasses implement :meth:`forward` (the dense Gram matrix). Data-dependent hyper-parameters
    (a ``"median"`` bandwidth, a default polynomial scale) are fixed by :meth:`resolved`, which the
    distances call once on the pooled sample before evaluating any kernel sum.

    Cost: the dense Gram matrix of ``n x m`` points costs :math:`O(nmd)` time and :math:`O(nm)` memory;
    the distances never build it for large inputs (tiled or KeOps kernel sums, :math:`O(\\text{tile})` memory).
    """

    name: str = "kernel"
    #: True when the kernel takes a square root of a squared distance (needs exact zeros).
    takes_square_root: bool = False

    @abstractmethod
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Return the dense Gram matrix :math:`K_{ij} = k(x_i, y_j)`, shape ``(n, m)``."""

    def resolved(self, x: Tensor, y: Tensor | None = None) -> Kernel:
        """Return a kernel whose data-dependent hyper-parameters are fixed for these samples."""
        return self

    def paired(self, x: Tensor, y: Tensor) -> Tensor:
        """Return :math:`k(x_i, y_i)` for ``i < n`` (``x`` and ``y`` both ``(n, d)``), shape ``(n,)``."""
        block = 256
        return torch.cat(
            [self.forward(x[s : s + block], y[s : s + block]).diagonal() for s in range(0, len(x), block)]
        )


class RadialKernel(Kernel):
    """A kernel :math:`k(x, y) = \\varphi(\\|x - y\\|^2)` of the squared distance only.

    Subclasses implement :meth:`profile` (differentiable), :meth:`profile_` (may overwrite its input,
    no autograd) and :meth:`profile_and_slope` (the value and :math:`\\varphi'` as
    ``slope * slope_scale``); the bandwidth must be resolved (a float) before these are called.
    """

    def __init__(self, bandwidth: float | str | None = "median") -> None:
        super().__init__()
        self.bandwidth = _check_bandwidth(bandwidth)

    def resolve_bandwidth(self, x: Tensor, y: Tensor | None = None) -> float:
        """The numeric bandwidth for these samples (a fixed float, or the median heuristic)."""
        if self.bandwidth == "median":
            return median_bandwidth(x, y)
        return float(self.bandwidth)

    def resolved(self, x: Tensor, y: Tensor | None = None) -> RadialKernel:
        if self.bandwidth != "median":
            return self
        fixed = copy.copy(self)
        fixed.bandwidth = self.resolve_bandwidth(x, y)
        return fixed

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        kernel = self.resolved(x, y)
        return kernel.profile(squared_distances(x, y, snap_to_zero=self.takes_square_root))

    def paired(self, x: Tensor, y: Tensor) -> Tensor:
        kernel = self.resolved(x, y)
        return kernel.profile(((x - y) ** 2).sum(1))

    @property
    def _h(self) -> float:
        if self.bandwidth == "median":
            raise ValueError("bandwidth is 'median': call .resolved(x, y) before evaluating the profile")
        return float(self.bandwidth)

    @abstractmethod
    def profile(self, d2: Tensor) -> Tensor:
        """:math:`\\varphi(d^2)`, differentiable."""

    def profile_(self, d2: Tensor) -> Tensor:
        """:math:`\\varphi(d^2)`, allowed to overwrite ``d2``; no autograd."""
        return self.profile(d2)

    @abstractmethod
    def profile_and_slope(self, d2: Tensor) -> tuple[Tensor, Tensor, float]:
        """``(phi, slope, scale)`` with :math:`\\varphi'(d^2) = ` ``slope * scale`` (0 where undefined)."""

    def keops_profile(self, d2):
        """:math:`\\varphi` applied to a KeOps ``LazyTensor`` of squared distances."""
        return self.profile(d2)

    def extra_repr(self) -> str:
        bw = self.bandwidth
        return f"bandwidth={bw!r}" if isinstance(bw, str) else f"bandwidth={bw:.6g}"


class GaussianKernel(RadialKernel):
    """Gaussian (RBF) kernel :math:`k(x, y) = \\exp(-\\|x - y\\|^2 / (2 h^2))`, with bandwidth :math:`h`.

    Characteristic and bounded by 1. ``bandwidth`` is a positive float or ``"median"``.

    Cost: :math:`O(d)` per pair, :math:`O(nmd)` for an ``n x m`` Gram matrix.
    """

    name = "gaussian"

    def _gamma(self) -> float:
        return -1.0 / (2.0 * self._h**2)

    def profile(self, d2: Tensor) -> Tensor:
        return torch.exp(d2 * self._gamma())

    def profile_(self, d2: Tensor) -> Tensor:
        return d2.mul_(self._gamma()).exp_()

    def profile_and_slope(self, d2: Tensor) -> tuple[Tensor, Tensor, float]:
        value = self.profile_(d2)
        return value, value, self._gamma()

    def keops_profile(self, d2):
        return (d2 * self._gamma()).exp()


class LaplacianKernel(RadialKernel):
    """Laplacian kernel :math:`k(x, y) = \\exp(-\\|x - y\\| / h)`, with bandwidth :math:`h`.

    Characteristic. Not differentiable at :math:`x = y`; the gradient of a coincident pair is
    defined as 0 (the subgradient of minimal norm).

    Cost: :math:`O(d)` per pair, :math:`O(nmd)` for an ``n x m`` Gram matrix.
    """

    name = "laplacian"
    takes_square_root = True

    def profile(self, d2: Tensor) -> Tensor:
        return torch.exp(safe_sqrt(d2) * (-1.0 / self._h))

    def profile_(self, d2: Tensor) -> Tensor:
        return d2.sqrt_().mul_(-1.0 / self._h).exp_()

    def profile_and_slope(self, d2: Tensor) -> tuple[Tensor, Tensor, float]:
        r = d2.sqrt_()
        value = torch.exp(r * (-1.0 / self._h))
        slope = value / r
        slope.masked_fill_(r == 0, 0.0)
        return value, slope, -1.0 / (2.0 * self._h)

    def keops_profile(self, d2):
        return ((d2 + 1e-30).sqrt() * (-1.0 / self._h)).exp()


class InverseMultiquadricKernel(RadialKernel):
    """Inverse multiquadric kernel :math:`k(x, y) = (1 + \\|x - y\\|^2 / h^2)^{-1/2}`.

    Characteristic, bounded by 1, with heavy (polynomial) tails: it still sees points far apart,
    where the Gaussian kernel vanishes.

    Cost: :math:`O(d)` per pair, :math:`O(nmd)` for an ``n x m`` Gram matrix.
    """

    name = "imq"

    def profile(self, d2: Tensor) -> Tensor:
        return torch.rsqrt(1.0 + d2 / self._h**2)

    def profile_(self, d2: Tensor) -> Tensor:
        return d2.mul_(1.0 / self._h**2).add_(1.0).rsqrt_()

    def profile_and_slope(self, d2: Tensor) -> tuple[Tensor, Tensor, float]:
        value = self.profile_(d2)
        return value, value**3, -1.0 / (2.0 * self._h**2)

    def keops_profile(self, d2):
        return (1.0 + d2 * (1.0 / self._h**2)).rsqrt()


class EnergyKernel(RadialKernel):
    """Distance kernel :math:`k(x, y) = -\\|x - y\\|^a` (energy distance), exponent :math:`0 < a < 2`.

    Not positive definite but *conditionally negative definite* (:math:`-k` is), which is all an MMD
    needs: with this kernel the biased (V-statistic) MMD² equals the squared energy distance
    :math:`2E\\|X - Y\\|^a - E\\|X - X'\\|^a - E\\|Y - Y'\\|^a` (dcor's ``energy_distance`` with
    ``exponent=a``; ``a = 1`` by default). Has no bandwidth; the gradient of a coincident pair is defined
    as 0.

    Cost: :math:`O(d)` per pair, :math:`O(nmd)` for an ``n x m`` Gram matrix.
    """

    name = "energy"
    takes_square_root = True

    def __init__(self, exponent: float = 1.0) -> None:
        super().__init__(bandwidth=1.0)
        value = check_positive(exponent, "exponent")
        if not 0.0 < value < 2.0:
            raise ValueError(
                f"exponent must lie in (0, 2) (the energy distance is a metric of distributions only there), "
                f"got {exponent!r}"
            )
        self.exponent = value
        self._half = value / 2.0

    def resolve_bandwidth(self, x: Tensor, y: Tensor | None = None) -> float:
        return 1.0

    def profile(self, d2: Tensor) -> Tensor:
        root = safe_sqrt(d2)
        return -root if self.exponent == 1.0 else -_safe_power(root, self.exponent)

    def profile_(self, d2: Tensor) -> Tensor:
        if self.exponent == 1.0:
            return d2.sqrt_().neg_()
        return d2.pow_(self._half).neg_()

    def profile_and_slope(self, d2: Tensor) -> tuple[Tensor, Tensor, float]:
        # phi(t) = -t^(e/2), phi'(t) = -(e/2) t^(e/2 - 1) = slope * scale with slope = t^(e/2 - 1), 0 at t = 0
        zero = d2 == 0
        if self.exponent == 1.0:
            r = d2.sqrt_()
            slope = r.reciprocal()
            value = -r
        else:
            value = d2.pow(self._half).neg_()
            slope = d2.pow_(self._half - 1.0)
        slope.masked_fill_(zero, 0.0)
        return value, slope, -self._half

    def keops_profile(self, d2):
        if self.exponent == 1.0:
            return -((d2 + 1e-30).sqrt())
        return -((d2 + 1e-30) ** self._half)

    def extra_repr(self) -> str:
        return "" if self.exponent == 1.0 else f"exponent={self.exponent:g}"


def _safe_power(root: Tensor, exponent: float) -> Tensor:
    """:math:`r^e` for :math:`r \\ge 0` with a zero (not inf/NaN) gradient at :math:`r = 0`."""
    positive = root > 0
    safe = torch.where(positive, root, torch.ones_like(root))
    return torch.where(positive, safe**exponent, torch.zeros_like(root))


class DotProductKernel(Kernel):
    """A kernel :math:`k(x, y) = \\psi(\\langle x, y \\rangle)` of the inner product only."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.resolved(x, y).dot_profile(x @ y.T)

    def paired(self, x: Tensor, y: Tensor) -> Tensor:
        return self.resolved(x, y).dot_profile((x * y).sum(1))

    @abstractmethod
    def dot_profile(self, t: Tensor) -> Tensor:
        """:math:`\\psi(t)`, differentiable."""

    @abstractmethod
    def dot_profile_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor, float]:
        """``(psi, slope, scale)`` with :math:`\\psi'(t) = ` ``slope * scale``; may overwrite ``t``."""


class LinearKernel(DotProductKernel):
    """Linear kernel :math:`k(x, y) = \\langle x, y \\rangle`.

    Its MMD is the distance between the means, :math:`\\|\\bar x - \\bar y\\|`; kernel sums cost
    ``O((n + m) d)`` because :math:`\\sum_{ij} a_i b_j \\langle x_i, y_j\\rangle =
    \\langle \\sum_i a_i x_i, \\sum_j b_j y_j \\rangle`.

    Cost: :math:`O(d)` per pair, :math:`O(nmd)` for an ``n x m`` Gram matrix.
    """

    name = "linear"

    def dot_profile(self, t: Tensor) -> Tensor:
        return t

    def dot_profile_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor, float]:
        return t, torch.ones_like(t), 1.0


class PolynomialKernel(DotProductKernel):
    """Polynomial kernel :math:`k(x, y) = (\\gamma \\langle x, y \\rangle + c_0)^p`.

    Args:
        degree: the integer power :math:`p \\ge 1`.
        gamma: the scale :math:`\\gamma > 0`; ``None`` means :math:`1/d` for ``d``-dimensional points.
        coef0: the offset :math:`c_0 \\ge 0`.

    Cost: :math:`O(d)` per pair, :math:`O(nmd)` for an ``n x m`` Gram matrix.
    """

    name = "polynomial"

    def __init__(self, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> None:
        super().__init__()
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree must be a positive integer, got {degree!r}")
        self.degree = degree
        self.gamma = None if gamma is None else check_positive(gamma, "gamma")
        self.coef0 = check_positive(coef0, "coef0", allow_zero=True)

    def resolved(self, x: Tensor, y: Tensor | None = None) -> PolynomialKernel:
        if self.gamma is not None:
            return self
        fixed = copy.copy(self)
        fixed.gamma = 1.0 / x.shape[1]
        return fixed

    def dot_profile(self, t: Tensor) -> Tensor:
        return (t * self.gamma + self.coef0) ** self.degree

    def dot_profile_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor, float]:
        base = t.mul_(self.gamma).add_(self.coef0)
        slope = base ** (self.degree - 1) if self.degree > 1 else torch.ones_like(base)
        return slope * base, slope, self.degree * self.gamma

    def extra_repr(self) -> str:
        return f"degree={self.degree}, gamma={self.gamma!r}, coef0={self.coef0:g}"


class MixtureKernel(Kernel):
    """Weighted sum of kernels :math:`k(x, y) = \\sum_q w_q k_q(x, y)`.

    A non-negative combination of positive-definite kernels is positive definite, and characteristic
    if one component is. The usual multi-bandwidth MMD uses :meth:`gaussians`.

    Args:
        kernels: the component kernels.
        weights: non-negative weights :math:`w_q` (default: all 1).

    Cost: the sum of the components' costs.
    """

    name = "mixture"

    def __init__(self, kernels: Sequence[Kernel], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        kernels = list(kernels)
        if not kernels or not all(isinstance(k, Kernel) for k in kernels):
            raise ValueError("kernels must be a non-empty sequence of Kernel modules")
        if weights is None:
            weights = [1.0] * len(kernels)
        weights = [check_positive(w, "weights", allow_zero=True) for w in weights]
        if len(weights) != len(kernels):
            raise ValueError(f"weights must have one entry per kernel ({len(kernels)}), got {len(weights)}")
        self.kernels = nn.ModuleList(kernels)
        self.weights = weights

    @classmethod
    def gaussians(cls, bandwidths: Sequence[float], weights: Sequence[float] | None = None) -> MixtureKernel:
        """Sum of Gaussian kernels, one per bandwidth (each a float or ``"median"``)."""
        return cls([GaussianKernel(h) for h in bandwidths], weights)

    @property
    def is_radial(self) -> bool:
        return all(isinstance(k, RadialKernel) for k in self.kernels)

    @property
    def takes_square_root(self) -> bool:  # type: ignore[override]
        return any(k.takes_square_root for k in self.kernels)

    def resolved(self, x: Tensor, y: Tensor | None = None) -> MixtureKernel:
        parts = [k.resolved(x, y) for k in self.kernels]
        if all(p is k for p, k in zip(parts, self.kernels)):
            return self
        return MixtureKernel(parts, self.weights)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        kernel = self.resolved(x, y)
        if kernel.is_radial:
            return kernel.profile(squared_distances(x, y, snap_to_zero=self.takes_square_root))
        return sum(w * k(x, y) for w, k in zip(kernel.weights, kernel.kernels))

    def paired(self, x: Tensor, y: Tensor) -> Tensor:
        kernel = self.resolved(x, y)
        return sum(w * k.paired(x, y) for w, k in zip(kernel.weights, kernel.kernels))

    # Radial interface, valid when every component is radial.
    def profile(self, d2: Tensor) -> Tensor:
        return sum(w * k.profile(d2) for w, k in zip(self.weights, self.kernels))

    def profile_(self, d2: Tensor) -> Tensor:
        out = None
        for w, k in zip(self.weights, self.kernels):
            part = k.profile_(d2.clone()).mul_(w)
            out = part if out is None else out.add_(part)
        return out

    def profile_and_slope(self, d2: Tensor) -> tuple[Tensor, Tensor, float]:
        value = slope = None
        for w, k in zip(self.weights, self.kernels):
            v, s, c = k.profile_and_slope(d2.clone())
            v, s = v * w, s * (w * c)
            value = v if value is None else value.add_(v)
            slope = s if slope is None else slope.add_(s)
        return value, slope, 1.0

    def keops_profile(self, d2):
        out = None
        for w, k in zip(self.weights, self.kernels):
            part = k.keops_profile(d2) * w
            out = part if out is None else out + part
        return out


def _check_bandwidth(bandwidth: float | str | None) -> float | str:
    if bandwidth is None or bandwidth == "median":
        return "median"
    if isinstance(bandwidth, str):
        raise ValueError(f"bandwidth must be a positive number or 'median', got {bandwidth!r}")
    value = check_positive(bandwidth, "bandwidth")
    return value


_FACTORIES = {
    "gaussian": GaussianKernel,
    "laplacian": LaplacianKernel,
    "imq": InverseMultiquadricKernel,
    "inverse_multiquadric": InverseMultiquadricKernel,
    "energy": EnergyKernel,
    "distance": EnergyKernel,
    "linear": LinearKernel,
    "polynomial": PolynomialKernel,
}
#: Names accepted by :func:`get_kernel` (aliases included).
KERNEL_NAMES = tuple(_FACTORIES)
_WITH_BANDWIDTH = {"gaussian", "laplacian", "imq", "inverse_multiquadric"}


def get_kernel(kernel: str | Kernel, bandwidth: float | str | None = None) -> Kernel:
    """Return a :class:`Kernel` from a name, or ``kernel`` itself if it is already a module.

    Args:
        kernel: one of ``"gaussian"``, ``"laplacian"``, ``"imq"`` (alias ``"inverse_multiquadric"``),
            ``"energy"`` (alias ``"distance"``), ``"linear"``, ``"polynomial"``; or a :class:`Kernel`.
        bandwidth: for the Gaussian, Laplacian and IMQ kernels: a positive float or ``"median"``
            (``None`` means ``"median"``). Kernels without a bandwidth accept only ``None``/``"median"``;
            a numeric bandwidth for them, or for a ready-made module (which carries its own), is an error.

    Cost: :math:`O(1)` (a ``"median"`` bandwidth is resolved later, by the distance, on the pooled sample).
    """
    if isinstance(kernel, Kernel):
        if bandwidth is not None and bandwidth != "median":
            raise ValueError(
                "bandwidth cannot be combined with a Kernel module: set it on the module instead, "
                f"e.g. GaussianKernel(bandwidth={bandwidth!r})"
            )
        return kernel
    if not isinstance(kernel, str):
        raise TypeError(f"kernel must be a kernel name or a Kernel module, got {type(kernel).__name__}")
    check_choice(kernel, KERNEL_NAMES, "kernel")
    if kernel in _WITH_BANDWIDTH:
        return _FACTORIES[kernel](bandwidth if bandwidth is not None else "median")
    if bandwidth is not None and bandwidth != "median":
        raise ValueError(f"the {kernel!r} kernel has no bandwidth, got bandwidth={bandwidth!r}")
    return _FACTORIES[kernel]()

