"""transformers' vision model with MoE MLPs, as the torch exporters write it, compiled and checked.

ViTPose+'s backbone (``fixtures/models/vitpose-vision-*``, made by ``fixtures/make_fixtures.py``):
2 layers whose MLPs end in one small expert per dataset, chosen by the ``dataset_index`` input
rather than by a learned router. Batch is dynamic (cases ``traced`` 2 images, ``other`` 3, ``one`` 1).
There is no router, so moec finds no routed MoE block; the exported masked sum over every expert is
computed one expert per image instead (:mod:`moec.frontend.indexed_experts`), and must match
PyTorch and numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moec.compiler.compile import compile_model
from moec.frontend.importer import find_blocks, import_model
from moec.frontend.loader import load_model
from moec.reference.evaluator import run_reference
from moec.runtime.session import ArtifactSession
from tests.helpers import FIXTURES, FP32_ATOL, assert_close, fixture_cases, invoke


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("vitpose-vision-torchscript-na"),
        pytest.param("vitpose-vision-dynamo-na", marks=pytest.mark.slow),
    ],
)
def test_exported_vision_model_compiles_and_matches_pytorch(name: str, tmp_path: Path) -> None:
    path = FIXTURES / "models" / f"{name}.onnx"
    model = load_model(path)
    assert find_blocks(model) == [], f"{name}: dataset-indexed experts are not a routed MoE block"
    imported = import_model(model)
    assert imported.indexed_experts == 2, f"{name}: both layers' experts are computed one per image"
    assert not any(n.op_type == "Equal" for n in imported.canonical.graph.node), "no expert is masked"
    session = ArtifactSession(compile_model(path, tmp_path / "artifact"))
    cases = fixture_cases(name)
    assert set(cases) == {"traced", "other", "one"}
    for case, (feeds, torch_outputs) in cases.items():
        assert len(set(feeds["dataset_index"].tolist())) > 1 or case == "one", "several experts in use"
        actual = session.run(feeds)
        for output, expected in torch_outputs.items():
            assert_close(actual[output], expected, FP32_ATOL, f"{name} {case} {output} vs PyTorch")
        for output, expected in run_reference(model, feeds).items():
            assert_close(actual[output], expected, FP32_ATOL, f"{name} {case} {output} vs numpy")


def test_inspect_reports_the_indexed_experts() -> None:
    result = invoke("inspect", str(FIXTURES / "models" / "vitpose-vision-torchscript-na.onnx"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["moe_layers"] == [] and report["indexed_experts"] == 2
