"""Infinite-width ConvNet NNGP/NTK (KIP's ConvNet): brute-force NumPy recursion, wide random ConvNets
(Monte Carlo NNGP, empirical NTK; the gap shrinks with width), symmetry/PSD, gradcheck, blocks, errors."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ipmcondense.ipm.mmd import mmd2
from ipmcondense.ipm.neural_kernels import ConvNetNNGP, ConvNetNTK, FullyConnectedNTK, empirical_ntk

W_STD, B_STD = math.sqrt(2.0), 0.1


def _images(n: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# Independent brute-force NumPy transcription of the neural-tangents Conv/Relu/AvgPool/Dense rules
# ------------------------------------------------------------------------------------------------


def _np_conv(k, h, w, ww, bb):
    """Sigma[(i,j),(k,l)] = w^2/9 sum_{di,dj} K[(i+di,j+dj),(k+di,l+dj)] (in range) + b^2, by loops."""
    out = np.zeros_like(k)
    for i in range(h):
        for j in range(w):
            for a in range(h):
                for b in range(w):
                    total = 0.0
                    for di in (-1, 0, 1):
                        for dj in (-1, 0, 1):
                            p, q = (i + di, j + dj), (a + di, b + dj)
                            if 0 <= p[0] < h and 0 <= p[1] < w and 0 <= q[0] < h and 0 <= q[1] < w:
                                total += k[p[0] * w + p[1], q[0] * w + q[1]]
                    out[i * w + j, a * w + b] = ww**2 / 9 * total + bb**2
    return out


def _np_pool(k, h, w):
    h2, w2 = h // 2, w // 2
    out = np.zeros((h2 * w2, h2 * w2))
    for i in range(h2):
        for j in range(w2):
            for a in range(h2):
                for b in range(w2):
                    cells_p = [(2 * i + u) * w + 2 * j + v for u in (0, 1) for v in (0, 1)]
                    cells_q = [(2 * a + u) * w + 2 * b + v for u in (0, 1) for v in (0, 1)]
                    out[i * w2 + j, a * w2 + b] = np.mean([k[p, q] for p in cells_p for q in cells_q])
    return out, h2, w2


def _np_convnet_kernels(x, y, depth, ww, bb, readout, prepend):
    """(nngp, ntk) of one pair of images (C, H, W), carrying the xx, yy and xy covariances."""
    c, h, w = x.shape
    fx, fy = x.reshape(c, -1), y.reshape(c, -1)
    cov = {"xx": fx.T @ fx / c, "yy": fy.T @ fy / c, "xy": fx.T @ fy / c}
    ntk = None
    for layer in range(depth + int(prepend)):
        sig = {key: _np_conv(value, h, w, ww, bb) for key, value in cov.items()}
        ntk = sig["xy"] if ntk is None else _np_conv(ntk, h, w, ww, 0.0) + sig["xy"]
        new = {}
        for key, (u, v) in {"xx": ("xx", "xx"), "yy": ("yy", "yy"), "xy": ("xx", "yy")}.items():
            prod = np.sqrt(np.outer(np.diag(sig[u]), np.diag(sig[v])))
            t = np.arccos(np.clip(sig[key] / prod, -1, 1))
            new[key] = prod / (2 * np.pi) * (np.sin(t) + (np.pi - t) * np.cos(t))
            if key == "xy":
                ntk = ntk * (np.pi - t) / (2 * np.pi)
        cov = new
        if layer >= int(prepend):
            for key in cov:
                cov[key], h2, w2 = _np_pool(cov[key], h, w)
            ntk, h, w = _np_pool(ntk, h, w)[0], h2, w2
    reduce = np.diag if readout == "flatten" else (lambda m: m)
    nngp = ww**2 * np.mean(reduce(cov["xy"])) + bb**2
    return nngp, ww**2 * np.mean(reduce(ntk)) + nngp


@pytest.mark.parametrize("depth,readout,prepend,w,b,shape", [
    (1, "flatten", True, W_STD, B_STD, (2, 4, 4)),
    (2, "global_average", True, W_STD, B_STD, (1, 5, 4)),
    (1, "global_average", False, 1.3, 0.0, (2, 5, 5)),
])
def test_convnet_kernels_match_bruteforce_numpy_recursion(depth, readout, prepend, w, b, shape):
    x, y = _images(2, shape, 1), _images(2, shape, 2)
    options = dict(depth=depth, weight_std=w, bias_std=b, readout=readout, prepend_conv=prepend)
    nngp = ConvNetNNGP(shape, **options)(x, y).numpy()
    ntk = ConvNetNTK(shape, **options)(x, y).numpy()
    reference = np.array([[_np_convnet_kernels(a.numpy(), c.numpy(), depth, w, b, readout, prepend)
                           for c in y] for a in x])
    np.testing.assert_allclose(nngp, reference[..., 0], rtol=1e-11)
    np.testing.assert_allclose(ntk, reference[..., 1], rtol=1e-11)


# ------------------------------------------------------------------------------------------------
# Wide finite ConvNets of the same (NTK) parameterisation
# ------------------------------------------------------------------------------------------------


class NTKConv(nn.Module):
    """3x3 SAME convolution, NTK parameterisation: w/sqrt(9 C_in) * W * h + b * beta, W, beta ~ N(0, 1)."""

    def __init__(self, c_in: int, c_out: int, generator: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, 3, 3, generator=generator, dtype=dtype))
        self.bias = nn.Parameter(torch.randn(c_out, generator=generator, dtype=dtype))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        scale = W_STD / math.sqrt(9 * self.weight.shape[1])
        return F.conv2d(h, self.weight, padding=1) * scale + B_STD * self.bias[:, None, None]


class NTKDense(nn.Module):
    def __init__(self, fan_in: int, generator: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, fan_in, generator=generator, dtype=dtype))
        self.bias = nn.Parameter(torch.randn(1, generator=generator, dtype=dtype))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight) * (W_STD / math.sqrt(self.weight.shape[1])) + B_STD * self.bias


class FiniteConvNet(nn.Module):
    """KIP's ConvNet at finite width: Conv-ReLU, [Conv-ReLU-AvgPool] x depth, Flatten, Dense(1)."""

    def __init__(self, shape, width, depth, generator, dtype=torch.float32) -> None:
        super().__init__()
        c, h, w = shape
        self.convs = nn.ModuleList([NTKConv(c, width, generator, dtype)]
                                   + [NTKConv(width, width, generator, dtype) for _ in range(depth)])
        self.readout = NTKDense(width * (h >> depth) * (w >> depth), generator, dtype)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.convs[0](x))
        for conv in self.convs[1:]:
            h = F.avg_pool2d(F.relu(conv(h)), 2)
        return h.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.hidden(x))


