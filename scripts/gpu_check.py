"""Check moec's CUDA kernels on a real NVIDIA GPU: prepared here, run there in one command.

The GPU machine lent for this is bare and offline (no registry, Python 3.12, no TVM, no moec's
dependencies) and takes at most 64 MiB of files. So everything is built here and carried:

``prepare`` (here, in moec's venv): compiles each case for a GPU target file (default: an H200,
``sm_90``, named rather than detected since this machine has no GPU) and writes into ``--out``
(default ``.gpu-check/``, git-ignored): ``bin/moec-runner`` and ``lib/`` (TVM's runtime, as
``moec package`` bundles them), and per case its artifact, inputs and the numpy reference's
outputs (``moec.verify.reference_outputs``: the same reference ``moec verify`` uses) as
``.npy`` files, with the tolerance in ``case.json``. The cases cover every router rule (softmax
top-k, sigmoid with selection bias and groups, sparsemixer, onnxruntime's fused ``MoE`` and
``QMoE``), expert capacity, GPT-OSS's clamped SwiGLU with biases, and every weight format
(fp32, fp16, int8, int8-dot); and the Mixtral-style benchmark block (``--bench-ffn`` wide, to fit
the transfer limit).

``run`` (there, with ``python3`` and numpy only: this part imports nothing of moec): runs each
case with ``moec-runner`` on the GPU, compares every output with the reference under ``moec
verify``'s default bounds (fp32: 1e-4, or 1e-5 of the output's largest value; reduced
arithmetic: 1e-2 of it), times the benchmark block at 1 and 16 tokens (the runner's latency
line), prints a table and exits 1 if a case fails. TVM's CUDA runtime needs
``libcudart.so.13``: ``run`` looks for it in the Python packages there (PyTorch's CUDA 13
wheels) and the usual CUDA folders.

Reproduce (see scripts/gpu-check.sh for the device command)::

    .venv/bin/python scripts/gpu_check.py prepare          # here
    python3 scripts/gpu_check.py run                       # on the GPU machine
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURE_CASES = {
    "deepseek-sigmoid-groups": "deepseek_v3-block-dynamo-batched_mm",
    "phimoe-sparsemixer": "phimoe-block-dynamo-batched_mm",
    "switch-capacity": "switch_transformers-block-torchscript-na",
    "gpt-oss-clamped-bias": "gpt_oss-block-dynamo-batched_mm",
}
EXAMPLE_CASES = {
    "mixtral-softmax-fp32": ("mixtral_tiny.onnx", "fp32"),
    "mixtral-softmax-fp16": ("mixtral_tiny.onnx", "fp16"),
    "mixtral-softmax-int8": ("mixtral_tiny.onnx", "int8"),
    "mixtral-softmax-int8-dot": ("mixtral_tiny.onnx", "int8-dot"),
    "ort-moe": ("ms_moe_tiny.onnx", "auto"),
    "ort-qmoe": ("qmoe_tiny.onnx", "auto"),
}
BENCH_TOKENS = (1, 16)
FP32_ATOL, FP32_RELATIVE, REDUCED_RELATIVE = 1e-4, 1e-5, 1e-2
"""``moec verify``'s defaults: atol, rtol, and the reduced-arithmetic (fp16, int8) relative bound."""


# --------------------------------------------------------------------------------------------
# prepare (here)
# --------------------------------------------------------------------------------------------


def default_target(directory: Path) -> Path:
    """The bundled ``cuda`` target naming an H200 (``sm_90``, 132 SMs, 50 MiB L2, 4.8 TB/s)."""
    from moec.targets import bundled_target_file

    text = bundled_target_file("cuda").read_text()
    for old, new in (
        ('arch = "detect"    #', 'arch = "sm_90"    #'),
        ('cores = "detect"', "cores = 132"),
        ('l1d_bytes = "detect"', "l1d_bytes = 49152"),
        ('l2_bytes = "detect"', "l2_bytes = 52428800"),
        ('memory_bandwidth_gbps = "detect"', "memory_bandwidth_gbps = 4800"),
    ):
        text = text.replace(old, new)
    path = directory / "h200.toml"
    path.write_text(text)
    return path


