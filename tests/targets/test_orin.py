"""Jetson AGX Orin builds: an aarch64 library with sm_87 cubins, built here without a GPU.

No GPU is needed (or used): these tests check what the build produces — the ELF machine of the
library, the cubin embedded in it (parsed here independently of moec's own checker), the
kernels' CUDA structure — and that a build that fell back to CUDA source, or has no CUDA
compiler, fails with a one-line error. The CUDA kernels' numbers are not checked here.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import tvm

from moec.artifact import LIBRARY, MANIFEST, WEIGHTS
from moec.compiler import cuda
from moec.compiler.compile import compile_model
from moec.compiler.inspect_library import check_cuda_library, embedded_cubins
from moec.errors import MoecError
from moec.kernels import make_kernel
from moec.kernels.config import config_from_dict
from moec.options import CompileOptions
from moec.passes.apply_kernel_schedule import ApplyKernelSchedule
from moec.schedule import CpuSchedule, GpuSchedule
from moec.targets import load_target
from tests.helpers import EXAMPLE_MODEL, REPO_ROOT

KERNELS = ["moe0_route", "moe0_group", "moe0_expert_up", "moe0_expert_down"]
needs_nvrtc = pytest.mark.skipif(
    cuda.missing_cuda_packages() is not None, reason="the CUDA packages (extra 'cuda') are not installed"
)


def _elf_images(data: bytes, machine: int) -> list[tuple[int, int]]:
    """(offset, e_flags) of every ELF64 image with ``e_machine == machine`` — a parse separate
    from moec.compiler.inspect_library, so the test does not just trust the code it tests."""
    images, at = [], data.find(b"\x7fELF")
    while at >= 0:
        if data[at + 4] == 2 and struct.unpack_from("<H", data, at + 18)[0] == machine:
            images.append((at, struct.unpack_from("<I", data, at + 48)[0]))
        at = data.find(b"\x7fELF", at + 1)
    return images


@pytest.fixture(scope="module")
def orin_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("orin") / "artifact"
    compile_model(EXAMPLE_MODEL, out, CompileOptions(target="orin"))
    return out


@needs_nvrtc
def test_orin_library_is_aarch64_with_sm87_cubin_holding_the_moe_kernels(orin_artifact):
    assert sorted(p.name for p in orin_artifact.iterdir()) == sorted([MANIFEST, LIBRARY, WEIGHTS])
    data = (orin_artifact / "model.so").read_bytes()
    assert data[:4] == b"\x7fELF" and struct.unpack_from("<H", data, 18)[0] == 183  # EM_AARCH64
    if shutil.which("readelf"):
        header = subprocess.run(
            ["readelf", "-h", str(orin_artifact / "model.so")], capture_output=True, text=True
        )
        assert "AArch64" in header.stdout
    cubins = _elf_images(data, 190)  # EM_CUDA
    assert cubins, "no cubin in the library"
    for offset, flags in cubins:
        abi = data[offset + 8]
        assert ((flags >> 8) & 0xFF if abi >= 8 else flags & 0xFF) == 87
    for kernel in KERNELS:
        assert f"{kernel}_kernel".encode() in data[cubins[0][0] :]
    # moec's own checker agrees, and names the kernels from the cubin's symbol table
    found = check_cuda_library(orin_artifact / "model.so", "sm_87", KERNELS)
    assert {f"{k}_kernel" for k in KERNELS} <= {f for c in found for f in c.functions}
    manifest = json.loads((orin_artifact / "manifest.json").read_text())
    build = manifest["cuda_build"]
    assert build["board_cuda_version"] == "12.6"
    assert found[0].toolkit == build["cubin_cuda_version"]  # the manifest tells the truth


@needs_nvrtc
def test_orin_cubin_is_cuda_12_6_built_by_the_pinned_nvrtc(orin_artifact):
    data = (orin_artifact / "model.so").read_bytes()
    offset, _ = _elf_images(data, 190)[0]
    assert data[offset + 8] == 7  # ELF ABI version of CUDA 12 cubins
    assert struct.unpack_from("<I", data, offset + 20)[0] == 126  # e_version: CUDA 12.6
    build = json.loads((orin_artifact / "manifest.json").read_text())["cuda_build"]
    assert build["compiler"] == "nvrtc" and build["nvrtc_version"] == "12.6"
    assert build["packages"]["nvidia-cuda-nvrtc-cu12"].startswith("12.6.")
    assert "nvcc" not in json.dumps(build) and "ptxas" not in json.dumps(build)  # no CUDA toolkit used
    # files named by package, not by this machine's paths: another machine records the same
    assert build["nvrtc"] == "nvidia-cuda-nvrtc-cu12:nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
    assert not any(name.startswith("/") for name in build["include_dirs"]), build["include_dirs"]


@needs_nvrtc
def test_build_that_falls_back_to_cuda_source_fails_cleanly(tmp_path):
    """Without the stub driver, TVM embeds CUDA source; the build must refuse it."""
    out = tmp_path / "artifact"
    env = {**os.environ, "MOEC_CUDA_STUB": "0"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from moec.cli import main; main()",
            "compile",
            str(EXAMPLE_MODEL),
            "--target",
            "orin",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moec: error")]
    assert proc.returncode != 0
    assert (
        len(errors) == 1 and "no CUDA cubin embedded" in errors[0] and "fell back to CUDA source" in errors[0]
    )
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "package",
    [
        "nvidia-cuda-nvrtc-cu12",
        pytest.param("nvidia-cuda-cccl-cu12", marks=needs_nvrtc),  # else the message names NVRTC
        pytest.param("nvidia-cuda-runtime-cu12", marks=needs_nvrtc),
        pytest.param("nvidia-cuda-runtime", marks=needs_nvrtc),
    ],
)
def test_missing_nvrtc_is_a_one_line_error(package, tmp_path, monkeypatch):
    installed = cuda.installed_file
    monkeypatch.setattr(
        cuda, "installed_file", lambda dist, path: None if dist == package else installed(dist, path)
    )
    out = tmp_path / "artifact"
    with pytest.raises(MoecError, match=r"CUDA targets need NVRTC 12\.6") as err:
        compile_model(EXAMPLE_MODEL, out, CompileOptions(target="orin"))
    assert f"({package} is not installed)" in str(err.value)
    assert "pip install 'moec[cuda]'" in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


@needs_nvrtc
def test_the_build_loads_the_pinned_cuda_runtime_not_a_system_one():
    """TVM's CUDA codegen library links libcudart.so.13: a build (in a fresh process, as with no
    CUDA installed) loads the pinned wheel's copy, whatever the machine has in its library path."""
    code = (
        "from moec.compiler.cuda import load_cuda_runtime\n"
        "load_cuda_runtime()\n"
        "print(*{line.split()[-1] for line in open('/proc/self/maps') if 'libcudart.so' in line})\n"
    )
    env = {**os.environ, "MOEC_DEBUG": ""}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if run.returncode == 0 and "/nvidia/cu13/lib/" not in run.stdout and shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA driver: TVM loaded its CUDA library when imported")
    assert run.returncode == 0, run.stderr
    (loaded,) = run.stdout.split()
    assert loaded == str(cuda.installed_file(*cuda.TVM_CUDA_RUNTIME)), loaded


