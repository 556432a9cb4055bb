"""CIdentifiers: Before/Expected modules compared structurally and by parameter name, and the pass
in the pipeline's export phase for a CUDA target."""

from __future__ import annotations

import re

import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from moec.compiler.compile import lower_model
from moec.frontend.importer import import_model
from moec.frontend.loader import load_model
from moec.passes.c_identifiers import CIdentifiers
from moec.targets import load_target


def _before() -> tvm.IRModule:
    """``main(input.1, mlp/w, b)`` returning ``input.1 @ mlp/w + b``: ONNX names, which TVMScript
    cannot spell, so built with a BlockBuilder."""
    bb = relax.BlockBuilder()
    x = relax.Var("input.1", relax.TensorType((4, 3), "float32"))
    w = relax.Var("mlp/w", relax.TensorType((3, 5), "float32"))
    b = relax.Var("b", relax.TensorType((5,), "float32"))
    with bb.function("main", [x, w, b], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(relax.op.add(relax.op.matmul(x, w), b))
        bb.emit_func_output(y)
    return bb.get()


@I.ir_module
class Expected:
    @R.function
    def main(
        input_1: R.Tensor((4, 3), "float32"), mlp_w: R.Tensor((3, 5), "float32"), b: R.Tensor((5,), "float32")
    ) -> R.Tensor((4, 5), "float32"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            lv = R.matmul(input_1, mlp_w)
            gv = R.add(lv, b)
            R.output(gv)
        return gv


def _names(mod: tvm.IRModule) -> list[str]:
    return [p.name for p in mod["main"].params]


def test_renames_parameters_to_c_identifiers() -> None:
    rename = CIdentifiers()
    after = rename(_before())
    tvm.ir.assert_structural_equal(after, Expected)  # the body uses the new parameters
    assert _names(after) == ["input_1", "mlp_w", "b"]  # structural equality ignores names
    assert rename.renamed == {"input.1": "input_1", "mlp/w": "mlp_w"}


def test_identifiers_are_left_alone() -> None:
    rename = CIdentifiers()
    after = rename(Expected)
    tvm.ir.assert_structural_equal(after, Expected)
    assert _names(after) == _names(Expected) and rename.renamed == {}


def test_structure_alone_cannot_tell_the_names() -> None:
    """Why the tests above compare names too: structural equality maps parameters by position."""
    tvm.ir.assert_structural_equal(_before(), Expected)
    assert _names(_before()) != _names(Expected)


def test_export_phase_renames_for_cuda_only(moe_block) -> None:
    """In the pipeline: an Orin build gets C names in ``main``, the weights keep the ONNX names
    (the artifact's); a CPU build keeps the names as they are."""
    path, _ = moe_block(hidden=8, ffn=16, experts=4, top_k=2)
    imported = import_model(load_model(path))
    cpu, cpu_weights = lower_model(imported, load_target("host"))
    gpu, gpu_weights = lower_model(imported, load_target("orin"))
    assert "moe0.w_up" in _names(cpu) and list(cpu_weights) == list(gpu_weights)
    assert "moe0.w_up" in gpu_weights
    assert all(re.fullmatch(r"\w+", name) for name in _names(gpu)), _names(gpu)
    assert _names(gpu) == [re.sub(r"\W", "_", name) for name in _names(cpu)]
