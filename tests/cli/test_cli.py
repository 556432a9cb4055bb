"""The ``moec`` command line, driven as a user drives it: every bad input is one clear line.

Each failure case checks the exit status (1 for a user error, never 3), exactly one
``moec: error:`` line on stderr naming the culprit, no traceback, and no partial artifact
(nor hidden staging directory) left behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from moec.artifact import LIBRARY, MANIFEST, WEIGHTS
from moec.reference.evaluator import run_reference
from moec.targets import bundled_target_file
from tests.helpers import (
    FP32_ATOL,
    assert_close,
    assert_nothing_written,
    assert_user_error,
    compile_to,
    error_line,
    invoke,
    tokens_input,
)
from tests.zoo.ms_moe import build_ms_moe_model
from tests.zoo.standard import OPSET, WeightsOut, build_dense_model, build_dense_onehot_moe

HIDDEN, INTER, EXPERTS, TOP_K = 16, 24, 6, 2
MOEC_SCRIPT = Path(sys.executable).with_name("moec")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write ``model`` to ``path`` without validating it (some test models are invalid on purpose)."""
    path.write_bytes(model.SerializeToString())
    return path


def tiny_graph_model(nodes: list[onnx.NodeProto], opsets: list[tuple[str, int]]) -> onnx.ModelProto:
    """``y = nodes(x)`` with ``x, y: [tokens, HIDDEN]`` and the given opset imports."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", HIDDEN])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", HIDDEN])
    graph = helper.make_graph(nodes, "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    return model


@dataclass
class Compiled:
    """The shared MoE model, its builder weights, and the artifact compiled from it."""

    model_path: Path
    model: onnx.ModelProto
    weights: WeightsOut
    artifact: Path
    other_path: Path  # same interface, different weights


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    """One compile of a swiglu MoE with biases, shared by every test that needs an artifact."""
    root = tmp_path_factory.mktemp("cli")
    weights: WeightsOut = {}
    kwargs = dict(hidden=HIDDEN, inter=INTER, experts=EXPERTS, k=TOP_K, activation="swiglu", expert_bias=True)
    model = build_dense_onehot_moe(**kwargs, seed=0, weights_out=weights)
    session = compile_to(model, root / "a")
    other = save(build_dense_onehot_moe(**kwargs, seed=1), root / "other.onnx")
    return Compiled(root / "a" / "model.onnx", model, weights, session.dir, other)


# --------------------------------------------------------------------------
# bad models
# --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["compile", "inspect"])
def test_missing_model_file(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "nowhere" / "model.onnx"
    out = tmp_path / "out"
    args = [command, missing, "-o", out] if command == "compile" else [command, missing]
    line = assert_user_error(invoke(*args), missing)
    assert "no such file" in line
    assert_nothing_written(out)


@pytest.mark.parametrize("command", ["compile", "inspect"])
def test_file_that_is_not_onnx(tmp_path: Path, command: str) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("this is a text file, not an ONNX model\n" * 20)
    out = tmp_path / "out"
    args = [command, text, "-o", out] if command == "compile" else [command, text]
    assert_user_error(invoke(*args), text)
    assert_nothing_written(out)


def test_truncated_onnx_file(tmp_path: Path, compiled: Compiled) -> None:
    data = compiled.model_path.read_bytes()
    half = tmp_path / "half.onnx"
    half.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    line = assert_user_error(invoke("compile", half, "-o", out), half)
    assert "not a readable ONNX model" in line
    assert_nothing_written(out)
    assert_user_error(invoke("verify", half, compiled.artifact), half)


def test_directory_as_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_user_error(invoke("compile", tmp_path, "-o", out), tmp_path, "directory")
    assert_nothing_written(out)


CHECKER_FAILURES = {
    # a node reading a tensor nothing defines; the message must still name the node
    "undefined_input": (
        tiny_graph_model([helper.make_node("Relu", ["nope"], ["y"], name="bad_relu")], [("", OPSET)]),
        ["bad_relu", "nope"],
    ),
    "opset_zero": (
        tiny_graph_model([helper.make_node("Relu", ["x"], ["y"], name="r0")], [("", 0)]),
        ["Relu"],
    ),
    "opset_from_the_future": (
        tiny_graph_model([helper.make_node("Relu", ["x"], ["y"], name="r0")], [("", 99999)]),
        ["opset 99999"],
    ),
    "no_default_opset": (
        tiny_graph_model([helper.make_node("Relu", ["x"], ["y"], name="r0")], []),
        ["opset"],
    ),
    "unknown_default_domain_op": (
        tiny_graph_model([helper.make_node("Foo", ["x"], ["y"], name="foo0")], [("", OPSET)]),
        ["Foo"],
    ),
}


@pytest.mark.parametrize("case", sorted(CHECKER_FAILURES))
def test_model_failing_onnx_checker(tmp_path: Path, case: str) -> None:
    model, culprits = CHECKER_FAILURES[case]
    path = save(model, tmp_path / f"{case}.onnx")
    out = tmp_path / "out"
    line = assert_user_error(invoke("compile", path, "-o", out), path, *culprits)
    assert "invalid ONNX model" in line
    assert_nothing_written(out)


def test_unsupported_operator_names_node_and_op(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu0"),
        helper.make_node("Foo", ["h"], ["y"], name="my_foo", domain="com.example"),
    ]
    path = save(tiny_graph_model(nodes, [("", OPSET), ("com.example", 1)]), tmp_path / "custom.onnx")
    out = tmp_path / "out"
    line = assert_user_error(invoke("compile", path, "-o", out), "my_foo", "com.example::Foo")
    assert "not supported" in line
    assert_nothing_written(out)


# --------------------------------------------------------------------------
# bad targets
# --------------------------------------------------------------------------


def test_unknown_target_lists_valid_ones(tmp_path: Path, compiled: Compiled) -> None:
    out = tmp_path / "out"
    line = assert_user_error(invoke("compile", compiled.model_path, "-t", "tpu9000", "-o", out), "tpu9000")
    assert "host" in line.split("tpu9000", 1)[1], f"valid targets not listed: {line}"
    assert_nothing_written(out)


HOST_TOML = bundled_target_file("host").read_text()
A72_TOML = bundled_target_file("cortex-a72").read_text()

BAD_TARGETS = {
    "malformed": ('name = "broken"\n[tvm\nkind = "llvm"\n', ["not valid TOML"]),
    "missing_cache_line": (HOST_TOML.replace("cache_line_bytes = 64", ""), ["'cache_line_bytes'"]),
    "missing_schedule": (HOST_TOML.replace('schedule = "cpu"', ""), ["'schedule'"]),
    "missing_tvm_kind": (HOST_TOML.replace('kind = "llvm"', ""), ["'kind'"]),
    "wrong_type": (
        HOST_TOML.replace("cache_line_bytes = 64", 'cache_line_bytes = "64"'),
        ["'cache_line_bytes'"],
    ),
    "unknown_schedule": (HOST_TOML.replace('schedule = "cpu"', 'schedule = "nosuch"'), ["nosuch"]),
    "bad_tvm_kind": (HOST_TOML.replace('kind = "llvm"', 'kind = "nosuchkind"'), ["nosuchkind"]),
    "unknown_key": (A72_TOML.replace("cores = 4", "cores = 4\ncaches = 3"), ["'caches'", "[hardware]"]),
    "cores_not_int": (A72_TOML.replace("cores = 4", 'cores = "four"'), ["'cores'", "four"]),
    "unknown_arch": (A72_TOML.replace('arch = "aarch64"', 'arch = "riscv64"'), ["'arch'", "riscv64"]),
    "precision_not_computable": (
        A72_TOML.replace('compute_precisions = ["fp32"]', 'compute_precisions = ["fp32", "fp16"]'),
        ["'fp16'", "+fullfp16"],
    ),
    "precisions_neither_list_nor_detect": (
        A72_TOML.replace('compute_precisions = ["fp32"]', 'compute_precisions = "guess"'),
        ["'compute_precisions'", "guess"],
    ),
    "unknown_precision": (
        A72_TOML.replace('compute_precisions = ["fp32"]', 'compute_precisions = ["fp32", "fp8"]'),
        ["'fp8'"],
    ),
    "cross_compiler_missing": (
        A72_TOML.replace('cxx = "aarch64-linux-gnu-g++"', 'cxx = "nosuch-linux-gnu-g++"').replace(
            'package = "g++-aarch64-linux-gnu"', 'package = "g++-nosuch-linux-gnu"'
        ),
        ["nosuch-linux-gnu-g++", "apt-get install g++-nosuch-linux-gnu"],
    ),
    "cuda_without_cuda_table": (
        re.sub(r"\[cuda\]\n(?:[^\[\n].*\n)*", "", bundled_target_file("orin").read_text()),
        ["[cuda]"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TARGETS))
def test_bad_target_file(tmp_path: Path, compiled: Compiled, case: str) -> None:
    text, culprits = BAD_TARGETS[case]
    assert text not in (HOST_TOML, A72_TOML) or case == "malformed", "the test edit did not apply"
    target = tmp_path / f"{case}.toml"
    target.write_text(text)
    out = tmp_path / "out"
    assert_user_error(invoke("compile", compiled.model_path, "-t", target, "-o", out), *culprits)
    assert_nothing_written(out)


def test_missing_target_file(tmp_path: Path, compiled: Compiled) -> None:
    target = tmp_path / "absent.toml"
    out = tmp_path / "out"
    assert_user_error(invoke("compile", compiled.model_path, "-t", target, "-o", out), target)
    assert_nothing_written(out)


# --------------------------------------------------------------------------
# bad inputs and artifacts for run / verify
# --------------------------------------------------------------------------


def write_inputs(path: Path, case: str) -> Path:
    """An inputs file that is wrong in the way ``case`` says."""
    good = tokens_input(3, HIDDEN)
    if case == "missing_key":
        np.savez(path, hidden_states=good)
    elif case == "wrong_shape":
        np.savez(path, x=tokens_input(3, HIDDEN + 1))
    elif case == "wrong_rank":
        np.savez(path, x=good[0])
    elif case == "wrong_dtype":
        np.savez(path, x=good.astype(np.float64))
    elif case == "text_file":
        path.write_text("x = [1, 2, 3]\n")
    elif case == "npy_not_npz":
        with path.open("wb") as f:
            np.save(f, good)
    elif case != "absent":
        raise ValueError(case)
    return path


INPUT_CASES = {
    "missing_key": ["'x'"],
    "wrong_shape": ["'x'", str([3, HIDDEN + 1])],
    "wrong_rank": ["'x'", str([HIDDEN])],
    "wrong_dtype": ["'x'", "float64", "float32"],
    "text_file": ["npz"],
    "npy_not_npz": ["npz"],
    "absent": ["no such"],
}


def command_args(command: str, compiled: Compiled, artifact: Path | None = None) -> list[str | Path]:
    """``run ARTIFACT`` or ``verify MODEL ARTIFACT`` (fast settings)."""
    artifact = compiled.artifact if artifact is None else artifact
    if command == "run":
        return ["run", artifact, "--repeats", "1"]
    return ["verify", compiled.model_path, artifact]


@pytest.mark.parametrize("case", sorted(INPUT_CASES))
@pytest.mark.parametrize("command", ["run", "verify"])
def test_bad_inputs_file(tmp_path: Path, compiled: Compiled, command: str, case: str) -> None:
    inputs = write_inputs(tmp_path / "inputs.npz", case)
    out = tmp_path / "outputs.npz"
    args = command_args(command, compiled) + ["--inputs", inputs]
    if command == "run":
        args += ["--output", out]
    assert_user_error(invoke(*args), inputs, *INPUT_CASES[case])
    assert not out.exists()


def make_not_artifact(root: Path, case: str, compiled: Compiled) -> Path:
    """A path that ``run``/``verify`` must refuse as an artifact, wrong in the way ``case`` says."""
    path = root / case
    if case == "empty_dir":
        path.mkdir()
    elif case == "absent":
        pass
    elif case == "a_file":
        path.write_bytes(compiled.model_path.read_bytes())
    elif case == "corrupt_manifest":
        path.mkdir()
        (path / "manifest.json").write_text("{not json")
    elif case == "foreign_manifest":
        path.mkdir()
        (path / "manifest.json").write_text("[1, 2, 3]\n")
    elif case in ("no_library", "no_weights", "garbage_library"):
        path.mkdir()
        for name in (MANIFEST, LIBRARY, WEIGHTS):
            (path / name).write_bytes((compiled.artifact / name).read_bytes())
        if case == "no_library":
            (path / LIBRARY).unlink()
        elif case == "no_weights":
            (path / WEIGHTS).unlink()
        else:
            (path / LIBRARY).write_bytes(b"\x7fELF but not really")
    else:
        raise ValueError(case)
    return path


ARTIFACT_CASES = [
    "empty_dir",
    "absent",
    "a_file",
    "corrupt_manifest",
    "foreign_manifest",
    "no_library",
    "no_weights",
    "garbage_library",
]


@pytest.mark.parametrize("case", ARTIFACT_CASES)
@pytest.mark.parametrize("command", ["run", "verify"])
def test_not_an_artifact(tmp_path: Path, compiled: Compiled, command: str, case: str) -> None:
    artifact = make_not_artifact(tmp_path, case, compiled)
    assert_user_error(invoke(*command_args(command, compiled, artifact)), artifact)


# --------------------------------------------------------------------------
# the output directory
# --------------------------------------------------------------------------


def test_existing_output_needs_force(tmp_path: Path, compiled: Compiled) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_user_error(invoke("compile", compiled.model_path, "-o", out), out, "--force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert not list(tmp_path.glob(".out.*"))

    # --force replaces only what moec wrote: not a folder of something else
    assert_user_error(invoke("compile", compiled.model_path, "-o", out, "--force"), out, "--force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()  # an empty folder is moec's to fill

    # --force with a model that fails leaves the existing directory exactly as it was
    bad = save(
        tiny_graph_model([helper.make_node("Relu", ["nope"], ["y"])], [("", OPSET)]), tmp_path / "bad.onnx"
    )
    assert_user_error(invoke("compile", bad, "-o", out, "--force"), bad)
    assert list(out.iterdir()) == []
    assert not list(tmp_path.glob(".out.*"))

    result = invoke("compile", compiled.model_path, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, LIBRARY, WEIGHTS])
    assert not list(tmp_path.glob(".out.*"))
    verified = invoke("verify", compiled.model_path, out, "-n", "3")
    assert verified.exit_code == 0, verified.output
    assert "verified" in verified.stdout


def test_existing_file_as_output_needs_force(tmp_path: Path, compiled: Compiled) -> None:
    out = tmp_path / "out"
    out.write_text("not a directory")
    assert_user_error(invoke("compile", compiled.model_path, "-o", out), out)
    assert out.read_text() == "not a directory"
    assert_user_error(invoke("compile", compiled.model_path, "-o", out, "--force"), out, "--force")
    assert out.read_text() == "not a directory"


def test_force_never_replaces_the_current_directory_or_the_input_model(
    tmp_path: Path, compiled: Compiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-o .`` (or a parent) and ``-o`` the model itself, or a folder holding it, are refused with
    ``--force`` too, and nothing is touched: a sentinel beside every output stays."""
    work = tmp_path / "work"
    work.mkdir()
    model = work / "model.onnx"
    model.write_bytes(Path(compiled.model_path).read_bytes())
    sentinel = work / "sentinel.txt"
    sentinel.write_text("mine")
    monkeypatch.chdir(work)
    for out in (Path("."), Path(".."), model, work):
        line = assert_user_error(invoke("compile", model, "-o", out, "--force"), out, "--force")
        assert "never replaces" in line or "not a moec artifact" in line
        assert sentinel.read_text() == "mine" and model.read_bytes() == Path(compiled.model_path).read_bytes()
    assert sorted(p.name for p in work.iterdir()) == ["model.onnx", "sentinel.txt"]


