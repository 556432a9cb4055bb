"""Early exit (SkipExperts, --skip-top1-above / --skip-below-fraction) against plain numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moec.artifact import WEIGHTS
from moec.compiler.compile import compile_model
from moec.options import CompileOptions
from moec.runtime.session import ArtifactSession
from moec.weights_file import read_weights
from tests.helpers import (
    FP32_ATOL,
    assert_close,
    assert_nothing_written,
    assert_user_error,
    invoke,
    rewrite_weights,
    softmax_top_k,
    swiglu_expert,
    tokens_input,
)

HIDDEN, FFN, EXPERTS, TOP_K = 16, 24, 6, 3


@pytest.fixture(scope="module")
def model(moe_block) -> tuple[Path, dict]:
    """A one-layer SwiGLU model and its weights."""
    return moe_block(hidden=HIDDEN, ffn=FFN, experts=EXPERTS, top_k=TOP_K)


def routing(x: np.ndarray, w: dict) -> tuple[np.ndarray, np.ndarray]:
    """Each token's top-k experts and renormalised weights, without early exit."""
    return softmax_top_k(x, w["router_w"], TOP_K)


def skipping_block(
    x: np.ndarray, w: dict, top1_above: float = 2.0, below_fraction: float = 0.0
) -> np.ndarray:
    """The block where slots after the first are dropped by the two rules, then renormalised."""
    x = x.astype(np.float64)
    index, gain = routing(x, w)
    y = np.zeros_like(x)
    for t in range(len(x)):
        keep = [0] + [
            j
            for j in range(1, TOP_K)
            if not (gain[t, 0] > top1_above or gain[t, j] < below_fraction * gain[t, 0])
        ]
        g = gain[t, keep] / gain[t, keep].sum()
        for e, weight in zip(index[t, keep], g, strict=True):
            y[t] += weight * swiglu_expert(x[t], w, e)
    return y.astype(np.float32)


def test_threshold_skips_exactly_the_confident_tokens(model, tmp_path: Path) -> None:
    """``top1_above`` 1 never skips (no weight exceeds 1): the block as without early exit. A
    threshold between two tokens' top-1 weights skips the other experts of exactly the tokens above
    it: they match the numpy block that drops those slots (and ``moec verify``'s own early-exit
    reference), the others stay as without early exit."""
    path, w = model
    x = tokens_input(33, HIDDEN)
    _, gain = routing(x, w)
    top1 = np.sort(gain[:, 0])
    assert top1[17] - top1[16] > 1e-3, "no clear gap at the median to put the threshold in"
    threshold = float(top1[16] + top1[17]) / 2
    confident = gain[:, 0] > threshold
    expected = skipping_block(x, w, top1_above=threshold)
    unskipped = skipping_block(x, w)
    moved = np.abs(expected - unskipped).max(axis=1) > 100 * FP32_ATOL
    assert (moved == confident).all(), "the reference must change exactly the confident tokens"

    full = ArtifactSession(compile_model(path, tmp_path / "full")).run({"x": x})["y"]
    never = ArtifactSession(compile_model(path, tmp_path / "one", CompileOptions(skip_top1_above=1.0)))
    assert_close(never.run({"x": x})["y"], full, 1e-6, "threshold 1.0")
    artifact = compile_model(path, tmp_path / "skip", CompileOptions(skip_top1_above=threshold))
    y = ArtifactSession(artifact).run({"x": x})["y"]
    assert_close(y, expected, FP32_ATOL, f"threshold {threshold:.3f}")
    assert_close(y[~confident], full[~confident], 1e-6, "tokens below the threshold")
    result = invoke("verify", path, artifact, "-n", "1", "-n", "33")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("top1_above", "below_fraction"), [(0.5, None), (None, 0.6), (0.7, 0.3)])
def test_skipping_matches_numpy(model, tmp_path: Path, top1_above, below_fraction) -> None:
    path, w = model
    early_exit = {"top1_above": top1_above, "below_fraction": below_fraction}
    options = CompileOptions(skip_top1_above=top1_above, skip_below_fraction=below_fraction)
    session = ArtifactSession(compile_model(path, tmp_path / "a", options))
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["early_exit"] == early_exit
    rules = {k: v for k, v in early_exit.items() if v is not None}
    for tokens in (1, 7, 40):
        x = tokens_input(tokens, HIDDEN, seed=21)
        assert_close(session.run({"x": x})["y"], skipping_block(x, w, **rules), FP32_ATOL, f"{tokens} tokens")


def test_skipped_experts_are_not_computed(model, tmp_path: Path) -> None:
    """A confident token's other experts have NaN weights in the artifact; its output stays finite."""
    path, w = model
    x = tokens_input(200, HIDDEN, seed=5)
    index, gain = routing(x, w)
    token = int(np.argmax(gain[:, 0]))
    x1 = x[token : token + 1]
    threshold = float(gain[token, 0]) - 1e-3
    artifact = compile_model(path, tmp_path / "a", CompileOptions(skip_top1_above=threshold))
    poisoned = {name: np.array(value) for name, value in read_weights(artifact / WEIGHTS).items()}
    for name, array in poisoned.items():
        if name.endswith((".w_up", ".w_gate", ".w_down")):
            array[index[token, 1:]] = np.nan
    rewrite_weights(artifact, poisoned)
    y = ArtifactSession(artifact).run({"x": x1})["y"]
    assert np.isfinite(y).all(), "a skipped expert was computed"
    assert_close(y, skipping_block(x1, w, top1_above=threshold), FP32_ATOL, "confident token")


@pytest.mark.parametrize("option", ["--skip-top1-above", "--skip-below-fraction"])
@pytest.mark.parametrize("value", ["0", "1.5"])
def test_out_of_range_thresholds(model, tmp_path: Path, option: str, value: str) -> None:
    path, _ = model
    out = tmp_path / "out"
    result = invoke("compile", path, "-o", out, option, value)
    assert_user_error(result, f"{option} {float(value)}")
    assert_nothing_written(out)
