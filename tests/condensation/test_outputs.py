"""Run outputs: synthetic.pt holds the decoded set and the stored parameters; loaders name bad files."""

import pytest
import torch

from ipmcondense.condensation.api import condense
from ipmcondense.condensation.outputs import load_checkpoint, load_synthetic
from ipmcondense.condensation.synthetic import build_synthetic_set


def test_synthetic_file_holds_decoded_images_and_stored_parameters_that_re_decode(tmp_path):
    result = condense("dm", "digits", ipc=1, iterations=2, out=tmp_path / "run", progress=False, batch_real=4)
    data = load_synthetic(tmp_path / "run")
    assert torch.equal(data["images"], result.images) and data["synthetic"] == "pixels"
    assert data["recipe"]["synthetic"] == "pixels" and data["recipe"]["real_batches"] == "random"
    again = build_synthetic_set(data["synthetic"], torch.zeros_like(data["images"]), data["labels"], 10, {})
    again.load_state_dict(data["stored"])
    assert torch.equal(again.images().detach(), data["images"])


def test_loaders_name_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no synthetic set"):
        load_synthetic(tmp_path)
    (tmp_path / "synthetic.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt or not a torch file"):
        load_synthetic(tmp_path)
    torch.save({"format": "something else"}, tmp_path / "synthetic.pt")
    with pytest.raises(ValueError, match="not an ipmcondense synthetic set"):
        load_synthetic(tmp_path)
    torch.save({"iteration": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not an ipmcondense checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
