"""The ``cuda`` target: this machine's NVIDIA GPU, detected from its driver, with x86-64 host code.

No GPU is needed here: the driver is a stand-in ``libcuda.so.1`` that reports an H200
(compute capability 9.0, 132 SMs) and, for everything else, no device, put first on the library
path of a ``moec`` subprocess. Without any driver the target refuses in one line saying how to
name the GPU; a target file naming ``sm_90`` builds the same library.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moec.compiler.cuda import _STUB_SYMBOLS, NVCC_FALLBACKS
from moec.compiler.inspect_library import EM_X86_64, check_cuda_library
from moec.targets import bundled_target_file
from tests.helpers import EXAMPLE_MODEL, assert_nothing_written, assert_user_error, invoke

KERNELS = ["moe0_route", "moe0_group", "moe0_expert_up", "moe0_expert_down"]
MOEC = Path(sys.executable).with_name("moec")
needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None and not any(os.access(p, os.X_OK) for p in NVCC_FALLBACKS),
    reason="no nvcc (CUDA toolkit) on this machine",
)
DETECTION = {"cuInit", "cuDeviceGetCount", "cuDeviceGet", "cuDeviceGetAttribute", "cuDeviceGetName"}
FAKE_H200 = (
    "typedef int CUresult;\n"
    + "".join(f"CUresult {name}(void) {{ return 100; }}\n" for name in _STUB_SYMBOLS if name not in DETECTION)
    + "CUresult cuInit(unsigned flags) { (void)flags; return 0; }\n"
    "CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }\n"
    "CUresult cuDeviceGet(int *d, int i) { *d = i; return i == 0 ? 0 : 101; }\n"
    "CUresult cuDeviceGetName(char *s, int n, int d) {\n"
    '  (void)d; __builtin_strncpy(s, "Fake H200", n); return 0;\n'
    "}\n"
    "CUresult cuDeviceGetAttribute(int *v, int a, int d) {\n"
    "  (void)d;\n"
    "  switch (a) {\n"
    "    case 1: *v = 1024; return 0;      /* max threads per block */\n"
    "    case 8: *v = 49152; return 0;     /* shared memory per block */\n"
    "    case 16: *v = 132; return 0;      /* multiprocessors */\n"
    "    case 36: *v = 2619000; return 0;  /* memory clock, kHz */\n"
    "    case 37: *v = 6144; return 0;     /* memory bus, bits */\n"
    "    case 38: *v = 52428800; return 0; /* L2 */\n"
    "    case 75: *v = 9; return 0;\n"
    "    case 76: *v = 0; return 0;\n"
    "  }\n"
    "  return 1;\n"
    "}\n"
)
"""A driver that reports one H200: the detection calls answer, every other entry point (what TVM's
CUDA runtime links) says there is no device."""


def driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the fake H200 driver as ``libcuda.so.1``."""
    folder = tmp_path_factory.mktemp("fake-driver")
    (folder / "fake.c").write_text(FAKE_H200)
    subprocess.run(
        [
            "cc",
            "-shared",
            "-fPIC",
            "-Wl,-soname,libcuda.so.1",
            "-o",
            str(folder / "libcuda.so.1"),
            str(folder / "fake.c"),
        ],
        check=True,
    )
    return folder


def with_driver(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MOEC_DEBUG"}
    env["LD_LIBRARY_PATH"] = f"{folder}:{env.get('LD_LIBRARY_PATH', '')}"
    return env


@pytest.mark.skipif(driver_present(), reason="this machine has an NVIDIA driver: the target detects its GPU")
def test_without_a_driver_the_target_says_how_to_name_the_gpu(tmp_path: Path) -> None:
    result = invoke("compile", EXAMPLE_MODEL, "--target", "cuda", "-o", tmp_path / "out")
    assert_user_error(result, "no NVIDIA driver", 'arch = "sm_90"', "targets/cuda.toml")
    assert_nothing_written(tmp_path / "out")
    listed = invoke("targets")
    assert listed.exit_code == 0, listed.output
    assert "cuda " in listed.stdout and "not usable here" in listed.stdout


def test_detection_reads_the_driver(fake_driver: Path) -> None:
    code = (
        "from moec.targets import load_target\n"
        "t = load_target('cuda')\n"
        "h = t.hardware\n"
        "print(t.cuda.arch, t.tvm_config['arch'], h.cores, h.l2_bytes,"
        " round(h.memory_bandwidth_gbps), h.arch, '/'.join(h.compute_precisions))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=with_driver(fake_driver)
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["sm_90", "sm_90", "132", "52428800", "4023", "x86_64", "fp32/fp16/int8"]


@needs_nvcc
def test_cuda_target_builds_sm90_cubins_with_x86_64_host_code(fake_driver: Path, tmp_path: Path) -> None:
    """``moec compile --target cuda`` on the (fake) H200: an x86-64 library whose MoE kernels are
    sm_90 cubins; the manifest records the detected GPU; run and verify use moec-runner natively."""
    out = tmp_path / "out"
    run = subprocess.run(
        [str(MOEC), "compile", str(EXAMPLE_MODEL), "--target", "cuda", "-o", str(out)],
        capture_output=True,
        text=True,
        env=with_driver(fake_driver),
    )
    assert run.returncode == 0, run.stderr
    data = (out / "model.so").read_bytes()
    assert int.from_bytes(data[18:20], "little") == EM_X86_64
    found = check_cuda_library(out / "model.so", "sm_90", KERNELS, EM_X86_64)
    assert {f"{k}_kernel" for k in KERNELS} <= {f for c in found for f in c.functions}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["name"] == "cuda" and manifest["target"]["cuda"]["arch"] == "sm_90"
    assert manifest["target"]["hardware"]["cores"] == 132
    # the fake driver has no device: the runner starts natively and says so in one line
    ran = subprocess.run(
        [str(MOEC), "run", str(out)], capture_output=True, text=True, env=with_driver(fake_driver)
    )
    assert ran.returncode == 1 and "on this machine's CUDA GPU" in ran.stdout, ran.stdout + ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moec: error:"), ran.stderr


def test_a_target_naming_its_gpu_needs_its_sizes(tmp_path: Path) -> None:
    """A copy of the cuda target that names sm_90 but leaves a GPU size to "detect" is refused."""
    text = bundled_target_file("cuda").read_text().replace('arch = "detect"    #', 'arch = "sm_90"    #')
    target = tmp_path / "my-gpu.toml"
    target.write_text(text)
    result = invoke("compile", EXAMPLE_MODEL, "--target", target, "-o", tmp_path / "out")
    assert_user_error(result, target, "'cores'", "give the GPU's value")
    assert_nothing_written(tmp_path / "out")
