"""The bfloat16 option (``precision``): autocast where it is asked for, float32 everywhere else, clear errors."""

import json

import pytest
import torch
import torch.nn.functional as F

from ipmcondense.cli import main
from ipmcondense.condensation.api import condense
from ipmcondense.condensation.discrepancies import MeanEmbeddingDiscrepancy
from ipmcondense.condensation.engine import matching_loss
from ipmcondense.data import load_dataset
from ipmcondense.evaluation import EvaluationProtocol, classification_accuracy, evaluate_synthetic
from ipmcondense.features import EmbeddingFeatures, GradientFeatures
from ipmcondense.nets import get_network
from ipmcondense.training import autocast, train_on_batches


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _net(seed=0):
    torch.manual_seed(seed)
    return get_network("convnet", 1, 10, (8, 8), width=16)


def _bf16_rounded(t):
    return t.to(torch.bfloat16).float()


def test_autocast_is_bfloat16_for_bfloat16_and_a_no_op_for_float32():
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    with autocast("float32", "cpu"):
        assert (a @ b).dtype == torch.float32
    with autocast("bfloat16", "cpu"):
        product = a @ b
    assert product.dtype == torch.bfloat16
    # the product of the bfloat16-rounded inputs, accumulated in float32, then rounded once
    torch.testing.assert_close(product.float(), _bf16_rounded(_bf16_rounded(a) @ _bf16_rounded(b)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="precision"):
        autocast("float16", "cpu")


def test_bfloat16_matching_loss_is_float32_close_to_float32_and_not_equal(digits):
    net = _net().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    real = digits.train_images[:60]
    real_labels = digits.train_labels[:60]
    order = torch.argsort(real_labels, stable=True)
    real, real_labels = real[order], real_labels[order]
    present = torch.unique(real_labels)
    syn = torch.randn(2 * present.numel(), 1, 8, 8, generator=g, requires_grad=True)
    syn_labels = present.repeat_interleave(2)
    values, grads = {}, {}
    for precision in ("float32", "bfloat16"):
        loss = matching_loss(net, EmbeddingFeatures(), MeanEmbeddingDiscrepancy(), real, real_labels, syn, syn_labels,
                             precision=precision).total
        assert loss.dtype == torch.float32
        values[precision], = [loss.detach()]
        grads[precision], = torch.autograd.grad(loss, syn)
    assert not torch.equal(values["float32"], values["bfloat16"])  # the forward pass really ran in bfloat16
    torch.testing.assert_close(values["bfloat16"], values["float32"], rtol=0.05, atol=0)
    cosine = F.cosine_similarity(grads["bfloat16"].flatten(), grads["float32"].flatten(), dim=0)
    assert cosine > 0.99


def test_bfloat16_gradient_features_stay_float32(digits):
    net = _net()
    images, labels = digits.train_images[:20], digits.train_labels[:20]
    order = torch.argsort(labels, stable=True)
    images, labels = images[order], labels[order]
    syn = images.clone().requires_grad_(True)
    blocks32 = GradientFeatures()(net, syn, labels, [slice(0, 20)], differentiable=True)
    with autocast("bfloat16", "cpu"):
        blocks16 = GradientFeatures()(net, syn, labels, [slice(0, 20)], differentiable=True)
    assert all(b.values.dtype == torch.float32 for b in blocks16)  # gradients of the float32 parameters
    cosine = F.cosine_similarity(torch.cat([b.values.flatten() for b in blocks16]),
                                 torch.cat([b.values.flatten() for b in blocks32]), dim=0)
    assert 0.99 < cosine < 1.0


def test_bfloat16_training_step_keeps_float32_parameters_and_differs_from_float32(digits):
    images, labels = digits.train_images[:64], digits.train_labels[:64]
    nets = {}
    for precision in ("float32", "bfloat16"):
        net = _net(seed=3)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        losses = train_on_batches(net, opt, [(images, labels)] * 3, precision=precision)
        assert all(loss.dtype == torch.float32 for loss in losses)
        assert all(p.dtype == torch.float32 for p in net.parameters())
        nets[precision] = net
    p32 = torch.cat([p.flatten() for p in nets["float32"].parameters()])
    p16 = torch.cat([p.flatten() for p in nets["bfloat16"].parameters()])
    assert not torch.equal(p32, p16)
    assert (p32 - p16).abs().max() < 0.05 * p32.abs().max()
    acc = classification_accuracy(nets["bfloat16"], images, labels, precision="bfloat16")
    assert acc == classification_accuracy(nets["bfloat16"], images, labels, precision="bfloat16")  # deterministic


def test_evaluation_protocol_records_and_checks_precision(digits):
    protocol = EvaluationProtocol(epochs=2, precision="bfloat16")
    assert protocol.to_dict()["precision"] == "bfloat16"
    assert EvaluationProtocol().precision == "float32"  # the reference protocol computes in float32
    with pytest.raises(ValueError, match="precision"):
        EvaluationProtocol(precision="half")
    images, labels = digits.train_images[:20], digits.train_labels[:20]
    a = evaluate_synthetic(images, labels, digits, protocol, n_models=1)
    b = evaluate_synthetic(images, labels, digits, EvaluationProtocol(epochs=2), n_models=1)
    assert a.protocol["precision"] == "bfloat16" and b.protocol["precision"] == "float32"


def test_condense_precision_option_and_its_errors(tmp_path):
    result = condense("dm", "digits", 1, iterations=2, out=tmp_path / "run", progress=False, precision="bfloat16")
    assert result.config["precision"] == "bfloat16"
    assert result.images.dtype == torch.float32 and bool(torch.isfinite(result.images).all())
    reference = condense("dm", "digits", 1, iterations=2, progress=False)
    assert not torch.equal(result.images, reference.images)
    with pytest.raises(ValueError, match="precision"):
        condense("dm", "digits", 1, iterations=1, progress=False, precision="float16")
    with pytest.raises(ValueError, match="precision 'bfloat16' is only available for matching recipes"):
        condense("kip", "digits", 1, iterations=1, progress=False, precision="bfloat16")


def test_cli_precision_flags(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["condense", "--method", "dm", "--ipc", "1", "--iterations", "1", "--out", str(out),
                 "--no-progress", "--precision", "bfloat16"]) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["precision"] == "bfloat16"
    capsys.readouterr()
    assert main(["evaluate", str(out), "--models", "1", "--epochs", "1", "--precision", "bfloat16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["protocol"]["precision"] == "bfloat16"


def _sorted_batch(digits, n_real=60, ipc=2, seed=0):
    order = torch.argsort(digits.train_labels[:n_real], stable=True)
    real, real_labels = digits.train_images[:n_real][order], digits.train_labels[:n_real][order]
    present = torch.unique(real_labels)
    g = torch.Generator().manual_seed(seed)
    syn = torch.randn(ipc * present.numel(), 1, 8, 8, generator=g, requires_grad=True)
    return real, real_labels, syn, present.repeat_interleave(ipc)


def test_channels_last_real_side_is_the_float32_loss_and_restores_the_network(digits):
    net = _net().requires_grad_(False)
    real, real_labels, syn, syn_labels = _sorted_batch(digits)
    seen = []
    embed = net.embed

    def spy(x):  # the 16 -> 16 convolutions' weights tell the memory format (1-channel images look the same in both)
        wide = [p for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1]
        seen.append(all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in wide))
        return embed(x)

    net.embed = spy
    losses, grads = [], []
    for channels_last in (False, True):
        seen.clear()
        loss = matching_loss(net, EmbeddingFeatures(), MeanEmbeddingDiscrepancy(), real, real_labels, syn, syn_labels,
                             channels_last=channels_last).total
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, syn)[0])
        # the real side (first call) ran in channels_last only when asked; the synthetic side never did
        assert seen == [channels_last, False]
        assert all(p.is_contiguous() for p in net.parameters())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_channels_last_leaves_gradient_matching_alone(digits):
    net = _net()
    real, real_labels, syn, syn_labels = _sorted_batch(digits)
    a, b = (matching_loss(net, GradientFeatures(), MeanEmbeddingDiscrepancy(), real, real_labels, syn, syn_labels,
                          channels_last=flag).total for flag in (False, True))
    assert torch.equal(a, b)  # the real side needs parameter gradients: it stays contiguous, bit for bit
    with pytest.raises(TypeError, match="channels_last"):
        condense("dm", "digits", 1, iterations=1, progress=False, channels_last="yes")
