"""Folding with the shapes known at compile time (``moec.frontend.fold``), and moec's converters for
the standard ops where TVM's lose shapes (``moec.frontend.converters``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from moec.frontend.fold import fold_constants
from moec.reference.evaluator import run_reference
from tests.helpers import check_artifact, compile_to


def _model(nodes: list, inputs: list, outputs: list, inits: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "fold", inputs, outputs, initializer=inits or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _shape_reshape_model(dims: list) -> onnx.ModelProto:
    """y = Reshape(x, Concat(Shape(x)[0:1], [-1]) ) * 2 computed the way exporters write it."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["first"], axis=0),
        helper.make_node("Unsqueeze", ["first", "axes"], ["first1"]),
        helper.make_node("Shape", ["x"], ["tail"], start=1),
        helper.make_node("ReduceProd", ["tail"], ["rest"], keepdims=1),
        helper.make_node("Concat", ["first1", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Mul", ["flat", "two"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        _ints("axes", [0]),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return _model(nodes, [x], [y], inits)


def test_static_shape_subgraph_folds_to_a_constant() -> None:
    model = _shape_reshape_model([2, 3, 4])
    folded = fold_constants(model)
    ops = [n.op_type for n in folded.graph.node]
    assert ops == ["Constant", "Reshape", "Mul"], ops
    target = numpy_helper.to_array(folded.graph.node[0].attribute[0].t)
    assert target.tolist() == [2, 12]
    # Float initializers stay initializers (weights); int ones became constants.
    assert [t.name for t in folded.graph.initializer] == ["two"]
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_reference(folded, {"x": x})["y"], run_reference(model, {"x": x})["y"])


def test_partly_static_shape_keeps_the_symbolic_part() -> None:
    folded = fold_constants(_shape_reshape_model(["n", 3, 4]))
    ops = [n.op_type for n in folded.graph.node]
    # Shape(x)[1:] is static (3, 4) and folds; Shape(x)[0] is the symbolic batch and stays.
    assert "ReduceProd" not in ops and ops.count("Shape") == 1, ops
    x = np.random.default_rng(1).standard_normal((5, 3, 4)).astype(np.float32)
    assert run_reference(folded, {"x": x})["y"].shape == (5, 12)


def test_int_initializer_shape_of_expand_compiles(tmp_path: Path) -> None:
    """An Expand whose shape is an int64 initializer: TVM, keeping initializers as parameters,
    read it back at run time into fresh symbolic dims the VM could not compute."""
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axes"], ["x5"]),
        helper.make_node("Expand", ["x5", "shape"], ["wide"]),
        helper.make_node("Reshape", ["wide", "flat"], ["y"]),
    ]
    inits = [_ints("axes", [2]), _ints("shape", [1, 2, 2, 8, 8]), _ints("flat", [1, 4, 8, 8])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    model = _model(nodes, [x], [y], inits)
    session = compile_to(model, tmp_path)
    check_artifact(
        session, model, {"x": np.random.default_rng(2).standard_normal((1, 2, 8, 8)).astype(np.float32)}
    )


def test_constant_of_empty_shape_compiles(tmp_path: Path) -> None:
    """ConstantOfShape of an empty shape is a scalar; TVM's converter broadcast its 1-element value to
    rank 0 ("broadcast_to expects the input shape to have the number of ndim at least ...")."""
    value = numpy_helper.from_array(np.array([0.5], np.float32), "value")
    nodes = [
        helper.make_node("ConstantOfShape", ["empty"], ["half"], value=value),
        helper.make_node("Add", ["x", "half"], ["y"]),
    ]
    empty = numpy_helper.from_array(np.zeros(0, np.int64), "empty")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 4])
    model = _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", 4])], [empty])
    session = compile_to(model, tmp_path)
    for seq in (1, 3):
        check_artifact(session, model, {"x": np.ones((1, seq, 4), np.float32)})


