"""A Cortex-A72 artifact runs here as on the board: moec-runner cross-built for aarch64, under qemu.

The model is the bundled two-MoE-layer example. Its cortex-a72 build runs with the runner built
by ``aarch64-linux-gnu-g++`` against TVM's aarch64 runtime from PyPI, started under
``qemu-aarch64``; its outputs are checked against the numpy reference, through the Python API,
``moec verify``, ``moec run``, and the command in a ``moec package`` tarball's README. The
tools come from ``scripts/setup.sh`` (root installs them); without them these tests are skipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from moec.artifact import MANIFEST, WEIGHTS
from moec.compiler.compile import compile_model
from moec.kernels.formats import REDUCED_ARITHMETIC_TOLERANCE
from moec.options import CompileOptions
from moec.reference.evaluator import run_reference
from moec.reference.stored import run_stored_reference
from moec.runtime.board import ArtifactTarget, RunnerSession, runtime_library_dirs
from moec.targets import bundled_target_file
from moec.verify import layer_plans, reduced_arithmetic
from tests.helpers import (
    EXAMPLE_MODEL,
    FP32_ATOL,
    assert_close,
    assert_nothing_written,
    assert_user_error,
    invoke,
    tokens_input,
)

HIDDEN = 64
MIXED = ["int8", "fp16", "fp32", "int8", "int8", "fp16", "int8", "fp32"]
MIXED_DOT = ["int8-dot", "fp16", "fp32", "int8", "int8-dot", "fp16", "int8-dot", "fp32"]
"""One precision per expert of the example's first layer: every format in one layer."""
EM_AARCH64 = 183
LATENCY = re.compile(r"latency over \d+ runs: mean [\d.]+ ms, p50 [\d.]+ ms, p99 [\d.]+ ms")

pytestmark = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None,
    reason="needs g++-aarch64-linux-gnu and qemu-user (scripts/setup.sh installs them as root)",
)