# --------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------


def test_verify_passes_on_its_own_model(compiled: Compiled) -> None:
    result = invoke("verify", compiled.model_path, compiled.artifact)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("verified: max abs error"), lines
    per_output = [line for line in lines if " y: max abs " in line]
    assert len(per_output) == 2 and all(line.endswith("ok") for line in per_output), lines
    assert "tokens=1" in per_output[0] and "tokens=7" in per_output[1]  # labelled by the shapes run
    assert "moec: error" not in result.stderr


def test_verify_with_inputs_file(tmp_path: Path, compiled: Compiled) -> None:
    inputs = tmp_path / "feeds.npz"
    np.savez(inputs, x=tokens_input(5, HIDDEN))
    result = invoke("verify", compiled.model_path, compiled.artifact, "--inputs", inputs)
    assert result.exit_code == 0, result.output
    assert any("tokens=5" in line and line.endswith("ok") for line in result.stdout.splitlines())


def test_verify_against_a_different_model_fails(compiled: Compiled) -> None:
    result = invoke("verify", compiled.other_path, compiled.artifact, "-n", "1", "-n", "4")
    line = assert_user_error(result, compiled.artifact, compiled.other_path, "atol")
    assert "differs" in line
    per_output = [row for row in result.stdout.splitlines() if " y: max abs " in row]
    assert len(per_output) == 2 and all(row.endswith("FAIL") for row in per_output), result.stdout
    assert "verified" not in result.stdout