def test_range_of_a_symbolic_length_keeps_the_dim(tmp_path: Path) -> None:
    """positions = Range(0, seq, 1) (rotary embeddings, causal masks): x * positions must keep x's
    shape (TVM's Range gave a fresh dim, and the product lost its shape). Also Reshape of shape
    arithmetic (Add(1, seq) → [-1]) used as a Slice end."""
    nodes = [
        helper.make_node("Shape", ["x"], ["seq1"], start=0, end=1),
        helper.make_node("Squeeze", ["seq1"], ["seq"]),
        helper.make_node("Range", ["zero", "seq", "one"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["fpos"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["fpos", "axes"], ["col"]),
        helper.make_node("Mul", ["x", "col"], ["scaled"]),
        helper.make_node("Add", ["one", "seq"], ["seq_plus"]),
        helper.make_node("Reshape", ["seq_plus", "minus_one"], ["end"]),
        helper.make_node("Concat", ["scaled", "x"], ["both"], axis=0),
        helper.make_node("Slice", ["both", "one1", "end", "axes1"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        _ints("axes", [1]),
        _ints("minus_one", [-1]),
        _ints("one1", [1]),
        _ints("axes1", [0]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", 3])
    model = _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s", 3])], inits)
    session = compile_to(model, tmp_path)
    for seq in (1, 4):
        check_artifact(
            session, model, {"x": np.random.default_rng(seq).standard_normal((seq, 3)).astype(np.float32)}
        )


def test_arithmetic_on_shape_values_and_expand_of_symbolic_data(tmp_path: Path) -> None:
    """tokens = Shape(x)[0:1] * Shape(x)[1:2] (TVM: "cannot handle ShapeExpr inputs"), then
    Range(tokens) and an Expand of [b, s, 1] data to a constant [1, 1, 4] (TVM read the data's
    symbolic dims as numbers)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["b"], start=0, end=1),
        helper.make_node("Shape", ["x"], ["s"], start=1, end=2),
        helper.make_node("Mul", ["b", "s"], ["tokens1"]),
        helper.make_node("Squeeze", ["tokens1"], ["tokens"]),
        helper.make_node("Range", ["zero", "tokens", "one"], ["ids"]),
        helper.make_node("Cast", ["ids"], ["fids"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["x", "flat"], ["xf"]),
        helper.make_node("Add", ["xf", "fids"], ["sum"]),
        helper.make_node("Concat", ["b", "s", "one1"], ["back"], axis=0),
        helper.make_node("Reshape", ["sum", "back"], ["col"]),
        helper.make_node("Expand", ["col", "wide"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        _ints("flat", [-1]),
        _ints("one1", [1]),
        _ints("wide", [1, 1, 4]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s"])
    model = _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 4])], inits)
    session = compile_to(model, tmp_path)
    for shape in ((1, 1), (2, 3)):
        check_artifact(
            session, model, {"x": np.random.default_rng(7).standard_normal(shape).astype(np.float32)}
        )


def _squares_model(exponent: float, as_initializer: bool) -> onnx.ModelProto:
    """``y = x ** exponent``, the exponent an initializer or a Constant node."""
    value = numpy_helper.from_array(np.array(exponent, np.float32), "e")
    nodes = [helper.make_node("Pow", ["x", "e"], ["y"])]
    if not as_initializer:
        nodes.insert(0, helper.make_node("Constant", [], ["e"], value=value))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    return _model(nodes, [x], [y], [value] if as_initializer else [])


@pytest.mark.parametrize("as_initializer", [True, False], ids=["initializer", "constant-node"])
@pytest.mark.parametrize("exponent", [2.0, 3.0])
def test_pow_by_two_is_a_product(tmp_path: Path, exponent: float, as_initializer: bool) -> None:
    """``x ** 2`` (RMSNorm's squares) lifts to ``x * x``, not a per-element ``powf``; other
    exponents stay ``power``. Both match numpy and onnxruntime."""
    from moec.frontend.importer import import_model

    model = _squares_model(exponent, as_initializer)
    ops = {str(call.op.name) for call in _calls(import_model(model).to_relax()["main"])}
    assert ("relax.power" in ops) == (exponent != 2.0), ops
    session = compile_to(model, tmp_path)
    check_artifact(session, model, {"x": np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)})


def _calls(func) -> list:
    """Every operator call in ``func``'s body."""
    from tvm.relax.expr_functor import PyExprVisitor, visitor

    found: list = []

    @visitor
    class _Calls(PyExprVisitor):
        def visit_call_(self, call) -> None:
            if hasattr(call.op, "name"):
                found.append(call)
            super().visit_call_(call)

    _Calls().visit_expr(func.body)
    return found


def test_slice_assignment_scatter_with_a_symbolic_length(tmp_path: Path) -> None:
    """torch's ``k[..., :2] = a`` with a symbolic sequence (DeepSeek-V3's keys against its cache):
    ``ScatterND`` of a contiguous block of rows into the transposed tensor. TVM's legalisation
    compared the data's and the updates' symbolic dims by identity and failed."""
    nodes = [
        helper.make_node("Concat", ["past", "x"], ["keys"], axis=0),  # [p + s, 4]
        helper.make_node("Transpose", ["keys"], ["columns"], perm=[1, 0]),  # [4, p + s]
        helper.make_node("Concat", ["past", "x"], ["new_rows"], axis=0),
        helper.make_node("Mul", ["new_rows", "two"], ["doubled"]),
        helper.make_node("Transpose", ["doubled"], ["doubled_t"], perm=[1, 0]),
        helper.make_node("Slice", ["doubled_t", "start", "end", "axes"], ["updates"]),  # [2, p + s]
        helper.make_node("ScatterND", ["columns", "rows", "updates"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([[1], [2]], np.int64), "rows"),
        _ints("start", [1]),
        _ints("end", [3]),
        _ints("axes", [0]),
    ]
    past = helper.make_tensor_value_info("past", TensorProto.FLOAT, ["p", 4])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, "t"])
    model = _model(nodes, [past, x], [y], inits)
    session = compile_to(model, tmp_path)
    rng = np.random.default_rng(0)
    for p, s in ((0, 3), (5, 1)):
        feeds = {
            "past": rng.standard_normal((p, 4)).astype(np.float32),
            "x": rng.standard_normal((s, 4)).astype(np.float32),
        }
        check_artifact(session, model, feeds)


def test_max_of_shape_arithmetic_and_unprovable_broadcast(tmp_path: Path) -> None:
    """A sliding window of 3 over a cache: its start ``max(0, p - 3)`` is shape arithmetic (TVM's
    ``Max`` wanted tensors); the window's keys (``p - max(0, p - 3) + s`` rows) added to a mask of
    ``t`` rows broadcast two symbolic lengths TVM cannot prove equal: a run-time check keeps the
    result's shape, which the Reshape after it needs."""
    nodes = [
        helper.make_node("Shape", ["past"], ["p1"], start=0, end=1),
        helper.make_node("Squeeze", ["p1"], ["p"]),
        helper.make_node("Sub", ["p", "window"], ["over"]),
        helper.make_node("Max", ["zero", "over"], ["start"]),
        helper.make_node("Reshape", ["start", "minus_one"], ["start1"]),
        helper.make_node("Slice", ["past", "start1", "p1", "axes"], ["kept"]),
        helper.make_node("Concat", ["kept", "x"], ["keys"], axis=0),
        helper.make_node("Add", ["keys", "mask"], ["masked"]),
        helper.make_node("Reshape", ["masked", "minus_one"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(3, np.int64), "window"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        _ints("minus_one", [-1]),
        _ints("axes", [0]),
    ]
    past = helper.make_tensor_value_info("past", TensorProto.FLOAT, ["p", 2])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", 2])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["t", 2])
    model = _model(
        nodes, [past, x, mask], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k"])], inits
    )
    session = compile_to(model, tmp_path)
    rng = np.random.default_rng(1)
    for p, s in ((0, 2), (2, 1), (3, 3)):
        feeds = {
            "past": rng.standard_normal((p, 2)).astype(np.float32),
            "x": rng.standard_normal((s, 2)).astype(np.float32),
            "mask": rng.standard_normal((p + s, 2)).astype(np.float32),
        }
        check_artifact(session, model, feeds)


def _indexed_experts_model(experts: int = 3) -> onnx.ModelProto:
    """ViTPose+'s per-dataset experts as exported: sum over e of (h @ W_e + b_e) * (index == e)."""
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("Reshape", ["index", "per_sample"], ["index3"]),
        helper.make_node("Shape", ["h"], ["h_shape"]),
        helper.make_node("Slice", ["h_shape", "zero1", "two1"], ["lead"]),
        helper.make_node("Concat", ["lead", "out_dim"], ["acc_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["acc_shape"], ["acc0"]),
    ]
    inits = [_ints("per_sample", [-1, 1, 1]), _ints("zero1", [0]), _ints("two1", [2]), _ints("out_dim", [2])]
    acc = "acc0"
    for e in range(experts):
        inits += [
            numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), f"w{e}"),
            numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), f"b{e}"),
            numpy_helper.from_array(np.array(e, np.int64), f"e{e}"),
        ]
        nodes += [
            helper.make_node("Equal", ["index3", f"e{e}"], [f"is{e}"]),
            helper.make_node("MatMul", ["h", f"w{e}"], [f"hw{e}"]),
            helper.make_node("Add", [f"b{e}", f"hw{e}"], [f"lin{e}"]),
            helper.make_node("Cast", [f"is{e}"], [f"mask{e}"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"lin{e}", f"mask{e}"], [f"term{e}"]),
            helper.make_node("Add", [acc, f"term{e}"], [f"acc{e + 1}"]),
        ]
        acc = f"acc{e + 1}"
    nodes.append(helper.make_node("Identity", [acc], ["y"]))
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", 5, 4])
    index = helper.make_tensor_value_info("index", TensorProto.INT64, ["b"])
    return _model(
        nodes, [h, index], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, 2])], inits
    )


def test_input_indexed_experts_compute_one_expert_per_sample(tmp_path: Path) -> None:
    """The masked sum over every expert becomes one gathered expert per sample, exactly: indices
    outside 0..E-1 still give zeros."""
    from moec.frontend.importer import import_model

    model = _indexed_experts_model()
    imported = import_model(model)
    assert imported.indexed_experts == 1
    assert not any(n.op_type == "Equal" for n in imported.canonical.graph.node), "the masked terms are gone"
    session = compile_to(model, tmp_path)
    rng = np.random.default_rng(3)
    for index in ([0, 2, 1], [1], [2, -1, 5, 0]):
        feeds = {
            "h": rng.standard_normal((len(index), 5, 4)).astype(np.float32),
            "index": np.array(index, np.int64),
        }
        check_artifact(session, model, feeds)
