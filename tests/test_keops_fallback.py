"""A KeOps failure (no compiler, a compile error when a formula is first reduced) degrades to the tiled
backend with one warning, through the public distances: simulated, so it runs without pykeops."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from ipmcondense.ipm import _keops
from ipmcondense.ipm import _kernel_sums as ks
from ipmcondense.ipm import energy_distance, mmd2
from ipmcondense.ipm.kernels import GaussianKernel


class _CompileFailingLazyTensor:
    """Builds symbolic formulas like pykeops' ``LazyTensor``; the first reduction fails to compile."""

    def __init__(self, *args, **kwargs):
        pass

    def _same(self, *args, **kwargs):
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _same
    __truediv__ = __rtruediv__ = __pow__ = __neg__ = __or__ = __ror__ = __matmul__ = _same

    def __getitem__(self, item):
        return self

    def __getattr__(self, name):
        if name in ("sum", "sum_reduction"):
            def reduce(*args, **kwargs):
                raise RuntimeError("[KeOps] Error : compilation of the formula failed (no C++ compiler found)")
            return reduce
        return self._same


@pytest.fixture
def fresh_keops_state(monkeypatch):
    monkeypatch.setattr(_keops, "_keops_state", {"probed": True, "lazy_tensor": _CompileFailingLazyTensor,
                                             "warned": False})
    monkeypatch.setattr(ks, "TILE_ROWS", 5)  # several tiles even for small inputs
    monkeypatch.setattr(ks, "TILE_COLS", 7)


def _points(requires_grad: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 3, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    y = torch.randn(11, 3, generator=g, dtype=torch.float64) + 0.3
    return x, y


def test_compile_failure_warns_once_and_every_distance_uses_tiled(fresh_keops_state):
    x, y = _points(requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = mmd2(x, y, bandwidth=1.5, backend="keops")
        (grad,) = torch.autograd.grad(value, x)
        energy = energy_distance(x.detach(), y, backend="keops")
        matvec = ks.kernel_matvec(x.detach(), y, GaussianKernel(1.5), backend="keops")
        biased = mmd2(x.detach(), y, bandwidth=1.5, estimator="biased", backend="keops")
    keops_warnings = [w for w in caught if "pykeops is not usable" in str(w.message)]
    assert len(keops_warnings) == 1, [str(w.message) for w in caught]
    assert "compilation of the formula failed" in str(keops_warnings[0].message)
    assert "backend='tiled'" in str(keops_warnings[0].message)
    assert _keops._keops_state["lazy_tensor"] is None and not ks.keops_available()
    # same numbers and gradients as the tiled backend
    x2 = x.detach().clone().requires_grad_(True)
    reference = mmd2(x2, y, bandwidth=1.5, backend="tiled")
    (reference_grad,) = torch.autograd.grad(reference, x2)
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(grad, reference_grad)
    torch.testing.assert_close(energy, energy_distance(x.detach(), y, backend="tiled"))
    torch.testing.assert_close(matvec, ks.kernel_matvec(x.detach(), y, GaussianKernel(1.5), backend="tiled"))
    torch.testing.assert_close(biased, mmd2(x.detach(), y, bandwidth=1.5, estimator="biased", backend="tiled"))


def test_import_failing_with_a_non_import_error_warns_once(monkeypatch):
    """pykeops checks for a compiler when it is imported; that can raise anything, not only ImportError."""
    broken = types.ModuleType("pykeops.torch")

    def missing(name):
        raise OSError("cannot find a C++ compiler (g++/clang++) to build the KeOps bindings")

    broken.__getattr__ = missing  # ``from pykeops.torch import LazyTensor`` raises OSError
    monkeypatch.setitem(sys.modules, "pykeops.torch", broken)
    monkeypatch.setattr(_keops, "_keops_state", {"probed": False, "lazy_tensor": None, "warned": False})
    x, y = _points()
    with pytest.warns(UserWarning, match="pykeops is not usable.*C\\+\\+ compiler"):
        value = mmd2(x, y, bandwidth=1.0, backend="keops")
    torch.testing.assert_close(value, mmd2(x, y, bandwidth=1.0, backend="tiled"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning: later calls fall back silently
        mmd2(x, y, bandwidth=1.0, backend="keops")
