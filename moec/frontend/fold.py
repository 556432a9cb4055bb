"""Constant and shape folding of an ONNX graph, with the input shapes known at compile time.

Exporters compute shapes at run time (``Shape`` → ``Gather`` → ``Concat`` → ``Expand`` /
``Reshape`` / ``ConstantOfShape``) and store shape tensors as initializers. TVM's ONNX frontend,
keeping initializers as function parameters, then sees those shapes as run-time data: it
emits ``tensor_to_shape`` + ``match_cast`` to fresh symbolic dims that the VM cannot compute
later ("slot->value_computed"), or trips over corner cases of its converters (``ConstantOfShape``
of an empty shape: "broadcast_to expects the input shape to have the same ndim").

:func:`fold_constants` evaluates, before lifting, every node whose value the compile-time
shapes determine:

* integer / bool initializers (shape and index data, never weights) become ``Constant`` nodes,
  so TVM sees them as constants, not parameters;
* a node whose inputs are all constants is evaluated with onnx's reference implementation;
* ``Shape`` / ``Size`` of a tensor with a static (inferred) shape is a constant; with a partly
  static shape, the static entries are tracked through ``Gather`` / ``Slice`` / ``Concat`` /
  ``Unsqueeze`` / ``Squeeze`` / ``Cast`` / ``Identity``, and folded where they become static.

Folded values become ``Constant`` nodes, except large float tensors (computed from weights),
which become initializers so that they stay outside the compiled library like other weights.
Nodes nothing reads any more are removed. Shapes of ops onnx's shape inference does not know
(``moec::MoELayer``, onnxruntime contrib ops) are taken as their first input's shape where the
op is known to preserve it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from moec.frontend.graph import attribute

#: Ops never folded: random, control flow (subgraphs), and sequence/optional values.
UNFOLDABLE = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "If",
    "Loop",
    "Scan",
    "SequenceConstruct",
    "SequenceEmpty",
    "SequenceInsert",
    "SequenceErase",
    "SplitToSequence",
    "Optional",
    "OptionalGetElement",
    "OptionalHasElement",
}

#: (domain, op) → (the inputs that have the output's shape and element type, the outputs that
#: have it), for shape inference through ops onnx does not know. The skip layer norms' inputs 0
#: (the sublayer output) and 1 (the skip) have one shape; their output 3 is the sum of the two.
SHAPE_PRESERVING: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]] = {
    ("moec", "MoELayer"): ((0,), (0,)),
    ("", "SimplifiedLayerNormalization"): ((0,), (0,)),
    ("com.microsoft", "SimplifiedLayerNormalization"): ((0,), (0,)),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): ((0, 1), (0, 3)),
    ("com.microsoft", "SkipLayerNormalization"): ((0, 1), (0, 3)),
    ("com.microsoft", "RotaryEmbedding"): ((0,), (0,)),
    ("com.microsoft", "MoE"): ((0,), (0,)),
}

#: Folded float values with more elements than this become initializers (weights), not constants.
MAX_EMBEDDED_FLOATS = 4096
#: Values with more elements than this are not folded at all (they would bloat the artifact).
MAX_FOLDED_ELEMENTS = 1 << 22

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


def infer_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Every value's inferred type, taking shape-preserving custom ops into account."""
    work = _without_weights(model)
    known: dict[str, onnx.TypeProto] = {}
    for _ in range(1 + sum(1 for n in model.graph.node if (n.domain, n.op_type) in SHAPE_PRESERVING)):
        try:
            inferred = onnx.shape_inference.infer_shapes(work, strict_mode=False, data_prop=True)
        except onnx.shape_inference.InferenceError:
            # The exporter's own value_info can contradict what onnx infers (onnxruntime's CPU
            # fusions type a scalar as [1]): infer without it (keeping what this loop added).
            exported = {v.name for v in model.graph.value_info}
            added = [v for v in work.graph.value_info if v.name not in exported]
            del work.graph.value_info[:]
            work.graph.value_info.extend(added)
            inferred = onnx.shape_inference.infer_shapes(work, strict_mode=False, data_prop=True)
        known = {v.name: v.type for v in inferred.graph.value_info}
        known.update({v.name: v.type for v in inferred.graph.input})
        known.update({v.name: v.type for v in inferred.graph.output if v.type.tensor_type.HasField("shape")})
        for t in model.graph.initializer:
            known[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
        added = False
        for node in model.graph.node:
            if (node.domain, node.op_type) not in SHAPE_PRESERVING:
                continue
            sources, outputs = SHAPE_PRESERVING[node.domain, node.op_type]
            typed = [known[node.input[i]] for i in sources if i < len(node.input) and node.input[i] in known]
            for i in outputs:
                if typed and i < len(node.output) and node.output[i] and node.output[i] not in known:
                    work.graph.value_info.append(helper.make_value_info(node.output[i], typed[0]))
                    added = True
        if not added:
            break
    return known


#: Initializers with more elements than this are typed inputs for shape inference, not values.
MAX_INFERENCE_VALUE = 1024


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference: large initializers become typed graph inputs, so
    big models neither get copied whole nor hit protobuf's 2 GB limit (small ones, shape data,
    stay values for onnx's data propagation)."""
    work = onnx.ModelProto()
    graph = onnx.GraphProto()
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    inputs = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims)) <= MAX_INFERENCE_VALUE:
            graph.initializer.append(tensor)
        elif tensor.name not in inputs:
            typed = helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            graph.input.append(typed)
    work.ir_version = model.ir_version
    work.opset_import.extend(model.opset_import)
    work.functions.extend(model.functions)
    work.graph.CopyFrom(graph)
    return work


