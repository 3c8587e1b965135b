"""The kernel-sum engine: every backend against a NumPy brute force and against dense autograd."""

import sys
import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from ipmcondense.ipm import _keops
from ipmcondense.ipm import _kernel_sums as ks
from ipmcondense.ipm.kernels import (
    EnergyKernel,
    GaussianKernel,
    InverseMultiquadricKernel,
    Kernel,
    LaplacianKernel,
    LinearKernel,
    MixtureKernel,
    PolynomialKernel,
)

KERNELS = {
    "gaussian": GaussianKernel(1.3),
    "laplacian": LaplacianKernel(0.9),
    "imq": InverseMultiquadricKernel(1.1),
    "energy": EnergyKernel(),
    "linear": LinearKernel(),
    "polynomial": PolynomialKernel(degree=2, gamma=0.3, coef0=1.0),
    "gaussian_mixture": MixtureKernel.gaussians([0.5, 2.0], weights=[1.0, 0.5]),
    "mixed_mixture": MixtureKernel([GaussianKernel(1.0), PolynomialKernel(degree=2)]),
}


class ScaledCauchyKernel(Kernel):
    """A kernel the engine knows nothing about, with a learnable scale: k = s / (1 + |x - y|^2)."""

    name = "cauchy"

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x, y):
        return self.scale.to(x.dtype) / (1.0 + torch.cdist(x, y) ** 2)


