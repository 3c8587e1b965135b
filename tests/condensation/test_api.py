"""condense()/evaluate(): every recipe end to end, outputs, bad input leaves nothing behind."""

import json
from pathlib import Path

import pytest
import torch

from ipmcondense.condensation.api import condense, evaluate
from ipmcondense.condensation.engine import build_discrepancy, build_feature_map, matching_loss
from ipmcondense.condensation.recipes import METHOD_NAMES, RECIPES
from ipmcondense.data import load_dataset
from ipmcondense.nets import get_network

# matching-objective rows (the other objectives have their own tests in test_<objective>.py)
# (lcmat: its curvature term moves S away from the plain fixed-network matching loss this test measures,
#  whose 4-iteration change is within noise on digits; tested in test_lcmat.py)
OPTIMISED = [name for name, r in RECIPES.items()
             if not r.is_selection and r.objective == "matching" and name != "lcmat"]
TINY = {"batch_real": 16, "outer_loop": 2, "inner_loop": 1, "train_steps": 1, "batch_pool": 8,
        # CAFE's accuracy-watched loops, kept short
        "watch_window": 2, "max_steps_per_network": 2, "max_inner_epochs": 1, "watch_batch": 8}
# the latent rows (glad, itgan) decode through the tiny saved generator of tests/fixtures
GENERATOR_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "generator-digits-tiny"
LATENT = {"generator": str(GENERATOR_DIR), "inversion_steps": 5}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _fixed_theta_loss(result, digits):
    """The recipe's matching loss (no extra terms, no augmentation) on two fixed random networks."""
    recipe, config = result.recipe, result.config
    fm, disc = build_feature_map(recipe, config), build_discrepancy(recipe, config)
    g = torch.Generator().manual_seed(123)
    real, rl = [], []
    for c in range(10):
        idx = torch.nonzero(digits.train_labels == c).flatten()
        real.append(digits.train_images[idx[torch.randperm(idx.numel(), generator=g)[:32]]])
        rl.append(torch.full((32,), c))
    real, rl = torch.cat(real), torch.cat(rl)
    total = 0.0
    for seed in (11, 12):
        torch.manual_seed(seed)
        net = get_network(config["arch"], 1, 10, (8, 8)).requires_grad_(fm.needs_parameter_gradients)
        total += float(matching_loss(net, fm, disc, real, rl, result.images, result.labels).total.detach())
    return total


@pytest.mark.parametrize("method", OPTIMISED)
def test_each_recipe_runs_end_to_end_and_decreases_its_loss(method, digits):
    # gradient-cosine and layer losses are very non-smooth on 8x8 digits: small steps from noise
    inner = RECIPES[method].sampler in ("fresh_inner", "fresh_watched")
    settings = {**TINY, **({"lr_images": 0.001, "init": "noise"} if inner else {}),
                **(LATENT if RECIPES[method].synthetic in ("latent", "latent_gan") else {})}
    iterations = 4 if inner else 6 if method == "wasserstein" else 12
    before = condense(method, "digits", ipc=2, iterations=0, progress=False, seed=1, **settings)
    after = condense(method, "digits", ipc=2, iterations=iterations, progress=False, seed=1, **settings)
    assert torch.equal(before.labels, after.labels)
    assert len(after.metrics["loss_history"]) == iterations
    assert all(torch.isfinite(torch.tensor(after.metrics["loss_history"])))
    assert not torch.equal(before.images, after.images)
    assert _fixed_theta_loss(after, digits) < _fixed_theta_loss(before, digits)


@pytest.mark.parametrize("method", ["random", "herding", "kcenter"])
def test_selection_baselines_write_the_same_outputs(method, tmp_path, digits):
    result = condense(method, "digits", ipc=2, out=tmp_path / "run", progress=False)
    data = torch.load(tmp_path / "run" / "synthetic.pt", weights_only=False)
    assert data["images"].shape == (20, 1, 8, 8)
    assert torch.equal(data["labels"], torch.arange(10).repeat_interleave(2))
    # selected images are real training images
    flat = digits.train_images.flatten(1)
    for img in result.images.flatten(1):
        assert (flat - img).abs().sum(1).min() < 1e-5
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "synthetic.png").exists()


def test_outputs_exist_and_load(tmp_path):
    out = tmp_path / "dm"
    result = condense("dm", "digits", ipc=2, iterations=3, out=out, progress=False, batch_real=8)
    data = torch.load(out / "synthetic.pt", weights_only=False)
    assert torch.equal(data["images"], result.images) and data["images"].shape == (20, 1, 8, 8)
    assert torch.equal(data["labels"], torch.arange(10).repeat_interleave(2))
    assert data["config"]["method"] == "dm" and data["config"]["lr_images"] == 1.0 and data["config"]["ipc"] == 2
    assert data["config"]["recipe"]["discrepancy"] == "mean_embedding"
    assert isinstance(data["version"], str)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("loss_history", "seconds", "seconds_per_iteration", "evaluations", "config"):
        assert key in metrics
    assert len(metrics["loss_history"]) == 3 and metrics["seconds_per_iteration"] > 0
    png = (out / "synthetic.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint.pt").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_evaluate_reports_and_saves(tmp_path):
    out = tmp_path / "dm"
    condense("dm", "digits", ipc=1, iterations=1, out=out, progress=False, batch_real=8)
    report = evaluate(out, models=2, epochs=2)
    assert report["n_models"] == 2 and len(report["accuracies"]) == 2 and report["seeds"] == [0, 1]
    assert 0.0 <= report["accuracy_mean"] <= 1.0 and report["accuracy_std"] >= 0.0
    assert report["protocol"]["total_epochs"] == 2
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["accuracies"] == report["accuracies"]


