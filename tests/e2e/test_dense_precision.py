"""Routers and other dense weights stored as INT8 or FP16 (``--router-precision``,
``--dense-precision``): exact against the oracle that rounds the same weights, and the routers'
effect on routing measured against the original model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from moec.compiler.compile import compile_model
from moec.options import CompileOptions
from moec.runtime.session import ArtifactSession
from moec.verify import reference_outputs, router_agreement
from tests.helpers import (
    EXAMPLE_MODEL,
    FP32_ATOL,
    assert_close,
    assert_nothing_written,
    assert_user_error,
    invoke,
)

ROUTERS = {"moe0/router_w", "moe1/router_w"}
"""The example's router weights (``[64, 8]``, one per MoE layer); ``mlp/w`` is its other dense weight."""


@pytest.mark.parametrize(
    ("options", "stored"),
    [
        ({"router_precision": "int8"}, dict.fromkeys(ROUTERS, "int8")),
        (
            {"router_precision": "int8", "dense_precision": "int8", "precision": "int8"},
            {**dict.fromkeys(ROUTERS, "int8"), "mlp/w": "int8"},
        ),
        ({"dense_precision": "fp16"}, {"mlp/w": "fp16"}),
    ],
    ids=["router-int8", "all-int8", "dense-fp16"],
)
def test_dense_weights_stored_narrower_match_the_rounded_reference(tmp_path: Path, options, stored) -> None:
    model = onnx.load(EXAMPLE_MODEL)
    artifact = compile_model(EXAMPLE_MODEL, tmp_path / "out", CompileOptions(**options))
    session = ArtifactSession(artifact)
    dense = session.manifest["dense_weights"]
    assert {name: entry["precision"] for name, entry in dense.items()} == stored
    assert {name for name, entry in dense.items() if entry["router"]} == ROUTERS & set(stored)
    for tokens in (1, 16):
        feeds = {"x": np.random.default_rng(tokens).standard_normal((tokens, 64)).astype(np.float32)}
        expected = reference_outputs(model, session.manifest, feeds)
        assert_close(session.run(feeds)["y"], expected["y"], FP32_ATOL, f"{tokens} tokens")


def test_int8_routers_keep_routing_and_are_reported(tmp_path: Path) -> None:
    """The INT8 routers' effect on routing, over 256 tokens: the share routed to the same expert
    set as by the fp32 routers (measured 1.0 here: a flip needs a near-tie in the scores)."""
    model = onnx.load(EXAMPLE_MODEL)
    artifact = compile_model(EXAMPLE_MODEL, tmp_path / "out", CompileOptions(router_precision="int8"))
    feeds = {"x": np.random.default_rng(7).standard_normal((256, 64)).astype(np.float32)}
    agreement = router_agreement(model, ArtifactSession(artifact).manifest, feeds)
    print(f"int8 routers: routing agreement {agreement}")
    assert set(agreement) == {"moe0", "moe1"} and min(agreement.values()) >= 0.97
    shown = invoke("inspect", artifact)
    assert "moe0/router_w int8 (router)" in shown.output, shown.output


def test_dense_precision_on_a_cuda_target_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("compile", EXAMPLE_MODEL, "-o", out, "--target", "orin", "--router-precision", "int8")
    assert_user_error(result, "--router-precision", "orin")
    assert_nothing_written(out)


def test_int8_groups_apply_to_dense_weights_too(tmp_path: Path) -> None:
    """``--int8-group 32`` with ``--dense-precision int8``: the dense weights (64 inputs) get a
    scale per 32 inputs of each output column, recorded in the manifest, and the artifact matches
    the reference that rounds them so."""
    model = onnx.load(EXAMPLE_MODEL)
    options = CompileOptions(dense_precision="int8", router_precision="int8", int8_group=32)
    session = ArtifactSession(compile_model(EXAMPLE_MODEL, tmp_path / "out", options))
    assert {entry["group"] for entry in session.manifest["dense_weights"].values()} == {32}
    feeds = {"x": np.random.default_rng(3).standard_normal((9, 64)).astype(np.float32)}
    assert_close(session.run(feeds)["y"], reference_outputs(model, session.manifest, feeds)["y"], FP32_ATOL)
