"""MoE blocks as transformers' models export them, compiled sparse and checked against PyTorch.

The fixtures (``fixtures/models``, made by ``fixtures/make_fixtures.py`` with torch and
transformers, which CI does not need) hold each exported graph and the PyTorch module's own
outputs at the traced token count, another count and one token. Each supported fixture must be
recognised as an MoE layer (so only the selected experts are computed), compile, and match
PyTorch and the numpy reference within 1e-4 at every count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moec.build.compile import compile_model
from moec.cli import main
from moec.frontend.importer import find_blocks
from moec.frontend.loader import load_model
from moec.reference.evaluator import run_reference
from moec.runtime.session import ArtifactSession
from tests.helpers import FP32_ATOL, assert_close

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

# family -> exporters whose block moec compiles sparsely (fixtures/README.md has the whole map).
SUPPORTED = {
    "mixtral": [
        "dynamo-batched_mm",
        "torchscript-batched_mm",
        "hf-onnx-batched_mm",
        "hf-onnx-ort-cuda-batched_mm",
    ],
    "qwen3_moe": [
        "dynamo-batched_mm",
        "torchscript-batched_mm",
        "hf-onnx-batched_mm",
        "hf-onnx-ort-cuda-batched_mm",
    ],
    "olmoe": [
        "dynamo-batched_mm",
        "torchscript-batched_mm",
        "hf-onnx-batched_mm",
        "hf-onnx-ort-cuda-batched_mm",
    ],
    "qwen2_moe": [
        "dynamo-batched_mm",
        "torchscript-batched_mm",
        "hf-onnx-batched_mm",
        "hf-onnx-ort-cuda-batched_mm",
    ],
}
SUPPORTED["gpt_oss"] = [*SUPPORTED["mixtral"]]  # router bias, top-k then softmax, clamped SwiGLU, biases
# TorchScript's trace of the eager loop, unrolled for every expert: compiled for every routing
# (onnxruntime runs the same graph only when every expert is hit).
SUPPORTED["mixtral"].append("torchscript-eager")
SUPPORTED["gpt_oss"].append("torchscript-eager")
# ... and unrolled for fewer experts than the router has: refused, with how to re-export.
TRACE_SPECIALISED = {
    "olmoe-block-torchscript-eager": (5, 8),
    "qwen3_moe-block-torchscript-eager": (7, 8),
    "qwen3_moe-decoder-torchscript-eager": (6, 8),
}
IN_CI = {
    "mixtral-block-dynamo-batched_mm",
    "mixtral-block-torchscript-batched_mm",
    "mixtral-block-torchscript-eager",
    "qwen3_moe-block-hf-onnx-batched_mm",
    "olmoe-block-hf-onnx-ort-cuda-batched_mm",
    "qwen2_moe-block-dynamo-batched_mm",
    "gpt_oss-block-torchscript-batched_mm",
}


def _fixtures() -> list:
    names = [
        f"{family}-block-{exporter}" for family, exporters in SUPPORTED.items() for exporter in exporters
    ]
    return [pytest.param(name, marks=() if name in IN_CI else pytest.mark.slow) for name in names]


def _cases(name: str) -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """npz keys ``CASE.in.NAME`` / ``CASE.out.NAME`` as {case: (inputs, PyTorch outputs)}."""
    cases: dict = {}
    with np.load(FIXTURES / "models" / f"{name}.npz") as data:
        for key in data.files:
            case, kind, tensor = key.split(".", 2)
            cases.setdefault(case, ({}, {}))[0 if kind == "in" else 1][tensor] = data[key]
    return cases


@pytest.mark.parametrize("name", _fixtures())
def test_exported_block_compiles_sparse_and_matches_pytorch(name: str, tmp_path: Path) -> None:
    path = FIXTURES / "models" / f"{name}.onnx"
    model = load_model(path)
    blocks = find_blocks(model)
    assert len(blocks) == 1, f"{name}: {len(blocks)} MoE blocks recognised"
    session = ArtifactSession(compile_model(path, "host", tmp_path / "artifact"))
    cases = _cases(name)
    assert set(cases) == {"traced", "other", "one"}
    for case, (feeds, torch_outputs) in cases.items():
        actual = session.run(feeds)
        for output, expected in torch_outputs.items():
            assert_close(actual[output], expected, FP32_ATOL, f"{name} {case} {output} vs PyTorch")
        if name.endswith("eager") and case == "one":
            continue  # the traced graph itself cannot run when an expert is not hit (nor can onnxruntime)
        for output, expected in run_reference(model, feeds).items():
            assert_close(actual[output], expected, FP32_ATOL, f"{name} {case} {output} vs numpy")


def test_fixture_index_lists_every_supported_fixture() -> None:
    index = {entry["name"]: entry for entry in json.loads((FIXTURES / "index.json").read_text())["fixtures"]}
    for family, exporters in SUPPORTED.items():
        for exporter in exporters:
            entry = index[f"{family}-block-{exporter}"]
            assert entry["export"] == "ok" and entry["onnx_bytes"] <= 2_000_000, entry["name"]


@pytest.mark.parametrize("name", sorted(TRACE_SPECIALISED))
@pytest.mark.parametrize("command", ["inspect", "compile"])
def test_trace_specialised_graph_is_refused_with_how_to_reexport(
    name: str, command: str, tmp_path: Path
) -> None:
    unrolled, experts = TRACE_SPECIALISED[name]
    path = FIXTURES / "models" / f"{name}.onnx"
    out = tmp_path / "out"
    args = [command, str(path)] + (["-o", str(out)] if command == "compile" else [])
    result = CliRunner(env={"MOEC_DEBUG": None}).invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("moec: error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert f"only {unrolled} of the router's {experts} experts" in lines[0]
    assert "TorchScript" in lines[0] and "batched_mm" in lines[0] and "TopK" in lines[0]
    assert not out.exists()