def test_verify_against_a_model_with_another_interface(tmp_path: Path, compiled: Compiled) -> None:
    wider = save(
        build_dense_onehot_moe(hidden=HIDDEN + 8, inter=INTER, experts=EXPERTS, k=TOP_K),
        tmp_path / "wider.onnx",
    )
    assert_user_error(invoke("verify", wider, compiled.artifact), wider, compiled.artifact, "'x'")


def test_verify_rejects_bad_options(compiled: Compiled) -> None:
    result = invoke("verify", compiled.model_path, compiled.artifact, "--tokens", "0")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--tokens" in result.stderr


# --------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------


def expert_bytes_from_builder(weights: dict) -> int:
    """Bytes of one expert's tensors, from the standard builder's canonical weight arrays."""
    roles = ("up", "gate", "down", "up_b", "gate_b", "down_b")
    total = sum(weights[r].nbytes for r in roles if weights[r] is not None)
    assert total % EXPERTS == 0
    return total // EXPERTS


def test_inspect_lists_the_layer(compiled: Compiled) -> None:
    result = invoke("inspect", compiled.model_path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "1 MoE layer(s)" in lines[0]
    header = lines[1].split()
    for column in ("experts", "top-k", "hidden", "ffn", "activation", "router", "dense", "sparse"):
        assert column in header, header
    row = lines[2].split()
    assert row[:6] == ["moe0", str(EXPERTS), str(TOP_K), str(HIDDEN), str(INTER), "swiglu"], row
    assert "softmax" in row
    per_expert = expert_bytes_from_builder(compiled.weights["moe0"])
    assert row[-2:] == [f"{EXPERTS * per_expert / 1e6:.3f}", f"{TOP_K * per_expert / 1e6:.3f}"], row


def test_inspect_json_numbers(compiled: Compiled) -> None:
    result = invoke("inspect", "--json", compiled.model_path)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == str(compiled.model_path)
    [layer] = report["moe_layers"]
    shape = (layer["experts"], layer["top_k"], layer["hidden"], layer["ffn"])
    assert shape == (EXPERTS, TOP_K, HIDDEN, INTER)
    assert layer["activation"] == "swiglu"
    assert layer["router"] == {"scoring": "softmax", "normalize": True}
    assert layer["expert_bias"] is True
    per_expert = expert_bytes_from_builder(compiled.weights["moe0"])
    assert layer["bytes_per_token_sparse"] == TOP_K * per_expert
    assert layer["bytes_per_token_dense"] == EXPERTS * per_expert
    assert layer["parameter_bytes"] == EXPERTS * per_expert


def test_inspect_json_fused_ms_moe(tmp_path: Path) -> None:
    model = build_ms_moe_model(hidden=HIDDEN, inter=INTER, experts=5, k=3, activation="relu")
    path = save(model, tmp_path / "ms.onnx")
    result = invoke("inspect", "--json", path)
    assert result.exit_code == 0, result.output
    [layer] = json.loads(result.stdout)["moe_layers"]
    assert (layer["experts"], layer["top_k"], layer["hidden"], layer["ffn"]) == (5, 3, HIDDEN, INTER)
    assert layer["activation"] == "relu"
    expert_tensors = [numpy_helper.to_array(t) for t in model.graph.initializer if "_fc" in t.name]
    per_expert = sum(np.dtype(np.float32).itemsize * a.size for a in expert_tensors) // 5
    assert layer["bytes_per_token_sparse"] == 3 * per_expert


def test_model_without_moe_inspects_and_compiles(tmp_path: Path) -> None:
    path = save(build_dense_model(hidden=HIDDEN, inter=INTER), tmp_path / "dense.onnx")
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    assert "no MoE layers found" in result.stdout
    as_json = invoke("inspect", "--json", path)
    assert json.loads(as_json.stdout)["moe_layers"] == []

    out = tmp_path / "dense_artifact"
    result = invoke("compile", path, "-o", out)
    assert result.exit_code == 0, result.output
    assert "found 0 MoE layer(s)" in result.stderr
    assert json.loads((out / "manifest.json").read_text())["layers"] == []
    verified = invoke("verify", path, out, "-n", "2")
    assert verified.exit_code == 0, verified.output


# --------------------------------------------------------------------------
# run, targets, help
# --------------------------------------------------------------------------

LATENCY = re.compile(r"^latency over (\d+) runs: mean [\d.]+ ms, p50 [\d.]+ ms, p99 [\d.]+ ms$")
PEAK_RSS = re.compile(r"^peak RSS (\d+) MiB$")


def test_run_with_random_inputs(compiled: Compiled) -> None:
    """Outputs' shapes, then the latency and the process's peak RSS."""
    result = invoke("run", compiled.artifact, "--tokens", "3", "--repeats", "4")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"output y: shape [3, {HIDDEN}] float32" in lines
    match = LATENCY.match(lines[-2])
    assert match and match.group(1) == "4", lines
    peak = PEAK_RSS.match(lines[-1])
    assert peak and int(peak.group(1)) > 0, lines


def test_run_profile_lists_the_kernels_each_call_runs(compiled: Compiled) -> None:
    """``--profile``: one row per function the VM calls, with its calls per call of ``main``: the
    layer's four kernels once each, and the router's matmul on the linear kernel."""
    result = invoke("run", compiled.artifact, "--tokens", "3", "--repeats", "2", "--profile")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("time per function")) + 2
    rows = {line.split()[2]: (float(line.split()[0]), float(line.split()[1])) for line in lines[start:]}
    for kind in ("route", "group", "expert_up", "expert_down"):
        name = next(n for n in rows if n.endswith(f"_{kind}"))
        assert rows[name][1] == 1, (name, rows[name])
    assert any(name.startswith("linear_") for name in rows), rows
    assert all(ms >= 0 for ms, _ in rows.values())


