"""Lifts an ONNX graph (with canonical ``moec::MoELayer`` nodes) into a Relax IRModule.

Everything except the MoE layers goes through TVM's own ONNX frontend. Each MoE layer
becomes a Relax function ``<layer>`` (attribute ``moec.layer`` holds its JSON description)
called from ``main``; its body calls our sparse TIR kernels (as specs, built in the schedule
phase): route → (capacity) → group →
expert_up → expert_down. Weights stay function parameters (``keep_params_in_input``) so they can be
stored outside the compiled library.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys

import numpy as np
import onnx
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

from moec.canonical.layer import MoELayer
from moec.errors import MoecError, first_line
from moec.frontend.contrib_ops import converter as contrib_converter
from moec.frontend.converters import CONVERTERS as OWN_CONVERTERS
from moec.frontend.rewrite import LAYER_OP
from moec.kernels import kernel_spec
from moec.kernels.config import (
    CapacityConfig,
    ExpertDownConfig,
    ExpertUpConfig,
    GroupConfig,
    KernelConfig,
    RouteConfig,
)


def layer_kernel_configs(layer: MoELayer) -> dict[str, KernelConfig]:
    """The kernels an MoE layer calls, by kind, in call order (``capacity`` only with one)."""
    E, K, H, F = layer.num_experts, layer.top_k, layer.hidden, layer.ffn
    bias = layer.selection_bias
    configs: dict[str, KernelConfig] = {
        "route": RouteConfig(
            num_experts=E,
            top_k=K,
            scoring=layer.scoring,
            normalize=layer.normalize,
            tie_break=layer.tie_break,
            selection_bias=None if bias is None else tuple(float(v) for v in bias),
            groups=layer.groups,
            top_groups=layer.top_groups,
            scale=layer.scale,
            jitter_eps=layer.jitter_eps if layer.scoring == "sparsemixer" else 0.0,
        )
    }
    if layer.capacity is not None:
        configs["capacity"] = CapacityConfig(num_experts=E, top_k=K, capacity=layer.capacity)
    configs["group"] = GroupConfig(num_experts=E, top_k=K)
    configs["expert_up"] = ExpertUpConfig(
        num_experts=E,
        hidden=H,
        ffn=F,
        top_k=K,
        activation=layer.activation,
        gated=layer.gated,
        alpha=layer.alpha,
        beta=layer.beta,
        limit=layer.limit,
    )
    configs["expert_down"] = ExpertDownConfig(num_experts=E, hidden=H, ffn=F, top_k=K)
    return configs


def kernel_call(kernel: relax.GlobalVar, config: KernelConfig, args: list[relax.Expr], rows) -> relax.Call:
    """``call_tir`` of a kernel, its output types taken from the config's signature over ``rows``."""
    outputs = [relax.TensorType(b.shape, b.dtype) for b in config.outputs(rows)]
    return relax.call_tir(kernel, args, outputs if len(outputs) > 1 else outputs[0])


