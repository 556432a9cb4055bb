"""Build and drive ``moec-runner``, the standalone C++ program that runs an artifact on a board.

The runner (``native/runner.cc``) links only TVM's runtime libraries (``libtvm_runtime.so`` and
``libtvm_ffi.so``), never the compiler, so what it computes is what a deployed board computes.
For CUDA artifacts it opens the NVIDIA driver (``libcuda.so.1``) itself, at run time, and runs
TVM's CUDA device and the model's kernels on the driver API (``native/cuda_driver.cc``): no CUDA
runtime library of any version is linked or shipped.
This module compiles it against the installed wheels and runs it on numpy feeds, for tests and
for ``moec`` commands that want the deployed path rather than the Python one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from moec.artifact import read_manifest
from moec.errors import MoecError, first_line

NATIVE_DIR = Path(__file__).parent / "native"
SOURCES = (NATIVE_DIR / "runner.cc", NATIVE_DIR / "cuda_driver.cc")
HEADERS = (NATIVE_DIR / "cuda_driver.h",)


def source_text() -> str:
    """Every source and header of the runner, concatenated: what a cached build is keyed on."""
    return "\0".join(path.read_text() for path in (*SOURCES, *HEADERS))


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it (``tvm`` loads its compiler)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MoecError(f"package '{name}' is not installed; install moec's dependencies")
    return Path(next(iter(spec.submodule_search_locations)))


def runtime_paths() -> tuple[list[Path], list[Path]]:
    """The include directories (tvm-ffi's, tvm's) and the directories holding libtvm_runtime.so
    and libtvm_ffi.so.

    The runner uses tvm-ffi types, runtime functions found by name and, for CUDA, the
    ``DeviceAPI`` class of ``tvm/runtime/device_api.h`` (which includes only tvm-ffi headers;
    the wheel's ``tvm/runtime/tensor.h`` would not do: it includes a header the wheel lacks).
    """
    ffi_dir, tvm_dir = package_dir("tvm_ffi"), package_dir("tvm")
    includes = [ffi_dir / "include", tvm_dir / "include"]
    lib_dirs = [tvm_dir / "lib", ffi_dir / "lib"]
    for path in [
        includes[0] / "tvm" / "ffi" / "function.h",
        includes[1] / "tvm" / "runtime" / "device_api.h",
        lib_dirs[0] / "libtvm_runtime.so",
        lib_dirs[1] / "libtvm_ffi.so",
    ]:
        if not path.exists():
            raise MoecError(f"{path}: missing from the installed TVM wheels; reinstall apache-tvm(-ffi)")
    return includes, lib_dirs


def build_command(
    out_path: Path, cxx: str = "g++", lib_dirs: list[Path] | None = None, relocatable: bool = False
) -> list[str]:
    """The compiler command line that builds the runner at ``out_path``.

    ``lib_dirs`` hold the TVM runtime libraries to link (default: the installed wheels', for
    this machine; for a board, those of :mod:`moec.runtime.wheels`). The headers are always the
    installed tvm-ffi wheel's: they are the same for every architecture.
    ``--no-as-needed`` keeps libtvm_runtime.so linked although no symbol of it is named: its
    static initialisers register the global functions and the Relax VM loader the runner needs.
    The run path is ``$ORIGIN`` and ``$ORIGIN/../lib`` (deployment: the libraries next to the
    binary, or in ``lib/`` beside its ``bin/``, as ``moec package`` lays them out) and then,
    unless ``relocatable``, ``lib_dirs`` themselves (here). A relocatable runner names no path
    of this machine: it is built where ``../lib`` holds the libraries, and shipped as it is.
    """
    includes, host_lib_dirs = runtime_paths()
    lib_dirs = host_lib_dirs if lib_dirs is None else lib_dirs
    command = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra"]
    for include in includes:
        command += ["-isystem", str(include)]
    command += [*(str(source) for source in SOURCES), "-o", str(out_path)]
    command += [f"-L{d}" for d in lib_dirs]
    command += ["-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed", "-ldl"]
    command += ["-Wl,-rpath,$ORIGIN", "-Wl,-rpath,$ORIGIN/../lib"]
    command += [] if relocatable else [f"-Wl,-rpath,{d}" for d in lib_dirs]
    return command


def build_runner(
    out_path: Path,
    cxx: str = "g++",
    lib_dirs: list[Path] | None = None,
    package: str = "g++",
    relocatable: bool = False,
) -> Path:
    """Compile the runner into ``out_path`` unless a build at least as new as its sources is there.

    ``cxx``, ``lib_dirs`` and ``relocatable`` as for :func:`build_command`; ``package`` is the
    Debian package that provides ``cxx``, named in the error when it is missing. The binary is
    written to a temporary name and renamed into place, so a failed or concurrent build never
    leaves a half-written runner.
    """
    out_path = Path(out_path)
    newest = max(path.stat().st_mtime for path in (*SOURCES, *HEADERS))
    if out_path.exists() and out_path.stat().st_mtime >= newest:
        return out_path
    if shutil.which(cxx) is None:
        raise MoecError(
            f"{cxx}: C++ compiler not found; install {package} (e.g. 'apt-get install {package}'; "
            "scripts/setup.sh does this) to build the native runner"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        result = subprocess.run(
            build_command(temp, cxx, lib_dirs, relocatable), capture_output=True, text=True
        )
        if result.returncode != 0:
            error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr)
            detail = first_line(error)
            raise MoecError(f"{NATIVE_DIR}: building the native runner with {cxx} failed: {detail}")
        temp.chmod(0o755)
        temp.replace(out_path)
    finally:
        temp.unlink(missing_ok=True)
    return out_path


def output_file_stem(name: str) -> str:
    """The runner's file name (without ``.npy``) for output ``name``; mirrors ``FileStem`` in runner.cc."""
    stem = name.replace("/", "_").replace("\\", "_")
    return "_" + stem if stem in ("", ".", "..") else stem


def run_native(
    runner: Path,
    artifact_dir: Path,
    feeds: dict[str, np.ndarray],
    repeat: int = 0,
    warmup: int | None = None,
    emulator: tuple[str, ...] | list[str] = (),
    threads: int | None = None,
    check_hashes: bool = True,
    kernel_times: bool = False,
) -> tuple[dict[str, np.ndarray], str]:
    """Run ``artifact_dir`` with the native runner; return its outputs by name and its stdout.

    Feeds go through ``.npy`` files exactly as a user on a board would pass them. With
    ``repeat`` > 0 the runner also times that many calls and prints its latency line; ``threads``
    is the runner's ``--threads``; without ``check_hashes`` the runner checks only the sizes of
    the artifact's files (``--skip-hash-check``: a caller that has hashed them already);
    ``kernel_times`` (CUDA artifacts, with ``repeat``) adds each kernel's GPU time per call.
    ``emulator`` is a command prefix that runs a runner built for another architecture here
    (e.g. ``qemu-aarch64 -L /usr/aarch64-linux-gnu``). A failure raises :class:`MoecError`
    carrying the runner's one-line message.
    """
    manifest = read_manifest(Path(artifact_dir))
    with tempfile.TemporaryDirectory(prefix="moec-native-") as scratch:
        work = Path(scratch)
        command = [*emulator, str(runner), str(artifact_dir)]
        for index, (name, value) in enumerate(feeds.items()):
            path = work / f"input{index}.npy"
            np.save(path, np.asarray(value, order="C"))
            command += ["--input", f"{name}={path}"]
        command += ["--output-dir", str(work / "out")]
        if repeat > 0:
            command += ["--repeat", str(repeat)]
        if warmup is not None:
            command += ["--warmup", str(warmup)]
        if threads is not None:
            command += ["--threads", str(threads)]
        if not check_hashes:
            command.append("--skip-hash-check")
        if kernel_times:
            command.append("--kernel-times")
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
            raise MoecError(f"{artifact_dir}: native runner failed: {lines[-1]}")
        outputs = {
            spec["name"]: np.load(work / "out" / f"{output_file_stem(spec['name'])}.npy")
            for spec in manifest["outputs"]
        }
    return outputs, result.stdout
