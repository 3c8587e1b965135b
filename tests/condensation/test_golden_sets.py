"""Every registry row gives the same synthetic set, bit-for-bit on the CPU, as the code that wrote the
golden files (see :mod:`tests.condensation.golden_cases`)."""

import pytest
import torch

from .golden_cases import CASES, GOLDEN_DIR, make_buffer, run_case


@pytest.fixture(scope="module")
def buffer_dir(tmp_path_factory):
    return make_buffer(tmp_path_factory.mktemp("golden-experts"))


@pytest.mark.parametrize("name", list(CASES))
def test_row_reproduces_its_golden_set_bit_for_bit(name, buffer_dir):
    expected = torch.load(GOLDEN_DIR / f"{name}.pt", weights_only=True)
    got = run_case(name, buffer_dir)
    assert torch.equal(got["images"], expected["images"]), f"{name}: images differ from the golden set"
    assert torch.equal(got["training_labels"], expected["training_labels"])
    assert got["learning_rate"] == expected["learning_rate"]
    if CASES[name][0] not in ("random", "herding", "kcenter"):
        # the case must actually optimise: a golden set equal to its start would pin nothing
        start = run_case(name, buffer_dir, iterations=0)
        assert not torch.equal(start["images"], expected["images"]), f"{name}: the golden set never moved"
