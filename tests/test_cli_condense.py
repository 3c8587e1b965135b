"""The condense / evaluate / methods subcommands through ipmcondense.cli.main."""

import json

import torch

from ipmcondense.cli import main
from ipmcondense.condensation.recipes import METHOD_NAMES


def test_methods_json_lists_every_recipe_with_its_axes(capsys):
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(METHOD_NAMES)
    dm = rows[0]
    assert (dm["feature_map"], dm["discrepancy"], dm["sampler"], dm["augmentation"]) == (
        "embedding", "mean_embedding", "fresh", "dsa")
    assert all(r["relation_to_ipm"] for r in rows)
    assert all("synthetic" in r and "real_batches" in r and r["kind"] for r in rows)
    assert (dm["synthetic"], dm["real_batches"]) == ("pixels", "random")


def test_methods_table(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.split()[:3] == ["method", "kind", "objective"] and "synthetic" in header and "real batches" in header
    assert all(name in out for name in METHOD_NAMES)


def test_condense_then_evaluate(tmp_path, capsys):
    out = tmp_path / "digits-dm"
    code = main(["condense", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--out", str(out),
                 "--iterations", "2", "--no-progress", "--batch-real", "8"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["iterations"] == 2 and summary["method"] == "dm"
    assert (out / "synthetic.pt").exists()
    assert main(["evaluate", str(out), "--models", "1", "--epochs", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_models"] == 1 and 0.0 <= report["accuracy_mean"] <= 1.0
    assert "accuracy_std" in report and report["seeds"] == [0]
    assert (out / "evaluation.json").exists()


def test_condense_composed_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "new"
    code = main(["condense", "--method", "dc", "--feature-map", "gradients", "--discrepancy", "gradient_mse",
                 "--sampler", "fresh", "--ipc", "1", "--out", str(out), "--iterations", "1", "--no-progress",
                 "--batch-real", "4", "--set", "lr_images=0.01"])
    assert code == 0
    data = torch.load(out / "synthetic.pt", weights_only=False)
    assert data["config"]["recipe"]["sampler"] == "fresh" and data["config"]["lr_images"] == 0.01


def test_bad_input_is_one_line_on_stderr_and_exit_2(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["condense", "--method", "nope", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "method" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["condense", "--ipc", "1000", "--out", str(out), "--no-progress"]) == 2
    assert "ipc 1000" in capsys.readouterr().err
    assert not out.exists()
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "no synthetic set" in capsys.readouterr().err


def test_condense_with_both_data_axes_named(tmp_path, capsys):
    out = tmp_path / "axes"
    code = main(["condense", "--method", "dm", "--synthetic", "pixels", "--real-batches", "random", "--ipc", "1",
                 "--out", str(out), "--iterations", "1", "--no-progress", "--batch-real", "4"])
    assert code == 0
    data = torch.load(out / "synthetic.pt", weights_only=False)
    assert (data["recipe"]["synthetic"], data["recipe"]["real_batches"]) == ("pixels", "random")
    assert set(data["stored"]) >= {"pixels", "labels"}


def test_unknown_axis_names_list_the_choices(tmp_path, capsys):
    import pytest

    for flag, bad in (("--synthetic", "voxels"), ("--real-batches", "kmedoids")):
        with pytest.raises(SystemExit) as stop:
            main(["condense", "--method", "dm", flag, bad, "--out", str(tmp_path / "x"), "--no-progress"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert f"invalid choice: '{bad}'" in err and ("'pixels'" in err or "'random'" in err)
    assert not (tmp_path / "x").exists()
    assert main(["condense", "--method", "mtt", "--real-batches", "random", "--out", str(tmp_path / "y"),
                 "--no-progress"]) == 2
    assert "draws no real batches" in capsys.readouterr().err
