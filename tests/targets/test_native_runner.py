"""The standalone C++ runner (what a board runs): same numbers as the numpy reference, runtime-only links.

The runner is built once per module into pytest's temporary directory; the artifacts it runs are
compiled by the same helpers the end-to-end tests use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from moec.artifact import FORMAT, LIBRARY, MANIFEST, WEIGHTS
from moec.compiler.compile import compile_model
from moec.errors import MoecError
from moec.reference.evaluator import run_reference
from moec.runtime.native import build_runner, output_file_stem, run_native
from moec.weights_file import read_weights, write_weights
from tests.helpers import (
    FP32_ATOL,
    WEIGHTS_DAMAGE,
    assert_close,
    compile_to,
    damage_weights,
    embedding_model,
    tokens_input,
)
from tests.zoo.ms_moe import build_two_layer_ms_moe_model
from tests.zoo.standard import build_two_layer_model

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the native runner needs g++")

# (id, model builder, hidden size)
MODELS = {
    "standard-sparse-dispatch": (
        lambda: build_two_layer_model(
            "sparse_dispatch", activation="swiglu", hidden=32, inter=48, experts=4, k=2
        ),
        32,
    ),
    "ms-moe-swiglu": (lambda: build_two_layer_ms_moe_model(activation="swiglu", swiglu_fusion=1), 16),
}


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runner binary, compiled once for this module."""
    return build_runner(tmp_path_factory.mktemp("runner") / "moec-runner")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[onnx.ModelProto, Path, int]]:
    """Each model of :data:`MODELS`, compiled for the host: model, artifact directory, hidden size."""
    result = {}
    for name, (build, hidden) in MODELS.items():
        model = build()
        session = compile_to(model, tmp_path_factory.mktemp(name))
        result[name] = (model, session.dir, hidden)
    return result


