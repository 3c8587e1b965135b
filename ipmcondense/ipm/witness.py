"""Witness functions: the functions at which an IPM's supremum is (approximately) attained.

For an IPM :math:`d_F(\\mu, \\nu) = \\sup_{f \\in F} |E_\\mu f - E_\\nu f|` the witness is the maximiser
:math:`f^*`. Closed-form IPMs return it exactly (MMD: the mean kernel difference; mean embedding:
the normalised mean difference; Sinkhorn: the dual potentials); trained critics return the network.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ._validation import as_points

__all__ = ["Witness"]


class Witness:
    """A callable witness function :math:`f: \\mathbb{R}^d \\to \\mathbb{R}` of an IPM.

    Args:
        fn: maps a ``(k, d)`` tensor of query points to a ``(k,)`` tensor of witness values.
        metric: the IPM this witness belongs to (e.g. ``"mmd"``).
        dim: the point dimension ``d`` the witness accepts.

    Calling the witness checks and flattens its input like every public distance does, so it accepts
    tensors, NumPy arrays and images. :meth:`mean_gap` gives :math:`E_x f - E_y f`, which for the
    exact witness of a closed-form IPM equals the IPM value (or its square, as documented by the
    function that returned the witness).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], *, metric: str, dim: int) -> None:
        self._fn = fn
        self.metric = metric
        self.dim = dim

    def __call__(self, z) -> Tensor:
        points = as_points(z, "z")
        if points.shape[1] != self.dim:
            raise ValueError(
                f"z must have points of dimension {self.dim} (as the samples the witness was built "
                f"from), got shape {tuple(points.shape)}"
            )
        return self._fn(points)

    def mean_gap(self, x, y) -> Tensor:
        """Return :math:`\\frac1n\\sum_i f(x_i) - \\frac1m\\sum_j f(y_j)` (uniform weights)."""
        return self(x).mean() - self(y).mean()

    def __repr__(self) -> str:
        return f"Witness(metric={self.metric!r}, dim={self.dim})"
