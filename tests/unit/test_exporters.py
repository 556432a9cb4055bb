"""Advice for exports that fail, checked against the errors the real exporters raised.

``fixtures/index.json`` records, for every family × exporter × experts implementation that
``fixtures/make_fixtures.py`` tried with torch and transformers, whether it exported and the
exporter's own error; moec must explain each failure and name the setting that exports.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from moec.errors import MoecError
from moec.exporters import SETTING, check_exportable, explain_export_error, export_advice
from tests.helpers import FIXTURES

INDEX = FIXTURES / "index.json"
ENTRIES = [e for e in json.loads(INDEX.read_text())["fixtures"] if e["kind"] == "block"]


def _exporter(entry: dict) -> str:
    return "hf-onnx" if entry["exporter"].startswith("hf-onnx") else entry["exporter"]


def _implementation(entry: dict) -> str | None:
    return None if entry["experts_implementation"] == "na" else entry["experts_implementation"]


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e["export"] != "ok"], ids=lambda e: e["name"])
def test_every_recorded_export_failure_is_explained_with_the_setting_that_exports(entry: dict) -> None:
    line = explain_export_error(entry["error"], _exporter(entry), _implementation(entry))
    assert "\n" not in line
    if entry["family"] == "switch_transformers":
        assert "dynamo=False" in line
    else:
        assert f"{SETTING} = 'batched_mm'" in line and entry["experts_implementation"] in line
        assert export_advice(_exporter(entry), _implementation(entry)) is not None  # known before exporting


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e["export"] == "ok"], ids=lambda e: e["name"])
def test_pairs_that_export_get_no_advice_but_trace_specialised_ones(entry: dict) -> None:
    advice = export_advice(_exporter(entry), _implementation(entry))
    if entry["experts_implementation"] == "eager":  # exported, but only for the experts the trace hit
        assert entry["exporter"] == "torchscript" and "batched_mm" in advice and "trace" in advice
    else:
        assert advice is None


def test_check_exportable_refuses_before_exporting() -> None:
    with pytest.raises(MoecError, match="grouped_mm.*batched_mm"):
        check_exportable(SimpleNamespace(_experts_implementation="grouped_mm"), "dynamo")
    check_exportable(SimpleNamespace(_experts_implementation="batched_mm"), "torchscript")
    check_exportable(SimpleNamespace(), "dynamo")  # no experts setting (Llama 4, Switch)
    with pytest.raises(MoecError, match="exporter 'onnxscript' is not one of"):
        check_exportable(SimpleNamespace(), "onnxscript")