def _static_dims(ty: onnx.TypeProto | None) -> list[int | None] | None:
    """The dims of a tensor type (None for symbolic ones), or None if the rank is unknown."""
    if ty is None or not ty.HasField("tensor_type") or not ty.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in ty.tensor_type.shape.dim]


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    return np.asarray(ReferenceEvaluator(node).run(None, {})[0])


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray | None], opsets: dict[str, int]) -> list:
    names = [name for name, value in zip(node.input, inputs, strict=True) if name and value is not None]
    feeds = {
        name: value for name, value in zip(node.input, inputs, strict=True) if name and value is not None
    }
    graph = helper.make_graph(
        [node],
        "fold",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(feeds[n].dtype), None)
            for n in names
        ],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    outputs = ReferenceEvaluator(model).run(None, feeds)
    return [np.asarray(o) for o in outputs]


def _partial(node: onnx.NodeProto, values: dict, partials: dict, types: dict) -> np.ndarray | None:
    """Shape data with some entries unknown (None), as an object array, for shape-like nodes."""

    def get(name: str) -> np.ndarray | None:
        if name in values:
            return values[name].astype(object)
        return partials.get(name)

    op = node.op_type
    if op == "Shape":
        dims = _static_dims(types.get(node.input[0]))
        if dims is None:
            return None
        rank = len(dims)
        start, end = attribute(node, "start", 0), attribute(node, "end", rank)
        return np.array(dims[slice(start, end)], dtype=object)
    if op in ("Identity", "Cast"):
        return get(node.input[0])
    if op == "Gather":
        data, index = get(node.input[0]), values.get(node.input[1])
        if data is None or index is None or data.ndim != 1 or attribute(node, "axis", 0) != 0:
            return None
        return np.take(data, index.astype(np.int64), axis=0)
    if op == "Concat":
        parts = [get(name) for name in node.input]
        if any(p is None or p.ndim != 1 for p in parts):
            return None
        return np.concatenate(parts)
    if op == "Unsqueeze":
        data = get(node.input[0])
        axes = values.get(node.input[1]) if len(node.input) > 1 else attribute(node, "axes")
        if data is None or data.ndim != 0 or axes is None or list(np.ravel(axes)) not in ([0], [-1]):
            return None
        return data.reshape(1)
    if op == "Squeeze":
        data = get(node.input[0])
        if data is None or data.size != 1 or data.ndim != 1:
            return None
        return data.reshape(())
    if op == "Slice":
        data = get(node.input[0])
        if data is None or data.ndim != 1:
            return None
        args = [values.get(name) if name else None for name in node.input[1:]]
        if any(a is None for a in args[:2]) or any(
            n and a is None for n, a in zip(node.input[3:], args[2:], strict=True)
        ):
            return None
        starts, ends = args[0], args[1]
        axes = args[2] if len(args) > 2 and args[2] is not None else np.array([0])
        steps = args[3] if len(args) > 3 and args[3] is not None else np.array([1])
        if list(np.ravel(axes)) not in ([0], [-1]):
            return None
        start, end, step = (int(np.ravel(a)[0]) for a in (starts, ends, steps))
        n = data.shape[0]
        return data[slice(*slice(max(min(start, n), -n - 1), max(min(end, n), -n - 1), step).indices(n))]
    return None


