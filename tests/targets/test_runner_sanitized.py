"""The native runner under AddressSanitizer and UndefinedBehaviorSanitizer, fed malformed files.

Whatever .npy input, manifest or weights file a user hands ``moec-runner``, it must end in one
line ``moec-runner: error: ...`` and exit status 1 (2 for a usage error): never a crash, a read
out of range or an integer overflow. The runner is built here with
:func:`moec.runtime.native.build_command` plus the sanitizer flags, and runs copies of one small
compiled artifact, each broken in one way. The sanitizers report with their own exit status
(:data:`SANITIZER_EXIT`), so a report can never pass for the runner's own failure.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moec.artifact import LIBRARY, MANIFEST, WEIGHTS, record_files
from moec.runtime.native import build_command
from moec.weights_file import MAGIC, PAGE, VERSION, read_weights, write_weights
from tests.helpers import compile_to
from tests.zoo.standard import build_two_layer_model

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the native runner needs g++")

SANITIZE = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
    "-fno-omit-frame-pointer",
    "-g",
    "-O1",
]
"""Appended to the runner's build command: the last -O wins, and g++ links libasan ahead of every
other library wherever -fsanitize stands (checked by :func:`test_libasan_comes_first`)."""
SANITIZER_EXIT = 86
"""The sanitizers' exit status on a report (their default, 1, is the runner's own failure status)."""
SANITIZER_ENV = {
    "ASAN_OPTIONS": f"detect_leaks=0:abort_on_error=0:exitcode={SANITIZER_EXIT}",
    "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:exitcode={SANITIZER_EXIT}",
}
HIDDEN = 32
"""The hidden size of the model every case runs: its input is ``x [tokens, 32]`` float32."""


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runner built with the sanitizers (skipped where g++ has no libasan or libubsan)."""
    out = tmp_path_factory.mktemp("sanitized")
    probe = out / "probe.cc"
    probe.write_text("int main() { return 0; }\n")
    check = subprocess.run(
        ["g++", *SANITIZE, str(probe), "-o", str(out / "probe")], capture_output=True, text=True
    )
    if check.returncode != 0:
        why = (
            check.stderr.strip().splitlines()[0]
            if check.stderr.strip()
            else f"exit status {check.returncode}"
        )
        pytest.skip(f"g++ cannot build with -fsanitize=address,undefined (install libasan8 libubsan1): {why}")
    binary = out / "moec-runner"
    build = subprocess.run([*build_command(binary), *SANITIZE], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return binary


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small compiled artifact; each case breaks a copy of it (:func:`broken`)."""
    model = build_two_layer_model(
        "sparse_dispatch", activation="swiglu", hidden=HIDDEN, inter=48, experts=4, k=2
    )
    return compile_to(model, tmp_path_factory.mktemp("model")).dir


@pytest.fixture
def broken(artifact: Path, tmp_path: Path) -> Path:
    """A copy of :func:`artifact` for one case to break."""
    return Path(shutil.copytree(artifact, tmp_path / "artifact"))


def run(runner: Path, *args: Any) -> subprocess.CompletedProcess[str]:
    """``runner`` with ``args`` under the sanitizers' options."""
    return subprocess.run(
        [str(runner), *map(str, args)],
        capture_output=True,
        encoding="utf-8",
        errors="replace",  # a broken file's bytes may come back in the message
        env={**os.environ, **SANITIZER_ENV},
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> None:
    """The runner failed as it promises: status 1 or 2, one ``moec-runner: error:`` line, no report."""
    assert result.returncode in (1, 2), f"exit status {result.returncode}: {result.stderr}"
    assert "AddressSanitizer" not in result.stderr and "runtime error:" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moec-runner: error:"), result.stderr


def seal(artifact: Path) -> None:
    """Record the artifact's files as they now are in its manifest, so that the runner's integrity
    check passes and a broken file reaches the parser behind it."""
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["files"] = record_files(artifact, (LIBRARY, WEIGHTS))
    (artifact / MANIFEST).write_text(json.dumps(manifest))


def test_libasan_comes_first(runner: Path) -> None:
    """libasan is the first library the runner needs, ahead of the uninstrumented TVM runtime, so
    ASan's interceptors are in place without LD_PRELOAD (or ASAN_OPTIONS=verify_asan_link_order=0)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run([readelf, "-d", str(runner)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert needed[0].startswith("libasan.so"), needed
    assert any(lib.startswith("libubsan.so") for lib in needed), needed


def test_valid_artifact_runs_clean(runner: Path, artifact: Path, tmp_path: Path) -> None:
    """The whole run (hashing, inputs from a file, weights, the VM, outputs) passes the sanitizers."""
    x = tmp_path / "x.npy"
    np.save(x, np.ones((3, HIDDEN), np.float32))
    result = run(runner, artifact, "--input", f"x={x}", "--output-dir", tmp_path / "out", "--repeat", 1)
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert np.load(tmp_path / "out" / "y.npy").shape == (3, HIDDEN)
    result = run(runner, artifact, "--random-inputs", "--tokens", 1)  # the one-token entry point
    assert result.returncode == 0 and not result.stderr, result.stderr


def npy(header: str, data: bytes = b"", version: int = 1) -> bytes:
    """A .npy file: magic, ``version``, the header's length and text (a Python dict), ``data``."""
    length = struct.pack("<H" if version == 1 else "<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + length + header.encode() + data


def npy_header(descr: str = "'<f4'", fortran: str = "False", shape: str = f"(2, {HIDDEN})") -> str:
    """A .npy header as numpy writes it, with the given fields' text (default: float32 ``[2, 32]``)."""
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}\n"


ROWS = bytes(2 * HIDDEN * 4)
"""The data of a float32 ``[2, 32]`` input."""
NPY_CASES = {
    "empty file": b"",
    "truncated header": npy(npy_header(), ROWS)[:20],
    "huge header length": b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFFFF) + b"{'descr': '<f4'",
    "bad magic": b"\x93NUMPZ" + npy(npy_header(), ROWS)[6:],
    "version 9": npy(npy_header(), ROWS, version=9),
    "negative dimension": npy(npy_header(shape=f"(-2, {HIDDEN})"), ROWS),
    "dimension 2**62": npy(npy_header(shape=f"({2**62},)"), ROWS),
    "dimensions overflowing": npy(npy_header(shape=f"({2**40}, {2**40}, {HIDDEN})"), ROWS),
    "dimension past int64": npy(npy_header(shape=f"({2**64}, {HIDDEN})"), ROWS),
    "shape not a tuple": npy(npy_header(shape="[2, 32]"), ROWS),
    "shape of words": npy(npy_header(shape="(two, 32)"), ROWS),
    "descr mismatched with the data": npy(npy_header(descr="'<f8'"), ROWS),
    "descr unquoted": npy(npy_header(descr="<f4"), ROWS),
    "descr half quoted": npy(npy_header(descr="'<f4"), ROWS),
    "structured descr": npy(npy_header(descr="[('a', '<f4')]"), ROWS),
    "big-endian": npy(npy_header(descr="'>f4'"), ROWS),
    "fortran order": npy(npy_header(fortran="True"), ROWS),
    "unterminated dict": npy(f"{{'descr': '<f4', 'fortran_order': False, 'shape': (2, {HIDDEN}", ROWS),
    "no shape": npy("{'descr': '<f4', 'fortran_order': False}\n", ROWS),
    "unbalanced parentheses": npy(npy_header(shape=f"(2, {HIDDEN}))"), ROWS),
    "wrong dtype for the model": npy(npy_header(descr="'<i8'"), bytes(2 * HIDDEN * 8)),
    "wrong shape for the model": npy(npy_header(shape="(2, 31)"), bytes(2 * 31 * 4)),
}


@pytest.mark.parametrize("case", list(NPY_CASES))
def test_malformed_npy(runner: Path, artifact: Path, tmp_path: Path, case: str) -> None:
    path = tmp_path / "x.npy"
    path.write_bytes(NPY_CASES[case])
    assert_one_line_error(run(runner, artifact, "--input", f"x={path}", "--output-dir", tmp_path / "out"))


def input_shape(shape: list[Any]) -> Callable[[dict], dict]:
    """A manifest edit: input ``x`` gets ``shape``."""

    def edit(manifest: dict) -> dict:
        manifest["inputs"][0]["shape"] = shape
        return manifest

    return edit


def file_record(name: str, key: str, change: Callable[[Any], Any] | None) -> Callable[[dict], dict]:
    """A manifest edit: ``files.<name>.<key>`` becomes ``change`` of its value (None: the key goes)."""

    def edit(manifest: dict) -> dict:
        record = manifest["files"][name]
        if change is None:
            del record[key]
        else:
            record[key] = change(record[key])
        return manifest

    return edit


MANIFEST_CASES: dict[str, Callable[[dict], Any]] = {
    "not JSON": lambda m: "{'format': 3,",
    "not UTF-8": lambda m: b"\xff\xfe{}",
    "JSON array": lambda m: [m],
    "deep nesting": lambda m: "[" * 100_000,
    "old format": lambda m: {**m, "format": "moec-artifact/2"},
    "format a number": lambda m: {**m, "format": 3},
    "inputs not a list": lambda m: {**m, "inputs": {"x": [1, HIDDEN]}},
    "input without a shape": lambda m: {**m, "inputs": [{"name": "x", "dtype": "float32"}]},
    "float dimension": input_shape(["tokens", 32.0]),
    "negative dimension": input_shape(["tokens", -32]),
    "huge dimension": input_shape(["tokens", 2**62]),
    "dimension past a string's size": input_shape(["tokens", 2**60]),
    "dimension past int64": input_shape(["tokens", 2**64]),
    "nested shape": input_shape([["tokens"], HIDDEN]),
    "unknown input dtype": lambda m: {**m, "inputs": [{**m["inputs"][0], "dtype": "float8"}]},
    "params holding numbers": lambda m: {**m, "params": [1, 2]},
    "params missing a weight": lambda m: {**m, "params": m["params"][:-1]},
    "params naming an unknown weight": lambda m: {**m, "params": [*m["params"][:-1], "no such weight"]},
    "params reordered": lambda m: {**m, "params": m["params"][::-1]},
    "outputs miscounted": lambda m: {**m, "outputs": m["outputs"] * 2},
    "unknown entry point": lambda m: {**m, "entries": {"one_token": "no_such_function"}},
    "target not an object": lambda m: {**m, "target": "llvm"},
    "library ../x": lambda m: {**m, "library": "../x"},
    # an absolute path to a real library: the original artifact's, which compile_to put next to the model
    "library absolute": lambda m: {
        **m,
        "library": str(Path(m["model"]["path"]).parent / "artifact" / LIBRARY),
    },
    "weights '..'": lambda m: {**m, "weights": ".."},
    "weights a number": lambda m: {**m, "weights": 7},
    "no files": lambda m: {k: v for k, v in m.items() if k != "files"},
    "files a list": lambda m: {**m, "files": list(m["files"])},
    "files lack the library": lambda m: {**m, "files": {WEIGHTS: m["files"][WEIGHTS]}},
    "bytes negative": file_record(WEIGHTS, "bytes", lambda size: -size),
    "bytes a string": file_record(WEIGHTS, "bytes", str),
    "bytes a float": file_record(LIBRARY, "bytes", float),
    "bytes missing": file_record(LIBRARY, "bytes", None),
    "sha256 too short": file_record(WEIGHTS, "sha256", lambda digest: digest[:-1]),
    "sha256 upper case": file_record(WEIGHTS, "sha256", str.upper),
    "sha256 a number": file_record(WEIGHTS, "sha256", lambda digest: int(digest, 16)),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_malformed_manifest(runner: Path, broken: Path, case: str) -> None:
    path = broken / MANIFEST
    content = MANIFEST_CASES[case](copy.deepcopy(json.loads(path.read_text())))
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    # one token: the manifest's one-token entry point runs (which "unknown entry point" names)
    assert_one_line_error(run(runner, broken, "--random-inputs", "--tokens", 1))


def weights_file(index: list[Any] | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A weights file: the header (index ``length``, default the index's), the index (a tensor list
    or raw bytes), zeros up to the data region, ``data``."""
    text = index if isinstance(index, bytes) else json.dumps({"tensors": index}).encode()
    head = MAGIC + struct.pack("<II", VERSION, len(text) if length is None else length) + text
    return head + bytes(-len(head) % PAGE) + data


def tensor(**fields: Any) -> dict:
    """An index entry: a float32 ``w`` of 4 values at offset 0, with ``fields`` changed."""
    return {"name": "w", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16, **fields}


def reshaped(path: Path, name: str, change: Callable[[np.ndarray], np.ndarray]) -> bytes:
    """The weights file at ``path`` with weight ``name`` replaced by ``change`` of it."""
    weights = read_weights(path)
    weights[name] = change(weights[name])
    write_weights(path, weights)
    return path.read_bytes()


DATA = bytes(64)
WEIGHTS_CASES: dict[str, Callable[[Path], bytes]] = {
    "empty": lambda p: b"",
    "header only": lambda p: MAGIC + struct.pack("<II", VERSION, 0),
    "index length past the end": lambda p: weights_file([tensor()], DATA, length=1 << 20),
    "index length 2**32-1": lambda p: weights_file([tensor()], DATA, length=0xFFFFFFFF),
    "index garbage": lambda p: weights_file(b"\xff{garbage" * 10, DATA),
    "index deeply nested": lambda p: weights_file(b"[" * 100_000, DATA),
    "index a list": lambda p: weights_file(b"[1, 2]", DATA),
    "tensors an object": lambda p: weights_file(b'{"tensors": {"w": 1}}', DATA),
    "entry a number": lambda p: weights_file([7], DATA),
    "entry without a name": lambda p: weights_file(
        [{k: v for k, v in tensor().items() if k != "name"}], DATA
    ),
    "name a number": lambda p: weights_file([tensor(name=3)], DATA),
    "past the end": lambda p: weights_file([tensor(offset=64)], DATA),
    "offset 2**63-64": lambda p: weights_file([tensor(offset=2**63 - 64)], DATA),
    "negative offset": lambda p: weights_file([tensor(offset=-64)], DATA),
    "offset a float": lambda p: weights_file([tensor(offset=0.5)], DATA),
    "nbytes against the shape": lambda p: weights_file([tensor(nbytes=12)], DATA),
    "negative nbytes": lambda p: weights_file([tensor(nbytes=-16)], DATA),
    "negative dimension": lambda p: weights_file([tensor(shape=[-4], nbytes=-16)], DATA),
    "shape overflowing": lambda p: weights_file([tensor(shape=[2**62, 4], nbytes=0)], DATA),
    "size past int64": lambda p: weights_file([tensor(shape=[2**61], nbytes=2**63 - 1)], DATA),
    "unknown dtype": lambda p: weights_file([tensor(dtype="float128")], DATA),
    "dtype a list": lambda p: weights_file([tensor(dtype=["float32"])], DATA),
    "a tensor twice": lambda p: weights_file([tensor(), tensor()], DATA),
    "wrong shape for the model": lambda p: reshaped(p, "ln/scale", lambda w: w[:-1]),
    "wrong dtype for the model": lambda p: reshaped(p, "ln/scale", lambda w: w.astype(np.float64)),
}


@pytest.mark.parametrize("case", list(WEIGHTS_CASES))
def test_malformed_weights(runner: Path, broken: Path, case: str) -> None:
    path = broken / WEIGHTS
    path.write_bytes(WEIGHTS_CASES[case](path))
    seal(broken)
    assert_one_line_error(run(runner, broken, "--random-inputs", "--tokens", 2))
