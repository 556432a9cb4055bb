"""Recognises onnxruntime's fused ``com.microsoft::MoE`` and ``QMoE`` nodes as canonical MoE layers.

Rules (onnxruntime 1.32 semantics, see :mod:`moec.reference.ms_moe` and :mod:`moec.reference.qmoe`):
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
  over ``router_probs`` (logits); ties between equal scores go to the higher expert index;
- ``QMoE`` is the same node with integer expert weights (inputs: fc1 weights, scales, bias, fc2
  ..., fc3 ..., then fc1/fc2/fc3 zero points): they are dequantized here, with numpy, to the
  float32 weights above (``(code - zero_point) * scale``; ``expert_weight_bits`` 4 or 8, default
  4; codes packed low bits first; one scale per output channel, or per ``block_size`` inputs;
  zero points default to 2^(bits-1)), and the rest of the node reads as ``MoE``, including
  ``normalize_routing_weights`` (onnxruntime 1.32's CPU QMoE kernel ignores it and always
  renormalises). When every ``code - zero_point`` lies in ``[-128, 127]`` (4-bit weights always;
  8-bit ones with the default zero points), the layer also keeps the scales as its
  ``int8_steps`` (``int8_block`` = ``block_size``), so the compiler can store those integers
  as INT8 exactly, 4-bit ones unpacked to a byte each;
- ``swiglu_limit_after_activation=1`` (CUDA only in onnxruntime) is refused.
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

#: The fused MoE ops of onnxruntime's contrib domain that are imported.
MS_MOE_OPS = ("MoE", "QMoE")
#: ``expert_weight_bits`` values a QMoE node may have.
QMOE_BITS = (4, 8)
#: QMoE inputs: (weights, scales, bias, zero points) per projection, and the first input that
#: nothing here implements (router_weights, then the FP4/FP8 scales).
QMOE_INPUTS = {"fc1": (2, 3, 4, 11), "fc2": (5, 6, 7, 12), "fc3": (8, 9, 10, 13)}
QMOE_UNSUPPORTED_FROM = 14

INT8_LEVELS_BELOW, INT8_LEVELS_ABOVE = 128, 127
"""The integers an INT8 weight holds: a QMoE's ``code - zero_point`` in this range is stored exactly."""

POINTWISE = {"relu": "relu", "gelu": "gelu_tanh", "silu": "silu", "identity": "identity"}
FUSED_GATED = {"swiglu": "silu", "geglu": "gelu_tanh"}


def _text(node: onnx.NodeProto, name: str, default: str) -> str:
    """A string attribute's value; MoecError for another type (bytes that are not UTF-8 are
    shown, not decoded: the error that follows names them)."""
    value = attribute(node, name, default)
    if not isinstance(value, (bytes, str)):
        raise MoecError(f"{node_label(node)}: attribute {name} must be a string, got {value!r}")
    return value.decode(errors="backslashreplace") if isinstance(value, bytes) else value


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    """An integer attribute's value; MoecError for another type (a float, a string, a list)."""
    value = attribute(node, name, default)
    if not isinstance(value, int):
        raise MoecError(f"{node_label(node)}: attribute {name} must be an integer, got {value!r}")
    return value


def find_ms_moe_blocks(index: GraphIndex) -> list[MoEBlock]:
    """Every ``com.microsoft::MoE`` and ``com.microsoft::QMoE`` node of the graph, as canonical blocks."""
    blocks = []
    for node in index.graph.node:
        if node.op_type in MS_MOE_OPS and node.domain == "com.microsoft":
            blocks.append(_block_from_node(index, node, f"moe{len(blocks)}"))
    return blocks


def _constant(index: GraphIndex, node: onnx.NodeProto, position: int) -> np.ndarray | None:
    """The constant value of input ``position``, None when omitted; MoecError when computed."""
    if len(node.input) <= position or not node.input[position]:
        return None
    value = index.constant(node.input[position])
    if value is None:
        raise MoecError(
            f"{node_label(node)}: input '{node.input[position]}' must be a constant "
            "initializer (expert weights computed at run time are not supported)"
        )
    return value


