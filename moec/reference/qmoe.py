"""Pure-numpy oracle for onnxruntime's ``com.microsoft::QMoE`` contrib op (integer weights).

QMoE is :mod:`moec.reference.ms_moe`'s MoE with its expert weights stored as unsigned integer
codes plus scales and optional zero points. This oracle dequantizes the three projections to
float32 and hands the rest (routing, activations, gating, biases) to
:func:`moec.reference.ms_moe.ms_moe` unchanged. It uses neither TVM nor onnxruntime, and it
shares no code with moec's frontend, which dequantizes on its own.

Semantics (E experts, N = a projection's output features, K = its input features)
==================================================================================

Inputs, by position (the 1.32 schema; ``[]`` = optional)::

    0 input  1 router_probs
    2 fc1_experts_weights  3 fc1_scales  4 [fc1_experts_bias]
    5 fc2_experts_weights  6 fc2_scales  7 [fc2_experts_bias]
    8 [fc3_experts_weights]  9 [fc3_scales]  10 [fc3_experts_bias]
    11 [fc1_zero_points]  12 [fc2_zero_points]  13 [fc3_zero_points]

(14 ``router_weights`` and the FP4/FP8 inputs after it are not implemented.) The projections
are fc1 ``[E, F*I, H]`` (F = 2 for fused swiglu), fc2 ``[E, H, I]`` and fc3 ``[E, I, H]`` as in
:mod:`moec.reference.ms_moe`: output-channel major, a projection is ``x @ W[e].T``.

Storage, with ``bits = expert_weight_bits`` (attribute default 4; 4 and 8 implemented)::

    weights      uint8 [E, N, K * bits / 8]; each row is a little-endian bitstream:
                 code k sits in bits [k*bits, (k+1)*bits), so with 4 bits code 2j is the
                 LOW nibble of byte j and code 2j+1 its HIGH nibble
    scales       float32 or float16 (ORT's CPU kernel takes either with float32 activations)
                   block_size = 0 (default): [E, N]        (one scale per output channel;
                                                             [E, N, 1] is accepted too)
                   block_size = B > 0:       [E, N, K/B]   (blocks of B along K; B | K)
    zero points  uint8, packed like the weights, along their last axis:
                   block_size = 0:  [E, ceil(N * bits / 8)]        (packed along N)
                   block_size = B:  [E, N, ceil((K/B) * bits / 8)] (packed along the blocks)
                 Bits past the last code (an odd block count with 4 bits) are ignored.
                 Absent: every zero point is 2^(bits-1), i.e. 128 for 8 bits, 8 for 4 bits.

    W[e, n, k] = (code[e, n, k] - zero_point[e, n, k // B]) * scale[e, n, k // B]   (float32)

Attributes taken here: ``expert_weight_bits``, ``block_size`` (>= 0), ``quant_type`` (only
"int"), ``weights_prepacked`` (only -1, the default, and 0: the raw layout above), the
per-projection ``fc{1,2,3}_expert_weight_bits`` (only when equal to ``expert_weight_bits``).
Everything else (``activation_type``, ``k``, ``normalize_routing_weights``, ``swiglu_fusion``,
``activation_alpha``/``beta``, ``swiglu_limit``, ``use_sparse_mixer``) means what it means for
``MoE`` and is passed to :func:`moec.reference.ms_moe.ms_moe`.

What was checked against onnxruntime 1.32.0 (CPU) and what was not
===================================================================

Cross-checked numerically against the ORT 1.32 CPU kernel (tests/unit/test_reference_qmoe.py):
4 and 8 bits; per-channel and block sizes 32, 64, 128; with and without zero points (packed
nibbles low first, padding ignored, the 2^(bits-1) default); float32 and float16 scales; the
default ``expert_weight_bits`` of 4; relu, gelu (tanh), silu, identity and interleaved swiglu
(``swiglu_fusion=1``) with alpha/beta/limit; biases; ties going to the higher expert index.

Where ORT 1.32's CPU kernel differs, this oracle keeps the documented meaning:

- ``normalize_routing_weights``: the CPU kernel ignores it and always renormalises the top-k
  (a softmax over the k selected logits). This oracle follows the attribute as ``MoE`` does
  (ORT's CPU ``MoE`` and its CUDA ``QMoE`` kernel both honour it); both agree when it is 1.
- 8-bit block-wise weights: the CPU kernel has no float32 path and quantizes each activation
  row to int8 per block of ``block_size`` (symmetric, ``max|a| / 127``, round to nearest) before
  both GEMMs, at every ``accuracy_level``. That is an approximation of the op, which this
  oracle does not reproduce (the tests emulate it to show it is the only difference).
  Likewise ``accuracy_level=4`` (int8 activations for 4-bit blocks) is a precision hint, not
  part of the semantics.

The CPU kernel cannot run fc3 ("FC3 gating is not yet implemented on CPU for QMoE"),
``swiglu_fusion`` 0 or 2, or mixed per-projection widths; fc3 here follows the schema text and
the ``MoE`` path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moec.reference.ms_moe import ms_moe

__all__ = ["QMOE_BITS", "dequantize_projection", "qmoe", "unpack_codes"]

#: The ``expert_weight_bits`` values this oracle implements.
QMOE_BITS = (4, 8)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` unsigned ``bits``-wide codes of each row of ``packed`` (``[..., bytes]``).

    Every row is read as a little-endian bitstream: code ``i`` is bits ``i*bits .. i*bits+bits-1``.
    """
    packed = np.asarray(packed, dtype=np.uint8)
    stream = np.unpackbits(packed, axis=-1, bitorder="little")  # [..., bytes * 8], LSB first
    if stream.shape[-1] < count * bits:
        raise ValueError(f"QMoE: {packed.shape[-1]} bytes per row hold fewer than {count} {bits}-bit codes")
    fields = stream[..., : count * bits].reshape(*packed.shape[:-1], count, bits).astype(np.int64)
    return (fields << np.arange(bits)).sum(axis=-1)