def bench_model(directory: Path, ffn: int) -> Path:
    """The benchmark block (benchmarks/bench_mixtral_block.py's: hidden 512, 8 experts, top-2,
    SwiGLU) with ``ffn`` intermediate channels."""
    sys.path.insert(0, str(REPO))
    import onnx

    from tests.zoo.standard import build_dense_batched_moe

    model = build_dense_batched_moe(hidden=512, inter=ffn, experts=8, k=2, activation="swiglu", seed=0)
    path = directory / "bench.onnx"
    onnx.save(model, path)
    return path


def save_case(case_dir: Path, artifact: Path, feeds_list: list[dict], model, tolerance: dict) -> None:
    """``artifact`` and, per feeds, the inputs and the numpy reference's outputs as ``.npy``."""
    from moec.artifact import read_manifest
    from moec.verify import reference_outputs

    manifest = read_manifest(artifact)
    shutil.copytree(artifact, case_dir / "artifact")
    runs = []
    for number, feeds in enumerate(feeds_list):
        run_dir = case_dir / f"run{number}"
        (run_dir / "in").mkdir(parents=True)
        (run_dir / "expected").mkdir()
        for name, value in feeds.items():
            np.save(run_dir / "in" / f"{_stem(name)}.npy", np.asarray(value, order="C"))
        for name, value in reference_outputs(model, manifest, feeds).items():
            np.save(run_dir / "expected" / f"{_stem(name)}.npy", value)
        runs.append({"inputs": {name: f"{_stem(name)}.npy" for name in feeds}, "dir": run_dir.name})
    (case_dir / "case.json").write_text(json.dumps({"runs": runs, **tolerance}, indent=1))


def prepare(target: Path | None, out: Path, bench_ffn: int) -> None:
    sys.path.insert(0, str(REPO))
    from moec.artifact import read_manifest
    from moec.compiler.compile import compile_model
    from moec.frontend.loader import load_model
    from moec.options import CompileOptions
    from moec.runtime.package import package_artifact
    from moec.runtime.session import random_inputs
    from moec.verify import reduced_arithmetic
    from tests.helpers import fixture_cases

    if out.exists():
        shutil.rmtree(out)
    (out / "cases").mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = Path(scratch)
        target = target or default_target(work)
        shutil.copy(target, out / "target.toml")

        def build(name: str, model_path: Path, precision: str, feeds_list: list[dict] | None) -> Path:
            print(f"prepare: {name}", flush=True)
            artifact = compile_model(
                model_path, work / name, CompileOptions(target=str(target), precision=precision)
            )
            manifest = read_manifest(artifact)
            feeds_list = feeds_list or [random_inputs(manifest["inputs"], t, seed=t) for t in (1, 7)]
            reduced = reduced_arithmetic(manifest)
            tolerance = {"atol": FP32_ATOL, "relative": REDUCED_RELATIVE if reduced else FP32_RELATIVE}
            save_case(out / "cases" / name, artifact, feeds_list, load_model(model_path), tolerance)
            return artifact

        for name, (file, precision) in EXAMPLE_CASES.items():
            example = build(name, REPO / "examples" / file, precision, None)
        for name, fixture in FIXTURE_CASES.items():
            feeds = [feeds for feeds, _ in fixture_cases(fixture).values()]
            build(name, REPO / "fixtures" / "models" / f"{fixture}.onnx", "auto", feeds)
        print("prepare: benchmark block", flush=True)
        bench = compile_model(
            bench_model(work, bench_ffn), work / "bench", CompileOptions(target=str(target))
        )
        shutil.copytree(bench, out / "bench")
        # the runner and TVM's runtime, as `moec package` bundles them for this target
        tarball = package_artifact(example, work / "bundle.tar.gz", target_file=str(target))
        with tarfile.open(tarball) as tar:
            tar.extractall(work / "bundle", filter="data")
        shutil.copytree(work / "bundle" / "bundle" / "bin", out / "bin")
        shutil.copytree(work / "bundle" / "bundle" / "lib", out / "lib")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"prepare: wrote {out} ({size / 2**20:.1f} MiB)")


# --------------------------------------------------------------------------------------------
# run (on the GPU machine: python3 and numpy only)
# --------------------------------------------------------------------------------------------


def _stem(name: str) -> str:
    """The runner's output file name for ``name`` (moec.runtime.native.output_file_stem)."""
    stem = name.replace("/", "_").replace("\\", "_")
    return "_" + stem if stem in ("", ".", "..") else stem


