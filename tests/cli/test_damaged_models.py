"""Damaged or inconsistent models the fuzzer (tests/fuzz/) found moec failing on with an internal
error (exit 3) or stray output: each is one clear ``moec: error:`` line naming the file and the
tensor or node at fault, exit 1, and nothing else on stdout or stderr.

Each model is the smallest that showed one class of failure; the fuzzer's mutant that found it
is named beside it.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from moec.runtime.session import ArtifactSession
from tests.helpers import assert_nothing_written, assert_user_error, check_artifact, invoke, tokens_input
from tests.zoo.ms_moe import build_ms_moe_model
from tests.zoo.standard import OPSET, build_dense_onehot_moe

H = 4


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write ``model`` without validating it (these models are broken on purpose)."""
    path.write_bytes(model.SerializeToString())
    return path


def matmul_model(
    weight: onnx.TensorProto | None = None,
    x_dims: tuple = ("tokens", H),
    extra_nodes: tuple[onnx.NodeProto, ...] = (),
    reads: str = "x",
) -> onnx.ModelProto:
    """``y = reads @ w`` (``w``: ``weight``, default a float ``[H, H]``), where ``extra_nodes``
    compute ``reads`` from the input ``x``."""
    weight = weight or numpy_helper.from_array(np.eye(H, dtype=np.float32), "w")
    graph = helper.make_graph(
        [*extra_nodes, helper.make_node("MatMul", [reads, "w"], ["y"], name="mm")],
        "damaged",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", H])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def set_attribute(node: onnx.NodeProto, name: str, value: object) -> None:
    """Give ``node`` the attribute ``name`` = ``value``, replacing any it has."""
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, value)])


def raw_tensor(name: str, data_type: int, dims: list[int], data: bytes) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=data_type, raw_data=data)
    tensor.dims.extend(dims)
    return tensor


def _undefined_output() -> onnx.ModelProto:
    model = matmul_model()
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.UNDEFINED
    return model


def _reshape_to(shape: list[int]) -> onnx.ModelProto:
    reshape = helper.make_node("Reshape", ["x", "shape"], ["x2"], name="bad_reshape")
    model = matmul_model(extra_nodes=(reshape,), reads="x2")
    model.graph.initializer.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), "shape"))
    return model


EYE = np.eye(H, dtype=np.float32).tobytes()

LOADER_CASES = {
    # mutant 0 of seed 1: an element type onnx does not define (KeyError: 99)
    "undefined element type": (
        matmul_model(raw_tensor("w", 99, [H, H], EYE)),
        ["initializer 'w'", "element type 99"],
    ),
    # mutant 50 of seed 2: raw data longer than the dims need (onnx's checker only sees too short)
    "raw data longer than its dims": (
        matmul_model(raw_tensor("w", TensorProto.FLOAT, [H, H - 1], EYE)),
        ["initializer 'w'", "holds 64 bytes", "need 48"],
    ),
    "element type reread as narrower": (
        matmul_model(raw_tensor("w", TensorProto.FLOAT16, [H, H], EYE)),
        ["initializer 'w'", "FLOAT16 need 32"],
    ),
    # mutant 226 of seed 2: a negative input dimension (numpy: negative dimensions are not allowed)
    "negative input dimension": (matmul_model(x_dims=(-7, H)), ["input 'x'", "dimension -7"]),
    # mutant 133 of seed 2: a dimension past any memory (numpy: array is too big)
    "huge input dimension": (matmul_model(x_dims=(2**62, H)), ["input 'x'", f"dimension {2**62}"]),
    # mutant 947 of seed 0: an input dimension fixed to 0 (confirmation: max of an empty array;
    # then TVM: failed to vectorize a loop of extent 0)
    "input dimension fixed to 0": (matmul_model(x_dims=(0, H)), ["input 'x'", "dimension 0 fixed to 0"]),
    "huge element count": (matmul_model(x_dims=(2**20, 2**20)), ["input 'x'", f"{2**40} elements"]),
    # mutant 537 of seed 4: a dimension name TVM parses as arithmetic ('2**40': 2 * v * 40),
    # which it then cannot compute from the input (InternalError in the VM's shape lowering)
    "input dimension named like arithmetic": (
        matmul_model(x_dims=("tokens", "2**40")),
        ["input 'x'", "dimension 1 '2**40'"],
    ),
    # mutant 8 of seed 5: an output of undefined element type (KeyError: 0 writing the manifest)
    "output of undefined element type": (_undefined_output(), ["output 'y'", "element type 0"]),
    # mutant 479 of seed 5: bit flips in a Reshape's shape (TVM: literal exceeds range of int64)
    "reshape to a shape past any memory": (
        _reshape_to([2207613190209, -1, 131105]),
        ["node 'bad_reshape' (Reshape)", "'shape'"],
    ),
    # mutant 233 of seed 2: a Constant holding no value (onnx's reference: AttributeError)
    "constant without a value": (
        matmul_model(extra_nodes=(helper.make_node("Constant", [], ["c"], name="c0"),)),
        ["node 'c0' (Constant)", "holds 0 values"],
    ),
}


