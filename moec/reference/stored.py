"""The reference for an artifact that changed its model: experts stored narrower, masked, pruned.

An artifact that stores expert matrices as fp16 or int8 cannot match the fp32 model to 1e-4:
the rounding of the weights is the point. What it must match is the model *with those weights
rounded*: the frontend's canonical graph (every MoE block one ``moec::MoELayer`` node whose
weights are initializers), each expert's matrices rounded to its stored precision, run by
``onnx.reference.ReferenceEvaluator`` with the numpy layer semantics of
:mod:`moec.canonical.semantics`. The canonical layer is itself checked against the original
graph when the frontend extracts it, so this oracle stays independent of TVM.

Dense weights stored narrower (routers, attention, LM head: ``--router-precision``,
``--dense-precision``) are rounded the same way in the graph's initializers, per output
channel. The rounding, per expert matrix ``W`` ``[out, in]`` (as pruning left it: only its kept
channels), or dense weight by output channel:

- ``fp16``: ``float32(float16(W))``;
- ``int8`` and ``int8-dot``: symmetric, per output row and group of ``int8_group`` inputs (the
  whole row when 0): ``step = float32(max |W|) / 127`` (1 for an all-zero group), ``W' =
  clip(rint(W / step), -127, 127) * step``, all in float32, ``rint`` rounding half to even
  (:func:`moec.canonical.semantics.round_int8`); where the model stores the layer as INT8
  itself (QMoE) and the artifact keeps those integers, to the model's own steps instead
  (:func:`moec.canonical.semantics.round_to_steps`). An int8-dot expert's input rows are rounded
  per row, like weights, by the layer semantics (:func:`moec.canonical.semantics.moe_forward`).
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
from moec.canonical.semantics import LayerPlan, moe_forward, round_int8, round_to_steps, route
from moec.errors import MoecError
from moec.frontend.importer import find_blocks
from moec.frontend.rewrite import LAYER_DOMAIN, LAYER_OP, replace_blocks
from moec.onnx_fixes import FIXED_OPS

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
        if plan is not None and plan.precisions is not None:
            current = stored_layer(current, plan)
        if on_route is not None:
            on_route(int(layer), current, flat_x, *route(current, flat_logits, plan))
        sequence = x.shape[-2] if x.ndim >= 3 else None  # the tokens an expert capacity counts over
        flat = moe_forward(current, flat_x, flat_logits, plan, sequence)
        return (flat.reshape(x.shape),)

    return type(LAYER_OP, (OpRun,), {"op_domain": LAYER_DOMAIN, "_run": _run})


def _rounded(matrix: np.ndarray, precision: str, group: int) -> np.ndarray:
    """One expert matrix ``[out, in]`` as the artifact stores it (see the module docstring)."""
    if precision == "fp16":
        return matrix.astype(np.float16).astype(np.float32)
    if precision in ("int8", "int8-dot"):
        return round_int8(matrix, group)
    return matrix


def stored_layer(layer: MoELayer, plan: LayerPlan) -> MoELayer:
    """``layer`` with each expert's matrices rounded to its precision in ``plan`` (after pruning:
    a pruned expert's matrices are rounded over its kept channels only; with
    ``plan.int8_from_model``, an int8 expert is rounded to the model's own INT8 steps)."""
    if plan.int8_from_model and layer.int8_steps is None:
        raise MoecError(f"{layer.name}: the artifact keeps the model's INT8 weights, but the model has none")
    kept = plan.kept if plan.kept is not None else list(range(layer.num_experts))
    changes = {}
    for role in MATRIX_ROLES:
        matrices = getattr(layer, role)
        if matrices is None:
            continue
        matrices = matrices.copy()
        for position, expert in enumerate(kept):
            channels = plan.channels[position] if plan.channels is not None else slice(None)
            # the intermediate channels are w_up's / w_gate's rows and w_down's columns
            index = (channels, slice(None)) if role != "w_down" else (slice(None), channels)
            part = matrices[expert][index]
            if plan.int8_from_model and plan.precisions[expert] in ("int8", "int8-dot"):
                matrices[expert][index] = round_to_steps(part, layer.int8_steps[role][expert])
            else:
                matrices[expert][index] = _rounded(part, plan.precisions[expert], plan.int8_group)
        changes[role] = matrices
    return dataclasses.replace(layer, **changes)


DenseStorage = dict[str, tuple[str, int, int]]
"""Dense weights stored narrower, by initializer name: (precision, the axis of its outputs, int8
scale group along its inputs)."""


def _round_dense(model: onnx.ModelProto, dense: DenseStorage) -> None:
    """Round ``model``'s dense weight initializers in place as ``dense`` says (each output
    channel of an int8 weight gets its own step)."""
    found = {tensor.name: i for i, tensor in enumerate(model.graph.initializer)}
    for name, (precision, output_axis, group) in dense.items():
        if name not in found:
            raise MoecError(
                f"the artifact stores weight '{name}' as {precision}, but the model has no such initializer"
            )
        tensor = model.graph.initializer[found[name]]
        value = numpy_helper.to_array(tensor).astype(np.float32)
        by_output = value if output_axis == 0 else value.T
        rounded = _rounded(by_output, precision, group)
        model.graph.initializer[found[name]].CopyFrom(
            numpy_helper.from_array(rounded if output_axis == 0 else rounded.T.copy(), name)
        )


def canonical_evaluator(
    model: onnx.ModelProto,
    on_route: RouteHook | None = None,
    plans: dict[str, LayerPlan] | None = None,
    dense: DenseStorage | None = None,
) -> tuple[ReferenceEvaluator, list[MoELayer]]:
    """A reference evaluator of ``model`` with its MoE blocks as canonical layers (expert matrices
    rounded to their stored precisions; masking, pruning and early exit as ``plans`` says per
    layer name; the ``dense`` weights rounded), calling ``on_route`` with every layer's routing;
    and the layers."""
    blocks = find_blocks(model)
    canonical = replace_blocks(model, blocks) if blocks else model
    if dense:
        if canonical is model:
            canonical = onnx.ModelProto()
            canonical.CopyFrom(model)
        _round_dense(canonical, dense)
    layers = [b.layer for b in blocks]
    return ReferenceEvaluator(canonical, new_ops=[_layer_op(layers, on_route, plans), *FIXED_OPS]), layers


def run_stored_reference(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    plans: dict[str, LayerPlan] | None = None,
    dense: DenseStorage | None = None,
) -> dict[str, Any]:
    """Outputs of ``model`` with the changes ``plans`` names per layer (stored precisions,
    masking, pruning, early exit) and its ``dense`` weights rounded as stored."""
    evaluator, _ = canonical_evaluator(model, plans=plans, dense=dense)
    names = [o.name for o in model.graph.output]
    return dict(zip(names, evaluator.run(None, feeds), strict=True))
