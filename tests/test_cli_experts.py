"""Tests of the ``ipmcondense experts`` command."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ipmcondense import cli
from ipmcondense.commands import experts
from ipmcondense.trajectories import ExpertBuffer, ExpertBufferMismatchError, expert_file_name

ARGS = ["--dataset", "digits", "--arch", "convnet-w32", "--n-experts", "1", "--epochs", "1",
        "--batch-size", "512", "--no-progress"]


def parse(argv):
    parser = argparse.ArgumentParser(prog="ipmcondense")
    experts.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["experts", *argv])


def test_experts_command_writes_a_buffer_and_resumes(tmp_path, capsys):
    out = tmp_path / "buffer"
    args = parse([*ARGS, "--out", str(out), "--seed", "3"])
    assert (args.lr, args.batch_size, args.no_augment, args.device) == (0.01, 512, False, None)
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dataset"] == "digits" and summary["arch"] == "convnet-w32"
    assert summary["trained"] == [0] and summary["n_experts"] == 1 and summary["epochs"] == 1
    assert summary["size_bytes"] == (out / expert_file_name(0)).stat().st_size
    buffer = ExpertBuffer(out, dataset="digits", arch="convnet-w32")
    assert buffer.trajectory(0).shape == (2, summary["num_params"])
    assert buffer.metadata["seed"] == 3 and buffer.metadata["batch_size"] == 512

    before = (out / expert_file_name(0)).read_bytes()
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trained"] == [] and summary["skipped"] == [0]
    assert (out / expert_file_name(0)).read_bytes() == before


def test_experts_command_mismatch_and_bad_dataset_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_COMMAND_MODULES", tuple(dict.fromkeys((*cli._COMMAND_MODULES, "experts"))))
    out = tmp_path / "buffer"
    assert cli.main(["experts", *ARGS, "--out", str(out), "--no-augment"]) == 0
    capsys.readouterr()
    with pytest.raises(ExpertBufferMismatchError):
        args = parse([*ARGS, "--out", str(out)])  # augmentation on: another setting
        args.func(args)
    assert cli.main(["experts", *ARGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "augment=False (buffer) vs True (requested)" in err and "Traceback" not in err
    assert cli.main(["experts", "--dataset", "nosuchdata", "--n-experts", "1", "--epochs", "1",
                     "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "nosuchdata" in capsys.readouterr().err


def test_experts_command_requires_its_arguments(capsys):
    with pytest.raises(SystemExit):
        parse(["--dataset", "digits", "--epochs", "1", "--out", "x"])  # no --n-experts
    assert "--n-experts" in capsys.readouterr().err


def test_trajectory_of_the_command_is_float32(tmp_path, capsys):
    args = parse([*ARGS, "--out", str(tmp_path)])
    args.func(args)
    capsys.readouterr()
    assert ExpertBuffer(tmp_path).trajectory(0).dtype == torch.float32