@pytest.mark.parametrize("case", sorted(LOADER_CASES))
@pytest.mark.parametrize("command", ["inspect", "compile"])
def test_damaged_tensor_or_shape_is_one_line(tmp_path: Path, case: str, command: str) -> None:
    model, culprits = LOADER_CASES[case]
    path = save(model, tmp_path / "model.onnx")
    out = tmp_path / "out"
    args = [command, path, "-o", out] if command == "compile" else [command, path]
    assert_user_error(invoke(*args), path, *culprits)
    assert_nothing_written(out)


def test_name_that_is_not_utf8(tmp_path: Path) -> None:
    """Mutant 129 of seed 3 (a flipped byte in a tensor name): onnx's checker, naming the tensor
    in its error, raised UnicodeDecodeError."""
    data = matmul_model(reads="xz").SerializeToString().replace(b"xz", b"x\xe0", 1)
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    line = assert_user_error(invoke("inspect", path), path)
    assert "not UTF-8 text" in line


def test_nan_attribute_of_a_fused_moe(tmp_path: Path) -> None:
    """Mutant 182 of seed 2: ``activation_beta=nan`` reached the kernel's TVMScript (DiagnosticError)."""
    model = build_ms_moe_model(activation="swiglu", swiglu_fusion=1, hidden=8, inter=16, experts=4, k=2)
    node = next(n for n in model.graph.node if n.op_type == "MoE")
    set_attribute(node, "activation_beta", math.nan)
    path = save(model, tmp_path / "model.onnx")
    assert_user_error(invoke("inspect", path), node.name, "activation_beta=nan")


def test_mistyped_attribute_of_a_fused_moe(tmp_path: Path) -> None:
    """Mutant 982 of seed 4: ``expert_weight_bits`` given as a string (ValueError: int(b'x'))."""
    model = build_ms_moe_model(activation="swiglu", swiglu_fusion=1, hidden=8, inter=16, experts=4, k=2)
    node = next(n for n in model.graph.node if n.op_type == "MoE")
    set_attribute(node, "k", "two")
    path = save(model, tmp_path / "model.onnx")
    assert_user_error(invoke("inspect", path), node.name, "attribute k must be an integer")


