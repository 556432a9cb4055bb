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
``QMoE``), expert capacity, GPT-OSS's clamped SwiGLU with biases, every weight format (fp32,
fp16, int8, int8-dot), and a whole decoder step with a KV cache (attention, norms and the rest on
TVM's default GPU schedules); and the benchmark blocks (:data:`BENCH_BLOCKS`): their weights are
a formula (:func:`synthetic_tensor`), rebuilt there and checked by the runner's SHA-256, so that
blocks larger than the GPU's L2 fit the transfer limit.

``prepare --base REV`` also compiles each benchmark block with moec at git revision ``REV`` (a
checkout of it), so that a kernel change is judged on the GPU against the kernels it replaces,
side by side; ``prepare --schedules T,R,B ...`` compiles it with other CUDA kernel schedules
(threads per row, rows per block, token block), so that one GPU run shows which to bundle.

``run`` (there, with ``python3`` and numpy only: this part imports nothing of moec): runs each
case with ``moec-runner`` on the GPU (which needs only the NVIDIA driver, ``libcuda.so.1``),
compares every output with the reference under ``moec verify``'s default bounds (fp32: 1e-4, or
1e-5 of the output's largest value; reduced arithmetic: 1e-2 of it), times each benchmark block
at 1 and 16 tokens (the runner's latency line; beside it the ``--base`` builds, their outputs
checked against this build's first), with the bytes of the experts a call routes to
and the bandwidth that makes, and each kernel's GPU time (``--kernel-times``), prints a table and
exits 1 if a case fails.

The baseline. The issue names onnxruntime-gpu's CUDA ``com.microsoft::MoE``; the GPU machine has
only the CPU onnxruntime and no network, and the CUDA wheel is far over the transfer limit, so
``run`` says so and, where PyTorch with CUDA is installed there, times PyTorch instead: the
block written as Hugging Face's Mixtral block runs it (softmax router, top-k, renormalise, a
loop over the experts hit), in eager mode, on the same weights (read from the benchmark
artifact's ``weights.bin``) and inputs, after checking that its output matches moec's. The two
are timed interleaved, three rounds each of 500 calls, each call waited for (as the runner
does), and the median round reported.

Reproduce (see scripts/gpu-check.sh for the device command)::

    .venv/bin/python scripts/gpu_check.py prepare          # here
    python3 scripts/gpu_check.py run                       # on the GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURE_CASES = {
    "deepseek-sigmoid-groups": "deepseek_v3-block-dynamo-batched_mm",
    "phimoe-sparsemixer": "phimoe-block-dynamo-batched_mm",
    "switch-capacity": "switch_transformers-block-torchscript-na",
    "gpt-oss-clamped-bias": "gpt_oss-block-dynamo-batched_mm",
    "mixtral-decoder-kv-cache": "mixtral-decoder-cache-dynamo-batched_mm",
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
BENCH_BLOCKS = {"mixtral-block": (512, 1024), "large-block": (1024, 3584), "tiny-block": (64, 128)}
"""Benchmark blocks (8 SwiGLU experts, top-2 of a softmax router) by name: (hidden, FFN). The
first is benchmarks/bench_mixtral_block.py's (48 MiB of fp32 weights: it fits an H200's L2); the
second reads 84 MiB from DRAM at one token and 336 MiB at 16 (two and eight experts); the third
is for testing this script. Their weights travel as a formula (:func:`synthetic_tensor`)."""
WEIGHTS_HEAD = "weights.head"
"""A benchmark artifact's ``weights.bin`` without its data: header, index and padding."""
FP32_ATOL, FP32_RELATIVE, REDUCED_RELATIVE = 1e-4, 1e-5, 1e-2
"""``moec verify``'s defaults: atol, rtol, and the reduced-arithmetic (fp16, int8) relative bound."""


# --------------------------------------------------------------------------------------------
# prepare (here)
# --------------------------------------------------------------------------------------------


def bench_model(directory: Path, hidden: int, ffn: int) -> Path:
    """A benchmark block: ``hidden`` wide, ``ffn`` intermediate channels, 8 SwiGLU experts, top-2."""
    sys.path.insert(0, str(REPO))
    import onnx

    from tests.zoo.standard import build_dense_batched_moe

    model = build_dense_batched_moe(hidden=hidden, inter=ffn, experts=8, k=2, activation="swiglu", seed=0)
    path = directory / f"bench-{hidden}x{ffn}.onnx"
    onnx.save(model, path)
    return path


def synthesize_bench(artifact: Path, out: Path) -> None:
    """Give the benchmark ``artifact`` the weights of :func:`synthetic_tensor` (their values do not
    matter for timing) and copy it to ``out`` without their bytes: ``weights.head`` instead of
    ``weights.bin``, rebuilt on the GPU machine by :func:`restore_weights` and checked there by
    the runner against the manifest's SHA-256. Checked here first: the rebuilt file is the same."""
    from moec.weights_file import read_weights as moec_read_weights
    from tests.helpers import rewrite_weights

    stored = moec_read_weights(artifact / "weights.bin")
    synthetic = {name: synthetic_tensor(n, a.shape, a.dtype) for n, (name, a) in enumerate(stored.items())}
    del stored
    rewrite_weights(artifact, synthetic)
    shutil.copytree(artifact, out, ignore=shutil.ignore_patterns("weights.bin"))
    with open(artifact / "weights.bin", "rb") as weights:
        (index_length,) = struct.unpack("<8sII", weights.read(16))[2:]
        weights.seek(0)
        (out / WEIGHTS_HEAD).write_bytes(weights.read(data_start(index_length)))
    restore_weights(out)
    if (out / "weights.bin").read_bytes() != (artifact / "weights.bin").read_bytes():
        raise SystemExit(f"{out}: the rebuilt weights differ from the compiled ones")
    (out / "weights.bin").unlink()


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


def schedule_target(target: Path, spec: str, directory: Path) -> tuple[str, Path]:
    """A copy of the GPU ``target`` file in ``directory`` whose kernel schedule is ``spec``
    (``THREADS_PER_ROW,ROWS_PER_BLOCK,TOKEN_BLOCK``, :class:`moec.schedule.GpuSchedule`'s fields):
    ``(label, path)``."""
    try:
        threads_per_row, rows_per_block, token_block = (int(value) for value in spec.split(","))
    except ValueError:
        raise SystemExit(
            f"--schedules {spec!r}: want THREADS_PER_ROW,ROWS_PER_BLOCK,TOKEN_BLOCK, e.g. 32,4,4"
        ) from None
    label = f"tpr{threads_per_row}-rpb{rows_per_block}-tb{token_block}"
    (directory / f"schedule-{label}.toml").write_text(
        f'kind = "cuda"\nthreads_per_row = {threads_per_row}\nrows_per_block = {rows_per_block}\n'
        f"token_block = {token_block}\n"
    )
    text, found = re.subn(
        r'^schedule = ".*"$', f'schedule = "schedule-{label}.toml"', target.read_text(), count=1, flags=re.M
    )
    if not found:
        raise SystemExit(f"{target}: names no schedule, so --schedules has nothing to replace")
    path = directory / f"target-{label}.toml"
    path.write_text(text)
    return label, path


def prepare(
    target: Path | None, out: Path, benches: list[str], base: str | None, schedules: list[str]
) -> None:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import compile_at, git, revision_tree

    from moec.artifact import read_manifest
    from moec.compiler.compile import compile_model
    from moec.frontend.loader import load_model
    from moec.options import CompileOptions
    from moec.runtime.package import package_artifact
    from moec.runtime.session import random_inputs
    from moec.verify import reduced_arithmetic
    from tests.helpers import fixture_cases, named_gpu_target

    if out.exists():
        shutil.rmtree(out)
    (out / "cases").mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = Path(scratch)
        target = target or named_gpu_target(work)  # an H200, sm_90
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

        def compile_for(target_file: Path) -> Callable[[Path, Path], object]:
            return lambda model, folder: compile_model(model, folder, CompileOptions(target=str(target_file)))

        # each benchmark block's builds: (name suffix, compile(model, folder)) for this moec and
        # target, each --schedules variant ("+LABEL") and moec at --base ("@REV")
        variants = [schedule_target(target, spec, work) for spec in schedules]
        builds = [("", compile_for(target))] + [(f"+{label}", compile_for(file)) for label, file in variants]
        with contextlib.ExitStack() as stack:
            if base:  # one checkout of it for every block
                commit = git("rev-parse", "--short", base)
                tree = stack.enter_context(revision_tree(commit, work / "base-tree"))
                builds.append(
                    (f"@{commit}", lambda model, folder: compile_at(tree, model, folder, str(target)))
                )
            for name in benches:
                model = bench_model(work, *BENCH_BLOCKS[name])
                for suffix, compile_to in builds:
                    print(f"prepare: {name}{suffix}", flush=True)
                    compile_to(model, work / f"{name}{suffix}")
                    synthesize_bench(work / f"{name}{suffix}", out / "bench" / f"{name}{suffix}")
                    shutil.rmtree(work / f"{name}{suffix}")
                model.unlink()
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


def run_case(runner: Path, case_dir: Path) -> list[str]:
    """Failures of one case (empty: it passed), each one line."""
    spec = json.loads((case_dir / "case.json").read_text())
    failures = []
    for run in spec["runs"]:
        run_dir = case_dir / run["dir"]
        out = run_dir / "out"
        command = [str(runner), str(case_dir / "artifact"), "--output-dir", str(out)]
        for name, file in run["inputs"].items():
            command += ["--input", f"{name}={run_dir / 'in' / file}"]
        result = subprocess.run(command, capture_output=True, text=True)
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


def data_start(index_length: int) -> int:
    """Where a weights file's data begins: after its 16-byte header and index, at a page (a copy of
    ``moec.weights_file.data_start``, as :func:`_stem` is: ``run`` imports nothing of moec)."""
    return -(-(16 + index_length) // 4096) * 4096


def synthetic_tensor(number: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Tensor ``number`` of a benchmark block: splitmix64 of each element's index (and of
    ``number``), its top 24 bits spread evenly over (-0.5, 0.5) and scaled to variance
    ``1 / fan_in``. Plain integer arithmetic, so every numpy makes the same bytes (which the
    runner then checks by SHA-256)."""
    count = int(np.prod(shape))
    out = np.empty(count, dtype=dtype)
    scale = np.sqrt(12.0 / (shape[-1] if len(shape) > 1 else 1))
    step = 1 << 22
    with np.errstate(over="ignore"):
        for start in range(0, count, step):
            z = np.arange(start, min(start + step, count), dtype=np.uint64)
            z = z + np.uint64((number + 1) * 0x9E3779B97F4A7C15 % 2**64)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            unit = (z >> np.uint64(40)).astype(np.float64) / 2.0**24 - 0.5
            out[start : start + len(z)] = unit * scale
    return out.reshape(shape)


def restore_weights(bench: Path) -> None:
    """Rebuild ``bench/weights.bin`` from its ``weights.head`` and :func:`synthetic_tensor`."""
    head = (bench / WEIGHTS_HEAD).read_bytes()
    (index_length,) = struct.unpack_from("<I", head, 12)
    index = json.loads(head[16 : 16 + index_length])
    with open(bench / "weights.bin", "wb") as out:
        out.write(head)
        for number, t in enumerate(index["tensors"]):
            out.seek(len(head) + t["offset"])
            out.write(synthetic_tensor(number, tuple(t["shape"]), np.dtype(t["dtype"])).tobytes())
        out.truncate(len(head) + max((t["offset"] + t["nbytes"] for t in index["tensors"]), default=0))


def runner_latency(runner: Path, bench: Path, feeds: Path, repeat: int) -> dict[str, float] | str:
    """The runner's mean, p50 and p99 (ms) over ``repeat`` timed calls on the inputs ``feeds``
    (an ``.npy``), or why it failed."""
    command = [str(runner), str(bench), "--input", f"x={feeds}", "--repeat", str(repeat), "--warmup", "50"]
    result = subprocess.run(command, capture_output=True, text=True)
    found = re.search(r"mean ([\d.]+) ms, p50 ([\d.]+) ms, p99 ([\d.]+) ms", result.stdout)
    if not found:
        return f"failed: {result.stderr.strip()[-200:]}"
    return dict(zip(("mean", "p50", "p99"), map(float, found.groups()), strict=True))


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """The tensors of an artifact's ``weights.bin`` (moec/weights_file.py's layout), by name: the
    numpy-only counterpart of ``moec.weights_file.read_weights``, for ``run``."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    magic, _version, index_length = struct.unpack_from("<8sII", data, 0)
    if magic != b"MOECWTS\0":
        raise SystemExit(f"{path}: not a moec weights file")
    index = json.loads(bytes(data[16 : 16 + index_length]))
    start = data_start(index_length)
    return {
        t["name"]: np.frombuffer(data, t["dtype"], int(np.prod(t["shape"])), start + t["offset"]).reshape(
            t["shape"]
        )
        for t in index["tensors"]
    }


def torch_available() -> bool:
    """Whether PyTorch with a CUDA device is installed here (the baseline)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def torch_block(bench: Path):
    """The benchmark block as PyTorch eager code on the GPU (Hugging Face Mixtral's block: route,
    top-k, renormalise, loop over the experts hit), on the artifact's weights; None without
    PyTorch or CUDA there."""
    if not torch_available():
        return None
    import torch

    manifest = json.loads((bench / "manifest.json").read_text())
    (layer,) = manifest["layers"]
    assert layer["activation"] == "swiglu" and layer["router"] == {"scoring": "softmax", "normalize": True}
    stored = read_weights(bench / "weights.bin")
    names = {**layer["weights"], "router": router_name(manifest)}
    w = {key: torch.from_numpy(np.array(stored[name])).cuda() for key, name in names.items() if name}
    w["router"] = w["router"].reshape(manifest["inputs"][0]["shape"][-1], -1)
    top_k = layer["top_k"]

    def bias(name: str, expert: int):
        return w[name][expert] if name in w else 0.0

    @torch.inference_mode()
    def block(x):
        probs = torch.softmax(x @ w["router"], dim=-1)
        weights, chosen = torch.topk(probs, top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        mask = torch.nn.functional.one_hot(chosen, probs.shape[-1]).permute(2, 1, 0)  # [E, k, T]
        for expert in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist():
            slot, rows = torch.where(mask[expert])
            xe = x[rows]
            gate = torch.nn.functional.silu(xe @ w["w_gate"][expert].T + bias("b_gate", expert))
            hidden = gate * (xe @ w["w_up"][expert].T + bias("b_up", expert))
            down = hidden @ w["w_down"][expert].T + bias("b_down", expert)
            out.index_add_(0, rows, down * weights[rows, slot, None])
        return out

    return block


def torch_latency(block, x: np.ndarray, repeat: int) -> dict[str, float]:
    """Mean, p50 and p99 (ms) of ``block`` over ``repeat`` calls, each waited for, after 50."""
    import time

    import torch

    tensor = torch.from_numpy(x).cuda()
    for _ in range(50):
        block(tensor)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        block(tensor)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "mean": float(np.mean(times)),
        "p50": float(np.median(times)),
        "p99": float(np.percentile(times, 99)),
    }


def router_name(manifest: dict) -> str:
    """The benchmark block's router weight (a standard-ops export's ``<layer>/router_w``)."""
    return next(n for n in manifest["params"] if n.endswith("router_w"))


def routed_bytes(bench: Path, x: np.ndarray) -> tuple[int, int]:
    """The distinct experts the inputs ``x`` route to (softmax top-k of the stored router, in
    numpy) and their weights' bytes: what one call must read."""
    manifest = json.loads((bench / "manifest.json").read_text())
    (layer,) = manifest["layers"]
    router = read_weights(bench / "weights.bin")[router_name(manifest)]
    logits = x @ router.reshape(x.shape[-1], -1)  # [hidden, experts], maybe stored with a batch axis
    chosen = np.unique(np.argsort(-logits, axis=-1, kind="stable")[:, : layer["top_k"]])
    sizes = {entry["expert"]: entry["bytes"] for entry in layer["plan"]}
    return len(chosen), sum(sizes[int(e)] for e in chosen)


def build_label(build: Path) -> str:
    """A benchmark block's other build as the table names it: ``moec @ REV`` (``NAME@REV``) or
    ``moec LABEL`` (``NAME+LABEL``)."""
    if "@" in build.name:
        return f"moec @ {build.name.split('@', 1)[1]}"
    return f"moec {build.name.split('+', 1)[1]}"


def time_bench(runner: Path, bench: Path, work: Path, bases: list[Path]) -> list[str]:
    """Table rows for one benchmark block: moec, the same block's other builds (``bases``:
    ``NAME@REV`` by moec at an earlier revision, from ``prepare --base``; ``NAME+LABEL`` with
    another kernel schedule, from ``prepare --schedules``) and (where PyTorch runs) PyTorch
    eager at each of :data:`BENCH_TOKENS`, timed interleaved (every other output is checked
    against moec's first), with the bytes a call reads and the bandwidth that makes, and each
    moec build's time per kernel."""
    builds = {"moec": bench} | {build_label(other): other for other in bases}
    for build in builds.values():
        if not (build / "weights.bin").exists():
            restore_weights(build)
    rows = []
    block = torch_block(bench)
    hidden = json.loads((bench / "manifest.json").read_text())["inputs"][0]["shape"][-1]
    for tokens in BENCH_TOKENS:
        x = np.random.default_rng(tokens).standard_normal((tokens, hidden)).astype(np.float32)
        experts, nbytes = routed_bytes(bench, x)
        label = f"{bench.name}, {tokens:>2} token(s) ({experts} experts, {nbytes / 2**20:.1f} MiB)"
        feeds = work / f"{bench.name}-x{tokens}.npy"
        np.save(feeds, x)
        ours = runner_output(runner, bench, feeds, work / f"{bench.name}-out{tokens}")
        if isinstance(ours, str):
            rows.append(f"{label}: {ours}")
            continue
        systems = {}
        for name, build in builds.items():
            theirs = (
                ours
                if build == bench
                else runner_output(runner, build, feeds, work / f"{build.name}-out{tokens}")
            )
            difference = output_difference(ours, theirs)
            if difference is None:
                systems[name] = functools.partial(runner_latency, runner, build, feeds, 500)
            else:
                rows.append(f"{label}: {name} differs from moec ({difference}): not timed")
        if block is not None:
            difference = output_difference(ours, torch_output(block, feeds))
            if difference is None:
                systems["PyTorch eager"] = functools.partial(torch_latency, block, x, 500)
            else:
                rows.append(f"{label}: PyTorch differs from moec ({difference}): not timed")
        rounds: dict[str, list] = {name: [] for name in systems}
        for _ in range(3):  # interleaved: one round of each, three times
            for name, measure in systems.items():
                rounds[name].append(measure())
        for name, results in rounds.items():
            failed = [r for r in results if isinstance(r, str)]
            if failed:
                rows.append(f"{label}, {name}: {failed[0]}")
                continue
            median = sorted(results, key=lambda r: r["mean"])[len(results) // 2]
            numbers = ", ".join(f"{k} {v:.4f} ms" for k, v in median.items())
            rows.append(f"{label}, {name}: {numbers}; {nbytes / median['p50'] / 1e6:.0f} GB/s at p50")
        for name, build in builds.items():
            rows += [f"    {name}: {line}" for line in kernel_times(runner, build, feeds)]
    return rows


def kernel_times(runner: Path, bench: Path, feeds: Path) -> list[str]:
    """The runner's per-kernel GPU times (``--kernel-times``, CUDA events) on the inputs ``feeds``
    (none for a CPU target's block: the host test of this script)."""
    if json.loads((bench / "manifest.json").read_text())["target"].get("cuda") is None:
        return []
    command = [str(runner), str(bench), "--input", f"x={feeds}", "--repeat", "200", "--kernel-times"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return [f"kernel times failed: {result.stderr.strip()[-200:]}"]
    return [line for line in result.stdout.splitlines() if line.startswith("kernel")]


def runner_output(runner: Path, bench: Path, feeds: Path, out: Path) -> np.ndarray | str:
    """The block's output ``y`` for the inputs ``feeds``, or why the runner failed."""
    command = [str(runner), str(bench), "--input", f"x={feeds}", "--output-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return f"moec failed: {result.stderr.strip()[-200:]}"
    return np.load(out / "y.npy")


def torch_output(block, feeds: Path) -> np.ndarray | str:
    """PyTorch's output for the inputs ``feeds``, or why it failed."""
    import torch

    try:
        return block(torch.from_numpy(np.load(feeds)).cuda()).cpu().numpy()
    except Exception as err:  # e.g. weights stored in a layout this baseline does not read
        return f"PyTorch failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"


def output_difference(ours: np.ndarray | str, theirs: np.ndarray | str) -> str | None:
    """Why ``theirs`` differs from moec's output ``ours`` (or either failed), or None if they match
    under verify's fp32 bound."""
    for output in (ours, theirs):
        if isinstance(output, str):
            return output
    error = float(np.abs(ours - theirs).max())
    bound = max(FP32_ATOL, FP32_RELATIVE * float(np.abs(theirs).max()))
    return None if error <= bound else f"max abs {error:.2e} > {bound:.2e}"


def run(directory: Path) -> int:
    runner = directory / "bin" / "moec-runner"
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        print(f"GPU: {subprocess.run(query, capture_output=True, text=True).stdout.strip()}")
    else:
        print("GPU: none (no nvidia-smi): the cases run wherever their target says")
    failed = 0
    for case_dir in sorted((directory / "cases").iterdir()):
        failures = run_case(runner, case_dir)
        failed += bool(failures)
        print(f"{case_dir.name:<28} {'ok' if not failures else 'FAIL'}")
        for line in failures:
            print(f"    {line}")
    print("onnxruntime-gpu: not installed on this machine (CPU onnxruntime only): no CUDA MoE op to time")
    if not torch_available():
        print("PyTorch with CUDA: not installed on this machine: moec alone")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        for bench in sorted(b for b in (directory / "bench").iterdir() if not re.search(r"[@+]", b.name)):
            bases = sorted((directory / "bench").glob(f"{bench.name}+*")) + sorted(
                (directory / "bench").glob(f"{bench.name}@*")
            )
            for row in time_bench(runner, bench, Path(work), bases):
                print(row)
    print(f"{failed} case(s) failed" if failed else "every case matches the numpy reference")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="build everything here")
    prep.add_argument("--target", type=Path, help="GPU target file (default: an H200, sm_90)")
    prep.add_argument("--out", type=Path, default=REPO / ".gpu-check")
    prep.add_argument(
        "--bench",
        nargs="+",
        choices=sorted(BENCH_BLOCKS),
        default=["mixtral-block", "large-block"],
        help="benchmark blocks to time there (default: mixtral-block large-block)",
    )
    prep.add_argument(
        "--base",
        metavar="REV",
        help="also compile each benchmark block with moec at this git revision, to time it beside "
        "this one there (a kernel change judged on the GPU against the kernels it replaces)",
    )
    prep.add_argument(
        "--schedules",
        nargs="+",
        default=[],
        metavar="T,R,B",
        help="also compile each benchmark block with these CUDA kernel schedules (threads per row, "
        "rows per block, token block; the bundled one is 32,8,4), to time them beside it there",
    )
    go = commands.add_parser("run", help="run and check everything on the GPU machine")
    go.add_argument("--dir", type=Path, default=REPO / ".gpu-check")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.target, args.out, args.bench, args.base, args.schedules)
        return 0
    return run(args.dir)


if __name__ == "__main__":
    sys.exit(main())
