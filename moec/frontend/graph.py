"""Read-only helpers over an ONNX graph: producers, consumers, constant values."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

#: Ops that only move or retype the values of a constant: their outputs are read as constants too
#: (transformers' ``grouped_mm`` export slices each expert's weight out of the stack with
#: ``Split`` → ``Squeeze`` of a ``Transpose``).
LAYOUT_OPS = {"Transpose", "Split", "Squeeze", "Unsqueeze", "Reshape", "Slice", "Gather", "Cast", "Identity"}


class GraphIndex:
    """Lookup tables for one ONNX graph: who produces and who consumes each tensor."""

    def __init__(self, graph: onnx.GraphProto, opset: int = 18) -> None:
        self.graph = graph
        self.opset = opset
        self.initializers = {t.name: t for t in graph.initializer}
        self._layout_memo: dict[str, np.ndarray | None] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer, a ``Constant`` node's output, or a
        layout op's (:data:`LAYOUT_OPS`) output computed from those."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type in LAYOUT_OPS and node.domain in ("", "ai.onnx"):
            if name not in self._layout_memo:
                self._layout_memo[name] = self._layout_value(node, name)
            return self._layout_memo[name]
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
                if attr.name == "value_int":
                    return np.array(attr.i, dtype=np.int64)
                if attr.name == "value_ints":
                    return np.array(list(attr.ints), dtype=np.int64)
                if attr.name == "value_floats":
                    return np.array(list(attr.floats), dtype=np.float32)
        return None

    def _layout_value(self, node: onnx.NodeProto, name: str) -> np.ndarray | None:
        """``name``, an output of the layout op ``node``, evaluated when all its inputs are constant."""
        inputs = {i: self.constant(i) for i in node.input if i}
        if any(v is None for v in inputs.values()):
            return None
        graph = helper.make_graph(
            [node],
            "layout",
            [
                helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                for i, v in inputs.items()
            ],
            [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        try:
            outputs = ReferenceEvaluator(model).run(None, inputs)
        except Exception:  # noqa: BLE001 - a node the reference cannot run is not a constant
            return None
        values = dict(zip([o for o in node.output if o], outputs, strict=True))
        return np.asarray(values[name])


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The Python value of a node attribute, or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def node_label(node: onnx.NodeProto) -> str:
    """How errors name a node: its name (or first output) and op type."""
    name = node.name or (node.output[0] if node.output else "?")
    domain = f"{node.domain}::" if node.domain else ""
    return f"node '{name}' ({domain}{node.op_type})"
