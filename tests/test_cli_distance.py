"""The ``distance`` subcommand: built-in splits, files of every kind, labels, errors."""

import json

import numpy as np
import pytest
import torch

from ipmcondense.cli import main
from ipmcondense.ipm.dataset_distance import distance
from ipmcondense.ipm.mmd import mmd


def _run(capsys, *argv):
    code = main(["distance", *argv])
    captured = capsys.readouterr()
    return code, captured


def _json(capsys, *argv):
    code, captured = _run(capsys, *argv)
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


@pytest.fixture
def labelled_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 2, 2, generator=g)
    labels = torch.arange(40) % 4
    y = torch.randn(30, 4, generator=g).numpy() + 0.5
    ly = (np.arange(30) % 4).astype(np.int64)
    paths = {
        "pt": tmp_path / "a.pt",
        "pt_xy": tmp_path / "a_xy.pt",
        "npz": tmp_path / "b.npz",
        "npy": tmp_path / "b.npy",
    }
    torch.save({"images": x, "labels": labels}, paths["pt"])
    torch.save({"x": x, "y": labels}, paths["pt_xy"])
    np.savez(paths["npz"], x=y, y=ly)
    np.save(paths["npy"], y)
    return paths, (x, labels, torch.from_numpy(y), torch.from_numpy(ly))


def test_digits_train_against_test(capsys):
    result = _json(capsys, "digits:train", "digits:test", "--max-samples", "300")
    assert set(result) == {"metric", "value", "settings", "n_a", "n_b", "seconds"}
    assert result["metric"] == "mmd"
    assert np.isfinite(result["value"]) and result["value"] > 0
    assert result["n_a"] == 300 and result["n_b"] == 300
    assert result["settings"]["max_samples"] == 300 and result["settings"]["seed"] == 0


def test_file_against_itself_is_zero(capsys, labelled_files):
    paths, _ = labelled_files
    result = _json(capsys, str(paths["pt"]), str(paths["pt"]), "--metric", "mmd")
    assert result["value"] == pytest.approx(0.0, abs=1e-6)
    result = _json(capsys, str(paths["pt"]), str(paths["pt_xy"]), "--metric", "otdd")
    assert result["value"] == pytest.approx(0.0, abs=1e-5)
    assert result["settings"]["labels"] is True


def test_values_match_the_library(capsys, labelled_files):
    paths, (x, labels, y, ly) = labelled_files
    result = _json(capsys, str(paths["pt"]), str(paths["npz"]), "--bandwidth", "1.5")
    assert result["value"] == pytest.approx(mmd(x, y, bandwidth=1.5).item(), rel=1e-5)
    assert result["settings"]["bandwidth"] == 1.5
    result = _json(capsys, str(paths["pt"]), str(paths["npz"]), "--labels", "--metric", "energy")
    expected = distance(x, y, "energy", labels, ly).item()
    assert result["value"] == pytest.approx(expected, rel=1e-5)
    result = _json(capsys, str(paths["npy"]), str(paths["npz"]), "--metric", "sliced", "--p", "1")
    assert result["value"] == pytest.approx(0.0, abs=1e-6)
    result = _json(capsys, str(paths["pt"]), str(paths["npz"]), "--metric", "otdd", "--blur", "0.1")
    assert result["value"] == pytest.approx(distance(x, y, "otdd", labels, ly, blur=0.1).item(), rel=1e-5)


def test_errors_exit_with_code_2_and_a_message(capsys, labelled_files, tmp_path):
    paths, _ = labelled_files
    code, captured = _run(capsys, str(tmp_path / "missing.pt"), str(paths["pt"]))
    assert code == 2 and "missing.pt" in captured.err and "no such file" in captured.err
    assert captured.out == ""
    code, captured = _run(capsys, "digits:valid", str(paths["pt"]))
    assert code == 2 and "split" in captured.err
    code, captured = _run(capsys, "imagenet:train", "digits:test")
    assert code == 2 and "imagenet" in captured.err
    code, captured = _run(capsys, str(paths["npy"]), str(paths["npz"]), "--labels")
    assert code == 2 and "labels" in captured.err
    code, captured = _run(
        capsys, str(paths["pt"]), str(paths["npz"]), "--metric", "wasserstein", "--kernel", "gaussian"
    )
    assert code == 2 and "kernel" in captured.err
    bad = tmp_path / "points.csv"
    bad.write_text("1,2\n")
    code, captured = _run(capsys, str(bad), str(paths["pt"]))
    assert code == 2 and ".csv" in captured.err
    with pytest.raises(SystemExit) as excinfo:  # argparse rejects a malformed bandwidth itself
        main(["distance", str(paths["pt"]), str(paths["pt"]), "--bandwidth", "wide"])
    assert excinfo.value.code == 2


def test_stdout_is_pure_json_in_a_fresh_process_even_when_pykeops_is_first_imported(tmp_path):
    """pykeops prints notices on stdout when first imported (POT and geomloss import it): they go to stderr."""
    import subprocess
    import sys

    for metric in ("otdd", "sinkhorn"):
        run = subprocess.run([sys.executable, "-m", "ipmcondense", "distance", "digits:train", "digits:test",
                              "--metric", metric], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads(run.stdout)["metric"] == metric
