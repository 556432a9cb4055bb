"""scripts/gpu_check.py end to end on the CPU: ``prepare`` for the host target, then ``run`` with a
plain ``python3`` (numpy only, as on the GPU machine) checks every case against the numpy
reference and times the benchmark block, beside its build by the committed moec (``--base
HEAD``). On a GPU machine the same two steps run with the
default H200 target (scripts/gpu-check.sh)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moec.weights_file import write_weights
from tests.helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.py"


@pytest.mark.slow
def test_prepare_then_run_checks_every_case(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    host = REPO_ROOT / "targets" / "host.toml"
    prepare = [
        sys.executable,
        str(SCRIPT),
        "prepare",
        "--target",
        str(host),
        "--out",
        str(out),
        "--bench",
        "tiny-block",
        "--base",
        "HEAD",
    ]
    subprocess.run(prepare, check=True, capture_output=True, text=True)
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "--dir", str(out)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.endswith(" ok")]
    assert len(rows) == 11, run.stdout
    assert run.stdout.count(", moec: mean ") == 2, run.stdout  # the benchmark block at 1 and 16 tokens
    head = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    assert run.stdout.count(f", moec @ {head.stdout.strip()}: mean ") == 2, run.stdout  # and at --base
    assert "tiny-block,  1 token(s) (2 experts" in run.stdout, run.stdout
    assert "onnxruntime-gpu: not installed" in run.stdout and "PyTorch with CUDA: not installed" in run.stdout
    assert "every case matches the numpy reference" in run.stdout

    # a wrong reference is caught: the check can fail
    expected = next((out / "cases" / "mixtral-softmax-fp32" / "run0" / "expected").glob("*.npy"))
    np.save(expected, np.load(expected) + np.float32(1e-3))
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "--dir", str(out)], capture_output=True, text=True
    )
    assert run.returncode == 1 and "mixtral-softmax-fp32         FAIL" in run.stdout, run.stdout


def test_the_scripts_weights_reader_reads_moecs_weights_file(tmp_path: Path) -> None:
    """``run`` reads the benchmark artifact's weights for the PyTorch baseline with numpy alone."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    rng = np.random.default_rng(0)
    tensors = {
        "moe0/router_w": rng.standard_normal((16, 4)).astype(np.float32),
        "moe0.w_up": rng.standard_normal((4, 24, 16)).astype(np.float32),
        "moe0.b_up": rng.standard_normal((4, 24)).astype(np.float16),
        "ids": np.arange(5, dtype=np.int64),
    }
    write_weights(tmp_path / "weights.bin", tensors)
    read = gpu_check.read_weights(tmp_path / "weights.bin")
    assert list(read) == list(tensors)
    for name, value in tensors.items():
        assert read[name].dtype == value.dtype and np.array_equal(read[name], value), name
