"""Any IPM of the library as a training loss: ``IPMLoss(metric, **options)(x, y)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ._validation import check_choice
from .mean_embedding import mean_embedding_distance
from .mmd import energy_distance, mmd, mmd2
from .sinkhorn import sinkhorn_divergence
from .wasserstein import sliced_wasserstein, wasserstein

__all__ = ["IPMLoss", "LOSS_METRICS", "metric_function"]

#: Metric names accepted by :class:`IPMLoss` and :func:`metric_function`, with their functions.
_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "mmd": mmd,
    "mmd2": mmd2,
    "energy": energy_distance,
    "sinkhorn": sinkhorn_divergence,
    "wasserstein": wasserstein,
    "sliced": sliced_wasserstein,
    "mean_embedding": mean_embedding_distance,
}
LOSS_METRICS = tuple(_FUNCTIONS)


def metric_function(metric: str) -> Callable[..., Tensor]:
    """Return the function computing ``metric``; unknown names raise a ``ValueError`` listing the names.

    ``"mmd"``: :func:`~ipmcondense.ipm.mmd.mmd` (root of the biased MMD², a metric); ``"mmd2"``:
    :func:`~ipmcondense.ipm.mmd.mmd2` (unbiased by default); ``"energy"``:
    :func:`~ipmcondense.ipm.mmd.energy_distance`; ``"sinkhorn"``:
    :func:`~ipmcondense.ipm.sinkhorn.sinkhorn_divergence`; ``"wasserstein"``:
    :func:`~ipmcondense.ipm.wasserstein.wasserstein`; ``"sliced"``:
    :func:`~ipmcondense.ipm.wasserstein.sliced_wasserstein`; ``"mean_embedding"``:
    :func:`~ipmcondense.ipm.mean_embedding.mean_embedding_distance`.
    """
    return _FUNCTIONS[check_choice(metric, LOSS_METRICS, "metric")]


def check_metric_options(metric: str, options: dict[str, Any], reserved: tuple[str, ...] = ()) -> None:
    """Raise ``TypeError`` naming any option that the metric's function does not accept."""
    parameters = inspect.signature(metric_function(metric)).parameters
    accepted = [name for name in parameters if name not in ("x", "y", *reserved)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for metric {metric!r}; "
            f"accepted: {', '.join(map(repr, accepted))}"
        )


class IPMLoss(nn.Module):
    """An IPM between two point clouds as an ``nn.Module`` loss: ``loss(x, y) -> 0-d tensor``.

    ``IPMLoss("mmd", kernel="gaussian", bandwidth=1.0)(x, y)`` is exactly
    ``mmd(x, y, kernel="gaussian", bandwidth=1.0)``; the options are those of the metric's function
    (see :func:`metric_function`) and are checked when the loss is built. Options that are modules
    (a :class:`~ipmcondense.ipm.kernels.Kernel`, a ``feature_map`` network, or a list of them) are
    registered as submodules, so ``.to(device)`` and ``.parameters()`` see them. The value is
    differentiable with respect to both point clouds (and to module options' parameters); estimator,
    bias and cost are those of the underlying function.

    Args:
        metric: ``"mmd"``, ``"mmd2"``, ``"energy"``, ``"sinkhorn"``, ``"wasserstein"``, ``"sliced"`` or
            ``"mean_embedding"``.
        **options: keyword arguments of the metric's function.
    """

    def __init__(self, metric: str = "mmd", **options: Any) -> None:
        super().__init__()
        self.metric = metric
        self._function = metric_function(metric)
        check_metric_options(metric, options)
        self._options: dict[str, Any] = {}
        for name, value in options.items():
            if isinstance(value, nn.Module):
                self.add_module(name, value)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, nn.Module) for v in value):
                self.add_module(name, nn.ModuleList(value))
            else:
                self._options[name] = value

    def forward(self, x: Any, y: Any) -> Tensor:
        options = dict(self._options)
        for name, module in self.named_children():
            options[name] = list(module) if isinstance(module, nn.ModuleList) else module
        return self._function(x, y, **options)

    def extra_repr(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"metric={self.metric!r}" + (f", {shown}" if shown else "")