def file_records(artifact: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` for ``artifact`` as it now is: each file's size and hashlib's SHA-256."""
    return {
        name: {
            "bytes": (artifact / name).stat().st_size,
            "sha256": hashlib.sha256((artifact / name).read_bytes()).hexdigest(),
        }
        for name in (LIBRARY, WEIGHTS)
    }


def edit_manifest(artifact: Path, edit: Callable[[dict[str, Any]], object]) -> Path:
    """Apply ``edit`` to the artifact's manifest in place; return the manifest's path."""
    path = artifact / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return path


def seal(artifact: Path) -> None:
    """Record the artifact's files as they now are (:func:`file_records`), so that the runner's
    integrity check passes and whatever was changed reaches what reads it."""
    edit_manifest(artifact, lambda manifest: manifest.update(files=file_records(artifact)))


def error_line(runner: Path, artifact: Path, *flags: str, env: dict[str, str] | None = None) -> str:
    """The runner's error for ``artifact``: it must exit with status 1 and one line on stderr."""
    result = subprocess.run(
        [str(runner), str(artifact), "--random-inputs", *flags], capture_output=True, text=True, env=env
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    return lines[0]


def run_minimal(
    runner: Path, artifact: Path, feeds: dict[str, np.ndarray], work: Path
) -> tuple[dict[str, np.ndarray], str]:
    """Run ``artifact`` as :func:`run_native` does but without its Python manifest check: a
    hand-written manifest here holds only the keys the runner reads."""
    work.mkdir()
    command = [str(runner), str(artifact), "--output-dir", str(work / "out")]
    for index, (name, value) in enumerate(feeds.items()):
        np.save(work / f"input{index}.npy", value)
        command += ["--input", f"{name}={work / f'input{index}.npy'}"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((artifact / MANIFEST).read_text())
    outputs = {
        o["name"]: np.load(work / "out" / f"{output_file_stem(o['name'])}.npy") for o in manifest["outputs"]
    }
    return outputs, result.stdout


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_reference(runner: Path, compiled, name: str, tokens: int) -> None:
    model, artifact, hidden = compiled[name]
    feeds = {"x": tokens_input(tokens, hidden)}
    outputs, _ = run_native(runner, artifact, feeds)
    expected = run_reference(model, feeds)
    assert set(outputs) == set(expected)
    for output, value in expected.items():
        assert_close(outputs[output], value, FP32_ATOL, f"{name} {output} ({tokens} tokens) vs numpy")


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_changes_no_output(runner: Path, compiled, threads: int) -> None:
    """``--threads``: the kernels add in a fixed order, so 1 and 2 threads give the same bits as
    the Python session at 1 token (the static entry point) and at 5 (``main``)."""
    from moec.runtime.session import ArtifactSession

    _, artifact, hidden = compiled["standard-sparse-dispatch"]
    session = ArtifactSession(artifact)
    for tokens in (1, 5):
        feeds = {"x": tokens_input(tokens, hidden, seed=9)}
        outputs, _ = run_native(runner, artifact, feeds, threads=threads)
        for name, value in session.run(feeds).items():
            np.testing.assert_array_equal(outputs[name], value, err_msg=f"{tokens} tokens, {threads} threads")


def test_links_only_the_runtime(runner: Path) -> None:
    """NEEDED names libtvm_runtime and libtvm_ffi, never the compiler; the rpath resolves both."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run([readelf, "-d", str(runner)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert "libtvm_runtime.so" in needed and "libtvm_ffi.so" in needed, needed
    assert not [lib for lib in needed if lib.startswith(("libtvm_compiler", "libtvm.so"))], needed
    ldd = shutil.which("ldd")
    if ldd is not None:
        resolved = subprocess.run([ldd, str(runner)], capture_output=True, text=True, check=True).stdout
        assert "not found" not in resolved, resolved
        assert "libtvm_compiler" not in resolved, resolved


def test_repeat_prints_latency(runner: Path, compiled) -> None:
    _, artifact, hidden = compiled["standard-sparse-dispatch"]
    _, stdout = run_native(runner, artifact, {"x": tokens_input(3, hidden)}, repeat=5, warmup=1)
    number = r"\d+(?:\.\d+)?"
    pattern = rf"latency over 5 runs: mean {number} ms, p50 {number} ms, p99 {number} ms"
    assert re.search(pattern, stdout), stdout


def test_missing_input_fails_in_one_line(runner: Path, compiled, tmp_path: Path) -> None:
    _, artifact, _ = compiled["standard-sparse-dispatch"]
    result = subprocess.run(
        [str(runner), str(artifact), "--output-dir", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing input 'x'" in lines[0], result.stderr
    with pytest.raises(MoecError, match="missing input 'x'"):
        run_native(runner, artifact, {})


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not-npy", "not a .npy file"),
        ("truncated", "header says"),
        ("wrong-dtype", "has dtype int64, expected float32"),
        ("wrong-shape", "expected [?, 32]"),
        ("fortran", "Fortran-order"),
        ("no-file", "no such .npy file"),
    ],
)
def test_bad_npy_fails_in_one_line(runner: Path, compiled, tmp_path: Path, case: str, message: str) -> None:
    _, artifact, hidden = compiled["standard-sparse-dispatch"]
    path = tmp_path / "x.npy"
    good = tokens_input(4, hidden)
    if case == "not-npy":
        path.write_text("not numpy\n")
    elif case == "truncated":
        np.save(path, good)
        path.write_bytes(path.read_bytes()[:-3])
    elif case == "wrong-dtype":
        np.save(path, good.astype(np.int64))
    elif case == "wrong-shape":
        np.save(path, good[:, :-1])
    elif case == "fortran":
        np.save(path, np.asfortranarray(good))
    command = [str(runner), str(artifact), "--input", f"x={path}", "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_missing_weights_fail_in_one_line(runner: Path, compiled, tmp_path: Path) -> None:
    _, artifact, hidden = compiled["standard-sparse-dispatch"]
    damaged = tmp_path / "artifact"
    shutil.copytree(artifact, damaged)
    (damaged / WEIGHTS).unlink()
    with pytest.raises(MoecError, match=r"weights\.bin: damaged artifact: the file is missing"):
        run_native(runner, damaged, {"x": tokens_input(2, hidden)})


@pytest.fixture
def copied(compiled, tmp_path: Path) -> Path:
    """A copy of the standard model's artifact, for a test to damage."""
    return Path(shutil.copytree(compiled["standard-sparse-dispatch"][1], tmp_path / "artifact"))


AGAIN = "; recompile the model or copy the artifact again"


def test_cut_file_fails_the_size_check(runner: Path, copied: Path) -> None:
    """A weights file one byte short is refused before anything is loaded, hashes checked or not."""
    path = copied / WEIGHTS
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-1])
    expected = (
        f"moec-runner: error: {path}: damaged artifact: {size - 1} bytes, the manifest says {size}{AGAIN}"
    )
    assert error_line(runner, copied) == expected
    assert error_line(runner, copied, "--skip-hash-check") == expected


def test_flipped_bit_fails_the_hash_check(runner: Path, copied: Path) -> None:
    """One bit flipped in the weights is refused; --skip-hash-check (sizes only) runs it."""
    path = copied / WEIGHTS
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # in the data region, after the index
    path.write_bytes(bytes(data))
    expected = f"moec-runner: error: {path}: damaged artifact: its SHA-256 differs from the manifest's{AGAIN}"
    assert error_line(runner, copied) == expected
    skipped = subprocess.run(
        [str(runner), str(copied), "--random-inputs", "--skip-hash-check"], capture_output=True, text=True
    )
    assert skipped.returncode == 0, skipped.stderr


@pytest.mark.parametrize(
    ("key", "name"),
    [("library", "../model.so"), ("library", "ABSOLUTE"), ("weights", ".."), ("weights", "sub\\weights.bin")],
)
def test_file_names_stay_in_the_artifact(runner: Path, copied: Path, key: str, name: str) -> None:
    """``library`` and ``weights`` are file names in the artifact directory, never a path out of it
    (not even to a real library: ABSOLUTE stands for the copy's own model.so)."""
    name = str(copied / LIBRARY) if name == "ABSOLUTE" else name
    manifest = edit_manifest(copied, lambda m: m.update({key: name}))
    assert error_line(runner, copied) == (
        f"moec-runner: error: {manifest}: damaged manifest: '{key}' must be a file name inside the artifact "
        f"directory, got '{name}'; recompile the model"
    )


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda m: m.pop("files"), "manifest has no 'files'"),
        (lambda m: m["files"].pop(WEIGHTS), f"damaged manifest: 'files' has no '{WEIGHTS}'"),
        (lambda m: m["files"][LIBRARY].pop("sha256"), f"damaged manifest: 'files.{LIBRARY}.sha256' must be"),
        (
            lambda m: m["files"][LIBRARY].update(bytes="1"),
            f"damaged manifest: 'files.{LIBRARY}.bytes' must be",
        ),
    ],
    ids=["no files", "no weights entry", "no sha256", "bytes a string"],
)
def test_file_records_are_required(runner: Path, copied: Path, edit: Callable, why: str) -> None:
    """A manifest that does not record the size and SHA-256 of a file the runner loads is refused."""
    manifest = edit_manifest(copied, edit)
    line = error_line(runner, copied)
    assert line.startswith(f"moec-runner: error: {manifest}: {why}") and line.endswith(
        "; recompile the model"
    ), line


def cpu_has_sha256() -> bool:
    """Whether this CPU has the SHA-256 instructions the runner uses (x86-64 SHA-NI, aarch64 SHA2)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "sha_ni" in flags or "sha2" in flags


@pytest.mark.parametrize("version", ["hardware", "portable"])
@pytest.mark.parametrize("size", [0, 1, 55, 56, 63, 64, 65, 2**20 + 3])
def test_sha256_is_hashlibs(runner: Path, copied: Path, size: int, version: str) -> None:
    """The runner's SHA-256 is hashlib's, at each way the last 64-byte block is padded and across
    the runner's 1 MiB reads: a weights.bin of ``size`` random bytes passes the integrity check
    exactly when hashlib's digest is recorded (the weights parser then refuses it). Both versions
    of its block compression, chosen by MOEC_RUNNER_SHA256: the CPU's SHA-256 instructions (the
    default where it has them; "hardware" fails without them) and the portable code."""
    if version == "hardware" and not cpu_has_sha256():
        pytest.skip("this CPU has no SHA-256 instructions")
    env = {**os.environ, "MOEC_RUNNER_SHA256": version}
    path = copied / WEIGHTS
    data = np.random.default_rng(size).bytes(size)
    path.write_bytes(data)
    for recorded, accepted in [(data, True), (data + b"\0", False)]:
        digest = hashlib.sha256(recorded).hexdigest()
        edit_manifest(
            copied, lambda m, digest=digest: m["files"].update({WEIGHTS: {"bytes": size, "sha256": digest}})
        )
        line = error_line(runner, copied, env=env)
        assert ("SHA-256 differs" not in line) == accepted, line
        assert (f"{path}: damaged weights (" in line) == accepted, line


def test_sha256_switch_takes_two_values(runner: Path, copied: Path) -> None:
    """A mistyped MOEC_RUNNER_SHA256 is an error, not a silent default."""
    env = {**os.environ, "MOEC_RUNNER_SHA256": "fast"}
    assert error_line(runner, copied, env=env) == (
        "moec-runner: error: MOEC_RUNNER_SHA256 must be 'portable' or 'hardware', got 'fast'"
    )


@pytest.mark.parametrize(("case", "why"), list(WEIGHTS_DAMAGE.items()))
def test_damaged_weights_fail_as_in_python(
    runner: Path, compiled, tmp_path: Path, case: str, why: str
) -> None:
    """The runner parses weights.bin as moec.weights_file does: the same damage, the same cause
    (the manifest records the damaged file, so that the parser, not the integrity check, sees it)."""
    _, artifact, _ = compiled["standard-sparse-dispatch"]
    damaged = tmp_path / "artifact"
    shutil.copytree(artifact, damaged)
    damage_weights(damaged / WEIGHTS, case)
    seal(damaged)
    with pytest.raises(MoecError, match=f"{WEIGHTS}: damaged weights (.*{re.escape(why)}.*); recompile"):
        read_weights(damaged / WEIGHTS)
    command = [str(runner), str(damaged), "--random-inputs"]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert f"{WEIGHTS}: damaged weights (" in lines[0] and why in lines[0], lines[0]
    assert lines[0].endswith("; recompile the model"), lines[0]


def test_prints_peak_rss(runner: Path, compiled) -> None:
    _, artifact, hidden = compiled["standard-sparse-dispatch"]
    _, stdout = run_native(runner, artifact, {"x": tokens_input(2, hidden)}, repeat=2, warmup=0)
    lines = stdout.splitlines()
    assert re.fullmatch(r"latency over 2 runs: .*", lines[-2]), stdout
    peak = re.fullmatch(r"peak RSS (\d+) MiB", lines[-1])
    assert peak and 0 < int(peak.group(1)) < 100_000, stdout


def test_integer_inputs_and_tuple_outputs(runner: Path, tmp_path: Path) -> None:
    """int64 and int32 inputs, a weight, and two outputs (one with '/' in its name) round-trip exactly."""
    import tvm
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Module:
        @R.function
        def main(
            a: R.Tensor(("n", 3), "int64"), b: R.Tensor((3,), "int32"), w: R.Tensor((3,), "float32")
        ) -> R.Tuple(R.Tensor(("n", 3), "int64"), R.Tensor(("n", 3), "float32")):
            R.func_attr({"num_input": 2})
            with R.dataflow():
                total = R.add(a, R.astype(b, "int64"))
                scaled = R.multiply(R.astype(a, "float32"), w)
                R.output(total, scaled)
            return (total, scaled)

    artifact = tmp_path / "artifact"
    artifact.mkdir()
    tvm.compile(Module, target="llvm").export_library(str(artifact / LIBRARY))
    weight = np.array([0.5, -2.0, 3.25], np.float32)
    write_weights(artifact / WEIGHTS, {"w": weight})
    manifest = {
        "format": FORMAT,
        "inputs": [
            {"name": "a", "shape": ["n", 3], "dtype": "int64"},
            {"name": "b", "shape": [3], "dtype": "int32"},
        ],
        "outputs": [
            {"name": "total", "shape": ["n", 3], "dtype": "int64"},
            {"name": "scaled/out", "shape": ["n", 3], "dtype": "float32"},
        ],
        "params": ["w"],
        "library": LIBRARY,
        "weights": WEIGHTS,
        "files": file_records(artifact),
    }
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    a = np.arange(15, dtype=np.int64).reshape(5, 3) - 7
    b = np.array([10, -20, 2**31 - 1], np.int32)
    outputs, _ = run_minimal(runner, artifact, {"a": a, "b": b}, tmp_path / "work")
    assert_close(outputs["total"], a + b.astype(np.int64), 0.0, "total")
    assert_close(outputs["scaled/out"], a.astype(np.float32) * weight, 0.0, "scaled/out")
    assert output_file_stem("scaled/out") == "scaled_out"


def test_weights_are_used_in_place(runner: Path, tmp_path: Path) -> None:
    """The runner maps weights.bin and reads weights where they lie: a 128 MiB weight that ``main``
    never reads adds (next to) nothing to its peak RSS, where loading it would add 128 MiB. Its
    SHA-256, checked first, is computed a piece at a time and adds nothing either."""
    import tvm
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Module:
        @R.function
        def main(
            a: R.Tensor(("n", 3), "float32"), big: R.Tensor(("m",), "float32"), w: R.Tensor((3,), "float32")
        ) -> R.Tensor(("n", 3), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                scaled = R.multiply(a, w)
                R.output(scaled)
            return scaled

    library = tmp_path / LIBRARY
    tvm.compile(Module, target="llvm").export_library(str(library))
    weight = np.array([0.5, -2.0, 3.25], np.float32)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    peak = {}
    for floats in (1, 32 * 2**20):
        artifact = tmp_path / f"unused{floats}"
        artifact.mkdir()
        shutil.copy(library, artifact / LIBRARY)
        write_weights(artifact / WEIGHTS, {"unused": np.ones(floats, np.float32), "w": weight})
        manifest = {
            "format": FORMAT,
            "inputs": [{"name": "a", "shape": ["n", 3], "dtype": "float32"}],
            "outputs": [{"name": "y", "shape": ["n", 3], "dtype": "float32"}],
            "params": ["unused", "w"],
            "files": file_records(artifact),
        }
        (artifact / MANIFEST).write_text(json.dumps(manifest))
        outputs, stdout = run_minimal(runner, artifact, {"a": a}, tmp_path / f"work{floats}")
        assert_close(outputs["y"], a * weight, 0.0, "y")
        peak[floats] = int(re.search(r"^peak RSS (\d+) MiB$", stdout, re.MULTILINE).group(1))
    assert peak[32 * 2**20] - peak[1] < 16, f"peak RSS in MiB by weight size in floats: {peak}"


def test_build_is_cached_and_needs_a_compiler(runner: Path, tmp_path: Path) -> None:
    stamp = runner.stat().st_mtime_ns
    assert build_runner(runner) == runner
    assert runner.stat().st_mtime_ns == stamp
    with pytest.raises(MoecError, match="install g\\+\\+"):
        build_runner(tmp_path / "moec-runner", cxx="no-such-compiler-g++")


def test_random_inputs_need_no_files(runner: Path, compiled, tmp_path: Path) -> None:
    """--random-inputs makes the inputs (symbolic dimension = --tokens); outputs are then optional."""
    _, artifact, hidden = compiled["standard-sparse-dispatch"]
    command = [str(runner), str(artifact), "--random-inputs", "--tokens", "6", "--repeat", "2"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    output = json.loads((artifact / MANIFEST).read_text())["outputs"][0]["name"]
    assert f"output {output}: shape [6, {hidden}] float32" in result.stdout, result.stdout
    assert "latency over 2 runs" in result.stdout
    result = subprocess.run(
        [*command[:-2], "--output-dir", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "out" / f"{output_file_stem(output)}.npy").shape == (6, hidden)
    bad = subprocess.run([*command[:2], "--random-inputs", "--tokens", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--tokens must be at least 1" in bad.stderr, bad.stderr


def test_random_token_ids_span_the_vocabulary(runner: Path, tmp_path: Path) -> None:
    """--random-inputs draws token ids over the manifest's range (the embedding's 1000 rows), not
    0 and 1: ``y = emb[ids]`` with ``emb[i] = 4i .. 4i + 3`` shows which ids it drew."""
    artifact = compile_model(embedding_model(tmp_path / "m.onnx"), tmp_path / "art")
    command = [str(runner), str(artifact), "--random-inputs", "--tokens", "500"]
    result = subprocess.run([*command, "--output-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ids = np.load(tmp_path / "out" / "y.npy")[0, :, 0] / 4
    assert ids.min() >= 0 and ids.max() < 1000 and len(np.unique(ids)) > 300, ids


def test_cuda_artifact_without_a_driver_fails_in_one_line(runner: Path, compiled, tmp_path: Path) -> None:
    """A manifest whose target is a CUDA GPU makes the runner open the NVIDIA driver first."""
    import ctypes.util

    if ctypes.util.find_library("cuda") is not None:
        pytest.skip("this machine has a CUDA driver")
    _, artifact, _ = compiled["standard-sparse-dispatch"]
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["target"]["cuda"] = {"arch": "sm_87", "version": "12.6"}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    result = subprocess.run([str(runner), str(copy), "--random-inputs"], capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "libcuda.so.1 cannot be loaded" in lines[0], result.stderr