def test_experts_of_different_widths_compile_densely(tmp_path: Path) -> None:
    """Mutant 908 of seed 4 (one expert's weights reshaped): recognition concatenated experts of
    different shapes (ValueError). Such experts are no one MoE layer: the block stays dense."""
    model = build_dense_onehot_moe(hidden=8, inter=12, experts=3, k=2, activation="relu")
    for name, shape in (("moe0/expert1/up", (8, 13)), ("moe0/expert1/down", (13, 8))):
        tensor = next(t for t in model.graph.initializer if t.name == name)
        wider = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.3
        tensor.CopyFrom(numpy_helper.from_array(wider, name))
    path = save(model, tmp_path / "model.onnx")
    result = invoke("compile", path, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    session = ArtifactSession(tmp_path / "out")
    assert session.manifest["layers"] == []
    check_artifact(session, model, {"x": tokens_input(5, 8)})


def test_node_tvm_cannot_convert_is_named_without_tvm_output(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Mutant 104 of seed 3 (a TopK TVM converts only sorted): the error line was followed by
    TVM's block builder warning on stderr, after a page of TVMScript on stdout."""
    k = numpy_helper.from_array(np.array([H], dtype=np.int64), "k")
    topk = helper.make_node("TopK", ["x", "k"], ["top", "top_index"], name="unsorted_topk", sorted=0)
    model = matmul_model(extra_nodes=(topk,), reads="top")
    model.graph.initializer.append(k)
    path = save(model, tmp_path / "model.onnx")
    result = invoke("compile", path, "-o", tmp_path / "out")
    assert_user_error(result, path, "node 'unsorted_topk' (TopK)", "could not convert", "sorted")
    assert result.stdout == "", result.stdout[:200]
    del result
    gc.collect()  # the block builder warns when it is destroyed
    assert "BlockBuilder" not in capfd.readouterr().err


def test_axis_past_the_input_rank(tmp_path: Path) -> None:
    """Mutant 997 of seed 6 (ScatterElements axis 7 of a rank-2 input): TVM's converter took it
    and its lowering failed (IndexError)."""
    softmax = helper.make_node("Softmax", ["x"], ["s"], name="bad_softmax", axis=7)
    path = save(matmul_model(extra_nodes=(softmax,), reads="s"), tmp_path / "model.onnx")
    assert_user_error(invoke("compile", path, "-o", tmp_path / "out"), path, "'bad_softmax'", "axis 7")


def test_product_of_shapes_tvm_cannot_match(tmp_path: Path) -> None:
    """Mutant 123 of seed 3 (an expert stack given a fourth dim): a batched MatMul whose batch
    dims TVM cannot prove broadcast got no shape, and lowering failed on it (TypeError)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "z"], ["y"], name="bmm")],
        "batched",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", H, H]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", H, H]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", H, H])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    path = save(model, tmp_path / "model.onnx")
    assert_user_error(invoke("compile", path, "-o", tmp_path / "out"), path, "'bmm'", "['a', 4, 4]")


def test_shape_index_past_the_input_rank(tmp_path: Path) -> None:
    """Mutant 78 of seed 3: a Gather of dim 2 of a rank-2 input's Shape failed compile-time
    folding (IndexError); the node is now TVM's to refuse, by name."""
    index = numpy_helper.from_array(np.array(2, dtype=np.int64), "two")
    minus_one = numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one")
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "two"], ["dim"], name="third_dim", axis=0),
        helper.make_node("Unsqueeze", ["dim", "zero"], ["dims"], name="unsqueeze"),
        helper.make_node("Concat", ["minus_one", "dims"], ["new_shape"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["x2"], name="reshape"),
    ]
    model = matmul_model(extra_nodes=tuple(nodes), reads="x2")
    model.graph.initializer.extend([index, minus_one, numpy_helper.from_array(np.array([0]), "zero")])
    path = save(model, tmp_path / "model.onnx")
    assert_user_error(invoke("compile", path, "-o", tmp_path / "out"), path, "third_dim")


def test_topk_of_an_empty_k(tmp_path: Path) -> None:
    """Mutant 883 of seed 5 (a Constant k emptied): router recognition read its first value
    (IndexError). A k that is not one integer is no router's; TVM refuses the TopK by name."""
    model = build_dense_onehot_moe(hidden=8, inter=12, experts=3, k=2, activation="relu")
    k = next(t for t in model.graph.initializer if t.name == "moe0/k")
    k.CopyFrom(numpy_helper.from_array(np.zeros(0, dtype=np.int64), "moe0/k"))
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    path = save(model, tmp_path / "model.onnx")
    result = invoke("inspect", path)
    assert result.exit_code == 0 and "no MoE layers found" in result.stdout, result.output
    assert_user_error(invoke("compile", path, "-o", tmp_path / "out"), path, f"node '{topk.name}' (TopK)")