@needs_nvrtc
def test_bad_cuda_source_is_a_one_line_error_quoting_nvrtc():
    code = 'extern "C" __global__ void broken(float* x) {\n  int unused = 0;\n  x[0] = undefined_thing;\n}\n'
    with pytest.raises(MoecError) as err:
        cuda.compile_cuda_source(code, "sm_87", cuda.find_toolchain())
    assert str(err.value) == (
        'NVRTC 12.6 (CUDA C to sm_87 cubin) failed: kernels.cu(3): error: identifier "undefined_thing" '
        "is undefined"
    )
    with pytest.raises(MoecError, match=r"sm_100 cubin\) failed: nvrtc: error: invalid value for --gpu-arch"):
        cuda.compile_cuda_source(code, "sm_100", cuda.find_toolchain())  # newer than CUDA 12.6 knows
    log = 'kernels.cu(2): warning #177-D: variable "unused" was declared\n\nkernels.cu(3): error: oops\n'
    assert cuda.first_error(log) == "kernels.cu(3): error: oops"


@needs_nvrtc
def test_bad_generated_cuda_fails_the_build_with_one_moec_error(tmp_path, monkeypatch):
    """An NVRTC error inside TVM's compiler callback comes out of the build as moec's own error
    (TVM would hand it back as a RuntimeError), and nothing is written."""
    compile_source = cuda.compile_cuda_source
    monkeypatch.setattr(
        cuda,
        "compile_cuda_source",
        lambda code, arch, toolchain: compile_source(
            code + "\n__device__ int bad = missing;\n", arch, toolchain
        ),
    )
    out = tmp_path / "artifact"
    with pytest.raises(MoecError, match=r'NVRTC 12\.6 .* error: identifier "missing" is undefined$'):
        compile_model(EXAMPLE_MODEL, out, CompileOptions(target="orin"))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_checker_rejects_a_library_without_cubin(tmp_path):
    library = tmp_path / "model.so"
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<H", header, 18, 183)
    library.write_bytes(bytes(header) + b'extern "C" __global__ void moe0_route_kernel() {}')
    with pytest.raises(MoecError, match="no CUDA cubin embedded"):
        check_cuda_library(library, "sm_87", ["moe0_route"])
    struct.pack_into("<H", header, 18, 62)
    library.write_bytes(bytes(header))
    with pytest.raises(MoecError, match="built for x86_64, expected aarch64"):
        check_cuda_library(library, "sm_87", [])


