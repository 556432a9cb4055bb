"""Checks the numpy ``com.microsoft::QMoE`` oracle (moec.reference.qmoe) against onnxruntime 1.32 CPU.

The expert codes here are uniformly random over all ``2^bits`` values (every nibble and byte
value occurs) and the zero points too, so packing, nibble order, zero points and scale
layouts are exercised everywhere. Further tests pin the onnxruntime behaviour the oracle
documents: the defaults, ignored padding bits, that its CPU kernel always renormalises the
top-k and that its 8-bit block-wise path quantizes activations to int8.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moec.reference.ms_moe import ms_moe_routing
from moec.reference.qmoe import dequantize_projection, qmoe, unpack_codes
from tests.helpers import assert_close
from tests.zoo.qmoe import pack_codes

ATOL = 1e-5
EXPERTS, HIDDEN, INTER, TOKENS = 4, 256, 128, 9


def ort_qmoe(inputs: list[np.ndarray | None], x: np.ndarray, logits: np.ndarray, **attrs: Any) -> np.ndarray:
    """onnxruntime's CPU output of one QMoE node whose inputs 2.. are ``inputs`` (None = omitted)."""
    names, inits = ["x", "logits"], []
    for position, value in enumerate(inputs, start=2):
        names.append(f"in{position}" if value is not None else "")
        if value is not None:
            inits.append(numpy_helper.from_array(value, f"in{position}"))
    while names[-1] == "":
        names.pop()
    node = helper.make_node("QMoE", names, ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node],
        "bare_qmoe",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(logits.shape)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=10,
    )
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "logits": logits})[0]


