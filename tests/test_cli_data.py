"""The user's own data through every command: ``--dataset imagefolder:PATH`` / a ``.npz`` file with
``--image-size`` for condense, evaluate and experts; ``distance`` between folders and built-in splits
with a feature map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ipmcondense.cli import main
from ipmcondense.data import load_dataset
from ipmcondense.ipm.mmd import mmd


def _folder(root: Path, sizes=((6, 6), (10, 8)), per_class: int = 4, seed: int = 0) -> Path:
    """Two classes of greyscale images of mixed sizes: bright squares and dark squares."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, (name, level) in enumerate((("bright", 200), ("dark", 40))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            array = np.clip(level + rng.normal(0, 20, size=(h, w)), 0, 255).astype(np.uint8)
            Image.fromarray(array, mode="L").save(root / name / f"{i}.png")
    return root


def _json(capsys, argv) -> dict:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_condense_then_evaluate_an_image_folder(tmp_path, capsys):
    folder = _folder(tmp_path / "images")
    out = tmp_path / "run"
    summary = _json(capsys, ["condense", "--method", "dm", "--dataset", f"imagefolder:{folder}", "--image-size", "8",
                             "--ipc", "1", "--iterations", "2", "--no-progress", "--out", str(out)])
    assert summary["dataset"] == f"imagefolder:{folder.resolve()}"
    synthetic = torch.load(out / "synthetic.pt", weights_only=True)
    assert synthetic["images"].shape == (2, 1, 8, 8)
    # evaluate reloads the recorded folder at the synthetic images' size
    report = _json(capsys, ["evaluate", str(out), "--models", "1", "--epochs", "2", "--augmentation", "none"])
    assert report["dataset"] == summary["dataset"] and 0.0 <= report["accuracy_mean"] <= 1.0
    # without --image-size the folder's mixed sizes are refused, naming the option
    code = main(["condense", "--dataset", f"imagefolder:{folder}", "--ipc", "1", "--iterations", "1",
                 "--no-progress", "--out", str(tmp_path / "other")])
    assert code == 2 and "--image-size" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_experts_on_an_npz_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, size=(40, 6, 6), dtype=np.uint8), y=np.arange(40) % 2)
    summary = _json(capsys, ["experts", "--dataset", str(tmp_path / "data.npz"), "--image-size", "8",
                             "--arch", "convnet-w32", "--n-experts", "1", "--epochs", "1", "--batch-size", "16",
                             "--no-progress", "--out", str(tmp_path / "buffer")])
    assert summary["dataset"] == str((tmp_path / "data.npz").resolve()) and summary["trained"] == [0]


def test_distance_between_two_folders_and_a_folder_and_a_split(tmp_path, capsys):
    a = _folder(tmp_path / "a", sizes=((8, 8),))
    b = _folder(tmp_path / "b", sizes=((8, 8),), seed=1)
    result = _json(capsys, ["distance", f"imagefolder:{a}", f"imagefolder:{b}", "--bandwidth", "2.0"])
    assert result["n_a"] == 8 and result["n_b"] == 8
    # the folders are compared in pixel space [0, 1]: the same value from the library
    xa, xb = (load_dataset(f"imagefolder:{f}") for f in (a, b))
    pixels_a = torch.cat([xa.denormalise(xa.train_images), xa.denormalise(xa.test_images)])
    pixels_b = torch.cat([xb.denormalise(xb.train_images), xb.denormalise(xb.test_images)])
    assert result["value"] == pytest.approx(mmd(pixels_a, pixels_b, bandwidth=2.0).item(), rel=1e-4)
    same = _json(capsys, ["distance", f"imagefolder:{a}", f"imagefolder:{a}"])
    assert same["value"] == pytest.approx(0.0, abs=1e-6)
    # one split of a folder against a built-in split, resized to a common size, with labels
    mixed = _json(capsys, ["distance", f"imagefolder:{a}:train", "digits:test", "--image-size", "8", "--labels",
                           "--metric", "otdd"])
    assert mixed["n_a"] == 6 and mixed["n_b"] == 360 and np.isfinite(mixed["value"])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script/save are deprecated in torch 2.9+
def test_distance_with_a_feature_map(tmp_path, capsys):
    a = _folder(tmp_path / "a", sizes=((8, 8),))
    conv = _json(capsys, ["distance", f"imagefolder:{a}", "digits:test", "--features", "convnet", "--max-samples", "50"])
    again = _json(capsys, ["distance", f"imagefolder:{a}", "digits:test", "--features", "convnet", "--max-samples", "50"])
    assert conv["value"] == again["value"] and conv["n_b"] == 50 and conv["settings"]["features"] == "convnet"
    other_seed = _json(capsys, ["distance", f"imagefolder:{a}", "digits:test", "--features", "convnet",
                                "--max-samples", "50", "--seed", "1"])
    assert other_seed["value"] != conv["value"]
    itself = _json(capsys, ["distance", "digits:test", "digits:test", "--features", "convnet", "--max-samples", "50"])
    assert itself["value"] == pytest.approx(0.0, abs=1e-6)  # the same subset on both sides

    class MeanPool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    module = tmp_path / "meanpool.pt"
    torch.jit.save(torch.jit.script(MeanPool()), str(module))
    scripted = _json(capsys, ["distance", f"imagefolder:{a}", f"imagefolder:{a}:test", "--features", str(module),
                              "--metric", "wasserstein", "--p", "1"])
    x = load_dataset(f"imagefolder:{a}")
    means_all = torch.cat([x.denormalise(x.train_images), x.denormalise(x.test_images)]).mean(dim=(2, 3))
    means_test = x.denormalise(x.test_images).mean(dim=(2, 3))
    from ipmcondense.ipm import wasserstein

    assert scripted["value"] == pytest.approx(wasserstein(means_all, means_test, p=1).item(), rel=1e-4)
