"""Atomic writes: the destination holds the old content or the new one, never a partial file."""

import json
import os

import pytest
import torch

from ipmcondense.files import atomic_torch_save, atomic_write, atomic_write_json, atomic_write_text


def test_writes_land_complete_and_leave_no_temporary_file(tmp_path):
    atomic_write_text("hello", tmp_path / "a.txt")
    atomic_write_json({"b": [1, 2]}, tmp_path / "b.json")
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "c.pt")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert json.loads((tmp_path / "b.json").read_text()) == {"b": [1, 2]}
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["x"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.pt"]


def test_a_failing_writer_keeps_the_previous_file(tmp_path):
    target = tmp_path / "state.txt"
    atomic_write_text("good", target)

    def half_then_fail(handle):
        handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["state.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_a_read_only_folder_is_an_os_error_and_keeps_the_file(tmp_path):
    target = tmp_path / "state.txt"
    atomic_write_text("good", target)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OSError):
            atomic_write_text("new", target)
    finally:
        tmp_path.chmod(0o700)
    assert target.read_text() == "good"
