"""``moec compile`` names options by their flags: CompileOptions' errors name fields, cli.py maps."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx

from moec.cli import OPTION_FLAGS
from moec.options import CompileOptions
from tests.helpers import assert_nothing_written, assert_user_error, invoke


def test_every_option_has_a_flag() -> None:
    assert {f.name for f in dataclasses.fields(CompileOptions)} <= set(OPTION_FLAGS)
    assert all(flag.startswith("--") for flag in OPTION_FLAGS.values())


def test_model_dependent_option_error_names_the_flag(moe_block, tmp_path: Path) -> None:
    """--max-tokens needs one symbolic dimension; the check runs on the lowered model, so the error
    comes from compile_model, not CompileOptions (the block gets a batch dimension its graph does
    not handle: only the inputs matter here)."""
    path, _ = moe_block(hidden=8, ffn=16, experts=4, top_k=2)
    model = onnx.load(path)
    batch = model.graph.input[0].type.tensor_type.shape
    batch.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_param="batch"))
    out_shape = model.graph.output[0].type.tensor_type.shape
    out_shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_param="batch"))
    onnx.save(model, tmp_path / "model.onnx")
    out = tmp_path / "out"
    result = invoke("compile", tmp_path / "model.onnx", "-o", out, "--max-tokens", "8")
    line = assert_user_error(result, "--max-tokens 8", "symbolic dimensions")
    assert "max_tokens" not in line, line
    assert_nothing_written(out)
