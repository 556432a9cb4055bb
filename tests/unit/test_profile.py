"""``moec profile``: router statistics checked against routing computed here in plain numpy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import assert_user_error, invoke, profile_model, softmax_top_k, tokens_input

HIDDEN, EXPERTS, TOP_K = 16, 6, 2


@pytest.fixture(scope="module")
def model(moe_block) -> tuple[Path, np.ndarray]:
    """A one-layer model and its router weight ``[H, E]``."""
    path, weights = moe_block(hidden=HIDDEN, ffn=24, experts=EXPERTS, top_k=TOP_K, activation="silu")
    return path, weights["router_w"]


def run_profile(model_path: Path, tmp_path: Path, calib: dict[str, np.ndarray], *extra: str) -> dict:
    """``moec profile`` on ``calib``, the profile read back."""
    return json.loads(profile_model(model_path, tmp_path, calib, *extra).read_text())


def test_statistics_match_numpy_routing(model, tmp_path: Path) -> None:
    path, router_w = model
    x = tokens_input(200, HIDDEN, seed=5)
    (layer,) = run_profile(path, tmp_path, {"x": x})["layers"]
    index, weight = softmax_top_k(x, router_w, TOP_K)
    counts = np.bincount(index.reshape(-1), minlength=EXPERTS)
    assert layer["tokens"] == 200 and layer["experts"] == EXPERTS and layer["top_k"] == TOP_K
    assert layer["activation_count"] == counts.tolist()
    np.testing.assert_allclose(layer["activation_frequency"], counts / 200, atol=1e-6)
    mass = np.bincount(index.reshape(-1), weights=weight.reshape(-1), minlength=EXPERTS) / 200
    np.testing.assert_allclose(layer["weight_mass"], mass, atol=1e-5)
    pairs = {(int(min(a, b)), int(max(a, b))) for a, b in index}
    edges = {(e["source"], e["target"]): e["count"] for e in layer["coactivation"]["edges"]}
    assert set(edges) == pairs
    for a, b in pairs:
        assert edges[(a, b)] == int(
            np.sum(((index[:, 0] == a) & (index[:, 1] == b)) | ((index[:, 0] == b) & (index[:, 1] == a)))
        )
    confidence = layer["confidence"]
    assert abs(confidence["top1_mean"] - weight.max(axis=1).mean()) < 1e-5
    assert sum(confidence["top1_histogram"]["counts"]) == 200


def test_profile_is_deterministic_and_names_its_model(model, tmp_path: Path) -> None:
    path, _ = model
    calib = {"x": tokens_input(50, HIDDEN, seed=9)}
    first = run_profile(path, tmp_path, calib)
    second = run_profile(path, tmp_path, calib)
    assert first == second
    assert first["model"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert first["synthetic"] is False and first["samples"] == 1


def test_stacked_samples_count_like_one_batch(model, tmp_path: Path) -> None:
    path, _ = model
    x = tokens_input(60, HIDDEN, seed=2)
    stacked = run_profile(path, tmp_path, {"x": x.reshape(3, 20, HIDDEN)})
    whole = run_profile(path, tmp_path, {"x": x})
    assert stacked["samples"] == 3
    assert stacked["layers"][0]["activation_count"] == whole["layers"][0]["activation_count"]
    assert stacked["layers"][0]["coactivation"] == whole["layers"][0]["coactivation"]


def test_plots_are_pngs(model, tmp_path: Path) -> None:
    path, _ = model
    run_profile(path, tmp_path, {"x": tokens_input(30, HIDDEN)}, "--plot", tmp_path / "plots")
    for name in ("activation.png", "coactivation.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_synthetic_profile_warns(model, tmp_path: Path) -> None:
    path, _ = model
    result = invoke("profile", path, "--synthetic", "40", "-o", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    assert "warning" in result.stderr and "random tokens" in result.stderr
    profile = json.loads((tmp_path / "p.json").read_text())
    assert profile["synthetic"] is True and profile["layers"][0]["tokens"] == 40


@pytest.mark.parametrize(
    ("case", "culprits"),
    [
        ("no_data", ["no calibration data", "--calib", "--synthetic"]),
        ("missing_key", ["missing input 'x'"]),
        ("wrong_shape", ["input 'x' has shape"]),
        ("both", ["either --calib or --synthetic"]),
    ],
)
def test_bad_calibration_is_one_clear_line(model, tmp_path: Path, case: str, culprits: list[str]) -> None:
    path, _ = model
    calib = tmp_path / "calib.npz"
    if case == "missing_key":
        np.savez(calib, hidden=tokens_input(4, HIDDEN))
    else:
        np.savez(calib, x=tokens_input(4, HIDDEN + 1))
    args = {
        "no_data": [],
        "missing_key": ["--calib", calib],
        "wrong_shape": ["--calib", calib],
        "both": ["--calib", calib, "--synthetic", "5"],
    }[case]
    out = tmp_path / "p.json"
    result = invoke("profile", path, *args, "-o", out)
    assert_user_error(result, *culprits)
    assert not out.exists()
