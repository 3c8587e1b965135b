"""The side-by-side benchmark's plumbing (benchmarks/time_to_accuracy.py), against a fake reference checkout.

The fake reference has the real one's shape where the runner depends on it: a ``networks.py`` whose
``ConvNet.embed`` calls ``.view`` on a non-contiguous tensor (what fails with torch >= 2 after DSA), and
scripts printing ``iter = k`` every 10 iterations and the evaluation block. Nothing is timed.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("_bench_time_to_accuracy", ROOT / "benchmarks" / "time_to_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tta = _load()

_NETWORKS = """
import torch
from torch import nn

class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Identity()
        self.classifier = nn.Linear(12, 2)

    def forward(self, x):
        out = self.features(x)
        out = out.view(out.size(0), -1)
        return self.classifier(out)

    def embed(self, x):
        out = self.features(x)
        out = out.view(out.size(0), -1)
        return out
"""

_MAIN = """
import argparse, torch
from networks import ConvNet
p = argparse.ArgumentParser()
for name in ("--dataset", "--model", "--ipc", "--init", "--lr_img", "--batch_real", "--dsa_strategy", "--method",
             "--num_exp", "--data_path", "--save_path", "--epoch_eval_train"):
    p.add_argument(name)
p.add_argument("--Iteration", type=int)
p.add_argument("--num_eval", type=int)
args = p.parse_args()
x = torch.arange(24.0).reshape(2, 3, 2, 2).permute(0, 2, 3, 1)  # non-contiguous, as after the reference's DSA
net = ConvNet()
assert torch.equal(net.embed(x), x.reshape(2, -1))
print("training begins")
if args.num_eval:
    print("Evaluation")
    net(x)
    print("Evaluate %d random ConvNet, mean = 0.5 std = 0.0" % args.num_eval)
for it in range(args.Iteration + 1):
    if it % 10 == 0:
        print("iter = %04d, loss = 1.0" % it)
"""


@pytest.fixture()
def fake_reference(tmp_path):
    ref = tmp_path / "DatasetCondensation"
    ref.mkdir()
    (ref / "networks.py").write_text(textwrap.dedent(_NETWORKS))
    for script in ("main_DM.py", "main.py"):
        (ref / script).write_text(textwrap.dedent(_MAIN))
    return ref


def test_reference_runs_through_the_reshape_shim(fake_reference, tmp_path):
    setting = tta.SETTINGS["dm-ipc10"]
    seconds = tta.reference_seconds_per_iteration(setting, fake_reference, tmp_path, tmp_path, 30, 10, threads=1)
    assert seconds >= 0.0
    per_model = tta.reference_seconds_per_model(setting, fake_reference, tmp_path, tmp_path, 2, threads=1)
    assert per_model >= 0.0


def test_without_the_shim_the_fake_reference_fails_like_the_real_one(fake_reference):
    # the shim is what makes it run: the unpatched script raises the real reference's view error
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        tta.run_stamped([sys.executable, str(fake_reference / "main_DM.py"), "--Iteration", "10", "--num_eval", "0"],
                        threads=1, cwd=fake_reference)


def test_iteration_slope_uses_the_window_between_the_two_stamps():
    run = tta.StampedRun(lines=[(0.0, "loading"), (5.0, "x iter = 0000, loss"), (7.0, "x iter = 0010, loss"),
                                (9.5, "x iter = 0020, loss"), (12.5, "x iter = 0030, loss")])
    assert tta.iteration_slope(run, 10, 30) == pytest.approx((12.5 - 7.0) / 20)
    with pytest.raises(RuntimeError, match="need 10 and 40"):
        tta.iteration_slope(run, 10, 40)


def test_missing_mnist_files_name_the_data_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-root"):
        tta.prepare_reference_data(tmp_path / "nowhere", tmp_path / "scratch")


def test_command_line_checks(fake_reference, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tta.main(["--data-root", str(tmp_path), "--reference", str(tmp_path)])
    assert "not a DatasetCondensation checkout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tta.main(["--data-root", str(tmp_path), "--iterations", "25"])
    assert "multiples of 10" in capsys.readouterr().err


def test_report_lines_show_the_ratios():
    speed = {"medians": {"ours_iteration": 3.0, "reference_iteration": 6.0, "ours_model": 100.0,
                         "reference_model": 400.0},
             "ratios_ours_over_reference": {"iteration": 0.5, "model": 0.25}, "key": {"eval_epochs": 20}}
    (line,) = tta.report_lines({"dm-ipc10": {"speed": speed}})
    assert "ratio 0.50" in line and "ratio 0.25" in line and "20 epochs" in line


def test_each_process_s_cpu_time_and_page_faults_are_recorded(tmp_path):
    # a child that touches 64 MiB of fresh memory: at least 16384 fresh 4 KiB pages (fewer with huge pages)
    burn = "import array; a = bytearray(64 * 2**20); a[::4096] = b'x' * len(a[::4096]); sum(range(3 * 10**6))"
    usage: dict = {}
    run = tta._with_usage(usage, "child", tta.run_stamped, [sys.executable, "-c", burn], threads=1)
    assert run.cpu["user_seconds"] > 0.0 and run.cpu["system_seconds"] >= 0.0
    assert run.cpu["minor_page_faults"] > 1000
    assert usage["child"] == [run.cpu]
    idle = tta._with_usage(usage, "child", tta.run_stamped, [sys.executable, "-c", "pass"], threads=1)
    assert idle.cpu["minor_page_faults"] < run.cpu["minor_page_faults"]
    assert len(usage["child"]) == 2


def test_the_fast_profile_has_its_own_cells_and_keys_and_leaves_the_reference_profile_s_alone(tmp_path):
    import argparse

    setting = tta.SETTINGS["dm-ipc10"]
    common = dict(iterations=40, warmup=10, rounds=2, eval_epochs=20, threads=2, reference=None)
    reference = tta.speed_cell_key(setting, argparse.Namespace(**common, ours_profile="reference"))
    fast = tta.speed_cell_key(setting, argparse.Namespace(**common, ours_profile="fast"))
    assert "ours_profile" not in reference  # the committed reference-profile cells keep their keys
    assert fast == {**reference, "ours_profile": "fast"}
    assert tta._cell_path(setting, "speed").name == "speed.json"
    assert tta._cell_path(setting, "accuracy", "fast").name == "accuracy-fast.json"
    assert tta.OURS_PROFILES["fast"]["condense"] == ("--precision", "bfloat16")
    assert tta.OURS_PROFILES["reference"] == {"condense": (), "eval_precision": "float32"}
    accuracy = {"key": {"iterations": 250}, "reference_condensation_seconds": 1000.0, "ours_iterations": 200,
                "ours_condensation_seconds": 480.0, "wall_time_ratio": 0.48,
                "accuracy_mean": {"reference": 0.959, "ours": 0.961, "ours_evaluated_bfloat16": 0.96}}
    (line,) = tta.report_lines({"dm-ipc10 (fast)": {"accuracy": accuracy}})
    assert "ratio 0.48" in line and "96.10%" in line and "ours evaluated bfloat16 -> 96.00%" in line