def build_layer_function(
    bb: relax.BlockBuilder, layer: MoELayer, weight_types: list[relax.TensorType]
) -> relax.GlobalVar:
    """Adds ``layer``'s kernel specs and its Relax function to ``bb``'s module; returns the function.

    The kernels are specs (signature and config, no code): the schedule phase builds them for the
    target. The function takes ``x`` ``[n, H]`` and ``logits`` ``[n, E]``, or, with an expert
    capacity, ``[r, s, H]`` and ``[r, s, E]``: ``r`` sequences of ``s`` tokens, each counted on
    its own.
    """
    E, K, H = layer.num_experts, layer.top_k, layer.hidden
    prefix = layer.name
    configs = layer_kernel_configs(layer)
    kernels = {kind: bb.add_func(kernel_spec(config), f"{prefix}_{kind}") for kind, config in configs.items()}

    if layer.capacity is None:
        n = tvm.tirx.Var("n", "int64")
        rows: tuple = (n,)
    else:
        rows = (tvm.tirx.Var("r", "int64"), tvm.tirx.Var("s", "int64"))
        n = rows[0] * rows[1]

    def call(kind: str, args: list[relax.Expr]) -> relax.Expr:
        return lb.emit(kernel_call(kernels[kind], configs[kind], args, rows if kind == "capacity" else (n,)))

    x_in = relax.Var("x", relax.TensorType((*rows, H), "float32"))
    logits_in = relax.Var("logits", relax.TensorType((*rows, E), "float32"))
    # named by role: passes find a layer's weights by name (passes.signature.layer_weight_slots)
    weights = [relax.Var(role, ty) for role, ty in zip(layer.weight_roles, weight_types, strict=True)]
    by_role = {w.name: w for w in weights}
    lb = relax.BlockBuilder()
    # No dataflow block: our kernels are opaque to the fusion passes that inspect those.
    with lb.function(prefix, params=[x_in, logits_in, *weights], private=True):
        x, logits = x_in, logits_in
        if layer.capacity is not None:
            x = lb.emit(relax.op.reshape(x_in, (n, H)))
            logits = lb.emit(relax.op.reshape(logits_in, (n, E)))
        routed = call("route", [logits])
        index, routing_weight = relax.TupleGetItem(routed, 0), relax.TupleGetItem(routed, 1)
        if layer.capacity is not None:
            by_sequence = [lb.emit(relax.op.reshape(v, (*rows, K))) for v in (index, routing_weight)]
            limited = call("capacity", by_sequence)
            index, routing_weight = (
                lb.emit(relax.op.reshape(relax.TupleGetItem(limited, i), (n, K))) for i in range(2)
            )
        if layer.gain_on_input:  # top-1 (Llama 4): the expert reads w * x, its output is not scaled
            x = lb.emit(relax.op.multiply(x, routing_weight))
            routing_weight = lb.emit(relax.op.ones_like(routing_weight))
        grouped = call("group", [index, routing_weight])
        offset, token, gain = (relax.TupleGetItem(grouped, i) for i in range(3))
        first_layer = [w for w in weights if w.name not in ("w_down", "b_down")]
        inter = call("expert_up", [x, *first_layer, offset, token])
        y = call("expert_down", [inter, by_role["w_down"], by_role["b_down"], offset, token, gain])
        lb.emit_func_output(y)
    func = lb.get()[prefix].with_attr("moec.layer", json.dumps(layer.describe()))
    return bb.add_func(func, prefix)


CONTRIB_PREFIX = "moec.contrib:"
"""Op-type prefix that marks, in the lifted copy of the graph, a node converted by
:mod:`moec.frontend.contrib_ops` (TVM's converter hook sees op types, not domains:
``com.microsoft::RotaryEmbedding`` is not ONNX's own ``RotaryEmbedding``)."""


def _tag_contrib_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose contrib-op nodes have op type ``CONTRIB_PREFIX + domain:op``."""
    if not any(contrib_converter(n.domain, n.op_type) for n in model.graph.node):
        return model
    tagged = onnx.ModelProto()
    tagged.CopyFrom(model)
    for node in tagged.graph.node:
        if contrib_converter(node.domain, node.op_type):
            node.op_type = f"{CONTRIB_PREFIX}{node.domain}:{node.op_type}"
    return tagged


AXIS_OPS = {
    "ArgMax",
    "ArgMin",
    "Concat",
    "Gather",
    "GatherElements",
    "Hardmax",
    "LayerNormalization",
    "LogSoftmax",
    "ScatterElements",
    "Softmax",
    "Split",
    "TopK",
}
"""ONNX ops whose ``axis`` attribute names an axis of their first input (-rank..rank-1)."""

#: ONNX ops whose two operands broadcast (see :meth:`MoEGraphImporter._broadcast`).
BROADCASTING_OPS = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "And",
    "Or",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
}


def _known_shape(x: object) -> list | None:
    """The dims of a Relax tensor expression with a known shape, else None."""
    ty = getattr(x, "ty", None)
    if (
        isinstance(x, relax.Expr)
        and isinstance(ty, relax.TensorType)
        and isinstance(ty.shape, relax.ShapeExpr)
    ):
        return list(ty.shape.values)
    return None


def _dim_text(dim: object) -> int | str:
    """A dimension as an error message shows it: a number, or its expression's text."""
    return int(dim) if isinstance(dim, tvm.tirx.IntImm) else re.sub(r"T\.int64\((-?\d+)\)", r"\1", str(dim))


