"""Recognises onnxruntime's fused ``com.microsoft::MoE`` node as a canonical MoE layer.

Rules:
- ``activation_type`` relu / gelu / silu / identity → ungated experts (``fc1`` is up).
- ``activation_type`` swiglu → gated experts; the gate/linear halves of ``fc1`` are split
  by ``swiglu_fusion`` (1: interleaved rows, 2: first half gate, 0: ``fc1`` gate and ``fc3``
  linear). A non-default ``activation_alpha``/``activation_beta``/``swiglu_limit`` (GPT-OSS)
  selects the clamped SwiGLU.
- ``k`` → top-k; ``normalize_routing_weights`` → renormalise top-k; scoring is softmax
  over ``router_probs`` (which are logits).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from moec.errors import MoecError
from moec.frontend.block import MoEBlock
from moec.frontend.graph import GraphIndex, attribute, node_label
from moec.frontend.layer import MoELayer

UNGATED = {"relu": "relu", "gelu": "gelu", "silu": "silu", "identity": "identity"}


def _as_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def find_ms_moe_blocks(index: GraphIndex) -> list[MoEBlock]:
    """Every ``com.microsoft::MoE`` node of the graph, as canonical blocks."""
    blocks = []
    for node in index.graph.node:
        if node.op_type == "MoE" and node.domain == "com.microsoft":
            blocks.append(_block_from_node(index, node, f"moe{len(blocks)}"))
    return blocks


def _weight(index: GraphIndex, node: onnx.NodeProto, position: int) -> np.ndarray | None:
    if len(node.input) <= position or not node.input[position]:
        return None
    value = index.constant(node.input[position])
    if value is None:
        raise MoecError(f"{node_label(node)}: input '{node.input[position]}' must be a constant "
                        "initializer (expert weights computed at run time are not supported)")
    if value.dtype != np.float32:
        raise MoecError(f"{node_label(node)}: expert weights are {value.dtype}; only float32 MoE "
                        "is supported for now: export the model in float32")
    return value


def _block_from_node(index: GraphIndex, node: onnx.NodeProto, name: str) -> MoEBlock:
    act = _as_str(attribute(node, "activation_type", "relu"))
    k = int(attribute(node, "k", 1))
    normalize = bool(attribute(node, "normalize_routing_weights", 0))
    fusion = int(attribute(node, "swiglu_fusion", 0))
    if int(attribute(node, "use_sparse_mixer", 0)):
        raise MoecError(f"{node_label(node)}: use_sparse_mixer=1 is not supported yet")
    fc1, fc1_b, fc2, fc2_b = (_weight(index, node, i) for i in (2, 3, 4, 5))
    fc3, fc3_b = _weight(index, node, 6), _weight(index, node, 7)
    if fc1 is None or fc2 is None:
        raise MoecError(f"{node_label(node)}: fc1 and fc2 expert weights are required")
    num_experts, hidden = fc2.shape[0], fc2.shape[1]
    ffn = fc2.shape[2]
    gate = gate_b = None
    if act in UNGATED:
        activation = UNGATED[act]
        up, up_b = fc1, fc1_b
    elif act == "swiglu":
        alpha = attribute(node, "activation_alpha", None)
        beta = attribute(node, "activation_beta", None)
        limit = attribute(node, "swiglu_limit", None)
        activation = "swiglu_clamped" if any(v is not None for v in (alpha, beta, limit)) else "swiglu"
        if fusion == 0:
            if fc3 is None:
                raise MoecError(f"{node_label(node)}: swiglu with swiglu_fusion=0 needs fc3 weights")
            gate, gate_b, up, up_b = fc1, fc1_b, fc3, fc3_b
        elif fusion == 1:
            gate, up = fc1[:, 0::2], fc1[:, 1::2]
            gate_b, up_b = (None, None) if fc1_b is None else (fc1_b[:, 0::2], fc1_b[:, 1::2])
        elif fusion == 2:
            gate, up = fc1[:, :ffn], fc1[:, ffn:]
            gate_b, up_b = (None, None) if fc1_b is None else (fc1_b[:, :ffn], fc1_b[:, ffn:])
        else:
            raise MoecError(f"{node_label(node)}: swiglu_fusion={fusion} is not one of 0, 1, 2")
    else:
        raise MoecError(f"{node_label(node)}: activation_type '{act}' is not supported "
                        "(supported: relu, gelu, silu, identity, swiglu)")
    layer = MoELayer(
        name=name, num_experts=num_experts, top_k=k, hidden=hidden, ffn=ffn,
        activation=activation, normalize=normalize, w_up=up, w_gate=gate, w_down=fc2,
        b_up=up_b, b_gate=gate_b, b_down=fc2_b, source=f"com.microsoft::MoE '{node.name}'",
    )
    if activation == "swiglu_clamped":
        layer.swiglu_alpha = float(attribute(node, "activation_alpha", 1.702))
        layer.swiglu_beta = float(attribute(node, "activation_beta", 1.0))
        layer.swiglu_limit = float(attribute(node, "swiglu_limit", math.inf))
    return MoEBlock(layer=layer, input=node.input[0], logits=node.input[1], output=node.output[0],
                    nodes=[node])
