"""scripts/gpu_check.py end to end on the CPU: ``prepare`` for the host target, then ``run`` with a
plain ``python3`` (numpy only, as on the GPU machine) checks every case against the numpy
reference and times the benchmark block, beside its build by the committed moec (``--base
HEAD``). On a GPU machine the same two steps run with the
default H200 target (scripts/gpu-check.sh)."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moec.schedule import GpuSchedule
from moec.targets import load_target
from moec.weights_file import write_weights
from tests.helpers import REPO_ROOT, named_gpu_target

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


def gpu_check_module():
    """scripts/gpu_check.py as a module."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_schedule_variant_is_the_target_with_only_its_schedule_changed(tmp_path: Path) -> None:
    """``prepare --schedules 16,4,2``: the benchmark blocks are also built for a copy of the GPU
    target whose kernel schedule is that one, and nothing else differs."""
    target = named_gpu_target(tmp_path)
    label, variant = gpu_check_module().schedule_target(target, "16,4,2", tmp_path)
    assert label == "tpr16-rpb4-tb2"
    built, original = load_target(str(variant)), load_target(str(target))
    assert built.schedule == GpuSchedule(threads_per_row=16, rows_per_block=4, token_block=2)
    assert dataclasses.replace(built, schedule=original.schedule, path=original.path) == original
    with pytest.raises(SystemExit, match="want THREADS_PER_ROW,ROWS_PER_BLOCK,TOKEN_BLOCK"):
        gpu_check_module().schedule_target(target, "16,4", tmp_path)


def test_the_scripts_weights_reader_reads_moecs_weights_file(tmp_path: Path) -> None:
    """``run`` reads the benchmark artifact's weights for the PyTorch baseline with numpy alone."""
    gpu_check = gpu_check_module()
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
