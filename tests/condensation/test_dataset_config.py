"""Per-dataset TOML files: they reproduce the former Python tables exactly, and bad files are refused.

``tests/fixtures/dataset_configs_frozen.json`` was written once with the code of commit 431b803, when
the tables were Python dicts in ``recipes.py``: ``repr`` of the three tables and of
``resolve_config`` for every dataset x method x ipc in (None, 1, 10, 50). ``repr`` keeps types, so
the comparison below fails on a list for a tuple, an int for a float or a string IPC key.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ipmcondense.condensation import dataset_config
from ipmcondense.condensation.dataset_config import (
    DATASET_BUDGETS,
    DATASET_DEFAULTS,
    DATASET_IPC_BUDGETS,
    config_files,
    load_dataset_config,
)
from ipmcondense.condensation.recipes import COMMON_DEFAULTS, METHOD_NAMES, get_recipe, resolve_config
from ipmcondense.data import DATASET_NAMES

ROOT = Path(__file__).resolve().parents[2]
FROZEN = json.loads((ROOT / "tests" / "fixtures" / "dataset_configs_frozen.json").read_text())


def _typed(value):
    """A comparable form that keeps every type (dict key types too) and ignores dict order."""
    if hasattr(value, "items"):
        return ("mapping", sorted(((_typed(k), _typed(v)) for k, v in value.items()), key=repr))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, [_typed(v) for v in value])
    return (type(value).__name__, value)


#: Rows added after the freeze (their budgets are new entries, not changes of the frozen ones).
ADDED_METHODS = {"idc", "dcc", "wmdd", "channel_efficient", "haba", "esp", "glad", "itgan", "dcgm"}


def _frozen_rows(table):
    """``table`` without the budgets of :data:`ADDED_METHODS` (and without datasets left empty by that)."""
    out = {}
    for dataset, rows in table.items():
        kept = {m: v for m, v in rows.items() if m not in ADDED_METHODS and (dataset, m) not in TABLE_ROWS_ADDED}
        if kept or not rows:
            out[dataset] = kept
    return out


@pytest.mark.parametrize("name", ["DATASET_DEFAULTS", "DATASET_BUDGETS", "DATASET_IPC_BUDGETS"])
def test_tables_equal_the_former_python_dicts(name):
    table = getattr(dataset_config, name)
    if name != "DATASET_DEFAULTS":
        table = _frozen_rows(table)
    frozen = ast.literal_eval(FROZEN[name])
    for dataset, method in TABLE_ROWS_REMOVED.get(name, ()):
        frozen[dataset].pop(method)
    for (dataset, method), row in TABLE_ROWS_CHANGED.get(name, {}).items():
        assert frozen[dataset][method] != row
        frozen[dataset][method] = row
    assert _typed(table) == _typed(frozen)


def test_recipes_expose_the_loaded_tables():
    from ipmcondense.condensation import recipes

    assert recipes.DATASET_DEFAULTS is DATASET_DEFAULTS
    assert recipes.DATASET_BUDGETS is DATASET_BUDGETS
    assert recipes.DATASET_IPC_BUDGETS is DATASET_IPC_BUDGETS


# options added after the fixture was frozen (with defaults that keep every former computation), and the rows
# that set them on purpose
ADDED_OPTIONS = {"sinkhorn_p": 2, "steps_per_network": 1,
                 # RCIG's pool, online training, inner Adam and temperature (issue 11 item 2; used by rcig only)
                 "rcig_pool_models": 30, "rcig_online_max_steps": 15, "rcig_online_lr": 5e-5,
                 "rcig_reset_interval": 100, "rcig_inner_lr": 1e-4, "rcig_lr_temperature": 0.03,
                 # the pool sampler's IDM schedule (issue 11 item 1); the defaults keep the former (idc) behaviour
                 "loss_networks": 1, "initial_pool": 0, "pool_train_after_step": False, "pool_augment": True,
                 "accuracy_reset_interval": 100,
                 # DD's epochs over its step batches and Adam's betas (issue 11 item 5)
                 "dd_epochs": 1, "adam_betas": (0.9, 0.999),
                 # CAFE's accuracy-watched loops (issue 11 item 6)
                 "watch_window": 10, "outer_stop_spread": 0.04, "inner_stop_spread": 0.03, "watch_batch": 128,
                 "max_steps_per_network": 100, "max_inner_epochs": 100,
                 # ZCA (issue 11 item 4) and WMDD's teacher and terms (issue 11 item 7)
                 "zca": False, "zca_eps": 0.1, "pretrain_steps": 3000, "lr_pretrain": 0.025, "batch_pretrain": 3,
                 "barycenter_iterations": 100, "bn_weight": 0.01, "teacher_ce_weight": 1.0,
                 # the haba synthetic set (HaBa's scripts)
                 "n_hallucinators": 5, "hallucinator_kernel": 3, "basis_channels": None, "lr_hallucinators": None,
                 "haba_club_weight": 0.1, "haba_cls_weight": 1.0, "haba_likelihood_weight": 0.1,
                 "haba_contrast_weight": 0.1, "haba_temperature": 0.07, "lr_extractor": 0.001,
                 # the esp objective (esp_residual_weight: 0 the projection alone; the esp row sets 10)
                 "esp_rank": None, "esp_residual_weight": 0.0,
                 # kip's ConvNet kernel (issue 11 item 3)
                 "conv_depth": 3, "conv_readout": "flatten",
                 # DCGM's latent_gan synthetic set and its two extra terms (issue 18; used by dcgm only)
                 "lr_generator": 1e-4, "gan_weight": 0.1, "lr_discriminator": 2e-4, "intra_weight": 0.1,
                 "inter_weight": 0.1, "dcgm_temperature": 0.1,
                 # the engine's bfloat16 autocast and memory-format options (issue 16; off for every row)
                 "precision": "float32", "channels_last": False}
ROW_CHANGES = {"wasserstein": {"sinkhorn_p": 1},  # W_1 (issue "each row is the paper's algorithm", item 7)
               # IDM's pool: 3 initial networks, trained after the image step on plain real batches (issue 11 item 1)
               "idm": {"initial_pool": 3, "pool_train_after_step": True, "pool_augment": False},
               # DD: 10 steps x 3 epochs of learned step sizes, Adam betas (0.5, 0.999) (issue 11 item 5)
               "dd": {"dd_epochs": 3, "adam_betas": (0.5, 0.999)},
               # CAFE: the pooled embedding matched twice (f4 and f5) (issue 11 item 6)
               "cafe": {"embedding_weight": 2.0},
               # KIP: labels learned at the image rate, one Adam(0.04) over (x, y) as KIP.ipynb
               "kip": {"lr_labels": 0.04},

               # RCIG: l2_rate 5e-4 and 20 inner steps of configs_final/depth_3.txt (issue 11 item 2)
               "rcig": {"rcig_l2": 5e-4, "rcig_inner_steps": 20}}
# per-setting rows added on purpose (issue 11 item 4): MTT's per-IPC table, ZCA for RFAD and RCIG on CIFAR
TABLE_ROWS_ADDED = {(d, m) for d in ("cifar10", "cifar100") for m in ("mtt", "rfad", "rcig")}
# per-setting rows removed on purpose (issue 11 item 2): digits' IPC 10/50 ridge tuned for the old RCIG last layer
TABLE_ROWS_REMOVED = {"DATASET_IPC_BUDGETS": {("digits", "rcig")}}
# per-setting rows changed on purpose: digits' CAFE budget re-measured for the accuracy-watched loops (issue 11
# item 6): 15 iterations, and no outer_loop / inner_loop (fresh_watched does not read them)
TABLE_ROWS_CHANGED = {"DATASET_BUDGETS": {("digits", "cafe"): {"iterations": 15, "batch_real": 64, "lr_images": 0.01,
                                                                "init": "random"}}}


def test_resolved_configs_equal_the_former_ones_for_every_dataset_method_and_ipc():
    common = ast.literal_eval(FROZEN["COMMON_DEFAULTS"])
    # options added since the freeze are new keys (at defaults that keep every former computation); the old
    # ones are unchanged
    assert _typed({k: v for k, v in COMMON_DEFAULTS.items() if k in common}) == _typed(common)
    assert {k: v for k, v in COMMON_DEFAULTS.items() if k not in common}.items() >= ADDED_OPTIONS.items()
    common.update({k: v for k, v in COMMON_DEFAULTS.items() if k not in common})
    checked = 0
    for dataset in DATASET_NAMES:
        for method in (m for m in METHOD_NAMES if m not in ADDED_METHODS):
            for ipc in (None, 1, 10, 50):
                expected = dict(common)
                expected.update({k: ast.literal_eval(v) for k, v in FROZEN["resolved"][f"{dataset}/{method}/{ipc}"].items()})
                expected.update(ADDED_OPTIONS)
                expected.update(ROW_CHANGES.get(method, {}))
                if (dataset, method) in TABLE_ROWS_ADDED:  # pinned value by value in test_zca_and_mtt_table.py
                    expected.update(DATASET_BUDGETS[dataset].get(method, {}))
                    if ipc is not None:
                        expected.update(DATASET_IPC_BUDGETS[dataset].get(method, {}).get(ipc, {}))
                if (dataset, method) in TABLE_ROWS_CHANGED["DATASET_BUDGETS"]:
                    frozen_row = ast.literal_eval(FROZEN["DATASET_BUDGETS"])[dataset][method]
                    for key in frozen_row:  # back to the recipe's default, then the new row
                        expected[key] = get_recipe(method).defaults.get(key, common[key])
                    expected.update(TABLE_ROWS_CHANGED["DATASET_BUDGETS"][(dataset, method)])
                    if ipc is not None:
                        expected.update(DATASET_IPC_BUDGETS[dataset].get(method, {}).get(ipc, {}))
                got = resolve_config(get_recipe(method), dataset, ipc=ipc)
                assert _typed(got) == _typed(expected), (dataset, method, ipc)
                checked += 1
    assert checked == len(FROZEN["resolved"]) == len(DATASET_NAMES) * (len(METHOD_NAMES) - len(ADDED_METHODS)) * 4


def test_tuples_stay_tuples():
    assert type(resolve_config(get_recipe("cafe"), "digits")["lr_decay_at"]) is tuple
    assert all(type(k) is int for rows in DATASET_IPC_BUDGETS.values() for by_ipc in rows.values() for k in by_ipc)


def test_tables_are_read_only():
    with pytest.raises(TypeError):
        DATASET_BUDGETS["digits"]["dm"]["iterations"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        DATASET_IPC_BUDGETS["digits"]["dm"][1] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        DATASET_DEFAULTS["mnist"] = {}  # type: ignore[index]


def test_files_ship_as_package_data_and_name_known_datasets():
    files = config_files()
    assert {"digits", "mnist", "fashion-mnist", "cifar10"} <= set(files)
    assert set(files) <= set(DATASET_NAMES)
    for dataset, entry in files.items():
        assert load_dataset_config(dataset).dataset == dataset
        assert entry.read_text(encoding="utf-8").startswith(f"# {dataset}:")
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "configs/*.toml" in package_data["ipmcondense.condensation"]


def _write(tmp_path, text, name="toy.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_arrays_become_tuples_and_ipc_keys_integers(tmp_path):
    config = load_dataset_config(_write(tmp_path, "[defaults]\nlr_decay_at = [0.5, 0.75]\n"
                                                  "[ipc_budgets.dm.10]\niterations = 5\n"))
    assert config.dataset == "toy"
    assert config.defaults["lr_decay_at"] == (0.5, 0.75) and type(config.defaults["lr_decay_at"]) is tuple
    assert config.ipc_budgets["dm"][10]["iterations"] == 5 and config.budgets == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[defaults]\nlr = 1.0\n", r"toy\.toml: unknown hyperparameter 'lr' in \[defaults\]"),
        ("[budgets.dm]\nlr_image = 1.0\n", r"toy\.toml: unknown hyperparameter 'lr_image' in \[budgets\.dm\]"),
        ("[budgets.dmm]\niterations = 1\n", r"toy\.toml: unknown method 'dmm' in \[budgets\.dmm\]"),
        ("[ipc_budgets.dmm.1]\niterations = 1\n", r"toy\.toml: unknown method 'dmm' in \[ipc_budgets\.dmm\]"),
        ("[ipc_budgets.dm.ten]\niterations = 1\n", r"toy\.toml: IPC key 'ten' in \[ipc_budgets\.dm\] is not a positive integer"),
        ("[ipc_budgets.dm.0]\niterations = 1\n", r"IPC key '0' .* not a positive integer"),
        ("[ipc_budgets.dm.1]\nbogus = 1\n", r"unknown hyperparameter 'bogus' in \[ipc_budgets\.dm\.1\]"),
        ("[ipc_budgets.dm]\niterations = 1\n", r"IPC key 'iterations' in \[ipc_budgets\.dm\] is not a positive"),
        ("[ipc_budgets]\ndm = 1\n", r"\[ipc_budgets\.dm\] must be a table of IPC rows"),
        ("budgets = 3\n", r"\[budgets\] must be a table of methods"),
        ("[budgets]\ndm = 3\n", r"\[budgets\.dm\] must be a table of hyperparameters"),
        ("[budget.dm]\niterations = 1\n", r"toy\.toml: unknown section 'budget'"),
        ("[defaults.arch]\nname = 'x'\n", r"\[defaults\] arch must be a value"),
        ("[defaults\narch = 1\n", r"toy\.toml: not valid TOML"),
    ],
)
def test_bad_files_name_the_file_and_the_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_dataset_config(_write(tmp_path, text))


def test_unknown_dataset_and_bad_file_name(tmp_path):
    with pytest.raises(ValueError, match="no configuration file for dataset 'imagenet'"):
        load_dataset_config("imagenet")
    with pytest.raises(ValueError, match="must be named <dataset>.toml"):
        load_dataset_config(_write(tmp_path, "", name="toy.yaml"))


def test_keys_and_methods_can_be_passed_in(tmp_path):
    path = _write(tmp_path, "[budgets.new]\nknob = 1\n")
    config = load_dataset_config(path, hyperparameter_keys=["knob"], method_names=["new"])
    assert config.budgets["new"]["knob"] == 1
    with pytest.raises(ValueError, match="unknown hyperparameter 'knob'"):
        load_dataset_config(path, method_names=["new"])


def test_importing_the_loader_first_in_a_fresh_interpreter():
    code = ("import ipmcondense.condensation.dataset_config as d; "
            "assert d.DATASET_DEFAULTS['digits']['arch'] == 'convnet-d2'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