def _partial_or_none(node: onnx.NodeProto, values: dict, partials: dict, types: dict) -> np.ndarray | None:
    """:func:`_partial`, or None where the node's shape data cannot be computed (an index past
    the dims, a NaN or float slice bound, an attribute of the wrong type): like an op the
    reference cannot run, such a node stays in the graph, for TVM to convert or refuse."""
    try:
        return _partial(node, values, partials, types)
    except (IndexError, ValueError, TypeError, OverflowError):
        return None


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every value the compile-time shapes determine folded."""
    graph = model.graph
    opsets = {o.domain: o.version for o in model.opset_import if o.domain in ("", "ai.onnx")}
    opsets.setdefault("", 18)
    types = infer_types(model)
    graph_inputs = {i.name for i in graph.input}
    values: dict[str, np.ndarray] = {}
    float_initializers: list[onnx.TensorProto] = []
    for tensor in graph.initializer:
        if tensor.name in graph_inputs:
            float_initializers.append(tensor)  # an overridable default: not a constant
        elif tensor.data_type in FLOAT_TYPES:
            float_initializers.append(tensor)
            values[tensor.name] = numpy_helper.to_array(tensor)
        else:
            values[tensor.name] = numpy_helper.to_array(tensor)
    weights = {t.name for t in float_initializers}
    partials: dict[str, np.ndarray] = {}

    nodes: list[onnx.NodeProto] = []
    new_initializers: list[onnx.TensorProto] = []

    def emit_constant(name: str, value: np.ndarray, hint: str) -> None:
        value = np.array(value, copy=True)  # (np.ascontiguousarray would make a scalar 1-D)
        if value.dtype.kind == "f" and value.size > MAX_EMBEDDED_FLOATS:
            new_initializers.append(numpy_helper.from_array(value, name))
            weights.add(name)
        else:
            tensor = numpy_helper.from_array(value, f"{name}__folded")
            nodes.append(helper.make_node("Constant", [], [name], name=f"{hint}__folded", value=tensor))

    for tensor in graph.initializer:
        if tensor.name not in weights:
            emit_constant(tensor.name, values[tensor.name], tensor.name)

    for node in graph.node:
        standard = node.domain in ("", "ai.onnx")
        if standard and node.op_type == "Constant":
            values[node.output[0]] = _constant_value(node)
            nodes.append(node)
            continue
        folded: list | None = None
        if standard and node.op_type not in UNFOLDABLE and not any(a.g.node for a in node.attribute):
            inputs = [values.get(name) if name else None for name in node.input]
            if all(v is not None for v, name in zip(inputs, node.input, strict=True) if name):
                try:
                    folded = _evaluate(node, inputs, opsets)
                except Exception:  # noqa: BLE001 - an op the reference cannot run stays in the graph
                    folded = None
            elif node.op_type in ("Shape", "Size"):
                dims = _static_dims(types.get(node.input[0]))
                if dims is not None and None not in dims:
                    if node.op_type == "Size":
                        folded = [np.array(int(np.prod(dims)), dtype=np.int64)]
                    else:
                        shape = _partial_or_none(node, values, partials, types)
                        folded = None if shape is None else [np.array(shape, dtype=np.int64)]
            if folded is None and len(node.output) == 1:
                partial = _partial_or_none(node, values, partials, types)
                if partial is not None:
                    partial = np.asarray(partial, dtype=object)  # np.take of one index gives the item
                    if all(v is not None for v in partial.ravel()):
                        folded = [partial.astype(np.int64)]
                    else:
                        partials[node.output[0]] = partial
        if folded is not None and all(o.size <= MAX_FOLDED_ELEMENTS for o in folded):
            for name, value in zip(node.output, folded, strict=False):
                if name:
                    values[name] = value
                    emit_constant(name, value, node.name or name)
            continue
        nodes.append(node)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(_live(nodes, [o.name for o in graph.output]))
    used = {i for n in out.graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in [*float_initializers, *new_initializers] if t.name in used or t.name in graph_inputs]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    produced = {o for n in out.graph.node for o in n.output}
    kept_info = [v for v in out.graph.value_info if v.name in produced]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept_info)
    return out


def _live(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """``nodes`` that the graph outputs depend on, in their order."""
    needed = set(outputs)
    live = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    return live[::-1]
