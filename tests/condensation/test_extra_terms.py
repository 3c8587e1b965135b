"""Extra terms (not IPMs) equal their definitions; unknown names are clear errors."""

import pytest
import torch

from ipmcondense.condensation.extra_terms import (
    EXTRA_TERMS,
    PrototypeDiscrimination,
    SyntheticCrossEntropy,
    get_extra_term,
)
from ipmcondense.condensation.samplers import ACCURACY_METER_ATTRIBUTE, AccuracyMeter


def test_unknown_term():
    with pytest.raises(ValueError, match="unknown extra term 'magic'"):
        get_extra_term("magic", 1.0)


def test_weights_come_from_the_declared_options():
    assert EXTRA_TERMS.option_defaults() == {"ce_weight": 0.5, "inner_weight": 0.01, "bn_weight": 0.01,
                                             "teacher_ce_weight": 1.0, "anchor_weight": 0.01,
                                             # DCGM's class_contrast (issue 18)
                                             "intra_weight": 0.1, "inter_weight": 0.1, "dcgm_temperature": 0.1}
    assert EXTRA_TERMS.get("synthetic_ce").from_config({"ce_weight": 3.0}).weight == 3.0
    assert EXTRA_TERMS.get("prototype_discrimination").from_config({}).weight == 0.01


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.classifier = torch.nn.Linear(4, 2).double()

    def embed(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


def test_prototype_discrimination_matches_direct_formula():
    net = _Linear()
    g = torch.Generator().manual_seed(3)
    real, syn = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    rl, sl = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1])
    value = PrototypeDiscrimination(0.01)(net, real, rl, syn, sl, [slice(0, 3), slice(3, 6)], [slice(0, 2), slice(2, 4)])
    protos = torch.stack([syn[:2].mean(0), syn[2:].mean(0)])
    expected = 0.01 * torch.nn.functional.cross_entropy(real @ protos.T, rl, reduction="sum")
    torch.testing.assert_close(value, expected)


def test_synthetic_cross_entropy_is_weighted_by_the_running_training_accuracy_in_percent():
    # IDM multiplies the CE by ClassErrorMeter(accuracy=True).value()[0]: the pool network's running
    # training accuracy in PERCENT (here 3 of 4 = 75), not the real batch's accuracy in [0, 1]
    net = _Linear()
    setattr(net, ACCURACY_METER_ATTRIBUTE, AccuracyMeter(correct=3, seen=4))
    real, syn = torch.randn(4, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    rl, sl = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1])
    segments = ([slice(0, 2), slice(2, 4)], [slice(0, 1), slice(1, 2)])
    value = SyntheticCrossEntropy(0.5)(net, real, rl, syn, sl, *segments)
    ce = sum(torch.nn.functional.cross_entropy(net(syn[i : i + 1]), sl[i : i + 1]) for i in range(2))
    torch.testing.assert_close(value, 0.5 * 75.0 * ce)
    # the old weight (batch accuracy in [0, 1]) is at most 1: 75x smaller
    batch_accuracy = float((net(real).argmax(1) == rl).double().mean())
    assert float(value) > 2 * 0.5 * batch_accuracy * float(ce)
    # a network no pool has trained (empty meter, or no meter at all) gets weight 0, as IDM's n == 0 case
    setattr(net, ACCURACY_METER_ATTRIBUTE, AccuracyMeter())
    assert float(SyntheticCrossEntropy(0.5)(net, real, rl, syn, sl, *segments)) == 0.0
    assert float(SyntheticCrossEntropy(0.5)(_Linear(), real, rl, syn, sl, *segments)) == 0.0
