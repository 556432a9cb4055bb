"""The graph helpers the block finder reads through: constants computed by layout ops
(``GraphIndex.constant``), values computed from shapes (``GraphWalk.shape_producers``), the
signature that matches one layer's tensor with another's (``GraphWalk.signature``), and the
loader reading number-named dims as fixed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moec.frontend.graph import GraphIndex
from moec.frontend.loader import load_model
from moec.frontend.standard.walks import GraphWalk

OPSETS = [helper.make_opsetid("", 18)]


def _walk(nodes: list, inputs: list, outputs: list, inits: list) -> GraphWalk:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return GraphWalk(GraphIndex(graph), OPSETS)


def _two_layers() -> GraphWalk:
    """Two 'layers': logits = x @ W_i, top-2 indices flattened; layer 1's count of them read off
    layer 0's indices (as onnxruntime's CPU fusions merge equal shape computations)."""
    nodes = []
    inits = [
        numpy_helper.from_array(np.array([2], np.int64), "k"),
        numpy_helper.from_array(np.array([-1], np.int64), "flat"),
    ]
    for i in range(2):
        weight = np.random.default_rng(i).standard_normal((4, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes += [
            helper.make_node("MatMul", ["x", f"w{i}"], [f"logits{i}"]),
            helper.make_node("TopK", [f"logits{i}", "k"], [f"values{i}", f"indices{i}"]),
            helper.make_node("Reshape", [f"indices{i}", "flat"], [f"picked{i}"]),
        ]
    nodes += [
        helper.make_node("Shape", ["picked0"], ["count"]),
        helper.make_node("Expand", ["flat", "count"], ["ones"]),
        helper.make_node("Add", ["picked1", "ones"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    return _walk(nodes, [x], [y], inits)


def test_signature_matches_each_layers_tensor_computed_the_same_way() -> None:
    walk = _two_layers()
    assert walk.signature("picked0") == walk.signature("picked1")
    assert walk.signature("indices0") == walk.signature("indices1")
    assert walk.signature("picked0") != walk.signature("indices0")
    assert walk.signature("values0") != walk.signature("indices0")  # another output of the node


def test_shape_producers_read_shapes_only() -> None:
    walk = _two_layers()
    nodes, sources = walk.shape_producers("ones")
    assert [n.op_type for n in nodes] == ["Shape", "Expand"] and sources == {"picked0"}
    assert walk.shape_producers("picked1") is None  # data, not a shape
    assert walk.shape_producers("flat") == ([], set())  # a constant


def test_layout_ops_on_constants_are_constants() -> None:
    """One expert's matrix sliced out of a stack (transformers' grouped_mm export)."""
    stack = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nodes = [
        helper.make_node("Transpose", ["stack"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Split", ["t"], ["e0", "e1"], axis=0, num_outputs=2),
        helper.make_node("Squeeze", ["e1", "zero"], ["w1"]),
        helper.make_node("MatMul", ["x", "w1"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(stack, "stack"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    walk = _walk(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    np.testing.assert_array_equal(walk.index.constant("w1"), stack[1].T)
    assert walk.index.constant("y") is None


def test_number_named_dims_load_as_fixed(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "8"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "8"])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=OPSETS), path)
    dims = load_model(path).graph.input[0].type.tensor_type.shape.dim
    assert (dims[0].dim_param, dims[1].dim_value) == ("batch", 8)
