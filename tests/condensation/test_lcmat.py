"""The lcmat row: sharpness-aware gradient matching, i.e. gradient matching plus the same matching at LCMat's
first-order worst-case perturbation of the loss gap (a row and an option on dc/dsa; not LCMat's own regulariser,
whose condensation code is unreleased)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from ipmcondense.condensation.api import condense
from ipmcondense.condensation.discrepancies import GradientMSEDiscrepancy
from ipmcondense.condensation.matching import matching_loss
from ipmcondense.condensation.objectives import lcmat_perturbation
from ipmcondense.condensation.recipes import FIRST_ORDER, get_recipe
from ipmcondense.features import GradientFeatures
from ipmcondense.nets import get_network





def test_perturbation_is_one_normalised_ascent_step_of_the_loss_gap(digits, class_batch):
    torch.manual_seed(0)
    net = get_network("convnet-w32", 1, 10, (8, 8))
    real, rl = class_batch(6, 0)
    syn, sl = class_batch(2, 1)
    moved = lcmat_perturbation(net, real, rl, syn, sl, rho=0.05)
    before = torch.cat([p.detach().flatten() for p in net.parameters()])
    after = torch.cat([p.detach().flatten() for p in moved.parameters()])
    torch.testing.assert_close((after - before).norm(), torch.tensor(0.05), rtol=1e-4, atol=0)
    # direction: the gradient of |l_T - l_S| (independent computation)
    ref = copy.deepcopy(net)
    gap = F.cross_entropy(ref(real), rl) - F.cross_entropy(ref(syn), sl)
    grads = torch.autograd.grad(gap.abs(), list(ref.parameters()))
    direction = torch.cat([g.flatten() for g in grads])
    torch.testing.assert_close((after - before) / 0.05, direction / direction.norm(), rtol=1e-3, atol=1e-6)
    # the gap grows along the step (first-order worst case)
    def gap_of(m):
        return (F.cross_entropy(m(real), rl) - F.cross_entropy(m(syn), sl)).abs()
    assert float(gap_of(moved).detach()) > float(gap_of(net).detach())


def test_regularised_loss_equals_its_definition(digits, class_batch, monkeypatch):
    from ipmcondense.condensation import objectives

    result = condense("dc", "digits", ipc=2, iterations=0, progress=False, seed=0)
    torch.manual_seed(1)
    net = get_network("convnet", 1, 10, (8, 8))
    real, rl = class_batch(4, 2)
    fm, disc = GradientFeatures(), GradientMSEDiscrepancy()
    gm = matching_loss(net, fm, disc, real, rl, result.images, result.labels).total
    moved = lcmat_perturbation(net, real, rl, result.images, result.labels, 0.1)
    gm_moved = matching_loss(moved, fm, disc, real, rl, result.images, result.labels).total
    expected = gm + 0.3 * (gm_moved - gm)
    assert float(gm_moved.detach()) != pytest.approx(float(gm.detach()))
    # the objective's value, with the same batch and no augmentation
    obj = objectives.MatchingObjective.__new__(objectives.MatchingObjective)
    obj.feature_map, obj.discrepancy, obj.extra_terms = fm, disc, []
    obj.lcmat_weight, obj.lcmat_rho = 0.3, 0.1
    obj.config = {"class_batching": True, "batch_real": 4, "precision": "float32", "channels_last": False}

    class _Ctx:
        generator = torch.Generator()
        classes = None  # one process (class-parallel runs own a block)
        augmentation = __import__("ipmcondense.augment", fromlist=["NoAugmentation"]).NoAugmentation()

        class real_batches:
            @staticmethod
            def sample(n):
                return real, rl

        class synthetic:
            labels = result.labels

            @staticmethod
            def images():
                return result.images

    obj.ctx = _Ctx
    torch.testing.assert_close(obj.loss([net]), expected, rtol=1e-5, atol=1e-6)


def test_lcmat_row_and_option(digits):
    row = get_recipe("lcmat")
    assert (row.feature_map, row.discrepancy, row.sampler, row.objective) == (
        "gradients", "gradient_cosine", "fresh_inner", "matching")
    assert row.defaults["lcmat_weight"] > 0 and row.relation_to_ipm != FIRST_ORDER
    # the row says what it is: sharpness-aware gradient matching, not LCMat's own (unreleased) regulariser
    assert row.why.startswith("sharpness-aware gradient matching") and "worst-case perturbation" in row.why
    assert "NOT LCMat's stated regulariser" in row.source
    tiny = {"batch_real": 8, "outer_loop": 2, "inner_loop": 1, "lr_images": 0.001}
    plain = condense("dsa", "digits", ipc=1, iterations=2, progress=False, seed=0, **tiny)
    option = condense("dsa", "digits", ipc=1, iterations=2, progress=False, seed=0, lcmat_weight=0.5, **tiny)
    assert option.config["lcmat_weight"] == 0.5
    assert not torch.equal(plain.images, option.images)
    with pytest.raises(ValueError, match="lcmat_weight"):
        condense("dsa", "digits", ipc=1, iterations=1, progress=False, lcmat_weight=-1.0)
