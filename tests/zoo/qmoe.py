"""Small ONNX models built around onnxruntime's ``com.microsoft::QMoE`` contrib op.

The quantized twin of :mod:`tests.zoo.ms_moe`: deterministic seeded float weights, quantized the
way onnxruntime's own QMoE tests do it (symmetric with the implicit 2^(bits-1) offset, or
asymmetric min/max with explicit zero points), per output channel or per block of input
features, and packed as :mod:`moec.reference.qmoe` describes. Every model has graph input ``x``
``["tokens", hidden]``, a router MatMul feeding ``router_probs``, and output ``y``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tests.zoo.ms_moe import make_model

__all__ = ["build_qmoe_model", "pack_codes", "quantize_projection"]

_MS_DOMAIN = "com.microsoft"


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-wide codes along the last axis, low bits first (4 bits: the even
    code in the low nibble); an odd count is padded with a zero code."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros_like(codes[..., :1])], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def quantize_projection(
    w: np.ndarray, bits: int, block_size: int, zero_points: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize float ``[E, N, K]`` weights; return (packed weights, float32 scales, packed zero
    points or None) in QMoE's layout (scales ``[E, N]`` per channel, ``[E, N, K/B]`` per block)."""
    experts, rows, cols = w.shape
    block = block_size or cols
    groups = w.reshape(experts, rows, cols // block, block).astype(np.float64)
    top = (1 << bits) - 1
    if zero_points:
        low, high = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
        scale = np.maximum((high - low) / top, 1e-8)
        zero = np.clip(np.round(-low / scale), 0, top)
    else:
        scale = np.maximum(np.abs(groups).max(-1, keepdims=True) / (top // 2), 1e-8)
        zero = np.full_like(scale, 1 << (bits - 1))
    codes = np.clip(np.round(groups / scale) + zero, 0, top).reshape(experts, rows, cols)
    scale = scale.astype(np.float32)[..., 0]
    zero = zero.astype(np.uint8)[..., 0]
    if not block_size:
        scale, zero = scale[..., 0], zero[..., 0]
    packed_zero = pack_codes(zero, bits) if zero_points else None
    return pack_codes(codes, bits), scale, packed_zero


def build_qmoe_model(
    *,
    hidden: int = 64,
    inter: int = 64,
    experts: int = 4,
    k: int = 2,
    bits: int = 4,
    block_size: int = 0,
    zero_points: bool = False,
    activation: str = "relu",
    swiglu_fusion: int = 1,
    normalize: int = 1,
    expert_bias: bool = True,
    fc3: bool = False,
    alpha: float | None = None,
    beta: float | None = None,
    limit: float | None = None,
    scale_dtype: type = np.float32,
    seed: int = 0,
) -> onnx.ModelProto:
    """One QMoE block: ``y = QMoE(x, router_probs = x @ Wr)``.

    ``bits`` is ``expert_weight_bits``; ``block_size`` 0 quantizes per output channel (the
    attribute is then omitted); ``zero_points`` adds asymmetric zero-point inputs. For
    ``swiglu``, ``swiglu_fusion`` 1/2 give a fused fc1 of ``2*inter`` rows and 0 separate fc1
    and fc3; ``fc3`` adds a Mixtral-style up projection to another activation. ``alpha`` /
    ``beta`` / ``limit`` set the SwiGLU attributes when not None; ``scale_dtype`` is the scales'
    type (float32 or float16).
    """
    rng = np.random.default_rng(seed)
    gated = activation == "swiglu"
    has_fc3 = (gated and swiglu_fusion == 0) or (fc3 and not gated)
    fc1_rows = 2 * inter if gated and not has_fc3 else inter
    inits = [numpy_helper.from_array(rng.normal(0.0, 0.3, (hidden, experts)).astype(np.float32), "router_w")]

    def add(name: str, array: np.ndarray | None) -> str:
        """Store ``array`` as initializer ``name`` and return the name ("" for an omitted input)."""
        if array is None:
            return ""
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def projection(name: str, shape: tuple[int, int, int]) -> list[str]:
        """The four inputs of one projection, std 1/sqrt(fan-in) so that values stay O(1)."""
        w = rng.normal(0.0, shape[2] ** -0.5, shape)
        packed, scale, zero = quantize_projection(w, bits, block_size, zero_points)
        bias = rng.normal(0.0, 0.1, shape[:2]).astype(np.float32) if expert_bias else None
        return [
            add(f"{name}_w", packed),
            add(f"{name}_s", scale.astype(scale_dtype)),
            add(f"{name}_b", bias),
            add(f"{name}_zp", zero),
        ]

    fc1 = projection("fc1", (experts, fc1_rows, hidden))
    fc2 = projection("fc2", (experts, hidden, inter))
    fc3_inputs = projection("fc3", (experts, inter, hidden)) if has_fc3 else ["", "", "", ""]
    node_inputs = ["x", "logits", *fc1[:3], *fc2[:3], *fc3_inputs[:3], fc1[3], fc2[3], fc3_inputs[3]]
    while node_inputs[-1] == "":
        node_inputs.pop()
    attrs: dict[str, object] = {
        "activation_type": activation,
        "k": k,
        "normalize_routing_weights": normalize,
        "expert_weight_bits": bits,
    }
    if block_size:
        attrs["block_size"] = block_size
    if gated:
        attrs["swiglu_fusion"] = swiglu_fusion
    for key, value in (("activation_alpha", alpha), ("activation_beta", beta), ("swiglu_limit", limit)):
        if value is not None:
            attrs[key] = float(value)
    nodes = [
        helper.make_node("MatMul", ["x", "router_w"], ["logits"], name="router"),
        helper.make_node("QMoE", node_inputs, ["y"], name="qmoe", domain=_MS_DOMAIN, **attrs),
    ]
    return make_model("qmoe", hidden, nodes, inits)
