"""Whole tiny decoders as transformers' exporters write them, compiled and checked against PyTorch.

The fixtures (``fixtures/models/*-decoder-*``, made by ``fixtures/make_fixtures.py``) are 2-layer
``ForCausalLM`` models (vocab 128): ``FAMILY-decoder-EXPORTER-EXPERTS`` at a fixed ``input_ids``
``[1, 8]`` (every family whose decoder exports), and ``FAMILY-decoder-dynamic-EXPORTER-EXPERTS``
(Mixtral, Qwen3-MoE) with batch and sequence dynamic (cases ``traced`` [2, 7], ``other`` [3, 13],
``one`` [1, 1]). Each must have both MoE blocks recognised, compile with one build for every
shape, and match PyTorch's logits and the numpy reference within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprVisitor, visitor

from moec.compiler.compile import lower_model
from moec.frontend.importer import import_model
from moec.frontend.loader import load_model
from moec.kernels import kernel_kind
from moec.targets import load_target
from tests.helpers import FIXTURES, check_exported_fixture, invoke

STATIC = [
    f"{family}-decoder-{exporter}"
    for family in ("mixtral", "qwen3_moe")
    for exporter in (
        "dynamo-batched_mm",
        "torchscript-batched_mm",
        "hf-onnx-batched_mm",
        "hf-onnx-ort-cuda-batched_mm",  # MultiHeadAttention, RotaryEmbedding, (Skip)SimplifiedLayerNorm, MoE
    )
] + ["mixtral-decoder-torchscript-eager"]  # (qwen3_moe's eager trace is refused: test_exported_fixtures)
# Every other family's decoder from each exporter (Llama 4's with its rotary embedding made real-valued
# at export time: its complex one exports with none).
STATIC += [
    f"{family}-decoder-{exporter}-{'na' if family == 'llama4' else 'batched_mm'}"
    for family in ("qwen2_moe", "olmoe", "phimoe", "gpt_oss", "deepseek_v3", "llama4")
    for exporter in ("dynamo", "torchscript", "hf-onnx", "hf-onnx-ort-cuda")
]
DYNAMIC = [
    f"{family}-decoder-dynamic-{exporter}-batched_mm"
    for family in ("mixtral", "qwen3_moe")
    for exporter in ("dynamo", "torchscript", "hf-onnx", "hf-onnx-ort-cuda")
]
IN_CI = {
    "mixtral-decoder-torchscript-batched_mm",  # shape subgraphs folded (ConstantOfShape of [])
    # contrib ops and com.microsoft::MoE at symbolic batch x sequence, shape arithmetic, Expand
    "qwen3_moe-decoder-dynamic-hf-onnx-ort-cuda-batched_mm",
    "gpt_oss-decoder-hf-onnx-ort-cuda-batched_mm",  # FusedMatMul in the attention (with sinks)
    "phimoe-decoder-hf-onnx-ort-cuda-batched_mm",  # SkipLayerNormalization, sparsemixer routing
    "llama4-decoder-dynamo-na",  # real-valued RoPE patch, routing weight on the expert input
}


def _params(names: list[str]) -> list:
    return [pytest.param(name, marks=() if name in IN_CI else pytest.mark.slow) for name in names]


def test_switch_encoder_decoder_compiles_and_matches_pytorch(tmp_path: Path) -> None:
    """Switch Transformers' whole encoder-decoder (TorchScript; source and target lengths dynamic):
    the encoder's and the decoder's sparse layers with their expert capacity, at the traced
    lengths (16, 12), at (9, 5) — where onnxruntime fails on the trace's fixed split sizes — and
    at one target token."""
    cases = {"traced", "other", "one"}
    check_exported_fixture("switch_transformers-seq2seq-torchscript-na", tmp_path, cases, traced_loop=True)


@pytest.mark.parametrize("name", _params(STATIC + DYNAMIC))
def test_exported_decoder_compiles_and_matches_pytorch(name: str, tmp_path: Path) -> None:
    check_exported_fixture(name, tmp_path, {"traced", "other", "one"} if name in DYNAMIC else {"traced"})


def test_fixture_index_lists_every_decoder() -> None:
    index = {entry["name"]: entry for entry in json.loads((FIXTURES / "index.json").read_text())["fixtures"]}
    for name in STATIC + DYNAMIC:
        entry = index[name]
        assert entry["export"] == "ok" and entry["onnx_bytes"] <= 2_000_000, name
        if name in DYNAMIC:
            assert entry["dynamic"] and entry["shapes"]["other"]["input_ids"] == [3, 13], name


def test_cli_compiles_and_verifies_a_dynamic_decoder(tmp_path: Path) -> None:
    path = FIXTURES / "models" / "mixtral-decoder-dynamic-hf-onnx-batched_mm.onnx"
    out = tmp_path / "out"
    compiled = invoke("compile", str(path), "--target", "host", "-o", str(out))
    assert compiled.exit_code == 0, compiled.output
    verified = invoke("verify", str(path), str(out), "-n", "1", "-n", "5")
    assert verified.exit_code == 0, verified.output
    assert "verified: max abs error" in verified.output
    assert verified.output.count("logits: max abs") == 2


def _weight_matmuls(main: relax.Function) -> list[str]:
    """``main``'s ``matmul``s that read a weight parameter, directly or through a transpose."""
    weights = set(main.params[int(main.attrs["num_input"]) :])
    transposed: set[relax.Var] = set()
    found: list[str] = []

    @visitor
    class _Bindings(PyExprVisitor):
        def visit_var_binding_(self, binding: relax.VarBinding) -> None:
            value = binding.value
            if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.permute_dims"):
                if value.args[0] in weights:
                    transposed.add(binding.var)
            if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.matmul"):
                if any(arg in weights or arg in transposed for arg in value.args):
                    found.append(binding.var.name)

    _Bindings().visit_expr(main.body)
    return found


@pytest.mark.parametrize("name", _params(STATIC + DYNAMIC))
def test_every_weight_matmul_runs_the_linear_kernel(name: str) -> None:
    """No dense matmul with a weight is left to TVM's unscheduled default lowering on a CPU:
    attention projections, routers and the LM head all became moec linear kernel calls."""
    mod, _ = lower_model(import_model(load_model(FIXTURES / "models" / f"{name}.onnx")), load_target("host"))
    assert _weight_matmuls(mod["main"]) == []
    kinds = [kernel_kind(func) for _, func in mod.functions_items()]
    assert kinds.count("linear") >= 3, f"{name}: projections, routers and LM head kernels: {kinds}"
