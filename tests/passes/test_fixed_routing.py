"""Fixed-pattern routing (FixedRouting, --routing cycle|tile) against plain numpy."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from moec.compiler.compile import compile_model
from moec.options import CompileOptions
from moec.runtime.session import ArtifactSession
from tests.helpers import FP32_ATOL, assert_close, invoke, swiglu_expert, tokens_input

HIDDEN, FFN, EXPERTS, TOP_K = 16, 24, 5, 2


@pytest.fixture(scope="module")
def model(moe_block) -> tuple[Path, dict]:
    """A one-layer SwiGLU model and its weights."""
    return moe_block(hidden=HIDDEN, ffn=FFN, experts=EXPERTS, top_k=TOP_K)


def pattern_block(x: np.ndarray, w: dict, pattern: str) -> np.ndarray:
    """Token t's slot j goes to expert (t + j) mod E (cycle) or (tile(t) + j) mod E, weight 1/k."""
    n = len(x)
    y = np.zeros((n, HIDDEN))
    for t in range(n):
        start = t if pattern == "cycle" else t * EXPERTS // n
        for j in range(TOP_K):
            e = (start + j) % EXPERTS
            y[t] += swiglu_expert(x[t], w, e) / TOP_K
    return y.astype(np.float32)


@pytest.mark.parametrize("pattern", ["cycle", "tile"])
def test_fixed_routing_matches_numpy_and_reports_its_cost(model, tmp_path: Path, pattern: str) -> None:
    path, w = model
    artifact = compile_model(path, tmp_path / pattern, CompileOptions(routing=pattern))
    session = ArtifactSession(artifact)
    for tokens in (1, 7, 16):
        x = tokens_input(tokens, HIDDEN, seed=2)
        assert_close(session.run({"x": x})["y"], pattern_block(x, w, pattern), FP32_ATOL, f"{tokens} tokens")
    result = invoke("verify", path, artifact, "--against", "original", "-n", "30")
    assert result.exit_code == 0, result.output
    (agreement,) = re.findall(r"moe0 router agreement with the original: ([\d.]+)%", result.stdout)
    (cosine,) = re.findall(r"cosine (\d\.\d+)", result.stdout)
    assert float(agreement) < 100.0 and float(cosine) < 0.999, result.stdout
