"""moec-runner drives CUDA artifacts through the NVIDIA driver API alone (runtime/native/cuda_driver.cc).

No GPU here: the driver is ``fake_cuda_driver.c``, a ``libcuda.so.1`` that keeps "device" memory
on the host and checks every launch against the cubin's own parameter table (so a missing,
shifted or host pointer argument fails), without executing kernels. What is proven:

- an artifact for this machine's GPU (x86-64 host code, sm_90 cubins) runs with ``moec run``:
  every kernel the host code calls is found in the cubin and launched with all its parameters;
- a cubin for another GPU, a driver without a device and a machine without a driver each give
  one clear line;
- the Orin package (aarch64 runner) names no CUDA library at all in its dynamic dependencies,
  so nothing of CUDA 13 (TVM's PyPI CUDA runtime links libcudart.so.13; JetPack 6 is CUDA 12.6);
  under qemu-aarch64 it says "no CUDA device" with a driver that has none, and with a fake Orin
  GPU it runs the whole model.

The numbers the kernels compute are checked on a real GPU by scripts/gpu-check.sh.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from moec.compiler.compile import compile_model
from moec.compiler.inspect_library import embedded_cubins
from moec.options import CompileOptions
from moec.runtime.board import RUNNER, RunnerSession
from tests.helpers import EXAMPLE_MODEL, REPO_ROOT, invoke, named_gpu_target
from tests.targets.fake_driver import build_fake_driver

AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"
LAUNCH = re.compile(r"^(\S+) grid=(\d+),(\d+),(\d+) block=(\d+),(\d+),(\d+) params=(\d+) pointers=(\d+)$")
MOE_KERNELS = ("route", "group", "expert_up", "expert_down")
needs_cross = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("aarch64-linux-gnu-gcc", "qemu-aarch64", "readelf")),
    reason="needs gcc-aarch64-linux-gnu, qemu-user and binutils (scripts/setup.sh installs them as root)",
)


def launches(log: Path) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(kernel, grid and block, parameters, pointer parameters) of each launch the fake logged."""
    found = []
    for line in log.read_text().splitlines():
        match = LAUNCH.match(line)
        assert match, line
        name, *numbers = match.groups()
        values = tuple(int(n) for n in numbers)
        found.append((name, values[:6], values[6], values[7]))
    return found


def cubin_kernels(library: Path) -> set[str]:
    """The kernels (``*_kernel``, or ``*_kernel_N`` for a function's further kernels) of the cubins
    embedded in ``library``."""
    cubins = embedded_cubins(library.read_bytes())
    return {f for cubin in cubins for f in cubin.functions if re.fullmatch(r".+_kernel(_\d+)?", f)}


def check_launches(log: Path, library: Path) -> None:
    """Every launch is of a kernel of the library's cubin, passes pointers, and the MoE kernels ran."""
    seen = launches(log)
    assert seen, "nothing was launched"
    kernels = cubin_kernels(library)
    for name, dims, params, pointers in seen:
        assert name in kernels, (name, sorted(kernels))
        assert params > 0 and pointers > 0 and all(d >= 1 for d in dims), (name, dims, params, pointers)
    counts = Counter(name for name, *_ in seen)
    for kind in MOE_KERNELS:
        assert any(re.fullmatch(rf"moe\d+_{kind}(_\w+)?_kernel", name) for name in counts), (kind, counts)


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_driver(tmp_path_factory.mktemp("fake-driver"))


