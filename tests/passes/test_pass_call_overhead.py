"""InlineLayers and BoundTokens: Before/Expected modules compared structurally, then end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from tvm import relax

from moec.compiler.compile import compile_model
from moec.errors import MoecError
from moec.kernels import make_kernel
from moec.kernels.config import ExpertDownConfig, ExpertUpConfig
from moec.options import CompileOptions
from moec.passes.bound_tokens import CHECK_FUNC, BoundTokens, token_check
from moec.passes.inline_layers import InlineLayers
from moec.reference.evaluator import run_reference
from moec.runtime.session import ArtifactSession
from moec.schedule import CpuSchedule
from tests.helpers import FIXTURES, FP32_ATOL, assert_close, fixture_cases, tokens_input
from tests.zoo.standard import build_dense_onehot_moe

E, H, F, K = 4, 8, 16, 2
UP = ExpertUpConfig(num_experts=E, hidden=H, ffn=F, top_k=K, activation="silu", gated=False)
DOWN = ExpertDownConfig(num_experts=E, hidden=H, ffn=F, top_k=K)


def tensor(shape: tuple, dtype: str = "float32") -> relax.TensorType:
    return relax.TensorType(shape, dtype)


def _module(inlined: bool) -> tvm.IRModule:
    """main(x[tokens, H], offset, token, gain, w_up, b_up, w_down, b_down) with one MoE layer.

    ``inlined``: main calls the two expert kernels itself (what InlineLayers should produce);
    otherwise through the layer function ``moe0`` (symbolic ``n``) as the frontend lifts it.
    """
    bb = relax.BlockBuilder()
    up = bb.add_func(make_kernel(UP, CpuSchedule()), "moe0_expert_up")
    down = bb.add_func(make_kernel(DOWN, CpuSchedule()), "moe0_expert_down")

    def params(t: tvm.tirx.Var) -> list[relax.Var]:
        return [
            relax.Var("x", tensor((t, H))),
            relax.Var("offset", tensor((E + 1,), "int32")),
            relax.Var("token", tensor((t * K,), "int32")),
            relax.Var("gain", tensor((t * K,))),
            relax.Var("w_up", tensor((E, F, H))),
            relax.Var("b_up", tensor((E, F))),
            relax.Var("w_down", tensor((E, H, F))),
            relax.Var("b_down", tensor((E, H))),
        ]

    def body(b: relax.BlockBuilder, p: list[relax.Var], t: tvm.tirx.Var) -> relax.Var:
        x, offset, token, gain, w_up, b_up, w_down, b_down = p
        inter = b.emit(relax.call_tir(up, [x, w_up, b_up, offset, token], tensor((t * K, F))), "inter")
        return b.emit(relax.call_tir(down, [inter, w_down, b_down, offset, token, gain], tensor((t, H))), "y")

    tokens = tvm.tirx.Var("tokens", "int64")
    if not inlined:
        n = tvm.tirx.Var("n", "int64")
        layer_params = params(n)
        with bb.function("moe0", layer_params, private=True):
            bb.emit_func_output(body(bb, layer_params, n))
        gv = bb.get().get_global_var("moe0")
        bb.update_func(gv, bb.get()["moe0"].with_attr("moec.layer", json.dumps({"name": "moe0"})))
    main_params = params(tokens)
    with bb.function("main", main_params, attrs={"num_input": 4}):
        with bb.dataflow():
            if inlined:
                y = body(bb, main_params, tokens)
            else:
                y = bb.emit(relax.Call(bb.get().get_global_var("moe0"), main_params), "y")
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def test_inline_layers_puts_kernel_calls_in_main() -> None:
    inline = InlineLayers()
    after = inline(_module(inlined=False))
    # The call's own binding becomes an alias of the inlined result; canonicalising both sides
    # folds that alias (and Expected's own output alias).
    canonical = relax.transform.CanonicalizeBindings()
    tvm.ir.assert_structural_equal(canonical(after), canonical(_module(inlined=True)))
    assert inline.inlined == ["moe0"]
    assert "moe0" not in [gv.name_hint for gv in after.get_global_vars()]


def test_inline_layers_without_layers_changes_nothing() -> None:
    before = _module(inlined=True)
    inline = InlineLayers()
    tvm.ir.assert_structural_equal(inline(before), _module(inlined=True))
    assert inline.inlined == []


def _lowered_main(bounded: int | None) -> tvm.IRModule:
    """main(x[tokens, H]) -> x + x, as after TVM's dataflow lowering; with ``bounded`` N, as
    BoundTokens(N) should leave it: the token check first, the bound attributes set."""
    tokens = tvm.tirx.Var("tokens", "int64")
    x = relax.Var("x", tensor((tokens, H)))
    bb = relax.BlockBuilder()
    check = bb.add_func(token_check(bounded), CHECK_FUNC) if bounded else None
    attrs = {"num_input": 1}
    if bounded:
        attrs |= {"tir_var_upper_bound": {"tokens": bounded}, "tir_non_negative_var": ["tokens"]}
    with bb.function("main", [x], attrs=attrs):
        if check is not None:
            bb.emit(relax.Call(check, [relax.prim_value(tokens)]), "_")
        y = bb.emit(relax.op.add(x, x))
        bb.emit_func_output(y)
    return bb.get()


def test_bound_tokens_adds_bound_and_check() -> None:
    bound = BoundTokens(64)
    after = bound(_lowered_main(None))
    tvm.ir.assert_structural_equal(after, _lowered_main(64))
    assert bound.bounded == "tokens" and bound.skipped is None


def test_bound_tokens_skips_two_symbolic_dims() -> None:
    batch, seq = tvm.tirx.Var("batch", "int64"), tvm.tirx.Var("seq", "int64")
    x = relax.Var("x", tensor((batch, seq, H)))
    bb = relax.BlockBuilder()
    with bb.function("main", [x], attrs={"num_input": 1}):
        bb.emit_func_output(bb.emit(relax.op.add(x, x)))
    before = bb.get()
    bound = BoundTokens(64)
    tvm.ir.assert_structural_equal(bound(before), before)
    assert bound.bounded is None and "2 symbolic dimensions" in str(bound.skipped)


def test_modules_really_differ() -> None:
    """Guard for the tests above: the Before and Expected modules are not the same."""
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(_module(False)["main"], _module(True)["main"])
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(_lowered_main(None), _lowered_main(64))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("overhead") / "model.onnx"
    onnx.save(build_dense_onehot_moe(hidden=32, inter=64, experts=6, k=2, activation="swiglu"), path)
    return path


def test_compiled_library_calls_kernels_from_main(model: Path, tmp_path: Path) -> None:
    """End to end: the layer function is gone from the VM code, no reshape copy, results exact."""
    compile_model(model, tmp_path / "a")
    session = ArtifactSession(tmp_path / "a")
    library = tvm.runtime.load_module(str(tmp_path / "a" / "model.so"))
    text = relax.VMExecutable(library).as_text()
    main = text[text.index("@main:") : text.index("ret ")]
    assert "moe0 " not in main and "expert_up" in main and "reshape" not in main, main
    for tokens in (1, 7):
        feeds = {"x": tokens_input(tokens, 32)}
        assert_close(session.run(feeds)["y"], run_reference(onnx.load(model), feeds)["y"], FP32_ATOL, "y")


def test_layer_whose_dimension_binds_to_a_constant_is_inlined(tmp_path: Path) -> None:
    """Switch's capacity layer takes ``[sequences, tokens, H]``; its input ``[1, seq, H]`` binds
    ``sequences`` to the constant 1, which inlining accepts: the kernels run straight from main."""
    name = "switch_transformers-block-torchscript-na"
    compile_model(FIXTURES / "models" / f"{name}.onnx", tmp_path / "a")
    library = tvm.runtime.load_module(str(tmp_path / "a" / "model.so"))
    text = relax.VMExecutable(library).as_text()
    main = text[text.index("@main:") : text.index("ret ", text.index("@main:"))]
    assert "moe0 " not in main and "moe0_capacity" in main and "expert_down" in main, main
    session = ArtifactSession(tmp_path / "a")
    for case, (feeds, torch_outputs) in fixture_cases(name).items():
        assert_close(session.run(feeds)["output"], torch_outputs["output"], FP32_ATOL, f"{case} vs PyTorch")


def test_max_tokens_bound_and_clear_error_above_it(model: Path, tmp_path: Path) -> None:
    compile_model(model, tmp_path / "b", CompileOptions(max_tokens=8))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["max_tokens"] == 8
    session = ArtifactSession(tmp_path / "b")
    for tokens in (1, 8):
        feeds = {"x": tokens_input(tokens, 32)}
        assert_close(session.run(feeds)["y"], run_reference(onnx.load(model), feeds)["y"], FP32_ATOL, "y")
    with pytest.raises(MoecError, match=r"input 'x' has 9 tokens .* --max-tokens 8"):
        session.run({"x": tokens_input(9, 32)})
    # The library checks by itself too (a board's runner has no Python in front of it).
    x9 = tvm.runtime.tensor(tokens_input(9, 32))
    with pytest.raises(Exception, match=r"more tokens than this library was compiled for \(--max-tokens 8\)"):
        session.vm["main"](x9, *session.params)
    # The process survives and the library still works after the refusal.
    assert np.isfinite(session.run({"x": tokens_input(2, 32)})["y"]).all()