def test_run_threads_sets_the_thread_count(compiled: Compiled, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVM_NUM_THREADS", "unset by this test")  # restored afterwards
    result = invoke("run", compiled.artifact, "--tokens", "2", "--repeats", "1", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert os.environ["TVM_NUM_THREADS"] == "1"
    refused = invoke("run", compiled.artifact, "--threads", "0")
    assert refused.exit_code == 2 and "--threads" in refused.output


def test_run_writes_outputs_by_onnx_name(tmp_path: Path, compiled: Compiled) -> None:
    feeds = {"x": tokens_input(5, HIDDEN)}
    inputs, outputs = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inputs, **feeds)
    result = invoke("run", compiled.artifact, "--inputs", inputs, "--output", outputs, "--repeats", "1")
    assert result.exit_code == 0, result.output
    assert f"wrote {outputs}" in result.stdout
    expected = run_reference(compiled.model, feeds)
    with np.load(outputs) as data:
        assert sorted(data.files) == sorted(o.name for o in compiled.model.graph.output) == sorted(expected)
        for name, value in expected.items():
            assert_close(data[name], value, FP32_ATOL, f"{name} written by moec run")


def test_targets_lists_every_board_with_its_key_facts() -> None:
    result = invoke("targets")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    names = [line.split()[0] for line in lines if line.strip() and not line.startswith(" ")]
    assert {"host", "cortex-a72", "cortex-a76", "orin"} <= set(names)
    heads = [i for i, line in enumerate(lines) if line and not line.startswith(" ")]
    facts = {lines[i].split()[0]: lines[i + 1] for i in heads}
    assert "aarch64, 4 cores, 128-bit SIMD, 64 B lines, computes fp32," in facts["cortex-a72"]
    assert "aarch64-linux-gnu-g++" in facts["cortex-a72"]
    assert "sm_87" in facts["orin"] and "128 B lines" in facts["orin"] and "fp16" in facts["orin"]


SUBCOMMAND_OPTIONS = {
    "compile": ["--target", "--output", "--force"],
    "run": ["--inputs", "--output", "--tokens", "--repeats"],
    "verify": ["--inputs", "--tokens", "--atol"],
    "inspect": ["--json"],
    "targets": [],
}


def test_main_help() -> None:
    for flag in ("--help", "-h"):
        result = invoke(flag)
        assert result.exit_code == 0, result.output
        for command in SUBCOMMAND_OPTIONS:
            assert command in result.stdout


@pytest.mark.parametrize("command", sorted(SUBCOMMAND_OPTIONS))
def test_subcommand_help(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    usage = result.stdout.splitlines()[0]
    assert usage.startswith("Usage:") and command in usage, usage
    for option in SUBCOMMAND_OPTIONS[command]:
        assert option in result.stdout, f"{command} --help does not describe {option}"


def test_missing_required_option_is_a_usage_error(compiled: Compiled) -> None:
    result = invoke("compile", compiled.model_path)
    assert result.exit_code == 2 and "--output" in result.stderr and "Traceback" not in result.output


# --------------------------------------------------------------------------
# the installed console script
# --------------------------------------------------------------------------


def script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the installed ``moec`` console script."""
    if not MOEC_SCRIPT.exists():
        pytest.skip(f"no console script at {MOEC_SCRIPT}")
    env = {k: v for k, v in os.environ.items() if k != "MOEC_DEBUG"}
    return subprocess.run(
        [str(MOEC_SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120, env=env
    )


def test_console_script_help() -> None:
    proc = script("--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: moec" in proc.stdout and "compile" in proc.stdout


def test_console_script_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    out = tmp_path / "out"
    proc = script("compile", missing, "-o", out)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert str(missing) in error_line(proc.stderr)
    assert_nothing_written(out)


def test_console_script_run(compiled: Compiled) -> None:
    proc = script("run", compiled.artifact, "--repeats", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert LATENCY.match(lines[-2]), proc.stdout
    peak = PEAK_RSS.match(lines[-1])
    assert peak and int(peak.group(1)) > 0, proc.stdout
