"""Fuzz test of the public distance API: hypothesis builds random bad calls (one defect each, drawn
from NaN/inf, empty, scalar, complex or ragged input, mismatched dimensions, mixed devices, bad
bandwidths, weights of the wrong length/sign/sum, labels of the wrong length or with a class absent on
one side, unknown names, out-of-range p/blur/n_projections/n_permutations) and checks that every one
ends in a ``ValueError``/``TypeError`` that names the argument -- never another exception, never NaN.
Harmless variations (non-contiguous, half/bfloat16/float64 mixes, integer points, which are documented
to be cast to floats, NumPy input, images) must give a finite value."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipmcondense import ipm

WEIGHTED = {
    "mmd2": ipm.mmd2,
    "mmd": ipm.mmd,
    "energy_distance": ipm.energy_distance,
    "wasserstein": ipm.wasserstein,
    "sliced_wasserstein": ipm.sliced_wasserstein,
    "sinkhorn_divergence": ipm.sinkhorn_divergence,
    "mean_embedding_distance": ipm.mean_embedding_distance,
}


@dataclass
class Call:
    function: str
    x: Any
    y: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    names: tuple[str, ...] = ()  # the error must name one of these (whole words)
    defect: str = ""

    def run(self) -> Any:
        if self.function == "distance":
            return ipm.distance(self.x, self.y, **self.kwargs)
        if self.function == "two_sample_test":
            return ipm.two_sample_test(self.x, self.y, **self.kwargs)
        return WEIGHTED[self.function](self.x, self.y, **self.kwargs)


def _points(draw, n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# mixed devices need a second real device (a CUDA machine); meta tensors cannot be checked for NaN
DEFECTS_OF_POINTS = ("nan", "inf", "empty", "scalar", "complex", "dim_mismatch", "string", "ragged") + (
    ("device",) if torch.cuda.is_available() else ()
)
DEFECTS_OF_WEIGHTS = ("length", "negative", "zero_sum", "nan", "two_dim", "int_dtype")
DEFECTS_OF_LABELS = ("length", "absent_class", "float", "negative", "otdd_missing")
OPTIONS = {
    "mmd2": ("bandwidth", "kernel", "estimator", "backend"),
    "mmd": ("bandwidth", "kernel", "backend"),
    "energy_distance": ("backend",),
    "wasserstein": ("p", "blur", "method", "n_projections"),
    "sliced_wasserstein": ("p", "n_projections"),
    "sinkhorn_divergence": ("p", "blur", "scaling", "backend"),
    "mean_embedding_distance": (),  # squared="yes" is accepted: see test_known_gaps below
    "distance": ("metric", "max_samples", "seed"),
    "two_sample_test": ("statistic", "n_permutations", "seed"),
}
#: every (function, kind of defect, defect) the fuzzer draws from, each equally likely
CASES = sorted(
    [(f, "points", d) for f in OPTIONS for d in DEFECTS_OF_POINTS]
    + [(f, "weights", d) for f in [*WEIGHTED, "distance"] for d in DEFECTS_OF_WEIGHTS]
    + [("distance", "labels", d) for d in DEFECTS_OF_LABELS]
    + [(f, "options", o) for f, options in OPTIONS.items() for o in options]
)


def bad_calls() -> st.SearchStrategy[Call]:
    return st.sampled_from(CASES).flatmap(_bad_call)


@st.composite
def _bad_call(draw, case: tuple[str, str, str]) -> Call:
    n, m, d = draw(st.integers(3, 7)), draw(st.integers(3, 7)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    x, y = _points(draw, n, d, seed), _points(draw, m, d, seed + 1) + 0.5
    function, kind, chosen = case
    side = draw(st.sampled_from(["x", "y"]))
    call = Call(function, x, y)
    a_name, b_name = ("a", "b") if function == "distance" else ("x", "y")
    point_name = a_name if side == "x" else b_name
    if function == "two_sample_test":
        call.kwargs["n_permutations"] = 9
    if kind == "points":
        defect = chosen
        value = x if side == "x" else y
        if defect == "nan":
            value = value.clone()
            value[draw(st.integers(0, value.shape[0] - 1)), 0] = float("nan")
        elif defect == "inf":
            value = value.clone()
            value[0, draw(st.integers(0, d - 1))] = -float("inf")
        elif defect == "empty":
            value = value[:0]
        elif defect == "scalar":
            value = value[0, 0]
        elif defect == "complex":
            value = value.to(torch.complex128)
        elif defect == "dim_mismatch":
            value = torch.cat([value, value[:, :1]], dim=1)
            point_name = ("a", "b") if function == "distance" else ("x", "y")
        elif defect == "device":
            value = value.to("cuda")
            point_name = ("a", "b", "x", "y", "device")
        elif defect == "string":
            value = "points.npy"
        elif defect == "ragged":
            value = [[1.0, 2.0], [3.0]]
        if side == "x":
            call.x = value
        else:
            call.y = value
        call.names = point_name if isinstance(point_name, tuple) else (point_name,)
        call.defect = f"{side}:{defect}"
        if function == "distance" and defect in ("nan", "inf", "empty", "complex", "scalar"):
            call.names += ("features of a", "features of b")
    elif kind == "weights":
        defect = chosen
        if function == "distance":  # the datasets' points are weighted uniformly: any weights are refused
            call.kwargs[f"{side}_weights"] = torch.ones(n if side == "x" else m)
            call.names = (f"{side}_weights",)
            call.defect = "distance:weights"
            return call
        size = n if side == "x" else m
        w = torch.full((size,), 1.0 / size, dtype=torch.float64)
        if defect == "length":
            w = torch.full((size + draw(st.integers(1, 3)),), 1.0 / size, dtype=torch.float64)
        elif defect == "negative":
            w = w.clone()
            w[0] = -0.5
        elif defect == "zero_sum":
            w = torch.zeros(size, dtype=torch.float64)
        elif defect == "nan":
            w = w.clone()
            w[-1] = float("nan")
        elif defect == "two_dim":
            w = w.view(1, -1)
        elif defect == "int_dtype":
            w = torch.ones(size, dtype=torch.int64)
        call.kwargs[f"{side}_weights"] = w
        call.names = (f"{side}_weights",)
        call.defect = f"weights:{defect}"
    elif kind == "labels":
        defect = chosen
        la, lb = torch.arange(n) % 2, torch.arange(m) % 2
        if defect == "length":
            la = torch.arange(n + 1) % 2
            names = ("labels_a",)
        elif defect == "absent_class":
            lb = torch.zeros(m, dtype=torch.long)
            names = ("class", "classes")
        elif defect == "float":
            la = la.double() + 0.5
            names = ("labels_a",)
        elif defect == "negative":
            lb = lb - 3
            names = ("labels_b", "classes")  # negative ids are ids too: the classes then differ
        else:
            call.kwargs["metric"] = "otdd"
            lb = None
            names = ("labels", "labels_b")
        call.kwargs.update(labels_a=la, labels_b=lb)
        if defect == "absent_class":
            call.kwargs["class_conditional"] = True
        call.names = names
        call.defect = f"labels:{defect}"
    else:
        option = chosen
        bad = {
            "bandwidth": st.sampled_from([0.0, -1.0, float("nan"), float("inf"), "wide", True, torch.tensor([1.0, 2.0])]),
            "kernel": st.sampled_from(["gausian", "", 3, None]),
            "estimator": st.sampled_from(["unbaised", 1, None]),
            "backend": st.sampled_from(["gpu", "KEOPS ", 0]),
            "p": st.sampled_from([0, -1, 0.5, float("nan"), float("inf"), "2", None]),
            "blur": st.sampled_from([0.0, -0.1, float("nan"), float("inf"), "small"]),
            "scaling": st.sampled_from([0.0, 1.0, 1.5, -0.5, float("nan")]),
            "method": st.sampled_from(["sinkhron", "", 2]),
            "n_projections": st.sampled_from([0, -5, 2.5, True, "10"]),
            "squared": st.sampled_from(["yes", 1.0]),
            "metric": st.sampled_from(["mmd3", "", "MMD ", None]),
            "max_samples": st.sampled_from([0, -1, 2.5, True, "10"]),
            "seed": st.sampled_from([1.5, "0", True]),
            "statistic": st.sampled_from(["t-test", "", None]),
            "n_permutations": st.sampled_from([0, -3, 1.5, True, 10**9 + 0.5]),
        }[option]
        value = draw(bad)
        if function == "wasserstein" and option in ("blur", "n_projections"):
            call.kwargs["method"] = "sinkhorn" if option == "blur" else "sliced"
        if function == "two_sample_test" and option == "seed" and value is True:
            value = 1.5
        if function == "mean_embedding_distance" and option == "squared":
            call.names = ("squared",)
        call.kwargs[option] = value
        call.names = (option,)
        call.defect = f"option:{option}={value!r}"
    return call


def _names_argument(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) for name in names)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(bad_calls())
def test_every_bad_call_is_a_clear_error_naming_the_argument(call):
    with pytest.raises((ValueError, TypeError)) as info:
        result = call.run()
        value = getattr(result, "statistic", result)
        raise AssertionError(f"{call.function} accepted {call.defect} and returned {value!r}")
    assert not isinstance(info.value, AssertionError)
    message = str(info.value)
    assert _names_argument(message, call.names), (call.function, call.defect, message)


@st.composite
def harmless_calls(draw) -> Call:
    n, m, d = draw(st.integers(2, 6)), draw(st.integers(2, 6)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    x, y = _points(draw, n, 2 * d, seed)[:, ::2], _points(draw, m, d, seed + 1) + 1.0  # x non-contiguous
    assert not x.is_contiguous()
    dtype_x = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64]))
    variant = draw(st.sampled_from(["tensor", "numpy", "images"]))
    x = (x * 3).round().to(dtype_x) if dtype_x == torch.int64 else x.to(dtype_x)
    if variant == "numpy":
        y = y.numpy()
    elif variant == "images":
        x, y = x.reshape(n, 1, d, 1), y.reshape(m, 1, d, 1)
    function = draw(st.sampled_from(sorted(WEIGHTED) + ["distance"]))
    return Call(function, x, y, defect=f"{variant}:{dtype_x}")


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(harmless_calls())
def test_harmless_variations_give_a_finite_value(call):
    value = call.run()
    assert isinstance(value, torch.Tensor) and value.dim() == 0
    assert math.isfinite(float(value)), (call.function, call.defect)


def test_squared_must_be_a_bool():  # found by the fuzzer: any truthy `squared` used to count as True
    with pytest.raises(TypeError, match="squared"):
        ipm.mean_embedding_distance(torch.zeros(3, 2), torch.ones(3, 2), squared="yes")
