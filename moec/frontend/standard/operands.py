"""The constants a node of a standard-op MoE block reads: matmul weights, the biases after them,
float scalars.

Router and experts are both recognised by their constant weights, and exporters write those
weights in several forms: a plain ``MatMul``/``Gemm`` operand, a stack ``[E, ...]`` that a
``Gather`` picks one expert of per routed token (transformers' ``batched_mm``), or one expert of a
stack transposed by a TorchScript-traced loop. This module reads each form back as
``[..., out, in]`` so that router rules and expert extraction see one layout.
"""

from __future__ import annotations

import numpy as np
import onnx

from moec.frontend.graph import GraphIndex, attribute
from moec.frontend.standard.walks import MATMUL_OPS, VIEW_OPS

GATHER_OPS = ("Gather", "GatherND")


def _gathered_weight(index: GraphIndex, tensor: str) -> np.ndarray | None:
    """The constant ``[E, out, in]`` stack that ``tensor`` gathers per token, or None.

    transformers' ``batched_mm`` experts pick each routed token's expert matrix with a
    ``Gather``/``GatherND`` on the stacked weights, then multiply it *in front of* the token
    column: the stack is already ``[E, out, in]``.
    """
    gather = index.producer.get(tensor)
    if gather is None or gather.op_type not in GATHER_OPS or int(attribute(gather, "axis", 0)) != 0:
        return None
    stack = index.constant(gather.input[0])
    return stack if stack is not None and stack.ndim == 3 and stack.dtype == np.float32 else None


def _picked_expert_weight(index: GraphIndex, tensor: str) -> str | None:
    """The name of the constant ``[E, out, in]`` stack whose one expert ``tensor`` is, transposed
    to ``[in, out]`` (how the TorchScript trace of transformers' ``eager`` loop reads it)."""
    transpose = index.producer.get(tensor)
    if (
        transpose is None
        or transpose.op_type != "Transpose"
        or list(attribute(transpose, "perm", [])) != [1, 0]
    ):
        return None
    gather = index.producer.get(transpose.input[0])
    if gather is None or gather.op_type != "Gather" or int(attribute(gather, "axis", 0)) != 0:
        return None
    stack = index.constant(gather.input[0])
    return gather.input[0] if stack is not None and stack.ndim == 3 and stack.dtype == np.float32 else None


def stack_name(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, bool] | None:
    """The name of the stacked constant a MatMul reads one expert of per token, and whether the
    stack is laid out ``[E, in, out]`` (the expert matrix is the right operand) rather than
    ``[E, out, in]``; None for any other MatMul."""
    if node.op_type != "MatMul":
        return None
    picked = _picked_expert_weight(index, node.input[1])
    if picked is not None:
        return picked, False
    for operand, in_out in ((0, False), (1, True)):
        if _gathered_weight(index, node.input[operand]) is not None:
            return index.producer[node.input[operand]].input[0], in_out
    return None


def weight_of(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    """The constant weight of a MatMul/Gemm as ``[..., out, in]``, or None."""
    if node.op_type not in MATMUL_OPS or len(node.input) < 2:
        return None
    if node.op_type == "MatMul" and index.constant(node.input[1]) is None:
        found = stack_name(index, node)
        if found is None:
            return None
        stack = index.constant(found[0])
        return np.swapaxes(stack, -1, -2) if found[1] else stack
    weight = index.constant(node.input[1])
    if weight is None or weight.ndim not in (2, 3) or weight.dtype != np.float32:
        return None
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            return None
        return weight if attribute(node, "transB", 0) else weight.T
    return np.swapaxes(weight, -1, -2)


def bias_after(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    """The constant added to a matmul's output (through reshapes), or the per-expert bias
    ``[E, out]`` that a ``Gather`` picks per routed token (or per row of the concatenated experts'
    rows); None if there is none."""
    tensor = node.output[0]
    consumers = index.consumers.get(tensor, [])
    # Through reshapes, and through the Concat of every expert's rows (transformers' grouped_mm,
    # which adds the biases that a GatherND picks per sorted row after it).
    while len(consumers) == 1 and (consumers[0].op_type in VIEW_OPS or consumers[0].op_type == "Concat"):
        tensor = consumers[0].output[0]
        consumers = index.consumers.get(tensor, [])
    if len(consumers) == 1 and consumers[0].op_type == "Add":
        other = [i for i in consumers[0].input if i != tensor]
        if not other:
            return None
        value = index.constant(other[0])
        gather = index.producer.get(other[0])
        if value is None and gather is not None and gather.op_type in GATHER_OPS:
            stack = index.constant(gather.input[0])
            value = stack if stack is not None and stack.ndim == 2 else None
        return value
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        return index.constant(node.input[2])
    return None


def scalar(index: GraphIndex, tensor: str) -> float | None:
    """A floating-point scalar constant's value (integer constants are shape arithmetic)."""
    value = index.constant(tensor) if tensor else None
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        return None
    return float(value.reshape(-1)[0])


def count(index: GraphIndex, tensor: str) -> int | None:
    """An integer scalar constant's value (a TopK's k, a capacity), or None for anything else
    (another type, no value, several values)."""
    value = index.constant(tensor) if tensor else None
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.integer):
        return None
    return int(value.reshape(-1)[0])
