"""IDC: the ``multiformation`` parameterisation through the engine, the ``gradient_l1`` distance, the row."""

import pytest
import torch

from ipmcondense.condensation.api import condense, evaluate
from ipmcondense.condensation.discrepancies import DISCREPANCIES
from ipmcondense.condensation.recipes import EXACT, compose_recipe, get_recipe

_TINY = {"ipc": 1, "seed": 3, "progress": False, "batch_real": 8, "train_steps": 1, "batch_pool": 4,
         "checkpoint_every": 1}


def test_idc_row_is_gradient_l1_matching_of_the_decoded_set_on_a_network_trained_on_real_data():
    row = get_recipe("idc")
    axes = row.axes()
    assert (axes["feature_map"], axes["discrepancy"], axes["sampler"], axes["synthetic"]) == (
        "gradients", "gradient_l1", "pool", "multiformation")
    assert row.relation_to_ipm == EXACT and row.defaults["factor"] == 2 and row.defaults["pool_size"] == 1
    assert "Efficient-Dataset-Condensation" in row.source and "Deviations" in row.source


def test_gradient_l1_is_the_l1_norm_of_the_mean_gradient_gap_on_convolution_kernels_only():
    d = DISCREPANCIES.get("gradient_l1")()
    g = torch.Generator().manual_seed(0)
    real, syn = torch.randn(3, 4, 2, 3, 3, generator=g), torch.randn(2, 4, 2, 3, 3, generator=g)
    brute = sum(abs(float(a) - float(b)) for a, b in zip(real.mean(0).flatten(), syn.mean(0).flatten()))
    assert float(d(real, syn)) == pytest.approx(brute, rel=1e-5)
    # the L-infinity-ball witness attains it: w = sign(gap)
    w = torch.sign(real.mean(0) - syn.mean(0))
    assert float((w * (real.mean(0) - syn.mean(0))).sum()) == pytest.approx(brute, rel=1e-5)
    # biases / norm parameters (1-D) and the linear classifier (2-D) are skipped, as IDC's --bias/--fc False
    assert float(d(torch.randn(2, 5), torch.randn(2, 5))) == 0.0
    assert float(d(torch.randn(2, 10, 7), torch.randn(2, 10, 7))) == 0.0


def test_idc_runs_saves_the_decoded_set_and_evaluates_it(tmp_path):
    r = condense("idc", "digits", iterations=2, out=tmp_path / "idc", **_TINY)
    assert r.images.shape == (40, 1, 8, 8) and torch.equal(r.labels, torch.arange(10).repeat_interleave(4))
    saved = torch.load(tmp_path / "idc" / "synthetic.pt", weights_only=True)
    assert saved["stored"]["stored"].shape == (10, 1, 8, 8) and torch.equal(saved["images"], r.images)
    result = evaluate(tmp_path / "idc", models=1, epochs=2, save=False)
    assert 0.0 <= result["accuracy_mean"] <= 1.0


def test_idc_resumes_bit_for_bit(tmp_path):
    straight = condense("idc", "digits", iterations=3, out=tmp_path / "a", **_TINY)
    condense("idc", "digits", iterations=1, out=tmp_path / "b", **_TINY)
    resumed = condense("idc", "digits", iterations=3, out=tmp_path / "b", resume=True, **_TINY)
    assert torch.equal(straight.images, resumed.images)
    assert straight.metrics["loss_history"] == resumed.metrics["loss_history"]


def test_dm_composes_with_multiformation():
    row = compose_recipe("dm", synthetic="multiformation")
    assert row.name == "dm+synthetic=multiformation"
    r = condense("dm", "digits", synthetic="multiformation", iterations=2, ipc=1, progress=False, batch_real=8)
    assert r.images.shape == (40, 1, 8, 8) and len(r.metrics["loss_history"]) == 2
    # factor 1 gives the plain pixels row back, number for number
    one = condense("dm", "digits", synthetic="multiformation", factor=1, iterations=2, ipc=1, progress=False,
                   batch_real=8)
    plain = condense("dm", "digits", iterations=2, ipc=1, progress=False, batch_real=8)
    assert torch.equal(one.images, plain.images)


def test_a_factor_that_does_not_divide_the_image_size_is_an_error_naming_factor():
    with pytest.raises(ValueError, match="factor 3 must divide the image size 8x8"):
        condense("idc", "digits", iterations=1, factor=3, **{**_TINY, "checkpoint_every": 0})
    with pytest.raises(ValueError, match="lower ipc or the factor"):
        condense("dm", "digits", synthetic="multiformation", factor=4, ipc=10, iterations=1, progress=False)
