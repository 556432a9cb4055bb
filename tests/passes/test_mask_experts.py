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
from tvm import relax

from moec.artifact import WEIGHTS
from moec.compiler.compile import compile_model
from moec.frontend.importer import import_model
from moec.frontend.loader import load_model
from moec.kernels import kernel_kind
from moec.options import CompileOptions
from moec.passes.apply_kernel_schedule import ApplyKernelSchedule
from moec.passes.mask_experts import MaskExperts
from moec.runtime.session import ArtifactSession
from moec.schedule import CpuSchedule
from moec.weights_file import read_weights
from tests.helpers import (
    FP32_ATOL,
    assert_close,
    assert_nothing_written,
    assert_user_error,
    invoke,
    profile_model,
    softmax_top_k,
    swiglu_expert,
    tokens_input,
)
from tests.zoo.standard import build_dense_onehot_moe

HIDDEN, FFN, EXPERTS, TOP_K = 16, 24, 8, 2


@pytest.fixture(scope="module")
def model(moe_block) -> tuple[Path, dict]:
    """A one-layer SwiGLU model and its weights."""
    return moe_block(hidden=HIDDEN, ffn=FFN, experts=EXPERTS, top_k=TOP_K)


def masked_block(x: np.ndarray, w: dict, kept: list[int]) -> np.ndarray:
    """The SwiGLU block in float64 with routing restricted to ``kept`` (renormalised top-k)."""
    index, gain = softmax_top_k(x, w["router_w"], TOP_K, kept)
    y = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for e, g in zip(index[t], gain[t], strict=True):
            y[t] += g * swiglu_expert(x[t], w, e)
    return y.astype(np.float32)


def test_masked_experts_are_never_selected_and_not_stored(model, tmp_path: Path) -> None:
    path, w = model
    kept = [1, 2, 4, 6, 7]
    full = compile_model(path, tmp_path / "full")
    masked = compile_model(path, tmp_path / "masked", CompileOptions(kept_experts={"moe0": kept}))
    plan = json.loads((masked / "manifest.json").read_text())["layers"][0]["plan"]
    assert [p["expert"] for p in plan if p["kept"]] == kept
    assert all(p["bytes"] == 0 for p in plan if not p["kept"])
    stored = read_weights(masked / WEIGHTS)
    # host: expert matrices packed in panels (PackExpertWeights), here one 24-row panel per expert
    assert stored["moe0.w_up"].shape == (len(kept), 1, HIDDEN, FFN)
    expert_bytes = 3 * FFN * HIDDEN * 4
    saved = (full / WEIGHTS).stat().st_size - (masked / WEIGHTS).stat().st_size
    assert saved >= 3 * expert_bytes, f"masking 3 experts saved only {saved} bytes"
    session = ArtifactSession(masked)
    for tokens in (1, 9, 40):
        x = tokens_input(tokens, HIDDEN, seed=3)
        assert_close(session.run({"x": x})["y"], masked_block(x, w, kept), FP32_ATOL, f"{tokens} tokens")


def test_masking_unused_experts_changes_nothing_on_that_data(model, tmp_path: Path) -> None:
    path, w = model
    calib = tokens_input(2, HIDDEN, seed=11)  # at most 4 of the 8 experts are used
    profile = profile_model(path, tmp_path, {"x": calib})
    frequency = json.loads(profile.read_text())["layers"][0]["activation_frequency"]
    used = [e for e, f in enumerate(frequency) if f > 0]
    assert len(used) < EXPERTS, "the calibration data should leave some expert unused"
    result = invoke("compile", path, "-o", tmp_path / "m", "--profile", profile, "--mask-threshold", "1e-9")
    assert result.exit_code == 0, result.output
    assert f"kept experts {used}" in result.stdout
    full = ArtifactSession(compile_model(path, tmp_path / "full"))
    masked = ArtifactSession(tmp_path / "m")
    assert_close(masked.run({"x": calib})["y"], full.run({"x": calib})["y"], 1e-6, "unused experts masked")