def elf_machine(path: Path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(header[18:20], "little")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/mixtral_tiny.onnx compiled for cortex-a72."""
    return compile_model(
        EXAMPLE_MODEL, tmp_path_factory.mktemp("a72") / "artifact", CompileOptions(target="cortex-a72")
    )


@pytest.fixture(scope="module")
def session(artifact: Path) -> RunnerSession:
    return RunnerSession(artifact)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(EXAMPLE_MODEL)


def edited_target(directory: Path, old: str, new: str, name: str = "cortex-a72") -> Path:
    """A copy of the bundled cortex-a72 target file, still named ``name``, with ``old`` replaced by
    ``new``: a board's toolchain comes from its target file, never from the manifest."""
    text = bundled_target_file("cortex-a72").read_text()
    assert old in text
    path = directory / "my-board.toml"
    path.write_text(text.replace(old, new).replace('name = "cortex-a72"', f'name = "{name}"'))
    return path


@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_a72_artifact_matches_numpy_under_qemu(session: RunnerSession, model, tokens: int) -> None:
    assert Path(session.emulator[0]).name == "qemu-aarch64"
    feeds = {"x": tokens_input(tokens, HIDDEN)}
    outputs = session.run(feeds)
    expected = run_reference(model, feeds)
    assert set(outputs) == set(expected)
    for name, value in expected.items():
        assert_close(outputs[name], value, FP32_ATOL, f"{name} ({tokens} tokens, qemu) vs numpy")


@pytest.mark.parametrize(
    ("target", "precisions"),
    [
        ("cortex-a72", {"precision": "fp16"}),
        ("cortex-a72", {"precision_plan": {"moe0": MIXED, "moe1": "int8"}}),
        ("cortex-a76", {"precision_plan": {"moe0": MIXED, "moe1": "int8"}, "int8_group": 32}),
        ("cortex-a76", {"precision_plan": {"moe0": MIXED_DOT, "moe1": "int8-dot"}}),
    ],
    ids=["a72-fp16", "a72-mixed", "a76-mixed-int8-groups", "a76-mixed-int8-dot"],
)
def test_stored_precisions_match_rounded_reference_under_qemu(
    model, tmp_path: Path, target: str, precisions: dict
) -> None:
    """Expert weights stored narrower on the boards: fp16 widened on load (A72) or multiplied in
    FP16 (A76, +fullfp16), int8 widened and scaled, int8-dot multiplied with ``sdot`` (A76,
    +dotprod), and a layer mixing them with fp32 experts in one dispatch; the outputs match the
    model with each expert rounded as stored (int8-dot experts' input rows too)."""
    artifact = compile_model(EXAMPLE_MODEL, tmp_path / "out", CompileOptions(target=target, **precisions))
    session = RunnerSession(artifact)
    plans = layer_plans(session.manifest)
    half = reduced_arithmetic(session.manifest)
    assert half == (target == "cortex-a76"), "fp16 experts multiply in FP16 exactly where the core has it"
    for tokens in (1, 7):
        feeds = {"x": tokens_input(tokens, HIDDEN)}
        expected = run_stored_reference(model, feeds, plans)
        actual = session.run(feeds)
        for name, value in expected.items():
            what = f"{name} ({tokens} tokens, {target}, qemu)"
            if half:  # FP16 products: the documented relative bound, and not fp32-exact
                error = np.abs(actual[name] - value).max()
                assert 1e-6 < error <= REDUCED_ARITHMETIC_TOLERANCE * np.abs(value).max(), f"{what}: {error}"
            else:
                assert_close(actual[name], value, FP32_ATOL, what)


def test_runner_and_runtime_are_aarch64_and_relocatable(session: RunnerSession) -> None:
    """The runner and TVM's libraries are aarch64 code; the runner's run path names no host path."""
    assert elf_machine(session.runner) == EM_AARCH64
    (lib_dir,) = runtime_library_dirs(session.target)
    for name in ("libtvm_runtime.so", "libtvm_ffi.so"):
        assert elf_machine(lib_dir / name) == EM_AARCH64, name
    readelf = shutil.which("aarch64-linux-gnu-readelf") or shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run([readelf, "-d", str(session.runner)], capture_output=True, text=True).stdout
    (runpath,) = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r\w*path: \[([^\]]*)\]", dynamic)
    assert runpath.split(":") == ["$ORIGIN", "$ORIGIN/../lib"], runpath
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert "libtvm_runtime.so" in needed and not any("compiler" in lib for lib in needed), needed


@pytest.mark.parametrize("version", ["hardware", "portable"])
def test_sha256_check_under_qemu(
    session: RunnerSession, artifact: Path, tmp_path: Path, version: str
) -> None:
    """The aarch64 runner's SHA-256 on the ARMv8 SHA2 instructions (qemu's ``-cpu max`` has them, as
    Orin's A78AE does; "hardware" fails without them) and on the portable code (what a Raspberry
    Pi 4's A72, which lacks them, runs): the recorded digest passes, one flipped bit is refused."""
    copy = Path(shutil.copytree(artifact, tmp_path / "artifact"))
    emulator = [session.emulator[0], "-cpu", "max", *session.emulator[1:]]
    command = [*emulator, str(session.runner), str(copy), "--random-inputs"]
    env = {**os.environ, "MOEC_RUNNER_SHA256": version}
    passed = subprocess.run(command, capture_output=True, text=True, env=env)
    assert passed.returncode == 0, passed.stderr
    weights = copy / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # in the data region, after the index
    weights.write_bytes(bytes(data))
    refused = subprocess.run(command, capture_output=True, text=True, env=env)
    assert refused.returncode == 1, refused.stderr
    assert f"{weights}: damaged artifact: its SHA-256 differs from the manifest's" in refused.stderr


