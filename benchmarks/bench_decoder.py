#!/usr/bin/env python
"""A whole MoE decoder: moec against onnxruntime and llama.cpp, latency and peak memory.

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
``floor``        not a system: a numpy streaming read (``max``) of exactly the bytes the call must
                 read: the prompt's embedding rows, every layer's attention, norm and router
                 weights, the distinct experts the prompt routes to in each layer (counted by
                 PyTorch's routers), the final norm and the LM head. Timed like the systems.

How:

* Correctness first: every system's logits are compared with PyTorch's (saved by the export step)
  and with each other at every token count; moec and onnxruntime must be within 1e-3 (max abs),
  llama.cpp's error is reported (and flagged above 1e-3).
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
* Where moec's time goes: the Relax VM's instrument hook around every VM call (as
  ``bench_mixtral_block.profile_moec``), 1 thread, after the timing.
* Peak RSS: per system a fresh process that imports it (baseline ``ru_maxrss``), loads the model,
  runs one 16-token call, and reports ``ru_maxrss`` and the RSS after the call. ``ru_maxrss``
  survives fork + exec (a child starts from its parent's high-water mark), so the parent imports
  neither TVM nor onnxruntime until every child is done. ``moec-runner`` (the C++ runner a board
  runs, built as ``moec run`` builds it) is measured the same way without Python: one fresh
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
    ~/.cache/moec-bench/decoder-<key>/  the exported model, its references, HF folder and GGUF (reused
                                      while the model spec and the export pins are unchanged)

(``$MOEC_BENCH_CACHE`` moves that folder.) The benchmark itself runs with the project venv; moec is
compiled afresh on every run from the working tree.

Run from the repository root::

    .venv/bin/python benchmarks/bench_decoder.py                # full run, updates BENCHMARKS.md
    .venv/bin/python benchmarks/bench_decoder.py --quick        # smoke run, no BENCHMARKS.md
    .venv/bin/python benchmarks/bench_decoder.py --threads 1 --tokens 1 --reps 10 --no-markdown
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
    wait_quiet,
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
SYSTEMS = ("moec", "onnxruntime", "llama.cpp", "llama.cpp-fa")
"""``llama.cpp``: flash attention off, F32 KV cache (fp32 throughout, like the others);
``llama.cpp-fa``: llama.cpp's own defaults (flash attention on for the CPU, F16 KV cache)."""
RUNNER_ROW = "moec-runner"
"""The peak-RSS row of moec's C++ runner (not timed here: ``moec run`` prints its latency)."""
LABELS = {
    "moec": "moec",
    RUNNER_ROW: "moec (moec-runner, C++)",
    "onnxruntime": "onnxruntime",
    "llama.cpp": "llama.cpp (fp32 attention)",
    "llama.cpp-fa": "llama.cpp (its defaults: flash attn, F16 KV)",
}
STRICT = ("moec", "onnxruntime")
"""Systems whose logits must match PyTorch's within TOLERANCE (llama.cpp's are reported)."""
FLOOR = "floor"
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


def ensure_model(export_python: Path, llama_src: Path, fresh: bool) -> Path:
    """The cached model folder (ONNX, references, HF folder, GGUF), made when missing."""
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
        converter = llama_src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
        log("converting the HF folder to an F32 GGUF with convert_hf_to_gguf.py")
        cmd = [
            export_python,
            converter,
            staging / "hf",
            "--outtype",
            "f32",
            "--outfile",
            staging / "model-f32.gguf",
        ]
        run_logged(cmd, "convert", cwd=converter.parent)
        staging.rename(folder)
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

    def __init__(self, gguf: Path, llama_site: Path) -> None:
        lib = self.lib = import_llama(llama_site)

        @lib.llama_log_callback
        def quiet(level: int, text: bytes, user_data: Any) -> None:
            if level == 4:  # GGML_LOG_LEVEL_ERROR (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4)
                sys.stderr.write(text.decode(errors="replace"))

        self._log = quiet  # the callback must outlive every call into the library
        lib.llama_log_set(quiet, ctypes.c_void_p())
        lib.llama_backend_init()
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


