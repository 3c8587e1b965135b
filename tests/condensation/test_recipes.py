"""The method table: rows, composition, configuration resolution."""

import pytest

from ipmcondense.condensation.recipes import (
    COMMON_DEFAULTS,
    DATASET_BUDGETS,
    RECIPES,
    Recipe,
    compose_recipe,
    get_recipe,
    resolve_config,
)
from ipmcondense.condensation.samplers import dc_loops, get_sampler


def test_reference_defaults():
    dm, dc, dsa = get_recipe("dm"), get_recipe("dc"), get_recipe("dsa")
    assert dict(dm.defaults) == {"iterations": 20000, "lr_images": 1.0, "batch_real": 256, "init": "real"}
    assert (dc.defaults["lr_images"], dc.defaults["init"], dc.defaults["iterations"], dc.augmentation) == (0.1, "noise", 1000, "none")
    assert (dsa.augmentation, dsa.defaults["init"]) == ("dsa", "real")
    assert get_recipe("m3d").discrepancy == "mmd" and get_recipe("wasserstein").discrepancy == "sinkhorn"
    assert get_recipe("datadam").defaults["batch_real"] == 64
    assert get_recipe("idm").defaults["ce_weight"] == 0.5 and get_recipe("cafe").defaults["inner_weight"] == 0.01


def test_dc_loops_table():
    assert [dc_loops(i) for i in (1, 10, 20, 30, 40, 50)] == [(1, 1), (10, 50), (20, 25), (30, 20), (40, 15), (50, 10)]
    sampler = get_sampler("fresh_inner", ipc=10)
    assert (sampler.outer_loop, sampler.inner_loop, sampler.lr_net) == (10, 50, 0.01)


def test_resolve_config_layers_defaults_budget_and_overrides():
    config = resolve_config(get_recipe("dm"), "digits", {"lr_images": 0.5, "init": None})
    assert config["iterations"] == DATASET_BUDGETS["digits"]["dm"]["iterations"]
    assert config["lr_images"] == 0.5 and config["init"] == DATASET_BUDGETS["digits"]["dm"]["init"]
    assert resolve_config(get_recipe("dm"), "cifar10")["iterations"] == 20000
    assert set(config) == set(COMMON_DEFAULTS)
    with pytest.raises(ValueError, match="unknown hyperparameter 'lr'"):
        resolve_config(get_recipe("dm"), "digits", {"lr": 1})


def test_every_budget_row_names_a_recipe_and_known_keys():
    for rows in DATASET_BUDGETS.values():
        for name, row in rows.items():
            assert name in RECIPES and set(row) <= set(COMMON_DEFAULTS)


def test_compose_recipe():
    assert compose_recipe("dm") is get_recipe("dm")
    mmd = compose_recipe("dm", discrepancy="mmd")
    assert (mmd.feature_map, mmd.discrepancy, mmd.sampler, mmd.relation_to_ipm) == ("embedding", "mmd", "fresh", "exact IPM")
    assert mmd.name == "dm+discrepancy=mmd" and mmd.defaults == get_recipe("dm").defaults
    new = compose_recipe("dc", discrepancy="mmd", sampler="fresh")
    assert new.feature_map == "gradients" and new.sampler == "fresh"
    with pytest.raises(ValueError, match="needs feature map 'gradients'"):
        compose_recipe("dm", discrepancy="gradient_cosine")
    with pytest.raises(ValueError, match="sampler"):
        compose_recipe("dm", sampler="teleport")
    with pytest.raises(ValueError, match="selection baseline"):
        compose_recipe("herding", discrepancy="mmd")
    with pytest.raises(ValueError, match="method"):
        get_recipe("mtt-but-not-yet")


def test_rows_are_frozen_and_validated():
    dm = get_recipe("dm")
    with pytest.raises(AttributeError):
        dm.discrepancy = "mmd"  # type: ignore[misc]
    with pytest.raises(TypeError):
        dm.defaults["lr_images"] = 3  # type: ignore[index]
    with pytest.raises(ValueError, match="augmentation"):
        Recipe("x", "embedding", "mmd", "fresh", "mixup", "exact IPM", "why")


def test_dataset_defaults_sit_below_recipe_budgets_and_overrides():
    from ipmcondense.condensation.recipes import DATASET_DEFAULTS

    assert DATASET_DEFAULTS["digits"]["arch"] == "convnet-d2"
    # every digits recipe and baseline uses the depth-2 ConvNet, unless its budget names its own network
    assert resolve_config(get_recipe("dm"), "digits")["arch"] == "convnet-d2"
    assert resolve_config(get_recipe("random"), "digits")["arch"] == "convnet-d2"
    assert resolve_config(get_recipe("mtt"), "digits")["arch"] == "convnet-d2"
    assert resolve_config(get_recipe("dm"), "digits", {"arch": "mlp"})["arch"] == "mlp"
    # other datasets keep the field's ConvNet-3
    assert resolve_config(get_recipe("dm"), "mnist")["arch"] == "convnet"
