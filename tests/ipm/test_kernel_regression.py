"""Kernel ridge regression (KIP/RFAD inner problem): NumPy solves, interpolation, gradcheck, errors."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ipmcondense.ipm.kernel_regression import centred_one_hot, kernel_ridge_predict, krr_loss
from ipmcondense.ipm.kernels import GaussianKernel, LinearKernel
from ipmcondense.ipm.neural_kernels import FullyConnectedNNGP, FullyConnectedNTK


def _data(n, d, seed, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.arange(n) % classes
    return x, labels


def test_centred_one_hot():
    y = centred_one_hot(torch.tensor([0, 2, 1, 2]), 3, dtype=torch.float64)
    expected = np.eye(3)[[0, 2, 1, 2]] - 1 / 3
    np.testing.assert_allclose(y.numpy(), expected)
    np.testing.assert_allclose(y.sum(1).numpy(), 0, atol=1e-15)
    assert centred_one_hot(np.array([1, 0]), 2).dtype == torch.get_default_dtype()


@pytest.mark.parametrize("relative", [True, False])
def test_kernel_ridge_predict_matches_numpy_solve(relative):
    xs, ls = _data(7, 4, 0)
    xt, _ = _data(5, 4, 1)
    kernel = FullyConnectedNTK(depth=2)
    k_ss, k_ts = kernel(xs, xs), kernel(xt, xs)
    y = centred_one_hot(ls, 3, dtype=torch.float64)
    reg = 1e-2
    pred = kernel_ridge_predict(k_ts, k_ss, y, reg=reg, relative=relative)
    a = k_ss.numpy()
    ridge = reg * np.trace(a) / 7 if relative else reg
    expected = k_ts.numpy() @ np.linalg.solve(a + ridge * np.eye(7), y.numpy())
    np.testing.assert_allclose(pred.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert pred.dtype == torch.float64 and pred.shape == (5, 3)


def test_kernel_ridge_predict_float32_inputs_solve_in_float64():
    xs, ls = _data(6, 3, 2)
    k_ss = GaussianKernel(1.0)(xs, xs)
    y = centred_one_hot(ls, 3, dtype=torch.float64)
    pred32 = kernel_ridge_predict(k_ss.float(), k_ss.float(), y.float(), reg=1e-6)
    assert pred32.dtype == torch.float32
    expected = k_ss.numpy() @ np.linalg.solve(k_ss.float().double().numpy() + 1e-6 * np.eye(6), y.numpy())
    np.testing.assert_allclose(pred32.numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", [FullyConnectedNTK(depth=3), FullyConnectedNNGP(depth=1), GaussianKernel(2.0)])
def test_krr_interpolates_support_labels_as_reg_vanishes(kernel):
    xs, ls = _data(10, 5, 3, classes=4)
    y = centred_one_hot(ls, 4, dtype=torch.float64)
    errors = []
    for reg in (1e-2, 1e-5, 1e-9):
        pred = kernel_ridge_predict(kernel(xs, xs), kernel(xs, xs), y, reg=reg)
        errors.append(float((pred - y).abs().max()))
    assert errors[-1] < 1e-6
    assert errors[0] > errors[1] > errors[2]
    assert float(krr_loss(kernel, xs, y, xs, ls, reg=1e-9)) < 1e-12


def test_krr_loss_mse_matches_manual_formula_and_accepts_class_indices():
    xs, ls = _data(6, 4, 4)
    xt, lt = _data(9, 4, 5)
    kernel = FullyConnectedNTK(depth=2)
    ys, yt = centred_one_hot(ls, 3, dtype=torch.float64), centred_one_hot(lt, 3, dtype=torch.float64)
    k_ss, k_ts = kernel(xs, xs).numpy(), kernel(xt, xs).numpy()
    pred = k_ts @ np.linalg.solve(k_ss + 1e-6 * np.trace(k_ss) / 6 * np.eye(6), ys.numpy())
    expected = 0.5 * np.mean((pred - yt.numpy()) ** 2)
    np.testing.assert_allclose(float(krr_loss(kernel, xs, ys, xt, yt)), expected, rtol=1e-9)
    np.testing.assert_allclose(float(krr_loss(kernel, xs, ys, xt, lt)), expected, rtol=1e-9)


def test_krr_loss_platt_matches_cross_entropy():
    xs, ls = _data(6, 4, 6)
    xt, lt = _data(8, 4, 7)
    kernel = FullyConnectedNNGP(depth=2)
    ys = centred_one_hot(ls, 3, dtype=torch.float64)
    tau = torch.tensor(1.3, dtype=torch.float64)
    pred = kernel_ridge_predict(kernel(xt, xs), kernel(xs, xs), ys, reg=5e-3)
    expected = F.cross_entropy(math.exp(1.3) * pred, lt)
    yt = centred_one_hot(lt, 3, dtype=torch.float64)
    for target in (lt, yt):
        value = krr_loss(kernel, xs, ys, xt, target, reg=5e-3, loss="platt", log_temperature=tau)
        np.testing.assert_allclose(float(value), float(expected), rtol=1e-12)
    np.testing.assert_allclose(
        float(krr_loss(kernel, xs, ys, xt, lt, reg=5e-3, loss="platt", log_temperature=1.3)),
        float(expected), rtol=1e-12,
    )


@pytest.mark.parametrize("kernel", [FullyConnectedNTK(depth=2), FullyConnectedNNGP(depth=3)])
def test_krr_loss_gradcheck(kernel):
    xs, ls = _data(4, 3, 8)
    xt, lt = _data(5, 3, 9)
    xs.requires_grad_(True)
    ys = centred_one_hot(ls, 3, dtype=torch.float64).requires_grad_(True)
    tau = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: krr_loss(kernel, a, b, xt, lt, reg=1e-3), (xs, ys))
    assert torch.autograd.gradcheck(
        lambda a, t: krr_loss(kernel, a, ys.detach(), xt, lt, reg=1e-3, loss="platt", log_temperature=t),
        (xs, tau),
    )


def test_singular_system_falls_back_to_least_squares_with_warning():
    # Rank-2 linear kernel on 5 points in the plane, no ridge: Cholesky fails.
    xs, ls = _data(5, 2, 10)
    k = LinearKernel()(xs, xs)
    y = centred_one_hot(ls, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="not positive definite"):
        pred = kernel_ridge_predict(k, k, y, reg=0.0)
    expected = k.numpy() @ np.linalg.lstsq(k.numpy(), y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(pred.numpy(), expected, rtol=1e-8, atol=1e-10)


def test_kernel_ridge_predict_rejects_bad_input():
    xs, ls = _data(4, 2, 11)
    k = GaussianKernel(1.0)(xs, xs)
    y = centred_one_hot(ls, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="reg must be finite"):
        kernel_ridge_predict(k, k, y, reg=float("nan"))
    with pytest.raises(ValueError, match="reg must be non-negative"):
        kernel_ridge_predict(k, k, y, reg=-1.0)
    with pytest.raises(ValueError, match="k_support_support must be square"):
        kernel_ridge_predict(k, k[:, :3], y)
    with pytest.raises(ValueError, match="k_target_support"):
        kernel_ridge_predict(k[:, :3], k, y)
    with pytest.raises(ValueError, match="y_support"):
        kernel_ridge_predict(k, k, y[:3])
    bad = k.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="k_support_support contains NaN or inf"):
        kernel_ridge_predict(k, bad, y)


def test_krr_loss_and_labels_reject_bad_input():
    xs, ls = _data(4, 2, 12)
    ys = centred_one_hot(ls, 3, dtype=torch.float64)
    kernel = FullyConnectedNTK(depth=1)
    with pytest.raises(ValueError, match="reg must be finite"):
        krr_loss(kernel, xs, ys, xs, ls, reg=float("inf"))
    with pytest.raises(ValueError, match="unknown loss"):
        krr_loss(kernel, xs, ys, xs, ls, loss="hinge")
    with pytest.raises(ValueError, match="log_temperature is required"):
        krr_loss(kernel, xs, ys, xs, ls, loss="platt")
    with pytest.raises(ValueError, match="y_support must have one row per support point"):
        krr_loss(kernel, xs, ys[:3], xs, ls)
    with pytest.raises(ValueError, match="y_target must have one entry per target point"):
        krr_loss(kernel, xs, ys, xs, ls[:2])
    with pytest.raises(ValueError, match="y_target must have 3 columns"):
        krr_loss(kernel, xs, ys, xs, torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="labels must lie in"):
        centred_one_hot(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="num_classes"):
        centred_one_hot(torch.tensor([0, 0]), 1)
    with pytest.raises(TypeError, match="labels must hold integer"):
        centred_one_hot(torch.tensor([0.0, 1.0]), 2)
