"""Static expert masking (MaskExperts + --profile/--keep-experts/--mask-threshold), end to end.

The expected outputs are computed here in plain numpy from the block's weights: scores over all
experts, top-k over the kept ones, so the check is independent of moec's router and kernels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from click.testing import CliRunner, Result

from moec.build.compile import compile_model
from moec.cli import main
from moec.frontend.importer import import_model
from moec.frontend.loader import load_model
from moec.passes.mask_experts import MaskExperts
from moec.runtime.session import ArtifactSession
from moec.zoo.standard import WeightsOut, build_dense_onehot_moe
from tests.helpers import FP32_ATOL, assert_close, tokens_input

HIDDEN, FFN, EXPERTS, TOP_K = 16, 24, 8, 2


def invoke(*args: str | Path) -> Result:
    return CliRunner(env={"MOEC_DEBUG": None}).invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    weights: WeightsOut = {}
    proto = build_dense_onehot_moe(
        hidden=HIDDEN, inter=FFN, experts=EXPERTS, k=TOP_K, activation="swiglu", weights_out=weights
    )
    path = tmp_path_factory.mktemp("mask") / "model.onnx"
    onnx.save(proto, path)
    return path, weights["moe0"]


def masked_block(x: np.ndarray, w: dict, kept: list[int]) -> np.ndarray:
    """The SwiGLU block in float64 with routing restricted to ``kept`` (renormalised top-k)."""
    x = x.astype(np.float64)
    logits = x @ w["router_w"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    masked = np.full_like(probs, -1.0)
    masked[:, kept] = probs[:, kept]
    index = np.argsort(-masked, axis=1, kind="stable")[:, :TOP_K]
    gain = np.take_along_axis(probs, index, 1)
    gain /= gain.sum(1, keepdims=True)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, g in zip(index[t], gain[t], strict=True):
            gate, up = x[t] @ w["gate"][e], x[t] @ w["up"][e]
            y[t] += g * ((gate / (1 + np.exp(-gate)) * up) @ w["down"][e])
    return y.astype(np.float32)


def test_masked_experts_are_never_selected_and_not_stored(model, tmp_path: Path) -> None:
    path, w = model
    kept = [1, 2, 4, 6, 7]
    full = compile_model(path, "host", tmp_path / "full")
    masked = compile_model(path, "host", tmp_path / "masked", kept_experts={"moe0": kept})
    plan = json.loads((masked / "manifest.json").read_text())["layers"][0]["plan"]
    assert [p["expert"] for p in plan if p["kept"]] == kept
    assert all(p["bytes"] == 0 for p in plan if not p["kept"])
    stored = tvm.runtime.load_param_dict_from_file(str(masked / "weights.params"))
    assert stored["moe0.w_up"].shape == (len(kept), FFN, HIDDEN)
    expert_bytes = 3 * FFN * HIDDEN * 4
    saved = (full / "weights.params").stat().st_size - (masked / "weights.params").stat().st_size
    assert saved >= 3 * expert_bytes, f"masking 3 experts saved only {saved} bytes"
    session = ArtifactSession(masked)
    for tokens in (1, 9, 40):
        x = tokens_input(tokens, HIDDEN, seed=3)
        assert_close(session.run({"x": x})["y"], masked_block(x, w, kept), FP32_ATOL, f"{tokens} tokens")


def test_masking_unused_experts_changes_nothing_on_that_data(model, tmp_path: Path) -> None:
    path, w = model
    calib = tokens_input(2, HIDDEN, seed=11)  # at most 4 of the 8 experts are used
    np.savez(tmp_path / "calib.npz", x=calib)
    result = invoke("profile", path, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    used = [
        e
        for e, f in enumerate(
            json.loads((tmp_path / "p.json").read_text())["layers"][0]["activation_frequency"]
        )
        if f > 0
    ]
    assert len(used) < EXPERTS, "the calibration data should leave some expert unused"
    result = invoke(
        "compile", path, "-o", tmp_path / "m", "--profile", tmp_path / "p.json", "--mask-threshold", "1e-9"
    )
    assert result.exit_code == 0, result.output
    assert f"kept experts {used}" in result.stdout
    full = ArtifactSession(compile_model(path, "host", tmp_path / "full"))
    masked = ArtifactSession(tmp_path / "m")
    assert_close(masked.run({"x": calib})["y"], full.run({"x": calib})["y"], 1e-6, "unused experts masked")


def test_pass_leaves_unnamed_and_whole_layers_alone(model) -> None:
    path, _ = model
    mod = import_model(load_model(path)).to_relax()
    for kept in ({}, {"moe0": list(range(EXPERTS))}):
        mask = MaskExperts(kept)
        tvm.ir.assert_structural_equal(mask(mod), mod)
        assert mask.changed == []
    mask = MaskExperts({"moe0": [0, 1]})
    assert not tvm_ffi_equal(mask(mod), mod) and mask.changed == ["moe0"]


def tvm_ffi_equal(a: tvm.IRModule, b: tvm.IRModule) -> bool:
    try:
        tvm.ir.assert_structural_equal(a, b)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(
    ("args", "culprits"),
    [
        (["--keep-experts", "1"], ["--keep-experts 1", "keep between 2 and 8"]),
        (["--keep-experts", "9"], ["--keep-experts 9"]),
        (["--mask-threshold", "1.5"], ["--mask-threshold 1.5", "between 0 and 1"]),
        (["--mask-threshold", "0.99"], ["fewer than its top-k 2"]),
        (["--keep-experts", "3", "--mask-threshold", "0.1"], ["exactly one of"]),
        (["--no-profile", "--keep-experts", "3"], ["need --profile"]),
        (["--other-model"], ["profile of a different model"]),
    ],
)
def test_bad_masking_options_are_one_clear_line(
    model, tmp_path: Path, args: list[str], culprits: list[str]
) -> None:
    path, _ = model
    np.savez(tmp_path / "calib.npz", x=tokens_input(30, HIDDEN))
    profiled = path
    if "--other-model" in args:
        other = tmp_path / "other.onnx"
        onnx.save(build_dense_onehot_moe(hidden=HIDDEN, inter=FFN, experts=EXPERTS, k=TOP_K, seed=5), other)
        profiled, args = other, ["--keep-experts", "3"]
    assert (
        invoke("profile", profiled, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "p.json").exit_code
        == 0
    )
    profile_args = [] if "--no-profile" in args else ["--profile", tmp_path / "p.json"]
    args = [a for a in args if a != "--no-profile"]
    out = tmp_path / "out"
    result = invoke("compile", path, "-o", out, *profile_args, *args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("moec: error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    assert not out.exists()


def test_verify_reports_accuracy_cost_against_the_original(model, tmp_path: Path) -> None:
    path, _ = model
    np.savez(tmp_path / "calib.npz", x=tokens_input(40, HIDDEN, seed=1))
    assert (
        invoke("profile", path, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "p.json").exit_code == 0
    )
    for name, options in (
        ("whole", []),
        ("masked", ["--profile", tmp_path / "p.json", "--keep-experts", "2"]),
    ):
        assert invoke("compile", path, "-o", tmp_path / name, *options).exit_code == 0
        result = invoke("verify", path, tmp_path / name, "--against", "original", "-n", "64")
        assert result.exit_code == 0, result.output  # the artifact matches its own (masked) reference
        (cosine,) = re.findall(r"cosine (\d\.\d+)", result.stdout)
        (agreement,) = re.findall(r"moe0 router agreement with the original: ([\d.]+)%", result.stdout)
        top1 = re.findall(r"top-1 agreement ([\d.]+)%", result.stdout)
        if name == "whole":
            assert float(cosine) > 0.999999 and float(agreement) == 100.0 and float(top1[0]) == 100.0
        else:  # top-2 of only 2 kept experts: most tokens lose at least one of their experts
            assert float(cosine) < 0.999 and float(agreement) < 100.0
