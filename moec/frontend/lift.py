"""Lifts an ONNX graph (with canonical ``moec::MoELayer`` nodes) into a Relax IRModule.

Everything except the MoE layers goes through TVM's own ONNX frontend. Each MoE layer
becomes a Relax function ``<layer>`` (attribute ``moec.layer`` holds its JSON description)
called from ``main``; its body calls our sparse TIR kernels: route → group → expert_up →
expert_down. Weights stay function parameters (``keep_params_in_input``) so they can be
stored outside the compiled library.
"""

from __future__ import annotations

import json

import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

from moec.frontend.layer import MoELayer
from moec.frontend.rewrite import LAYER_OP
from moec.kernels import make_kernel
from moec.schedule import CpuSchedule


def build_layer_function(
    bb: relax.BlockBuilder, layer: MoELayer, weight_types: list[relax.TensorType]
) -> relax.GlobalVar:
    """Adds ``layer``'s kernels and its Relax function to ``bb``'s module; returns the function.

    Kernels get the default schedule; the pipeline's ``ApplyKernelSchedule`` retiles them.
    """
    E, K, H, F = layer.num_experts, layer.top_k, layer.hidden, layer.ffn
    prefix = layer.name
    configs = {
        "route": {
            "num_experts": E,
            "top_k": K,
            "scoring": layer.scoring,
            "normalize": layer.normalize,
            "tie_break": layer.tie_break,
        },
        "group": {"num_experts": E, "top_k": K},
        "expert_up": {
            "num_experts": E,
            "hidden": H,
            "ffn": F,
            "top_k": K,
            "activation": layer.activation,
            "gated": layer.gated,
            "alpha": layer.alpha,
            "beta": layer.beta,
            "limit": layer.limit,
        },
        "expert_down": {"num_experts": E, "hidden": H, "ffn": F, "top_k": K},
    }
    route, group, up, down = (
        bb.add_func(make_kernel(kind, config, CpuSchedule()), f"{prefix}_{kind}")
        for kind, config in configs.items()
    )

    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, H), "float32"))
    logits = relax.Var("logits", relax.TensorType((n, E), "float32"))
    weights = [relax.Var(f"w{i}", ty) for i, ty in enumerate(weight_types)]
    lb = relax.BlockBuilder()
    # No dataflow block: our kernels are opaque to the fusion passes that inspect those.
    with lb.function(prefix, params=[x, logits, *weights], private=True):
        routed = lb.emit(
            relax.call_tir(
                route, [logits], [relax.TensorType((n, K), "int32"), relax.TensorType((n, K), "float32")]
            )
        )
        grouped = lb.emit(
            relax.call_tir(
                group,
                [relax.TupleGetItem(routed, 0), relax.TupleGetItem(routed, 1)],
                [
                    relax.TensorType((E + 1,), "int32"),
                    relax.TensorType((n * K,), "int32"),
                    relax.TensorType((n * K,), "float32"),
                ],
            )
        )
        offset, token, gain = (relax.TupleGetItem(grouped, i) for i in range(3))
        *first_layer, w_down, b_down = weights
        inter = lb.emit(
            relax.call_tir(up, [x, *first_layer, offset, token], relax.TensorType((n * K, F), "float32"))
        )
        y = lb.emit(
            relax.call_tir(
                down, [inter, w_down, b_down, offset, token, gain], relax.TensorType((n, H), "float32")
            )
        )
        lb.emit_func_output(y)
    func = lb.get()[prefix].with_attr("moec.layer", json.dumps(layer.describe()))
    return bb.add_func(func, prefix)


class MoEGraphImporter(ONNXGraphImporter):
    """TVM's ONNX importer, taught the ``moec::MoELayer`` node."""

    def __init__(self, layers: list[MoELayer], **kwargs) -> None:
        super().__init__(**kwargs)
        self._layers = layers

    def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
        ours = onnx.GraphProto()
        ours.CopyFrom(graph)
        kept = [n for n in ours.node if n.op_type != LAYER_OP]
        del ours.node[:]
        ours.node.extend(kept)
        super()._check_for_unsupported_ops(ours)

    def _convert_operator(self, op_name, inputs, attrs, opset):
        if op_name != LAYER_OP:
            return super()._convert_operator(op_name, inputs, attrs, opset)
        layer = self._layers[attrs["layer"]]
        x, logits, *weights = inputs
        func = build_layer_function(self.bb, layer, [w.ty for w in weights])
        x_shape = x.ty.shape
        flat_x = self.bb.emit(relax.op.reshape(x, (-1, layer.hidden)))
        flat_logits = self.bb.emit(relax.op.reshape(logits, (-1, layer.num_experts)))
        y = self.bb.emit(relax.Call(func, [flat_x, flat_logits, *weights]))
        return self.bb.normalize(relax.op.reshape(y, x_shape))  # typed: the next converter reads it


def lift_to_relax(
    model: onnx.ModelProto, layers: list[MoELayer], shape_dict: dict | None = None
) -> tvm.IRModule:
    """The Relax module of ``model``; ``main`` takes the graph inputs, then every weight."""
    importer = MoEGraphImporter(
        layers, shape_dict=shape_dict, dtype_dict="float32", keep_params_in_input=True, sanitize=True
    )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    return importer.from_onnx(model.graph, opset)