def _is_one(dim: object) -> bool:
    return isinstance(dim, tvm.tirx.IntImm) and int(dim) == 1


class MoEGraphImporter(ONNXGraphImporter):
    """TVM's ONNX importer, taught the ``moec::MoELayer`` node and onnxruntime's contrib ops, and
    ``Pow`` by a constant 2 as a product."""

    def __init__(self, layers: list[MoELayer], **kwargs) -> None:
        super().__init__(**kwargs)
        self._layers = layers
        self.converting: str | None = None  # the node being converted, for an error to name

    def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
        ours = onnx.GraphProto()
        ours.CopyFrom(graph)
        kept = [n for n in ours.node if n.op_type != LAYER_OP and not n.op_type.startswith(CONTRIB_PREFIX)]
        del ours.node[:]
        ours.node.extend(kept)
        super()._check_for_unsupported_ops(ours)

    def _constant(self, expr: relax.Expr) -> np.ndarray | None:
        """The value of a constant input: a Relax constant, or an initializer (a weight parameter
        of ``main`` under ``keep_params_in_input``); None for anything computed at run time."""
        if isinstance(expr, tvm.ir.GenericConst):
            return expr.value.numpy()
        for var, array in self._params.values():
            if var.same_as(expr):
                return np.asarray(array.numpy() if hasattr(array, "numpy") else array)
        return None

    def _broadcast(self, op_name: str, inputs: list, attrs: dict, opset: int) -> relax.Expr:
        """A broadcasting binary op whose operands' dims TVM cannot prove equal (one symbolic
        expression against another, e.g. a sliding-window attention's key length
        ``s + max(0, p - max(0, p - 127))`` against its mask's ``p + s``), with the second
        operand cast to the first's dims: a run-time check that they are equal, as the exporter
        traced them, instead of a result of unknown shape that later ops cannot reshape."""
        out = super()._convert_operator(op_name, inputs, attrs, opset)
        shapes = [_known_shape(x) for x in inputs]
        if _known_shape(out) is not None or None in shapes or len(shapes[0]) != len(shapes[1]):
            return out
        first, second = shapes
        unify = [
            a if not _is_one(a) and not _is_one(b) and not tvm_ffi.structural_equal(a, b) else b
            for a, b in zip(first, second, strict=True)
        ]
        cast = self.bb.match_cast(inputs[1], relax.TensorType(unify, inputs[1].ty.dtype))
        return super()._convert_operator(op_name, [inputs[0], cast], attrs, opset)

    def _convert_operator(self, op_name, inputs, attrs, opset):
        name = attrs.get("tvm_custom", {}).get("name")
        self.converting = f"node '{name}' ({op_name})" if name else f"a {op_name} node"
        if op_name in AXIS_OPS:
            self._check_axis(attrs.get("axis"), inputs[0] if inputs else None)
        result = self._convert(op_name, inputs, attrs, opset)
        if op_name == "MatMul" and _known_shape(result) is None:
            self._unknown_product(inputs)
        self.converting = None
        return result

    def _check_axis(self, axis: object, data: object) -> None:
        """Raise :class:`MoecError` for an ``axis`` attribute outside the rank of the input
        ``data``: TVM's converters take it as it is and fail later, in its lowering."""
        ty = getattr(data, "ty", None)
        rank = ty.ndim if isinstance(ty, relax.TensorType) else -1
        if isinstance(axis, int) and rank >= 0 and not -rank <= axis < rank:
            raise MoecError(
                f"{self.converting}: axis {axis} is outside -{rank}..{rank - 1}, the axes of its "
                f"rank-{rank} input; check the node's attributes"
            )

    def _unknown_product(self, inputs: list) -> None:
        """Raise :class:`MoecError` for a MatMul of known operand shapes whose product's shape
        TVM cannot tell (batch dimensions it cannot prove broadcast): its lowering would fail
        later, far from the node, on the missing shape."""
        shapes = [_known_shape(x) for x in inputs]
        if None in shapes:
            return
        raise MoecError(
            f"{self.converting}: TVM cannot tell the shape of the product of operands of shapes "
            f"{[_dim_text(d) for d in shapes[0]]} and {[_dim_text(d) for d in shapes[1]]}; check "
            "the shapes it reads, and give dimensions that must be equal one name in the inputs"
        )

    def _convert(self, op_name, inputs, attrs, opset):
        if op_name == "Pow" and len(inputs) == 2:
            # x ** 2 (RMSNorm's mean of squares): a product, where TVM's power is a powf call per
            # element that its default lowering neither vectorises nor schedules
            exponent = self._constant(inputs[1])
            if exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0:
                return self.bb.normalize(relax.op.multiply(inputs[0], inputs[0]))
        if op_name.startswith(CONTRIB_PREFIX):
            domain, op_type = op_name[len(CONTRIB_PREFIX) :].split(":", 1)
            result = contrib_converter(domain, op_type)(self.bb, list(inputs), attrs)
            return self.bb.normalize(result) if isinstance(result, relax.Expr) else result
        if op_name in OWN_CONVERTERS:
            result = OWN_CONVERTERS[op_name](self.bb, list(inputs), attrs)
            if result is not None:
                return self.bb.normalize(result)
        if op_name in BROADCASTING_OPS and len(inputs) == 2:
            return self._broadcast(op_name, list(inputs), attrs, opset)
        if op_name != LAYER_OP:
            return super()._convert_operator(op_name, inputs, attrs, opset)
        layer = self._layers[attrs["layer"]]
        x, logits, *weights = inputs
        func = build_layer_function(self.bb, layer, [w.ty for w in weights])
        x_shape = x.ty.shape
        if layer.capacity is None:
            leading: tuple = (-1,)
        else:  # sequences: rows of the input's second-last axis
            dims = list(x_shape.values)
            leading = (-1, dims[-2]) if len(dims) >= 3 else (1, -1)
        flat_x = self.bb.emit(relax.op.reshape(x, (*leading, layer.hidden)))
        flat_logits = self.bb.emit(relax.op.reshape(logits, (*leading, layer.num_experts)))
        y = self.bb.emit(relax.Call(func, [flat_x, flat_logits, *weights]))
        return self.bb.normalize(relax.op.reshape(y, x_shape))  # typed: the next converter reads it


