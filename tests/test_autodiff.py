"""ipmcondense.autodiff: flat parameter vectors and differentiable SGD unrolls."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from ipmcondense.autodiff import FlatParameters, flatten_parameters, functional_forward, load_flat_parameters, unrolled_sgd

from ._tiny import DT, tiny_data, tiny_net

# ------------------------------------------------------------------------------ flat parameters
def test_flatten_matches_concatenation_and_functional_forward_matches_module():
    net = tiny_net()
    flat = flatten_parameters(net)
    expected = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    assert torch.equal(flat, expected)
    assert FlatParameters(net).numel == sum(p.numel() for p in net.parameters())
    x, _ = tiny_data()
    torch.testing.assert_close(functional_forward(net, flat, x), net(x), rtol=0, atol=0)


def test_functional_forward_uses_the_vector_not_the_module_parameters():
    net, other = tiny_net(0), tiny_net(1)
    x, _ = tiny_data()
    before = flatten_parameters(net)
    out = functional_forward(net, flatten_parameters(other), x)
    torch.testing.assert_close(out, other(x))
    assert torch.equal(flatten_parameters(net), before)  # module untouched


def test_views_share_storage_and_load_round_trips():
    net = tiny_net()
    layout = FlatParameters(net)
    flat = torch.randn(layout.numel, dtype=DT)
    views = layout.views(flat)
    assert all(v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for v in views.values())
    load_flat_parameters(net, flat)
    assert torch.equal(flatten_parameters(net), flat)


def test_flat_parameters_errors():
    net = tiny_net()
    x, _ = tiny_data()
    with pytest.raises(ValueError, match="flat_params"):
        functional_forward(net, torch.zeros(3, dtype=DT), x)
    with pytest.raises(TypeError, match="net"):
        flatten_parameters("not a module")
    with pytest.raises(ValueError, match="no parameters"):
        FlatParameters(torch.nn.ReLU())


# ----------------------------------------------------------------------------------- unroll
def manual_sgd(net, images, labels, lrs, batches):
    """Reference: nn.Module + torch.optim.SGD, one step per batch of indices, step size set per step."""
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    for step, idx in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = float(lrs[step]) if lrs.numel() > 1 else float(lrs)
        loss = F.cross_entropy(net(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flatten_parameters(net)


def test_unrolled_sgd_matches_manual_full_batch_loop_with_per_step_lrs():
    net, reference = tiny_net(), tiny_net()
    images, labels = tiny_data()
    lrs = torch.tensor([0.3, 0.1, 0.2], dtype=DT)
    trajectory = unrolled_sgd(net, flatten_parameters(net), images, labels, lrs, 3, return_trajectory=True)
    expected = manual_sgd(reference, images, labels, lrs, [torch.arange(12)] * 3)
    assert len(trajectory) == 4
    assert torch.equal(trajectory[0], flatten_parameters(net))
    torch.testing.assert_close(trajectory[-1], expected, rtol=1e-12, atol=1e-12)
    assert not torch.equal(trajectory[-1], trajectory[0])


def test_unrolled_sgd_minibatches_are_chunks_of_a_permutation():
    net, reference = tiny_net(), tiny_net()
    images, labels = tiny_data(n=10)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    batches = list(torch.split(perm, 4))  # sizes 4, 4, 2: one epoch over the synthetic set
    lr = torch.tensor(0.2, dtype=DT)
    end = unrolled_sgd(net, flatten_parameters(net), images, labels, lr, 3, batch_size=4,
                       generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(end, manual_sgd(reference, images, labels, lr, batches), rtol=1e-12, atol=1e-12)


def test_unrolled_sgd_detached_mode_equals_graph_mode_values():
    net = tiny_net()
    images, labels = tiny_data()
    a = unrolled_sgd(net, flatten_parameters(net), images, labels, 0.1, 2)
    b = unrolled_sgd(net, flatten_parameters(net), images, labels, 0.1, 2, create_graph=False)
    assert a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-14)


def test_unrolled_sgd_gradients_match_finite_differences():
    net = tiny_net(width=3, depth=1)
    theta0 = flatten_parameters(net)
    images, labels = tiny_data(n=6)
    images.requires_grad_(True)
    lrs = torch.tensor([0.5, 0.3], dtype=DT, requires_grad=True)
    direction = torch.randn(theta0.numel(), generator=torch.Generator().manual_seed(2), dtype=DT)

    def objective(x, lr):
        end = unrolled_sgd(net, theta0, x, labels, lr, 2)
        return (end * direction).sum() + end.pow(2).sum()

    assert torch.autograd.gradcheck(objective, (images, lrs), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_unrolled_sgd_soft_label_gradients_match_finite_differences():
    net = tiny_net(width=3, depth=1)
    theta0 = flatten_parameters(net)
    images, _ = tiny_data(n=5)
    soft = torch.softmax(torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=DT), dim=1)
    soft.requires_grad_(True)

    def objective(y):
        return unrolled_sgd(net, theta0, images, y, 0.4, 2, soft_labels=True).pow(2).sum()

    assert torch.autograd.gradcheck(objective, (soft,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_soft_labels_equal_to_one_hot_reproduce_hard_labels():
    net = tiny_net()
    images, labels = tiny_data()
    hard = unrolled_sgd(net, flatten_parameters(net), images, labels, 0.2, 2)
    soft = unrolled_sgd(net, flatten_parameters(net), images, F.one_hot(labels, 4).to(DT), 0.2, 2, soft_labels=True)
    torch.testing.assert_close(hard, soft, rtol=1e-12, atol=1e-12)


def test_first_order_limit_is_accumulated_gradient():
    """(theta_N - theta_0)/lr -> -sum_i grad l_i(theta_0) as lr -> 0, with error O(lr)."""
    net = tiny_net()
    theta0 = flatten_parameters(net)
    images, labels = tiny_data(n=12)
    steps, batch = 3, 4
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(9))
    accumulated = torch.zeros_like(theta0)
    for idx in torch.split(perm, batch):
        leaf = theta0.clone().requires_grad_(True)
        loss = F.cross_entropy(functional_forward(net, leaf, images[idx]), labels[idx])
        accumulated += torch.autograd.grad(loss, leaf)[0]
    errors = []
    for lr in (1e-2, 1e-3, 1e-4):
        end = unrolled_sgd(net, theta0, images, labels, lr, steps, batch_size=batch,
                           generator=torch.Generator().manual_seed(9), create_graph=False)
        displacement = (end - theta0) / lr
        errors.append(float((displacement + accumulated).norm() / accumulated.norm()))
    assert errors[0] < 0.1
    for coarse, fine in zip(errors, errors[1:]):
        assert 6.0 < coarse / fine < 14.0  # linear in lr (ratio 10 per decade)


def test_unrolled_sgd_input_errors():
    net = tiny_net()
    theta = flatten_parameters(net)
    images, labels = tiny_data()
    with pytest.raises(ValueError, match="steps"):
        unrolled_sgd(net, theta, images, labels, 0.1, 0)
    with pytest.raises(ValueError, match="lrs"):
        unrolled_sgd(net, theta, images, labels, torch.ones(5, dtype=DT), 3)
    with pytest.raises(ValueError, match="labels"):
        unrolled_sgd(net, theta, images, labels[:5], 0.1, 1)
    with pytest.raises(ValueError, match="soft_labels"):
        unrolled_sgd(net, theta, images, labels, 0.1, 1, soft_labels=True)
    with pytest.raises(ValueError, match="images"):
        unrolled_sgd(net, theta, images * float("nan"), labels, 0.1, 1)
    with pytest.raises(ValueError, match="batch_size"):
        unrolled_sgd(net, theta, images, labels, 0.1, 1, batch_size=0)


