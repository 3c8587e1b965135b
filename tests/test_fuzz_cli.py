"""Fuzz test of the command line: hypothesis draws random bad calls of ``distance``, ``evaluate``,
``condense`` and ``experts`` (bad numbers, unknown names, corrupt or foreign files, files needing
pickled code, ``--out`` an existing file, ``--resume`` of a different run, ``--set`` with unknown keys
or malformed values, ``--device cuda`` without CUDA, ...) and checks the contract of each: exit code 2,
one error line that names the argument and suggests only options that exist, no traceback, nothing on
stdout and no output left behind. Exact messages of the condensation internals are not asserted."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipmcondense.cli import build_parser, main


class _Anything:
    """Pickling an instance needs code: files holding one must be refused."""


@dataclass(frozen=True)
class Case:
    command: str
    argv: tuple[str, ...]  # ``{...}`` placeholders are filled from the fixture files
    names: tuple[str, ...]  # the error names one of these (the option, its keyword or the file)


def _options(command: str) -> set[str]:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return set(sub._option_string_actions)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-cli")
    g = torch.Generator().manual_seed(0)
    paths = {"root": root}
    torch.save({"x": torch.randn(20, 3, generator=g), "y": torch.arange(20) % 2}, root / "good.pt")
    torch.save({"x": torch.randn(20, 5, generator=g), "y": torch.arange(20) % 2}, root / "wide.pt")
    torch.save({"x": torch.full((4, 3), float("nan")), "y": torch.arange(4) % 2}, root / "nan.pt")
    torch.save({"x": torch.zeros(0, 3), "y": torch.zeros(0, dtype=torch.long)}, root / "empty.pt")
    torch.save({"x": torch.randn(6, 3, generator=g), "y": torch.arange(5)}, root / "short_labels.pt")
    torch.save({"x": torch.randn(6, 3, generator=g).to(torch.complex64)}, root / "complex.pt")
    torch.save({"x": torch.zeros(3, 2), "code": _Anything()}, root / "pickled.pt")
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a zip archive")
    np.save(root / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (root / "points.csv").write_text("1,2\n3,4\n")
    (root / "existing_file").write_text("I am a file")
    (root / "not_torchscript.pt").write_bytes(b"plain bytes")
    single = root / "single_class" / "only"
    single.mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((4, 4), 40 * i, np.uint8), mode="L").save(single / f"{i}.png")
    # a real (tiny) run: its synthetic.pt and checkpoint.pt
    run = root / "run"
    assert main(["condense", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "1",
                 "--set", "checkpoint_every=1", "--no-progress", "--out", str(run)]) == 0
    synthetic = torch.load(run / "synthetic.pt", weights_only=True)
    torch.save({**synthetic, "code": _Anything()}, root / "synthetic_pickled.pt")
    torch.save({**synthetic, "format": "something-else"}, root / "synthetic_foreign.pt")
    return paths


def _bad_values(kind: str) -> st.SearchStrategy[str]:
    return {
        "nonpositive_int": st.sampled_from(["0", "-5", "-1"]),
        "negative_int": st.sampled_from(["-1", "-5"]),
        "not_int": st.sampled_from(["abc", "1.5", "", "1e3x"]),
        "nonpositive_float": st.sampled_from(["0", "-1", "nan", "inf", "-inf"]),
        "name": st.sampled_from(["nope", "mnits", "imagenet", "DM+", "digits:valid"]),
        "device": st.sampled_from(["cuda", "cuda:3", "tpu", "banana"]) if not torch.cuda.is_available()
        else st.sampled_from(["cuda:99", "tpu", "banana"]),
    }[kind]


#: (case, kind of bad value drawn by hypothesis for ``{v}``, or None)
CASES = [
    # distance
    (Case("distance", ("{good}", "{good}", "--p", "{v}"), ("p", "--p")), "nonpositive_float"),
    (Case("distance", ("{good}", "{good}", "--metric", "sinkhorn", "--blur", "{v}"), ("blur", "--blur")),
     "nonpositive_float"),
    (Case("distance", ("{good}", "{good}", "--bandwidth", "{v}"), ("bandwidth", "--bandwidth")), "nonpositive_float"),
    (Case("distance", ("{good}", "{good}", "--max-samples", "{v}"), ("max-samples", "max_samples")), "nonpositive_int"),
    (Case("distance", ("{good}", "{good}", "--image-size", "{v}"), ("image-size", "image_size")), "nonpositive_int"),
    (Case("distance", ("{good}", "{good}", "--metric", "{v}"), ("metric", "--metric")), "name"),
    (Case("distance", ("{good}", "{good}", "--device", "{v}"), ("device", "--device")), "device"),
    (Case("distance", ("{good}", "{good}", "--features", "{v}"), ("features", "--features")), "name"),
    (Case("distance", ("{good}", "{good}", "--features", "{not_torchscript}"), ("--features",)), None),
    (Case("distance", ("{good}", "{good}", "--features", "convnet"), ("--features", "images")), None),
    (Case("distance", ("{v}:train", "{good}"), ("dataset", "nope", "mnits", "imagenet", "DM+", "digits:valid")),
     "name"),
    (Case("distance", ("{good}", "{wide}"), ("dimension",)), None),
    (Case("distance", ("{nan}", "{good}"), ("nan.pt", "NaN")), None),
    (Case("distance", ("{good}", "{empty}"), ("empty.pt", "empty")), None),
    (Case("distance", ("{short_labels}", "{good}", "--labels"), ("labels", "labels_a")), None),
    (Case("distance", ("{complex}", "{good}"), ("complex", "real-valued")), None),
    (Case("distance", ("{pickled}", "{good}"), ("pickled.pt",)), None),
    (Case("distance", ("{corrupt}", "{good}"), ("corrupt.pt",)), None),
    (Case("distance", ("{objects}", "{good}"), ("objects.npy",)), None),
    (Case("distance", ("{csv}", "{good}"), ("points.csv",)), None),
    (Case("distance", ("{missing}", "{good}"), ("missing.pt",)), None),
    (Case("distance", ("imagefolder:{single_class}", "{good}"), ("single class",)), None),
    (Case("distance", ("imagefolder:{missing_dir}", "{good}"), ("missing_dir",)), None),
    # evaluate
    (Case("evaluate", ("{run}", "--models", "{v}"), ("models", "--models")), "nonpositive_int"),
    (Case("evaluate", ("{run}", "--epochs", "{v}"), ("epochs", "--epochs")), "negative_int"),
    (Case("evaluate", ("{run}", "--models", "{v}"), ("models", "--models")), "not_int"),
    (Case("evaluate", ("{run}", "--device", "{v}"), ("device", "--device")), "device"),
    (Case("evaluate", ("{run}", "--dataset", "{v}"), ("dataset", "nope", "mnits", "imagenet", "DM+",
                                                      "digits:valid")), "name"),
    (Case("evaluate", ("{run}", "--image-size", "{v}"), ("image_size", "--image-size")), "nonpositive_int"),
    (Case("evaluate", ("{missing}",), ("missing.pt",)), None),
    (Case("evaluate", ("{corrupt}",), ("corrupt.pt",)), None),
    (Case("evaluate", ("{synthetic_pickled}",), ("synthetic_pickled.pt",)), None),
    (Case("evaluate", ("{synthetic_foreign}",), ("synthetic_foreign.pt",)), None),
    # condense
    (Case("condense", ("--ipc", "{v}", "--out", "{fresh}"), ("ipc", "--ipc")), "nonpositive_int"),
    (Case("condense", ("--iterations", "{v}", "--out", "{fresh}"), ("iterations", "--iterations")), "negative_int"),
    (Case("condense", ("--ipc", "{v}", "--out", "{fresh}"), ("ipc", "--ipc")), "not_int"),
    (Case("condense", ("--method", "{v}", "--out", "{fresh}"), ("method", "--method")), "name"),
    (Case("condense", ("--dataset", "{v}", "--out", "{fresh}"), ("dataset", "--dataset")), "name"),
    (Case("condense", ("--device", "{v}", "--out", "{fresh}"), ("device", "--device")), "device"),
    (Case("condense", ("--image-size", "{v}", "--out", "{fresh}"), ("image_size", "--image-size")), "nonpositive_int"),
    (Case("condense", ("--ipc", "1000", "--out", "{fresh}"), ("ipc",)), None),
    (Case("condense", ("--out", "{existing_file}"), ("out", "existing_file")), None),
    (Case("condense", ("--out", "{run}"), ("out", "--resume", "--overwrite")), None),
    (Case("condense", ("--out", "{fresh}", "--resume"), ("resume", "no checkpoint", "--resume")), None),
    (Case("condense", ("--ipc", "2", "--iterations", "1", "--set", "checkpoint_every=1", "--out", "{run}",
                       "--resume"), ("ipc", "configuration")), None),
    (Case("condense", ("--method", "dc", "--ipc", "1", "--iterations", "1", "--out", "{run}", "--resume"),
          ("method", "configuration")), None),
    (Case("condense", ("--set", "{v}=1", "--out", "{fresh}"), ("hyperparameter",)), "name"),
    (Case("condense", ("--set", "lr_images={v}", "--out", "{fresh}"), ("lr_images",)), "nonpositive_float"),
    (Case("condense", ("--set", "batch_real={v}", "--out", "{fresh}"), ("batch_real",)), "nonpositive_int"),
    (Case("condense", ("--set", "{v}", "--out", "{fresh}"), ("--set", "KEY=VALUE")), "name"),
    (Case("condense", ("--dataset", "imagefolder:{single_class}", "--out", "{fresh}"), ("single class",)), None),
    (Case("condense", ("--dataset", "{pickled}", "--out", "{fresh}"), ("pickled.pt",)), None),
    # experts
    (Case("experts", ("--dataset", "digits", "--n-experts", "{v}", "--epochs", "1", "--out", "{fresh}"),
          ("n_experts", "--n-experts")), "nonpositive_int"),
    (Case("experts", ("--dataset", "digits", "--n-experts", "1", "--epochs", "{v}", "--out", "{fresh}"),
          ("epochs", "--epochs")), "nonpositive_int"),
    (Case("experts", ("--dataset", "{v}", "--n-experts", "1", "--epochs", "1", "--out", "{fresh}"),
          ("dataset", "--dataset")), "name"),
    (Case("experts", ("--dataset", "digits", "--n-experts", "1", "--epochs", "1", "--arch", "{v}",
                      "--out", "{fresh}"), ("network name", "arch")), "name"),
    (Case("experts", ("--dataset", "digits", "--n-experts", "1", "--epochs", "1", "--lr", "{v}",
                      "--out", "{fresh}"), ("lr", "--lr")), "nonpositive_float"),
    (Case("experts", ("--dataset", "digits", "--n-experts", "1", "--epochs", "1", "--device", "{v}",
                      "--out", "{fresh}"), ("device", "--device")), "device"),
    (Case("experts", ("--dataset", "digits", "--n-experts", "1", "--epochs", "1", "--out", "{existing_file}"),
          ("existing_file", "out", "out_dir")), None),
]


def _fill(argv: tuple[str, ...], files: dict, value: str, scratch: Path) -> list[str]:
    root = files["root"]
    names = {
        "good": root / "good.pt", "wide": root / "wide.pt", "nan": root / "nan.pt", "empty": root / "empty.pt",
        "short_labels": root / "short_labels.pt", "complex": root / "complex.pt", "pickled": root / "pickled.pt",
        "corrupt": root / "corrupt.pt", "objects": root / "objects.npy", "csv": root / "points.csv",
        "missing": root / "missing.pt", "missing_dir": root / "missing_dir", "single_class": root / "single_class",
        "existing_file": root / "existing_file", "not_torchscript": root / "not_torchscript.pt",
        "run": scratch / "run", "synthetic_pickled": root / "synthetic_pickled.pt",
        "synthetic_foreign": root / "synthetic_foreign.pt", "fresh": scratch / "fresh",
    }
    out = []
    for token in argv:
        token = token.replace("{v}", value)
        for key, path in names.items():
            token = token.replace("{" + key + "}", str(path))
        out.append(token)
    return out


_FLAG = r"(?<![\w-])--[a-z][a-z0-9-]*"


def _assert_suggested_options_exist(message: str, command: str) -> None:
    """Every ``--flag`` in ``message`` parses: flags inside a suggested ``ipmcondense CMD ...`` command
    belong to CMD, the others to ``command``."""
    for suggested, rest in re.findall(r"ipmcondense (\w+)([^`'\"]*)", message):
        for flag in re.findall(_FLAG, rest):
            assert flag in _options(suggested), (suggested, flag, message)
    remainder = re.sub(r"ipmcondense \w+[^`'\"]*", "", message)
    for flag in re.findall(_FLAG, remainder):
        assert flag in _options(command), (command, flag, message)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, kind", CASES, ids=[f"{i}-{c.command}" for i, (c, _) in enumerate(CASES)])
@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_bad_command_line_is_one_clear_error(files, case, kind, data):
    value = data.draw(_bad_values(kind)) if kind is not None else ""
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        shutil.copytree(files["root"] / "run", scratch / "run")
        before_run, before_root = _snapshot(scratch / "run"), _snapshot(files["root"])
        argv = [case.command, *_fill(case.argv, files, value, scratch)]
        if case.command in ("condense", "experts"):
            argv.append("--no-progress")
        if case.command == "condense" and "--iterations" not in argv:
            argv += ["--iterations", "1", "--ipc", "1"] if "--ipc" not in argv else ["--iterations", "1"]
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse rejects a malformed value itself (exit 2, usage + one line)
                code = exit_.code
        err = stderr.getvalue()
        assert code == 2, (argv, code, err)
        assert stdout.getvalue() == "", argv
        assert "Traceback" not in err
        lines = [line for line in err.strip().splitlines() if not line.startswith(("usage:", " "))]
        assert len(lines) == 1, (argv, err)
        message = lines[0]
        assert any(name.lower() in message.lower() for name in case.names), (argv, message)
        _assert_suggested_options_exist(message, case.command)
        # no partial output
        assert not (scratch / "fresh").exists(), argv
        assert _snapshot(scratch / "run") == before_run, argv
        assert _snapshot(files["root"]) == before_root, argv


def test_digits_synthetic_set_evaluated_on_mnist_is_refused(files, capsys):
    root = Path("/work/shared/data")
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip("MNIST files not available")
    code = main(["evaluate", str(files["root"] / "run"), "--dataset", "mnist", "--data-root", str(root),
                 "--models", "1", "--epochs", "1"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and "Traceback" not in captured.err
    assert "(1, 8, 8)" in captured.err and "mnist" in captured.err
    assert not (files["root"] / "run" / "evaluation.json").exists()
