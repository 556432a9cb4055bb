"""Early exit (SkipExperts, --skip-top1-above / --skip-below-fraction) against plain numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from click.testing import CliRunner, Result

from moec.build.compile import compile_model
from moec.cli import main
from moec.runtime.session import ArtifactSession
from moec.zoo.standard import WeightsOut, build_dense_onehot_moe
from tests.helpers import FP32_ATOL, assert_close, softmax_top_k, tokens_input

HIDDEN, FFN, EXPERTS, TOP_K = 16, 24, 6, 3


def invoke(*args: str | Path) -> Result:
    return CliRunner(env={"MOEC_DEBUG": None}).invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    weights: WeightsOut = {}
    proto = build_dense_onehot_moe(
        hidden=HIDDEN, inter=FFN, experts=EXPERTS, k=TOP_K, activation="swiglu", weights_out=weights
    )
    path = tmp_path_factory.mktemp("skip") / "model.onnx"
    onnx.save(proto, path)
    return path, weights["moe0"]


def routing(x: np.ndarray, w: dict) -> tuple[np.ndarray, np.ndarray]:
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
            gate, up = x[t] @ w["gate"][e], x[t] @ w["up"][e]
            y[t] += weight * ((gate / (1 + np.exp(-gate)) * up) @ w["down"][e])
    return y.astype(np.float32)


def test_threshold_one_is_exact(model, tmp_path: Path) -> None:
    path, _ = model
    full = ArtifactSession(compile_model(path, "host", tmp_path / "full"))
    skip = ArtifactSession(compile_model(path, "host", tmp_path / "skip", early_exit={"top1_above": 1.0}))
    x = tokens_input(33, HIDDEN)
    assert_close(skip.run({"x": x})["y"], full.run({"x": x})["y"], 1e-6, "threshold 1.0")


@pytest.mark.parametrize(("top1_above", "below_fraction"), [(0.5, None), (None, 0.6), (0.7, 0.3)])
def test_skipping_matches_numpy(model, tmp_path: Path, top1_above, below_fraction) -> None:
    path, w = model
    early_exit = {"top1_above": top1_above, "below_fraction": below_fraction}
    session = ArtifactSession(compile_model(path, "host", tmp_path / "a", early_exit=early_exit))
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
    artifact = compile_model(path, "host", tmp_path / "a", early_exit={"top1_above": threshold})
    params = tvm.runtime.load_param_dict_from_file(str(artifact / "weights.params"))
    poisoned = {}
    for name, value in params.items():
        array = value.numpy()
        if name.endswith((".w_up", ".w_gate", ".w_down")):
            array[index[token, 1:]] = np.nan
        poisoned[name] = tvm.runtime.tensor(array)
    tvm.runtime.save_param_dict_to_file(poisoned, str(artifact / "weights.params"))
    y = ArtifactSession(artifact).run({"x": x1})["y"]
    assert np.isfinite(y).all(), "a skipped expert was computed"
    assert_close(y, skipping_block(x1, w, top1_above=threshold), FP32_ATOL, "confident token")


@pytest.mark.parametrize("option", ["--skip-top1-above", "--skip-below-fraction"])
@pytest.mark.parametrize("value", ["0", "1.5"])
def test_out_of_range_thresholds(model, tmp_path: Path, option: str, value: str) -> None:
    path, _ = model
    out = tmp_path / "out"
    result = invoke("compile", path, "-o", out, option, value)
    assert result.exit_code == 1 and f"{option} {float(value)}" in result.stderr, result.output
    assert not out.exists()
