"""NaN and Inf in a model's weights (issue 15): named once, and never a reason to recognise less.

A NaN in one expert's weights must not make moec find fewer MoE layers (the numerical
confirmation used to compare NaN with NaN and fall back to dense); ``moec inspect`` and
``moec compile`` name the weight once on stderr; and the artifact's output is NaN exactly where
numpy's reference is: for the tokens routed to that expert.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from moec.frontend.nonfinite import nonfinite_weights
from moec.reference.evaluator import run_reference
from moec.runtime.session import ArtifactSession
from tests.helpers import EXAMPLE_MODEL, FP32_ATOL, PROGRESS, invoke, tokens_input

POISONED = "moe1/expert3/up"  # expert 3 of the second MoE layer, [H, F]
NAN_AT = [(0, 0), (5, 17), (63, 127)]


def assert_close_nan_aware(actual: np.ndarray, expected: np.ndarray, atol: float, what: str) -> None:
    """Same shape and dtype, NaN at exactly the same positions, the other values within ``atol``."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    actual_nan, expected_nan = np.isnan(actual), np.isnan(expected)
    mismatched = np.argwhere(actual_nan != expected_nan)
    assert not len(mismatched), f"{what}: NaN in one and not the other at {mismatched[:5].tolist()}"
    both = ~expected_nan
    np.testing.assert_allclose(actual[both], expected[both], rtol=0.0, atol=atol, err_msg=what)


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("moec: warning: ")]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/mixtral_tiny.onnx with 3 NaN in one expert weight of its second MoE layer."""
    model = onnx.load(EXAMPLE_MODEL)
    tensor = next(t for t in model.graph.initializer if t.name == POISONED)
    value = numpy_helper.to_array(tensor).copy()
    for row, column in NAN_AT:
        value[row, column] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(value, POISONED))
    path = tmp_path_factory.mktemp("nan") / "model.onnx"
    onnx.save(model, path)
    return path


def test_nan_weight_keeps_every_layer_and_is_named_once(poisoned: Path) -> None:
    clean = invoke("inspect", EXAMPLE_MODEL, "--json")
    result = invoke("inspect", poisoned, "--json")
    assert result.exit_code == 0, result.output
    layers = [(layer["name"], layer["experts"]) for layer in json.loads(result.stdout)["moe_layers"]]
    assert layers == [(layer["name"], layer["experts"]) for layer in json.loads(clean.stdout)["moe_layers"]]
    assert len(layers) == 2
    assert warnings_of(result.stderr) == [
        f"moec: warning: {poisoned}: initializer '{POISONED}' holds 3 NaN and 0 Inf values; "
        "outputs that read it will be NaN"
    ]


def test_nan_weight_compiles_sparse_and_gives_nan_where_the_reference_does(
    poisoned: Path, tmp_path: Path
) -> None:
    out = tmp_path / "artifact"
    result = invoke("compile", poisoned, "-o", out)
    assert result.exit_code == 0, result.output
    assert len(warnings_of(result.stderr)) == 1, result.stderr
    assert all(
        PROGRESS.match(line) or line.startswith("moec: warning: ") for line in result.stderr.splitlines()
    )
    session = ArtifactSession(out)
    assert [layer["name"] for layer in session.manifest["layers"]] == ["moe0", "moe1"]
    feeds = {"x": tokens_input(48, 64)}
    expected = run_reference(onnx.load(poisoned), feeds)["y"]
    nan_rows = np.isnan(expected).any(axis=1)
    assert 0 < nan_rows.sum() < len(nan_rows), "some tokens, not all, are routed to the NaN expert"
    assert np.isnan(expected[nan_rows]).all(), "a token routed to the NaN expert is NaN throughout"
    assert_close_nan_aware(session.run(feeds)["y"], expected, FP32_ATOL, "y vs numpy reference")


def test_nonfinite_weights_counts_weights_but_not_masks() -> None:
    """NaN anywhere and Inf among other numbers are counted; -inf fill values and 0/-inf masks,
    as exporters write them, are not weights."""
    tensors = {
        "w": np.array([np.inf, 1.0, -np.inf, np.nan], np.float32),
        "w16": np.array([2.0, np.inf], np.float16),
        "fill": np.array(-np.inf, np.float32),
        "mask": np.array([[0.0, -np.inf], [0.0, 0.0]], np.float32),
        "ints": np.array([1, 2], np.int64),
    }
    constants = [
        helper.make_node("Constant", [], ["c"], name="c0", value_floats=[np.nan, 0.0]),
        helper.make_node("Constant", [], ["d"], name="d0", value_float=-np.inf),
    ]
    graph = helper.make_graph(
        [*constants, helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(value, name) for name, value in tensors.items()],
    )
    found = list(nonfinite_weights(helper.make_model(graph)))
    assert found == [("initializer 'w'", 1, 2), ("initializer 'w16'", 0, 1), ("node 'c0' (Constant)", 1, 0)]


def test_a_command_that_reads_the_model_twice_warns_once(poisoned: Path, tmp_path: Path) -> None:
    """``compile --accuracy-budget`` loads the model for the budget search and again to compile;
    the NaN weight is still named once (each command prints each distinct warning once)."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=tokens_input(16, 64))
    profiled = invoke("profile", poisoned, "--calib", calib, "-o", tmp_path / "profile.json")
    assert profiled.exit_code == 0, profiled.output
    result = invoke(
        "compile", poisoned, "--profile", tmp_path / "profile.json", "--calib", calib,
        "--accuracy-budget", "0.5", "-o", tmp_path / "artifact",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(warnings_of(result.stderr)) == 1, result.stderr
    again = invoke("inspect", poisoned)  # the next command in this process warns again
    assert len(warnings_of(again.stderr)) == 1, again.stderr