def test_periodic_evaluation_is_recorded(tmp_path):
    result = condense("dm", "digits", ipc=1, iterations=2, progress=False, batch_real=8, eval_every=2,
                      eval_epochs=1, eval_models=1)
    assert [e["iteration"] for e in result.metrics["evaluations"]] == [2]


def test_composition_from_python_changes_only_the_named_axis():
    result = condense("dm", "digits", ipc=1, iterations=2, progress=False, batch_real=8, discrepancy="mmd2")
    assert result.recipe.discrepancy == "mmd2" and result.recipe.feature_map == "embedding"
    assert result.config["recipe"]["name"] == "dm+discrepancy=mmd2"
    new = condense("dc", "digits", ipc=1, iterations=1, progress=False, batch_real=4, discrepancy="mmd2",
                   sampler="fresh", gradient_mode="per_sample")
    assert new.recipe.sampler == "fresh" and len(new.metrics["loss_history"]) == 1


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "dmx"}, "method"),
        ({"dataset": "imagenet-9000"}, "dataset"),
        ({"arch": "transformer-xxl"}, "network name"),
        ({"ipc": 500}, "ipc 500"),
        ({"ipc": 0}, "ipc"),
        ({"discrepancy": "gradient_cosine"}, "gradients"),
        ({"init": "dreams"}, "init"),
        ({"lr_images": -1.0}, "lr_images"),
        ({"bogus_key": 1}, "bogus_key"),
        ({"device": "cuda:7" if not torch.cuda.is_available() else "nonsense"}, "device"),
    ],
)
def test_bad_input_is_a_clear_error_and_creates_nothing(tmp_path, kwargs, message):
    out = tmp_path / "run"
    args = {"method": "dm", "dataset": "digits", "ipc": 1, "iterations": 1, "progress": False, **kwargs}
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        condense(out=out, **args)
    assert not out.exists()


def test_missing_data_root_names_the_dataset_and_creates_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="mnist"):
        condense("dm", "mnist", ipc=1, out=out, data_root=tmp_path / "empty", progress=False)
    assert not out.exists()


def test_existing_run_is_not_overwritten_silently(tmp_path):
    out = tmp_path / "run"
    condense("dm", "digits", ipc=1, iterations=1, out=out, progress=False, batch_real=4)
    before = (out / "synthetic.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        condense("dm", "digits", ipc=1, iterations=1, out=out, progress=False, batch_real=4)
    assert (out / "synthetic.pt").read_bytes() == before
    condense("dm", "digits", ipc=1, iterations=1, out=out, progress=False, batch_real=4, overwrite=True, seed=5)


def test_corrupt_checkpoint_is_a_clear_error_and_leaves_files_alone(tmp_path):
    out = tmp_path / "run"
    condense("dm", "digits", ipc=1, iterations=1, out=out, progress=False, batch_real=4)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    names = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match="checkpoint .* corrupt"):
        condense("dm", "digits", ipc=1, iterations=2, out=out, progress=False, batch_real=4, resume=True)
    assert sorted(p.name for p in out.iterdir()) == names


def test_resume_with_a_different_configuration_is_refused(tmp_path):
    out = tmp_path / "run"
    condense("dm", "digits", ipc=1, iterations=1, out=out, progress=False, batch_real=4)
    with pytest.raises(ValueError, match="lr_images"):
        condense("dm", "digits", ipc=1, iterations=2, out=out, progress=False, batch_real=4, resume=True, lr_images=3.0)


def test_resume_without_a_checkpoint_is_a_clear_error_and_writes_nothing(tmp_path):
    out = tmp_path / "fresh"
    with pytest.raises(ValueError, match="resume: there is no checkpoint to continue"):
        condense("dm", "digits", ipc=1, iterations=1, out=out, progress=False, batch_real=4, resume=True)
    assert not out.exists()
    with pytest.raises(ValueError, match="resume=True needs out"):
        condense("dm", "digits", ipc=1, iterations=1, progress=False, batch_real=4, resume=True)


def test_evaluate_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no synthetic set"):
        evaluate(tmp_path / "nothing")


def test_registry_lists_every_method():
    assert set(METHOD_NAMES) == {"dm", "m3d", "wasserstein", "wmdd", "dc", "dsa", "cafe", "datadam", "lcmat", "idm",
                                 "idc", "dcc", "channel_efficient", "glad", "itgan", "dcgm", "mtt", "haba", "esp", "kip", "rfad",
                                 "dd", "rcig", "random", "herding", "kcenter"}