def random_projection(
    rng: np.random.Generator, rows: int, cols: int, bits: int, block_size: int, zero_points: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(packed codes, scales, packed zero points or None) with uniformly random codes.

    Scales are sized so that products stay O(1) whatever the zero points are.
    """
    blocks = cols // block_size if block_size else 1
    codes = rng.integers(0, 1 << bits, (EXPERTS, rows, cols), dtype=np.uint8)
    scale_shape = (EXPERTS, rows, blocks) if block_size else (EXPERTS, rows)
    scales = (rng.uniform(0.2, 2.0, scale_shape) / (2 ** (bits - 1) * cols**0.5)).astype(np.float32)
    zeros = None
    if zero_points:
        zeros = pack_codes(rng.integers(0, 1 << bits, scale_shape, dtype=np.uint8), bits)
    return pack_codes(codes, bits), scales, zeros


def random_case(
    bits: int,
    block_size: int,
    zero_points: bool,
    activation: str = "relu",
    seed: int = 0,
    hidden: int = HIDDEN,
    inter: int = INTER,
) -> tuple[list[np.ndarray | None], np.ndarray, np.ndarray]:
    """QMoE inputs 2..12 (fc3 omitted) for one expert layout, plus ``x`` and router logits."""
    rng = np.random.default_rng(seed)
    fc1_rows = 2 * inter if activation == "swiglu" else inter
    fc1_w, fc1_s, fc1_z = random_projection(rng, fc1_rows, hidden, bits, block_size, zero_points)
    fc2_w, fc2_s, fc2_z = random_projection(rng, hidden, inter, bits, block_size, zero_points)
    fc1_b = rng.normal(0.0, 0.1, (EXPERTS, fc1_rows)).astype(np.float32)
    fc2_b = rng.normal(0.0, 0.1, (EXPERTS, hidden)).astype(np.float32)
    x = rng.standard_normal((TOKENS, hidden)).astype(np.float32)
    logits = rng.standard_normal((TOKENS, EXPERTS)).astype(np.float32)
    return [fc1_w, fc1_s, fc1_b, fc2_w, fc2_s, fc2_b, None, None, None, fc1_z, fc2_z], x, logits


def attributes(bits: int, block_size: int, activation: str = "relu", **extra: Any) -> dict[str, Any]:
    """QMoE attributes for a random case (top-2, renormalised; GPT-OSS clamps for swiglu)."""
    attrs: dict[str, Any] = dict(
        expert_weight_bits=bits, k=2, activation_type=activation, normalize_routing_weights=1
    )
    if block_size:
        attrs["block_size"] = block_size
    if activation == "swiglu":
        attrs.update(swiglu_fusion=1, activation_alpha=1.702, activation_beta=1.0, swiglu_limit=7.0)
    return {**attrs, **extra}


def check_against_ort(
    inputs: list[np.ndarray | None], x: np.ndarray, logits: np.ndarray, **attrs: Any
) -> None:
    """The oracle and onnxruntime agree on this node."""
    assert_close(
        qmoe(x, logits, *inputs, **attrs), ort_qmoe(inputs, x, logits, **attrs), ATOL, "oracle vs ORT"
    )


# --------------------------------------------------------------------------- against onnxruntime

LAYOUTS = [(bits, block) for bits in (4, 8) for block in (0, 32, 64, 128) if not (bits == 8 and block)]


@pytest.mark.parametrize("zero_points", [False, True], ids=["no-zp", "zp"])
@pytest.mark.parametrize(("bits", "block_size"), LAYOUTS, ids=[f"{b}bit-block{s}" for b, s in LAYOUTS])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "identity", "swiglu"])
def test_oracle_matches_onnxruntime(bits, block_size, zero_points, activation):
    inputs, x, logits = random_case(bits, block_size, zero_points, activation, seed=bits + block_size)
    check_against_ort(inputs, x, logits, **attributes(bits, block_size, activation))


def int8_activations(a: np.ndarray, block_size: int) -> np.ndarray:
    """``a`` rounded to int8 per row and block the way MLAS's int8 GEMMs quantize activations."""
    blocks = a.reshape(a.shape[0], -1, block_size)
    scale = np.abs(blocks).max(-1, keepdims=True) / 127
    scale[scale == 0] = 1
    return (np.rint(blocks / scale) * scale).reshape(a.shape).astype(np.float32)


@pytest.mark.parametrize("zero_points", [False, True], ids=["no-zp", "zp"])
@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_ort_8bit_blockwise_differs_only_by_int8_activations(block_size, zero_points):
    """ORT's 8-bit block-wise CPU path quantizes both GEMMs' activations to int8, so it is
    compared with the oracle's weights and routing plus that rounding (relu experts)."""
    inputs, x, logits = random_case(8, block_size, zero_points, seed=block_size)
    fc1_w, fc1_s, fc1_b, fc2_w, fc2_s, fc2_b, *_, fc1_z, fc2_z = inputs
    w1 = dequantize_projection("fc1", fc1_w, fc1_s, fc1_z, bits=8, block_size=block_size)
    w2 = dequantize_projection("fc2", fc2_w, fc2_s, fc2_z, bits=8, block_size=block_size)
    experts, weights = ms_moe_routing(logits, k=2, normalize_routing_weights=1)
    emulated = np.zeros_like(x)
    for t, (row_experts, row_weights) in enumerate(zip(experts, weights, strict=True)):
        for e, weight in zip(row_experts, row_weights, strict=True):
            h = np.maximum(int8_activations(x[t : t + 1], block_size) @ w1[e].T + fc1_b[e], 0)
            emulated[t] += weight * (int8_activations(h, block_size) @ w2[e].T + fc2_b[e])[0]
    actual = ort_qmoe(inputs, x, logits, **attributes(8, block_size))
    assert_close(actual, emulated, ATOL, "ORT vs oracle with int8 activations")
    assert np.abs(actual - qmoe(x, logits, *inputs, **attributes(8, block_size))).max() > 1e-3


def test_default_bits_are_4():
    inputs, x, logits = random_case(4, 32, True)
    attrs = attributes(4, 32)
    del attrs["expert_weight_bits"]
    check_against_ort(inputs, x, logits, **attrs)


@pytest.mark.parametrize(("bits", "block_size"), [(8, 0), (4, 0), (4, 64)])
def test_absent_zero_points_mean_half_range(bits, block_size):
    inputs, x, logits = random_case(bits, block_size, False)
    for slot, scales in ((9, inputs[1]), (10, inputs[4])):  # zero points shaped like the scales
        inputs[slot] = pack_codes(np.full(scales.shape, 2 ** (bits - 1), dtype=np.uint8), bits)
    explicit = ort_qmoe(inputs, x, logits, **attributes(bits, block_size))
    implicit = qmoe(x, logits, *inputs[:9], **attributes(bits, block_size))
    assert_close(implicit, explicit, ATOL, "default zero point vs explicit 2^(bits-1)")


def test_float16_scales():
    inputs, x, logits = random_case(4, 32, True)
    inputs[1], inputs[4] = inputs[1].astype(np.float16), inputs[4].astype(np.float16)
    check_against_ort(inputs, x, logits, **attributes(4, 32))


def test_per_channel_scales_may_be_3d():
    inputs, x, logits = random_case(8, 0, True)
    inputs[1], inputs[4] = inputs[1][..., None], inputs[4][..., None]
    check_against_ort(inputs, x, logits, **attributes(8, 0))


def test_zero_point_padding_bits_are_ignored():
    """96 and 160 inputs in blocks of 32 give odd block counts: the last zero-point byte of a
    row has an unused high nibble, set to 0xF here."""
    inputs, x, logits = random_case(4, 32, True, hidden=96, inter=160)
    for slot in (9, 10):
        inputs[slot][..., -1] |= 0xF0
    check_against_ort(inputs, x, logits, **attributes(4, 32))


def test_fc3_equals_interleaved_fc1():
    """ORT's CPU kernel cannot run fc3; separate gate (fc1) and up (fc3) codes must give what
    the ORT-checked interleaved fc1 (``swiglu_fusion=1``) with the same rows gives."""
    rng = np.random.default_rng(3)
    gate = random_projection(rng, INTER, HIDDEN, 4, 32, True)
    up = random_projection(rng, INTER, HIDDEN, 4, 32, True)
    fc2_w, fc2_s, fc2_z = random_projection(rng, HIDDEN, INTER, 4, 32, True)
    x = rng.standard_normal((TOKENS, HIDDEN)).astype(np.float32)
    logits = rng.standard_normal((TOKENS, EXPERTS)).astype(np.float32)

    def interleave(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.stack([a, b], axis=2).reshape(a.shape[0], 2 * a.shape[1], *a.shape[2:])

    blocks = HIDDEN // 32
    fused_z = pack_codes(interleave(unpack_codes(gate[2], 4, blocks), unpack_codes(up[2], 4, blocks)), 4)
    fused = [interleave(gate[0], up[0]), interleave(gate[1], up[1]), None, fc2_w, fc2_s, None]
    attrs = attributes(4, 32, "swiglu")
    expected = ort_qmoe([*fused, None, None, None, fused_z, fc2_z], x, logits, **attrs)
    separate = [gate[0], gate[1], None, fc2_w, fc2_s, None, up[0], up[1], None, gate[2], fc2_z, up[2]]
    actual = qmoe(x, logits, *separate, **{**attrs, "swiglu_fusion": 0})
    assert_close(actual, expected, ATOL, "fc3 oracle vs ORT's interleaved fc1")


def test_ties_go_to_the_higher_expert():
    inputs, x, _ = random_case(8, 0, False)
    logits = np.zeros((TOKENS, EXPERTS), dtype=np.float32)
    logits[1] = [1, 2, 2, 0]
    logits[2] = [3, 3, 3, 3]
    for k in (1, 2):
        check_against_ort(inputs, x, logits, **attributes(8, 0, k=k))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_ort_cpu_always_renormalises(k):
    """Pinned divergence: ORT 1.32's CPU QMoE ignores normalize_routing_weights=0."""
    inputs, x, logits = random_case(4, 32, True)
    ignored = ort_qmoe(inputs, x, logits, **attributes(4, 32, normalize_routing_weights=0, k=k))
    assert_close(qmoe(x, logits, *inputs, **attributes(4, 32, k=k)), ignored, ATOL, "renormalised")
    unnormalised = qmoe(x, logits, *inputs, **attributes(4, 32, normalize_routing_weights=0, k=k))
    assert np.abs(unnormalised - ignored).max() > 1e-3


# --------------------------------------------------------------------------- the oracle alone


def test_unpack_codes_reads_low_bits_first():
    packed = np.array([[0x21, 0x43, 0xF5]], dtype=np.uint8)
    np.testing.assert_array_equal(unpack_codes(packed, 4, 5), [[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(unpack_codes(packed, 8, 3), [[0x21, 0x43, 0xF5]])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(expert_weight_bits=3), "expert_weight_bits=3 is not implemented"),
        (dict(block_size=48), "block_size=48 does not divide fc1's 256 input features"),
        (dict(block_size=-32), "block_size must be >= 0"),
        (dict(quant_type="fp8"), "quant_type='fp8' is not implemented"),
        (dict(weights_prepacked=1), "weights_prepacked=1"),
        (dict(fc2_expert_weight_bits=8), "mixed widths"),
    ],
)
def test_oracle_rejects(change, message):
    inputs, x, logits = random_case(4, 32, False)
    with pytest.raises(ValueError, match=message):
        qmoe(x, logits, *inputs, **{**attributes(4, 32), **change})


def test_oracle_rejects_misshaped_scales():
    inputs, x, logits = random_case(4, 32, False)
    inputs[1] = inputs[1][..., :-1]
    with pytest.raises(ValueError, match=r"fc1 scales must have shape \[4, 128, 8\]"):
        qmoe(x, logits, *inputs, **attributes(4, 32))
