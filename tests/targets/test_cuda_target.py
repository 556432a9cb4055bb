"""The ``cuda`` target: this machine's NVIDIA GPU, detected from its driver, with x86-64 host code.

No GPU is needed here: the driver is the stand-in ``fake_cuda_driver.c`` (a ``libcuda.so.1``
reporting an H200: compute capability 9.0, 132 SMs), put first on the library path of a ``moec``
subprocess. Without any driver the target refuses in one line saying how to name the GPU; a
target file naming ``sm_90`` builds the same library.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moec.compiler.cuda import missing_cuda_packages
from moec.compiler.inspect_library import EM_X86_64, check_cuda_library
from moec.targets import bundled_target_file
from tests.helpers import EXAMPLE_MODEL, assert_nothing_written, assert_user_error, invoke
from tests.targets.fake_driver import build_fake_driver

KERNELS = ["moe0_route", "moe0_group", "moe0_expert_up", "moe0_expert_down"]
MOEC = Path(sys.executable).with_name("moec")
needs_nvrtc = pytest.mark.skipif(
    missing_cuda_packages() is not None, reason="the CUDA packages (extra 'cuda') are not installed"
)


def driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the fake H200 driver as ``libcuda.so.1``."""
    return build_fake_driver(tmp_path_factory.mktemp("fake-driver"))


def with_driver(folder: Path | None) -> dict[str, str]:
    """The environment of a ``moec`` subprocess that finds the driver in ``folder`` (None: none)."""
    env = {k: v for k, v in os.environ.items() if k != "MOEC_DEBUG"}
    env["LD_LIBRARY_PATH"] = f"{folder}:{env.get('LD_LIBRARY_PATH', '')}" if folder else ""
    return env


@pytest.mark.skipif(driver_present(), reason="this machine has an NVIDIA driver: the target detects its GPU")
def test_without_a_driver_the_target_says_how_to_name_the_gpu(tmp_path: Path) -> None:
    """A fresh process (this one may hold moec's build stub of the driver, loaded by a CUDA build)."""
    run = subprocess.run(
        [str(MOEC), "compile", str(EXAMPLE_MODEL), "--target", "cuda", "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=with_driver(None),
    )
    assert run.returncode == 1, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("moec:")]
    assert len(lines) == 1 and "no NVIDIA driver" in lines[0], run.stderr
    assert 'arch = "sm_90"' in lines[0] and "targets/cuda.toml" in lines[0]
    assert_nothing_written(tmp_path / "out")
    listed = invoke("targets")
    assert listed.exit_code == 0, listed.output
    assert "cuda " in listed.stdout and "not usable here" in listed.stdout


def test_a_driver_without_a_gpu_says_how_to_name_the_gpu(fake_driver: Path, tmp_path: Path) -> None:
    env = {**with_driver(fake_driver), "MOEC_FAKE_CUDA_DEVICES": "0"}
    run = subprocess.run(
        [str(MOEC), "compile", str(EXAMPLE_MODEL), "--target", "cuda", "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("moec:")]
    assert len(lines) == 1 and "the NVIDIA driver reports no GPU (cuInit)" in lines[0], run.stderr
    assert 'arch = "sm_90"' in lines[0]
    assert_nothing_written(tmp_path / "out")


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


@needs_nvrtc
def test_cuda_target_builds_sm90_cubins_with_x86_64_host_code(fake_driver: Path, tmp_path: Path) -> None:
    """``moec compile --target cuda`` on the (fake) H200: an x86-64 library whose MoE kernels are
    sm_90 cubins; the manifest records the detected GPU; ``moec run`` runs it with moec-runner."""
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
    # the same (fake) GPU runs it: moec-runner natively, through the driver API
    ran = subprocess.run(
        [str(MOEC), "run", str(out), "--tokens", "3"],
        capture_output=True,
        text=True,
        env=with_driver(fake_driver),
    )
    assert ran.returncode == 0 and "on this machine's CUDA GPU" in ran.stdout, ran.stdout + ran.stderr


def test_a_target_naming_its_gpu_needs_its_sizes(tmp_path: Path) -> None:
    """A copy of the cuda target that names sm_90 but leaves a GPU size to "detect" is refused."""
    text = bundled_target_file("cuda").read_text().replace('arch = "detect"    #', 'arch = "sm_90"    #')
    target = tmp_path / "my-gpu.toml"
    target.write_text(text)
    result = invoke("compile", EXAMPLE_MODEL, "--target", target, "-o", tmp_path / "out")
    assert_user_error(result, target, "'cores'", "give the GPU's value")
    assert_nothing_written(tmp_path / "out")