def _scales_per_block(name: str, scales: np.ndarray, experts: int, rows: int, blocks: int, blocked: bool):
    """``scales`` as float32 ``[E, N, blocks]``, after checking the shape the op allows."""
    scales = np.asarray(scales)
    allowed = [(experts, rows, blocks)] + ([] if blocked else [(experts, rows)])
    if tuple(scales.shape) not in allowed:
        raise ValueError(f"QMoE: {name} scales must have shape {list(allowed[0])}, got {list(scales.shape)}")
    if scales.dtype not in (np.float32, np.float16):
        raise ValueError(f"QMoE: {name} scales must be float32 or float16, got {scales.dtype}")
    return scales.astype(np.float32).reshape(experts, rows, blocks)


def _zero_points_per_block(
    name: str, zero_points: np.ndarray | None, bits: int, experts: int, rows: int, blocks: int, blocked: bool
) -> np.ndarray:
    """Zero points as float32 ``[E, N, blocks]`` (the 2^(bits-1) default when absent)."""
    if zero_points is None:
        return np.full((experts, rows, blocks), 2 ** (bits - 1), dtype=np.float32)
    zero_points = np.asarray(zero_points)
    per_row = blocks if blocked else rows
    packed_len = -(-per_row * bits // 8)
    expected = (experts, rows, packed_len) if blocked else (experts, packed_len)
    if tuple(zero_points.shape) != expected or zero_points.dtype != np.uint8:
        raise ValueError(
            f"QMoE: {name} zero points must be uint8 {list(expected)}, "
            f"got {zero_points.dtype} {list(zero_points.shape)}"
        )
    codes = unpack_codes(zero_points, bits, per_row)
    return codes.reshape(experts, rows, blocks).astype(np.float32)


def dequantize_projection(
    name: str,
    weights: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    bits: int,
    block_size: int,
) -> np.ndarray:
    """One projection's float32 ``[E, N, K]`` weights from its codes, scales and zero points.

    ``name`` (fc1, fc2, fc3) only labels errors. ``block_size`` 0 means one scale and zero point
    per output channel; B > 0 means one per block of B input features.
    """
    weights = np.asarray(weights)
    if weights.dtype != np.uint8 or weights.ndim != 3:
        raise ValueError(f"QMoE: {name} weights must be 3-D uint8, got {weights.dtype} {list(weights.shape)}")
    experts, rows, row_bytes = weights.shape
    in_features = row_bytes * 8 // bits
    blocked = block_size > 0
    if blocked and in_features % block_size:
        raise ValueError(
            f"QMoE: block_size={block_size} does not divide {name}'s {in_features} input features"
        )
    block = block_size if blocked else in_features
    blocks = in_features // block
    codes = unpack_codes(weights, bits, in_features).astype(np.float32)  # [E, N, K]
    scale = _scales_per_block(name, scales, experts, rows, blocks, blocked)
    zero = _zero_points_per_block(name, zero_points, bits, experts, rows, blocks, blocked)
    block_of = np.arange(in_features) // block  # input feature -> its block
    return ((codes - zero[:, :, block_of]) * scale[:, :, block_of]).astype(np.float32)


def _check_storage(attributes: dict[str, Any], bits: int, block_size: int) -> None:
    """Raise ValueError for the quantization attributes this oracle does not implement."""
    if bits not in QMOE_BITS:
        raise ValueError(f"QMoE: expert_weight_bits={bits} is not implemented (implemented: 4, 8)")
    if block_size < 0:
        raise ValueError(f"QMoE: block_size must be >= 0, got {block_size}")
    quant_type = attributes.pop("quant_type", "int")
    if (quant_type.decode() if isinstance(quant_type, bytes) else quant_type) != "int":
        raise ValueError(f"QMoE: quant_type={quant_type!r} is not implemented (only 'int')")
    if attributes.pop("weights_prepacked", -1) not in (-1, 0):
        raise ValueError("QMoE: weights_prepacked=1 (an execution provider's own layout) is not implemented")
    for fc in ("fc1", "fc2", "fc3"):
        if attributes.pop(f"{fc}_expert_weight_bits", bits) != bits:
            raise ValueError(f"QMoE: {fc}_expert_weight_bits differs from expert_weight_bits (mixed widths)")


def qmoe(
    x: np.ndarray,
    router_probs: np.ndarray,
    fc1_w: np.ndarray,
    fc1_scales: np.ndarray,
    fc1_b: np.ndarray | None,
    fc2_w: np.ndarray,
    fc2_scales: np.ndarray,
    fc2_b: np.ndarray | None,
    fc3_w: np.ndarray | None = None,
    fc3_scales: np.ndarray | None = None,
    fc3_b: np.ndarray | None = None,
    fc1_zero_points: np.ndarray | None = None,
    fc2_zero_points: np.ndarray | None = None,
    fc3_zero_points: np.ndarray | None = None,
    *,
    expert_weight_bits: int = 4,
    block_size: int = 0,
    **attributes: Any,
) -> np.ndarray:
    """Compute ``com.microsoft::QMoE`` as this module's docstring states.

    Positional arguments are the op's inputs 0-13 (None for an omitted optional one); keywords
    are its attributes with the op's defaults. The quantization attributes are handled here,
    the others are forwarded to :func:`moec.reference.ms_moe.ms_moe` (ValueError for what
    neither implements).
    """
    attributes = dict(attributes)
    _check_storage(attributes, expert_weight_bits, block_size)
    if fc3_w is None and (fc3_scales is not None or fc3_zero_points is not None):
        raise ValueError("QMoE: fc3 scales or zero points are given without fc3_experts_weights")
    if fc3_w is not None and fc3_scales is None:
        raise ValueError("QMoE: fc3_experts_weights needs fc3_scales")
    quantized = [("fc1", fc1_w, fc1_scales, fc1_zero_points), ("fc2", fc2_w, fc2_scales, fc2_zero_points)]
    if fc3_w is not None:
        quantized.append(("fc3", fc3_w, fc3_scales, fc3_zero_points))
    dense = [
        dequantize_projection(name, w, s, z, bits=expert_weight_bits, block_size=block_size)
        for name, w, s, z in quantized
    ]
    fc3_dense = dense[2] if fc3_w is not None else None
    return ms_moe(x, router_probs, dense[0], fc1_b, dense[1], fc2_b, fc3_dense, fc3_b, **attributes)