@pytest.fixture(scope="module")
def gpu_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example compiled for an H200 named in a copy of the ``cuda`` target (no driver needed)."""
    work = tmp_path_factory.mktemp("h200")
    return compile_model(EXAMPLE_MODEL, work / "artifact", CompileOptions(target=str(named_gpu_target(work))))


def driver_env(
    monkeypatch: pytest.MonkeyPatch, folder: Path | None, log: Path | None = None, **fake: str
) -> None:
    """The runner subprocesses of this test see the fake driver in ``folder`` (or none at all)."""
    monkeypatch.setenv("LD_LIBRARY_PATH", str(folder) if folder else "")
    if log is not None:
        monkeypatch.setenv("MOEC_FAKE_CUDA_LOG", str(log))
    for name, value in fake.items():
        monkeypatch.setenv(f"MOEC_FAKE_CUDA_{name.upper()}", value)


def run_on_fake_gpu(
    artifact: Path, driver: Path, arguments: list[str], **fake: Path
) -> subprocess.CompletedProcess[str]:
    """The artifact's runner on random inputs with ``arguments``, on the fake driver in ``driver``
    (``fake``: its ``MOEC_FAKE_CUDA_*`` settings); asserts that it succeeded."""
    runner = RunnerSession(artifact, target_file=str(artifact.parent / "gpu-sm_90.toml")).runner
    env = {"LD_LIBRARY_PATH": str(driver)} | {f"MOEC_FAKE_CUDA_{k}": str(v) for k, v in fake.items()}
    command = [str(runner), str(artifact), "--random-inputs", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return result


def test_gpu_artifact_runs_every_kernel_through_the_driver(
    gpu_artifact: Path, fake_driver: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "launches.log"
    driver_env(monkeypatch, fake_driver, log)
    result = invoke(
        "run",
        gpu_artifact,
        "--tokens",
        "5",
        "--repeats",
        "3",
        "--target",
        gpu_artifact.parent / "gpu-sm_90.toml",
    )
    assert result.exit_code == 0, result.output
    assert "on this machine's CUDA GPU" in result.stdout, result.stdout
    check_launches(log, gpu_artifact / "model.so")
    assert len(launches(log)) % (1 + 3 + 3) == 0  # one run, three warmups, three timed calls: same launches


def test_a_cubin_for_another_gpu_is_refused_in_one_line(
    gpu_artifact: Path, fake_driver: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver_env(monkeypatch, fake_driver, arch="87")  # an Orin's GPU; the cubins are sm_90
    result = invoke("run", gpu_artifact, "--target", gpu_artifact.parent / "gpu-sm_90.toml")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Fake Orin, sm_87" in lines[0] and "CUDA_ERROR_NO_BINARY_FOR_GPU" in lines[0], lines[0]
    assert "recompile for this one" in lines[0]


def test_kernel_times_are_the_gpus_event_times(gpu_artifact: Path, fake_driver: Path, tmp_path: Path) -> None:
    """``--kernel-times``: each kernel's GPU time per call, from CUDA events. The fake GPU's clock
    advances one microsecond per thread block, so each kernel's time is known from its launches."""
    log = tmp_path / "launches.log"
    result = run_on_fake_gpu(
        gpu_artifact, fake_driver, ["--tokens", "5", "--repeat", "4", "--kernel-times"], LOG=log
    )
    line = r"^kernel (\S+): ([\d.]+) launches, ([\d.]+) ms per call, .* \(grid (\S+), block (\S+)\)$"
    printed = {
        m.group(1): (float(m.group(2)), float(m.group(3)), m.group(4), m.group(5))
        for m in re.finditer(line, result.stdout, re.M)
    }
    timed = round(4 * sum(per_call for per_call, *_ in printed.values()))  # the last launches logged
    expected: dict[str, list[tuple[int, ...]]] = {}
    for name, dims, _, _ in launches(log)[-timed:]:
        expected.setdefault(name, []).append(dims)
    assert set(printed) == set(expected), (printed, expected)
    for name, shapes in expected.items():
        launches_per_call, ms, grid, block = printed[name]
        assert launches_per_call == len(shapes) / 4, name
        blocks = sum(d[0] * d[1] * d[2] for d in shapes)  # the fake's microseconds
        assert ms == pytest.approx(blocks / 4 / 1000, abs=1e-4), name
        assert (grid, block) == ("x".join(map(str, shapes[-1][:3])), "x".join(map(str, shapes[-1][3:]))), name
    assert "kernels: " in result.stdout and "latency over 4 runs" in result.stdout

    runner = RunnerSession(gpu_artifact, target_file=str(gpu_artifact.parent / "gpu-sm_90.toml")).runner
    cpu = subprocess.run([str(runner), str(gpu_artifact), "--kernel-times"], capture_output=True, text=True)
    assert cpu.returncode == 2 and "--kernel-times needs --repeat N" in cpu.stderr, cpu.stderr


def test_kernel_scratch_is_allocated_once_not_per_call(
    gpu_artifact: Path, fake_driver: Path, tmp_path: Path
) -> None:
    """The kernels' scratch (``expert_down``'s per-pair partial rows, TVM workspaces) is kept by the
    runner's thread for its next calls: six calls allocate exactly what one call does (a
    ``cuMemFree`` would stall the whole GPU on every call)."""
    allocations = {}
    for repeat in (1, 6):
        log = tmp_path / f"memory-{repeat}.log"
        run_on_fake_gpu(gpu_artifact, fake_driver, ["--tokens", "3", "--repeat", str(repeat)], MEMORY_LOG=log)
        allocations[repeat] = [line for line in log.read_text().splitlines() if line.startswith("alloc")]
    assert allocations[6] == allocations[1], (len(allocations[1]), len(allocations[6]))


