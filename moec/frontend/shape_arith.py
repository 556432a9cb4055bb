"""Arithmetic on run-time shape values, rewritten into the form TVM's ONNX frontend converts.

TVM's frontend represents a ``Shape`` output (and ``Slice`` / ``Gather`` / ``Concat`` / ``Cast``
of one) as a Relax ``ShapeExpr``, and refuses it as the input of any other op: ``Mul(Shape(ids)
[0:1], Shape(ids)[1:2])`` (batch × sequence, in transformers' fused-attention graphs) fails with
"Node ... cannot handle ShapeExpr inputs". A *scalar* of shape arithmetic, on the other hand,
is a ``PrimExpr`` that its elementwise converters do take. So :func:`scalarize_shape_arithmetic`
rewrites ``Op(a, b)`` on one-element shape values into ``Reshape(Op(Squeeze(a), Squeeze(b)),
[-1])``: ``Squeeze`` of a ``ShapeExpr`` is a ``PrimExpr``, the op computes on ``PrimExpr``s, and
``Reshape`` back to one element is a ``ShapeExpr`` again (:func:`moec.frontend.converters.reshape`).
The dims stay symbolic expressions of the input dims, so the graph's shapes keep their relations.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moec.frontend.fold import _static_dims, infer_types

ARITHMETIC = {"Add", "Sub", "Mul", "Div"}
#: Ops whose output TVM keeps as a ShapeExpr when their data input is one.
SHAPE_PRESERVING = {"Slice", "Gather", "Concat", "Cast", "CastLike"}


def _shape_values(graph: onnx.GraphProto) -> set[str]:
    values: set[str] = set()
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Shape" or (
            node.op_type in SHAPE_PRESERVING and node.input and node.input[0] in values
        ):
            values.update(node.output)
    return values


def scalarize_shape_arithmetic(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with arithmetic on one-element shape values done on scalars."""
    graph = model.graph
    shapes = _shape_values(graph)
    candidates = [
        n
        for n in graph.node
        if n.domain in ("", "ai.onnx") and n.op_type in ARITHMETIC and any(i in shapes for i in n.input)
    ]
    if not candidates:
        return model
    types = infer_types(model)
    constants = {t.name for t in graph.initializer}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant"}

    def dims(name: str) -> list | None:
        found = _static_dims(types.get(name))
        return None if found is None or None in found else found

    def rewritten(node: onnx.NodeProto) -> bool:
        """Inputs of at most one element, shape values or constants, one of them a 1-D shape value
        (a ShapeExpr to TVM; scalars are PrimExprs, which TVM's arithmetic already takes)."""
        shaped = [dims(name) for name in node.input]
        if any(d is None or int(np.prod(d)) != 1 for d in shaped):
            return False
        if not all(name in shapes or name in constants for name in node.input):
            return False
        return any(name in shapes and d == [1] for name, d in zip(node.input, shaped, strict=True))

    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    rewrite = {id(n) for n in candidates if rewritten(n)}
    flat_name = "moec_shape_scalar_flat"
    used_flat = False
    for node in graph.node:
        if id(node) not in rewrite:
            nodes.append(node)
            continue
        scalars = []
        for i, name in enumerate(node.input):
            scalar = f"{node.output[0]}__scalar_in{i}"
            nodes.append(
                helper.make_node("Squeeze", [name], [scalar], name=f"{node.name or scalar}__squeeze{i}")
            )
            scalars.append(scalar)
        result = f"{node.output[0]}__scalar"
        op = helper.make_node(node.op_type, scalars, [result], name=f"{node.name or result}__scalar")
        nodes.append(op)
        nodes.append(
            helper.make_node("Reshape", [result, flat_name], [node.output[0]], name=f"{op.name}__flat")
        )
        used_flat = True
    del out.graph.node[:]
    if used_flat:
        flat = numpy_helper.from_array(np.array([-1], np.int64), f"{flat_name}__value")
        out.graph.node.append(helper.make_node("Constant", [], [flat_name], name=flat_name, value=flat))
    out.graph.node.extend(nodes)
    return out
