"""Tests of the evaluation protocol (ipmcondense.evaluation)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ipmcondense.data import load_dataset
from ipmcondense.evaluation import (
    EvaluationProtocol,
    EvaluationResult,
    ZCAWhitening,
    build_network,
    classification_accuracy,
    evaluate_synthetic,
    train_and_test,
    train_network,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _per_class(dataset, ipc, offset=0):
    index = torch.cat(
        [
            torch.nonzero(dataset.train_labels == c)[offset : offset + ipc, 0]
            for c in range(dataset.num_classes)
        ]
    )
    return dataset.train_images[index], dataset.train_labels[index]


# ------------------------------------------------------------------------------------ schedule
def test_reference_schedule_with_augmentation():
    protocol = EvaluationProtocol()
    schedule = protocol.learning_rate_schedule()
    assert protocol.total_epochs == 1000 and protocol.decay_epoch == 501
    assert len(schedule) == 1001  # Epoch + 1 epochs
    assert schedule[:502] == [0.01] * 502  # epochs 0 .. 501 at lr: the decay follows epoch 501
    assert schedule[502:] == pytest.approx([0.001] * 499)


def test_reference_schedule_without_augmentation_and_overrides():
    protocol = EvaluationProtocol(augmentation="none")
    schedule = protocol.learning_rate_schedule()
    assert len(schedule) == 301 and protocol.decay_epoch == 151
    assert schedule[151] == 0.01 and schedule[152] == pytest.approx(0.001)
    learned = EvaluationProtocol(epochs=10, learned_lr=0.03)
    assert learned.learning_rate_schedule() == pytest.approx([0.03] * 7 + [0.003] * 4)
    assert EvaluationProtocol(epochs=0).learning_rate_schedule() == [0.01]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"arch": "transformer"},
        {"augmentation": "mixup"},
        {"epochs": -1},
        {"lr": 0.0},
        {"batch_size": 0},
        {"learned_lr": float("nan")},
        {"dsa_strategy": "color_blur"},
    ],
)
def test_protocol_rejects_bad_options(kwargs):
    with pytest.raises(ValueError):
        EvaluationProtocol(**kwargs)


def test_optimizer_recreated_and_momentum_reset_at_decay(digits):
    protocol = EvaluationProtocol(epochs=4, augmentation="none")  # decay after epoch 3
    images, labels = _per_class(digits, 2)
    network = build_network(protocol, digits, seed=0)
    records = []

    def record(epoch, optimizer, loss):
        records.append(
            (epoch, id(optimizer), optimizer.param_groups[0]["lr"], len(optimizer.state), float(loss))
        )

    train_network(network, images, labels, protocol, torch.Generator().manual_seed(0), epoch_callback=record)
    assert [r[0] for r in records] == [0, 1, 2, 3, 4]
    ids = [r[1] for r in records]
    assert ids[0] == ids[1] == ids[2] and ids[3] == ids[4] and ids[2] != ids[3]
    assert [r[2] for r in records] == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001])
    assert records[2][3] > 0  # momentum buffers exist before the decay
    assert records[3][3] == 0  # the new optimizer starts with no momentum buffer
    assert records[4][3] > 0
    assert all(np.isfinite(r[4]) for r in records)


def _reference_loop(dataset, images, labels, epochs, seed, reset_momentum):
    """Plain re-statement of the reference loop (no augmentation): Epoch+1 epochs, decay after Epoch//2+1."""
    torch.manual_seed(seed)
    from ipmcondense.nets import get_network

    net = get_network("convnet", dataset.channels, dataset.num_classes, dataset.image_size)
    generator = torch.Generator().manual_seed(seed)
    lr = 0.01
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    net.train()
    for ep in range(epochs + 1):
        perm = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], 256):
            idx = perm[start : start + 256]
            loss = F.cross_entropy(net(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep == epochs // 2 + 1:
            lr *= 0.1
            if reset_momentum:
                opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
            else:
                for group in opt.param_groups:
                    group["lr"] = lr
    return net


def test_training_matches_reference_loop(digits):
    images, labels = _per_class(digits, 3)
    protocol = EvaluationProtocol(epochs=6, augmentation="none", batch_size=256)
    network = build_network(protocol, digits, seed=5)
    train_network(network, images, labels, protocol, torch.Generator().manual_seed(5))
    reference = _reference_loop(digits, images, labels, 6, 5, reset_momentum=True)
    no_reset = _reference_loop(digits, images, labels, 6, 5, reset_momentum=False)
    for ours, ref, other in zip(network.parameters(), reference.parameters(), no_reset.parameters()):
        torch.testing.assert_close(ours, ref)
    differs = any(not torch.allclose(a, b) for a, b in zip(network.parameters(), no_reset.parameters()))
    assert differs  # keeping the momentum buffer would have changed the weights


def test_several_minibatches_per_epoch(digits):
    images, labels = _per_class(digits, 3)
    protocol = EvaluationProtocol(epochs=2, augmentation="none", batch_size=8)
    steps = []
    network = build_network(protocol, digits, seed=0)
    handle = network.register_forward_hook(lambda m, i, o: steps.append(i[0].shape[0]))
    train_network(network, images, labels, protocol, torch.Generator().manual_seed(0))
    handle.remove()
    assert steps == [8, 8, 8, 6] * 3  # 30 images: ceil(30 / 8) batches per epoch, 3 epochs


# ------------------------------------------------------------------------------ train and test
def test_train_and_test_is_deterministic_and_seeded(digits):
    images, labels = _per_class(digits, 2)
    protocol = EvaluationProtocol(epochs=4)
    a = train_and_test(images, labels, digits, protocol, seed=3)
    b = train_and_test(images, labels, digits, protocol, seed=3)
    assert a == b and 0.0 <= a <= 1.0
    state = torch.random.get_rng_state()
    train_and_test(images, labels, digits, protocol, seed=4)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_soft_one_hot_labels_equal_hard_labels(digits):
    images, labels = _per_class(digits, 2)
    hard = EvaluationProtocol(epochs=3, augmentation="none")
    soft = EvaluationProtocol(epochs=3, augmentation="none", soft_labels=True)
    net_hard = build_network(hard, digits, seed=1)
    net_soft = build_network(soft, digits, seed=1)
    train_network(net_hard, images, labels, hard, torch.Generator().manual_seed(1))
    train_network(net_soft, images, F.one_hot(labels, 10).float(), soft, torch.Generator().manual_seed(1))
    for p, q in zip(net_hard.parameters(), net_soft.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert train_and_test(images, F.one_hot(labels, 10).float(), digits, soft, seed=0) >= 0.0


def test_label_validation(digits):
    images, labels = _per_class(digits, 1)
    protocol = EvaluationProtocol(epochs=1)
    with pytest.raises(ValueError, match="soft_labels"):
        train_and_test(images, F.one_hot(labels, 10).float(), digits, protocol)
    with pytest.raises(ValueError, match="train_labels"):
        train_and_test(images, labels + 10, digits, protocol)
    with pytest.raises(ValueError, match="one entry per training image"):
        train_and_test(images, labels[:-1], digits, protocol)
    soft = EvaluationProtocol(epochs=1, soft_labels=True)
    with pytest.raises(ValueError, match="sum to 1"):
        train_and_test(images, torch.ones(10, 10), digits, soft)
    with pytest.raises(ValueError, match="train_images"):
        train_and_test(images[:, :, :4], labels, digits, protocol)
    with pytest.raises(ValueError, match="NaN"):
        train_and_test(images * float("nan"), labels, digits, protocol)


def test_learned_lr_is_used(digits):
    images, labels = _per_class(digits, 1)
    protocol = EvaluationProtocol(epochs=3, learned_lr=0.05, augmentation="none")  # decay after epoch 2
    lrs = []
    network = build_network(protocol, digits, seed=0)
    train_network(network, images, labels, protocol, torch.Generator().manual_seed(0),
                  epoch_callback=lambda e, opt, loss: lrs.append(opt.param_groups[0]["lr"]))
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.005])  # callback sees the next epoch's optimizer


def test_other_architecture(digits):
    images, labels = _per_class(digits, 2)
    accuracy = train_and_test(images, labels, digits, EvaluationProtocol(arch="mlp", epochs=3), seed=0)
    assert 0.0 <= accuracy <= 1.0


def test_classification_accuracy_brute_force():
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(50, 1, 2, 2)
    y = torch.randint(0, 3, (50,))
    expected = float((network(x).argmax(1) == y).float().mean())
    assert classification_accuracy(network, x, y, batch_size=7) == pytest.approx(expected)


def test_evaluate_synthetic_records_seeds_and_statistics(digits):
    images, labels = _per_class(digits, 2)
    result = evaluate_synthetic(images, labels, digits, EvaluationProtocol(epochs=3), n_models=3, seed=10)
    assert isinstance(result, EvaluationResult)
    assert result.seeds == [10, 11, 12] and result.n_models == 3 and len(result.accuracies) == 3
    assert result.accuracy_mean == pytest.approx(np.mean(result.accuracies))
    assert result.accuracy_std == pytest.approx(np.std(result.accuracies))
    single = train_and_test(images, labels, digits, EvaluationProtocol(epochs=3), seed=11)
    assert result.accuracies[1] == single
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["protocol"]["total_epochs"] == 3 and payload["train_size"] == 20
    with pytest.raises(ValueError, match="n_models"):
        evaluate_synthetic(images, labels, digits, n_models=0)


def test_zca_protocol_runs(digits):
    images, labels = _per_class(digits, 2)
    accuracy = train_and_test(images, labels, digits, EvaluationProtocol(epochs=2, zca=True), seed=0)
    assert 0.0 <= accuracy <= 1.0


# ------------------------------------------------------------------------------------------ ZCA
def test_zca_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 1, 2, 3)) @ np.diag([1.0, 2.0, 0.5]) + 3.0
    zca = ZCAWhitening(eps=0.1).fit(torch.from_numpy(x))
    flat = x.reshape(200, -1)
    centred = flat - flat.mean(0)
    cov = centred.T @ centred / 199
    w, v = np.linalg.eigh(cov)
    matrix = v @ np.diag(1 / np.sqrt(w + 0.1)) @ v.T
    out = zca.transform(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out.reshape(200, -1), centred @ matrix, rtol=1e-10, atol=1e-10)
    # whitened covariance = U diag(w / (w + eps)) U^T, and the transform is invertible
    np.testing.assert_allclose(np.cov(out.reshape(200, -1).T), v @ np.diag(w / (w + 0.1)) @ v.T, atol=1e-10)
    torch.testing.assert_close(zca.inverse_transform(zca.transform(torch.from_numpy(x))), torch.from_numpy(x))


def test_zca_errors():
    with pytest.raises(ValueError, match="fitted"):
        ZCAWhitening().transform(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="eps"):
        ZCAWhitening(eps=0.0)
    zca = ZCAWhitening().fit(torch.randn(10, 4))
    with pytest.raises(ValueError, match="fitted on 4"):
        zca.transform(torch.zeros(2, 5))


# ---------------------------------------------------------------------------------- full protocol
@pytest.mark.slow
def test_full_protocol_on_real_subset_reaches_reasonable_accuracy(digits):
    # 10 real images per class, reference protocol (1001 epochs with per-sample DSA, decay, test once).
    images, labels = _per_class(digits, 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 8x8 images: one thread avoids OpenMP synchronisation on a busy CI machine
    try:
        accuracy = train_and_test(images, labels, digits, EvaluationProtocol(), seed=0)
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.7
