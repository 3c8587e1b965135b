"""The shared input checks: conversion rules and the errors every public distance relies on."""

import numpy as np
import pytest
import torch

from ipmcondense.ipm._validation import (
    as_point_pair,
    as_points,
    as_weights,
    check_choice,
    check_finite_scalar,
    check_positive,
)
from ipmcondense.ipm.witness import Witness


def test_one_dimensional_input_is_points_on_the_line():
    assert as_points(torch.arange(5.0), "x").shape == (5, 1)


def test_images_are_flattened_and_integers_become_floats():
    t = as_points(np.zeros((4, 1, 3, 3), dtype=np.uint8), "x")
    assert t.shape == (4, 9) and t.dtype == torch.get_default_dtype()


def test_half_precision_is_upcast_to_float32():
    assert as_points(torch.ones(3, 2, dtype=torch.float16), "x").dtype == torch.float32


def test_tensor_keeps_its_graph():
    x = torch.randn(3, 2, requires_grad=True)
    as_points(x, "x").sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[1.0, float("nan")]]), "x contains NaN or inf"),
    (torch.tensor([[1.0, float("inf")]]), "x contains NaN or inf"),
    (torch.zeros(0, 3), "x is empty"),
    (torch.tensor(1.0), "scalar"),
    ("abc", "x must be a torch.Tensor"),
])
def test_bad_points_name_the_argument(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        as_points(bad, "x")


def test_pair_requires_matching_dimension_and_promotes_dtype():
    with pytest.raises(ValueError, match="same point dimension"):
        as_point_pair(torch.zeros(2, 3), torch.zeros(2, 4))
    a, b = as_point_pair(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64))
    assert a.dtype == b.dtype == torch.float64


def test_weights_must_be_probabilities():
    like = torch.zeros(3, 2)
    assert as_weights(None, 3, "x_weights", like) is None
    w = as_weights(torch.tensor([0.2, 0.3, 0.5]), 3, "x_weights", like)
    assert torch.allclose(w.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="x_weights must be non-negative"):
        as_weights(torch.tensor([-0.2, 0.7, 0.5]), 3, "x_weights", like)
    with pytest.raises(ValueError, match="x_weights must sum to 1"):
        as_weights(torch.tensor([0.2, 0.2, 0.5]), 3, "x_weights", like)
    with pytest.raises(ValueError, match="one weight per point"):
        as_weights(torch.tensor([0.5, 0.5]), 3, "x_weights", like)


def test_choice_and_scalar_checks():
    assert check_choice("a", ["a", "b"], "kernel") == "a"
    with pytest.raises(ValueError, match="unknown kernel 'c'"):
        check_choice("c", ["a", "b"], "kernel")
    assert check_positive(2, "blur") == 2.0
    with pytest.raises(ValueError, match="blur must be positive"):
        check_positive(0.0, "blur")
    with pytest.raises(ValueError, match="bandwidth must be finite"):
        check_finite_scalar(float("nan"), "bandwidth")
    with pytest.raises(TypeError, match="bandwidth must be a real number"):
        check_finite_scalar("1", "bandwidth")


def test_witness_checks_query_dimension_and_computes_mean_gap():
    w = Witness(lambda z: z[:, 0], metric="toy", dim=2)
    x, y = torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    assert w.mean_gap(x, y).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="dimension 2"):
        w(torch.zeros(1, 3))
