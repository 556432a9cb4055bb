"""The reference for an artifact whose expert weights are stored narrower than the model's.

An artifact that stores expert matrices as fp16 cannot match the fp32 model to 1e-4: the
rounding of the weights is the point. What it must match is the model *with those weights
rounded*: the frontend's canonical graph (every MoE block one ``moec::MoELayer`` node whose
weights are initializers), with the expert matrices rounded to the stored precision, run by
``onnx.reference.ReferenceEvaluator`` with the numpy layer semantics of
:mod:`moec.canonical.semantics`. The canonical layer is itself checked against the original
graph when the frontend extracts it, so this oracle stays independent of TVM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from moec.canonical.layer import MoELayer
from moec.canonical.semantics import LayerPlan, moe_forward, route
from moec.frontend.importer import find_blocks
from moec.frontend.rewrite import LAYER_DOMAIN, LAYER_OP, layer_weight_names, replace_blocks
from moec.onnx_fixes import FIXED_OPS

STORAGE_DTYPES = {"fp32": np.float32, "fp16": np.float16}
MATRIX_ROLES = ("w_up", "w_gate", "w_down")


RouteHook = Callable[[int, MoELayer, np.ndarray, np.ndarray, np.ndarray], None]
"""Called per MoE layer run with (layer index, the layer, its tokens ``[n, H]``, expert indices
``[n, k]``, routing weights ``[n, k]``)."""


def _layer_op(
    layers: list[MoELayer], on_route: RouteHook | None = None, plans: dict[str, LayerPlan] | None = None
) -> type[OpRun]:
    """An ``OpRun`` for ``moec::MoELayer`` nodes computing ``layers[attr layer]`` on its inputs
    (with the artifact changes ``plans`` names for that layer)."""

    def _run(
        self, x: np.ndarray, logits: np.ndarray, *weights: np.ndarray, layer: int = 0
    ) -> tuple[np.ndarray]:
        spec = layers[int(layer)]
        current = dataclasses.replace(spec, **dict(zip(spec.weight_roles, weights, strict=True)))
        flat_logits = logits.reshape(-1, spec.num_experts)
        flat_x = x.reshape(-1, spec.hidden)
        plan = (plans or {}).get(spec.name)
        if on_route is not None:
            on_route(int(layer), current, flat_x, *route(current, flat_logits, plan))
        sequence = x.shape[-2] if x.ndim >= 3 else None  # the tokens an expert capacity counts over
        flat = moe_forward(current, flat_x, flat_logits, plan, sequence)
        return (flat.reshape(x.shape),)

    return type(LAYER_OP, (OpRun,), {"op_domain": LAYER_DOMAIN, "_run": _run})


def canonical_evaluator(
    model: onnx.ModelProto,
    precision: str = "fp32",
    on_route: RouteHook | None = None,
    plans: dict[str, LayerPlan] | None = None,
) -> tuple[ReferenceEvaluator, list[MoELayer]]:
    """A reference evaluator of ``model`` with its MoE blocks as canonical layers (expert matrices
    rounded to ``precision``; masking, pruning and early exit as ``plans`` says per layer name),
    calling ``on_route`` with every layer's routing; and the layers."""
    blocks = find_blocks(model)
    canonical = replace_blocks(model, blocks) if blocks else model
    rounded = {
        name
        for block in blocks
        for name in layer_weight_names(block)
        if name.rsplit(".", 1)[1] in MATRIX_ROLES
    }
    storage = STORAGE_DTYPES[precision]
    if storage is not np.float32:
        for index, tensor in enumerate(canonical.graph.initializer):
            if tensor.name in rounded:
                value = numpy_helper.to_array(tensor).astype(storage).astype(np.float32)
                canonical.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, tensor.name))
    layers = [b.layer for b in blocks]
    return ReferenceEvaluator(canonical, new_ops=[_layer_op(layers, on_route, plans), *FIXED_OPS]), layers


def run_stored_reference(
    model: onnx.ModelProto,
    precision: str,
    feeds: dict[str, np.ndarray],
    plans: dict[str, LayerPlan] | None = None,
) -> dict[str, Any]:
    """Outputs of ``model`` with every MoE layer's expert matrices rounded to ``precision`` (and
    the masking, pruning and early exit of ``plans``)."""
    evaluator, _ = canonical_evaluator(model, precision, plans=plans)
    names = [o.name for o in model.graph.output]
    return dict(zip(names, evaluator.run(None, feeds), strict=True))
