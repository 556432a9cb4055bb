"""Recognises onnxruntime's fused ``com.microsoft::MoE`` node as a canonical MoE layer.

Rules (onnxruntime 1.32 semantics, see :mod:`moec.reference.ms_moe`):
- weights are ``[E, out, in]`` already: fc1 ``[E, F*I, H]``, fc2 ``[E, H, I]``, fc3 ``[E, I, H]``;
- ``activation_type`` relu / gelu (tanh approximation) / silu / identity → ungated experts,
  unless fc3 is given: then ``act(fc1 x) * fc3 x`` (a gated expert, Mixtral style);
- ``swiglu`` / ``geglu`` → gated experts whose gate and linear halves come from fc1 by
  ``swiglu_fusion`` (1: interleaved rows, 2: first half gate, 0: fc1 gate and fc3 linear; 0
  without fc3 reads as 1), with ``activation_alpha`` (default 1), ``activation_beta``
  (default 0) and ``swiglu_limit`` (default none) — GPT-OSS's clamped SwiGLU;
- ``use_sparse_mixer == 1`` → PhiMoE's sparsemixer top-2 (jitter eps 0.01, fixed in onnxruntime's
  kernel; renormalisation does not apply)
- ``k`` → top-k; ``normalize_routing_weights == 1`` → renormalise top-k; scoring is softmax
  over ``router_probs`` (logits); ties between equal scores go to the higher expert index.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from moec.canonical.layer import MoELayer
from moec.errors import MoecError
from moec.frontend.block import MoEBlock
from moec.frontend.graph import GraphIndex, attribute, node_label

#: The jitter eps onnxruntime's ``sparse_mixer_top2`` kernel hard-codes.
ORT_SPARSE_MIXER_JITTER_EPS = 0.01

POINTWISE = {"relu": "relu", "gelu": "gelu_tanh", "silu": "silu", "identity": "identity"}
FUSED_GATED = {"swiglu": "silu", "geglu": "gelu_tanh"}


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
        raise MoecError(
            f"{node_label(node)}: input '{node.input[position]}' must be a constant "
            "initializer (expert weights computed at run time are not supported)"
        )
    if value.dtype != np.float32:
        raise MoecError(
            f"{node_label(node)}: expert weights are {value.dtype}; only float32 MoE "
            "is supported for now: export the model in float32"
        )
    return value


def _split_fused(node: onnx.NodeProto, fc1: np.ndarray, fc1_b: np.ndarray | None, ffn: int, fusion: int):
    """(gate, gate_bias, linear, linear_bias) from a fused fc1."""
    if fusion == 1:
        halves = (np.s_[:, 0::2], np.s_[:, 1::2])
    elif fusion == 2:
        halves = (np.s_[:, :ffn], np.s_[:, ffn:])
    else:
        raise MoecError(f"{node_label(node)}: swiglu_fusion={fusion} is not one of 0, 1, 2")
    if fc1.shape[1] != 2 * ffn:
        raise MoecError(f"{node_label(node)}: fused fc1 has {fc1.shape[1]} rows, expected 2 x {ffn}")
    biases = (None, None) if fc1_b is None else (fc1_b[halves[0]], fc1_b[halves[1]])
    return fc1[halves[0]], biases[0], fc1[halves[1]], biases[1]


def _block_from_node(index: GraphIndex, node: onnx.NodeProto, name: str) -> MoEBlock:
    act = _as_str(attribute(node, "activation_type", "relu"))
    fusion = int(attribute(node, "swiglu_fusion", 0))
    sparse_mixer = int(attribute(node, "use_sparse_mixer", 0)) == 1
    if sparse_mixer and int(attribute(node, "k", 1)) != 2:
        raise MoecError(
            f"{node_label(node)}: use_sparse_mixer=1 needs k=2 (onnxruntime's sparsemixer is top-2)"
        )
    fc1, fc1_b, fc2, fc2_b = (_weight(index, node, i) for i in (2, 3, 4, 5))
    fc3, fc3_b = _weight(index, node, 6), _weight(index, node, 7)
    if fc1 is None or fc2 is None:
        raise MoecError(f"{node_label(node)}: fc1 and fc2 expert weights are required")
    if fc1.ndim != 3 or fc2.ndim != 3:
        raise MoecError(f"{node_label(node)}: expert weights must be 3-D [experts, out, in]")
    num_experts, hidden, ffn = fc2.shape
    gate = gate_b = None
    if act in POINTWISE:
        activation = POINTWISE[act]
        up, up_b = fc1, fc1_b
        if fc3 is not None:
            gate, gate_b, up, up_b = fc1, fc1_b, fc3, fc3_b
    elif act in FUSED_GATED:
        activation = FUSED_GATED[act]
        if fusion == 0 and fc3 is not None:
            gate, gate_b, up, up_b = fc1, fc1_b, fc3, fc3_b
        else:
            gate, gate_b, up, up_b = _split_fused(node, fc1, fc1_b, ffn, fusion or 1)
    else:
        raise MoecError(
            f"{node_label(node)}: activation_type '{act}' is not supported "
            "(supported: relu, gelu, silu, identity, swiglu, geglu)"
        )
    gated = act in FUSED_GATED
    try:
        layer = MoELayer(
            name=name,
            num_experts=num_experts,
            top_k=int(attribute(node, "k", 1)),
            hidden=hidden,
            ffn=ffn,
            activation=activation,
            normalize=int(attribute(node, "normalize_routing_weights", 0)) == 1 and not sparse_mixer,
            w_up=up,
            w_gate=gate,
            w_down=fc2,
            b_up=up_b,
            b_gate=gate_b,
            b_down=fc2_b,
            tie_break="low" if sparse_mixer else "high",
            scoring="sparsemixer" if sparse_mixer else "softmax",
            jitter_eps=ORT_SPARSE_MIXER_JITTER_EPS if sparse_mixer else 0.0,
            source=f"com.microsoft::MoE '{node.name}'",
            alpha=float(attribute(node, "activation_alpha", 1.0)) if gated else 1.0,
            beta=float(attribute(node, "activation_beta", 0.0)) if gated else 0.0,
            limit=float(attribute(node, "swiglu_limit", math.inf)) if gated else math.inf,
        )
    except ValueError as err:
        raise MoecError(f"{node_label(node)}: {err}") from err
    return MoEBlock(
        layer=layer, input=node.input[0], logits=node.input[1], output=node.output[0], nodes=[node]
    )