# --- the CUDA kernels on their own -------------------------------------------------------------

ROUTE = {"num_experts": 6, "top_k": 2, "scoring": "softmax", "normalize": True, "tie_break": "low"}
GROUP = {"num_experts": 6, "top_k": 2}
UP = {
    "num_experts": 6,
    "hidden": 64,
    "ffn": 96,
    "top_k": 2,
    "activation": "silu",
    "gated": True,
    "alpha": 1.0,
    "beta": 0.0,
    "limit": float("inf"),
}
DOWN = {"num_experts": 6, "hidden": 64, "ffn": 96, "top_k": 2}
MIXED = ["int8", "fp16", "fp32", "int8", "fp32", "fp16"]
"""Every weight-only expert format in one layer."""
MIXED_DOT = ["int8-dot", "fp16", "fp32", "int8", "int8-dot", "fp16"]
"""int8-dot experts (INT8 arithmetic, dp4a) beside the others."""
CAPACITY = {"num_experts": 6, "top_k": 2, "capacity": 3}
CASES = {"route": ROUTE, "capacity": CAPACITY, "group": GROUP, "expert_up": UP, "expert_down": DOWN}


@pytest.fixture(scope="module")
def orin():
    return load_target("orin")


def _build(kind: str, config: dict, schedule: GpuSchedule, orin) -> tuple[str, list]:
    """CUDA source and cubins of one kernel compiled alone for sm_87 (the cubin as moec's
    compiler callback handed it to TVM)."""
    func = make_kernel(config_from_dict(kind, config), schedule).with_attr("global_symbol", f"moe0_{kind}")
    compile_source, produced = cuda.compile_cuda_source, []

    def recording(code: str, arch: str, toolchain: cuda.CudaToolchain) -> bytes:
        produced.append(compile_source(code, arch, toolchain))
        return produced[-1]

    cuda.compile_cuda_source = recording
    try:
        with orin.tvm_target, cuda.cuda_build(orin, lambda _: None):
            lib = tvm.compile(tvm.IRModule({f"moe0_{kind}": func}), target=orin.tvm_target)
    finally:
        cuda.compile_cuda_source = compile_source
    return lib.mod.imports[0].inspect_source(), [c for b in produced for c in embedded_cubins(b"\0" + b)]


@needs_nvrtc
@pytest.mark.parametrize("kind", list(CASES))
def test_gpu_kernel_compiles_for_sm87_with_thread_binding(kind, orin):
    source, cubins = _build(kind, CASES[kind], GpuSchedule(), orin)
    assert f"moe0_{kind}_kernel" in source
    assert [c.arch for c in cubins] == ["sm_87"] and f"moe0_{kind}_kernel" in cubins[0].functions
    if kind.startswith("expert"):
        assert "__shfl_down_sync" in source and "threadIdx.y" in source  # warp-level row reduction
        assert "blockIdx.y" in source  # the selected experts' rows spread over blocks of their own
    if kind == "group":  # the CPU's counting sort, a thread per expert slot: no thread talks to another
        assert "__shfl" not in source and "__syncthreads" not in source
    assert "threadIdx.x" in source


@needs_nvrtc
@pytest.mark.parametrize("group", [0, 32], ids=["per-channel", "groups-of-32"])
@pytest.mark.parametrize("kind", ["expert_up", "expert_down"])
def test_gpu_int8_dot_kernels_use_dp4a_on_sm87(kind, group, orin):
    """int8-dot experts on the GPU: a first kernel quantizes the input rows (one thread each), the
    expert kernel multiplies 4 bytes at a time with ``__dp4a``; all are in the sm_87 cubin
    (``expert_down`` has two more: its pairs' positions and the sum of their partial rows)."""
    config = {**CASES[kind], "formats": MIXED_DOT, "int8_group": group, "int8_dot": orin.int8_dot}
    source, cubins = _build(kind, config, GpuSchedule(), orin)
    assert orin.int8_dot == "dp4a" and "__dp4a(" in source
    assert "nearbyintf" in source  # the row quantization rounds half to even, as the reference
    kernels = [f for f in cubins[0].functions if f.startswith(f"moe0_{kind}_kernel")]
    assert len(kernels) == (2 if kind == "expert_up" else 4), cubins[0].functions