def test_run_profile_prints_the_kernels_gpu_times(
    gpu_artifact: Path, fake_driver: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver_env(monkeypatch, fake_driver)
    target = gpu_artifact.parent / "gpu-sm_90.toml"
    result = invoke("run", gpu_artifact, "--tokens", "2", "--repeats", "3", "--profile", "--target", target)
    assert result.exit_code == 0, result.output
    kernels = re.findall(r"^kernel (\S+): [\d.]+ launches, [\d.]+ ms per call", result.stdout, re.M)
    assert set(kernels) <= cubin_kernels(gpu_artifact / "model.so") and len(kernels) >= 4, result.stdout
    total = re.search(r"^kernels: [\d.]+ ms per call in all, over 3 calls$", result.stdout, re.M)
    assert total, result.stdout


@pytest.mark.slow
def test_a_whole_decoder_step_runs_through_the_driver(
    fake_driver: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Mixtral-style decoder with a KV cache: attention, norms and the rest on TVM's default GPU
    schedules (tens of kernels, integer arguments) besides moec's, every launch checked."""
    target = named_gpu_target(tmp_path)
    model = REPO_ROOT / "fixtures" / "models" / "mixtral-decoder-cache-dynamo-batched_mm.onnx"
    artifact = compile_model(model, tmp_path / "artifact", CompileOptions(target=str(target)))
    log = tmp_path / "launches.log"
    driver_env(monkeypatch, fake_driver, log)
    result = invoke("run", artifact, "--tokens", "3", "--repeats", "2", "--target", target)
    assert result.exit_code == 0, result.output
    check_launches(log, artifact / "model.so")
    assert len({name for name, *_ in launches(log)}) > 20


@pytest.mark.parametrize("driver", ["without a device", "absent"])
def test_no_gpu_is_one_clear_line(
    gpu_artifact: Path, fake_driver: Path, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    if driver == "absent" and Path("/usr/lib/x86_64-linux-gnu/libcuda.so.1").exists():
        pytest.skip("this machine has an NVIDIA driver")
    driver_env(monkeypatch, fake_driver if driver != "absent" else None, devices="0")
    result = invoke("run", gpu_artifact, "--target", gpu_artifact.parent / "gpu-sm_90.toml")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moec: error:"), result.stderr
    expected = "no CUDA device" if driver != "absent" else "libcuda.so.1 cannot be loaded"
    assert expected in lines[0] and "Traceback" not in result.output, lines[0]


# --- Jetson Orin (JetPack 6, CUDA 12.6): the packaged aarch64 runner ---------------------------


@pytest.fixture(scope="module")
def orin_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example compiled for orin, packaged and unpacked: the bundle's top directory."""
    work = tmp_path_factory.mktemp("orin")
    artifact = compile_model(EXAMPLE_MODEL, work / "artifact", CompileOptions(target="orin"))
    result = invoke("package", artifact, "-o", work / "orin.tar.gz")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr, result.stderr
    with tarfile.open(work / "orin.tar.gz") as tar:
        tar.extractall(work / "unpacked", filter="data")
    return work / "unpacked" / "orin"


def needed_libraries(binary: Path) -> list[str]:
    """The ``NEEDED`` entries of ``binary``'s dynamic section, as ``readelf -d`` prints them."""
    out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


@needs_cross
def test_orin_bundle_depends_on_no_cuda_library(orin_bundle: Path) -> None:
    binaries = [orin_bundle / "bin" / RUNNER, *sorted((orin_bundle / "lib").iterdir())]
    assert sorted(p.name for p in binaries[1:]) == ["libtvm_ffi.so", "libtvm_runtime.so"]
    for binary in binaries:
        needed = needed_libraries(binary)
        assert "libc.so.6" in needed, (binary, needed)  # readelf read it
        cuda = [name for name in needed if re.search(r"cuda|cublas|nvrtc|\.so\.13\b", name)]
        assert not cuda, f"{binary.name} needs {cuda}"
    readme = (orin_bundle / "README.md").read_text()
    assert "only the NVIDIA driver's libcuda.so.1" in " ".join(readme.split()), readme


def qemu_run(bundle: Path, driver: Path | None, *args: str, **fake: str) -> subprocess.CompletedProcess:
    """The bundle's README command under qemu-aarch64, with ``driver`` (a folder) as the board's."""
    command = ["qemu-aarch64", "-L", AARCH64_SYSROOT, "-E", f"LD_LIBRARY_PATH={driver or ''}"]
    for name, value in fake.items():
        command += ["-E", f"MOEC_FAKE_CUDA_{name.upper()}={value}"]
    command += [f"bin/{RUNNER}", "artifact", "--random-inputs", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=bundle, timeout=300)


@needs_cross
def test_orin_runner_under_qemu_says_no_cuda_device(orin_bundle: Path, tmp_path: Path) -> None:
    stub = build_fake_driver(tmp_path / "stub", "aarch64-linux-gnu-gcc")
    for driver, fake, expected in (
        (stub, {"devices": "0"}, "no CUDA device: the NVIDIA driver (libcuda.so.1) reports none"),
        (None, {}, "libcuda.so.1 cannot be loaded"),
    ):
        result = qemu_run(orin_bundle, driver, **fake)
        assert result.returncode == 1, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{RUNNER}: error: ") and expected in lines[0], lines


@needs_cross
def test_orin_runner_under_qemu_runs_the_model_on_a_fake_orin(orin_bundle: Path, tmp_path: Path) -> None:
    driver = build_fake_driver(tmp_path / "fake", "aarch64-linux-gnu-gcc")
    log = tmp_path / "launches.log"
    result = qemu_run(orin_bundle, driver, "--tokens", "3", arch="87", log=str(log))
    assert result.returncode == 0, result.stderr
    assert "device: Fake Orin, sm_87, driver 12.6" in result.stdout, result.stdout
    check_launches(log, orin_bundle / "artifact" / "model.so")
