"""onnxruntime's quantized com.microsoft::QMoE node compiled end to end, against onnxruntime's
own output on the same graph and against the numpy oracle (moec.reference.qmoe)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from moec.compiler.compile import compile_model
from moec.errors import MoecError
from moec.frontend.importer import find_blocks
from moec.kernels.formats import REDUCED_ARITHMETIC_TOLERANCE
from moec.options import CompileOptions
from moec.reference.evaluator import QMoE
from moec.reference.stored import run_stored_reference
from moec.runtime.session import ArtifactSession
from moec.targets import load_target
from moec.verify import layer_plans
from tests.helpers import (
    FP32_ATOL,
    REPO_ROOT,
    assert_close,
    assert_nothing_written,
    assert_user_error,
    compile_to,
    invoke,
    tokens_input,
)
from tests.zoo.qmoe import build_qmoe_model

TOKENS = [1, 6, 37]
HIDDEN = 128
SLOW = pytest.mark.slow


def onnxruntime_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """``y`` from onnxruntime's CPU provider."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def check_compiled(model: onnx.ModelProto, directory: Path, hidden: int, ort_exact: bool) -> None:
    """Compile ``model`` (input ``x``, output ``y``) into one MoE layer; at every token count its
    output matches the numpy oracle and, where ``ort_exact``, onnxruntime (max abs error 1e-4).
    By default (``--precision auto``) the experts are stored as the model's own INT8 integers
    and steps whenever they fit INT8 (always at 4 bits), else fp32."""
    session = compile_to(model, directory)
    assert len(session.manifest["layers"]) == 1
    layer = session.manifest["layers"][0]
    (qmoe,) = [n for n in model.graph.node if n.op_type == "QMoE"]
    bits = next((a.i for a in qmoe.attribute if a.name == "expert_weight_bits"), 4)
    block = next((a.i for a in qmoe.attribute if a.name == "block_size"), 0)
    if bits == 4:
        assert {e["precision"] for e in layer["plan"]} == {"int8"}, layer["plan"]
    if layer["plan"][0]["precision"] == "int8":
        assert layer["int8_source"] == "model" and layer["int8_group"] == block
    oracle = ReferenceEvaluator(model, new_ops=[QMoE])
    for tokens in TOKENS:
        x = tokens_input(tokens, hidden)
        actual = session.run({"x": x})["y"]
        assert_close(actual, oracle.run(["y"], {"x": x})[0], FP32_ATOL, f"{tokens} tokens vs numpy oracle")
        if ort_exact:
            assert_close(actual, onnxruntime_output(model, x), FP32_ATOL, f"{tokens} tokens vs onnxruntime")


# (id, builder options, onnxruntime's CPU kernel computes the op as documented, marks)
VARIANTS = [
    ("8bit-channel-relu", dict(bits=8, activation="relu"), True, ()),
    ("4bit-block32-zp-silu", dict(bits=4, block_size=32, zero_points=True, activation="silu"), True, ()),
    (
        "4bit-block64-gpt-oss-swiglu",
        dict(bits=4, block_size=64, activation="swiglu", alpha=1.702, beta=1.0, limit=7.0),
        True,
        (),
    ),
    ("8bit-channel-zp-swiglu", dict(bits=8, zero_points=True, activation="swiglu"), True, SLOW),
    ("4bit-channel-relu", dict(bits=4, activation="relu"), True, SLOW),
    ("4bit-channel-zp-gelu", dict(bits=4, zero_points=True, activation="gelu"), True, SLOW),
    ("4bit-block32-swiglu", dict(bits=4, block_size=32, activation="swiglu"), True, SLOW),
    (
        "4bit-block64-zp-identity",
        dict(bits=4, block_size=64, zero_points=True, activation="identity"),
        True,
        SLOW,
    ),
    ("4bit-block128-silu", dict(bits=4, block_size=128, activation="silu"), True, SLOW),
    (
        "4bit-block128-zp-swiglu",
        dict(bits=4, block_size=128, zero_points=True, activation="swiglu"),
        True,
        SLOW,
    ),
    ("4bit-fp16-scales", dict(bits=4, block_size=32, zero_points=True, scale_dtype=np.float16), True, SLOW),
    # onnxruntime's 8-bit block-wise CPU path rounds activations to int8 (see
    # tests/unit/test_reference_qmoe.py): numpy only
    ("8bit-block32-relu", dict(bits=8, block_size=32, activation="relu"), False, SLOW),
    (
        "8bit-block64-zp-swiglu",
        dict(bits=8, block_size=64, zero_points=True, activation="swiglu"),
        False,
        SLOW,
    ),
    ("8bit-block128-zp-silu", dict(bits=8, block_size=128, zero_points=True, activation="silu"), False, SLOW),
    # onnxruntime's CPU kernel runs no fc3 or swiglu_fusion 2, and ignores normalize_routing_weights=0
    ("4bit-swiglu-fc3", dict(bits=4, block_size=32, activation="swiglu", swiglu_fusion=0), False, SLOW),
    ("4bit-swiglu-concatenated", dict(bits=4, activation="swiglu", swiglu_fusion=2), False, SLOW),
    ("8bit-unnormalised-top1", dict(bits=8, activation="silu", k=1, normalize=0), False, SLOW),
]


