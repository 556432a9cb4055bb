"""Structured pruning inside experts (PruneChannels + --prune-ratio), against plain numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moec.artifact import WEIGHTS
from moec.runtime.session import ArtifactSession
from moec.weights_file import read_weights
from tests.helpers import (
    FP32_ATOL,
    assert_close,
    assert_nothing_written,
    assert_user_error,
    invoke,
    profile_model,
    softmax_top_k,
    swiglu_hidden,
    tokens_input,
)

HIDDEN, FFN, EXPERTS, TOP_K = 16, 24, 6, 2


@pytest.fixture(scope="module")
def profiled(moe_block, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path, np.ndarray]:
    """A one-layer SwiGLU model, its weights, its profile, and the calibration tokens."""
    model, weights = moe_block(hidden=HIDDEN, ffn=FFN, experts=EXPERTS, top_k=TOP_K)
    calib = tokens_input(64, HIDDEN, seed=4)
    profile = profile_model(model, tmp_path_factory.mktemp("prune"), {"x": calib})
    return model, weights, profile, calib


def routing(x: np.ndarray, w: dict) -> tuple[np.ndarray, np.ndarray]:
    """Each token's top-k experts and renormalised weights."""
    return softmax_top_k(x, w["router_w"], TOP_K)


def pruned_block(x: np.ndarray, w: dict, channels: list[list[int]]) -> np.ndarray:
    """The block with only ``channels[e]`` of each expert's intermediate channels, in float64."""
    x = x.astype(np.float64)
    index, gain = routing(x, w)
    y = np.zeros_like(x)
    for t in range(len(x)):
        for e, g in zip(index[t], gain[t], strict=True):
            kept = channels[e]
            y[t] += g * (swiglu_hidden(x[t], w, e)[kept] @ w["down"][e][kept])
    return y.astype(np.float32)


def compile_with(model: Path, profile: Path, out: Path, *args: str) -> Path:
    """``moec compile MODEL --profile PROFILE ARGS`` into ``out``, which must succeed."""
    result = invoke("compile", model, "-o", out, "--profile", profile, *args)
    assert result.exit_code == 0, result.output
    return out


def test_profile_measures_each_channels_contribution(profiled) -> None:
    model, w, profile, calib = profiled
    (layer,) = json.loads(profile.read_text())["layers"]
    index, gain = routing(calib, w)
    expected = np.zeros((EXPERTS, FFN))
    for t in range(len(calib)):
        for e, g in zip(index[t], gain[t], strict=True):
            expected[e] += g * np.abs(swiglu_hidden(calib[t], w, e)) * np.linalg.norm(w["down"][e], axis=1)
    np.testing.assert_allclose(layer["channel_contribution"], expected / len(calib), rtol=1e-5, atol=1e-7)


def test_pruning_zero_percent_is_exact(profiled, tmp_path: Path) -> None:
    model, _, profile, calib = profiled
    full = ArtifactSession(compile_with(model, profile, tmp_path / "full", "--keep-experts", str(EXPERTS)))
    none = ArtifactSession(compile_with(model, profile, tmp_path / "zero", "--prune-ratio", "0"))
    assert (tmp_path / "zero" / WEIGHTS).stat().st_size == (tmp_path / "full" / WEIGHTS).stat().st_size
    assert_close(none.run({"x": calib})["y"], full.run({"x": calib})["y"], 0.0, "0% pruning")


def test_pruned_channels_are_dropped_and_not_stored(profiled, tmp_path: Path) -> None:
    model, w, profile, _ = profiled
    out = compile_with(model, profile, tmp_path / "half", "--prune-ratio", "0.5")
    manifest = json.loads((out / "manifest.json").read_text())
    channels = manifest["pruning"]["moe0"]["channels"]
    assert manifest["pruning"]["moe0"]["ffn_kept"] == FFN // 2 and len(channels) == EXPERTS
    contribution = np.array(json.loads(profile.read_text())["layers"][0]["channel_contribution"])
    for e, kept in enumerate(channels):
        dropped = sorted(set(range(FFN)) - set(kept))
        assert contribution[e][kept].min() >= contribution[e][dropped].max(), (
            f"expert {e} kept a weaker channel"
        )
    stored = read_weights(out / WEIGHTS)
    # host: packed in panels after pruning (one panel of FFN // 2 rows, one of HIDDEN rows)
    assert stored["moe0.w_up"].shape == (EXPERTS, 1, HIDDEN, FFN // 2)
    assert stored["moe0.w_down"].shape == (EXPERTS, 1, FFN // 2, HIDDEN)
    session = ArtifactSession(out)
    for tokens in (1, 11):
        x = tokens_input(tokens, HIDDEN, seed=8)
        assert_close(session.run({"x": x})["y"], pruned_block(x, w, channels), FP32_ATOL, f"{tokens} tokens")


@pytest.mark.parametrize(
    ("args", "culprit"),
    [(["--prune-ratio", "1"], "--prune-ratio 1.0"), (["--prune-ratio", "-0.1"], "--prune-ratio -0.1")],
)
def test_bad_prune_ratio(profiled, tmp_path: Path, args: list[str], culprit: str) -> None:
    model, _, profile, _ = profiled
    out = tmp_path / "out"
    result = invoke("compile", model, "-o", out, "--profile", profile, *args)
    assert_user_error(result, culprit)
    assert_nothing_written(out)
