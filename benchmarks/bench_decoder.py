#!/usr/bin/env python
"""A whole MoE decoder: moec against onnxruntime and llama.cpp, fp32 and narrower weights, latency
and peak memory.

What: a 4-layer Mixtral-style decoder, ``transformers.MixtralForCausalLM`` with hidden 512, FFN
1024, 8 experts, top-2, 8 attention heads (8 KV heads), vocab 512, fp32, random weights with a
fixed seed (``fixtures/make_fixtures.py``'s ``randomise``: enough spread that the routers are no
near-ties), 210 MiB of weights. Input ``input_ids`` ``[1, seq]`` → ``logits`` ``[1, seq, 512]``, no
KV cache: the processing of a 1- or a 16-token prompt. The same weights in every system:

``moec``         ``torch.onnx.export(dynamo=True)`` of the model with
                 ``config._experts_implementation = "batched_mm"`` and a dynamic sequence axis
                 (as ``fixtures/make_fixtures.py`` exports its decoders), compiled by the
                 ``moec compile model.onnx --target host`` command line, loaded with moec's
                 runtime (``ArtifactSession``) and timed as a call of the entry point it picks:
                 ``main_one_token`` for a 1-token prompt, ``main`` otherwise.
``moec-int8``    the same ONNX file compiled with ``--precision int8``: every MoE expert's matrices
                 stored int8 (symmetric, one fp32 scale per output row, widened and multiplied in
                 fp32); attention, router, embeddings and LM head stay fp32.
``moec-int8-all-g32`` ``moec-int8-all`` with ``--int8-group 32``: a scale per 32 inputs of each output
                 (as Q8_0's blocks of 32), every matrix.
``moec-int8-all`` ``--precision int8 --dense-precision int8 --router-precision int8``: the attention
                 projections, routers and LM head int8 too (one fp32 scale per output column), as
                 Q8_0 quantizes every matrix; embeddings and norms stay fp32.
``moec-fp16``    ``--precision fp16``: the experts' matrices fp16.
``moec-int8-dot`` ``--precision int8-dot``: the experts' int8 weights multiplied in INT8 (each
                 kernel's input rows quantized per row, VNNI dot products); the rest fp32.
``moec-int8-dot-all`` ``--precision int8-dot --dense-precision int8 --router-precision int8``: the
                 experts W8A8, the attention projections, routers and LM head int8 (weight-only).
``onnxruntime``  the same ONNX file, ``intra_op_num_threads`` = the thread count,
                 ``inter_op_num_threads`` = 1.
``llama.cpp``    llama-cpp-python (built from source for this CPU, ``-DGGML_NATIVE=ON``) on an F32
                 GGUF made by ``convert_hf_to_gguf.py --outtype f32`` from the model's
                 ``save_pretrained`` folder (plus a tiny sentencepiece tokenizer trained here: the
                 converter needs one; the benchmark feeds token ids). Timed: ``llama_memory_clear``
                 (metadata only: an empty KV cache for every call) + ``llama_decode`` of the prompt's
                 tokens, logits requested for every token; ``n_threads`` = ``n_threads_batch`` =
                 the thread count. Two contexts on the one loaded model: ``llama.cpp`` with flash
                 attention off and an F32 KV cache (fp32 throughout, like the others: its logits
                 match PyTorch's to ~1e-5), ``llama.cpp-fa`` with llama.cpp's defaults (flash
                 attention on for the CPU, F16 KV cache: ~1e-3..6e-3 off, as its CPU flash
                 attention rounds to fp16).
``llama.cpp-q8_0`` / ``llama.cpp-f16``  GGUFs made by ``--outtype q8_0`` / ``--outtype f16`` from the
                 same folder (every matrix narrower, embeddings and LM head included; norms and the
                 router stay F32), each in a context like ``llama.cpp``'s (flash attention off, F32
                 KV cache). ``--systems`` picks a subset of all these (moec always among them).
``floor``        not a system: a numpy streaming read (``max``) of exactly the bytes the call must
                 read, one per weight format: the prompt's embedding rows, every layer's attention,
                 norm and router weights, the distinct experts the prompt routes to in each layer
                 (counted by PyTorch's routers; by its oracle's for a narrower moec), the final norm
                 and the LM head, each as the system stores it: fp32; for a narrower moec fp32 but
                 the experts, whose stored bytes (matrices, scales, biases) its manifest's
                 ``layers[i]["plan"]`` gives; for a GGUF its tensors' sizes (gguf-py's
                 ``GGUFReader``, cached as ``model-<type>.gguf.json``; Q8_0 = 34 bytes per 32
                 weights), the routed experts' slices of the ``*_exps`` tensors. Timed like the
                 systems; each system's latency is reported ÷ its own floor.

How:

* Correctness first: every system's logits are compared with PyTorch's (saved by the export step)
  and with each other at every token count; moec and onnxruntime must be within 1e-3 (max abs),
  llama.cpp's error is reported (and flagged above 1e-3, as the fp32 systems' are). The narrower
  systems cannot match PyTorch that closely: their max abs error and top-1 agreement (prompt
  positions whose arg-max logit is PyTorch's) are reported, and each narrower moec must be within
  1e-3 of moec's numpy oracle of its stored weights (``moec.reference.stored``, the evaluator
  ``run_stored_reference`` runs, with ``moec.verify.layer_plans`` and ``dense_storage`` of its
  manifest; one process per artifact, ~1 min each, side by side before the timing;
  ``--no-oracle`` skips them).
* One child process per thread count (TVM reads ``TVM_NUM_THREADS`` once); moec, onnxruntime,
  llama.cpp (imported from its own venv's site-packages, appended to ``sys.path``) and the floor
  run in the same process, interleaved: each repetition runs every system once, the order rotated
  every repetition (as ``bench_mixtral_block.time_interleaved``), ``--procs`` processes per thread
  count, samples pooled.
* Before every system's turn a settle pause (5 ms at 1 thread, 100 ms at more): the thread pools spin
  after a call, and a spinning pool would steal a core from the next system (llama.cpp's OpenMP
  barrier suffers most: a 2-thread call took 0.6 s instead of 3 ms while another process held a core).
* ``cold``: then the caches are flushed (``bench_mixtral_block.Evictor``: a buffer of max(2 × LLC,
  64 MiB) read+written then read, on as many threads as the benchmark) and one call is timed;
  ``warm``: one untimed call, then ``--inner`` timed calls back to back.
* Where moec's time goes (``moec`` and ``moec-int8``): the Relax VM's instrument hook around every
  VM call (as ``bench_mixtral_block.profile_moec``), 1 thread, after the timing.
* Peak RSS: per system a fresh process that imports it (baseline ``ru_maxrss``), loads the model,
  runs one 16-token call, and reports ``ru_maxrss`` and the RSS after the call. ``ru_maxrss``
  survives fork + exec (a child starts from its parent's high-water mark), so the parent imports
  neither TVM nor onnxruntime until every child is done. ``moec-runner`` (the C++ runner a board
  runs, built as ``moec run`` builds it) is measured on every moec artifact without Python: one fresh
  process runs the 16-token call (``--threads 1``), its ``ru_maxrss`` read by ``wait4``; its
  baseline is a runner that only starts (``--help``: TVM's runtime libraries loaded). Both are
  started by a small launcher (a bare Python that forks: a forked child starts from the
  launcher's ~10 MiB high-water mark, not the parent's).

Environments (created by the script when missing; progress lines on stderr)::

    ~/.cache/moec-bench/export-venv   python3.11 -m venv; pip install -r fixtures/requirements-export.txt
                                      sentencepiece==<benchmarks/requirements-decoder.txt>
    ~/.cache/moec-bench/llama-venv    python3.11 -m venv; pip install the wheel built once by
                                      CMAKE_ARGS="-DGGML_NATIVE=ON" pip wheel --no-deps from the
                                      llama-cpp-python sdist (pinned there; ~9-12 min on 2 cores)
    ~/.cache/moec-bench/sdist, wheels, llama-cpp-python-<v>/ (the unpacked sdist: convert_hf_to_gguf.py)
    ~/.cache/moec-bench/decoder-<key>/  the exported model, its references, HF folder and GGUFs (F32;
                                      Q8_0 and F16 converted the first time their systems run;
                                      reused while the model spec and the export pins are unchanged)

(``$MOEC_BENCH_CACHE`` moves that folder.) The benchmark itself runs with the project venv; moec is
compiled afresh on every run from the working tree (once per moec system, ~20 s each).

Run from the repository root::

    .venv/bin/python benchmarks/bench_decoder.py                # full run, updates BENCHMARKS.md
    .venv/bin/python benchmarks/bench_decoder.py --quick        # smoke run, no BENCHMARKS.md
    .venv/bin/python benchmarks/bench_decoder.py --threads 1 --tokens 1 --reps 10 --no-markdown
    .venv/bin/python benchmarks/bench_decoder.py --systems moec,moec-int8,llama.cpp-q8_0 --quick
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bench_mixtral_block import Evictor, default_evict_mb, make_reference_read, stats, time_interleaved
from common import (
    REPO,
    MoecModel,
    add_wait_quiet_option,
    busy_and_children_s,
    cpu_model,
    git_revision,
    log,
    others_cores,
    repetition_defaults,
    run_timing_children,
    write_markdown,
)

# ── the model ───────────────────────────────────────────────────────────────────

MODEL = dict(
    vocab_size=512,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
WEIGHT_SEED = 0
PROMPT_SEED = 1234
MAX_TOKENS = 32
"""References are saved for every prompt length 1..MAX_TOKENS (``--tokens`` picks among them)."""
TRACE_TOKENS = 16
"""The sequence length the exporter traces (dynamic; not 1, which torch.export specialises)."""
EXPORT_FORMAT = 1
"""Bump when the export step's outputs change, so cached models are remade."""
TOLERANCE = 1e-3
"""Max abs logit error allowed between moec, onnxruntime and PyTorch."""
SYSTEMS = (
    "moec",
    "moec-int8",
    "moec-int8-all",
    "moec-int8-all-g32",
    "moec-int8-dot",
    "moec-int8-dot-all",
    "moec-fp16",
    "onnxruntime",
    "llama.cpp",
    "llama.cpp-fa",
    "llama.cpp-q8_0",
    "llama.cpp-f16",
)
"""Every system, in table order. ``llama.cpp``: flash attention off, F32 KV cache (fp32 throughout,
like the others); ``llama.cpp-fa``: llama.cpp's own defaults (flash attention on for the CPU, F16 KV
cache); ``llama.cpp-q8_0`` / ``-f16``: ``llama.cpp``'s context settings on a Q8_0 / F16 GGUF."""
MOEC_FLAGS = {
    "moec": [],
    "moec-int8": ["--precision", "int8"],
    "moec-int8-all-g32": [
        "--precision",
        "int8",
        "--dense-precision",
        "int8",
        "--router-precision",
        "int8",
        "--int8-group",
        "32",
    ],  # fmt: skip
    "moec-int8-all": ["--precision", "int8", "--dense-precision", "int8", "--router-precision", "int8"],
    "moec-fp16": ["--precision", "fp16"],
    "moec-int8-dot": ["--precision", "int8-dot"],
    "moec-int8-dot-all": [
        "--precision",
        "int8-dot",
        "--dense-precision",
        "int8",
        "--router-precision",
        "int8",
    ],
}
"""The moec systems: ``moec compile model.onnx --target host`` plus these flags."""
GGUF_TYPES = {"llama.cpp": "f32", "llama.cpp-fa": "f32", "llama.cpp-q8_0": "q8_0", "llama.cpp-f16": "f16"}
"""The llama.cpp systems: the ``convert_hf_to_gguf.py --outtype`` of the GGUF each loads."""
EXACT_ATTENTION = ("llama.cpp", "llama.cpp-q8_0", "llama.cpp-f16")
"""llama.cpp contexts with flash attention off and an F32 KV cache (the others: llama.cpp's defaults)."""
WEIGHTS = {
    "moec": "fp32",
    "moec-int8": "experts int8, fp32 scale per row; rest fp32",
    "moec-int8-all-g32": "every matrix int8, fp32 scale per 32 inputs of each output",
    "moec-int8-all": "every matrix int8 (experts: scale per row; attention, routers, LM head: per column)",
    "moec-fp16": "experts fp16; rest fp32",
    "moec-int8-dot": "experts int8 multiplied in INT8 (W8A8); rest fp32",
    "moec-int8-dot-all": "experts int8 W8A8; attention, routers, LM head int8 (W8A32)",
    "onnxruntime": "fp32",
    "llama.cpp": "F32",
    "llama.cpp-fa": "F32",
    "llama.cpp-q8_0": "Q8_0 (blocks of 32, fp16 scale)",
    "llama.cpp-f16": "F16",
}
"""How each system stores its weights (the GGUFs' exceptions, e.g. F32 norms, are listed by the report)."""
RUNNER_ROW = "moec-runner"
"""The peak-RSS row suffix of moec's C++ runner (not timed here: ``moec run`` prints its latency):
``moec-runner`` for ``moec``'s artifact, ``moec-int8-runner`` for ``moec-int8``'s, etc."""
LABELS = {
    "moec": "moec",
    "moec-int8": "moec INT8",
    "moec-int8-all-g32": "moec INT8 all g32",
    "moec-int8-all": "moec INT8 all",
    "moec-fp16": "moec FP16",
    "moec-int8-dot": "moec INT8-dot",
    "moec-int8-dot-all": "moec INT8-dot all",
    "onnxruntime": "onnxruntime",
    "llama.cpp": "llama.cpp (fp32 attention)",
    "llama.cpp-fa": "llama.cpp (its defaults: flash attn, F16 KV)",
    "llama.cpp-q8_0": "llama.cpp Q8_0",
    "llama.cpp-f16": "llama.cpp F16",
}
STRICT = ("moec", "onnxruntime")
"""Systems whose logits must match PyTorch's within TOLERANCE."""
FP32 = ("moec", "onnxruntime", "llama.cpp", "llama.cpp-fa")
"""Systems with fp32 weights: flagged in the report when over TOLERANCE off PyTorch (the narrower
ones cannot match PyTorch that closely: their errors and top-1 agreement are reported)."""
QUANTIZED_MOEC = (
    "moec-int8",
    "moec-int8-all-g32",
    "moec-int8-all",
    "moec-int8-dot",
    "moec-int8-dot-all",
    "moec-fp16",
)
"""Checked against moec's numpy oracle of the stored weights (``run_stored_reference``), within
TOLERANCE (INT8 arithmetic: :data:`INT8_ARITHMETIC`), unless ``--no-oracle``."""
INT8_ARITHMETIC = ("moec-int8-dot", "moec-int8-dot-all")
"""Systems multiplying in INT8: held to their oracle within 1% of its largest logit (the documented
bound, ``moec.kernels.formats.REDUCED_ARITHMETIC_TOLERANCE``: an activation may round to the
neighbouring INT8 level) or TOLERANCE, whichever is larger."""
PROFILED = ("moec", "moec-int8", "moec-int8-all")
"""moec systems whose per-function breakdown is reported."""
PAIRS = (
    ("moec-int8", "llama.cpp-q8_0"),
    ("moec-int8-all-g32", "llama.cpp-q8_0"),
    ("moec-int8-all", "llama.cpp-q8_0"),
    ("moec-int8-dot", "llama.cpp-q8_0"),
    ("moec-int8-dot-all", "llama.cpp-q8_0"),
    ("moec-fp16", "llama.cpp-f16"),
)
"""Head-to-head comparisons at the same weight width (llama.cpp's median ÷ moec's)."""
TARGET_SPEEDUP = 2.5
"""The issue's targets for all-INT8 moec: ≥ 2.5× faster than fp32 moec at 1 token from DRAM (cold),"""
TARGET_FLOOR = 1.2
"""within 1.2× of its own floor, and no slower than llama.cpp Q8_0 at every prompt length."""
FLOOR = "floor"
"""The fp32 floor (the bytes of the fp32 weights a call reads); the others are ``floor <format>``."""
MODES = ("cold", "warm")
MD_NAME = "bench_decoder"
PROFILE_TOP = 8
GGML_TYPE_F32 = 0
LLAMA_FLASH_ATTN_TYPE_DISABLED = 0

