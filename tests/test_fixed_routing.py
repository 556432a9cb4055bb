"""Fixed-pattern routing (FixedRouting, --routing cycle|tile) against plain numpy."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from moec.build.compile import compile_model
from moec.cli import main
from moec.runtime.session import ArtifactSession
from moec.zoo.standard import WeightsOut, build_dense_onehot_moe
from tests.helpers import FP32_ATOL, assert_close, tokens_input

HIDDEN, FFN, EXPERTS, TOP_K = 16, 24, 5, 2


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    weights: WeightsOut = {}
    proto = build_dense_onehot_moe(
        hidden=HIDDEN, inter=FFN, experts=EXPERTS, k=TOP_K, activation="swiglu", weights_out=weights
    )
    path = tmp_path_factory.mktemp("fixed") / "model.onnx"
    onnx.save(proto, path)
    return path, weights["moe0"]


def pattern_block(x: np.ndarray, w: dict, pattern: str) -> np.ndarray:
    """Token t's slot j goes to expert (t + j) mod E (cycle) or (tile(t) + j) mod E, weight 1/k."""
    n = len(x)
    y = np.zeros((n, HIDDEN))
    for t in range(n):
        start = t if pattern == "cycle" else t * EXPERTS // n
        for j in range(TOP_K):
            e = (start + j) % EXPERTS
            gate, up = x[t].astype(np.float64) @ w["gate"][e], x[t].astype(np.float64) @ w["up"][e]
            y[t] += ((gate / (1 + np.exp(-gate)) * up) @ w["down"][e]) / TOP_K
    return y.astype(np.float32)


@pytest.mark.parametrize("pattern", ["cycle", "tile"])
def test_fixed_routing_matches_numpy_and_reports_its_cost(model, tmp_path: Path, pattern: str) -> None:
    path, w = model
    artifact = compile_model(path, "host", tmp_path / pattern, routing=pattern)
    session = ArtifactSession(artifact)
    for tokens in (1, 7, 16):
        x = tokens_input(tokens, HIDDEN, seed=2)
        assert_close(session.run({"x": x})["y"], pattern_block(x, w, pattern), FP32_ATOL, f"{tokens} tokens")
    result = CliRunner(env={"MOEC_DEBUG": None}).invoke(
        main, ["verify", str(path), str(artifact), "--against", "original", "-n", "30"]
    )
    assert result.exit_code == 0, result.output
    (agreement,) = re.findall(r"moe0 router agreement with the original: ([\d.]+)%", result.stdout)
    (cosine,) = re.findall(r"cosine (\d\.\d+)", result.stdout)
    assert float(agreement) < 100.0 and float(cosine) < 0.999, result.stdout