def cudart_dirs() -> list[str]:
    """Folders holding ``libcudart.so.13`` (TVM's CUDA runtime needs it): Python packages' CUDA
    wheels (PyTorch's), then the usual CUDA install folders."""
    patterns = [
        f"{p}/nvidia/**/libcudart.so.13*" for p in sys.path if p.endswith(("site-packages", "dist-packages"))
    ]
    patterns += ["/usr/local/cuda*/lib64/libcudart.so.13*", "/usr/lib/x86_64-linux-gnu/libcudart.so.13*"]
    found = {str(Path(f).parent) for pattern in patterns for f in glob.glob(pattern, recursive=True)}
    return sorted(found)


def run_case(runner: Path, env: dict, case_dir: Path) -> list[str]:
    """Failures of one case (empty: it passed), each one line."""
    spec = json.loads((case_dir / "case.json").read_text())
    failures = []
    for run in spec["runs"]:
        run_dir = case_dir / run["dir"]
        out = run_dir / "out"
        command = [str(runner), str(case_dir / "artifact"), "--output-dir", str(out)]
        for name, file in run["inputs"].items():
            command += ["--input", f"{name}={run_dir / 'in' / file}"]
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            failures.append(f"{run['dir']}: runner failed: {result.stderr.strip().splitlines()[-1:]}")
            continue
        for expected_file in sorted((run_dir / "expected").glob("*.npy")):
            expected, actual = np.load(expected_file), np.load(out / expected_file.name)
            both_nan = np.isnan(expected) & np.isnan(actual)
            error = np.where(both_nan, 0.0, np.abs(actual.astype(np.float64) - expected))
            worst = float(np.nanmax(error)) if error.size else 0.0
            if np.isnan(error).any():
                worst = float("inf")
            # moec verify's bound: atol, or a share of the output's largest value (rtol for fp32)
            scale = float(np.abs(expected[np.isfinite(expected)]).max(initial=0))
            bound = max(spec.get("atol", 0.0), spec["relative"] * scale)
            if actual.shape != expected.shape or not worst <= bound:
                failures.append(f"{run['dir']} {expected_file.stem}: max abs {worst:.3e} > {bound:.3e}")
    return failures


def time_bench(runner: Path, env: dict, bench: Path) -> dict[int, str]:
    """The runner's latency line for the benchmark block at each of :data:`BENCH_TOKENS`."""
    lines = {}
    for tokens in BENCH_TOKENS:
        command = [str(runner), str(bench), "--random-inputs", "--tokens", str(tokens)]
        command += ["--repeat", "500", "--warmup", "50"]
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        found = re.search(r"latency over .*", result.stdout)
        lines[tokens] = found.group(0) if found else f"failed: {result.stderr.strip()[-200:]}"
    return lines


def run(directory: Path) -> int:
    runner = directory / "bin" / "moec-runner"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join([*cudart_dirs(), env.get("LD_LIBRARY_PATH", "")])
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        print(f"GPU: {subprocess.run(query, capture_output=True, text=True).stdout.strip()}")
    else:
        print("GPU: none (no nvidia-smi): the cases run wherever their target says")
    failed = 0
    for case_dir in sorted((directory / "cases").iterdir()):
        failures = run_case(runner, env, case_dir)
        failed += bool(failures)
        print(f"{case_dir.name:<28} {'ok' if not failures else 'FAIL'}")
        for line in failures:
            print(f"    {line}")
    for tokens, line in time_bench(runner, env, directory / "bench").items():
        print(f"benchmark block, {tokens:>2} token(s): {line}")
    print(f"{failed} case(s) failed" if failed else "every case matches the numpy reference")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="build everything here")
    prep.add_argument("--target", type=Path, help="GPU target file (default: an H200, sm_90)")
    prep.add_argument("--out", type=Path, default=REPO / ".gpu-check")
    prep.add_argument("--bench-ffn", type=int, default=768, help="the benchmark block's intermediate width")
    go = commands.add_parser("run", help="run and check everything on the GPU machine")
    go.add_argument("--dir", type=Path, default=REPO / ".gpu-check")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.target, args.out, args.bench_ffn)
        return 0
    return run(args.dir)


if __name__ == "__main__":
    sys.exit(main())