def test_verify_cli_passes_under_qemu(artifact: Path) -> None:
    result = invoke("verify", EXAMPLE_MODEL, artifact, "-n", "1", "-n", "5", "-n", "16")
    assert result.exit_code == 0, result.output
    assert "under qemu-aarch64" in result.stdout
    assert len(re.findall(r"tokens=\d+\s+y: .* ok", result.stdout)) == 3, result.stdout
    assert "verified: max abs error" in result.stdout


def test_run_cli_under_qemu_writes_reference_outputs(artifact: Path, model, tmp_path: Path) -> None:
    inputs, output = tmp_path / "in.npz", tmp_path / "out.npz"
    feeds = {"x": tokens_input(3, HIDDEN, seed=7)}
    np.savez(inputs, **feeds)
    result = invoke("run", artifact, "--inputs", inputs, "--output", output, "--repeats", "3")
    assert result.exit_code == 0, result.output
    assert "under qemu-aarch64" in result.stdout
    assert LATENCY.search(result.stdout) and "emulated" in result.stdout, result.stdout
    with np.load(output) as written:
        assert_close(written["y"], run_reference(model, feeds)["y"], FP32_ATOL, "moec run --output")


def test_package_runs_with_its_readme_command(artifact: Path, tmp_path: Path) -> None:
    """The tarball unpacks into a directory where the README's one command runs the model."""
    tarball = tmp_path / "pi4-model.tar.gz"
    result = invoke("package", artifact, "-o", tarball)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [tarball.name], "temporary file left behind"
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
        assert {
            "pi4-model/README.md",
            "pi4-model/artifact/model.so",
            "pi4-model/artifact/weights.bin",
            "pi4-model/artifact/manifest.json",
            "pi4-model/bin/moec-runner",
            "pi4-model/lib/libtvm_runtime.so",
            "pi4-model/lib/libtvm_ffi.so",
        } <= names, names
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
        tar.extractall(tmp_path / "board", **safe)
    board = tmp_path / "board" / "pi4-model"
    readme = (board / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.DOTALL)
    command = blocks[0].strip()
    assert "\n" not in command and command.startswith("bin/moec-runner"), command
    target = ArtifactTarget.from_manifest(json.loads((artifact / MANIFEST).read_text()), artifact)
    emulator = target.toolchain.emulator
    run = subprocess.run([*emulator, *shlex.split(command)], cwd=board, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "output y: shape [1, 64] float32" in run.stdout, run.stdout
    assert LATENCY.search(run.stdout), run.stdout


def test_missing_emulator_names_its_package(artifact: Path, tmp_path: Path) -> None:
    target = edited_target(tmp_path, 'emulator = ["qemu-aarch64"', 'emulator = ["no-such-qemu-aarch64"')
    for command in (("run", artifact), ("verify", EXAMPLE_MODEL, artifact)):
        result = invoke(*command, "--target", target)
        assert_user_error(result, "no-such-qemu-aarch64", "apt-get install qemu-user")


def test_missing_cross_compiler_names_its_package(artifact: Path, tmp_path: Path) -> None:
    """A runner for a compiler nobody has built yet needs that compiler: a one-line error."""
    target = edited_target(tmp_path, 'cxx = "aarch64-linux-gnu-g++"', 'cxx = "no-such-aarch64-linux-gnu-g++"')
    assert_user_error(
        invoke("run", artifact, "--target", target),
        "no-such-aarch64-linux-gnu-g++",
        "apt-get install g++-aarch64-linux-gnu",
    )
    assert_user_error(invoke("package", artifact, "--target", target), "no-such-aarch64-linux-gnu-g++")


def test_nothing_in_the_manifest_is_executed(artifact: Path, tmp_path: Path) -> None:
    """A manifest whose toolchain names a script: run and package use the bundled target file's
    compiler and emulator, and the script never runs."""
    sentinel = tmp_path / "executed"
    script = tmp_path / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {sentinel}\nexit 1\n")
    script.chmod(0o755)
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["target"]["toolchain"].update(cxx=str(script), emulator=[str(script)])
    (copy / MANIFEST).write_text(json.dumps(manifest))
    result = invoke("run", copy, "--repeats", "1")
    assert result.exit_code == 0, result.output
    result = invoke("package", copy, "-o", tmp_path / "bundle.tar.gz")
    assert result.exit_code == 0, result.output
    assert not sentinel.exists(), "a command named by the manifest was executed"


def test_unbundled_board_needs_its_target_file(artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["target"]["name"] = "my-board"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert_user_error(invoke("run", copy), copy, "'my-board'", "--target")
    other = edited_target(tmp_path, 'cxx = "aarch64-linux-gnu-g++"', 'cxx = "aarch64-linux-gnu-g++"', "other")
    assert_user_error(invoke("run", copy, "--target", other), other, "'other'", "'my-board'")
    own = edited_target(
        tmp_path, 'cxx = "aarch64-linux-gnu-g++"', 'cxx = "aarch64-linux-gnu-g++"', "my-board"
    )
    result = invoke("run", copy, "--target", own, "--repeats", "1")
    assert result.exit_code == 0, result.output


def test_target_file_naming_a_missing_compiler_fails_compile(tmp_path: Path) -> None:
    text = bundled_target_file("cortex-a72").read_text()
    target = tmp_path / "my-board.toml"
    target.write_text(
        text.replace('cxx = "aarch64-linux-gnu-g++"', 'cxx = "no-such-cross-g++"').replace(
            'package = "g++-aarch64-linux-gnu"', 'package = "g++-no-such-cross"'
        )
    )
    result = invoke("compile", EXAMPLE_MODEL, "--target", target, "-o", tmp_path / "out")
    assert_user_error(result, "no-such-cross-g++", "apt-get install g++-no-such-cross")
    assert_nothing_written(tmp_path / "out")


def test_package_rejects_what_is_not_an_artifact(artifact: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(invoke("package", empty), "not a moec artifact directory")
    assert_user_error(invoke("package", tmp_path / "missing"), "not a moec artifact directory")
    damaged = tmp_path / "damaged"
    shutil.copytree(artifact, damaged)
    (damaged / "model.so").unlink()
    assert_user_error(invoke("package", damaged, "-o", tmp_path / "x.tar.gz"), "damaged artifact")
    assert_user_error(invoke("package", artifact, "-o", tmp_path), "is a directory")
    assert not list(tmp_path.glob("*.tar.gz")) and not list(tmp_path.glob(".*.tmp"))


def test_cuda_artifact_runner_needs_only_the_nvidia_driver(
    session: RunnerSession, artifact: Path, tmp_path
) -> None:
    """The aarch64 runner, given a CUDA target's manifest, opens the NVIDIA driver (libcuda.so.1)
    itself; here (no driver under qemu) that fails in one line naming it. The bundle ships TVM's
    two runtime libraries and no CUDA library (tests/targets/test_cuda_driver_runtime.py runs
    such a bundle on a stand-in driver)."""
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["target"]["cuda"] = {"arch": "sm_87", "version": "12.6"}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    command = [*session.emulator, str(session.runner), str(copy), "--random-inputs"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "libcuda.so.1 cannot be loaded" in lines[0], result.stderr

    tarball = tmp_path / "orin.tar.gz"
    packaged = invoke("package", copy, "-o", tarball)
    assert packaged.exit_code == 0, packaged.output
    assert "warning" not in packaged.stderr, packaged.stderr
    with tarfile.open(tarball) as tar:
        assert sorted(n for n in tar.getnames() if "/lib/" in n) == [
            "orin/lib/libtvm_ffi.so",
            "orin/lib/libtvm_runtime.so",
        ]
        readme = tar.extractfile("orin/README.md").read().decode()
    assert "CUDA GPU" in readme and "libcuda.so.1" in readme


def test_profile_is_refused_for_an_emulated_board(artifact: Path) -> None:
    """Functions timed under qemu would say nothing about the board: ``--profile`` says so."""
    assert_user_error(invoke("run", artifact, "--profile"), "--profile needs an artifact that runs here")
