"""The KeOps backend of the kernel sums: symbolic Gram matrices reduced on the fly (GPU backend).

pykeops is imported lazily and probed once; a failure to import or to compile a formula disables it
with one warning, and the caller (:mod:`ipmcondense.ipm._kernel_sums`) falls back to the tiled backend.
"""

from __future__ import annotations

import warnings

from torch import Tensor

from ._validation import quiet_stdout
from .kernels import Kernel

_keops_state: dict[str, object] = {"probed": False, "lazy_tensor": None, "warned": False}


def _warn_keops(reason: str) -> None:
    if not _keops_state["warned"]:
        _keops_state["warned"] = True
        warnings.warn(
            f"pykeops is not usable ({reason}); the 'tiled' backend is used instead. "
            "Check the installation with pykeops.test_torch_bindings() or pass backend='tiled'.",
            UserWarning,
            stacklevel=3,
        )


def _keops_lazy_tensor():
    """The ``LazyTensor`` class, or ``None`` (with a warning, once) if pykeops cannot be imported."""
    if not _keops_state["probed"]:
        _keops_state["probed"] = True
        try:
            with quiet_stdout():
                from pykeops.torch import LazyTensor  # noqa: PLC0415  (optional, imported lazily)

            _keops_state["lazy_tensor"] = LazyTensor
        except Exception as err:  # any import-time failure of an optional compiler stack
            _warn_keops(f"import failed: {type(err).__name__}: {err}")
    return _keops_state["lazy_tensor"]


def _disable_keops(err: Exception) -> None:
    _keops_state["lazy_tensor"] = None
    _warn_keops(f"{type(err).__name__}: {err}")


def keops_available() -> bool:
    """Whether pykeops imports (probed once; compilation failures are detected on first use)."""
    return _keops_lazy_tensor() is not None



# --------------------------------------------------------------------------------------------------
# KeOps backend
# --------------------------------------------------------------------------------------------------


def _keops_gram(kernel: Kernel, x: Tensor, y: Tensor):
    """Symbolic Gram matrix, or ``None`` when the kernel has no KeOps formula (generic kernels)."""
    from ._kernel_sums import _family  # noqa: PLC0415  (shared helper; _kernel_sums imports this module)

    lazy_tensor = _keops_lazy_tensor()
    family = _family(kernel)
    if lazy_tensor is None or family == "generic":
        return None
    if family == "radial":
        center = ((x.sum(0) + y.sum(0)) / (x.shape[0] + y.shape[0])).detach()
        x, y = x - center, y - center
    x_i = lazy_tensor(x.contiguous()[:, None, :])
    y_j = lazy_tensor(y.contiguous()[None, :, :])
    if family == "radial":
        return kernel.keops_profile(x_i.sqdist(y_j))
    return kernel.dot_profile((x_i | y_j))


def _keops_rows(kernel: Kernel, x: Tensor, y: Tensor, b: Tensor | None) -> Tensor | None:
    try:
        gram = _keops_gram(kernel, x, y)
        if gram is None:
            return None
        if b is not None:
            gram = gram * _keops_lazy_tensor()(b.contiguous().view(1, -1, 1))
        return gram.sum(dim=1).view(-1)
    except Exception as err:  # compiler or runtime failure inside pykeops
        _disable_keops(err)
        return None


def _keops_sum(kernel: Kernel, x, y, a, b, exclude: bool) -> Tensor | None:
    from ._kernel_sums import _weighted_total  # noqa: PLC0415

    rows = _keops_rows(kernel, x, y, b)
    if rows is None:
        return None
    total = _weighted_total(rows, a)
    if exclude:
        diag = kernel.paired(x, y)
        if b is not None:
            diag = diag * b
        total = total - _weighted_total(diag, a)
    return total


def _keops_matvec(kernel: Kernel, z: Tensor, y: Tensor, b: Tensor | None) -> Tensor | None:
    return _keops_rows(kernel, z, y, b)
