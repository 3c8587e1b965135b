"""The method table: rows, composition, configuration resolution."""

import pytest

from ipmcondense.condensation.recipes import (
    COMMON_DEFAULTS,
    DATASET_BUDGETS,
    RECIPES,
    MatchingRecipe,
    ObjectiveRecipe,
    SelectionRecipe,
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
    assert get_recipe("m3d").discrepancy == "mmd2" and get_recipe("wasserstein").discrepancy == "sinkhorn"
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
    mmd = compose_recipe("dm", discrepancy="mmd2")
    assert (mmd.feature_map, mmd.discrepancy, mmd.sampler, mmd.relation_to_ipm) == ("embedding", "mmd2", "fresh", "exact IPM")
    assert mmd.name == "dm+discrepancy=mmd2" and mmd.defaults == get_recipe("dm").defaults
    with pytest.warns(DeprecationWarning, match="'mmd2'"):
        assert compose_recipe("dm", discrepancy="mmd").discrepancy == "mmd2"
    new = compose_recipe("dc", discrepancy="mmd2", sampler="fresh")
    assert new.feature_map == "gradients" and new.sampler == "fresh"
    with pytest.raises(ValueError, match="needs feature map 'gradients'"):
        compose_recipe("dm", discrepancy="gradient_cosine")
    with pytest.raises(ValueError, match="unknown sampler 'teleport'"):
        compose_recipe("dm", sampler="teleport")
    with pytest.raises(ValueError, match="selection baseline"):
        compose_recipe("herding", discrepancy="mmd2")
    with pytest.raises(ValueError, match="method"):
        get_recipe("mtt-but-not-yet")


#: Rows whose synthetic set is not plain pixels.
SYNTHETIC_OF = {"idc": "multiformation", "channel_efficient": "channelwise", "haba": "haba", "glad": "latent",
                "itgan": "latent", "dcgm": "latent_gan"}


def test_the_two_data_axes_compose_and_unknown_names_list_the_choices():
    same = compose_recipe("dm", synthetic="pixels", real_batches="random")
    assert same is get_recipe("dm")
    with pytest.raises(ValueError, match="unknown synthetic set 'voxels'; expected one of: 'pixels'"):
        compose_recipe("dm", synthetic="voxels")
    with pytest.raises(ValueError, match="unknown real-batch selector 'kmedoids'; expected one of: 'random', 'dream'"):
        compose_recipe("dc", real_batches="kmedoids")
    with pytest.raises(ValueError, match="draws no real batches"):
        compose_recipe("mtt", real_batches="random")
    with pytest.raises(ValueError, match="cannot be changed"):
        compose_recipe("kip", feature_map="embedding")
    for row in RECIPES.values():
        axes = row.axes()
        assert axes["synthetic"] == SYNTHETIC_OF.get(row.name, "pixels") and "real_batches" in axes


def test_rows_are_a_tagged_union():
    kinds = {name: type(row) for name, row in RECIPES.items()}
    assert {n for n, k in kinds.items() if k is MatchingRecipe} == {
        "dm", "m3d", "wasserstein", "wmdd", "dc", "dsa", "cafe", "datadam", "lcmat", "idm", "idc", "dcc",
        "channel_efficient", "glad", "itgan", "dcgm"}
    assert {n for n, k in kinds.items() if k is ObjectiveRecipe} == {"mtt", "haba", "kip", "rfad", "dd", "esp", "rcig"}
    assert {n for n, k in kinds.items() if k is SelectionRecipe} == {"random", "herding", "kcenter"}
    assert not hasattr(get_recipe("kip"), "feature_map") and get_recipe("kip").sampler == "none"
    assert get_recipe("dd").sampler == "fresh" and get_recipe("mtt").real_batches is None
    assert get_recipe("random").is_selection and get_recipe("random").axes()["real_batches"] is None
    assert all("-" not in row.axes().values() for row in RECIPES.values())


def test_rows_are_frozen_and_validated():
    dm = get_recipe("dm")
    with pytest.raises(AttributeError):
        dm.discrepancy = "mmd2"  # type: ignore[misc]
    with pytest.raises(TypeError):
        dm.defaults["lr_images"] = 3  # type: ignore[index]
    row = dict(name="x", feature_map="embedding", discrepancy="mmd2", sampler="fresh", relation_to_ipm="exact IPM",
               why="why")
    with pytest.raises(ValueError, match="augmentation"):
        MatchingRecipe(**row, augmentation="mixup")
    with pytest.raises(ValueError, match="unknown feature map 'pixels2'"):
        MatchingRecipe(**{**row, "feature_map": "pixels2"})
    with pytest.raises(ValueError, match="sampler 'none' draws none"):
        MatchingRecipe(**{**row, "sampler": "none"})
    with pytest.raises(ValueError, match="unknown hyperparameter default"):
        MatchingRecipe(**row, defaults={"lr_imgs": 1.0})
    with pytest.raises(ValueError, match="unknown objective"):
        ObjectiveRecipe(name="y", objective="magic", relation_to_ipm="not an IPM", why="why")
    with pytest.raises(ValueError, match="real_batches None"):
        ObjectiveRecipe(name="y", objective="mtt", relation_to_ipm="not an IPM", why="why")
    with pytest.raises(ValueError, match="unknown selection"):
        SelectionRecipe(name="z", selection="best", relation_to_ipm="not an IPM", why="why")


def test_register_recipe_adds_a_row_and_refuses_clashes():
    from ipmcondense.condensation import recipes

    row = MatchingRecipe(name="dm-test-only", feature_map="embedding", discrepancy="mmd2", sampler="fresh",
                         relation_to_ipm="exact IPM", why="test")
    try:
        recipes.register_recipe(row)
        assert get_recipe("dm-test-only") is row and "dm-test-only" in RECIPES
        with pytest.raises(ValueError, match="already registered"):
            recipes.register_recipe(row)
    finally:
        recipes._RECIPES.pop("dm-test-only", None)
    with pytest.raises(ValueError, match="without '\\+'"):
        recipes.register_recipe(MatchingRecipe(**{**row.__dict__, "name": "a+b", "defaults": {}}))


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
