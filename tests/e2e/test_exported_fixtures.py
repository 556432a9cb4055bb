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
import onnx
import pytest

from moec.compiler.compile import compile_model
from moec.frontend.importer import find_blocks
from moec.frontend.loader import load_model
from moec.reference.evaluator import run_reference
from moec.reference.stored import canonical_evaluator
from moec.runtime.session import ArtifactSession
from tests.helpers import FIXTURES, FP32_ATOL, assert_close, fixture_cases, invoke

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
# sigmoid scores, correction bias, group-limited top-k, renormalised then scaled; shared experts
SUPPORTED["deepseek_v3"] = [*SUPPORTED["mixtral"]]
SUPPORTED["phimoe"] = [*SUPPORTED["mixtral"], "torchscript-eager"]  # sparsemixer routing
# sigmoid top-1 weighting the expert *input*, dense bmm over all experts, shared expert
SUPPORTED["llama4"] = ["dynamo-na", "torchscript-na", "hf-onnx-na", "hf-onnx-ort-cuda-na"]
# top-1 softmax, relu experts in a traced per-expert loop (its router's .to() breaks torch.export)
SUPPORTED["switch_transformers"] = ["torchscript-na"]
# TorchScript's trace of the eager loop, unrolled for every expert: compiled for every routing
# (onnxruntime runs the same graph only when every expert is hit).
SUPPORTED["mixtral"].append("torchscript-eager")
SUPPORTED["gpt_oss"].append("torchscript-eager")
# ... and unrolled for fewer experts than the router has: refused, with how to re-export.
# (name -> experts the router has; how many the trace unrolled is PyTorch's count of the experts its
# traced input hit, which make_fixtures.py records in index.json as experts_hit_by_traced.)
TRACE_SPECIALISED = {
    "deepseek_v3-block-torchscript-eager": 8,
    "olmoe-block-torchscript-eager": 8,
    "qwen2_moe-block-torchscript-eager": 8,
    "qwen3_moe-block-torchscript-eager": 8,
    "qwen3_moe-decoder-torchscript-eager": 8,
}
# Traces of a loop over the experts, with split sizes from the traced input: the graph itself runs
# only at the traced token count (moec's compiled layer, and the canonical reference, at any).
TRACED_LOOPS = {f"{family}-block-torchscript-eager" for family in SUPPORTED} | {
    "switch_transformers-block-torchscript-na"
}
IN_CI = {
    "mixtral-block-dynamo-batched_mm",
    "mixtral-block-torchscript-batched_mm",
    "mixtral-block-torchscript-eager",
    "qwen3_moe-block-hf-onnx-batched_mm",
    "olmoe-block-hf-onnx-ort-cuda-batched_mm",
    "qwen2_moe-block-dynamo-batched_mm",
    "gpt_oss-block-torchscript-batched_mm",
    "deepseek_v3-block-torchscript-batched_mm",
    "phimoe-block-dynamo-batched_mm",
    "llama4-block-hf-onnx-na",
    "switch_transformers-block-torchscript-na",
}


def _fixtures() -> list:
    names = [
        f"{family}-block-{exporter}" for family, exporters in SUPPORTED.items() for exporter in exporters
    ]
    return [pytest.param(name, marks=() if name in IN_CI else pytest.mark.slow) for name in names]


