#!/usr/bin/env python
"""Latency of one Mixtral-style MoE block: moec against onnxruntime and plain TVM, same weights.

What: hidden 512, FFN 1024, 8 SwiGLU experts, top-2 of a softmax router with the two
weights renormalised, fp32, no biases (8 x 6 MiB = 48 MiB of expert weights). Five
systems run that block with identical weights:

``moec``       the standard-op ONNX model compiled by ``moec.compiler.compile.compile_model``
               for the ``host`` target; timed as ``vm["main"](x, *params)`` on
               pre-converted TVM tensors.
``ort-moe``    onnxruntime's fused ``com.microsoft::MoE`` op (swiglu, ``swiglu_fusion=1``:
               gate rows at even, linear rows at odd indices of fc1), behind the router MatMul.
``ort-std``    onnxruntime on the standard-op ONNX model (the exported-graph version).
``tvm-onnx``   TVM's own ONNX import of the standard-op model
               (``from_onnx(keep_params_in_input=False)`` + ``tvm.compile``), no moec.
``c-loop``     the block hand-written in C++ (``bench_mixtral_block_cloop.cpp``: routing on
               the calling thread, then a pthread pool over output rows with the same thread
               count), compiled here with the system ``g++ -O3 -march=native`` and called
               through ctypes on numpy arrays; weights copied once into its own row-major,
               huge-page layout. It is the "what a plain native loop attains here" reference.

Why: the issue sets moec's targets in units of the memory-bandwidth bound (decoding an
MoE block is a weight-streaming problem), so each latency is reported as a multiple of
``bytes of the distinct experts the input actually routes to / measured DRAM read
bandwidth``. Before any timing, every system is checked against an independent float64
numpy computation of the block (and against each other) at every token count.

How (and why that way):

* One subprocess per thread count: TVM reads ``TVM_NUM_THREADS`` once, when its thread
  pool starts, so a thread count is a property of a process. onnxruntime gets the same
  count as ``intra_op_num_threads`` (``inter_op_num_threads=1``). The parent process
  builds the models and the moec artifact once, runs the children, and aggregates.
* Systems are interleaved: each repetition runs every system once (round-robin, the
  order rotated every repetition), so machine noise hits all systems alike.
* ``cold``: before each timed call a buffer larger than the last-level cache is
  read+written and then read again (the second, read-only pass leaves the cache holding
  clean lines, so the timed call does not also pay for write-backs). Nothing of the
  weights survives in any cache level.
* ``warm``: per repetition and system, one untimed call then ``--inner`` timed calls back
  to back (weights in cache, thread pool awake).
* Both TVM's and onnxruntime's thread pools spin after a call (TVM ~60 ms, onnxruntime
  ~25 ms measured here); with 2 cores a spinning pool of the previous system would steal
  a core from the next, so warm segments start after a settle pause. Cold calls are
  preceded by the eviction, which takes longer than either spin.
* DRAM read bandwidth: numpy ``max`` over the eviction buffer, split into one contiguous
  part per thread on a ``ThreadPoolExecutor`` (numpy releases the GIL), best of several.
  ``max``, not ``sum``: numpy's float32 sum runs at ~19 GB/s even from L2 here, so it
  measures the adder rather than memory; ``max`` reaches ~70 GB/s from L2.

Run from the repository root::

    .venv/bin/python benchmarks/bench_mixtral_block.py            # full run, updates BENCHMARKS.md
    .venv/bin/python benchmarks/bench_mixtral_block.py --quick --tokens 1 --threads 1   # smoke, <60 s
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    MoecModel,
    cpu_model,
    git_revision,
    log,
    publish,
    run_timing_children,
    timing_defaults,
    timing_parser,
)

HIDDEN = 512
FFN = 1024
EXPERTS = 8
TOP_K = 2
WEIGHT_SEED = 0
INPUT_SEED = 1234
TOLERANCE = 1e-4
"""Max abs error allowed between any two systems and against the numpy block."""

EXPERT_BYTES = 3 * HIDDEN * FFN * 4
"""Bytes of one expert's gate, up and down matrices (fp32)."""

SYSTEMS = ("moec", "c-loop", "ort-moe", "ort-std", "tvm-onnx")
SYSTEM_LABELS = {
    "moec": "moec",
    "c-loop": "C loop",
    "ort-moe": "ORT com.microsoft::MoE",
    "ort-std": "ORT standard ops",
    "tvm-onnx": "TVM ONNX import",
}
MODES = ("cold", "warm")
READ = "numpy-read"
"""Pseudo-system: a plain numpy read of the selected experts' bytes, timed alongside."""
SLOW_CALL_S = 0.05
EVICT_CAP_MB = 1024
EVICT_FLOOR_MB = 64
CLOOP_SOURCE = Path(__file__).resolve().with_name("bench_mixtral_block_cloop.cpp")
CLOOP_LIBRARY = "cloop.so"
CLOOP_FLAGS = ("-O3", "-march=native", "-pthread", "-shared", "-fPIC")
MD_NAME = "bench_mixtral_block"

