"""The MTT loss of ipmcondense.condensation.objectives.trajectory: values, errors, memory-lean gradients."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from ipmcondense.augment import DifferentiableSiameseAugmentation
from ipmcondense.autodiff import flatten_parameters, unrolled_sgd
from ipmcondense.condensation.objectives.trajectory import trajectory_matching_loss, trajectory_matching_loss_and_grads

from ..._tiny import DT, tiny_data, tiny_net

# ------------------------------------------------------------------------ trajectory matching
def test_trajectory_matching_loss_values_and_errors():
    g = torch.Generator().manual_seed(0)
    start, target = torch.randn(50, generator=g, dtype=DT), torch.randn(50, generator=g, dtype=DT)
    assert float(trajectory_matching_loss(target.clone(), start, target)) == 0.0
    assert float(trajectory_matching_loss(start.clone(), start, target)) == pytest.approx(1.0)
    student = torch.randn(50, generator=g, dtype=DT)
    expected = ((student - target) ** 2).sum() / ((start - target) ** 2).sum()
    torch.testing.assert_close(trajectory_matching_loss(student, start, target), expected)
    with pytest.raises(ValueError, match="expert_start equals expert_target"):
        trajectory_matching_loss(student, target, target.clone())
    with pytest.raises(ValueError, match="same shape"):
        trajectory_matching_loss(student[:3], start, target)


@pytest.mark.parametrize(
    "batch_size, use_augment, per_step_lr, soft",
    [(None, False, False, False), (5, True, True, False), (4, False, False, True)],
)
def test_memory_lean_gradient_equals_full_unroll_gradient(batch_size, use_augment, per_step_lr, soft):
    net = tiny_net(width=4, depth=2)
    theta0 = flatten_parameters(net)
    target = theta0 + 0.05 * torch.randn(theta0.numel(), generator=torch.Generator().manual_seed(4), dtype=DT)
    images, hard = tiny_data(n=12)
    labels = F.softmax(torch.randn(12, 4, generator=torch.Generator().manual_seed(6), dtype=DT), 1) if soft else hard
    steps = 4
    lrs = torch.full((steps,), 0.1, dtype=DT) if per_step_lr else torch.tensor(0.1, dtype=DT)
    augment = DifferentiableSiameseAugmentation("color_crop_cutout_scale_rotate") if use_augment else None

    x = images.clone().requires_grad_(True)
    lr = lrs.clone().requires_grad_(True)
    y = labels.clone().requires_grad_(True) if soft else labels
    end = unrolled_sgd(net, theta0, x, y, lr, steps, batch_size=batch_size, augment=augment,
                       generator=torch.Generator().manual_seed(11), soft_labels=soft)
    loss = trajectory_matching_loss(end, theta0, target)
    loss.backward()

    lean = trajectory_matching_loss_and_grads(net, theta0, target, images, labels, lrs, steps, batch_size=batch_size,
                                              augment=augment, generator=torch.Generator().manual_seed(11),
                                              soft_labels=soft)
    torch.testing.assert_close(lean.loss, loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lean.student_end, end.detach(), rtol=1e-10, atol=1e-12)
    assert x.grad.abs().max() > 0
    torch.testing.assert_close(lean.images_grad, x.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(lean.lrs_grad, lr.grad, rtol=1e-6, atol=1e-9)
    assert lean.lrs_grad.shape == lrs.shape
    if soft:
        torch.testing.assert_close(lean.labels_grad, y.grad, rtol=1e-6, atol=1e-9)
    else:
        assert lean.labels_grad is None