def floor_bytes(ids: np.ndarray, routed: list[list[int]]) -> int:
    """Bytes a call on prompt ``ids`` must read: the distinct ids' embedding rows, per layer attention +
    norms + router + the experts ``routed`` (per layer) names, final norm, LM head (fp32)."""
    h, f, v, e = (MODEL[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_local_experts"))
    head = h // MODEL["num_attention_heads"]
    kv = MODEL["num_key_value_heads"] * head
    attention = (2 * h * h + 2 * h * kv) * 4
    per_layer = attention + 2 * h * 4 + e * h * 4
    expert = 3 * h * f * 4
    embedding_rows = np.unique(ids).size * h * 4
    return embedding_rows + sum(per_layer + len(hit) * expert for hit in routed) + h * 4 + v * h * 4


def profile_moec(
    artifact: MoecModel, ids: np.ndarray, evict: Any, calls: int
) -> dict[str, dict[str, Any]]:
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


def run_child(args: argparse.Namespace) -> None:
    """Verify and time every system at this process's thread count; samples as JSON."""
    from concurrent.futures import ThreadPoolExecutor

    threads = int(args.threads)
    if os.environ.get("TVM_NUM_THREADS") != str(threads):
        raise SystemExit("child must be started with TVM_NUM_THREADS equal to --threads")
    workdir, model_dir = Path(args.workdir), Path(args.model_dir)
    reference = np.load(model_dir / "reference.npz")
    routed = json.loads((model_dir / "model.json").read_text())["routed"]
    log(f"threads={threads}: loading moec, onnxruntime, llama.cpp")
    moec = MoecModel(workdir / "moec")
    llama = LlamaModel(model_dir / "model-f32.gguf", Path(args.llama_site))
    systems: dict[str, Any] = {
        "moec": moec,
        "onnxruntime": OrtModel(model_dir / "model.onnx", threads),
        "llama.cpp": LlamaContext(llama, threads, exact=True),
        "llama.cpp-fa": LlamaContext(llama, threads, exact=False),
    }
    pool = ThreadPoolExecutor(threads)
    evict = Evictor(args.evict_mb, threads, pool)
    settle_s = 0.1 if threads > 1 else 0.005
    out: dict[str, Any] = {"threads": threads, "settle_s": settle_s, "cases": {}}
    out["llama_load_mode"] = llama.load_mode
    for tokens in (int(t) for t in args.tokens.split(",")):
        ids = reference[f"ids.{tokens}"]
        want = reference[f"logits.{tokens}"]
        made = {name: system.make(ids) for name, system in systems.items()}
        outputs = {name: output() for name, (_, output) in made.items()}
        errors = {f"{name} vs PyTorch": float(np.abs(got - want).max()) for name, got in outputs.items()}
        errors["moec vs onnxruntime"] = float(np.abs(outputs["moec"] - outputs["onnxruntime"]).max())
        strict = [f"{name} vs PyTorch" for name in STRICT] + ["moec vs onnxruntime"]
        bad = {k: errors[k] for k in strict if not errors[k] <= TOLERANCE}
        if bad:
            raise SystemExit(f"threads={threads} tokens={tokens}: logits disagree beyond {TOLERANCE}: {bad}")
        summary = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        log(f"threads={threads} tokens={tokens}: {summary}; timing")
        calls = {name: call for name, (call, _) in made.items()}
        nbytes = floor_bytes(ids, routed[str(tokens)])
        calls[FLOOR] = make_reference_read(nbytes, threads, pool)
        calls[FLOOR]()
        case: dict[str, Any] = {"errors": errors, "floor_bytes": nbytes, "routed": routed[str(tokens)]}
        case["times"] = {
            mode: time_interleaved(calls, mode, args.reps, args.inner, evict, settle_s, settle_cold=True)
            for mode in MODES
        }
        out["cases"][str(tokens)] = case
    if args.profile:
        for tokens in (int(t) for t in args.tokens.split(",")):
            log(f"threads={threads} tokens={tokens}: moec per-function profile")
            ids = reference[f"ids.{tokens}"]
            out["cases"][str(tokens)]["moec_profile"] = profile_moec(moec, ids, evict, args.profile_calls)
    Path(args.json_out).write_text(json.dumps(out))


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
    if system == "moec":
        import tvm  # noqa: F401
        from tvm import relax  # noqa: F401
    elif system == "onnxruntime":
        import onnxruntime  # noqa: F401
    else:
        import_llama(Path(args.llama_site))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids = prompt(int(args.tokens))
    if system == "moec":
        model: Any = MoecModel(workdir / "moec")
    elif system == "onnxruntime":
        model = OrtModel(model_dir / "model.onnx", 1)
    else:
        llama = LlamaModel(model_dir / "model-f32.gguf", Path(args.llama_site))
        model = LlamaContext(llama, 1, exact=system == "llama.cpp")
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
    """One thread count's children: samples pooled, the first child's errors, profile and facts."""
    first = children[0]
    merged = {k: v for k, v in first.items() if k != "cases"}
    merged["processes"] = len(children)
    merged["others_cores"] = [c["others_cores"] for c in children]
    merged["cases"] = {}
    for tokens, case in first["cases"].items():
        cases = [c["cases"][tokens] for c in children]
        out = {k: v for k, v in case.items() if k != "times"}
        out["errors"] = {k: max(c["errors"][k] for c in cases) for k in case["errors"]}
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


def report(results: dict[int, dict[str, Any]], rss: dict[str, dict[str, Any]], facts: dict[str, Any]) -> str:
    """The Markdown section."""
    shown = [FLOOR, *SYSTEMS]
    label = {FLOOR: "floor (numpy read)", **LABELS}
    others = "; ".join(
        f"{n} thread{'s' if n > 1 else ''}: " + ", ".join(f"{c:.2f}" for c in r["others_cores"])
        for n, r in sorted(results.items())
    )
    lines = [
        "## Whole Mixtral-style decoder: moec, onnxruntime, llama.cpp (`benchmarks/bench_decoder.py`)",
        "",
        f"Command (repo root): `{facts['command']}`  ",
        f"Run {facts['date']}, commit {facts['git']}, moec {facts['moec']}, TVM {facts['tvm']}, "
        f"onnxruntime {facts['ort']}, llama-cpp-python {facts['llama']} ({facts['llama_build']}, "
        f"`CMAKE_ARGS={LLAMA_CMAKE_ARGS}`), numpy {np.__version__}; total wall time {facts['wall_s']:.0f} s "
        f"(moec compile {facts['compile_s']:.0f} s).",
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
        "Systems: **moec** = `moec compile model.onnx --target host`, loaded with `ArtifactSession` "
        "(the entry point it picks: `main_one_token` at 1 token, `main` at 16); **onnxruntime** on "
        "the same ONNX file; **llama.cpp** "
        "= llama-cpp-python's `llama_decode` on an F32 GGUF from `convert_hf_to_gguf.py --outtype f32` "
        "of the same weights (`save_pretrained` folder + a 512-piece sentencepiece tokenizer trained "
        f"here), KV cache cleared before every call, logits for every prompt token, model loaded with "
        f"load mode `{facts['llama_load_mode']}` (mmap), in two contexts: *fp32 attention* (flash "
        "attention off, F32 KV cache: fp32 throughout like the others) and *its defaults* (flash "
        "attention auto, which is on for the CPU, and an F16 KV cache: llama.cpp's CPU flash attention "
        "rounds to fp16, hence its ~1e-3 logit errors below); **floor** = a numpy streaming read of "
        "exactly the bytes the call must read (see Method). Cells: median ms (× floor).",
        "",
    ]
    errors = [
        (tokens, case["errors"]) for _, r in sorted(results.items()) for tokens, case in r["cases"].items()
    ]
    seen: dict[str, dict[str, float]] = {}
    for tokens, errs in errors:
        for k, v in errs.items():
            seen.setdefault(tokens, {})[k] = max(v, seen.get(tokens, {}).get(k, 0.0))
    keys = list(next(iter(seen.values())))
    lines += [
        f"Correctness before timing, max abs logit error (every thread count; moec and onnxruntime "
        f"must be ≤ {TOLERANCE:g} of PyTorch and of each other):",
        "",
        *table(["tokens", *keys], [[t, *(f"{e[k]:.1e}" for k in keys)] for t, e in seen.items()]),
        "",
    ]
    rows, p90_rows = [], []
    for threads, res in sorted(results.items()):
        for tokens, case in res["cases"].items():
            for mode in MODES:
                med = {s: stats(case["times"][mode][s]) for s in shown}
                floor = med[FLOOR][0]
                lead = [tokens, str(threads), mode, f"{case['floor_bytes'] / 2**20:.1f}"]
                rows.append(
                    lead
                    + [f"{med[FLOOR][0]:.2f}"]
                    + [f"{med[s][0]:.2f} ({med[s][0] / floor:.2f}×)" for s in SYSTEMS]
                )
                p90_rows.append(lead + [f"{med[s][1]:.2f}" for s in shown])
    header = ["tokens", "threads", "cache", "floor MiB", *(label[s] for s in shown)]
    lines += ["Median latency, ms (× floor):", "", *table(header, rows), "", "p90 latency, ms:", ""]
    lines += [*table(header, p90_rows), ""]

    ratio_rows = []
    for threads, res in sorted(results.items()):
        for tokens, case in res["cases"].items():
            for mode in MODES:
                m = {s: stats(case["times"][mode][s])[0] for s in SYSTEMS}
                ratio_rows.append(
                    [tokens, str(threads), mode] + [f"{m[s] / m['moec']:.2f}×" for s in SYSTEMS[1:]]
                )
    lines += [
        "moec speed-up (other system's median ÷ moec's; > 1: moec is faster):",
        "",
        *table(["tokens", "threads", "cache", *(f"vs {LABELS[s]}" for s in SYSTEMS[1:])], ratio_rows),
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
    for system, r in rss.items():
        base = r["baseline_kib"]
        after = [mib(r["after_kib"]), mib(r["after_kib"] - base)] if "after_kib" in r else ["–", "–"]
        rss_rows.append([LABELS[system], mib(r["peak_kib"]), mib(base), mib(r["peak_kib"] - base), *after])
    lines += [
        f"Peak RSS, MiB: one fresh process per system, 1 thread: imports the system (baseline = "
        f"`ru_maxrss` then), loads the model, runs one {facts['rss_tokens']}-token call; peak = "
        "`ru_maxrss` after the call; *after call* = VmRSS then (what stays resident). llama.cpp maps the "
        "GGUF file (mmap): its weight pages count in RSS as they are touched, and load nothing twice; "
        "so does moec since weights.bin (both runtimes map it and use the tensors in place). "
        f"{RUNNER_ROW}: a fresh runner process (no Python) runs the call (`--threads 1`), its "
        "`ru_maxrss` read by `wait4`; baseline: a runner that only starts (`--help`, TVM's runtime "
        "libraries loaded); both forked by a bare Python launcher (~10 MiB), so neither carries the "
        f"parent's high-water mark; no *after call*. {parent_note}",
        "",
        *table(
            ["system", "peak", "baseline after imports", "peak − baseline", "after call", "after − baseline"],
            rss_rows,
        ),
        "",
    ]

    profiles = [
        (threads, tokens, case["moec_profile"])
        for threads, r in sorted(results.items())
        for tokens, case in r["cases"].items()
        if "moec_profile" in case
    ]
    if profiles:
        lines += [
            f"Where moec's time goes: Relax VM instrument hook around every VM call (a Python callback, "
            f"a few µs per call, so the instrumented call is slower than the timed one: its wall time is "
            f"given), after the timing, {facts['profile_calls']} calls per case, mean ms per decoder call "
            f"(× calls per decoder call), top {PROFILE_TOP}:",
            "",
        ]
        for threads, tokens, prof in profiles:
            for mode in MODES:
                p = prof[mode]
                top = "; ".join(f"`{name}` {ms:.3f} (×{n})" for name, ms, n in p["functions"][:PROFILE_TOP])
                total = sum(ms for _, ms, _ in p["functions"])
                lines.append(
                    f"- {tokens} token(s), {threads} thread, {mode}: instrumented call "
                    f"{p['wall_ms']:.2f} ms, functions {total:.2f} ms in all "
                    f"({len(p['functions'])} distinct): {top}"
                )
        lines.append("")

    first = next(iter(results.values()))
    lines += [
        "Method:",
        "",
        "- One child process per thread count (TVM reads `TVM_NUM_THREADS` once); in it moec, onnxruntime "
        "(`intra_op_num_threads` = the count, `inter_op_num_threads` = 1), llama.cpp (`n_threads` = "
        "`n_threads_batch` = the count; llama-cpp-python imported from its own venv, in the same process) "
        f"and the floor read; {first['processes']} process(es) per thread count, samples pooled.",
        f"- Interleaved: each repetition runs every system once, the order rotated every repetition; "
        f"{facts['reps_total']} repetitions per case. Before every system's turn a settle pause "
        f"({first['settle_s'] * 1e3:.0f} ms at 1 thread, 100 ms at more: the thread pools spin after a "
        "call, and llama.cpp's OpenMP barrier stalls badly on a core taken by another pool's spinning "
        f"thread). Cold: then a {facts['evict_mb']} MiB buffer is read+written then read "
        "(`bench_mixtral_block.Evictor`, on as many threads as the benchmark) and one call is timed. "
        f"Warm: one untimed call, then {facts['inner']} timed calls (1 if a call takes over 50 ms).",
        "- Floor: bytes = the prompt's embedding rows + per layer (q, k, v, o projections, 2 norms, router, "
        "and the distinct experts PyTorch's routers pick for the prompt: 2 per layer at 1 token) + final "
        "norm + LM head, fp32; read by numpy `max` over one buffer of that size split into one slice per "
        "thread (a Python thread pool at 2 threads), timed like the systems. It is what merely streaming "
        "the necessary bytes costs here, cold; warm, part of it comes from the LLC.",
        "- llama.cpp: the timed call is `llama_memory_clear(mem, data=false)` + `llama_decode` + "
        '`llama_synchronize`; onnxruntime: `session.run(["logits"], feeds)`; moec: '
        "`vm[entry](input_ids, *params)` on a pre-converted `tvm.runtime.Tensor`, weights as "
        "`ArtifactSession` holds them (views into the mapped weights.bin, huge pages where the OS "
        "allows, as `moec run`).",
        "",
    ]
    return "\n".join(lines)


def run_parent(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Environments, model, moec compile, the timing children, the peak-RSS children, the report.

    This process imports neither TVM nor onnxruntime until the children are done: a child's
    ``ru_maxrss`` starts from its parent's high-water mark (Linux keeps it across fork + exec), so a
    light parent keeps the children's numbers their own.
    """
    import resource

    wall = time.perf_counter()
    export_python = ensure_export_venv()
    llama_src = llama_source()
    llama_site = ensure_llama_venv()
    model_dir = ensure_model(export_python, llama_src, args.fresh_model)
    model_facts = json.loads((model_dir / "model.json").read_text())
    log(f"model: {model_dir}")
    thread_counts = [int(n) for n in args.threads.split(",")]
    children: dict[int, list[dict[str, Any]]] = defaultdict(list)
    rss: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="moec-decoder-") as tmp:
        workdir = Path(tmp)
        log("moec compile model.onnx --target host")
        started = time.perf_counter()
        cmd = [*moec_command(), "compile", str(model_dir / "model.onnx"), "--target", "host"]
        done = subprocess.run([*cmd, "-o", str(workdir / "moec")], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"moec compile failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        compile_s = time.perf_counter() - started
        log(f"compiled in {compile_s:.0f} s")
        before = busy_and_children_s()
        common = ["--workdir", str(workdir), "--model-dir", str(model_dir), "--llama-site", str(llama_site)]
        for proc in range(args.procs):
            for n in thread_counts:
                json_out = workdir / f"threads{n}_proc{proc}.json"
                env = dict(os.environ, TVM_NUM_THREADS=str(n), OMP_NUM_THREADS=str(n))
                env.update(OPENBLAS_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--threads", str(n), *common]
                cmd += ["--tokens", args.tokens, "--reps", str(args.reps), "--inner", str(args.inner)]
                cmd += ["--evict-mb", str(args.evict_mb), "--json-out", str(json_out)]
                cmd += ["--profile-calls", str(args.profile_calls)]
                if proc == 0 and n == min(thread_counts) and not args.no_profile:
                    cmd.append("--profile")
                wait_quiet(args.wait_quiet)
                log(f"process {proc + 1}/{args.procs}, {n} thread(s)")
                start = busy_and_children_s()
                subprocess.run(cmd, env=env, check=True)
                children[n].append(json.loads(json_out.read_text()))
                children[n][-1]["others_cores"] = others_cores(start, busy_and_children_s())
                log(f"other processes used {children[n][-1]['others_cores']:.2f} cores meanwhile")
        rss_tokens = max(int(t) for t in args.tokens.split(","))
        for system in SYSTEMS:
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
        rss[RUNNER_ROW] = runner = runner_rss(workdir / "moec", workdir, rss_tokens)
        log(f"peak RSS {RUNNER_ROW}: {runner['peak_kib'] / 1024:.0f} MiB (it printed '{runner['printed']}')")
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
        "compile_s": compile_s,
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
    parser.add_argument("--evict-mb", type=int, default=default_evict_mb(), help="cache-flush buffer, MiB")
    parser.add_argument("--no-markdown", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--no-profile", action="store_true", help="skip moec's per-function breakdown")
    parser.add_argument(
        "--profile-calls", type=int, default=None, help="calls per profiled case (default 10)"
    )
    add_wait_quiet_option(parser)
    parser.add_argument("--fresh-model", action="store_true", help="re-export the model even if cached")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--export-child", help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--llama-site", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 20
    if args.procs is None:
        args.procs = 1 if args.quick else 2
    if args.inner is None:
        args.inner = 2 if args.quick else 5
    if args.profile_calls is None:
        args.profile_calls = 3 if args.quick else 10
    args.markdown = not (args.quick or args.no_markdown)
    tokens = [int(t) for t in args.tokens.split(",")]
    if not all(1 <= t <= MAX_TOKENS for t in tokens):
        parser.error(f"--tokens must lie in 1..{MAX_TOKENS}")
    if min(args.reps, args.procs, args.inner, args.evict_mb, args.profile_calls) < 1:
        parser.error("--reps, --procs, --inner, --evict-mb and --profile-calls must be positive")
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
    else:
        run_parent(args, argv)


if __name__ == "__main__":
    main()