def lift_to_relax(
    model: onnx.ModelProto, layers: list[MoELayer], shape_dict: dict | None = None
) -> tvm.IRModule:
    """The Relax module of ``model``; ``main`` takes the graph inputs, then every weight.

    A node TVM's frontend cannot convert raises :class:`MoecError` naming it, with nothing else
    printed: TVM's frontend prints the failing converter's inputs (a page of TVMScript) on
    stdout, and its block builder warns on stderr when it is destroyed with the blocks the
    failed conversion left open.
    """
    importer = MoEGraphImporter(
        layers, shape_dict=shape_dict, dtype_dict="float32", keep_params_in_input=True, sanitize=True
    )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            mod = importer.from_onnx(_tag_contrib_nodes(model).graph, opset)
    except Exception as err:  # TVM's frontend raises many types; name the node and the cause, once
        _end_open_blocks(importer.bb)
        if isinstance(err, MoecError):
            raise
        if importer.converting is None:
            raise MoecError(
                f"TVM's ONNX frontend could not convert the graph: {first_line(err).rstrip('.')}; "
                "re-export the model, or open an issue with it"
            ) from err
        raise MoecError(
            f"{importer.converting}: TVM's ONNX frontend could not convert it: "
            f"{first_line(err).rstrip('.')}; check the node's attributes and the shapes it reads, "
            "re-export the model, or open an issue with it"
        ) from err
    sys.stdout.write(printed.getvalue())
    return mod


def _end_open_blocks(bb: relax.BlockBuilder) -> None:
    """End the binding blocks a failed conversion left open in ``bb``."""
    while True:
        try:
            bb._end_block()
        except tvm.error.InternalError:  # "no block is being built"
            return
