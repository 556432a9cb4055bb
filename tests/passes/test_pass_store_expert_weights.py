"""StoreExpertWeights: Before/Expected modules compared structurally, then numerics end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from tvm import relax

from moec.artifact import WEIGHTS
from moec.compiler.compile import compile_model
from moec.kernels import kernel_spec
from moec.kernels.config import ExpertDownConfig, ExpertUpConfig, replace
from moec.kernels.formats import REDUCED_ARITHMETIC_TOLERANCE
from moec.options import CompileOptions
from moec.passes.store_expert_weights import StoreExpertWeights
from moec.reference.evaluator import run_reference
from moec.reference.stored import run_stored_reference
from moec.runtime.session import ArtifactSession
from moec.targets import load_target
from moec.verify import layer_plans, reduced_arithmetic
from moec.weights_file import read_weights
from tests.helpers import FP32_ATOL, assert_close, tokens_input
from tests.zoo.standard import build_dense_onehot_moe

E, H, F, K = 4, 8, 16, 2
UP = ExpertUpConfig(num_experts=E, hidden=H, ffn=F, top_k=K, activation="silu", gated=False)
DOWN = ExpertDownConfig(num_experts=E, hidden=H, ffn=F, top_k=K)
MIXED = ("int8", "fp32", "fp16", "int8")
"""Experts 0 and 3 in int8, 1 in fp32, 2 in fp16."""
PARTS = {  # each format's part of a matrix: its experts, dtype and, for int8, the scales' shape
    "fp32": ([1], "float32"),
    "fp16": ([2], "float16"),
    "int8": ([0, 3], "int8"),
}


def _parts(name: str, rows: int, columns: int, stored: bool) -> list[relax.Var]:
    """The variables replacing one fp32 matrix ``name`` ``[E, rows, columns]`` under MIXED: named
    as the kernel's buffers (``stored`` False) or as main's stored weights."""
    found = []
    for fmt, (experts, dtype) in PARTS.items():
        matrix = f"{name}.{fmt}" if stored else (name if fmt == "fp32" else f"{name}_{fmt}")
        found.append(relax.Var(matrix, relax.TensorType((len(experts), rows, columns), dtype)))
        if fmt == "int8":
            scale = f"{name}.int8_scale" if stored else f"{name}_int8_scale"
            found.append(relax.Var(scale, relax.TensorType((len(experts), rows), "float32")))
    return found


def _module(formats: tuple[str, ...] | None = None, share_down_weight: bool = False) -> tvm.IRModule:
    """main(x, offset, token, gain, w_up, b_up, w_down, b_down) calling one MoE layer function.

    ``formats`` None: every matrix fp32, one parameter each. MIXED: as StoreExpertWeights must
    leave it: each matrix one parameter per format in the layer, the kernels' configs (remade as
    ``*_stored``) and main's parameters to match, and the parts recorded for SliceWeights.
    ``share_down_weight`` also returns ``w_down`` from main: a second use of that weight.
    """
    extra, suffix = ({}, "") if formats is None else ({"formats": formats}, "_stored")
    bb = relax.BlockBuilder()
    up = bb.add_func(kernel_spec(replace(UP, **extra)), f"moe0_expert_up{suffix}")
    down = bb.add_func(kernel_spec(replace(DOWN, **extra)), f"moe0_expert_down{suffix}")
    n = tvm.tirx.Var("n", "int64")

    def tensor(shape, dtype="float32"):
        return relax.TensorType(shape, dtype)

    def routing_params():
        return [
            relax.Var("x", tensor((n, H))),
            relax.Var("offset", tensor((E + 1,), "int32")),
            relax.Var("token", tensor((n * K,), "int32")),
            relax.Var("gain", tensor((n * K,))),
        ]

    def weight_params(stored: bool) -> tuple[list[relax.Var], list[relax.Var], relax.Var, relax.Var]:
        if formats is None:
            ups, downs = [relax.Var("w_up", tensor((E, F, H)))], [relax.Var("w_down", tensor((E, H, F)))]
        else:
            ups, downs = _parts("w_up", F, H, stored), _parts("w_down", H, F, stored)
        return ups, downs, relax.Var("b_up", tensor((E, F))), relax.Var("b_down", tensor((E, H)))

    x, offset, token, gain = routing_params()
    ups, downs, b_up, b_down = weight_params(stored=False)
    with bb.function("moe0", [x, offset, token, gain, *ups, b_up, *downs, b_down], private=True):
        inter = bb.emit(relax.call_tir(up, [x, *ups, b_up, offset, token], tensor((n * K, F))))
        y = bb.emit(relax.call_tir(down, [inter, *downs, b_down, offset, token, gain], tensor((n, H))))
        bb.emit_func_output(y)
    layer = bb.get().get_global_var("moe0")
    bb.update_func(layer, bb.get()["moe0"].with_attr("moec.layer", json.dumps({"name": "moe0"})))

    ups, downs, b_up, b_down = weight_params(stored=True)
    main_params = [*routing_params(), *ups, b_up, *downs, b_down]
    attrs = {"num_input": 4}
    if formats is not None:
        records = {}
        for source in ("w_up", "w_down"):
            for fmt, (experts, _) in PARTS.items():
                part = {"source": source, "experts": experts, "format": fmt, "group": 0}
                records[f"{source}.{fmt}"] = part | {"scale": False}
                if fmt == "int8":
                    records[f"{source}.int8_scale"] = part | {"scale": True}
        attrs["moec.expert_formats"] = json.dumps(records, sort_keys=True)
    with bb.function("main", main_params, attrs=attrs):
        y = bb.emit(relax.Call(bb.get().get_global_var("moe0"), main_params))
        bb.emit_func_output(relax.Tuple([y, downs[0]]) if share_down_weight else y)
    return bb.get()


def test_stores_each_expert_in_its_format() -> None:
    store = StoreExpertWeights({"moe0": MIXED})
    after = store(_module())
    tvm.ir.assert_structural_equal(after, _module(MIXED))
    assert store.changed == ["moe0"]


def test_all_fp32_changes_nothing() -> None:
    store = StoreExpertWeights({"moe0": ("fp32",) * E}, default="int8")
    tvm.ir.assert_structural_equal(store(_module()), _module())
    assert store.changed == []


def test_weight_used_elsewhere_keeps_everything_fp32() -> None:
    store = StoreExpertWeights({"moe0": MIXED})
    tvm.ir.assert_structural_equal(store(_module(None, True)), _module(None, True))
    assert store.changed == []


def test_plan_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="the plan names 3 experts, the layer has 4"):
        StoreExpertWeights({"moe0": MIXED[:3]})(_module())


def test_modules_really_differ() -> None:
    """Guard for the tests above: the stored module is not the fp32 one."""
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(_module(), _module(MIXED))


def _check_artifact(model: onnx.ModelProto, artifact: Path, bound: float) -> None:
    """The artifact matches the model with its experts rounded as stored (1e-4; with INT8
    arithmetic, the documented relative bound, and most outputs still within 1e-4: an
    intermediate activation rounded to the other INT8 level than the reference's moves only its
    token), and differs from the fp32 model by some rounding, at most ``bound``."""
    session = ArtifactSession(artifact)
    plans = layer_plans(session.manifest)
    for tokens in (1, 13):
        feeds = {"x": tokens_input(tokens, 32)}
        actual = session.run(feeds)["y"]
        expected = run_stored_reference(model, feeds, plans)["y"]
        if reduced_arithmetic(session.manifest):
            error = np.abs(actual - expected)
            assert error.max() <= REDUCED_ARITHMETIC_TOLERANCE * np.abs(expected).max(), f"{tokens} tokens"
            assert np.median(error) <= FP32_ATOL, f"{tokens} tokens: median error {np.median(error)}"
        else:
            assert_close(actual, expected, FP32_ATOL, f"{tokens} tokens")
        rounding = np.abs(actual - run_reference(model, feeds)["y"]).max()
        assert 0 < rounding < bound, f"rounding error vs the fp32 model: {rounding}"


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fp16_artifact_matches_rounded_reference_and_halves_weights(tmp_path: Path, activation: str) -> None:
    model = build_dense_onehot_moe(hidden=32, inter=64, experts=6, k=2, activation=activation)
    onnx.save(model, tmp_path / "model.onnx")
    for precision in ("fp32", "fp16"):
        compile_model(tmp_path / "model.onnx", tmp_path / precision, CompileOptions(precision=precision))
    sizes = {p: (tmp_path / p / WEIGHTS).stat().st_size for p in ("fp32", "fp16")}
    plan = json.loads((tmp_path / "fp16" / "manifest.json").read_text())["layers"][0]["plan"]
    assert {entry["precision"] for entry in plan} == {"fp16"}
    matrices = 6 * 64 * 32 * (3 if activation == "swiglu" else 2)
    assert sizes["fp32"] - sizes["fp16"] >= 2 * matrices, f"fp16 weights file not smaller: {sizes}"
    _check_artifact(model, tmp_path / "fp16", 1e-2)


@pytest.mark.parametrize(
    ("plan", "group"),
    [
        (("int8",) * 6, 0),
        (("int8",) * 6, 32),
        (("int8", "fp32", "fp16", "int8", "fp16", "fp32"), 0),
        pytest.param(("int8-dot",) * 6, 0, marks=pytest.mark.slow),
        pytest.param(("int8-dot",) * 6, 32, marks=pytest.mark.slow),
        (("int8-dot", "fp32", "fp16", "int8", "int8-dot", "fp16"), 0),
    ],
    ids=["int8", "int8-groups-of-32", "mixed", "int8-dot", "int8-dot-groups-of-32", "mixed-int8-dot"],
)
def test_int8_and_mixed_artifacts_match_rounded_reference(tmp_path: Path, plan, group) -> None:
    """Each expert is read in its own format in one dispatch; the manifest's plan and the weight
    bytes are the plan's: per expert its matrices at 4, 2 or 1 byte a weight, int8 and int8-dot
    with one float32 scale per output row (or per 32 inputs of it), and its biases. int8-dot
    experts multiply in INT8 on this CPU (the test needs one with VNNI)."""
    if "int8-dot" in plan and load_target("host").int8_dot is None:
        pytest.skip("this CPU does not compute int8")
    model = build_dense_onehot_moe(hidden=32, inter=64, experts=6, k=2, activation="swiglu")
    onnx.save(model, tmp_path / "model.onnx")
    options = CompileOptions(precision_plan={"moe0": plan}, int8_group=group)
    compile_model(tmp_path / "model.onnx", tmp_path / "out", options)
    layer = json.loads((tmp_path / "out" / "manifest.json").read_text())["layers"][0]
    assert [entry["precision"] for entry in layer["plan"]] == list(plan)
    assert [entry["compute"] for entry in layer["plan"]] == [
        "int8" if p == "int8-dot" else "fp32" for p in plan
    ]
    weights = 3 * 64 * 32  # w_up, w_gate [64, 32] and w_down [32, 64] per expert
    groups = {inputs: inputs // group if group else 1 for inputs in (32, 64)}  # scales per output row
    scales = 4 * (2 * 64 * groups[32] + 32 * groups[64])
    biases = 4 * (64 + 64 + 32)
    per_format = {
        "fp32": 4 * weights + biases,
        "fp16": 2 * weights + biases,
        "int8": weights + scales + biases,
    }
    per_format["int8-dot"] = per_format["int8"]
    assert [entry["bytes"] for entry in layer["plan"]] == [per_format[p] for p in plan]
    stored = read_weights(tmp_path / "out" / WEIGHTS)
    layer_bytes = sum(value.nbytes for name, value in stored.items() if name.startswith("moe0."))
    assert layer_bytes == sum(per_format[p] for p in plan)
    _check_artifact(model, tmp_path / "out", 5e-2)
