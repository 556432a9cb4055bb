"""onnxruntime's transformer contrib ops: moec's Relax converters vs the numpy reference vs onnxruntime.

Small hand-made graphs of one op each (``moec.frontend.contrib_ops`` compiled by moec,
``moec.reference.contrib`` in the reference evaluator, and onnxruntime's own CPU kernels), at
two shapes of one build where the inputs have symbolic dims.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import check_artifact, compile_to

MS = "com.microsoft"


def _model(
    node: onnx.NodeProto, inputs: list, outputs: list, initializers: list | None = None
) -> onnx.ModelProto:
    graph = helper.make_graph([node], "contrib", inputs, outputs, initializer=initializers or [])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def _f32(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _feeds(shapes: dict[str, tuple], seed: int = 0) -> dict[str, np.ndarray]:
    rng = _rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def test_simplified_layer_norm_default_domain(tmp_path: Path) -> None:
    scale = numpy_helper.from_array(_rng(1).standard_normal(16).astype(np.float32), "scale")
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["y"], axis=-1, epsilon=1e-5)
    model = _model(node, [_f32("x", ["b", "s", 16])], [_f32("y", ["b", "s", 16])], [scale])
    session = compile_to(model, tmp_path)
    for shape in ((1, 3, 16), (2, 5, 16)):
        check_artifact(session, model, _feeds({"x": shape}))


def test_skip_simplified_layer_norm_with_bias_and_sum_output(tmp_path: Path) -> None:
    rng = _rng(2)
    inits = [
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "bias"),
    ]
    node = helper.make_node(
        "SkipSimplifiedLayerNormalization",
        ["x", "skip", "gamma", "bias"],
        ["y", "", "", "sum"],
        domain=MS,
        epsilon=1e-6,
    )
    shape = ["b", "s", 16]
    model = _model(
        node, [_f32("x", shape), _f32("skip", shape)], [_f32("y", shape), _f32("sum", shape)], inits
    )
    session = compile_to(model, tmp_path)
    for dims in ((1, 1, 16), (2, 7, 16)):
        check_artifact(session, model, _feeds({"x": dims, "skip": dims}, seed=dims[1]))


@pytest.mark.parametrize("optional", ["beta+bias", "none"])
def test_skip_layer_norm_with_and_without_beta_and_bias(optional: str, tmp_path: Path) -> None:
    rng = _rng(3)
    names = ["gamma", "beta", "bias"] if optional == "beta+bias" else ["gamma"]
    inits = [numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), n) for n in names]
    node = helper.make_node(
        "SkipLayerNormalization",
        ["x", "skip", *names],
        ["y", "mean", "inv_std", "sum"],
        domain=MS,
        epsilon=1e-5,
    )
    shape = ["b", "s", 16]
    stats = ["b", "s", 1]
    outputs = [_f32("y", shape), _f32("mean", stats), _f32("inv_std", stats), _f32("sum", shape)]
    model = _model(node, [_f32("x", shape), _f32("skip", shape)], outputs, inits)
    session = compile_to(model, tmp_path)
    for dims in ((1, 1, 16), (2, 7, 16)):
        feeds = _feeds({"x": dims, "skip": dims}, seed=dims[1])
        feeds["x"] += 3.0  # a mean far from 0: LayerNorm centres, RMSNorm would not
        check_artifact(session, model, feeds)


@pytest.mark.parametrize(
    "attrs", [{"transB": 1}, {"transA": 1, "alpha": 0.125}, {}], ids=["transB", "transA-alpha", "plain"]
)
def test_fused_matmul_transposes_and_scales(attrs: dict, tmp_path: Path) -> None:
    a_shape = ["b", 2, 8, 5] if attrs.get("transA") else ["b", 2, 5, 8]
    b_shape = [1, 2, 6, 8] if attrs.get("transB") else [1, 2, 8, 6]
    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain=MS, **attrs)
    model = _model(node, [_f32("a", a_shape), _f32("b", b_shape)], [_f32("y", ["b", 2, 5, 6])])
    session = compile_to(model, tmp_path)
    for batch in (1, 3):
        dims = {"a": (batch, *a_shape[1:]), "b": tuple(b_shape)}
        check_artifact(session, model, _feeds(dims, seed=batch))


def _caches(max_seq: int, half: int) -> list[onnx.TensorProto]:
    angles = np.arange(max_seq)[:, None] / (10000.0 ** (np.arange(half) / half))[None, :]
    return [
        numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
        numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin"),
    ]


@pytest.mark.parametrize(
    ("attrs", "half"),
    [
        ({}, 4),  # head size from cos_cache: 8, so 4 heads of 32
        ({"num_heads": 4, "interleaved": 1}, 4),
        ({"num_heads": 2, "rotary_embedding_dim": 8}, 4),  # partial rotary: 8 of each head's 16
    ],
)
def test_rotary_embedding_3d_with_position_offset(attrs: dict, half: int, tmp_path: Path) -> None:
    offset = numpy_helper.from_array(np.array([2], np.int64), "offset")
    node = helper.make_node("RotaryEmbedding", ["x", "offset", "cos", "sin"], ["y"], domain=MS, **attrs)
    model = _model(node, [_f32("x", [1, "s", 32])], [_f32("y", [1, "s", 32])], [offset, *_caches(32, half)])
    session = compile_to(model, tmp_path)
    for seq in (1, 6):
        check_artifact(session, model, _feeds({"x": (1, seq, 32)}, seed=seq))


def test_rotary_embedding_4d_with_position_ids(tmp_path: Path) -> None:
    node = helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain=MS)
    inputs = [_f32("x", [2, 3, "s", 8]), helper.make_tensor_value_info("pos", TensorProto.INT64, [2, "s"])]
    model = _model(node, inputs, [_f32("y", [2, 3, "s", 8])], _caches(16, 4))
    session = compile_to(model, tmp_path)
    for seq in (1, 5):
        feeds = _feeds({"x": (2, 3, seq, 8)}, seed=seq)
        feeds["pos"] = _rng(seq).integers(0, 16, (2, seq)).astype(np.int64)
        check_artifact(session, model, feeds)


@pytest.mark.parametrize("kv_rank", [3, 4])
def test_multi_head_attention_with_attention_bias(kv_rank: int, tmp_path: Path) -> None:
    heads, head = 4, 8
    node = helper.make_node(
        "MultiHeadAttention", ["q", "k", "v", "", "", "mask"], ["y"], domain=MS, num_heads=heads
    )
    kv = ["b", "t", heads * head] if kv_rank == 3 else ["b", heads, "t", head]
    inputs = [
        _f32("q", ["b", "s", heads * head]),
        _f32("k", kv),
        _f32("v", kv),
        _f32("mask", [1, 1, "s", "t"]),
    ]
    model = _model(node, inputs, [_f32("y", ["b", "s", heads * head])])
    session = compile_to(model, tmp_path)
    for batch, seq in ((1, 1), (2, 5)):
        kv_shape = (batch, seq, heads * head) if kv_rank == 3 else (batch, heads, seq, head)
        feeds = _feeds({"q": (batch, seq, heads * head), "k": kv_shape, "v": kv_shape}, seed=seq)
        causal = np.triu(np.full((seq, seq), -1e9, np.float32), 1)
        feeds["mask"] = causal[None, None]
        check_artifact(session, model, feeds)


def test_multi_head_attention_with_qkv_bias_and_scale(tmp_path: Path) -> None:
    bias = numpy_helper.from_array(_rng(5).standard_normal(3 * 16).astype(np.float32), "bias")
    node = helper.make_node(
        "MultiHeadAttention", ["q", "k", "v", "bias"], ["y"], domain=MS, num_heads=2, scale=0.3
    )
    inputs = [_f32(n, [1, 4, 16]) for n in ("q", "k", "v")]
    model = _model(node, inputs, [_f32("y", [1, 4, 16])], [bias])
    session = compile_to(model, tmp_path)
    check_artifact(session, model, _feeds({n: (1, 4, 16) for n in ("q", "k", "v")}))
