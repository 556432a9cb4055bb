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
from moec.options import CompileOptions
from moec.passes.store_expert_weights import StoreExpertWeights
from moec.reference.evaluator import run_reference
from moec.reference.stored import run_stored_reference
from moec.runtime.session import ArtifactSession
from tests.helpers import FP32_ATOL, assert_close, tokens_input
from tests.zoo.standard import build_dense_onehot_moe

E, H, F, K = 4, 8, 16, 2
UP = ExpertUpConfig(num_experts=E, hidden=H, ffn=F, top_k=K, activation="silu", gated=False)
DOWN = ExpertDownConfig(num_experts=E, hidden=H, ffn=F, top_k=K)


def _module(weight_dtype: str, share_down_weight: bool = False) -> tvm.IRModule:
    """main(x, offset, token, gain, w_up, b_up, w_down, b_down) calling one MoE layer function.

    The matrices ``w_up``/``w_down`` (and the kernels reading them) are ``weight_dtype``.
    ``share_down_weight`` also returns ``w_down`` from main: a second use of that weight.
    """
    extra = {} if weight_dtype == "float32" else {"weight_dtype": weight_dtype}
    bb = relax.BlockBuilder()
    up = bb.add_func(kernel_spec(replace(UP, **extra)), "moe0_expert_up")
    down = bb.add_func(kernel_spec(replace(DOWN, **extra)), "moe0_expert_down")
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

    def weight_params():
        return [
            relax.Var("w_up", tensor((E, F, H), weight_dtype)),
            relax.Var("b_up", tensor((E, F))),
            relax.Var("w_down", tensor((E, H, F), weight_dtype)),
            relax.Var("b_down", tensor((E, H))),
        ]

    x, offset, token, gain = routing_params()
    w_up, b_up, w_down, b_down = weights = weight_params()
    with bb.function("moe0", [x, offset, token, gain, *weights], private=True):
        inter = bb.emit(relax.call_tir(up, [x, w_up, b_up, offset, token], tensor((n * K, F))))
        y = bb.emit(relax.call_tir(down, [inter, w_down, b_down, offset, token, gain], tensor((n, H))))
        bb.emit_func_output(y)
    layer = bb.get().get_global_var("moe0")
    bb.update_func(layer, bb.get()["moe0"].with_attr("moec.layer", json.dumps({"name": "moe0"})))

    main_params = routing_params() + weight_params()
    with bb.function("main", main_params, attrs={"num_input": 4}):
        y = bb.emit(relax.Call(bb.get().get_global_var("moe0"), main_params))
        bb.emit_func_output(relax.Tuple([y, main_params[6]]) if share_down_weight else y)
    return bb.get()


def test_stores_expert_matrices_as_fp16() -> None:
    store = StoreExpertWeights("fp16")
    after = store(_module("float32"))
    tvm.ir.assert_structural_equal(after, _module("float16"))
    assert store.changed == ["moe0"]


def test_fp32_changes_nothing() -> None:
    before = _module("float32")
    store = StoreExpertWeights("fp32")
    tvm.ir.assert_structural_equal(store(before), _module("float32"))
    assert store.changed == []


def test_weight_used_elsewhere_keeps_everything_fp32() -> None:
    store = StoreExpertWeights("fp16")
    tvm.ir.assert_structural_equal(store(_module("float32", True)), _module("float32", True))
    assert store.changed == []


def test_modules_really_differ() -> None:
    """Guard for the tests above: the fp16 module is not the fp32 one."""
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(_module("float32"), _module("float16"))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fp16_artifact_matches_rounded_reference_and_halves_weights(tmp_path: Path, activation: str) -> None:
    model = build_dense_onehot_moe(hidden=32, inter=64, experts=6, k=2, activation=activation)
    onnx.save(model, tmp_path / "model.onnx")
    for precision in ("fp32", "fp16"):
        compile_model(
            tmp_path / "model.onnx", tmp_path / precision, CompileOptions(weights_precision=precision)
        )
    sizes = {p: (tmp_path / p / WEIGHTS).stat().st_size for p in ("fp32", "fp16")}
    plan = json.loads((tmp_path / "fp16" / "manifest.json").read_text())["layers"][0]["plan"]
    assert {entry["precision"] for entry in plan} == {"fp16"}
    matrices = 6 * 64 * 32 * (3 if activation == "swiglu" else 2)
    assert sizes["fp32"] - sizes["fp16"] >= 2 * matrices, f"fp16 weights file not smaller: {sizes}"

    session = ArtifactSession(tmp_path / "fp16")
    for tokens in (1, 13):
        feeds = {"x": tokens_input(tokens, 32)}
        actual = session.run(feeds)["y"]
        assert_close(actual, run_stored_reference(model, "fp16", feeds)["y"], FP32_ATOL, f"{tokens} tokens")
        rounding = np.abs(actual - run_reference(model, feeds)["y"]).max()
        assert 0 < rounding < 1e-2, f"fp16 rounding error vs the fp32 model: {rounding}"