@needs_nvrtc
@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule", [GpuSchedule(16, 4, 1), GpuSchedule(8, 3, 3), GpuSchedule(1, 32, 2)], ids=str
)
@pytest.mark.parametrize(
    "config",
    [
        {**UP, "hidden": 20, "ffn": 12, "activation": "gelu", "gated": False},
        {**UP, "activation": "silu", "alpha": 1.702, "beta": 1.0, "limit": 7.0, "formats": ["fp16"] * 6},
        {**DOWN, "hidden": 20, "ffn": 13},
        {**DOWN, "formats": ["fp16"] * 6},
        {**UP, "formats": MIXED},
        {**DOWN, "formats": MIXED, "int8_group": 32},
        {**UP, "formats": MIXED_DOT, "int8_dot": "dp4a"},
        {**DOWN, "formats": MIXED_DOT, "int8_group": 32, "int8_dot": "dp4a"},
    ],
    ids=[
        "up-ragged",
        "up-fp16-clamped",
        "down-ragged",
        "down-fp16",
        "up-mixed",
        "down-mixed-int8-groups",
        "up-mixed-int8-dot",
        "down-mixed-int8-dot-groups",
    ],
)
def test_gpu_expert_kernels_compile_across_schedules_and_tails(schedule, config, orin):
    kind = "expert_up" if "activation" in config else "expert_down"
    source, cubins = _build(kind, config, schedule, orin)
    assert f"moe0_{kind}_kernel" in cubins[0].functions
    formats = set(config.get("formats") or ["fp32"])
    if "fp16" in formats:
        assert "half" in source
    if "int8" in formats:
        assert "int8_t" in source or "signed char" in source


@needs_nvrtc
@pytest.mark.parametrize(
    "rule",
    [
        {
            "scoring": "sigmoid",
            "selection_bias": [0.1, -0.2, 0.0, 0.3, 0.05, -0.1],
            "groups": 3,
            "top_groups": 2,
        },
        {"scoring": "sparsemixer", "jitter_eps": 0.01},
    ],
    ids=["deepseek-grouped", "phimoe-sparsemixer"],
)
def test_gpu_route_kernel_compiles_every_routing_rule(rule, orin):
    config = {"num_experts": 6, "top_k": 2, "normalize": True, "tie_break": "low", "scale": 2.5, **rule}
    source, cubins = _build("route", config, GpuSchedule(), orin)
    assert "moe0_route_kernel" in cubins[0].functions and "threadIdx.x" in source


def test_gpu_schedule_gives_thread_bound_kernels_marked_scheduled():
    for kind, config in CASES.items():
        func = make_kernel(config_from_dict(kind, config), GpuSchedule())
        assert bool(func.attrs["tirx.is_scheduled"])  # dlight leaves our kernels alone
        script = func.script()
        bound = [tag for tag in ("blockIdx.x", "threadIdx.x") if f'thread="{tag}"' in script]
        assert "threadIdx.x" in bound and "blockIdx.x" in bound


def test_apply_kernel_schedule_remakes_every_kernel_for_a_gpu():
    before = tvm.IRModule(
        {f"moe0_{kind}": make_kernel(config_from_dict(kind, c), CpuSchedule()) for kind, c in CASES.items()}
    )
    apply = ApplyKernelSchedule(GpuSchedule())
    after = apply(before)
    assert sorted(apply.changed) == sorted(f"moe0_{kind}" for kind in CASES)
    expected = {
        f"moe0_{kind}": make_kernel(config_from_dict(kind, c), GpuSchedule()) for kind, c in CASES.items()
    }
    tvm.ir.assert_structural_equal(after, tvm.IRModule(expected))
    again = ApplyKernelSchedule(GpuSchedule())
    tvm.ir.assert_structural_equal(again(after), after)
    assert again.changed == [], "kernels that already have the schedule were remade"


def test_gpu_schedule_limits_are_checked():
    with pytest.raises(ValueError, match="threads_per_row"):
        make_kernel(config_from_dict("expert_down", DOWN), GpuSchedule(threads_per_row=64))