Fn = Callable[[], object]


# ---------------------------------------------------------------------------
# machine facts
# ---------------------------------------------------------------------------


def _parse_size(text: str) -> int:
    """Bytes of a sysfs cache size such as ``491520K`` or ``2M``."""
    match = re.fullmatch(r"(\d+)\s*([KMG]?)", text.strip())
    if not match:
        raise ValueError(f"unreadable cache size {text!r}")
    return int(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)]


def llc_bytes() -> int:
    """Size of the last-level (data or unified) cache of cpu0 from sysfs; 32 MiB if unknown."""
    best_level, best_size = -1, 32 * 2**20
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if level > best_level:
            best_level, best_size = level, size
    return best_size


def default_evict_mb() -> int:
    """max(2 x LLC, 64 MiB), capped at 1 GiB: big enough to flush the LLC, cheap enough to repeat."""
    return int(min(max(2 * llc_bytes() // 2**20, EVICT_FLOOR_MB), EVICT_CAP_MB))


# ---------------------------------------------------------------------------
# models and the numpy block
# ---------------------------------------------------------------------------


def build_models(workdir: Path) -> dict[str, Any]:
    """Write the standard-op model, the ``com.microsoft::MoE`` model and the weights to ``workdir``.

    The ORT model's weights are converted from the standard model's canonical ones, so all
    systems compute with bit-identical fp32 weights.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tests.zoo.standard import build_dense_batched_moe

    weights: dict[str, Any] = {}
    std = build_dense_batched_moe(
        hidden=HIDDEN,
        inter=FFN,
        experts=EXPERTS,
        k=TOP_K,
        activation="swiglu",
        normalize=True,
        expert_bias=False,
        router_bias=False,
        seed=WEIGHT_SEED,
        weights_out=weights,
    )
    w = weights["moe0"]
    canonical = {"router_w": w["router_w"], "gate": w["gate"], "up": w["up"], "down": w["down"]}
    np.savez(workdir / "weights.npz", **canonical)
    onnx.save(std, workdir / "standard.onnx")

    # fc1 [E, 2F, H]: row 2i is gate column i, row 2i+1 is up column i; fc2 [E, H, F].
    fc1 = np.empty((EXPERTS, 2 * FFN, HIDDEN), np.float32)
    fc1[:, 0::2, :] = w["gate"].transpose(0, 2, 1)
    fc1[:, 1::2, :] = w["up"].transpose(0, 2, 1)
    fc2 = np.ascontiguousarray(w["down"].transpose(0, 2, 1))
    nodes = [
        helper.make_node("MatMul", ["x", "router_w"], ["logits"], name="router"),
        helper.make_node(
            "MoE",
            ["x", "logits", "fc1", "", "fc2"],
            ["y"],
            name="moe",
            domain="com.microsoft",
            activation_type="swiglu",
            swiglu_fusion=1,
            k=TOP_K,
            normalize_routing_weights=1,
            activation_alpha=1.0,
            activation_beta=0.0,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "mixtral_block_ms_moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", HIDDEN])],
        [
            numpy_helper.from_array(w["router_w"], "router_w"),
            numpy_helper.from_array(fc1, "fc1"),
            numpy_helper.from_array(fc2, "fc2"),
        ],
    )
    ms = helper.make_model(
        graph,
        ir_version=10,
        producer_name="bench_mixtral_block",
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    onnx.checker.check_model(ms)
    onnx.save(ms, workdir / "ms_moe.onnx")
    return canonical


def numpy_block(x: np.ndarray, w: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The block in float64 numpy, written from its definition; returns (y, top-k expert ids).

    Raises if two router probabilities straddling the top-k cut are within 1e-6, where the
    systems' different tie-breaking could legitimately pick different experts.
    """
    x64 = x.astype(np.float64)
    logits = x64 @ w["router_w"].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")
    top = order[:, :TOP_K]
    ranked = np.take_along_axis(probs, order, -1)
    gap = ranked[:, TOP_K - 1] - ranked[:, TOP_K]
    if (gap < 1e-6).any():
        raise SystemExit("benchmark input has a near-tie in the router top-k; change INPUT_SEED")
    top_w = np.take_along_axis(probs, top, -1)
    top_w /= top_w.sum(-1, keepdims=True)
    y = np.zeros_like(x64)
    for e in np.unique(top):
        rows, slot = np.nonzero(top == e)
        xs = x64[rows]
        gate = xs @ w["gate"][e].astype(np.float64)
        up = xs @ w["up"][e].astype(np.float64)
        h = gate / (1.0 + np.exp(-gate)) * up
        y[rows] += top_w[rows, slot][:, None] * (h @ w["down"][e].astype(np.float64))
    return y, top


def bench_input(tokens: int) -> np.ndarray:
    """The benchmark input for ``tokens`` tokens (fixed seed, standard normal)."""
    return np.random.default_rng(INPUT_SEED + tokens).standard_normal((tokens, HIDDEN)).astype(np.float32)


def build_cloop(workdir: Path) -> str:
    """Compile the C loop reference into ``workdir``; return the compiler's version line.

    Built at benchmark time with the system ``g++`` for this very CPU (``-march=native``), so
    it is the best a plain native loop can do here without tuning.
    """
    cxx = shutil.which("g++")
    if cxx is None:
        raise SystemExit("g++ not found: the C loop reference system needs it (apt-get install g++)")
    cmd = [cxx, *CLOOP_FLAGS, "-o", str(workdir / CLOOP_LIBRARY), str(CLOOP_SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"building the C loop failed ({shlex.join(cmd)}):\n{done.stderr}")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    return version.splitlines()[0] if version else "g++"


class CLoop:
    """The C loop reference (``bench_mixtral_block_cloop.cpp``) loaded through ctypes."""

    def __init__(self, library: Path, weights: dict[str, np.ndarray], threads: int) -> None:
        """Load the library and hand it the weights once (it keeps its own copy)."""
        import ctypes

        self.lib = ctypes.CDLL(str(library))
        self.lib.cloop_create.restype = ctypes.c_void_p
        self.lib.cloop_create.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5
        self.lib.cloop_run.restype = None
        self.lib.cloop_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        arrays = [np.ascontiguousarray(weights[k], np.float32) for k in ("router_w", "gate", "up", "down")]
        self.handle = self.lib.cloop_create(
            *(a.ctypes.data for a in arrays), HIDDEN, FFN, EXPERTS, TOP_K, threads
        )
        if not self.handle:
            raise SystemExit("the C loop could not allocate its weights")
        self._buffers: list[tuple[np.ndarray, np.ndarray]] = []

    def make(self, x: np.ndarray) -> tuple[Fn, Callable[[], np.ndarray]]:
        """(timed call, output) for input ``x``; the output buffer is allocated here, once."""
        x = np.ascontiguousarray(x, np.float32)
        y = np.empty_like(x)
        run, handle, tokens = self.lib.cloop_run, self.handle, x.shape[0]
        x_ptr, y_ptr = x.ctypes.data, y.ctypes.data
        self._buffers.append((x, y))  # the raw pointers below must stay valid

        def call() -> None:
            run(handle, x_ptr, tokens, y_ptr)

        def output() -> np.ndarray:
            run(handle, x.ctypes.data, tokens, y.ctypes.data)
            return y.copy()

        return call, output


# ---------------------------------------------------------------------------
# child: load, verify, measure
# ---------------------------------------------------------------------------


class Evictor:
    """Flushes the caches by streaming a buffer larger than the last-level cache.

    The work is split over ``threads`` threads (numpy releases the GIL), so every core the
    benchmark uses is busy right up to the timed call, as it would be in a running model.
    With a single-threaded flush the other vCPU of this VM idles ~0.15 s and the timed call
    then also pays for waking it (measured: a cold 12 MiB 2-thread numpy read took 1.5 ms
    after a 1-thread flush, 1.0 ms after a 2-thread one).
    """

    def __init__(self, megabytes: int, threads: int, pool: ThreadPoolExecutor) -> None:
        """Allocate and touch the buffer (int64, so the write pass is a plain integer add)."""
        self.buffer = np.ones(megabytes * 2**20 // 8, np.int64)
        self.threads = threads
        self.pool = pool
        self._parts = np.array_split(self.buffer, threads)

    @staticmethod
    def _flush(part: np.ndarray) -> None:
        """Read+write every line, then read every line (one element per 64-byte line).

        The read-only pass leaves the cache holding clean unrelated lines, so the timed call
        does not also pay for writing back the flush's dirty lines.
        """
        np.add(part, 1, out=part)
        part[::8].sum()

    def __call__(self) -> None:
        """Flush, on ``threads`` threads."""
        if self.threads == 1:
            self._flush(self._parts[0])
        else:
            list(self.pool.map(self._flush, self._parts))


def read_bandwidth(buffer: np.ndarray, threads: int, repeats: int, pool: ThreadPoolExecutor) -> float:
    """Best-of-``repeats`` DRAM read bandwidth in bytes/s: ``threads`` numpy max-reductions in parallel."""
    parts = np.array_split(buffer.view(np.float64), threads)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        if threads == 1:
            parts[0].max()
        else:
            list(pool.map(np.max, parts))
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best


def make_reference_read(nbytes: int, threads: int, pool: ThreadPoolExecutor) -> Fn:
    """A call that reads ``nbytes`` (numpy max, one slice per thread): what a plain read costs.

    Timed like the systems, so "numpy read" shows how close to the streaming-bandwidth bound
    a cold read of just the selected experts' bytes gets on this machine.
    """
    parts = np.array_split(np.ones(nbytes // 8, np.float64), threads)
    if threads == 1:
        return parts[0].max
    return lambda: list(pool.map(np.max, parts))


def load_systems(
    workdir: Path,
    threads: int,
    tokens: Sequence[int],
    tvm_static: bool,
) -> tuple[dict[str, Callable[[np.ndarray], tuple[Fn, Callable[[], np.ndarray]]]], str]:
    """Every system, as ``make(x) -> (timed_call, output)``; plus how plain TVM was built.

    ``timed_call`` runs the block on pre-converted inputs and is all that is timed;
    ``output`` returns the last result as numpy (for verification only).
    """
    import onnx
    import onnxruntime as ort
    import tvm
    import tvm.relax.frontend.onnx  # noqa: F401  (registers relax.frontend.onnx)
    from tvm import relax


    moec = MoecModel(workdir / "moec")

    def make_moec(x: np.ndarray) -> tuple[Fn, Callable[[], np.ndarray]]:
        return moec.make(x)

    def ort_session(path: Path) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def make_ort(sess: Any) -> Callable[[np.ndarray], tuple[Fn, Callable[[], np.ndarray]]]:
        def make(x: np.ndarray) -> tuple[Fn, Callable[[], np.ndarray]]:
            feeds = {"x": x}
            return (lambda: sess.run(["y"], feeds)), (lambda: sess.run(["y"], feeds)[0])

        return make

    ort_moe, ort_std = ort_session(workdir / "ms_moe.onnx"), ort_session(workdir / "standard.onnx")

    target = tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": threads}
    )
    device = tvm.cpu()

    def plain_tvm(fixed_tokens: int | None) -> Any:
        model = onnx.load(str(workdir / "standard.onnx"))
        if fixed_tokens is not None:
            for value in (model.graph.input[0], model.graph.output[0]):
                value.type.tensor_type.shape.dim[0].dim_value = fixed_tokens
        mod = relax.frontend.onnx.from_onnx(model, keep_params_in_input=False)
        return relax.VirtualMachine(tvm.compile(mod, target), device)

    how = "one library, symbolic token dimension"
    vms: dict[int | None, Any] = {}
    if not tvm_static:
        try:
            vms[None] = plain_tvm(None)
        except Exception as err:  # TVM raises many types; fall back to static shapes
            log(
                f"plain TVM failed with a dynamic token dimension ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}); "
                "building one library per token count"
            )
            tvm_static = True
    if tvm_static:
        how = "one library per token count (fixed token dimension)"
        for t in tokens:
            vms[t] = plain_tvm(t)

    def make_tvm(x: np.ndarray) -> tuple[Fn, Callable[[], np.ndarray]]:
        vm = vms[None] if None in vms else vms[x.shape[0]]
        main = vm["main"]
        xt = tvm.runtime.tensor(x, device)
        return (lambda: main(xt)), (lambda: main(xt).numpy())

    cloop = CLoop(workdir / CLOOP_LIBRARY, dict(np.load(workdir / "weights.npz")), threads)

    systems = {
        "moec": make_moec,
        "c-loop": cloop.make,
        "ort-moe": make_ort(ort_moe),
        "ort-std": make_ort(ort_std),
        "tvm-onnx": make_tvm,
    }
    return systems, how


def verify(outputs: dict[str, np.ndarray], reference: np.ndarray) -> dict[str, float]:
    """Max abs errors against numpy and between every pair; raise above :data:`TOLERANCE`."""
    errors = {f"{name} vs numpy": float(np.abs(out - reference).max()) for name, out in outputs.items()}
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            errors[f"{a} vs {b}"] = float(np.abs(outputs[a] - outputs[b]).max())
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    if bad:
        raise SystemExit(f"outputs disagree beyond {TOLERANCE}: {bad}")
    return errors


def time_interleaved(
    calls: dict[str, Fn],
    mode: str,
    reps: int,
    inner: int,
    evict: Fn,
    settle_s: float,
    settle_cold: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call for each system, systems round-robin within each repetition, the order
    rotated every repetition.

    Cold: flush the caches, one timed call (after the settle pause too with ``settle_cold``:
    llama.cpp's OpenMP threads wait in a spinning barrier, which a core still held by another
    pool's spinning worker stalls for whole scheduler slices). Warm: settle, one untimed call,
    then ``inner`` timed calls, or one if the untimed call took over :data:`SLOW_CALL_S` (plain
    TVM at 16 tokens takes ~0.45 s a call).
    """
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            call = calls[name]
            if mode == "cold":
                if settle_cold:
                    time.sleep(settle_s)
                evict()
                start = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - start)
            else:
                time.sleep(settle_s)
                start = time.perf_counter()
                call()
                count = 1 if time.perf_counter() - start > SLOW_CALL_S else inner
                for _ in range(count):
                    start = time.perf_counter()
                    call()
                    samples[name].append(time.perf_counter() - start)
    return samples


def profile_moec(workdir: Path, x: np.ndarray, evict: Evictor, calls: int) -> dict[str, dict[str, float]]:
    """Mean ms per call of each function moec's VM calls (kernels and builtins), warm and cold:
    ``moec run --profile``'s measurement (:func:`moec.runtime.profile.profile_functions`, the
    Relax VM's instrument hook), in a fresh session so the timed runs above are untouched.
    Nested functions (a layer function enclosing its kernels) include their callees' time."""
    from moec.runtime.profile import profile_functions

    model = MoecModel(workdir / "moec")
    result: dict[str, dict[str, float]] = {}
    for mode in MODES:
        profile = profile_functions(model.session, model.feeds(x), calls, evict if mode == "cold" else None)
        result[mode] = {f.name: f.ms for f in profile.functions}
    return result


def run_child(args: argparse.Namespace) -> None:
    """Measure everything for one thread count (this process's ``TVM_NUM_THREADS``) into JSON."""
    threads = int(args.threads)
    if os.environ.get("TVM_NUM_THREADS") != str(threads):
        raise SystemExit("child must be started with TVM_NUM_THREADS equal to --threads")
    workdir = Path(args.workdir)
    tokens = [int(t) for t in args.tokens.split(",")]
    weights = dict(np.load(workdir / "weights.npz"))
    log(f"threads={threads}: loading systems")
    systems, tvm_how = load_systems(workdir, threads, tokens, args.tvm_static)
    pool = ThreadPoolExecutor(threads)
    evict_threads = args.evict_threads or threads
    evict = Evictor(
        args.evict_mb, evict_threads, pool if evict_threads == threads else ThreadPoolExecutor(evict_threads)
    )
    bw_repeats = 3 if args.quick else 5
    bandwidths = [read_bandwidth(evict.buffer, threads, bw_repeats, pool)]
    settle_s = 0.1 if threads > 1 else 0.005
    out: dict[str, Any] = {
        "threads": threads,
        "tvm_build": tvm_how,
        "evict_mb": args.evict_mb,
        "evict_threads": evict_threads,
        "settle_s": settle_s,
        "cases": {},
    }
    for t in tokens:
        x = bench_input(t)
        reference, top = numpy_block(x, weights)
        distinct = int(np.unique(top).size)
        made = {name: make(x) for name, make in systems.items()}
        outputs = {name: output() for name, (_, output) in made.items()}
        errors = verify(outputs, reference)
        log(
            f"threads={threads} tokens={t}: all systems match numpy "
            f"(max abs err {max(errors.values()):.2e}); timing"
        )
        calls = {name: call for name, (call, _) in made.items()}
        calls[READ] = make_reference_read(distinct * EXPERT_BYTES, threads, pool)
        calls[READ]()
        case: dict[str, Any] = {
            "distinct_experts": distinct,
            "experts": sorted(int(e) for e in np.unique(top)),
            "max_abs_error": max(errors.values()),
            "errors": errors,
            "times": {},
        }
        for mode in MODES:
            case["times"][mode] = time_interleaved(calls, mode, args.reps, args.inner, evict, settle_s)
        if args.profile:
            case["moec_profile"] = profile_moec(workdir, x, evict, 3 if args.quick else 10)
        out["cases"][str(t)] = case
    bandwidths.append(read_bandwidth(evict.buffer, threads, bw_repeats, pool))
    out["bandwidths"] = bandwidths
    out["bandwidth"] = max(bandwidths)
    Path(args.json_out).write_text(json.dumps(out))


# ---------------------------------------------------------------------------
# parent: prepare, run children, report
# ---------------------------------------------------------------------------


def stats(samples: Sequence[float]) -> tuple[float, float]:
    """(median, p90) in milliseconds."""
    ms = np.asarray(samples) * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 90))


def merge(children: list[dict[str, Any]]) -> dict[str, Any]:
    """One thread count's results from several child processes: samples pooled, best bandwidth."""
    first = children[0]
    merged: dict[str, Any] = {
        key: first[key] for key in ("threads", "tvm_build", "evict_mb", "evict_threads", "settle_s")
    }
    merged["processes"] = len(children)
    merged["bandwidths"] = [b for c in children for b in c["bandwidths"]]
    merged["bandwidth"] = max(merged["bandwidths"])
    merged["cases"] = {}
    for t, case in first["cases"].items():
        cases = [c["cases"][t] for c in children]
        out: dict[str, Any] = {
            "distinct_experts": case["distinct_experts"],
            "experts": case["experts"],
            "max_abs_error": max(c["max_abs_error"] for c in cases),
            "times": {},
            "process_medians": {},
        }
        for mode in MODES:
            out["times"][mode] = {
                name: [v for c in cases for v in c["times"][mode][name]] for name in case["times"][mode]
            }
            out["process_medians"][mode] = {
                name: [stats(c["times"][mode][name])[0] for c in cases] for name in case["times"][mode]
            }
        profiles = [c["moec_profile"] for c in cases if "moec_profile" in c]
        if profiles:
            out["moec_profile"] = profiles[0]
        merged["cases"][t] = out
    return merged


def floor_ms(case: dict[str, Any]) -> float:
    """The floor: the cold median of the numpy read of the case's routed experts' bytes."""
    return stats(case["times"]["cold"][READ])[0]


def bound_ms(result: dict[str, Any], case: dict[str, Any]) -> float:
    """Milliseconds to stream the case's distinct experts at the measured bandwidth."""
    return case["distinct_experts"] * EXPERT_BYTES / result["bandwidth"] * 1e3


def report(results: dict[int, dict[str, Any]], facts: dict[str, Any]) -> str:
    """The Markdown report: setup, medians with x-floor, ratios, moec's kernel breakdown, method."""
    lines: list[str] = []
    bw = ", ".join(
        f"{n} thread{'s' if n > 1 else ''}: {r['bandwidth'] / 1e9:.1f} GB/s"
        for n, r in sorted(results.items())
    )
    lines += [
        "## Mixtral-style MoE block (`benchmarks/bench_mixtral_block.py`)",
        "",
        f"Command (repo root): `{facts['command']}`  ",
        f"Run {facts['date']}, commit {facts['git']}, moec {facts['moec']}, TVM {facts['tvm']}, "
        f"onnxruntime {facts['ort']}, numpy {np.__version__}; total wall time {facts['wall_s']:.0f} s.",
        "",
        f"Machine: {facts['cpu']}, {facts['cores']} cores, LLC {facts['llc_mib']:.0f} MiB "
        f"(as sysfs reports it), DRAM read bandwidth {bw} (numpy, see Method). Shared: other "
        "processes used, per timing process, "
        + "; ".join(
            f"{n} thread(s): " + ", ".join(f"{c:.2f}" for c in cores)
            for n, cores in sorted(facts["others_cores"].items())
        )
        + " cores (from `/proc/stat` less the children's own CPU time; the script waits for a quiet "
        "machine before each timing process; 2-thread numbers suffer first when these are not ~0).",
        "",
        f"Block: hidden {HIDDEN}, FFN {FFN}, {EXPERTS} SwiGLU experts, top-{TOP_K}, softmax router "
        f"renormalised over the top-{TOP_K}, fp32, no biases; {EXPERT_BYTES / 2**20:.0f} MiB per expert, "
        f"{EXPERTS * EXPERT_BYTES / 2**20:.0f} MiB in all; the same weights in every system. "
        f"Input: standard normal, seed {INPUT_SEED}+tokens. Before timing, every system was checked "
        f"against a float64 numpy computation of the block and against the others "
        f"(max abs error ≤ {TOLERANCE:g}; largest seen "
        f"{max(c['max_abs_error'] for r in results.values() for c in r['cases'].values()):.1e}).",
        "",
        "Floor = the cold median of *numpy read*, a plain numpy read of exactly the bytes of the "
        "distinct experts the input routes to, timed the same way in the same process: what merely "
        "reading the selected experts costs here (at 2 threads it includes a Python thread-pool "
        "hand-off). Cells: median ms (× floor). Bound = those bytes ÷ the DRAM read bandwidth "
        "measured at that thread count, for reference.",
        "",
    ]
    shown = [READ, *SYSTEMS]
    labels = {READ: "numpy read", **SYSTEM_LABELS}
    header = (
        "| tokens | threads | cache | experts hit | bound ms | " + " | ".join(labels[s] for s in shown) + " |"
    )
    sep = "|" + "---|" * (5 + len(shown))
    rows, p90_rows, ratio_rows, spread = [header, sep], [header, sep], [], []
    for n, res in sorted(results.items()):
        for t_str, case in res["cases"].items():
            bound = bound_ms(res, case)
            floor = floor_ms(case)
            for mode in MODES:
                med = {s: stats(case["times"][mode][s]) for s in shown}
                lead = f"| {t_str} | {n} | {mode} | {case['distinct_experts']} | {bound:.3f} | "
                rows.append(
                    lead + " | ".join(f"{med[s][0]:.3f} ({med[s][0] / floor:.2f}×)" for s in shown) + " |"
                )
                p90_rows.append(lead + " | ".join(f"{med[s][1]:.3f}" for s in shown) + " |")
                ratio_rows.append(
                    f"| {t_str} | {n} | {mode} | "
                    + " | ".join(f"{med[s][0] / med['moec'][0]:.2f}×" for s in SYSTEMS if s != "moec")
                    + " |"
                )
                if res["processes"] > 1:
                    per = case["process_medians"][mode]
                    spread.append(
                        f"| {t_str} | {n} | {mode} | "
                        + " | ".join("–".join(f"{v:.3f}" for v in (min(per[s]), max(per[s]))) for s in shown)
                        + " |"
                    )
    lines += [
        "Median latency, ms (× floor):",
        "",
        *rows,
        "",
        "p90 latency, ms:",
        "",
        *p90_rows,
        "",
        "moec speed-up (other system's median ÷ moec's median; > 1 means moec is faster):",
        "",
        "| tokens | threads | cache | "
        + " | ".join(f"vs {SYSTEM_LABELS[s]}" for s in SYSTEMS if s != "moec")
        + " |",
        "|" + "---|" * (3 + len(SYSTEMS) - 1),
        *ratio_rows,
        "",
    ]
    if spread:
        procs = next(iter(results.values()))["processes"]
        lines += [
            f"Spread: lowest–highest of the {procs} processes' medians, ms (absolute numbers "
            "move between processes on this shared VM):",
            "",
            "| tokens | threads | cache | " + " | ".join(labels[s] for s in shown) + " |",
            "|" + "---|" * (3 + len(shown)),
            *spread,
            "",
        ]

    lines += ["Issue targets for moec, cold (× floor: ≤ 1.10 at 1 token, ≤ 1.30 at 16):", ""]
    for n, res in sorted(results.items()):
        for t_str, target in (("1", 1.10), ("16", 1.30)):
            case = res["cases"].get(t_str)
            if case is None:
                continue
            floor = floor_ms(case)
            cold = case["times"]["cold"]
            got, cloop_x, ort_x = (stats(cold[s])[0] / floor for s in ("moec", "c-loop", "ort-moe"))
            verdict = "met" if got <= target else "NOT met"
            lines.append(
                f"- {n} thread(s), {t_str} token(s): target ≤ {target}× floor, measured {got:.2f}× "
                f"({verdict}); the C loop {cloop_x:.2f}×; ORT's MoE op {ort_x:.2f}×."
            )
    if 1 in results and 2 in results and "16" in results[1]["cases"] and "16" in results[2]["cases"]:
        one, two = (stats(results[n]["cases"]["16"]["times"]["cold"]["moec"])[0] for n in (1, 2))
        verdict = "met" if one / two >= 1.3 else "NOT met"
        speedup = f"2 threads {one / two:.2f}× faster than 1"
        lines.append(f"- 16 tokens, cold: {speedup} (target ≥ 1.3×: {verdict}).")
    lines.append("")

    profiles = [
        (n, t, c["moec_profile"])
        for n, r in sorted(results.items())
        for t, c in r["cases"].items()
        if "moec_profile" in c
    ]
    if profiles:
        lines += [
            "moec, time per VM-called function (Relax VM instrument hook around every call, "
            "separate runs after the timing, mean ms per block call; the hook's Python "
            "callback adds a few µs per call, more when cold; a layer function, where one is "
            "called, encloses its kernels (moec now inlines them into main); entries under "
            "0.005 ms omitted):",
            "",
        ]
        for n, t, prof in profiles:
            for mode in MODES:
                items = ", ".join(f"{k} {v:.3f}" for k, v in prof[mode].items() if v >= 0.005)
                lines.append(f"- {t} token(s), {n} thread(s), {mode}: {items}")
        lines.append("")

    first = next(iter(results.values()))
    lines += [
        "Method:",
        "",
        "- Threads: separate subprocesses per thread count (TVM reads `TVM_NUM_THREADS` when its "
        "pool starts); onnxruntime `intra_op_num_threads` = the same count, `inter_op_num_threads` "
        '= 1. moec and plain TVM timed as `vm["main"](x, *params)` on pre-converted '
        '`tvm.runtime.Tensor`s, onnxruntime as `session.run(["y"], feeds)`.',
        f"- Plain TVM: `relax.frontend.onnx.from_onnx(model, keep_params_in_input=False)` + "
        f"`tvm.compile` for `llvm -mcpu=<host> num-cores=<threads>`, default pipeline; "
        f'{first["tvm_build"]}. moec: `compile_model(model, out, CompileOptions(target="host"))` of the '
        f"same ONNX file "
        f"(the dense batched-MatMul export pattern; moec detected 1 MoE layer).",
        f"- C loop: `benchmarks/bench_mixtral_block_cloop.cpp` built with `g++ "
        f"{' '.join(CLOOP_FLAGS)}` ({facts['cxx']}), called through ctypes with pointers to "
        "pre-allocated numpy input/output arrays; it copies the weights once into output-row-major "
        "matrices in huge pages; routing on the calling thread, then two fork-joins on a pthread "
        "pool of the thread count (workers spin with `sched_yield`, then sleep, like TVM's): "
        "gate/up rows split evenly over the threads, then whole output columns per thread; up to "
        "4 tokens per pass over a weight row. (Not OpenMP: libgomp's non-yielding spin made a "
        "2-thread call 50× slower whenever another process held a core of this shared VM.)",
        f"- Repetitions: {facts['reps_total']} per case, in {first['processes']} processes per "
        f"thread count ({facts['reps_per_process']} each; processes alternate between thread "
        f"counts), samples pooled. Each repetition runs every system once, round-robin, starting "
        f"one system later each repetition, so noise hits all systems alike.",
        f"- Warm: per repetition and system, a settle pause ({first['settle_s'] * 1e3:.0f} ms at "
        f"1 thread, 100 ms at more: TVM's and onnxruntime's pools spin ~60 / ~25 ms after a call "
        f"and would steal a core from the next system), one untimed call, then {facts['inner']} "
        f"timed back-to-back calls (1 if the untimed call took over {SLOW_CALL_S * 1e3:.0f} ms).",
        f"- Cold: before every timed call, a {facts['evict_mb']} MiB buffer (max(2 × LLC, 64 MiB), "
        f"capped at 1 GiB) is read+written, then read again so the cache holds clean unrelated "
        f"lines; the flush runs on as many threads as the benchmark "
        f"({'as here' if facts['evict_threads'] == 0 else str(facts['evict_threads']) + ' thread(s)'})"
        f", so no core idles before the timed call. Code, TLB and runtime state are cold too.",
        "- Bandwidth: numpy `max` over that buffer (float64 view), one contiguous slice per thread "
        "on a thread pool (numpy releases the GIL), best of several, before and after the timing "
        "in each process; the highest is used. `max`, not `sum`: numpy's float32 `sum` is "
        "compute-bound here (~19 GB/s even from L2), `max` is not (~70 GB/s from L2).",
        "",
    ]
    return "\n".join(lines)


def run_parent(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Build models and the moec artifact, run the child processes, print and save the report."""
    import onnxruntime
    import tvm

    import moec
    from moec.compiler.compile import compile_model
    from moec.frontend.importer import import_model
    from moec.frontend.loader import load_model
    from moec.options import CompileOptions

    wall = time.perf_counter()
    thread_counts = [int(n) for n in args.threads.split(",")]
    reps_per_process = -(-args.reps // args.procs)
    with tempfile.TemporaryDirectory(prefix="moec-bench-") as tmp:
        workdir = Path(tmp)
        log(f"building models in {workdir}")
        build_models(workdir)
        cxx_version = build_cloop(workdir)
        log(f"built the C loop reference with {cxx_version}")
        blocks = import_model(load_model(workdir / "standard.onnx")).blocks
        if len(blocks) != 1:
            raise SystemExit(f"moec found {len(blocks)} MoE layers in the standard model, expected 1")
        log(f"moec detected 1 MoE layer: {json.dumps(blocks[0].layer.describe())}")
        compile_model(
            workdir / "standard.onnx",
            workdir / "moec",
            CompileOptions(target="host", force=True),
            log=lambda m: log(f"moec: {m}"),
        )
        common = ["--workdir", str(workdir), "--tokens", args.tokens, "--reps", str(reps_per_process)]
        common += ["--inner", str(args.inner), "--evict-mb", str(args.evict_mb)]
        common += ["--evict-threads", str(args.evict_threads)]
        common += ["--quick"] if args.quick else []
        common += ["--tvm-static"] if args.tvm_static else []

        def child_args(proc: int, _threads: int) -> list[str]:
            return [*common, *(["--no-profile"] if args.no_profile or proc > 0 else [])]

        children, others = run_timing_children(
            Path(__file__).resolve(), workdir, thread_counts, args.procs, args.wait_quiet, child_args
        )
    results = {n: merge(c) for n, c in children.items()}
    facts = {
        "command": " ".join(
            [".venv/bin/python", "benchmarks/bench_mixtral_block.py", *map(shlex.quote, argv)]
        ),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "git": git_revision(),
        "moec": moec.__version__,
        "tvm": tvm.__version__,
        "ort": onnxruntime.__version__,
        "cxx": cxx_version,
        "cpu": cpu_model(),
        "others_cores": dict(others),
        "cores": os.cpu_count(),
        "llc_mib": llc_bytes() / 2**20,
        "evict_mb": args.evict_mb,
        "evict_threads": args.evict_threads,
        "reps_total": reps_per_process * args.procs,
        "reps_per_process": reps_per_process,
        "inner": args.inner,
        "wall_s": time.perf_counter() - wall,
    }
    publish(report(results, facts), args.markdown, MD_NAME)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers the repetition defaults."""
    parser = timing_parser(__doc__, default_evict_mb())
    parser.add_argument(
        "--evict-threads",
        type=int,
        default=0,
        help="threads that flush the cache (default 0: as many as the benchmark uses)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip moec's per-function breakdown")
    parser.add_argument(
        "--tvm-static", action="store_true", help="build plain TVM with a fixed token count per case"
    )
    args = timing_defaults(parser, parser.parse_args(argv))
    args.profile = not args.no_profile
    if args.evict_threads < 0:
        parser.error("--evict-threads must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parent by default, one thread count's measurements with ``--child``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        run_child(args)
    else:
        run_parent(args, argv)


if __name__ == "__main__":
    main()