@pytest.mark.parametrize(
    ("options", "ort_exact"),
    [pytest.param(*v[1:3], marks=v[3]) for v in VARIANTS],
    ids=[v[0] for v in VARIANTS],
)
def test_qmoe_variant(tmp_path, options, ort_exact):
    model = build_qmoe_model(hidden=HIDDEN, inter=128, experts=4, k=options.pop("k", 2), seed=11, **options)
    check_compiled(model, tmp_path, HIDDEN, ort_exact)


STORED = dict(hidden=HIDDEN, inter=128, experts=4, k=2, seed=11)


@pytest.mark.parametrize(
    ("options", "per_weight"),
    [
        (dict(bits=4, block_size=32, zero_points=True, activation="swiglu"), 1 + 4 / 32),
        pytest.param(dict(bits=8, activation="swiglu"), 1 + 4 / HIDDEN, marks=SLOW),
    ],
    ids=["4bit-block32-zp", "8bit-channel"],
)
def test_qmoe_is_stored_as_its_own_int8_exactly(tmp_path, options, per_weight):
    """A QMoE layer is stored int8 by default, its weights the model's integers (4-bit ones a
    byte each) with its steps: about a quarter of the fp32 bytes, the same outputs as
    onnxruntime to 1e-4 (no requantization). ``--precision fp32`` stores the dequantized
    weights; ``--precision int8 --int8-group 64`` still keeps the model's own blocks."""
    model = build_qmoe_model(**STORED, **options)
    onnx.save(model, tmp_path / "model.onnx")
    sizes = {}
    for name, extra in (
        ("auto", {}),
        ("fp32", {"precision": "fp32"}),
        ("int8", {"precision": "int8", "int8_group": 64}),
    ):
        out = tmp_path / name
        compile_model(tmp_path / "model.onnx", out, CompileOptions(**extra))
        layer = ArtifactSession(out).manifest["layers"][0]
        sizes[name] = sum(entry["bytes"] for entry in layer["plan"])
        expected = "fp32" if name == "fp32" else "int8"
        assert {entry["precision"] for entry in layer["plan"]} == {expected}
        assert layer.get("int8_source") == (None if name == "fp32" else "model")
        assert layer["int8_group"] == (None if name == "fp32" else options.get("block_size", 0))
        session = ArtifactSession(out)
        for tokens in (1, 6):
            x = tokens_input(tokens, HIDDEN)
            assert_close(
                session.run({"x": x})["y"], onnxruntime_output(model, x), FP32_ATOL, f"{name}: {tokens}"
            )
    matrices = 4 * 3 * 128 * HIDDEN  # experts × (gate, up, down) × [128, 128]
    biases = 4 * 4 * (128 + 128 + HIDDEN)
    assert sizes["fp32"] == 4 * matrices + biases
    assert sizes["auto"] == sizes["int8"] == round(per_weight * matrices) + biases


