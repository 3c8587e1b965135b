"""ipmcondense.trajectories: training expert buffers and reading them back."""

from __future__ import annotations

import json

import pytest
import torch

from ipmcondense.data import from_tensors
from ipmcondense.nets import get_network
from ipmcondense.autodiff import flatten_parameters, unrolled_sgd
from ipmcondense.condensation.objectives.trajectory import trajectory_matching_loss
from ipmcondense.trajectories import (
    BUFFER_METADATA_FILE,
    ExpertBuffer,
    ExpertBufferMismatchError,
    ExpertBufferNotFoundError,
    expert_file_name,
    train_experts,
)

from .._tiny import DT

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