# ── where things live ───────────────────────────────────────────────────────────

CACHE = Path(os.environ.get("MOEC_BENCH_CACHE", "~/.cache/moec-bench")).expanduser()
EXPORT_VENV = CACHE / "export-venv"
LLAMA_VENV = CACHE / "llama-venv"
EXPORT_REQUIREMENTS = REPO / "fixtures" / "requirements-export.txt"
DECODER_REQUIREMENTS = Path(__file__).resolve().with_name("requirements-decoder.txt")
BASE_PYTHON = "python3.11"
LLAMA_CMAKE_ARGS = "-DGGML_NATIVE=ON"
STAMP = "moec-bench.stamp"

Fn = Callable[[], object]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def site_packages(venv: Path) -> Path:
    found = sorted((venv / "lib").glob("python3*/site-packages"))
    if not found:
        raise SystemExit(f"{venv} has no site-packages")
    return found[0]


# ── environments ────────────────────────────────────────────────────────────────


def pins() -> dict[str, str]:
    """``name → name==version`` of ``requirements-decoder.txt``."""
    out = {}
    for line in DECODER_REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out[line.split("==")[0].strip().lower()] = line
    return out


def run_logged(
    cmd: Sequence[str | Path], name: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> None:
    """Run ``cmd`` with its output in ``CACHE/logs/NAME.log``; on failure end with its last lines."""
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{name}.log"
    with path.open("w") as out:
        done = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if done.returncode:
        tail = "\n".join(path.read_text().splitlines()[-25:])
        raise SystemExit(f"{shlex.join(str(c) for c in cmd)} failed (rc {done.returncode}), {path}:\n{tail}")


def make_venv(venv: Path, wanted: str, install: Callable[[Path], None]) -> None:
    """Create ``venv`` (or recreate it when its stamp differs from ``wanted``) and ``install`` into it."""
    stamp = venv / STAMP
    if stamp.exists() and stamp.read_text() == wanted and venv_python(venv).exists():
        return
    base = shutil.which(BASE_PYTHON)
    if base is None:
        raise SystemExit(f"{BASE_PYTHON} not found: the export and llama.cpp environments need it")
    if venv.exists():
        shutil.rmtree(venv)
    log(f"creating {venv}")
    run_logged([base, "-m", "venv", venv], f"{venv.name}-create")
    install(venv)
    stamp.write_text(wanted)
    log(f"{venv} ready")


def ensure_export_venv() -> Path:
    """The export-side venv (torch, transformers, onnxscript, sentencepiece); its python."""
    spm = pins()["sentencepiece"]
    wanted = EXPORT_REQUIREMENTS.read_text() + spm

    def install(venv: Path) -> None:
        log(f"installing {EXPORT_REQUIREMENTS.relative_to(REPO)} and {spm} (a few minutes)")
        pip = [venv_python(venv), "-m", "pip", "install", "-r", EXPORT_REQUIREMENTS, spm]
        run_logged(pip, "export-venv-install")

    make_venv(EXPORT_VENV, wanted, install)
    return venv_python(EXPORT_VENV)


def llama_version() -> str:
    return pins()["llama-cpp-python"].split("==")[1]


def llama_source() -> Path:
    """The unpacked llama-cpp-python sdist (its ``vendor/llama.cpp`` holds convert_hf_to_gguf.py)."""
    version = llama_version()
    sdist = CACHE / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        log(f"downloading the llama-cpp-python {version} source distribution")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        run_logged([*cmd, f"llama-cpp-python=={version}", "-d", sdist.parent], "llama-download")
    source = CACHE / f"llama-cpp-python-{version}"
    if not (source / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(CACHE / "unpack", filter="data")
        shutil.rmtree(source, ignore_errors=True)
        (CACHE / "unpack" / f"llama_cpp_python-{version}").rename(source)
        shutil.rmtree(CACHE / "unpack", ignore_errors=True)
    return source


def llama_wheel() -> Path:
    """The llama-cpp-python wheel built from source for this CPU (built once, ~12 min on 2 cores)."""
    version = llama_version()
    found = sorted((CACHE / "wheels").glob(f"llama_cpp_python-{version}-*.whl"))
    if found:
        return found[0]
    llama_source()  # downloads the sdist
    sdist = CACHE / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    log(
        f"building llama-cpp-python {version} from source, CMAKE_ARGS={LLAMA_CMAKE_ARGS} (~12 min on 2 cores)"
    )
    started = time.time()
    env = dict(os.environ, CMAKE_ARGS=LLAMA_CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", CACHE / "wheels", sdist]
    run_logged(cmd, "llama-build", env=env)
    seconds = time.time() - started
    record = {"version": version, "seconds": round(seconds), "cmake_args": LLAMA_CMAKE_ARGS}
    record["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    (CACHE / "llama-build.json").write_text(json.dumps(record))
    log(f"built llama-cpp-python in {seconds / 60:.1f} min")
    return sorted((CACHE / "wheels").glob(f"llama_cpp_python-{version}-*.whl"))[0]


def ensure_llama_venv() -> Path:
    """The venv holding llama-cpp-python (and its dependencies); its site-packages."""
    wheel = llama_wheel()

    def install(venv: Path) -> None:
        log(f"installing {wheel.name}")
        run_logged([venv_python(venv), "-m", "pip", "install", wheel], "llama-venv-install")

    make_venv(LLAMA_VENV, wheel.name, install)
    return site_packages(LLAMA_VENV)


def llama_build_facts() -> str:
    path = CACHE / "llama-build.json"
    if not path.exists():
        return "build time not recorded"
    record = json.loads(path.read_text())
    return f"built {record['date']} in {record['seconds'] / 60:.1f} min"


# ── the export step (runs in the export venv) ───────────────────────────────────


def model_key() -> str:
    """What the cached model depends on: the spec, the seeds and the export environment."""
    spec = dict(model=MODEL, seeds=[WEIGHT_SEED, PROMPT_SEED], tokens=[MAX_TOKENS, TRACE_TOKENS])
    spec["format"] = EXPORT_FORMAT
    spec["export"] = EXPORT_REQUIREMENTS.read_text()
    spec["pins"] = pins()
    spec["make_fixtures"] = (REPO / "fixtures" / "make_fixtures.py").read_text()
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def prompt(tokens: int) -> np.ndarray:
    """The benchmark prompt of ``tokens`` tokens: the first tokens of one fixed random sequence."""
    ids = np.random.default_rng(PROMPT_SEED).integers(0, MODEL["vocab_size"], MAX_TOKENS)
    return ids[:tokens].astype(np.int64)[None, :]


def tokenizer_text() -> list[str]:
    """A few hundred lines of text to train the tokenizer on: this repository's Markdown files."""
    lines: list[str] = []
    for path in sorted([REPO / "README.md", *REPO.glob("docs/**/*.md"), REPO / "fixtures" / "README.md"]):
        lines += [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines


def export_model(out: Path) -> None:
    """Build the model, save the ONNX export, the references, the HF folder + tokenizer (export venv)."""
    import io

    import sentencepiece
    import torch
    import transformers

    sys.path.insert(0, str(REPO / "fixtures"))
    from make_fixtures import Logits, export_dynamo, randomise, set_impl  # noqa: E402

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    config = transformers.MixtralConfig(**MODEL)
    config._attn_implementation = "eager"
    torch.manual_seed(WEIGHT_SEED)
    model = transformers.MixtralForCausalLM(config).eval()
    randomise(model, WEIGHT_SEED)
    set_impl(model, "batched_mm")
    module = Logits(model).eval()

    routed: dict[int, list[list[int]]] = {}
    current: list[list[int]] = []

    def record(_module: Any, _args: Any, output: Any) -> None:
        current.append(sorted({int(e) for e in output[2].flatten()}))

    gates = [layer.mlp.gate for layer in model.model.layers]
    hooks = [gate.register_forward_hook(record) for gate in gates]
    arrays: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for tokens in range(1, MAX_TOKENS + 1):
            current.clear()
            ids = prompt(tokens)
            arrays[f"ids.{tokens}"] = ids
            arrays[f"logits.{tokens}"] = module(torch.from_numpy(ids)).numpy().astype(np.float32)
            routed[tokens] = [list(c) for c in current]
    for hook in hooks:
        hook.remove()
    np.savez(out / "reference.npz", **arrays)
    print(f"references for 1..{MAX_TOKENS} tokens", flush=True)

    with torch.no_grad():
        ids = torch.from_numpy(prompt(TRACE_TOKENS))
        info = export_dynamo(
            module, (ids,), out / "model.onnx", ["input_ids"], ["logits"], {"input_ids": [1]}
        )
    if not info.get("dynamic"):
        raise SystemExit(f"the export is not dynamic: {info.get('dynamic_error', '?')}")
    print(f"exported model.onnx ({(out / 'model.onnx').stat().st_size / 2**20:.0f} MiB)", flush=True)

    hf = out / "hf"
    model.save_pretrained(hf)
    stream = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_text()),
        model_writer=stream,
        vocab_size=MODEL["vocab_size"],
        model_type="bpe",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    (hf / "tokenizer.model").write_bytes(stream.getvalue())
    print(f"saved {hf} with a {MODEL['vocab_size']}-piece sentencepiece tokenizer", flush=True)
    facts = {
        "routed": {str(t): r for t, r in routed.items()},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxscript": __import__("onnxscript").__version__,
        "sentencepiece": sentencepiece.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "model.json").write_text(json.dumps(facts))


def converter_path(llama_src: Path) -> Path:
    return llama_src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def convert_gguf(export_python: Path, llama_src: Path, folder: Path, outtype: str) -> None:
    """``convert_hf_to_gguf.py --outtype OUTTYPE`` of ``folder/hf`` into ``folder/model-OUTTYPE.gguf``."""
    converter = converter_path(llama_src)
    target = folder / f"model-{outtype}.gguf"
    partial = target.with_name(target.name + ".partial")
    log(f"converting the HF folder to a {outtype.upper()} GGUF with convert_hf_to_gguf.py")
    cmd = [export_python, converter, folder / "hf", "--outtype", outtype, "--outfile", partial]
    run_logged(cmd, f"convert-{outtype}", cwd=converter.parent)
    partial.rename(target)


GGUF_INFO = """
import json, sys
sys.path.insert(0, sys.argv[1])
from gguf import GGUFReader
reader = GGUFReader(sys.argv[2])
print(json.dumps([
    {"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape], "bytes": int(t.n_bytes)}
    for t in reader.tensors
]))
"""
"""Prints a GGUF's tensors (name, ggml type, shape as ggml's ne, stored bytes) as JSON; runs in the
export venv with the sdist's gguf-py (what convert_hf_to_gguf.py itself imports)."""


def gguf_tensors(export_python: Path, llama_src: Path, gguf: Path) -> list[dict[str, Any]]:
    """``gguf``'s tensors (see :data:`GGUF_INFO`), cached next to it as ``<gguf>.json``."""
    sidecar = gguf.with_name(gguf.name + ".json")
    if not sidecar.exists() or sidecar.stat().st_mtime < gguf.stat().st_mtime:
        gguf_py = converter_path(llama_src).parent / "gguf-py"
        done = subprocess.run(
            [str(export_python), "-c", GGUF_INFO, str(gguf_py), str(gguf)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise SystemExit(f"reading the tensors of {gguf} failed:\n{done.stderr[-3000:]}")
        sidecar.write_text(done.stdout.strip().splitlines()[-1])
    return json.loads(sidecar.read_text())


def ensure_model(export_python: Path, llama_src: Path, fresh: bool, outtypes: Sequence[str]) -> Path:
    """The cached model folder (ONNX, references, HF folder, the GGUFs of ``outtypes``), made when
    missing; a GGUF of another type is converted into the folder the first time it is needed."""
    folder = CACHE / f"decoder-{model_key()}"
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    if not (folder / "model.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        log(f"exporting the decoder with torch.onnx.export(dynamo=True) into {staging}")
        cmd = [export_python, Path(__file__).resolve(), "--export-child", staging]
        run_logged(cmd, "export", env=dict(os.environ, PYTHONPATH=str(REPO)))
        convert_gguf(export_python, llama_src, staging, "f32")
        staging.rename(folder)
    for outtype in outtypes:
        if not (folder / f"model-{outtype}.gguf").exists():
            convert_gguf(export_python, llama_src, folder, outtype)
    return folder


# ── the systems ─────────────────────────────────────────────────────────────────


class OrtModel:
    """onnxruntime on the exported ONNX file."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def make(self, ids: np.ndarray) -> tuple[Fn, Callable[[], np.ndarray]]:
        feeds = {"input_ids": ids}
        run = self.session.run

        def call() -> Any:
            return run(["logits"], feeds)

        return call, lambda: call()[0]


def import_llama(llama_site: Path) -> Any:
    """llama-cpp-python's ctypes bindings, from its own venv (appended: this venv's packages win)."""
    if str(llama_site) not in sys.path:
        sys.path.append(str(llama_site))
    from llama_cpp import llama_cpp

    return llama_cpp


class LlamaModel:
    """llama.cpp through llama-cpp-python's low-level bindings: the GGUF, loaded once per process."""

    _backend_ready = False
    _logs: list[Any] = []

    def __init__(self, gguf: Path, llama_site: Path) -> None:
        lib = self.lib = import_llama(llama_site)

        @lib.llama_log_callback
        def quiet(level: int, text: bytes, user_data: Any) -> None:
            if level == 4:  # GGML_LOG_LEVEL_ERROR (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4)
                sys.stderr.write(text.decode(errors="replace"))

        LlamaModel._logs.append(quiet)  # a callback must outlive every call into the library
        lib.llama_log_set(quiet, ctypes.c_void_p())
        if not LlamaModel._backend_ready:
            lib.llama_backend_init()
            LlamaModel._backend_ready = True
        model_params = lib.llama_model_default_params()
        self.load_mode = lib.llama_load_mode_name(model_params.load_mode).decode()
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), model_params)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {gguf}")
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))


class LlamaContext:
    """One llama.cpp context on a loaded model: ``llama_decode`` of a prompt, logits for every token.

    ``exact``: flash attention off and an F32 KV cache, so llama.cpp computes attention in fp32 like
    the other systems (its CPU flash attention rounds to fp16: ~1e-3 logit errors here); otherwise
    llama.cpp's defaults (flash attention auto = on for the CPU, F16 KV cache).
    """

    def __init__(self, model: LlamaModel, threads: int, exact: bool) -> None:
        lib = self.lib = model.lib
        self.model = model
        params = lib.llama_context_default_params()
        params.n_ctx = 256
        params.n_batch = params.n_ubatch = MAX_TOKENS
        params.n_threads = params.n_threads_batch = threads
        if exact:
            params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED
            params.type_k = params.type_v = GGML_TYPE_F32
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(model.model, params)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create a context")
        self.memory = lib.llama_get_memory(self.ctx)
        self.vocab = model.vocab
        self._batches: list[Any] = []

    def make(self, ids: np.ndarray) -> tuple[Fn, Callable[[], np.ndarray]]:
        lib, ctx, memory = self.lib, self.ctx, self.memory
        tokens = ids.shape[1]
        batch = lib.llama_batch_init(tokens, 0, 1)
        for i, token in enumerate(ids[0]):
            batch.token[i] = int(token)
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = tokens
        self._batches.append(batch)
        decode, clear, sync = lib.llama_decode, lib.llama_memory_clear, lib.llama_synchronize

        def call() -> None:
            clear(memory, False)
            rc = decode(ctx, batch)
            if rc:
                raise RuntimeError(f"llama_decode returned {rc}")
            sync(ctx)

        def output() -> np.ndarray:
            call()
            logits = lib.llama_get_logits(ctx)
            return np.ctypeslib.as_array(logits, shape=(tokens, self.vocab)).copy()[None]

        return call, output


# ── timing child (project venv, one per thread count) ───────────────────────────


def floor_bytes(
    ids: np.ndarray, routed: list[list[int]], expert_bytes: Callable[[int, int], int] | None = None
) -> int:
    """Bytes a call on prompt ``ids`` must read: the distinct ids' embedding rows, per layer attention +
    norms + router + the experts ``routed`` (per layer) names, final norm, LM head, all fp32 but the
    experts, whose stored bytes ``expert_bytes(layer, expert)`` gives (default: fp32 matrices)."""
    h, f, v, e = (MODEL[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_local_experts"))
    head = h // MODEL["num_attention_heads"]
    kv = MODEL["num_key_value_heads"] * head
    attention = (2 * h * h + 2 * h * kv) * 4
    per_layer = attention + 2 * h * 4 + e * h * 4
    size = expert_bytes or (lambda _layer, _expert: 3 * h * f * 4)
    experts = sum(size(layer, expert) for layer, hit in enumerate(routed) for expert in hit)
    embedding_rows = np.unique(ids).size * h * 4
    return embedding_rows + len(routed) * per_layer + experts + h * 4 + v * h * 4


def manifest_expert_bytes(manifest: dict[str, Any]) -> Callable[[int, int], int]:
    """``(layer, expert) → stored bytes`` (matrices, scales, biases) from a moec manifest's plans."""
    layers = manifest["layers"]
    names = [layer["name"] for layer in layers]
    if names != [f"moe{i}" for i in range(MODEL["num_hidden_layers"])]:
        raise SystemExit(f"unexpected MoE layers in the manifest: {names}")
    sizes = [{entry["expert"]: int(entry["bytes"]) for entry in layer["plan"]} for layer in layers]
    return lambda layer, expert: sizes[layer][expert]


def artifact_floor_bytes(
    artifact: Path, manifest: dict[str, Any], ids: np.ndarray, routed: list[list[int]]
) -> int:
    """The bytes a call must read for an artifact whose dense weights are stored narrower too, from
    its weights file: every stored tensor whole (as stored: int8 values and their scales), but the
    MoE layers' expert tensors (the routed experts' stored bytes from the plan instead) and the
    embedding table (``embed`` in its name, ``[vocab, hidden]``: only the prompt's distinct rows)."""
    from moec.weights_file import read_weights

    h, v = MODEL["hidden_size"], MODEL["vocab_size"]
    expert_prefixes = tuple(f"{layer['name']}." for layer in manifest["layers"])
    total = 0
    for name, value in read_weights(artifact / "weights.bin").items():
        if name.startswith(expert_prefixes):
            continue
        if "embed" in name and value.shape == (v, h):
            total += np.unique(ids).size * h * 4  # the embedding lookup
        else:
            total += value.nbytes
    size = manifest_expert_bytes(manifest)
    return total + sum(size(layer, expert) for layer, hit in enumerate(routed) for expert in hit)


def gguf_floor_bytes(tensors: list[dict[str, Any]], ids: np.ndarray, routed: list[list[int]]) -> int:
    """The same bytes for a GGUF as its tensors are stored: the distinct ids' rows of ``token_embd``,
    the routed experts' slices of every ``*_exps`` tensor (one expert per slice of the last ggml
    dimension), every other tensor whole (attention, norms, ``ffn_gate_inp`` router, LM head)."""
    total = 0
    for tensor in tensors:
        name, nbytes = tensor["name"], tensor["bytes"]
        if name == "token_embd.weight":
            total += np.unique(ids).size * nbytes // MODEL["vocab_size"]
        elif "_exps." in name:
            total += len(routed[int(name.split(".")[1])]) * nbytes // MODEL["num_local_experts"]
        else:
            total += nbytes
    return total


def system_floor_bytes(
    system: str, ids: np.ndarray, routed: list[list[int]], workdir: Path, model_dir: Path
) -> int:
    """The bytes ``system``'s call on ``ids`` must read in its own weight format (``routed``: the
    experts per layer)."""
    if system in QUANTIZED_MOEC:
        manifest = json.loads((workdir / system / "manifest.json").read_text())
        dense = manifest.get("dense_weights") or {}
        if not dense:
            return floor_bytes(ids, routed, manifest_expert_bytes(manifest))
        return artifact_floor_bytes(workdir / system, manifest, ids, routed)
    if system in GGUF_TYPES:
        sidecar = model_dir / f"model-{GGUF_TYPES[system]}.gguf.json"
        return gguf_floor_bytes(json.loads(sidecar.read_text()), ids, routed)
    return floor_bytes(ids, routed)


def floor_name(system: str) -> str:
    return FLOOR if system in FP32 else f"floor {LABELS[system]}"


def load_oracle(workdir: Path, system: str) -> dict[str, Any] | None:
    """What :func:`run_oracle_child` saved for ``system``: its logits and routing per prompt length."""
    path = workdir / f"oracle-{system}.npz"
    if not path.exists():
        return None
    logits = dict(np.load(path))
    routed = json.loads(path.with_suffix(".json").read_text())
    return {"logits": logits, "routed": routed}


def profile_moec(artifact: MoecModel, ids: np.ndarray, evict: Any, calls: int) -> dict[str, dict[str, Any]]:
    """Mean ms per call of each function moec's VM calls, warm and cold, and the instrumented
    call's wall time: ``moec run --profile``'s measurement (``profile_functions``)."""
    from moec.runtime.profile import profile_functions

    result: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        flush = evict if mode == "cold" else None
        profile = profile_functions(artifact.session, artifact.feeds(ids), calls, flush)
        result[mode] = {
            "wall_ms": profile.call_ms,
            "functions": [[f.name, f.ms, round(f.calls)] for f in profile.functions],
        }
    return result


def load_systems(
    chosen: Sequence[str], threads: int, workdir: Path, model_dir: Path, llama_site: Path
) -> tuple[dict[str, Any], str | None]:
    """The ``chosen`` systems, each with ``make(ids) -> (timed_call, output)``, every GGUF loaded
    once; and llama.cpp's load mode (None without a llama.cpp system)."""
    systems: dict[str, Any] = {}
    llamas: dict[str, LlamaModel] = {}
    for name in chosen:
        if name in MOEC_FLAGS:
            systems[name] = MoecModel(workdir / name)
        elif name == "onnxruntime":
            systems[name] = OrtModel(model_dir / "model.onnx", threads)
        else:
            outtype = GGUF_TYPES[name]
            if outtype not in llamas:
                llamas[outtype] = LlamaModel(model_dir / f"model-{outtype}.gguf", llama_site)
            systems[name] = LlamaContext(llamas[outtype], threads, exact=name in EXACT_ATTENTION)
    load_mode = next(iter(llamas.values())).load_mode if llamas else None
    return systems, load_mode


def check_outputs(
    outputs: dict[str, np.ndarray], want: np.ndarray, oracles: dict[str, np.ndarray]
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Max abs logit errors (every system vs PyTorch, moec vs onnxruntime, each narrower moec vs its
    oracle), top-1 agreement with PyTorch (fraction of prompt positions), and the strict checks'
    keys with the error each allows."""
    errors = {f"{name} vs PyTorch": float(np.abs(got - want).max()) for name, got in outputs.items()}
    strict = {f"{name} vs PyTorch": TOLERANCE for name in STRICT if name in outputs}
    if "moec" in outputs and "onnxruntime" in outputs:
        errors["moec vs onnxruntime"] = float(np.abs(outputs["moec"] - outputs["onnxruntime"]).max())
        strict["moec vs onnxruntime"] = TOLERANCE
    for name, oracle in oracles.items():
        if name in outputs:
            errors[f"{name} vs its oracle"] = float(np.abs(outputs[name] - oracle).max())
            relative = 1e-2 * float(np.abs(oracle).max()) if name in INT8_ARITHMETIC else 0.0
            strict[f"{name} vs its oracle"] = max(TOLERANCE, relative)
    best = want.argmax(-1)
    top1 = {name: float((got.argmax(-1) == best).mean()) for name, got in outputs.items()}
    return errors, top1, strict


def run_child(args: argparse.Namespace) -> None:
    """Verify and time every chosen system at this process's thread count; samples as JSON."""
    from concurrent.futures import ThreadPoolExecutor

    threads = int(args.threads)
    if os.environ.get("TVM_NUM_THREADS") != str(threads):
        raise SystemExit("child must be started with TVM_NUM_THREADS equal to --threads")
    workdir, model_dir = Path(args.workdir), Path(args.model_dir)
    chosen = args.systems.split(",")
    reference = np.load(model_dir / "reference.npz")
    routed = json.loads((model_dir / "model.json").read_text())["routed"]
    oracles = {name: o for name in chosen if (o := load_oracle(workdir, name)) is not None}
    log(f"threads={threads}: loading {', '.join(chosen)}")
    systems, load_mode = load_systems(chosen, threads, workdir, model_dir, Path(args.llama_site))
    pool = ThreadPoolExecutor(threads)
    evict = Evictor(args.evict_mb, threads, pool)
    settle_s = 0.1 if threads > 1 else 0.005
    out: dict[str, Any] = {"threads": threads, "settle_s": settle_s, "cases": {}}
    out["llama_load_mode"] = load_mode
    for tokens in (int(t) for t in args.tokens.split(",")):
        ids = reference[f"ids.{tokens}"]
        want = reference[f"logits.{tokens}"]
        made = {name: system.make(ids) for name, system in systems.items()}
        outputs = {name: output() for name, (_, output) in made.items()}
        expected = {name: o["logits"][f"logits.{tokens}"] for name, o in oracles.items()}
        errors, top1, strict = check_outputs(outputs, want, expected)
        bad = {k: errors[k] for k, allowed in strict.items() if not errors[k] <= allowed}
        if bad:
            raise SystemExit(f"threads={threads} tokens={tokens}: logits disagree beyond their bounds: {bad}")
        summary = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        log(f"threads={threads} tokens={tokens}: {summary}; timing")
        calls = {name: call for name, (call, _) in made.items()}
        floors: dict[str, int] = {}
        floor_of: dict[str, str] = {}
        for name in systems:
            # a narrower moec's own routing (its oracle's) where known, else PyTorch's
            hit = oracles[name]["routed"][str(tokens)] if name in oracles else routed[str(tokens)]
            nbytes = system_floor_bytes(name, ids, hit, workdir, model_dir)
            same = [key for key, b in floors.items() if b == nbytes]
            key = same[0] if same else floor_name(name)
            if key in floors and floors[key] != nbytes:  # fp32 bytes that differ (an F32 GGUF's)
                key = f"floor {LABELS[name]}"
            floor_of[name], floors[key] = key, nbytes
        for key, nbytes in floors.items():
            calls[key] = make_reference_read(nbytes, threads, pool)
            calls[key]()
        case: dict[str, Any] = {"errors": errors, "top1": top1, "routed": routed[str(tokens)]}
        case.update(floor_bytes=floors, floor_of=floor_of)
        case["times"] = {
            mode: time_interleaved(calls, mode, args.reps, args.inner, evict, settle_s, settle_cold=True)
            for mode in MODES
        }
        out["cases"][str(tokens)] = case
    if args.profile:
        for tokens in (int(t) for t in args.tokens.split(",")):
            ids = reference[f"ids.{tokens}"]
            profiles = out["cases"][str(tokens)]["profiles"] = {}
            for name in PROFILED:
                if name in systems:
                    log(f"threads={threads} tokens={tokens}: {name} per-function profile")
                    profiles[name] = profile_moec(systems[name], ids, evict, args.profile_calls)
    Path(args.json_out).write_text(json.dumps(out))


# ── moec's oracle of a narrower artifact (project venv, one per system) ─────────


def run_oracle_child(args: argparse.Namespace) -> None:
    """The logits moec's numpy oracle of ``args.oracle_child``'s artifact gives (the ONNX model with
    the expert matrices rounded to their stored precisions, as the manifest's plans say:
    ``moec.reference.stored``, what ``run_stored_reference`` runs), and the experts its routers
    pick, for every ``--tokens`` prompt; saved as ``oracle-<system>.npz`` / ``.json``. One evaluator
    for all prompt lengths (building it takes most of the time, ~1 min here)."""
    import onnx

    from moec.reference.stored import canonical_evaluator
    from moec.verify import dense_storage, layer_plans

    system, workdir, model_dir = args.oracle_child, Path(args.workdir), Path(args.model_dir)
    manifest = json.loads((workdir / system / "manifest.json").read_text())
    model = onnx.load(str(model_dir / "model.onnx"))
    routes: dict[int, list[int]] = {}

    def on_route(layer: int, _layer: Any, _x: np.ndarray, experts: np.ndarray, _weights: np.ndarray) -> None:
        routes[layer] = sorted({int(e) for e in experts.flatten()})

    plans, dense = layer_plans(manifest), dense_storage(manifest)
    evaluator, _ = canonical_evaluator(model, on_route=on_route, plans=plans, dense=dense)
    position = [o.name for o in model.graph.output].index("logits")
    reference = np.load(model_dir / "reference.npz")
    arrays: dict[str, np.ndarray] = {}
    routed: dict[str, list[list[int]]] = {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        routes.clear()
        arrays[f"logits.{tokens}"] = evaluator.run(None, {"input_ids": reference[f"ids.{tokens}"]})[position]
        routed[str(tokens)] = [routes[layer] for layer in sorted(routes)]
    path = workdir / f"oracle-{system}.npz"
    np.savez(path, **arrays)
    path.with_suffix(".json").write_text(json.dumps(routed))


# ── peak RSS child ──────────────────────────────────────────────────────────────


def proc_status_kib(field: str) -> int:
    """A KiB field of ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: its high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def current_rss_kib() -> int:
    return proc_status_kib("VmRSS")


def run_rss_child(args: argparse.Namespace) -> None:
    """Import one system, load the model, run one call; print peak RSS facts as JSON (KiB)."""
    import resource

    workdir, model_dir, system = Path(args.workdir), Path(args.model_dir), args.rss_child
    if system in MOEC_FLAGS:
        import tvm  # noqa: F401
        from tvm import relax  # noqa: F401
    elif system == "onnxruntime":
        import onnxruntime  # noqa: F401
    else:
        import_llama(Path(args.llama_site))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids = prompt(int(args.tokens))
    if system in MOEC_FLAGS:
        model: Any = MoecModel(workdir / system)
    elif system == "onnxruntime":
        model = OrtModel(model_dir / "model.onnx", 1)
    else:
        llama = LlamaModel(model_dir / f"model-{GGUF_TYPES[system]}.gguf", Path(args.llama_site))
        model = LlamaContext(llama, 1, exact=system in EXACT_ATTENTION)
    loaded = current_rss_kib()
    call, _ = model.make(ids)
    call()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    facts = {"baseline_kib": baseline, "peak_kib": peak, "loaded_kib": loaded, "after_kib": current_rss_kib()}
    facts["hwm_kib"] = proc_status_kib("VmHWM")
    print(json.dumps(facts))


LAUNCHER = """
import json, os, sys
out, command = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.execv(command[0], command)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"maxrss_kib": usage.ru_maxrss, "exit": os.waitstatus_to_exitcode(status)}))
"""
"""Runs a command as a forked child of a bare Python and reports the child's ``ru_maxrss``."""

BUILD_RUNNER = """
import sys
from moec.artifact import read_manifest
from moec.runtime.board import ArtifactTarget, ensure_runner
print(ensure_runner(ArtifactTarget.from_manifest(read_manifest(sys.argv[1]))))
"""
"""Builds (or finds cached) the runner ``moec run`` would use for an artifact; prints its path."""


def launched_maxrss(command: Sequence[str | Path], out: Path) -> int:
    """``command``'s ``ru_maxrss`` (KiB), run by :data:`LAUNCHER` with its stdout in ``out``."""
    launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(out), *map(str, command)]
    done = json.loads(subprocess.run(launcher, capture_output=True, text=True, check=True).stdout)
    if done["exit"]:
        what = shlex.join(map(str, command))
        raise SystemExit(f"{what} failed (exit {done['exit']}): {out.read_text()[-2000:]}")
    return int(done["maxrss_kib"])


def runner_rss(artifact: Path, workdir: Path, tokens: int) -> dict[str, Any]:
    """Peak RSS facts (KiB) of ``moec-runner`` running one ``tokens``-token call of ``artifact``."""
    built = subprocess.run(
        [sys.executable, "-c", BUILD_RUNNER, str(artifact)], capture_output=True, text=True, check=True
    )
    runner = built.stdout.strip().splitlines()[-1]
    name = json.loads((artifact / "manifest.json").read_text())["inputs"][0]["name"]
    ids = workdir / "rss-ids.npy"
    np.save(ids, prompt(tokens))
    out = workdir / "rss-runner.txt"
    baseline = launched_maxrss([runner, "--help"], out)
    peak = launched_maxrss([runner, artifact, "--input", f"{name}={ids}", "--threads", "1"], out)
    printed = next(line for line in out.read_text().splitlines() if line.startswith("peak RSS"))
    return {"baseline_kib": baseline, "peak_kib": peak, "printed": printed}


# ── parent ──────────────────────────────────────────────────────────────────────


def moec_command() -> list[str]:
    script = Path(sys.executable).with_name("moec")
    if script.exists():
        return [str(script)]
    found = shutil.which("moec")
    if found is None:
        raise SystemExit("the moec command is not installed in this venv (pip install -e .)")
    return [found]


def merge(children: list[dict[str, Any]]) -> dict[str, Any]:
    """One thread count's children: samples pooled, the worst errors and top-1 agreement, the first
    child's profile, floors and facts."""
    first = children[0]
    merged = {k: v for k, v in first.items() if k != "cases"}
    merged["processes"] = len(children)
    merged["others_cores"] = [c["others_cores"] for c in children]
    merged["cases"] = {}
    for tokens, case in first["cases"].items():
        cases = [c["cases"][tokens] for c in children]
        out = {k: v for k, v in case.items() if k != "times"}
        out["errors"] = {k: max(c["errors"][k] for c in cases) for k in case["errors"]}
        out["top1"] = {k: min(c["top1"][k] for c in cases) for k in case["top1"]}
        out["times"] = {
            mode: {name: [s for c in cases for s in c["times"][mode][name]] for name in case["times"][mode]}
            for mode in MODES
        }
        merged["cases"][tokens] = out
    return merged


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def mib(kib: float) -> str:
    return f"{kib / 1024:.0f}"


def runner_key(system: str) -> str:
    """The peak-RSS row of moec-runner on ``system``'s artifact."""
    return RUNNER_ROW if system == "moec" else f"{system}-runner"


def row_label(key: str) -> str:
    """A system's or a runner row's label."""
    if key in LABELS:
        return LABELS[key]
    system = "moec" if key == RUNNER_ROW else key.removesuffix("-runner")
    return f"{LABELS[system]} (moec-runner, C++)"


def floor_label(key: str) -> str:
    return "floor fp32 (numpy read)" if key == FLOOR else key


def mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


DESCRIPTIONS = {
    "moec": "**moec** = `moec compile model.onnx --target host`, loaded with `ArtifactSession` (the entry "
    "point it picks: `main_one_token` at 1 token, `main` at 16)",
    "moec-int8": "**moec INT8** = the same with `--precision int8`: every expert's matrices int8 (symmetric, "
    "one fp32 scale per output row, widened and multiplied in fp32); attention, router, embeddings and "
    "LM head stay fp32",
    "moec-int8-all-g32": "**moec INT8 all g32** = moec INT8 all with `--int8-group 32`: a scale per 32 "
    "inputs of each output, like Q8_0's blocks of 32",
    "moec-int8-all": "**moec INT8 all** = `--precision int8 --dense-precision int8 --router-precision int8`: "
    "the attention projections, routers and LM head int8 too (one fp32 scale per output column; "
    "embeddings and norms fp32), as Q8_0 quantizes every matrix",
    "moec-fp16": "**moec FP16** = `--precision fp16`: the experts' matrices fp16",
    "moec-int8-dot": "**moec INT8-dot** = `--precision int8-dot`: moec INT8's expert weights multiplied in "
    "INT8 (W8A8: each expert kernel's input rows quantized per row when it starts, AVX-512 VNNI "
    "`vpdpbusd` dot products with INT32 sums); the rest fp32",
    "moec-int8-dot-all": "**moec INT8-dot all** = `--precision int8-dot --dense-precision int8 "
    "--router-precision int8`: experts W8A8, attention projections, routers and LM head int8 weight-only",
    "onnxruntime": "**onnxruntime** on the same ONNX file",
    "llama.cpp": "**llama.cpp** = llama-cpp-python's `llama_decode` on an F32 GGUF from "
    "`convert_hf_to_gguf.py --outtype f32` of the same weights (`save_pretrained` folder + a 512-piece "
    "sentencepiece tokenizer trained here), KV cache cleared before every call, logits for every prompt "
    "token, *fp32 attention* (flash attention off, F32 KV cache: fp32 throughout like the others)",
    "llama.cpp-fa": "**llama.cpp (its defaults)**: the same model in a second context with flash attention "
    "auto, which is on for the CPU, and an F16 KV cache (llama.cpp's CPU flash attention rounds to fp16, "
    "hence its ~1e-3 logit errors)",
    "llama.cpp-q8_0": "**llama.cpp Q8_0** / **F16**: GGUFs from `--outtype q8_0` / `--outtype f16` of the "
    "same folder (every matrix, embeddings and LM head included, narrower: see the weights table), in *fp32 "
    "attention* contexts like **llama.cpp**",
    "llama.cpp-f16": "",
}


def report(results: dict[int, dict[str, Any]], rss: dict[str, dict[str, Any]], facts: dict[str, Any]) -> str:
    """The Markdown section."""
    chosen: list[str] = facts["systems"]
    load_mode = facts["llama_load_mode"]
    cases = [(n, tokens, case) for n, r in sorted(results.items()) for tokens, case in r["cases"].items()]
    floors = list(dict.fromkeys(key for _, _, case in cases for key in case["floor_bytes"]))

    def median(case: dict[str, Any], mode: str, name: str) -> float:
        return stats(case["times"][mode][name])[0]

    others = "; ".join(
        f"{n} thread{'s' if n > 1 else ''}: " + ", ".join(f"{c:.2f}" for c in r["others_cores"])
        for n, r in sorted(results.items())
    )
    compiles = ", ".join(f"{LABELS[s]} {t:.0f} s" for s, t in facts["compile_s"].items())
    oracle = f"; oracles {facts['oracle_s']:.0f} s" if facts.get("oracle_s") else ""
    lines = [
        "## Whole Mixtral-style decoder: moec, onnxruntime, llama.cpp, fp32 and narrower weights "
        "(`benchmarks/bench_decoder.py`)",
        "",
        f"Command (repo root): `{facts['command']}`  ",
        f"Run {facts['date']}, commit {facts['git']}, moec {facts['moec']}, TVM {facts['tvm']}, "
        f"onnxruntime {facts['ort']}, llama-cpp-python {facts['llama']} ({facts['llama_build']}, "
        f"`CMAKE_ARGS={LLAMA_CMAKE_ARGS}`), numpy {np.__version__}; total wall time {facts['wall_s']:.0f} s "
        f"(compiles: {compiles}{oracle}).",
        "",
        f"Machine: {facts['cpu']}, {facts['cores']} cores, shared: other processes used "
        f"{facts['others_cores']:.2f} cores on average while the benchmark's children ran; per timing "
        f"process: {others} (from `/proc/stat` less the children's own CPU time; the script waits for "
        "a quiet machine before each timing process; 2-thread numbers suffer first when these are not ~0).",
        "",
        f"Model: `transformers.MixtralForCausalLM` {facts['transformers']}, {MODEL['num_hidden_layers']} "
        f"layers, hidden {MODEL['hidden_size']}, FFN {MODEL['intermediate_size']}, "
        f"{MODEL['num_local_experts']} experts, top-{MODEL['num_experts_per_tok']}, "
        f"{MODEL['num_attention_heads']} heads ({MODEL['num_key_value_heads']} KV heads), vocab "
        f"{MODEL['vocab_size']}, untied LM head, fp32, random weights (seed {WEIGHT_SEED}, "
        f"`fixtures/make_fixtures.py`'s `randomise`), {facts['parameters'] / 1e6:.1f} M parameters "
        f"({facts['parameters'] * 4 / 2**20:.0f} MiB). Exported by torch {facts['torch']} "
        f"`torch.onnx.export(dynamo=True)` (onnxscript {facts['onnxscript']}) with "
        f'`config._experts_implementation = "batched_mm"`, `input_ids` `[1, seq]` (seq dynamic) → '
        f"`logits`, no KV cache: prompt processing. The prompt: the first 1 or 16 ids of one fixed "
        f"random sequence (seed {PROMPT_SEED}).",
        "",
        "Systems: "
        + "; ".join(DESCRIPTIONS[s] for s in chosen if DESCRIPTIONS[s])
        + (f"; llama.cpp's GGUFs loaded with load mode `{load_mode}` (mmap)" if load_mode else "")
        + ". **floor** = a numpy streaming read of exactly the bytes a call must read, *in each system's own "
        "weight format* (see Method). Cells: median ms (× the system's own floor).",
        "",
    ]

    weight_rows = []
    first_case = cases[0][2]
    for s in chosen:
        key = first_case["floor_of"][s]
        weight_rows.append([LABELS[s], WEIGHTS[s], f"{facts['stored'][s] / 2**20:.1f}", floor_label(key)])
    gguf_notes = [
        f"{outtype.upper()} GGUF: "
        + ", ".join(f"{kind} {', '.join(f'`{n}`' for n in names)}" for kind, names in info["by_type"].items())
        for outtype, info in facts["gguf"].items()
    ]
    lines += [
        "Weights (stored MiB: moec's weights.bin, the ONNX file, the GGUF's tensors; the floor each "
        "system is measured against):",
        "",
        *table(["system", "weights", "stored MiB", "own floor"], weight_rows),
        "",
        *(["GGUF tensor types: " + "; ".join(gguf_notes) + ".", ""] if gguf_notes else []),
    ]

    worst: dict[str, dict[str, float]] = {}
    top1: dict[str, dict[str, float]] = {}
    for _, tokens, case in cases:
        for k, v in case["errors"].items():
            worst.setdefault(tokens, {})[k] = max(v, worst.get(tokens, {}).get(k, 0.0))
        for k, v in case["top1"].items():
            top1.setdefault(tokens, {})[k] = min(v, top1.get(tokens, {}).get(k, 1.0))
    checks = {"moec": ("onnxruntime", "moec vs onnxruntime")}
    checks.update({s: ("its oracle", f"{s} vs its oracle") for s in QUANTIZED_MOEC})
    header = ["system", "checked against"]
    for tokens in worst:
        header += [f"{tokens} tok: vs PyTorch", f"{tokens} tok: top-1 = PyTorch", f"{tokens} tok: vs check"]
    error_rows = []
    for s in chosen:
        against, key = checks.get(s, ("–", ""))
        has_check = any(key in e for e in worst.values())
        row = [LABELS[s], against if has_check else "–"]
        for tokens, errs in worst.items():
            err = errs[f"{s} vs PyTorch"]
            flag = " ⚠" if s in FP32 and err > TOLERANCE else ""
            agree = round(top1[tokens][s] * int(tokens))
            row += [f"{err:.1e}{flag}", f"{agree}/{tokens}", f"{errs[key]:.1e}" if key in errs else "–"]
        error_rows.append(row)
    lines += [
        f"Correctness before timing, max abs logit error (worst over the thread counts) and top-1 "
        f"agreement with PyTorch (prompt positions whose arg-max logit is PyTorch's). Enforced: moec and "
        f"onnxruntime within {TOLERANCE:g} of PyTorch and of each other; each narrower moec within "
        f"{TOLERANCE:g} of its oracle (moec's numpy reference of the stored weights, "
        "`moec.reference.stored`: the ONNX model with the expert matrices rounded as stored). "
        f"⚠: an fp32 system over {TOLERANCE:g} off PyTorch; the narrower systems cannot match PyTorch "
        "that closely, and are not flagged:",
        "",
        *table(header, error_rows),
        "",
    ]
    for s, same in facts.get("oracle_routing", {}).items():
        differs = [t for t, ok in same.items() if not ok]
        lines += [
            f"{LABELS[s]}'s oracle routes "
            + (
                "every prompt to the experts PyTorch's routers pick"
                if not differs
                else f"differently from PyTorch at {', '.join(differs)} token(s) (its floor counts its picks)"
            )
            + "."
        ]
    if facts.get("oracle_routing"):
        lines.append("")

    floor_rows, rows, p90_rows = [], [], []
    for threads, tokens, case in cases:
        for mode in MODES:
            lead = [tokens, str(threads), mode]
            floor_rows.append(
                lead
                + [
                    f"{median(case, mode, k):.2f} ({case['floor_bytes'][k] / 2**20:.1f} MiB)"
                    if k in case["floor_bytes"]
                    else "–"
                    for k in floors
                ]
            )
            own = {s: median(case, mode, case["floor_of"][s]) for s in chosen}
            ms = {s: median(case, mode, s) for s in chosen}
            rows.append(lead + [f"{ms[s]:.2f} ({ms[s] / own[s]:.2f}×)" for s in chosen])
            times = case["times"][mode]
            p90 = [f"{stats(times[k])[1]:.2f}" if k in times else "–" for k in floors]
            p90_rows.append(lead + p90 + [f"{stats(case['times'][mode][s])[1]:.2f}" for s in chosen])
    users = "; ".join(
        f"{floor_label(k)}: " + ", ".join(LABELS[s] for s in chosen if first_case["floor_of"][s] == k)
        for k in floors
    )
    lead_header = ["tokens", "threads", "cache"]
    lines += [
        f"Floors, median ms (MiB read): {users}.",
        "",
        *table([*lead_header, *map(floor_label, floors)], floor_rows),
        "",
        "Median latency, ms (× own floor):",
        "",
        *table([*lead_header, *(LABELS[s] for s in chosen)], rows),
        "",
        "p90 latency, ms:",
        "",
        *table([*lead_header, *map(floor_label, floors), *(LABELS[s] for s in chosen)], p90_rows),
        "",
    ]

    fp32_others = [s for s in ("onnxruntime", "llama.cpp", "llama.cpp-fa") if s in chosen]
    narrower = [(q, "moec") for q in QUANTIZED_MOEC if q in chosen]
    if "llama.cpp" in chosen:
        narrower += [(s, "llama.cpp") for s in ("llama.cpp-q8_0", "llama.cpp-f16") if s in chosen]
    narrower += [(m, ll) for m, ll in PAIRS if m in chosen and ll in chosen]
    for title, columns in (
        (
            "moec speed-up at fp32 (other system's median ÷ moec's; > 1: moec is faster):",
            [("moec", s) for s in fp32_others],
        ),
        (
            "Narrower weights: *A vs B* = B's median ÷ A's (> 1: A is faster): each narrower moec against "
            "fp32 moec, llama.cpp's Q8_0 / F16 against its F32 (fp32 attention), and moec against "
            "llama.cpp at the same width:",
            narrower,
        ),
    ):
        if not columns:
            continue
        ratio_rows = [
            [tokens, str(threads), mode]
            + [f"{median(case, mode, b) / median(case, mode, a):.2f}×" for a, b in columns]
            for threads, tokens, case in cases
            for mode in MODES
        ]
        names = [f"{LABELS[a]} vs {LABELS[b]}" for a, b in columns]
        if columns[0][0] == "moec" and title.startswith("moec speed-up"):
            names = [f"vs {LABELS[b]}" for _, b in columns]
        lines += [title, "", *table([*lead_header, *names], ratio_rows), ""]

    targets = []
    for q in ("moec-int8", "moec-int8-all-g32", "moec-int8-all", "moec-int8-dot", "moec-int8-dot-all"):
        if q not in chosen:
            continue
        for threads, r in sorted(results.items()):
            c = r["cases"].get("1")
            if c is None:
                continue
            speed = median(c, "cold", "moec") / median(c, "cold", q)
            most = c["floor_bytes"][c["floor_of"]["moec"]] / c["floor_bytes"][c["floor_of"][q]]
            own = median(c, "cold", q) / median(c, "cold", c["floor_of"][q])
            text = (
                f"- {LABELS[q]}, {threads} thread{'s' if threads > 1 else ''}, 1 token, cold: {speed:.2f}× "
                f"faster than fp32 moec (≥ {TARGET_SPEEDUP}×: {mark(speed >= TARGET_SPEEDUP)}; reading its "
                f"{c['floor_bytes'][c['floor_of'][q]] / 2**20:.1f} MiB instead of fp32's "
                f"{c['floor_bytes'][c['floor_of']['moec']] / 2**20:.1f} MiB allows at most {most:.2f}×), "
                f"{own:.2f}× its floor (≤ {TARGET_FLOOR}×: {mark(own <= TARGET_FLOOR)})"
            )
            if "llama.cpp-q8_0" in chosen:
                versus = [
                    (tokens, mode, median(case, mode, "llama.cpp-q8_0") / median(case, mode, q))
                    for tokens, case in r["cases"].items()
                    for mode in MODES
                ]
                q8_bytes = c["floor_bytes"][c["floor_of"]["llama.cpp-q8_0"]] / 2**20
                text += (
                    "; llama.cpp Q8_0's median ÷ this one's: "
                    + ", ".join(f"{t} tok {m} {v:.2f}×" for t, m, v in versus)
                    + f" (≥ 1 everywhere: {mark(all(v >= 1 for _, _, v in versus))}; llama.cpp Q8_0 reads "
                    f"{q8_bytes:.1f} MiB at 1 token: its attention, embeddings and LM head are Q8_0 too)"
                )
            targets.append(text + ".")
    if targets:
        lines += [
            f"The issue's targets for all-INT8 moec (1 token from DRAM = cold: ≥ {TARGET_SPEEDUP}× faster "
            f"than fp32 moec and within {TARGET_FLOOR}× of a streaming read of its bytes; no slower than "
            "llama.cpp Q8_0 at 1- and 16-token prompts):",
            "",
            *targets,
            "",
        ]

    parent = max(r["parent_kib"] for r in rss.values() if "parent_kib" in r)
    lowest = min(r["baseline_kib"] for r in rss.values() if "parent_kib" in r)
    parent_note = (
        f"(`ru_maxrss` survives exec: a child starts from its parent's high-water mark; the parent's was "
        f"{mib(parent)} MiB, {'below' if parent < lowest else 'NOT below'} every baseline"
        f"{', so these are the children’s own' if parent < lowest else ': the baselines are inflated'}.)"
    )
    rss_rows = []
    for key, r in rss.items():
        base = r["baseline_kib"]
        after = [mib(r["after_kib"]), mib(r["after_kib"] - base)] if "after_kib" in r else ["–", "–"]
        rss_rows.append([row_label(key), mib(r["peak_kib"]), mib(base), mib(r["peak_kib"] - base), *after])
    lines += [
        f"Peak RSS, MiB: one fresh process per system, 1 thread: imports the system (baseline = "
        f"`ru_maxrss` then), loads the model, runs one {facts['rss_tokens']}-token call; peak = "
        "`ru_maxrss` after the call; *after call* = VmRSS then (what stays resident). llama.cpp maps the "
        "GGUF file (mmap): its weight pages count in RSS as they are touched, and load nothing twice; "
        "so does moec since weights.bin (both runtimes map it and use the tensors in place). "
        "moec-runner rows: a fresh runner process (no Python) runs the call on that artifact "
        "(`--threads 1`), its `ru_maxrss` read by `wait4`; baseline: a runner that only starts (`--help`, "
        "TVM's runtime libraries loaded); both forked by a bare Python launcher (~10 MiB), so neither "
        f"carries the parent's high-water mark; no *after call*. {parent_note}",
        "",
        *table(
            ["system", "peak", "baseline after imports", "peak − baseline", "after call", "after − baseline"],
            rss_rows,
        ),
        "",
    ]

    profiles = [
        (system, threads, tokens, prof)
        for threads, tokens, case in cases
        for system, prof in case.get("profiles", {}).items()
    ]
    if profiles:
        lines += [
            f"Where moec's time goes: Relax VM instrument hook around every VM call (a Python callback, "
            f"a few µs per call, so the instrumented call is slower than the timed one: its wall time is "
            f"given), after the timing, {facts['profile_calls']} calls per case, mean ms per decoder call "
            f"(× calls per decoder call), top {PROFILE_TOP}:",
            "",
        ]
        for system, threads, tokens, prof in sorted(profiles, key=lambda p: chosen.index(p[0])):
            for mode in MODES:
                p = prof[mode]
                top = "; ".join(f"`{name}` {ms:.3f} (×{n})" for name, ms, n in p["functions"][:PROFILE_TOP])
                total = sum(ms for _, ms, _ in p["functions"])
                lines.append(
                    f"- {LABELS[system]}, {tokens} token(s), {threads} thread, {mode}: instrumented call "
                    f"{p['wall_ms']:.2f} ms, functions {total:.2f} ms in all "
                    f"({len(p['functions'])} distinct): {top}"
                )
        lines.append("")

    first = next(iter(results.values()))
    lines += [
        "Method:",
        "",
        "- One child process per thread count (TVM reads `TVM_NUM_THREADS` once); in it every system "
        "(onnxruntime: `intra_op_num_threads` = the count, `inter_op_num_threads` = 1; llama.cpp: "
        "`n_threads` = `n_threads_batch` = the count, llama-cpp-python imported from its own venv, in the "
        "same process, each GGUF loaded once) and the floor reads; "
        f"{first['processes']} process(es) per thread count, samples pooled.",
        "- Interleaved: each repetition runs every system and floor once, the order rotated every "
        f"repetition; {facts['reps_total']} repetitions per case. Before every turn a settle pause "
        f"({first['settle_s'] * 1e3:.0f} ms at 1 thread, 100 ms at more: the thread pools spin after a "
        "call, and llama.cpp's OpenMP barrier stalls badly on a core taken by another pool's spinning "
        f"thread). Cold: then a {facts['evict_mb']} MiB buffer is read+written then read "
        "(`bench_mixtral_block.Evictor`, on as many threads as the benchmark) and one call is timed. "
        f"Warm: one untimed call, then {facts['inner']} timed calls (1 if a call takes over 50 ms).",
        "- Floors: bytes = the prompt's distinct embedding rows + per layer (q, k, v, o projections, 2 "
        "norms, router, and the distinct experts the routers pick for the prompt: 2 per layer at 1 token) +"
        " final norm + LM head, each as the system stores it. fp32 (moec, onnxruntime, llama.cpp F32): "
        "everything fp32. Narrower moec: the same fp32 bytes for all but the experts, each routed expert's "
        "stored bytes from the artifact's manifest (`layers[i].plan[e].bytes`: matrices, scales and the "
        "fp32 biases moec stores); the experts its own oracle's routers pick (PyTorch's where no oracle "
        "ran). llama.cpp Q8_0 / F16: from the GGUF's tensor sizes (gguf-py's `GGUFReader`; Q8_0 = 34 bytes "
        "per 32 weights), the embedding rows and routed experts' slices of `token_embd` and the `*_exps` "
        "tensors, the other tensors whole, PyTorch's picks. Read by numpy `max` over one buffer of that "
        "size split into one slice per thread (a Python thread pool at 2 threads), timed like the systems; "
        "equal byte counts share one floor. It is what merely streaming the necessary bytes costs here, "
        "cold; warm, part of it comes from the LLC.",
        "- llama.cpp: the timed call is `llama_memory_clear(mem, data=false)` + `llama_decode` + "
        '`llama_synchronize`; onnxruntime: `session.run(["logits"], feeds)`; moec: '
        "`vm[entry](input_ids, *params)` on a pre-converted `tvm.runtime.Tensor`, weights as "
        "`ArtifactSession` holds them (views into the mapped weights.bin, huge pages where the OS "
        "allows, as `moec run`).",
        "",
    ]
    return "\n".join(lines)


def compile_moec(model_dir: Path, workdir: Path, system: str) -> float:
    """``moec compile model.onnx --target host`` (+ the system's flags) into ``workdir/system``; seconds."""
    flags = MOEC_FLAGS[system]
    log(f"moec compile model.onnx --target host {' '.join(flags)}".rstrip())
    started = time.perf_counter()
    cmd = [*moec_command(), "compile", str(model_dir / "model.onnx"), "--target", "host", *flags]
    done = subprocess.run([*cmd, "-o", str(workdir / system)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"moec compile ({system}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    log(f"compiled {system} in {seconds:.0f} s")
    return seconds


def run_oracles(systems: Sequence[str], common: list[str], tokens: str, workdir: Path) -> float:
    """:func:`run_oracle_child` for every system in ``systems``, side by side (one thread each);
    wall seconds."""
    started = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    running = []
    for system in systems:
        log(f"{system}: moec's numpy oracle of its stored weights (~1 min)")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--oracle-child", system, *common]
        logfile = (workdir / f"oracle-{system}.log").open("w")
        out = {"stdout": logfile, "stderr": subprocess.STDOUT}
        process = subprocess.Popen([*cmd, "--tokens", tokens], env=env, **out)
        running.append((system, logfile, process))
    for system, logfile, process in running:
        rc = process.wait()
        logfile.close()
        if rc:
            tail = (workdir / f"oracle-{system}.log").read_text()[-3000:]
            raise SystemExit(f"the oracle of {system} failed (rc {rc}):\n{tail}")
    return time.perf_counter() - started


def gguf_summary(tensors: list[dict[str, Any]]) -> dict[str, Any]:
    """A GGUF's tensor bytes and, per ggml type, the kinds of tensor stored in it (``blk.N.`` dropped)."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for tensor in tensors:
        parts = tensor["name"].split(".")
        kind = ".".join(parts[2:] if parts[0] == "blk" else parts).removesuffix(".weight")
        if kind not in by_type[tensor["type"]]:
            by_type[tensor["type"]].append(kind)
    return {"bytes": sum(t["bytes"] for t in tensors), "by_type": dict(by_type)}


def run_parent(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Environments, model, moec compiles, oracles, the timing children, the peak-RSS children, the report.

    This process imports neither TVM nor onnxruntime until the children are done: a child's
    ``ru_maxrss`` starts from its parent's high-water mark (Linux keeps it across fork + exec), so a
    light parent keeps the children's numbers their own.
    """
    import resource

    wall = time.perf_counter()
    chosen = args.systems.split(",")
    export_python = ensure_export_venv()
    llama_src = llama_source()
    llama_site = ensure_llama_venv()
    outtypes = list(dict.fromkeys(GGUF_TYPES[s] for s in chosen if s in GGUF_TYPES))
    model_dir = ensure_model(export_python, llama_src, args.fresh_model, outtypes)
    ggufs = {t: gguf_tensors(export_python, llama_src, model_dir / f"model-{t}.gguf") for t in outtypes}
    model_facts = json.loads((model_dir / "model.json").read_text())
    log(f"model: {model_dir}; systems: {', '.join(chosen)}")
    thread_counts = [int(n) for n in args.threads.split(",")]
    rss: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="moec-decoder-") as tmp:
        workdir = Path(tmp)
        compile_s = {s: compile_moec(model_dir, workdir, s) for s in chosen if s in MOEC_FLAGS}
        common = ["--workdir", str(workdir), "--model-dir", str(model_dir), "--llama-site", str(llama_site)]
        with_oracle = [] if args.no_oracle else [s for s in chosen if s in QUANTIZED_MOEC]
        oracle_s = run_oracles(with_oracle, common, args.tokens, workdir) if with_oracle else 0.0
        oracle_routing = {}
        for s in with_oracle:
            mine = json.loads((workdir / f"oracle-{s}.json").read_text())
            oracle_routing[s] = {t: hit == model_facts["routed"][t] for t, hit in mine.items()}
        stored = {s: (workdir / s / "weights.bin").stat().st_size for s in chosen if s in MOEC_FLAGS}
        stored.update({s: sum(t["bytes"] for t in ggufs[GGUF_TYPES[s]]) for s in chosen if s in GGUF_TYPES})
        if "onnxruntime" in chosen:
            stored["onnxruntime"] = (model_dir / "model.onnx").stat().st_size
        before = busy_and_children_s()
        timing = [*common, "--tokens", args.tokens, "--reps", str(args.reps), "--inner", str(args.inner)]
        timing += ["--evict-mb", str(args.evict_mb)]
        timing += ["--profile-calls", str(args.profile_calls), "--systems", args.systems]

        def child_args(proc: int, threads: int) -> list[str]:
            profile = proc == 0 and threads == min(thread_counts) and not args.no_profile
            return [*timing, *(["--profile"] if profile else [])]

        children, others = run_timing_children(
            Path(__file__).resolve(), workdir, thread_counts, args.procs, args.wait_quiet, child_args
        )
        for n, results in children.items():
            for result, busy in zip(results, others[n], strict=True):
                result["others_cores"] = busy
        rss_tokens = max(int(t) for t in args.tokens.split(","))
        for system in chosen:
            env = dict(os.environ, TVM_NUM_THREADS="1", OMP_NUM_THREADS="1")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", system, *common]
            done = subprocess.run(
                [*cmd, "--tokens", str(rss_tokens)], env=env, capture_output=True, text=True
            )
            if done.returncode:
                raise SystemExit(f"peak-RSS child for {system} failed:\n{done.stderr[-3000:]}")
            rss[system] = json.loads(done.stdout.strip().splitlines()[-1])
            rss[system]["parent_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            log(f"peak RSS {system}: {rss[system]['peak_kib'] / 1024:.0f} MiB")
        for system in (s for s in chosen if s in MOEC_FLAGS):
            key = runner_key(system)
            rss[key] = runner = runner_rss(workdir / system, workdir, rss_tokens)
            log(f"peak RSS {key}: {runner['peak_kib'] / 1024:.0f} MiB (it printed '{runner['printed']}')")
    after = busy_and_children_s()
    import onnxruntime
    import tvm

    import moec

    results = {n: merge(c) for n, c in children.items()}
    facts = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_decoder.py", *map(shlex.quote, argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "git": git_revision(),
        "moec": moec.__version__,
        "tvm": tvm.__version__,
        "ort": onnxruntime.__version__,
        "llama": llama_version(),
        "llama_build": llama_build_facts(),
        "llama_load_mode": next(iter(results.values()))["llama_load_mode"],
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "systems": chosen,
        "compile_s": compile_s,
        "oracle_s": oracle_s,
        "oracle_routing": oracle_routing,
        "stored": stored,
        "gguf": {t: gguf_summary(tensors) for t, tensors in ggufs.items() if t != "f32"},
        "reps_total": args.reps * args.procs,
        "inner": args.inner,
        "evict_mb": args.evict_mb,
        "profile_calls": args.profile_calls,
        "rss_tokens": rss_tokens,
        "wall_s": time.perf_counter() - wall,
        "others_cores": others_cores(before, after),
        **{k: model_facts[k] for k in ("torch", "transformers", "onnxscript", "parameters")},
    }
    section = report(results, rss, facts)
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps({"facts": facts, "results": results, "rss": rss}))
    if args.markdown:
        write_markdown(REPO / "BENCHMARKS.md", MD_NAME, section)
        log(f"updated {REPO / 'BENCHMARKS.md'}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions, no BENCHMARKS.md (smoke run)")
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions per case and process (default 20, --quick 3)"
    )
    parser.add_argument(
        "--procs", type=int, default=None, help="processes per thread count (default 2, --quick 1)"
    )
    parser.add_argument(
        "--inner", type=int, default=None, help="warm timed calls per repetition (default 5, --quick 2)"
    )
    parser.add_argument(
        "--tokens", default="1,16", help=f"comma-separated prompt lengths, 1..{MAX_TOKENS} (default 1,16)"
    )
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated systems to run, moec always among them (default all: {','.join(SYSTEMS)})",
    )
    parser.add_argument("--evict-mb", type=int, default=default_evict_mb(), help="cache-flush buffer, MiB")
    parser.add_argument("--no-markdown", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--no-profile", action="store_true", help="skip moec's per-function breakdown")
    parser.add_argument(
        "--no-oracle",
        action="store_true",
        help="skip checking the narrower moec systems against moec's numpy oracle (~1 min each)",
    )
    parser.add_argument(
        "--profile-calls", type=int, default=None, help="calls per profiled case (default 10)"
    )
    parser.add_argument("--json", help="also write the raw results (facts, samples, peak RSS) to this file")
    add_wait_quiet_option(parser)
    parser.add_argument("--fresh-model", action="store_true", help="re-export the model even if cached")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--export-child", help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    parser.add_argument("--oracle-child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--llama-site", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repetition_defaults(args)
    if args.profile_calls is None:
        args.profile_calls = 3 if args.quick else 10
    args.markdown = not (args.quick or args.no_markdown)
    tokens = [int(t) for t in args.tokens.split(",")]
    if not all(1 <= t <= MAX_TOKENS for t in tokens):
        parser.error(f"--tokens must lie in 1..{MAX_TOKENS}")
    if min(args.reps, args.procs, args.inner, args.evict_mb, args.profile_calls) < 1:
        parser.error("--reps, --procs, --inner, --evict-mb and --profile-calls must be positive")
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; choose among {', '.join(SYSTEMS)}")
    if "moec" not in wanted:
        parser.error("--systems must include moec (the others are compared with it)")
    args.systems = ",".join(s for s in SYSTEMS if s in wanted)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--export-child"]:  # the export venv: no bench_mixtral_block (it needs nothing more,
        export_model(Path(argv[1]))  # but keep the export step independent of the timing code)
        return
    args = parse_args(argv)
    if args.child:
        run_child(args)
    elif args.rss_child:
        run_rss_child(args)
    elif args.oracle_child:
        run_oracle_child(args)
    else:
        run_parent(args, argv)


if __name__ == "__main__":
    main()
