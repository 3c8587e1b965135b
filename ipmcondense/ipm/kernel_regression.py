"""Kernel ridge regression from a support set: the inner problem of KIP and RFAD.

KIP (Nguyen et al. 2021) and RFAD (Loo et al. 2022) learn a small support set :math:`(X_s, Y_s)` such
that kernel ridge regression (KRR) fitted on it predicts the labels of real target data:

.. math::

    \\hat Y_t = K_{ts} \\big(K_{ss} + \\lambda I\\big)^{-1} Y_s, \\qquad
    \\lambda = \\mathrm{reg} \\cdot \\mathrm{tr}(K_{ss}) / n_s \\ (\\text{relative}),

with :math:`K_{ts} = k(X_t, X_s)`, :math:`K_{ss} = k(X_s, X_s)`, then minimise a loss between
:math:`\\hat Y_t` and :math:`Y_t`. KIP: :math:`\\tfrac12\\,\\mathrm{mean}(\\hat Y_t - Y_t)^2` with
centred one-hot labels, ``reg = 1e-6`` and an infinite-width NTK; RFAD: the same with a random-feature
NNGP kernel and ``reg = 5e-3``, or a Platt-scaled cross-entropy.

**Relation to IPMs.** The predictor :math:`\\hat f = \\sum_i \\alpha_i k(\\cdot, x_i)` lies in the RKHS
of :math:`k` -- the same function class whose unit ball is the witness class of the MMD -- but the
objective is a *regression loss* of the fitted predictor on the target data, not a supremum of mean
differences over that class: it is not an IPM (it depends on the labels and is not symmetric in the
two sets). Use :func:`~ipmcondense.ipm.mmd.mmd2` with the same kernel for the IPM counterpart.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._validation import as_points, check_choice, check_finite_scalar, check_positive

__all__ = [
    "centred_one_hot",
    "kernel_ridge_predict",
    "krr_loss",
    "KRR_LOSSES",
]

#: Accepted values of ``loss`` in :func:`krr_loss`.
KRR_LOSSES = ("mse", "platt")


def centred_one_hot(labels: Any, num_classes: int, dtype: torch.dtype | None = None) -> Tensor:
    """One-hot labels minus :math:`1/C`: row :math:`i` is :math:`e_{y_i} - \\tfrac1C \\mathbf 1`.

    KIP's regression targets (each row sums to 0). ``labels`` is a 1-D integer tensor/array with values
    in ``[0, num_classes)``; the result is ``(n, num_classes)`` of ``dtype`` (default: the default
    floating dtype) on the labels' device. Cost: :math:`O(nC)`.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    t = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
    if t.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class indices, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"labels must hold integer class indices, got dtype {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (num_classes={num_classes}), "
            f"got values in [{int(t.min())}, {int(t.max())}]"
        )
    dtype = torch.get_default_dtype() if dtype is None else dtype
    return F.one_hot(t.long(), num_classes).to(dtype) - 1.0 / num_classes