SHAPE, DEPTH, WIDTHS = (1, 6, 6), 1, (64, 256, 1024)


@pytest.fixture(scope="module")
def tiny_images():
    return _images(3, SHAPE, 3)


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


#: Draws per width: the finite-width fluctuation is O(1/sqrt(width)), so narrow networks get more.
DRAWS = {64: 16, 256: 8, 1024: 4}


def _nngp_draws(x: torch.Tensor, width: int, seed: int) -> list[torch.Tensor]:
    # E over the random readout given the hidden layers: w^2 <phi(x), phi(x')> / fan_in + b^2.
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    with torch.no_grad():
        for _ in range(DRAWS[width]):
            hidden = FiniteConvNet(SHAPE, width, DEPTH, generator).hidden(x.float()).double()
            estimates.append(W_STD**2 * hidden @ hidden.T / hidden.shape[1] + B_STD**2)
    return estimates


def _ntk_draws(x: torch.Tensor, width: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [empirical_ntk(FiniteConvNet(SHAPE, width, DEPTH, generator), x.float()).double()
            for _ in range(DRAWS[width])]


def _check_convergence(draws_of_width, reference, wrong_kernels):
    """Mean per-draw error decreases with width; the mean at the largest width is close."""
    errors = []
    for width in WIDTHS:
        draws = draws_of_width(width)
        errors.append(float(np.mean([_relative_error(d, reference) for d in draws])))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.6 * errors[0], errors
    estimate = torch.stack(draws).mean(0)
    assert _relative_error(estimate, reference) < 0.06
    for wrong in wrong_kernels:
        assert _relative_error(estimate, wrong) > 0.1
    return errors


@pytest.mark.slow
def test_convnet_nngp_is_the_limit_of_wide_random_convnets(tiny_images):
    x = tiny_images
    # Observed mean per-draw errors 0.16, 0.06, 0.04 at widths 64, 256, 1024 (mean of 4 at 1024: 0.04).
    _check_convergence(lambda width: _nngp_draws(x, width, seed=10), ConvNetNNGP(SHAPE, depth=DEPTH)(x, x),
                       [ConvNetNTK(SHAPE, depth=DEPTH)(x, x),
                        ConvNetNNGP(SHAPE, depth=DEPTH, prepend_conv=False)(x, x)])


@pytest.mark.slow
def test_convnet_ntk_is_the_limit_of_empirical_ntks_of_wide_convnets(tiny_images):
    x = tiny_images
    flat = x.flatten(1)
    # Observed mean per-draw errors 0.11, 0.08, 0.04 (mean of 4 at 1024: 0.01).
    _check_convergence(lambda width: _ntk_draws(x, width, seed=20), ConvNetNTK(SHAPE, depth=DEPTH)(x, x),
                       [ConvNetNNGP(SHAPE, depth=DEPTH)(x, x), FullyConnectedNTK(2)(flat, flat),
                        ConvNetNTK(SHAPE, depth=DEPTH, readout="global_average")(x, x)])


# ------------------------------------------------------------------------------------------------
# Kernel properties
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_class", [ConvNetNNGP, ConvNetNTK])
@pytest.mark.parametrize("readout", ["flatten", "global_average"])
def test_convnet_kernels_symmetric_psd_and_finite_gradients_at_coincident_points(kernel_class, readout):
    shape = (1, 4, 5)
    kernel = kernel_class(shape, depth=2, readout=readout)
    x = _images(5, shape, 4).requires_grad_(True)
    gram = kernel(x, x)
    assert torch.equal(gram, gram.T)
    assert float(torch.linalg.eigvalsh(gram.detach()).min()) > 0
    copy = x.detach().clone()
    np.testing.assert_allclose(kernel(x, copy).detach(), gram.detach(), rtol=1e-12)
    (grad,) = torch.autograd.grad(kernel(x, copy).sum(), x)
    (grad_same,) = torch.autograd.grad(kernel(x, x).sum(), x)
    assert bool(torch.isfinite(grad).all()) and bool(torch.isfinite(grad_same).all())
    np.testing.assert_allclose(grad, grad_same / 2, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("kernel_class", [ConvNetNNGP, ConvNetNTK])
def test_convnet_kernels_gradcheck(kernel_class):
    shape = (1, 3, 3)
    kernel = kernel_class(shape, depth=1)
    x = _images(1, shape, 5).requires_grad_(True)
    y = _images(2, shape, 6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kernel(a, b), (x, y))
    assert torch.autograd.gradcheck(lambda a: kernel(a, a), (y,))
    # Flattened points are read as images: same values.
    np.testing.assert_allclose(kernel(x.flatten(1), y.flatten(1)).detach(), kernel(x, y).detach(), rtol=1e-14)


def test_blocked_computation_equals_one_block_and_is_differentiable():
    shape = (1, 6, 6)
    x, y = _images(4, shape, 7), _images(5, shape, 8)
    whole = ConvNetNTK(shape, depth=1)
    blocked = ConvNetNTK(shape, depth=1, max_block_entries=2 * 36**2)  # 2 image pairs per block
    np.testing.assert_allclose(blocked(x, y), whole(x, y), rtol=1e-13)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(whole(a, y).square().sum(), a)
    (gb,) = torch.autograd.grad(blocked(b, y).square().sum(), b)
    np.testing.assert_allclose(gb, ga, rtol=1e-12)


def test_convnet_kernel_inside_mmd():
    shape = (1, 4, 4)
    x, y = _images(4, shape, 9), _images(3, shape, 10) + 0.5
    kernel = ConvNetNTK(shape, depth=1)
    value = mmd2(x.flatten(1), y.flatten(1), kernel=kernel, estimator="biased")
    gram = lambda a, b: kernel(a, b).mean()  # noqa: E731
    expected = gram(x, x) + gram(y, y) - 2 * gram(x, y)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-10)


def test_convnet_kernels_reject_bad_arguments():
    with pytest.raises(ValueError, match="input_shape"):
        ConvNetNTK((8, 8))
    with pytest.raises(ValueError, match="depth"):
        ConvNetNTK((1, 8, 8), depth=0)
    with pytest.raises(ValueError, match="height and width >= 16"):
        ConvNetNTK((1, 8, 8), depth=4)
    with pytest.raises(ValueError, match="readout"):
        ConvNetNTK((1, 8, 8), readout="max")
    with pytest.raises(ValueError, match="weight_std"):
        ConvNetNNGP((1, 8, 8), weight_std=0.0)
    with pytest.raises(ValueError, match="max_block_entries"):
        ConvNetNNGP((1, 8, 8), max_block_entries=0)
    kernel = ConvNetNTK((1, 8, 8), depth=1)
    with pytest.raises(ValueError, match="input_shape"):
        kernel(torch.zeros(2, 63, dtype=torch.float64), torch.zeros(2, 63, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        kernel(torch.full((2, 64), float("nan")), torch.zeros(2, 64))
