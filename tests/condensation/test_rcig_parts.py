"""RCIG's defining pieces (Loo et al. 2023, yolky/RCIG): linearised network, closed-form KRR last layer,
learned temperature/labels, clipping of the implicit gradient to the direct gradient's norm."""

import numpy as np
import pytest
import torch
from torch import nn

from ipmcondense.autodiff import flatten_parameters, functional_forward
from ipmcondense.condensation.objectives.bilevel import (
    clip_implicit_gradients,
    krr_head_predictions,
    linearised_forward,
    rcig_krr_loss,
)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_linearised_network_is_exact_at_the_base_point_and_first_order_around_it():
    net = _net()
    base = flatten_parameters(net).detach()
    x = torch.randn(5, 4, dtype=torch.float64)
    np.testing.assert_allclose(linearised_forward(net, base, torch.zeros_like(base), x).detach(),
                               net(x).detach(), rtol=0, atol=1e-15)
    direction = torch.randn_like(base)
    eps = 1e-6
    # Central finite difference of the true network along the direction = the linear part.
    fd = (functional_forward(net, base + eps * direction, x) - functional_forward(net, base - eps * direction, x)) / (2 * eps)
    lin = linearised_forward(net, base, direction, x) - net(x)
    np.testing.assert_allclose(lin.detach(), fd.detach(), rtol=1e-7, atol=1e-9)
    # Linear in the tangent (not the network itself: a large step differs from the true network).
    twice = linearised_forward(net, base, 2 * direction, x) - net(x)
    np.testing.assert_allclose(twice.detach(), 2 * lin.detach(), rtol=1e-12, atol=1e-13)
    assert float((linearised_forward(net, base, direction, x) - functional_forward(net, base + direction, x)).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="tangent"):
        linearised_forward(net, base, base[:-1], x)


def test_krr_head_equals_an_independent_closed_form_solve():
    g = np.random.default_rng(0)
    fs, ft = g.normal(size=(6, 4)), g.normal(size=(9, 4))
    os_, ot = g.normal(size=(6, 3)), g.normal(size=(9, 3))
    ys = g.normal(size=(6, 3))
    l2 = 0.3
    # The last layer W minimising ||fs W + os - ys||^2 + l2 ||W||^2 (primal), applied to the targets.
    w = np.linalg.solve(fs.T @ fs + l2 * np.eye(4), fs.T @ (ys - os_))
    expected = ot + ft @ w
    got = krr_head_predictions(*(torch.from_numpy(a) for a in (fs, os_, ys, ft, ot)), l2)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="l2"):
        krr_head_predictions(*(torch.from_numpy(a) for a in (fs, os_, ys, ft, ot)), -1.0)


def test_labels_and_temperature_receive_gradients():
    g = torch.Generator().manual_seed(1)
    fs = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(8, 4, generator=g, dtype=torch.float64)
    labels = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    log_temp = torch.zeros((), dtype=torch.float64, requires_grad=True)
    yt = torch.randint(0, 3, (8,), generator=g)
    zeros_s, zeros_t = torch.zeros(6, 3, dtype=torch.float64), torch.zeros(8, 3, dtype=torch.float64)
    loss = rcig_krr_loss(krr_head_predictions(fs, zeros_s, labels, ft, zeros_t, 0.1), yt, log_temp)
    g_fs, g_labels, g_temp = torch.autograd.grad(loss, [fs, labels, log_temp])
    assert float(g_labels.abs().max()) > 0 and float(g_temp.abs()) > 0 and float(g_fs.abs().max()) > 0
    # The temperature scales the logits: tau = log 2 equals doubling the predictions.
    pred = krr_head_predictions(fs, zeros_s, labels, ft, zeros_t, 0.1)
    torch.testing.assert_close(rcig_krr_loss(pred, yt, torch.tensor(np.log(2.0))),
                               torch.nn.functional.cross_entropy(2 * pred, yt))
    assert torch.autograd.gradcheck(lambda t: rcig_krr_loss(pred.detach(), yt, t), (log_temp,))


@pytest.mark.parametrize("scale", [1e-3, 0.5, 1.0, 7.0, 1e4])
def test_clipping_never_lets_the_implicit_part_exceed_the_direct_gradient(scale):
    g = torch.Generator().manual_seed(2)
    direct = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), None]
    implicit = [scale * torch.randn(3, 4, generator=g), scale * torch.randn(5, generator=g), torch.ones(2)]
    clipped = clip_implicit_gradients(implicit, direct)
    for c, i, d in zip(clipped, implicit, direct):
        bound = 0.0 if d is None else float(d.norm())
        assert float(c.norm()) <= bound * (1 + 1e-6) + 1e-12
        # Direction kept; unchanged when already smaller.
        if float(i.norm()) <= bound:
            torch.testing.assert_close(c, i)
        elif bound > 0:
            torch.testing.assert_close(c / c.norm(), i / i.norm())
    assert clip_implicit_gradients([torch.zeros(3), None], [torch.ones(3), None]) [0].abs().sum() == 0
    with pytest.raises(ValueError, match="same tensors"):
        clip_implicit_gradients([torch.ones(1)], [])