def test_pass_leaves_unnamed_and_whole_layers_alone(model) -> None:
    path, _ = model
    mod = import_model(load_model(path)).to_relax()
    for kept in ({}, {"moe0": list(range(EXPERTS))}):
        mask = MaskExperts(kept)
        tvm.ir.assert_structural_equal(mask(mod), mod)
        assert mask.changed == []


def test_pass_keeps_exactly_the_named_experts(model) -> None:
    """MaskExperts({"moe0": [1, 4, 6]}): every expert weight is retyped to 3 experts and recorded
    for slicing, the router picks among those 3 (scores still over all 8), the group and expert
    kernels are remade for 3, and the module run on the sliced weights is the numpy block routed
    over those 3 only."""
    path, w = model
    kept = [1, 4, 6]
    mod, params = relax.frontend.detach_params(import_model(load_model(path)).to_relax())
    mask = MaskExperts({"moe0": kept})
    masked = mask(mod)
    assert mask.changed == ["moe0"]

    def shapes(module: tvm.IRModule) -> dict[str, tuple[int, ...]]:
        return {v.name: tuple(int(d) for d in v.ty.shape) for v in module["main"].params[1:]}

    expert_weights = {name for name in shapes(mod) if name.startswith("moe0.")}
    assert expert_weights == {f"moe0.{p}_{m}" for p in "wb" for m in ("up", "gate", "down")}
    assert shapes(masked) == {
        name: (len(kept), *shape[1:]) if name in expert_weights else shape
        for name, shape in shapes(mod).items()
    }
    slices = json.loads(str(masked["main"].attrs["moec.expert_slices"]))
    assert slices == dict.fromkeys(expert_weights, kept)
    kernels = [
        (kernel_kind(func), json.loads(str(func.attrs["moec.config"])))
        for _, func in masked.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc)
    ]
    assert sorted(kind for kind, _ in kernels) == ["expert_down", "expert_up", "group", "route"]
    configs = dict(kernels)
    assert configs["route"]["kept"] == kept and configs["route"]["num_experts"] == EXPERTS
    for kind in ("group", "expert_up", "expert_down"):
        assert configs[kind]["num_experts"] == len(kept), kind

    names = [v.name for v in masked["main"].params[1:]]
    weights = [
        tvm.runtime.tensor(np.ascontiguousarray(value.numpy()[slices[name]]) if name in slices else value)
        for name, value in zip(names, params["main"], strict=True)
    ]
    built = ApplyKernelSchedule(CpuSchedule())(masked)
    vm = relax.VirtualMachine(tvm.compile(built, target="llvm"), tvm.cpu())
    for tokens in (1, 9, 40):
        x = tokens_input(tokens, HIDDEN, seed=3)
        y = vm["main"](tvm.runtime.tensor(x), *weights).numpy()
        assert_close(y, masked_block(x, w, kept), FP32_ATOL, f"{tokens} tokens")


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
    profiled = path
    if "--other-model" in args:
        other = tmp_path / "other.onnx"
        onnx.save(build_dense_onehot_moe(hidden=HIDDEN, inter=FFN, experts=EXPERTS, k=TOP_K, seed=5), other)
        profiled, args = other, ["--keep-experts", "3"]
    profile = profile_model(profiled, tmp_path, {"x": tokens_input(30, HIDDEN)})
    profile_args = [] if "--no-profile" in args else ["--profile", profile]
    args = [a for a in args if a != "--no-profile"]
    out = tmp_path / "out"
    assert_user_error(invoke("compile", path, "-o", out, *profile_args, *args), *culprits)
    assert_nothing_written(out)


def test_verify_reports_accuracy_cost_against_the_original(model, tmp_path: Path) -> None:
    path, _ = model
    profile = profile_model(path, tmp_path, {"x": tokens_input(40, HIDDEN, seed=1)})
    for name, options in (("whole", []), ("masked", ["--profile", profile, "--keep-experts", "2"])):
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