def kernel_ridge_predict(
    k_target_support: Tensor,
    k_support_support: Tensor,
    y_support: Tensor,
    reg: float = 1e-6,
    relative: bool = True,
) -> Tensor:
    """KRR predictions :math:`K_{ts} (K_{ss} + \\lambda I)^{-1} Y_s`.

    Args:
        k_target_support: :math:`K_{ts}`, shape ``(m, n)``.
        k_support_support: :math:`K_{ss}`, shape ``(n, n)``, symmetric positive semi-definite.
        y_support: :math:`Y_s`, shape ``(n, c)`` (or ``(n,)``, returned as ``(m, 1)``).
        reg: the ridge, ``>= 0``. ``relative=True`` (KIP, RFAD) uses
            :math:`\\lambda = \\mathrm{reg} \\cdot \\mathrm{tr}(K_{ss}) / n`, invariant to the kernel's scale;
            ``relative=False`` uses :math:`\\lambda = \\mathrm{reg}`.
        relative: see ``reg``.

    Returns:
        ``(m, c)`` predictions in the promoted dtype of the inputs, differentiable in all three.

    The system is solved in float64 by Cholesky. If :math:`K_{ss} + \\lambda I` is not numerically
    positive definite (``reg = 0`` with duplicated support points, say), a :class:`UserWarning` is
    issued and the minimum-norm least-squares solution is used instead
    (``torch.linalg.lstsq`` with the ``gelsd`` driver on CPU, the pseudo-inverse on other devices).

    Cost: ``O(n^3 + m n c)`` time, ``O(n^2 + mn)`` memory.
    """
    k_ts = as_points(k_target_support, "k_target_support")
    k_ss = as_points(k_support_support, "k_support_support")
    y_s = as_points(y_support, "y_support")
    reg = check_positive(reg, "reg", allow_zero=True)
    if not isinstance(relative, bool):
        raise TypeError(f"relative must be a bool, got {type(relative).__name__}")
    n = k_ss.shape[0]
    if k_ss.shape != (n, n):
        raise ValueError(f"k_support_support must be square (n, n), got shape {tuple(k_ss.shape)}")
    if k_ts.shape[1] != n:
        raise ValueError(
            f"k_target_support must have one column per support point ({n}), got shape {tuple(k_ts.shape)}"
        )
    if y_s.shape[0] != n:
        raise ValueError(f"y_support must have one row per support point ({n}), got shape {tuple(y_s.shape)}")
    out_dtype = torch.promote_types(torch.promote_types(k_ts.dtype, k_ss.dtype), y_s.dtype)
    k_ts64, k_ss64, y64 = k_ts.double(), k_ss.double(), y_s.double()
    ridge = reg * torch.diagonal(k_ss64).sum() / n if relative else torch.tensor(reg, dtype=torch.float64)
    system = k_ss64 + ridge.to(k_ss64.device) * torch.eye(n, dtype=torch.float64, device=k_ss64.device)
    system = 0.5 * (system + system.T)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        coef = torch.cholesky_solve(y64, factor)
    else:
        warnings.warn(
            f"k_support_support + ridge is not positive definite (Cholesky failed at column {int(info)}, "
            f"ridge={float(ridge):.3g}): using the minimum-norm least-squares solution; increase reg",
            UserWarning,
            stacklevel=2,
        )
        if system.device.type == "cpu":
            coef = torch.linalg.lstsq(system, y64, driver="gelsd").solution
        else:
            coef = torch.linalg.pinv(system, hermitian=True) @ y64
    return (k_ts64 @ coef).to(out_dtype)