def _numpy_gram(name, x, y):
    d = cdist(x, y)
    ip = x @ y.T
    return {
        "gaussian": np.exp(-(d**2) / (2 * 1.3**2)),
        "laplacian": np.exp(-d / 0.9),
        "imq": (1 + d**2 / 1.1**2) ** -0.5,
        "energy": -d,
        "linear": ip,
        "polynomial": (0.3 * ip + 1.0) ** 2,
        "gaussian_mixture": np.exp(-(d**2) / 0.5) + 0.5 * np.exp(-(d**2) / 8.0),
        "mixed_mixture": np.exp(-(d**2) / 2) + (ip / x.shape[1] + 1) ** 2,
    }[name]


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiny tiles, so that small inputs span many tiles whose sizes do not divide the input sizes."""
    monkeypatch.setattr(ks, "TILE_ROWS", 7)
    monkeypatch.setattr(ks, "TILE_COLS", 11)
    monkeypatch.setattr(ks, "SYMMETRIC_BLOCK", 6)


def _data(n, m, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) * 1.2 + 0.4
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    return x.to(dtype), y.to(dtype), (a / a.sum()).to(dtype), (b / b.sum()).to(dtype)


@pytest.mark.parametrize("backend", ["dense", "tiled"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_sum_matches_numpy_brute_force(small_tiles, backend, name):
    x, y, a, b = _data(23, 19, 3)
    gram = _numpy_gram(name, x.numpy(), y.numpy())
    kernel = KERNELS[name]
    plain = ks.kernel_sum(x, y, kernel, backend=backend)
    weighted = ks.kernel_sum(x, y, kernel, a, b, backend=backend)
    assert plain.dtype == torch.float64 and plain.dim() == 0
    np.testing.assert_allclose(plain.item(), gram.sum(), rtol=1e-10)
    np.testing.assert_allclose(weighted.item(), a.numpy() @ gram @ b.numpy(), rtol=1e-10)
    self_gram = _numpy_gram(name, x.numpy(), x.numpy())
    off_diagonal = self_gram.sum() - np.trace(self_gram)
    excluded = ks.kernel_sum(x, x, kernel, exclude_diagonal=True, backend=backend)
    np.testing.assert_allclose(excluded.item(), off_diagonal, rtol=1e-10, atol=1e-10)
    w = a.numpy()
    excluded_w = ks.kernel_sum(x, x, kernel, a, a, exclude_diagonal=True, backend=backend)
    np.testing.assert_allclose(excluded_w.item(), w @ self_gram @ w - w**2 @ np.diag(self_gram), rtol=1e-10, atol=1e-12)


def _values_and_grads(kernel, x, y, a, b, backend, *, symmetric=False, exclude=False):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, y, a, b)]
    xl, yl, al, bl = leaves
    if symmetric:
        value = ks.kernel_sum(xl, xl, kernel, al, al, exclude_diagonal=exclude, backend=backend)
        grads = torch.autograd.grad(value, [xl, al])
    else:
        value = ks.kernel_sum(xl, yl, kernel, al, bl, exclude_diagonal=exclude, backend=backend)
        grads = torch.autograd.grad(value, leaves)
    return value, grads


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("name", list(KERNELS))
def test_tiled_values_and_gradients_match_dense_float64(small_tiles, name, symmetric):
    x, y, a, b = _data(23, 23, 4)
    kernel = KERNELS[name]
    for exclude in (False, True):
        v_dense, g_dense = _values_and_grads(kernel, x, y, a, b, "dense", symmetric=symmetric, exclude=exclude)
        v_tiled, g_tiled = _values_and_grads(kernel, x, y, a, b, "tiled", symmetric=symmetric, exclude=exclude)
        torch.testing.assert_close(v_tiled, v_dense, rtol=1e-10, atol=1e-12)
        for gt, gd in zip(g_tiled, g_dense):
            torch.testing.assert_close(gt, gd, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["gaussian", "laplacian", "energy", "polynomial"])
def test_tiled_matches_dense_float32(small_tiles, name):
    x, y, a, b = _data(40, 33, 5, dtype=torch.float32)
    kernel = KERNELS[name]
    for symmetric in (False, True):
        v_dense, g_dense = _values_and_grads(kernel, x, y, a, b, "dense", symmetric=symmetric)
        v_tiled, g_tiled = _values_and_grads(kernel, x, y, a, b, "tiled", symmetric=symmetric)
        assert g_tiled[0].dtype == torch.float32
        torch.testing.assert_close(v_tiled, v_dense, rtol=1e-5, atol=0)
        for gt, gd in zip(g_tiled, g_dense):
            scale = float(gd.abs().max())
            torch.testing.assert_close(gt, gd, rtol=1e-5, atol=1e-5 * scale)


def test_tiled_matches_dense_with_default_tile_sizes():
    # 600 x 8500 spans two column tiles of 8192 and two row tiles of 512 (neither divides).
    x, y, _, _ = _data(600, 8500, 3, dtype=torch.float32)
    kernel = GaussianKernel(1.0)
    xs = x[:, :].clone().requires_grad_(True)
    dense = ks.kernel_sum(xs, y, kernel, backend="dense")
    (g_dense,) = torch.autograd.grad(dense, xs)
    tiled = ks.kernel_sum(xs, y, kernel, backend="tiled")
    (g_tiled,) = torch.autograd.grad(tiled, xs)
    torch.testing.assert_close(tiled, dense, rtol=1e-5, atol=0)
    torch.testing.assert_close(g_tiled, g_dense, rtol=1e-5, atol=1e-5 * float(g_dense.abs().max()))
    symmetric = ks.kernel_sum(x[:2100], x[:2100], kernel, backend="tiled")  # two 2048-blocks
    torch.testing.assert_close(symmetric, ks.kernel_sum(x[:2100], x[:2100], kernel, backend="dense"), rtol=1e-5, atol=0)


# a symmetric sum has one point set (x, weights a): only the subsets of those
@pytest.mark.parametrize(("wanted", "symmetric"), [(w, False) for w in ("x", "y", "a", "b", "xa", "yb")]
                         + [(w, True) for w in ("x", "a", "xa")])
@pytest.mark.parametrize("name", ["gaussian", "laplacian", "polynomial"])
def test_tiled_gradients_of_any_subset_of_inputs_match_dense(monkeypatch, small_tiles, name, wanted, symmetric):
    """The gradient is built in the forward sweep for whichever inputs require it (each combination takes
    its own path: the Gaussian fast path needs the row points' gradient), scaled by grad_output later,
    and survives a second backward pass; the column accumulators are flushed more than once."""
    monkeypatch.setattr(ks, "FLUSH_BLOCKS", 2)
    x, y, a, b = _data(31, 26, 3)
    kernel = KERNELS[name]
    results = {}
    for backend in ("dense", "tiled"):
        leaves = {key: t.clone().requires_grad_(key in wanted) for key, t in zip("xyab", (x, y, a, b))}
        xl, yl, al, bl = leaves.values()
        value = (ks.kernel_sum(xl, xl, kernel, al, al, exclude_diagonal=True, backend=backend) if symmetric
                 else ks.kernel_sum(xl, yl, kernel, al, bl, backend=backend))
        inputs = [leaves[key] for key in wanted]
        first = torch.autograd.grad(2.5 * value, inputs, retain_graph=True)
        second = torch.autograd.grad(-value, inputs)
        results[backend] = (value, first, second)
    torch.testing.assert_close(results["tiled"][0], results["dense"][0], rtol=1e-10, atol=1e-12)
    for got, want in zip(results["tiled"][1] + results["tiled"][2], results["dense"][1] + results["dense"][2]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _far_point_problem(far):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    x[0] = far  # pulls the common centre: the near points' centred norms dwarf their distances
    return x, rng.normal(size=(30, 3)) + 0.3, rng.random(40) + 0.5, rng.random(30) + 0.5


@pytest.mark.parametrize("name", ["gaussian", "laplacian", "energy"])
def test_float32_gradients_survive_a_far_point(small_tiles, name):
    """Entries recomputed directly for cancellation get their gradient terms from the original coordinates.
    Through centred coordinates (x_i |mass_i| - sum_j k'_ij y_j) the near points' gradients lost up to
    1e-4 of their size at far = 1e4 in float32; direct terms keep float32 accuracy (~1e-7)."""
    x, y, a, b = _far_point_problem(1e4)
    kernel = KERNELS[name]
    weights_64 = (torch.tensor(a), torch.tensor(b))
    reference = _values_and_grads(kernel, torch.tensor(x), torch.tensor(y), *weights_64, "dense")
    reference_sym = _values_and_grads(kernel, torch.tensor(x), None, weights_64[0], None, "dense", symmetric=True)
    as32 = [torch.tensor(t, dtype=torch.float32) for t in (x, y, a, b)]
    tiled = _values_and_grads(kernel, *as32, "tiled")
    tiled_sym = _values_and_grads(kernel, as32[0], None, as32[2], None, "tiled", symmetric=True)
    for (v, grads), (v_ref, grads_ref) in ((tiled, reference), (tiled_sym, reference_sym)):
        v, v_ref = v.detach(), v_ref.detach()
        assert abs(v.item() - v_ref.item()) <= 1e-6 * abs(v_ref.item())
        for g, g_ref in zip(grads, grads_ref):
            near = slice(1, None) if g.shape[0] == 40 else slice(None)  # the far point's own terms are ~0
            error = (g.double() - g_ref)[near].abs().max() / g_ref[near].abs().max()
            assert float(error) < 1e-6


@pytest.mark.parametrize("name", ["gaussian", "laplacian", "imq", "energy", "polynomial", "mixed_mixture"])
def test_gradcheck_through_tiled_backend(small_tiles, name):
    x, y, a, b = _data(9, 8, 2)
    kernel = KERNELS[name]
    leaves = [t.clone().requires_grad_(True) for t in (x, y, a, b)]
    assert torch.autograd.gradcheck(
        lambda x_, y_, a_, b_: ks.kernel_sum(x_, y_, kernel, a_, b_, backend="tiled"), leaves
    )
    assert torch.autograd.gradcheck(
        lambda x_, a_: ks.kernel_sum(x_, x_, kernel, a_, a_, exclude_diagonal=True, backend="tiled"),
        [leaves[0], leaves[2]],
    )


@pytest.mark.parametrize("kernel", [LaplacianKernel(0.7), EnergyKernel()])
@pytest.mark.parametrize("backend", ["dense", "tiled"])
def test_duplicated_points_give_finite_equal_gradients(small_tiles, kernel, backend):
    base, other, _, _ = _data(10, 10, 3)
    x = torch.cat([base, base[:4], base[:4]]).requires_grad_(True)
    y = torch.cat([other, base[:3]])
    value = ks.kernel_sum(x, y, kernel, backend=backend) + ks.kernel_sum(x, x, kernel, backend=backend)
    (grad,) = torch.autograd.grad(value, x)
    assert bool(torch.isfinite(grad).all())
    # Reference: direct differences, coincident pairs dropped (their subgradient is 0).
    xr = x.detach().clone().requires_grad_(True)

    def masked_sum(p, q):
        dist = torch.cdist(p, q, compute_mode="donot_use_mm_for_euclid_dist")
        mask = dist.detach() > 0
        safe = torch.where(mask, dist, torch.ones_like(dist))
        values = torch.exp(-safe / 0.7) if isinstance(kernel, LaplacianKernel) else -safe
        constant = 1.0 if isinstance(kernel, LaplacianKernel) else 0.0
        return torch.where(mask, values, torch.full_like(values, constant)).sum()

    (expected,) = torch.autograd.grad(masked_sum(xr, y) + masked_sum(xr, xr), xr)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-9)


def test_generic_kernel_is_checkpointed_with_parameter_gradients(small_tiles):
    x, y, a, b = _data(20, 17, 3)
    results = {}
    for backend in ("dense", "tiled", "auto"):
        kernel = ScaledCauchyKernel()
        xl = x.clone().requires_grad_(True)
        value = ks.kernel_sum(xl, y, kernel, a, b, backend=backend)
        results[backend] = (value, *torch.autograd.grad(value, [xl, kernel.scale]))
    expected = a.numpy() @ (1.5 / (1 + cdist(x.numpy(), y.numpy()) ** 2)) @ b.numpy()
    np.testing.assert_allclose(results["dense"][0].item(), expected, rtol=1e-10)
    for backend in ("tiled", "auto"):
        for got, want in zip(results[backend], results["dense"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["gaussian", "energy", "linear", "mixed_mixture"])
def test_kernel_matvec_backends_agree_with_numpy(small_tiles, name):
    z, y, _, b = _data(15, 26, 3)
    kernel = KERNELS[name]
    expected = _numpy_gram(name, z.numpy(), y.numpy()) @ b.numpy()
    for backend in ("dense", "tiled"):
        zl = z.clone().requires_grad_(True)
        out = ks.kernel_matvec(zl, y, kernel, b, backend=backend)
        assert out.shape == (15,)
        np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-10)
        (grad,) = torch.autograd.grad(out.sum(), zl)
        assert bool(torch.isfinite(grad).all())
    zl = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: ks.kernel_matvec(q, y, kernel, b, backend="tiled"), [zl])


def test_tiled_forward_without_grad_keeps_no_graph(small_tiles):
    x, y, _, _ = _data(10, 12, 2)
    value = ks.kernel_sum(x, y, GaussianKernel(1.0), backend="tiled")
    assert value.grad_fn is None


def test_auto_backend_choice():
    cpu = torch.device("cpu")
    assert ks.resolve_backend("auto", 100, 100, cpu) == "dense"
    assert ks.resolve_backend("auto", 256, 256, cpu) == "dense"
    assert ks.resolve_backend("auto", 257, 256, cpu) == "tiled"
    assert ks.resolve_backend("auto", 5000, 5000, cpu) == "tiled"
    # on CUDA the dense Gram matrix pays off up to 4e6 entries
    assert ks.resolve_backend("auto", 1000, 1000, torch.device("cuda")) == "dense"
    assert ks.resolve_backend("keops", 10, 10, cpu) == "keops"


def test_unknown_backend_and_shape_errors():
    x, y, _, _ = _data(5, 4, 2)
    with pytest.raises(ValueError, match="backend 'gpu'"):
        ks.kernel_sum(x, y, GaussianKernel(1.0), backend="gpu")
    with pytest.raises(ValueError, match="backend"):
        ks.kernel_matvec(x, y, GaussianKernel(1.0), backend="fast")
    with pytest.raises(ValueError, match="exclude_diagonal"):
        ks.kernel_sum(x, y, GaussianKernel(1.0), exclude_diagonal=True)
    with pytest.raises(TypeError, match="kernel"):
        ks.kernel_sum(x, y, "gaussian")


def test_unimportable_keops_warns_once_and_falls_back_to_tiled(monkeypatch, small_tiles):
    monkeypatch.setattr(_keops, "_keops_state", {"probed": False, "lazy_tensor": None, "warned": False})
    monkeypatch.setitem(sys.modules, "pykeops.torch", None)  # makes the import raise ImportError
    x, y, _, _ = _data(12, 9, 2)
    kernel = GaussianKernel(1.0)
    with pytest.warns(UserWarning, match="pykeops is not usable.*import failed"):
        value = ks.kernel_sum(x, y, kernel, backend="keops")
    torch.testing.assert_close(value, ks.kernel_sum(x, y, kernel, backend="tiled"))
    assert not ks.keops_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already warned: the fallback is now silent
        ks.kernel_sum(x, y, kernel, backend="keops")


def test_failing_keops_call_warns_and_falls_back(monkeypatch, small_tiles):
    class BrokenLazyTensor:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(_keops, "_keops_state", {"probed": True, "lazy_tensor": BrokenLazyTensor, "warned": False})
    x, y, _, _ = _data(12, 9, 2)
    with pytest.warns(UserWarning, match="pykeops is not usable.*simulated compiler failure"):
        value = ks.kernel_sum(x, y, GaussianKernel(1.0), backend="keops")
    torch.testing.assert_close(value, ks.kernel_sum(x, y, GaussianKernel(1.0), backend="dense"))
    assert _keops._keops_state["lazy_tensor"] is None


@pytest.mark.slow
@pytest.mark.keops
def test_keops_backend_matches_dense_values_and_gradients():
    if not ks.keops_available():
        pytest.skip("pykeops is not importable")
    x, y, a, b = _data(40, 30, 3)
    kernel = GaussianKernel(1.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback would warn: fail instead
        v_keops, g_keops = _values_and_grads(kernel, x, y, a, b, "keops")
    v_dense, g_dense = _values_and_grads(kernel, x, y, a, b, "dense")
    torch.testing.assert_close(v_keops, v_dense, rtol=1e-10, atol=1e-12)
    for gk, gd in zip(g_keops, g_dense):
        torch.testing.assert_close(gk, gd, rtol=1e-10, atol=1e-12)
