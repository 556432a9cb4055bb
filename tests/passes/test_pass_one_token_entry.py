"""OneTokenEntry: Before/Expected modules as literal TVMScript, then the runtime's choice of entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from moec.compiler.compile import compile_model
from moec.passes.one_token_entry import OneTokenEntry
from moec.reference.evaluator import run_reference
from moec.runtime.session import ArtifactSession
from tests.helpers import FP32_ATOL, assert_close, tokens_input


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor(("b", "s", 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor(("b", "s", 4), "float32"):
        R.func_attr({"num_input": 1})
        b = T.int64()
        s = T.int64()
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.nn.relu(y)
            R.output(z)
        return z


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor(("b", "s", 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor(("b", "s", 4), "float32"):
        R.func_attr({"num_input": 1})
        b = T.int64()
        s = T.int64()
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.nn.relu(y)
            R.output(z)
        return z

    @R.function
    def main_one_token(x: R.Tensor((1, 1, 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor((1, 1, 4), "float32"):
        # main with both symbolic input dimensions (batch and sequence) fixed to 1
        R.func_attr({"num_input": 1})
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.nn.relu(y)
            R.output(z)
        return z


@I.ir_module
class Static:
    @R.function
    def main(x: R.Tensor((2, 4), "float32"), w: R.Tensor(("k", 4), "float32")) -> R.Tensor((2, 4), "float32"):
        # a symbolic dimension in a weight, not an input: nothing to bind
        R.func_attr({"num_input": 1})
        k = T.int64()
        with R.dataflow():
            z = R.nn.relu(x)
            R.output(z)
        return z


@I.ir_module
class SymbolicHidden:
    @R.function
    def main(x: R.Tensor(("s", "h"), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor(("s", 4), "float32"):
        # the input declares its hidden size symbolic, though the weight fixes it to 4: with every
        # input dimension 1 the matmul does not type-check (the fuzzer's mutant 82 of seed 2 made
        # this an internal error)
        R.func_attr({"num_input": 1})
        s = T.int64()
        h = T.int64()
        with R.dataflow():
            y = R.matmul(x, w)
            R.output(y)
        return y


def test_adds_main_with_every_symbolic_input_dimension_fixed_to_one():
    entry = OneTokenEntry()
    tvm.ir.assert_structural_equal(entry(Before), Expected)
    assert entry.bound == ["b", "s"]


def test_static_inputs_change_nothing():
    entry = OneTokenEntry()
    tvm.ir.assert_structural_equal(entry(Static), Static)
    assert entry.bound == []


def test_shapes_that_fail_at_one_add_no_entry():
    entry = OneTokenEntry()
    tvm.ir.assert_structural_equal(entry(SymbolicHidden), SymbolicHidden)
    assert entry.bound == []


def test_modules_really_differ():
    """Guard for the tests above: Before is not Expected."""
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(Before, Expected)


def test_one_token_calls_run_the_static_entry_with_mains_results(moe_block, tmp_path: Path):
    """The artifact records the entry; a 1-token call runs it, others run ``main``; both agree
    with the numpy reference and, at one token, bit for bit with ``main``."""
    path, _ = moe_block(hidden=16, ffn=24, experts=4, top_k=2)
    session = ArtifactSession(compile_model(path, tmp_path / "artifact"))
    assert json.loads((tmp_path / "artifact" / "manifest.json").read_text())["entries"] == {
        "one_token": "main_one_token",
        "one_token_dims": ["tokens"],
    }
    model = onnx.load(str(path))
    for tokens, entry in ((1, "main_one_token"), (3, "main")):
        feeds = {"x": tokens_input(tokens, 16, seed=5)}
        assert session.entry_for(feeds) == entry
        for name, expected in run_reference(model, feeds).items():
            assert_close(session.run(feeds)[name], expected, FP32_ATOL, f"{tokens} token(s) {name}")
    one = {"x": tokens_input(1, 16, seed=5)}
    through_main = session.vm["main"](*session.input_tensors(one), *session.params).numpy()
    np.testing.assert_array_equal(session.run(one)["y"], through_main)