def _weight(index: GraphIndex, node: onnx.NodeProto, position: int) -> np.ndarray | None:
    """A float32 expert weight or bias input (None when omitted)."""
    value = _constant(index, node, position)
    if value is not None and value.dtype != np.float32:
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


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 ``[..., bytes]`` → the codes ``[..., bytes * 8 / bits]`` (4 bits: low nibble first)."""
    if bits == 8:
        return packed
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _quant_layout(node: onnx.NodeProto) -> tuple[int, int]:
    """``(bits, block_size)`` of a QMoE node; MoecError for what is not supported."""
    label = node_label(node)
    bits = _int(node, "expert_weight_bits", 4)
    if bits not in QMOE_BITS:
        raise MoecError(f"{label}: expert_weight_bits={bits} is not supported (supported: 4, 8)")
    for fc in QMOE_INPUTS:
        if _int(node, f"{fc}_expert_weight_bits", bits) != bits:
            raise MoecError(
                f"{label}: {fc}_expert_weight_bits differs from expert_weight_bits (mixed widths)"
            )
    quant_type = _text(node, "quant_type", "int")
    if quant_type != "int":
        raise MoecError(f"{label}: quant_type '{quant_type}' is not supported (only 'int')")
    if _int(node, "weights_prepacked", -1) not in (-1, 0):
        raise MoecError(
            f"{label}: weights_prepacked=1 is not supported; export raw weights (weights_prepacked=0)"
        )
    block_size = _int(node, "block_size", 0)
    if block_size < 0:
        raise MoecError(f"{label}: block_size={block_size} must be 0 (per channel) or positive")
    unsupported = [name for name in node.input[QMOE_UNSUPPORTED_FROM:] if name]
    if unsupported:
        raise MoecError(
            f"{label}: input '{unsupported[0]}' (router_weights or FP4/FP8 scales) is not supported"
        )
    return bits, block_size


def _block_scales(
    node: onnx.NodeProto, fc: str, scales: np.ndarray | None, shape: tuple[int, ...]
) -> np.ndarray:
    """A QMoE projection's scales as float32 ``[E, N, blocks, 1]``; ``shape`` is what the op wants.

    Per-channel scales (``shape`` ``[E, N, 1]``) may also come as ``[E, N]``.
    """
    allowed = [shape, shape[:2]] if shape[2] == 1 else [shape]
    if scales is None or scales.dtype not in (np.float32, np.float16) or scales.shape not in allowed:
        got = "none" if scales is None else f"{scales.dtype} {list(scales.shape)}"
        raise MoecError(
            f"{node_label(node)}: {fc} scales must be float32 or float16 {list(allowed[-1])}, got {got}"
        )
    return scales.astype(np.float32).reshape(*shape, 1)


def _block_zero_points(
    node: onnx.NodeProto, fc: str, zeros: np.ndarray | None, bits: int, shape: tuple[int, ...], blocked: bool
) -> np.ndarray:
    """A QMoE projection's zero points as float32 ``[E, N, blocks, 1]`` (2^(bits-1) when absent).

    They are packed like the weights along their last axis: the blocks of a row, or, per
    channel, the rows of an expert (``[E, ceil(N * bits / 8)]``).
    """
    if zeros is None:
        return np.full((*shape, 1), 2 ** (bits - 1), dtype=np.float32)
    experts, rows, blocks = shape
    per_row = blocks if blocked else rows
    expected = (experts, rows, -(-blocks * bits // 8)) if blocked else (experts, -(-rows * bits // 8))
    if zeros.dtype != np.uint8 or zeros.shape != expected:
        raise MoecError(
            f"{node_label(node)}: {fc} zero points must be uint8 {list(expected)}, "
            f"got {zeros.dtype} {list(zeros.shape)}"
        )
    return _unpack(zeros, bits)[..., :per_row].reshape(*shape, 1).astype(np.float32)


def _quantized_projection(
    index: GraphIndex, node: onnx.NodeProto, fc: str, bits: int, block_size: int
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(float32 ``[E, N, K]`` weights, bias, steps) of one QMoE projection; weights None when absent.

    ``W = (code - zero_point) * scale``, with one scale and zero point per output channel
    (``block_size`` 0) or per ``block_size`` consecutive input features. ``steps``: the scales
    ``[E, N, blocks]`` when every ``code - zero_point`` fits INT8, else None.
    """
    w_at, s_at, b_at, z_at = QMOE_INPUTS[fc]
    packed, scales, zeros = (_constant(index, node, i) for i in (w_at, s_at, z_at))
    bias = _weight(index, node, b_at)
    if packed is None:
        return None, bias, None
    label = node_label(node)
    if packed.dtype != np.uint8 or packed.ndim != 3:
        raise MoecError(f"{label}: {fc} weights must be 3-D uint8, got {packed.dtype} {list(packed.shape)}")
    codes = _unpack(packed, bits)
    experts, rows, in_features = codes.shape
    if block_size and in_features % block_size:
        raise MoecError(
            f"{label}: block_size={block_size} does not divide {fc}'s {in_features} input features"
        )
    shape = (experts, rows, in_features // block_size if block_size else 1)
    scale = _block_scales(node, fc, scales, shape)
    zero = _block_zero_points(node, fc, zeros, bits, shape, blocked=block_size > 0)
    levels = codes.reshape(*shape, -1).astype(np.float32) - zero
    exact = -INT8_LEVELS_BELOW <= levels.min(initial=0) and levels.max(initial=0) <= INT8_LEVELS_ABOVE
    steps = scale[..., 0] if exact else None
    return (levels * scale).reshape(experts, rows, in_features), bias, steps


def _expert_tensors(
    index: GraphIndex, node: onnx.NodeProto
) -> tuple[list[np.ndarray | None], list[np.ndarray | None] | None, int]:
    """fc1, fc1 bias, fc2, fc2 bias, fc3, fc3 bias as float32 ``[E, out, in]`` / ``[E, out]``; for a
    QMoE whose levels fit INT8, the steps of fc1, fc2, fc3 (``[E, out, blocks]``, None where
    absent), else None; and the block size."""
    if node.op_type == "MoE":
        return [_weight(index, node, i) for i in range(2, 8)], None, 0
    bits, block_size = _quant_layout(node)
    tensors: list[np.ndarray | None] = []
    steps: list[np.ndarray | None] = []
    exact = True
    for fc in QMOE_INPUTS:
        weight, bias, step = _quantized_projection(index, node, fc, bits, block_size)
        tensors += [weight, bias]
        steps.append(step)
        exact = exact and (weight is None or step is not None)
    return tensors, steps if exact else None, block_size


def _layer_steps(roles: dict[str, np.ndarray | None], block_size: int) -> dict[str, np.ndarray]:
    """The layer's ``int8_steps`` from each matrix role's ``[E, out, blocks]`` steps."""
    return {
        role: steps[..., 0] if block_size == 0 else steps.transpose(0, 2, 1)
        for role, steps in roles.items()
        if steps is not None
    }


def _number(node: onnx.NodeProto, name: str, default: float) -> float:
    """A float attribute's value; MoecError for NaN (and for an infinite one but ``swiglu_limit``,
    whose default is no limit)."""
    value = attribute(node, name, default)
    if not isinstance(value, (int, float)):
        raise MoecError(f"{node_label(node)}: attribute {name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and name != "swiglu_limit"):
        raise MoecError(f"{node_label(node)}: attribute {name}={value} is not a number moec can compute with")
    return value


def _block_from_node(index: GraphIndex, node: onnx.NodeProto, name: str) -> MoEBlock:
    act = _text(node, "activation_type", "relu")
    fusion = _int(node, "swiglu_fusion", 0)
    sparse_mixer = _int(node, "use_sparse_mixer", 0) == 1
    if sparse_mixer and _int(node, "k", 1) != 2:
        raise MoecError(
            f"{node_label(node)}: use_sparse_mixer=1 needs k=2 (onnxruntime's sparsemixer is top-2)"
        )
    if _int(node, "swiglu_limit_after_activation", 0) == 1:
        raise MoecError(f"{node_label(node)}: swiglu_limit_after_activation=1 is not supported")
    (fc1, fc1_b, fc2, fc2_b, fc3, fc3_b), steps, block_size = _expert_tensors(index, node)
    fc1_s, fc2_s, fc3_s = steps or (None, None, None)
    if fc1 is None or fc2 is None:
        raise MoecError(f"{node_label(node)}: fc1 and fc2 expert weights are required")
    if fc1.ndim != 3 or fc2.ndim != 3:
        raise MoecError(f"{node_label(node)}: expert weights must be 3-D [experts, out, in]")
    num_experts, hidden, ffn = fc2.shape
    gate = gate_b = gate_s = None
    if act in POINTWISE:
        activation = POINTWISE[act]
        up, up_b, up_s = fc1, fc1_b, fc1_s
        if fc3 is not None:
            gate, gate_b, gate_s, up, up_b, up_s = fc1, fc1_b, fc1_s, fc3, fc3_b, fc3_s
    elif act in FUSED_GATED:
        activation = FUSED_GATED[act]
        if fusion == 0 and fc3 is not None:
            gate, gate_b, gate_s, up, up_b, up_s = fc1, fc1_b, fc1_s, fc3, fc3_b, fc3_s
        else:
            gate, gate_b, up, up_b = _split_fused(node, fc1, fc1_b, ffn, fusion or 1)
            if fc1_s is not None:
                gate_s, _, up_s, _ = _split_fused(node, fc1_s, None, ffn, fusion or 1)
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
            top_k=_int(node, "k", 1),
            hidden=hidden,
            ffn=ffn,
            activation=activation,
            normalize=_int(node, "normalize_routing_weights", 0) == 1 and not sparse_mixer,
            w_up=up,
            w_gate=gate,
            w_down=fc2,
            b_up=up_b,
            b_gate=gate_b,
            b_down=fc2_b,
            tie_break="low" if sparse_mixer else "high",
            scoring="sparsemixer" if sparse_mixer else "softmax",
            jitter_eps=ORT_SPARSE_MIXER_JITTER_EPS if sparse_mixer else 0.0,
            source=f"com.microsoft::{node.op_type} '{node.name}'",
            alpha=_number(node, "activation_alpha", 1.0) if gated else 1.0,
            beta=_number(node, "activation_beta", 0.0) if gated else 0.0,
            limit=_number(node, "swiglu_limit", math.inf) if gated else math.inf,
            int8_steps=(
                _layer_steps({"w_up": up_s, "w_gate": gate_s, "w_down": fc2_s}, block_size) if steps else None
            ),
            int8_block=block_size if steps else 0,
        )
    except ValueError as err:
        raise MoecError(f"{node_label(node)}: {err}") from err
    return MoEBlock(
        layer=layer, input=node.input[0], logits=node.input[1], output=node.output[0], nodes=[node]
    )