@pytest.mark.parametrize("name", _fixtures())
def test_exported_block_compiles_sparse_and_matches_pytorch(name: str, tmp_path: Path) -> None:
    path = FIXTURES / "models" / f"{name}.onnx"
    model = load_model(path)
    blocks = find_blocks(model)
    assert len(blocks) == 1, f"{name}: {len(blocks)} MoE blocks recognised"
    session = ArtifactSession(compile_model(path, tmp_path / "artifact"))
    canonical, _ = canonical_evaluator(model)  # the graph with each block as numpy layer semantics
    outputs = [o.name for o in model.graph.output]
    cases = fixture_cases(name)
    assert set(cases) == {"traced", "other", "one"}
    for case, (feeds, torch_outputs) in cases.items():
        actual = session.run(feeds)
        for output, expected in torch_outputs.items():
            assert_close(actual[output], expected, FP32_ATOL, f"{name} {case} {output} vs PyTorch")
        for output, expected in zip(outputs, canonical.run(None, feeds), strict=True):
            assert_close(actual[output], expected, FP32_ATOL, f"{name} {case} {output} vs canonical numpy")
        if case != "traced" and name in TRACED_LOOPS:
            continue  # the traced graph itself cannot run at other counts (nor can onnxruntime)
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
    experts = TRACE_SPECIALISED[name]
    index = {entry["name"]: entry for entry in json.loads((FIXTURES / "index.json").read_text())["fixtures"]}
    unrolled = index[name]["experts_hit_by_traced"][0]  # the first MoE layer's router is named
    assert unrolled < experts
    path = FIXTURES / "models" / f"{name}.onnx"
    out = tmp_path / "out"
    args = [command, str(path)] + (["-o", str(out)] if command == "compile" else [])
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("moec: error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert f"only {unrolled} of the router's {experts} experts" in lines[0]
    assert "TorchScript" in lines[0] and "batched_mm" in lines[0] and "TopK" in lines[0]
    assert not out.exists()


def test_expert_capacity_is_compiled_as_the_graph_applies_it(tmp_path: Path) -> None:
    """Switch's router drops the tokens of a sequence past an expert's capacity (2 in the
    fixture): at 7 and 13 tokens PyTorch drops some (their output rows are 0), and moec drops the same."""
    name = "switch_transformers-block-torchscript-na"
    path = FIXTURES / "models" / f"{name}.onnx"
    (block,) = find_blocks(load_model(path))
    assert block.layer.capacity == 2 and block.layer.caveats == ()
    session = ArtifactSession(compile_model(path, tmp_path / "artifact"))
    for case, (feeds, torch_outputs) in fixture_cases(name).items():
        expected = torch_outputs["output"].reshape(-1, block.layer.hidden)
        dropped = np.flatnonzero(~expected.any(axis=-1))
        assert case == "one" or len(dropped) >= 1, f"{case}: the fixture's tokens overflow an expert"
        actual = session.run(feeds)["output"]
        assert_close(actual, torch_outputs["output"], FP32_ATOL, f"{name} {case} vs PyTorch")
        assert not actual.reshape(expected.shape)[dropped].any()
    result = invoke("inspect", str(path))
    assert result.exit_code == 0 and "capacity 2" in result.output, result.output


def test_expert_capacity_moec_cannot_model_is_reported(tmp_path: Path) -> None:
    """A running count moec does not model (here over the experts instead of the tokens: it never
    drops) is compiled without a capacity, with a warning that says so."""
    model = load_model(FIXTURES / "models" / "switch_transformers-block-torchscript-na.onnx")
    producers = {o: n for n in model.graph.node for o in n.output}
    (cumsum,) = [n for n in model.graph.node if n.op_type == "CumSum"]
    producers[cumsum.input[1]].attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(np.array(-1)))
    (block,) = find_blocks(model)
    assert block.layer.capacity is None and len(block.layer.caveats) == 1
    assert "expert capacity of 2 in a way moec does not model" in block.layer.caveats[0]
    onnx.save(model, tmp_path / "counted_over_experts.onnx")
    result = invoke("inspect", str(tmp_path / "counted_over_experts.onnx"))
    assert result.exit_code == 0, result.output
    assert "moec: warning: moe0: the graph drops the tokens past an expert capacity of 2" in result.stderr


def test_cli_verifies_a_compiled_export_against_pytorch_outputs(tmp_path: Path) -> None:
    """`moec compile` then `moec verify --inputs --expected` with the fixture's PyTorch outputs, at the
    traced, another and a single-token shape; outputs that differ fail with a one-line error."""
    name = "deepseek_v3-block-torchscript-batched_mm"
    path = FIXTURES / "models" / f"{name}.onnx"
    out = tmp_path / "out"
    compiled = invoke("compile", str(path), "--target", "host", "-o", str(out))
    assert compiled.exit_code == 0, compiled.output
    for case, (feeds, torch_outputs) in fixture_cases(name).items():
        np.savez(tmp_path / f"{case}.in.npz", **feeds)
        np.savez(tmp_path / f"{case}.torch.npz", **torch_outputs)
        args = ["verify", str(path), str(out), "--inputs", str(tmp_path / f"{case}.in.npz")]
        verified = invoke(*args, "--expected", str(tmp_path / f"{case}.torch.npz"))
        assert verified.exit_code == 0, verified.output
        assert f"output vs {case}.torch.npz: max abs" in verified.output and " ok" in verified.output
    np.savez(tmp_path / "wrong.npz", output=torch_outputs["output"] + 0.01)
    wrong = invoke(*args, "--expected", str(tmp_path / "wrong.npz"))
    assert wrong.exit_code == 1 and "FAIL" in wrong.output
    assert wrong.stderr.strip().splitlines()[-1].startswith("moec: error:")
    assert "wrong.npz by 1.000e-02 > atol" in wrong.stderr
    np.savez(tmp_path / "unknown.npz", logits=torch_outputs["output"])
    unknown = invoke(*args, "--expected", str(tmp_path / "unknown.npz"))
    assert unknown.exit_code == 1 and "['logits'] are not outputs" in unknown.stderr
    alone = invoke("verify", str(path), str(out), "--expected", str(tmp_path / "wrong.npz"))
    assert alone.exit_code == 1 and "pass the inputs those outputs came from with --inputs" in alone.stderr


def test_cli_verifies_a_masked_capacity_layer_where_the_traced_graph_cannot_run(tmp_path: Path) -> None:
    """Switch's traced loop runs (in onnx's reference) at some token counts only; verify then checks
    through the canonical layers and says so. Masking remakes the capacity kernel for the experts kept."""
    path = FIXTURES / "models" / "switch_transformers-block-torchscript-na.onnx"
    profiled = invoke("profile", str(path), "--synthetic", "64", "-o", str(tmp_path / "p.json"))
    assert profiled.exit_code == 0, profiled.output
    for extra in ([], ["--profile", str(tmp_path / "p.json"), "--keep-experts", "3"]):
        out = tmp_path / f"out{len(extra)}"
        compiled = invoke("compile", str(path), "-o", str(out), *extra)
        assert compiled.exit_code == 0, compiled.output
        verified = invoke("verify", str(path), str(out), "-n", "1", "-n", "13", "-n", "30")
        assert verified.exit_code == 0, verified.output
        assert verified.output.count("output: max abs") == 3
        if not extra:
            assert "=1  note: the graph itself does not run at these shapes" in verified.output
