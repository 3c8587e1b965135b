"""Tests of ipmcondense.trajectories: flat parameters, SGD unrolls, MTT loss, expert buffers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ipmcondense.augment import DifferentiableSiameseAugmentation
from ipmcondense.data import from_tensors
from ipmcondense.nets import get_network
from ipmcondense.trajectories import (
    BUFFER_METADATA_FILE,
    ExpertBuffer,
    ExpertBufferMismatchError,
    ExpertBufferNotFoundError,
    FlatParameters,
    expert_file_name,
    flatten_parameters,
    functional_forward,
    load_flat_parameters,
    train_experts,
    trajectory_matching_loss,
    trajectory_matching_loss_and_grads,
    unrolled_sgd,
)

DT = torch.float64


def tiny_net(seed: int = 0, width: int = 4, depth: int = 2, activation: str = "swish", dtype=DT):
    """A small smooth ConvNet for 1x8x8 inputs and 4 classes (smooth so finite differences are clean)."""
    torch.manual_seed(seed)
    return get_network("convnet", 1, 4, (8, 8), width=width, depth=depth, activation=activation).to(dtype)


def tiny_data(n: int = 12, seed: int = 1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    labels = torch.arange(n) % 4
    return images, labels


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


# ------------------------------------------------------------------------------ expert buffers
ARCH = "convnet-w32"


def toy_dataset(name: str = "toy", n: int = 24, classes: int = 3):
    g = torch.Generator().manual_seed(123)
    train = torch.randn(n, 1, 8, 8, generator=g)
    test = torch.randn(9, 1, 8, 8, generator=g)
    return from_tensors(name, train, torch.arange(n) % classes, test, torch.arange(9) % classes)


def test_expert_reproduces_full_batch_sgd_so_mtt_loss_is_zero(tmp_path):
    """Full-batch, unaugmented experts: the student on the real data lands on the next snapshots."""
    data = toy_dataset()
    train_experts(data, 1, 2, tmp_path, arch=ARCH, batch_size=1000, augment=False, progress=False)
    buffer = ExpertBuffer(tmp_path, dataset=data, arch=ARCH)
    net = buffer.build_network()
    start, target = buffer.snapshot(0, 0), buffer.snapshot(0, 2)
    end = unrolled_sgd(net, start, data.train_images, data.train_labels, buffer.lr, 2)
    loss = trajectory_matching_loss(end, start, target)
    assert float(loss.detach()) < 1e-8
    # and a student on other data does not
    other = unrolled_sgd(net, start, torch.randn_like(data.train_images), data.train_labels, buffer.lr, 2)
    assert float(trajectory_matching_loss(other, start, target).detach()) > 1e-3


def test_train_experts_files_shapes_and_metadata(tmp_path):
    data = toy_dataset()
    report = train_experts(data, 2, 3, tmp_path, arch=ARCH, batch_size=8, seed=7, progress=False)
    assert report.trained == [0, 1] and report.skipped == [] and report.n_experts == 2
    meta = json.loads((tmp_path / BUFFER_METADATA_FILE).read_text())
    num_params = sum(p.numel() for p in get_network(ARCH, 1, 3, (8, 8)).parameters())
    assert meta["num_params"] == report.num_params == num_params
    assert (meta["dataset"], meta["arch"], meta["epochs"], meta["n_experts"]) == ("toy", ARCH, 3, 2)
    assert meta["image_shape"] == [1, 8, 8] and meta["num_classes"] == 3 and meta["lr"] == 0.01
    assert meta["momentum"] == 0.0 and meta["weight_decay"] == 0.0 and meta["seed"] == 7
    assert meta["augment"] is True and "flip" in meta["dsa_strategy"]
    assert "library_version" in meta and [e["file"] for e in meta["experts"]] == ["expert_000.pt", "expert_001.pt"]
    assert not list(tmp_path.glob("*.tmp"))
    buffer = ExpertBuffer(tmp_path)
    assert len(buffer) == 2 and buffer.epochs == 3
    for k in range(2):
        traj = buffer.trajectory(k)
        assert traj.shape == (4, num_params) and traj.dtype == torch.float32
        assert torch.isfinite(traj).all()
        assert (traj[1:] - traj[:-1]).norm(dim=1).min() > 0  # every epoch moves
    # epoch 0 is the initialisation; experts differ
    assert not torch.equal(buffer.trajectory(0)[0], buffer.trajectory(1)[0])
    net = buffer.network(1, 3)
    assert torch.equal(flatten_parameters(net), buffer.trajectory(1)[3])
    assert 0.0 <= report.test_accuracy[0] <= 1.0


def test_resume_retrains_only_the_damaged_expert_deterministically(tmp_path):
    data = toy_dataset()
    kwargs = dict(arch=ARCH, batch_size=8, progress=False)
    train_experts(data, 2, 2, tmp_path, **kwargs)
    first, second = tmp_path / expert_file_name(0), tmp_path / expert_file_name(1)
    first_bytes, first_mtime = first.read_bytes(), first.stat().st_mtime_ns
    original_second = torch.load(second, weights_only=True)["trajectory"]

    second.write_bytes(second.read_bytes()[:1000])  # interrupted / truncated
    (tmp_path / "expert_001.pt.tmp").write_bytes(b"partial")  # leftover of an interrupted write
    report = train_experts(data, 2, 2, tmp_path, **kwargs)
    assert report.skipped == [0] and report.trained == [1] and report.retrained_corrupt == [1]
    assert first.read_bytes() == first_bytes and first.stat().st_mtime_ns == first_mtime
    assert torch.equal(torch.load(second, weights_only=True)["trajectory"], original_second)
    assert not list(tmp_path.glob("*.tmp"))

    second.unlink()  # missing file
    report = train_experts(data, 2, 2, tmp_path, **kwargs)
    assert report.trained == [1] and report.retrained_corrupt == []

    report = train_experts(data, 2, 2, tmp_path, **kwargs)  # nothing to do
    assert report.trained == [] and report.skipped == [0, 1]


def test_extending_a_buffer_equals_training_in_one_go(tmp_path):
    data = toy_dataset()
    kwargs = dict(arch=ARCH, batch_size=8, progress=False)
    train_experts(data, 1, 1, tmp_path / "a", **kwargs)
    report = train_experts(data, 2, 1, tmp_path / "a", **kwargs)
    assert report.skipped == [0] and report.trained == [1]
    train_experts(data, 2, 1, tmp_path / "b", **kwargs)
    a, b = ExpertBuffer(tmp_path / "a"), ExpertBuffer(tmp_path / "b")
    for k in range(2):
        assert torch.equal(a.trajectory(k), b.trajectory(k))


def test_resume_with_other_settings_is_a_clear_error(tmp_path):
    data = toy_dataset()
    train_experts(data, 1, 1, tmp_path, arch=ARCH, batch_size=8, progress=False)
    with pytest.raises(ExpertBufferMismatchError, match="epochs=1 .*vs 2"):
        train_experts(data, 1, 2, tmp_path, arch=ARCH, batch_size=8, progress=False)
    with pytest.raises(ExpertBufferMismatchError, match="arch"):
        train_experts(data, 1, 1, tmp_path, arch="convnet-w64", batch_size=8, progress=False)
    with pytest.raises(ExpertBufferMismatchError, match="dataset"):
        train_experts(toy_dataset("other"), 1, 1, tmp_path, arch=ARCH, batch_size=8, progress=False)


def test_expert_buffer_compatibility_and_missing_directory(tmp_path):
    with pytest.raises(ExpertBufferNotFoundError, match="ipmcondense experts --dataset toy"):
        ExpertBuffer(tmp_path / "nowhere", dataset="toy")
    with pytest.raises(FileNotFoundError):
        ExpertBuffer(tmp_path / "nowhere")
    data = toy_dataset()
    train_experts(data, 1, 1, tmp_path, arch=ARCH, batch_size=8, progress=False)
    buffer = ExpertBuffer(tmp_path)
    buffer.check_compatible(data, ARCH.upper())
    buffer.check_compatible("toy")
    expected = r"dataset 'toy' \(buffer\) vs 'mnist'.*ipmcondense experts --dataset mnist"
    with pytest.raises(ExpertBufferMismatchError, match=expected):
        buffer.check_compatible("mnist", ARCH)
    with pytest.raises(ExpertBufferMismatchError, match="arch"):
        ExpertBuffer(tmp_path, dataset=data, arch="convnet")
    with pytest.raises(ExpertBufferMismatchError, match="num_classes"):
        buffer.check_compatible(toy_dataset(classes=4))


def test_expert_buffer_sample_ranges(tmp_path):
    data = toy_dataset()
    train_experts(data, 2, 4, tmp_path, arch=ARCH, batch_size=8, progress=False)
    buffer = ExpertBuffer(tmp_path)
    g = torch.Generator().manual_seed(0)
    experts, starts = set(), set()
    for _ in range(60):
        s = buffer.sample(g, max_start_epoch=3, expert_epochs=2, min_start_epoch=1, dtype=DT)
        experts.add(s.expert_index)
        starts.add(s.start_epoch)
        assert s.params_start.dtype == DT
        assert torch.equal(s.params_start, buffer.trajectory(s.expert_index)[s.start_epoch].to(DT))
        assert torch.equal(s.params_target, buffer.trajectory(s.expert_index)[s.start_epoch + 2].to(DT))
    assert experts == {0, 1} and starts == {1, 2}
    default = {buffer.sample(g, expert_epochs=3).start_epoch for _ in range(40)}
    assert default == {0, 1}  # every start with start + 3 <= 4
    with pytest.raises(ValueError, match="max_start_epoch"):
        buffer.sample(g, max_start_epoch=4, expert_epochs=2)
    with pytest.raises(ValueError, match="expert_epochs"):
        buffer.sample(g, expert_epochs=5)
    with pytest.raises(ValueError, match="min_start_epoch"):
        buffer.sample(g, max_start_epoch=2, min_start_epoch=2)
    # samples are copies: modifying one leaves the buffer intact
    s = buffer.sample(g)
    s.params_start.zero_()
    assert buffer.trajectory(s.expert_index)[s.start_epoch].abs().sum() > 0


def test_train_experts_input_errors(tmp_path):
    data = toy_dataset()
    with pytest.raises(ValueError, match="n_experts"):
        train_experts(data, 0, 1, tmp_path, arch=ARCH, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_experts(data, 1, 1, tmp_path, arch=ARCH, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="network name"):
        train_experts(data, 1, 1, tmp_path, arch="nonet", progress=False)
    with pytest.raises(TypeError, match="dataset"):
        train_experts("toy", 1, 1, tmp_path, arch=ARCH, progress=False)
