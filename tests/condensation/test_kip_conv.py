"""KIP with the infinite-width ConvNet kernel (``kernel="conv_ntk"``, KIP's ConvNet) and learned labels, on digits."""

import pytest
import torch

from ipmcondense.condensation.api import condense
from ipmcondense.condensation.objectives import build_kernel
from ipmcondense.ipm.kernel_regression import centred_one_hot, krr_loss
from ipmcondense.ipm.neural_kernels import ConvNetNNGP, ConvNetNTK


def test_build_kernel_gives_kips_convnet():
    kernel = build_kernel("conv_ntk", (1, 8, 8), depth=3)
    assert type(kernel) is ConvNetNTK
    assert (kernel.depth, kernel.readout, kernel.prepend_conv) == (3, "flatten", True)
    assert (kernel.weight_std, kernel.bias_std) == (pytest.approx(2**0.5), 0.1)
    assert type(build_kernel("conv_nngp", (1, 8, 8), depth=2, conv_readout="global_average")) is ConvNetNNGP
    with pytest.raises(ValueError, match="channels, height, width"):
        build_kernel("conv_ntk", (64,))


def test_kip_conv_ntk_with_learned_labels_runs_and_decreases_a_fixed_conv_krr_loss(digits, class_batch, tmp_path):
    kwargs = dict(ipc=1, progress=False, seed=0, batch_real=2, kernel="conv_ntk", learn_labels=True,
                  lr_images=0.01, lr_labels=0.01)
    before = condense("kip", "digits", iterations=0, **kwargs)
    after = condense("kip", "digits", iterations=8, out=tmp_path / "run", **kwargs)
    assert after.config["conv_depth"] == 3 and after.config["conv_readout"] == "flatten"
    assert all(torch.isfinite(torch.tensor(after.metrics["loss_history"])))
    # The labels were learned: they moved away from the centred one-hot start.
    start = centred_one_hot(before.labels, 10)
    learned = torch.load(tmp_path / "run" / "synthetic.pt", weights_only=False)["stored"]["label_values"]
    assert learned.shape == (10, 10) and float((learned - start).abs().max()) > 1e-3
    x, y = class_batch(5, 9)
    kernel = build_kernel("conv_ntk", (1, 8, 8), depth=3)

    def fixed(images, labels):
        return float(krr_loss(kernel, images.reshape(10, -1), labels, x.reshape(50, -1), y))

    assert fixed(after.images, learned) < fixed(before.images, start)


def test_kip_conv_options_are_checked(digits, tmp_path):
    with pytest.raises(ValueError, match="conv_depth"):
        condense("kip", "digits", ipc=1, out=tmp_path / "x", kernel="conv_ntk", conv_depth=4, progress=False)
    with pytest.raises(ValueError, match="conv_readout"):
        condense("kip", "digits", ipc=1, out=tmp_path / "x", kernel="conv_ntk", conv_readout="max", progress=False)
    assert not (tmp_path / "x").exists()
