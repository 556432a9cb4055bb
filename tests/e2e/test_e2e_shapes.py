"""Token layouts: [batch, seq, hidden] inputs with dynamic batch and sequence, one build for all."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.helpers import check_artifact, compile_to, tokens_input
from tests.zoo.ms_moe import build_ms_moe_model
from tests.zoo.standard import build_sparse_dispatch_moe


def _as_batch_seq(model: onnx.ModelProto, hidden: int) -> onnx.ModelProto:
    """Wrap a ``[tokens, H]`` model as ``[batch, seq, H]`` the way exporters do (flatten, restore)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for node in graph.node:
        node.input[:] = ["x_flat" if i == "x" else i for i in node.input]
        node.output[:] = ["y_flat" if o == "y" else o for o in node.output]
    flat_shape = helper.make_tensor("flat_shape", TensorProto.INT64, [2], [-1, hidden])
    graph.initializer.append(flat_shape)
    graph.node.insert(0, helper.make_node("Reshape", ["x", "flat_shape"], ["x_flat"]))
    graph.node.extend(
        [
            helper.make_node("Shape", ["x"], ["x_shape"]),
            helper.make_node("Reshape", ["y_flat", "x_shape"], ["y"]),
        ]
    )
    del graph.input[:], graph.output[:]
    graph.input.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden]))
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden]))
    onnx.checker.check_model(out, full_check=True)
    return out


@pytest.mark.parametrize(
    "builder", [build_sparse_dispatch_moe, build_ms_moe_model], ids=["standard", "ms-moe"]
)
def test_batch_and_sequence_dims_stay_dynamic(tmp_path, builder):
    model = _as_batch_seq(builder(activation="silu", hidden=16, inter=24, experts=4, k=2), 16)
    session = compile_to(model, tmp_path)
    assert len(session.manifest["layers"]) == 1
    assert session.manifest["inputs"][0]["shape"] == ["batch", "seq", 16]
    for batch, seq in [(1, 1), (2, 3), (3, 11)]:
        x = tokens_input(seq, 16, batch=(batch,))
        check_artifact(session, model, {"x": x})


def test_ms_moe_node_on_3d_input(tmp_path):
    """onnxruntime's MoE accepts [batch, seq, H] input with 2-D router logits."""
    model = build_ms_moe_model(activation="relu", hidden=16, inter=24, experts=4, k=2)
    graph = model.graph
    router = next(n for n in graph.node if n.op_type == "MatMul")
    moe = next(n for n in graph.node if n.op_type == "MoE")
    graph.initializer.append(helper.make_tensor("flat_shape", TensorProto.INT64, [2], [-1, 16]))
    graph.node.insert(0, helper.make_node("Reshape", ["x", "flat_shape"], ["x_flat"]))
    router.input[0] = "x_flat"
    assert moe.input[0] == "x"
    del graph.input[:], graph.output[:]
    graph.input.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16]))
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16]))
    session = compile_to(model, tmp_path)
    for batch, seq in [(1, 1), (2, 5)]:
        check_artifact(session, model, {"x": tokens_input(seq, 16, batch=(batch,))})
    assert np.isfinite(session.run({"x": tokens_input(4, 16, batch=(2,))})["y"]).all()
