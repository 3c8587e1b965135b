"""Input checks shared by every public function of :mod:`ipmcondense.ipm`.

Every public distance converts and checks its inputs here, so that the error a user sees names the
argument, says what was expected and what was given, and no function returns NaN silently.
Private module: the names are not part of the public API.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "as_points",
    "as_point_pair",
    "as_weights",
    "check_choice",
    "check_positive",
    "check_finite_scalar",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def as_points(x: Any, name: str, *, flatten: bool = True) -> Tensor:
    """Return ``x`` as a floating ``(n, d)`` tensor, or raise a clear error naming ``name``.

    Accepts a ``torch.Tensor``, a NumPy array or a nested sequence. One-dimensional input is read as
    ``n`` points on the line, ``(n, 1)``; input with more than two dimensions (e.g. images
    ``(n, C, H, W)``) is flattened to ``(n, C*H*W)``, unless ``flatten=False`` (for feature maps that
    must see images whole: then only the checks and conversions apply). Lists and tuples of Python
    numbers become float64 tensors (Python floats are doubles: nothing is lost, as in scipy and POT).
    Integer and boolean arrays/tensors are cast to the default floating dtype; float16/bfloat16 input is upcast to float32 (kernel sums in half precision lose
    too much to cancellation). Tensors keep their device and autograd graph.
    """
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got a NumPy array of dtype object")
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, (list, tuple)):
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a tensor, a NumPy array or a numeric sequence") from err
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor, a NumPy array or a numeric sequence, "
            f"got {type(x).__name__}"
        )
    if t.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    elif t.dtype in _LOW_PRECISION:
        t = t.float()
    if t.dim() == 0:
        raise ValueError(f"{name} must hold points of shape (n,) or (n, d), got a scalar")
    if t.dim() == 1:
        t = t.unsqueeze(1)
    elif t.dim() > 2 and flatten:
        t = t.reshape(t.shape[0], -1)
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: it needs at least one point, got shape {tuple(t.shape)}")
    if t[0].numel() == 0:
        raise ValueError(f"{name} has points of dimension 0, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return t


def as_point_pair(
    x: Any, y: Any, names: tuple[str, str] = ("x", "y"), *, flatten: bool = True
) -> tuple[Tensor, Tensor]:
    """Check and convert two point clouds that are to be compared.

    Both become ``(n, d)`` / ``(m, d)`` tensors (``(n, ...)`` with the per-point shape kept when
    ``flatten=False``) of a common floating dtype (the promoted one); their per-point shapes must
    agree and they must share a device. Moving across devices is an error, not a copy.
    """
    a, b = as_points(x, names[0], flatten=flatten), as_points(y, names[1], flatten=flatten)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same point dimension (same shape per point), got "
            f"{names[0]}: {tuple(a.shape)} and {names[1]}: {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(
            f"{names[0]} is on {a.device} but {names[1]} is on {b.device}: move both to one device"
        )
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def as_weights(
    w: Any, n: int, name: str, like: Tensor, *, atol: float = 1e-5, probability: bool = True
) -> Tensor | None:
    """Return probability weights of length ``n`` (or ``None`` for uniform), or raise naming ``name``.

    Weights must be finite, non-negative and sum to one (within ``atol``); they are not silently
    renormalised, because a mistaken normalisation changes the distance being computed (the error says
    how to normalise). With ``probability=False`` (positive measures, e.g. unbalanced OT) any positive
    total mass is accepted.
    """
    if w is None:
        return None
    t = as_points(w, name) if not isinstance(w, Tensor) or w.dim() != 1 else w
    if t.dim() == 2:
        if t.shape[1] != 1:
            raise ValueError(f"{name} must be a vector of length {n}, got shape {tuple(t.shape)}")
        t = t[:, 0]
    if not t.is_floating_point():
        t = t.to(like.dtype)
    if t.shape[0] != n:
        raise ValueError(f"{name} must have one weight per point ({n}), got {t.shape[0]}")
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    if bool((t.detach() < 0).any()):
        raise ValueError(f"{name} must be non-negative, got a minimum of {float(t.min()):.3g}")
    total = float(t.detach().sum())
    if not probability:
        if total <= 0:
            raise ValueError(f"{name} must have a positive total mass, got a sum of {total:.6g}")
    elif abs(total - 1.0) > atol:
        raise ValueError(
            f"{name} must sum to 1 (probability weights), got a sum of {total:.6g}; normalise them "
            f"first, e.g. {name} / {name}.sum(), if their relative sizes are what you mean"
        )
    return t.to(device=like.device, dtype=like.dtype)


def check_choice(value: Any, choices: Iterable[str], name: str) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise raise a ``ValueError`` listing them."""
    options = list(choices)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of: {', '.join(map(repr, options))}")
    return value


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float if it is finite and positive (or zero when allowed)."""
    v = check_finite_scalar(value, name)
    if v < 0 or (v == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return v


def check_finite_scalar(value: Any, name: str) -> float:
    """Return ``value`` as a Python float if it is a finite real number."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    """Return ``value`` as an int if it is an integer (not a bool) ``>= 1`` (``>= 0`` when allowed)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if allow_zero else 1):
        bound = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {bound} integer, got {value!r}")
    return int(value)


def check_positive_number(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float if it is a real number (not a bool or NaN) ``> 0`` (``>= 0`` when allowed)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
            or value != value or value < 0 or (value == 0 and not allow_zero)):
        bound = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {bound} number, got {value!r}")
    return float(value)


def quiet_stdout():
    """A context manager sending stdout to stderr: pykeops prints its notices (e.g. "CUDA libraries not
    found") on stdout when it is first imported, which would corrupt machine-readable output such as the
    JSON of ``ipmcondense distance``. Wrap every import that may load pykeops (geomloss too) in it."""
    import contextlib
    import sys

    return contextlib.redirect_stdout(sys.stderr)


def preload_keops_quietly() -> None:
    """Import pykeops once with its stdout notices sent to stderr (geomloss imports it lazily at call time)."""
    import sys

    if "pykeops.torch" in sys.modules:
        return
    try:
        with quiet_stdout():
            import pykeops.torch  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 - an unusable pykeops is handled where it is used
        pass
