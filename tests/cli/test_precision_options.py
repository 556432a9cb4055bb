"""``moec compile --precision / --precision-plan / --int8-group / --accuracy-budget`` from the
command line: plans that compile and verify, and every bad plan a one-line error naming it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moec.errors import MoecError
from moec.precision_plan import load_precision_plan
from moec.targets import load_target
from tests.helpers import assert_nothing_written, assert_user_error, invoke, profile_model


@pytest.fixture
def block(moe_block) -> Path:
    path, _ = moe_block(hidden=64, ffn=64, experts=4, top_k=2)
    return path


def test_plan_file_compiles_inspects_and_verifies(block: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text('int8_group = 32\n[layers]\nmoe0 = ["int8", "fp16", "fp32", "int8"]\n')
    out = tmp_path / "out"
    result = invoke("compile", block, "-o", out, "--precision-plan", plan)
    assert result.exit_code == 0, result.output
    layer = json.loads((out / "manifest.json").read_text())["layers"][0]
    assert [e["precision"] for e in layer["plan"]] == ["int8", "fp16", "fp32", "int8"]
    assert layer["int8_group"] == 32
    shown = invoke("inspect", out)
    assert shown.exit_code == 0, shown.output
    assert "2 int8, 1 fp16, 1 fp32 (int8 scales per 32 inputs)" in shown.output
    assert "0:int8 1:fp16 2:fp32 3:int8" in shown.output
    verified = invoke("verify", block, out, "-n", "1", "-n", "9")
    assert verified.exit_code == 0, verified.output
    assert "expert precisions" in verified.output


@pytest.mark.parametrize("precision", ["int8", "int8-dot"])
def test_precision_flag_and_group_flag(block: Path, tmp_path: Path, precision: str) -> None:
    if precision == "int8-dot" and load_target("host").int8_dot is None:
        pytest.skip("this CPU does not compute int8")
    out = tmp_path / "out"
    result = invoke("compile", block, "-o", out, "--precision", precision, "--int8-group", "64")
    assert result.exit_code == 0, result.output
    layer = json.loads((out / "manifest.json").read_text())["layers"][0]
    assert {e["precision"] for e in layer["plan"]} == {precision} and layer["int8_group"] == 64
    shown = invoke("inspect", out)
    assert shown.exit_code == 0 and f"4 {precision} (int8 scales per 64 inputs)" in shown.output, shown.output
    verified = invoke("verify", block, out, "-n", "1", "-n", "9")
    assert verified.exit_code == 0, verified.output


@pytest.mark.parametrize(
    ("text", "culprits"),
    [
        ('[layers]\nmoe0 = ["int8", "int4", "fp32", "fp32"]\n', ["--precision-plan", "moe0", "'int4'"]),
        ('[layers]\nmoe0 = ["int8", "fp32"]\n', ["--precision-plan", "moe0", "4 experts", "names 2"]),
        ('[layers]\nmoe7 = "int8"\n', ["--precision-plan", "moe7"]),
        ("[layers]\nmoe0 = 8\n", ["plan.toml", "layers.moe0"]),
        ("layers = [\n", ["plan.toml", "not a TOML file"]),
        ('precision = "int8"\n', ["plan.toml", "precision"]),
        ('int8_group = 48\n[layers]\nmoe0 = "int8"\n', ["--int8-group 48"]),
    ],
    ids=[
        "unknown-precision",
        "wrong-expert-count",
        "unknown-layer",
        "not-a-list",
        "bad-toml",
        "unknown-key",
        "bad-group",
    ],
)
def test_bad_plan_is_one_line_naming_it(block: Path, tmp_path: Path, text: str, culprits: list[str]) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(text)
    out = tmp_path / "out"
    assert_user_error(invoke("compile", block, "-o", out, "--precision-plan", plan), *culprits)
    assert_nothing_written(out)


def test_int8_dot_is_refused_where_the_target_has_no_int8_arithmetic(block: Path, tmp_path: Path) -> None:
    """The Cortex-A72 has no dot-product instructions: int8-dot, for all experts or in a plan, is
    one line naming the option and the target, before anything is compiled; weight-only int8 and
    dense int8-dot (not a dense format) are told apart."""
    out = tmp_path / "out"
    line = assert_user_error(
        invoke("compile", block, "-o", out, "--target", "cortex-a72", "--precision", "int8-dot"),
        "--precision",
        "cortex-a72",
    )
    assert "int8" in line and "fp32" in line  # what to use instead, what the board computes
    plan = tmp_path / "plan.toml"
    plan.write_text('[layers]\nmoe0 = ["int8-dot", "fp32", "fp32", "int8"]\n')
    assert_user_error(
        invoke("compile", block, "-o", out, "--target", "cortex-a72", "--precision-plan", plan),
        "--precision-plan",
        "cortex-a72",
    )
    result = invoke("compile", block, "-o", out, "--dense-precision", "int8-dot")
    assert result.exit_code == 2 and "int8-dot" in result.output  # click: not one of the choices
    assert_nothing_written(out)


def test_group_that_does_not_divide_the_layer_is_refused(moe_block, tmp_path: Path) -> None:
    path, _ = moe_block(hidden=48, ffn=64, experts=4, top_k=2)
    out = tmp_path / "out"
    result = invoke("compile", path, "-o", out, "--precision", "int8", "--int8-group", "32")
    assert_user_error(result, "--int8-group 32", "moe0", "48")
    assert_nothing_written(out)


def test_accuracy_budget_needs_its_data_and_excludes_a_plan(block: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_user_error(
        invoke("compile", block, "-o", out, "--accuracy-budget", "0.01"), "--profile", "--calib"
    )
    calib = {"x": np.random.default_rng(0).standard_normal((3, 16, 64)).astype(np.float32)}
    profile = profile_model(block, tmp_path, calib)
    args = ("--profile", profile, "--calib", tmp_path / "calib.npz")
    line = assert_user_error(
        invoke("compile", block, "-o", out, *args, "--accuracy-budget", "0.01", "--precision", "int8"),
        "--precision",
    )
    assert "--accuracy-budget" in line
    assert_user_error(invoke("compile", block, "-o", out, *args, "--accuracy-budget", "-1"), "-1")
    assert_nothing_written(out)


def test_plan_file_reader(tmp_path: Path) -> None:
    """What a plan file holds, read without the model (the model checks come at compile)."""
    path = tmp_path / "plan.toml"
    path.write_text("int8_group = 0\n")
    with pytest.raises(MoecError, match="needs a \\[layers\\] table"):
        load_precision_plan(path)
    path.write_text('int8_group = 128\n[layers]\nmoe0 = "fp16"\nmoe1 = ["int8", "fp32"]\n')
    plan = load_precision_plan(path)
    assert plan.layers == {"moe0": "fp16", "moe1": ("int8", "fp32")} and plan.int8_group == 128