@pytest.mark.skipif(load_target("host").int8_dot is None, reason="this CPU does not compute int8")
def test_qmoe_weights_multiplied_in_int8(tmp_path):
    """int8-dot on a QMoE layer: the model's integers multiplied with INT8 activations, checked
    against the oracle that rounds the activations the same way (the documented relative bound,
    most outputs within 1e-4) and near onnxruntime's float result."""
    model = build_qmoe_model(**STORED, bits=4, block_size=64, activation="swiglu")
    onnx.save(model, tmp_path / "model.onnx")
    compile_model(tmp_path / "model.onnx", tmp_path / "out", CompileOptions(precision="int8-dot"))
    session = ArtifactSession(tmp_path / "out")
    assert session.manifest["layers"][0]["int8_source"] == "model"
    for tokens in (1, 6):
        x = tokens_input(tokens, HIDDEN)
        actual = session.run({"x": x})["y"]
        expected = run_stored_reference(model, {"x": x}, layer_plans(session.manifest))["y"]
        error = np.abs(actual - expected)
        assert error.max() <= REDUCED_ARITHMETIC_TOLERANCE * np.abs(expected).max()
        assert np.median(error) <= FP32_ATOL
        assert 0 < np.abs(actual - onnxruntime_output(model, x)).max() < 0.05 * np.abs(expected).max()


def test_bundled_example(tmp_path):
    """examples/qmoe_tiny.onnx (4-bit, blocks of 32, zero points, GPT-OSS SwiGLU) compiles and matches."""
    check_compiled(onnx.load(REPO_ROOT / "examples" / "qmoe_tiny.onnx"), tmp_path, 64, ort_exact=True)


def test_layer_names_its_source():
    (block,) = find_blocks(build_qmoe_model(bits=8))
    assert block.layer.source == "com.microsoft::QMoE 'qmoe'"


def _with_attribute(model: onnx.ModelProto, name: str, value: int) -> onnx.ModelProto:
    """``model`` with the QMoE node's attribute ``name`` set to ``value``."""
    node = next(n for n in model.graph.node if n.op_type == "QMoE")
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(onnx.helper.make_attribute(name, value))
    return model


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            _with_attribute(build_qmoe_model(bits=4), "expert_weight_bits", 3),
            "expert_weight_bits=3 is not supported (supported: 4, 8)",
        ),
        (
            _with_attribute(build_qmoe_model(bits=4), "block_size", 48),
            "block_size=48 does not divide fc1's 64 input features",
        ),
        (
            _with_attribute(build_qmoe_model(bits=4), "fc2_expert_weight_bits", 8),
            "fc2_expert_weight_bits differs from expert_weight_bits",
        ),
    ],
    ids=["bits-3", "block-48", "mixed-widths"],
)
def test_bad_qmoe_is_a_one_line_error(tmp_path, model, message):
    """``moec compile`` exits 1 with one error line naming the node and the fault, nothing written."""
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    out = tmp_path / "artifact"
    assert_user_error(invoke("compile", path, "-o", out), "node 'qmoe' (com.microsoft::QMoE)", message)
    assert_nothing_written(out)


def test_computed_qmoe_weights_are_refused(tmp_path):
    model = build_qmoe_model(bits=8)
    weights = next(i for i in model.graph.initializer if i.name == "fc1_w")
    model.graph.initializer.remove(weights)
    model.graph.input.append(onnx.helper.make_tensor_value_info("fc1_w", onnx.TensorProto.UINT8, [4, 64, 64]))
    path = tmp_path / "computed.onnx"
    onnx.save(model, path)
    with pytest.raises(MoecError, match="input 'fc1_w' must be a constant initializer") as raised:
        compile_model(path, tmp_path / "artifact", CompileOptions(target="host"))
    assert "\n" not in str(raised.value)