def krr_loss(
    kernel: nn.Module,
    x_support: Tensor,
    y_support: Tensor,
    x_target: Tensor,
    y_target: Tensor,
    reg: float = 1e-6,
    loss: str = "mse",
    log_temperature: Tensor | float | None = None,
    relative: bool = True,
) -> Tensor:
    """KIP/RFAD loss of kernel ridge regression fitted on the support set and tested on the targets.

    :math:`\\hat Y_t = k(X_t, X_s)\\,(k(X_s, X_s) + \\lambda I)^{-1} Y_s` (:func:`kernel_ridge_predict`), then

    * ``loss="mse"`` (KIP): :math:`\\tfrac12\\,\\mathrm{mean}_{i,c} (\\hat Y_{t,ic} - Y_{t,ic})^2`;
    * ``loss="platt"`` (RFAD ``--platt``): :math:`\\mathrm{CE}(e^{\\tau} \\hat Y_t,\\ \\arg\\max_c Y_{t})`,
      the mean cross-entropy of the temperature-scaled predictions, :math:`\\tau` = ``log_temperature``
      (learnable: pass a tensor with ``requires_grad``).

    Args:
        kernel: a callable ``kernel(x, y) -> (n, m)`` Gram matrix, e.g. a
            :class:`~ipmcondense.ipm.kernels.Kernel` such as
            :class:`~ipmcondense.ipm.neural_kernels.FullyConnectedNTK`.
        x_support: support inputs ``(n, ...)`` (differentiable: these are learned).
        y_support: support labels ``(n, c)`` (may be learned), e.g. :func:`centred_one_hot`.
        x_target: target inputs ``(m, ...)``.
        y_target: target labels ``(m, c)``, or integer class indices ``(m,)`` (converted with
            :func:`centred_one_hot` for ``"mse"``).
        reg: ridge (relative to :math:`\\mathrm{tr}(K_{ss})/n` when ``relative``); KIP 1e-6, RFAD 5e-3.
        loss: ``"mse"`` or ``"platt"``.
        log_temperature: :math:`\\tau`, required for ``"platt"``.
        relative: see :func:`kernel_ridge_predict`.

    Returns:
        A 0-d float64 tensor, differentiable with respect to the support set, the targets, the
        temperature and any kernel parameters.

    Cost: two kernel evaluations (``n^2`` and ``mn`` pairs) plus ``O(n^3 + mnc)``.
    """
    check_choice(loss, KRR_LOSSES, "loss")
    if not callable(kernel):
        raise TypeError(f"kernel must be callable (a Kernel module), got {type(kernel).__name__}")
    check_finite_scalar(reg, "reg")
    y_s = as_points(y_support, "y_support")
    if not isinstance(x_support, Tensor) or not isinstance(x_target, Tensor):
        raise TypeError("x_support and x_target must be torch.Tensors")
    for value, name in ((x_support, "x_support"), (x_target, "x_target")):
        if value.dim() == 0 or value.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one point, got shape {tuple(value.shape)}")
        if not bool(torch.isfinite(value.detach()).all()):
            raise ValueError(f"{name} contains NaN or inf values")
    if y_s.shape[0] != x_support.shape[0]:
        raise ValueError(
            f"y_support must have one row per support point ({x_support.shape[0]}), got {y_s.shape[0]}"
        )
    num_classes = y_s.shape[1]
    target = y_target if isinstance(y_target, Tensor) else torch.as_tensor(y_target)
    if target.shape[0] != x_target.shape[0]:
        raise ValueError(
            f"y_target must have one entry per target point ({x_target.shape[0]}), got {target.shape[0]}"
        )
    if target.dim() == 1 and not target.is_floating_point():
        target_classes = target.long()
        target_matrix = centred_one_hot(target, num_classes, dtype=torch.float64) if loss == "mse" else None
    else:
        target_matrix = as_points(target, "y_target")
        if target_matrix.shape[1] != num_classes:
            raise ValueError(
                f"y_target must have {num_classes} columns like y_support, got shape "
                f"{tuple(target_matrix.shape)}"
            )
        target_classes = target_matrix.argmax(1)
    k_ss = kernel(x_support, x_support)
    k_ts = kernel(x_target, x_support)
    pred = kernel_ridge_predict(k_ts, k_ss, y_s, reg=reg, relative=relative).double()
    if loss == "mse":
        return 0.5 * ((pred - target_matrix.to(pred.device).double()) ** 2).mean()
    if log_temperature is None:
        raise ValueError(
            "log_temperature is required for loss='platt' (a learnable 0-d tensor, e.g. "
            "torch.zeros((), dtype=torch.float64, requires_grad=True))"
        )
    if isinstance(log_temperature, Tensor):
        if log_temperature.numel() != 1:
            raise ValueError(f"log_temperature must be a scalar, got shape {tuple(log_temperature.shape)}")
        if not bool(torch.isfinite(log_temperature.detach()).all()):
            raise ValueError("log_temperature must be finite")
        tau = log_temperature.reshape(()).double()
    else:
        tau = torch.tensor(check_finite_scalar(log_temperature, "log_temperature"), dtype=torch.float64)
    return F.cross_entropy(torch.exp(tau.to(pred.device)) * pred, target_classes.to(pred.device))
