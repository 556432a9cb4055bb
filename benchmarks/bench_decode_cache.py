#!/usr/bin/env python
"""Decoding with a KV cache: one token after a 16-token prompt, moec against onnxruntime and llama.cpp.

What: the whole-decoder benchmark model of ``bench_decoder.py`` (4-layer Mixtral-style
``MixtralForCausalLM``, hidden 512, FFN 1024, 8 experts, top-2, 8 heads, vocab 512, fp32, 210 MiB,
the same seeded weights and HF folder, and its GGUFs), exported for generation with a KV cache:
one step takes the new token, its ``attention_mask`` / ``position_ids`` and every layer's past
keys and values, and returns the logits and the present keys and values (past + the new token).
The timed call is the decode of token 17 with the cache PyTorch holds after the 16-token prompt
(``bench_decoder.prompt``): what every generated token costs.

Systems, on the same weights:

``moec``             ``torch.onnx.export(dynamo=True)`` of the step (``make_fixtures.CachedLogits``,
                     ``batched_mm`` experts; batch, sequence and cache length dynamic), compiled by
                     ``moec compile cache-dynamo.onnx``, run with moec's runtime.
``moec-hf``          transformers' ``OnnxExporter().export_for_generation`` at its defaults (the
                     ``grouped_mm`` experts; its decode graph takes ``position_ids``, no mask),
                     compiled by ``moec compile cache-hf.onnx``.
``moec-int8-dot-all`` ``cache-dynamo.onnx`` with ``--precision int8-dot --dense-precision int8
                     --router-precision int8``: experts W8A8, every other matrix int8 (as Q8_0 makes
                     every matrix 8-bit).
``onnxruntime``      onnxruntime on ``cache-dynamo.onnx``; ``onnxruntime-hf`` on ``cache-hf.onnx``
                     (``intra_op_num_threads`` = threads, sequential).
``llama.cpp``        llama-cpp-python's ``llama_decode`` of the token at position 16 after the
                     prompt was decoded into its KV cache (untimed, once); each timed call first
                     drops position 16 again (``llama_memory_seq_rm``, metadata only). F32 GGUF,
                     flash attention off, F32 KV cache (fp32 throughout like moec);
                     ``llama.cpp-q8_0`` the same on the Q8_0 GGUF.
``floor``            a numpy streaming read of the bytes the step must read: the token's embedding
                     row, every layer's attention, norms and router, the 2 experts PyTorch's routers
                     pick for the token, the final norm and the LM head (fp32, or as each format
                     stores them: ``bench_decoder.system_floor_bytes``), plus the cache (16
                     positions × 4 layers × keys and values).

How: correctness first: every system's logits against PyTorch's (moec and onnxruntime within 1e-3;
the 8-bit systems' error is reported). Then ``bench_decoder``'s protocol: one child process per
thread count and ``--procs``, systems interleaved in each repetition (order rotated), a settle
pause before each, ``cold`` = caches flushed (``Evictor``) then one call, ``warm`` = one untimed
call then ``--inner`` timed calls. Medians reported, with each system ÷ its floor.

Targets (issue 14): moec no slower than llama.cpp at the same weight format (``moec`` vs
``llama.cpp``, ``moec-int8-dot-all`` vs ``llama.cpp-q8_0``), and ≥ 1.5× faster than onnxruntime
on the same ONNX file (``moec`` vs ``onnxruntime``, ``moec-hf`` vs ``onnxruntime-hf``).

Run: ``.venv/bin/python benchmarks/bench_decode_cache.py`` (``--quick`` for a smoke run; the first
run builds the export and llama.cpp venvs and the model as ``bench_decoder.py`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bench_decoder import (
    GGML_TYPE_F32,
    GGUF_TYPES,
    LLAMA_FLASH_ATTN_TYPE_DISABLED,
    MODEL,
    MOEC_FLAGS,
    LlamaModel,
    ensure_export_venv,
    ensure_llama_venv,
    ensure_model,
    floor_bytes,
    gguf_tensors,
    llama_source,
    llama_version,
    moec_command,
    prompt,
    run_logged,
    system_floor_bytes,
)
from bench_mixtral_block import Evictor, default_evict_mb, make_reference_read, time_interleaved
from common import (
    REPO,
    cpu_model,
    git_revision,
    log,
    publish,
    run_timing_children,
    timing_defaults,
    timing_parser,
)

MD_NAME = "bench_decode_cache"
PROMPT_TOKENS = 16
TOLERANCE = 1e-3
MODES = ("cold", "warm")
EXPORT_FORMAT = 1
"""Bump when the export step's outputs change."""
GRAPHS = {"dynamo": "cache-dynamo.onnx", "hf": "cache-hf.onnx"}
SYSTEMS = (
    "moec",
    "moec-hf",
    "moec-int8-dot-all",
    "onnxruntime",
    "onnxruntime-hf",
    "llama.cpp",
    "llama.cpp-q8_0",
)
"""Every system, in table order."""
MOEC_SYSTEMS = {
    "moec": ("dynamo", []),
    "moec-hf": ("hf", []),
    "moec-int8-dot-all": ("dynamo", MOEC_FLAGS["moec-int8-dot-all"]),
}
"""moec systems: the graph each compiles and its ``moec compile`` flags."""
ORT_SYSTEMS = {"onnxruntime": "dynamo", "onnxruntime-hf": "hf"}
WEIGHTS = {
    "moec": "fp32",
    "moec-hf": "fp32",
    "moec-int8-dot-all": "8-bit",
    "onnxruntime": "fp32",
    "onnxruntime-hf": "fp32",
    "llama.cpp": "fp32",
    "llama.cpp-q8_0": "8-bit",
}
STRICT = ("moec", "moec-hf", "onnxruntime", "onnxruntime-hf", "llama.cpp")
"""Systems whose logits must be within TOLERANCE of PyTorch's."""
Fn = Callable[[], object]


# ── export (export venv) ────────────────────────────────────────────────────────


def export_cache_graphs(model_dir: Path, out: Path) -> None:
    """Both cache graphs of the benchmark model and PyTorch's decode step (export venv)."""
    import torch
    import transformers

    sys.path.insert(0, str(REPO / "fixtures"))
    from make_fixtures import export_generation, set_impl, torch_cache_layers  # noqa: E402

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    ids = torch.from_numpy(prompt(PROMPT_TOKENS + 1))

    def load() -> Any:
        model = transformers.MixtralForCausalLM.from_pretrained(model_dir / "hf").eval()
        model.config._attn_implementation = "eager"
        return model

    model = load()
    set_impl(model, "batched_mm")
    routed: list[list[int]] = []
    hooks = [
        layer.mlp.gate.register_forward_hook(
            lambda _m, _a, out: routed.append(sorted({int(e) for e in out[2].flatten()}))
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        cache = model(input_ids=ids[:, :PROMPT_TOKENS], use_cache=True).past_key_values
        routed.clear()
        arrays = {"ids": ids.numpy()}
        for i, layer in enumerate(torch_cache_layers(cache)):
            arrays[f"past.{i}.key"], arrays[f"past.{i}.value"] = layer.keys.numpy(), layer.values.numpy()
        step = model(
            input_ids=ids[:, PROMPT_TOKENS:],
            attention_mask=torch.ones_like(ids),
            position_ids=torch.tensor([[PROMPT_TOKENS]]),
            past_key_values=cache,
            use_cache=True,
        )
        arrays["logits"] = step.logits.numpy().astype(np.float32)
    for hook in hooks:
        hook.remove()
    np.savez(out / "decode.npz", **arrays)
    (out / "decode.json").write_text(json.dumps({"routed": routed, "torch": torch.__version__}))
    traced = {"input_ids": prompt(3), "attention_mask": np.ones((1, 8), np.int64)}
    traced["position_ids"] = np.arange(5, 8)[None]
    for i in range(MODEL["num_hidden_layers"]):
        for kv in ("key", "value"):
            traced[f"past_key_values.{i}.{kv}"] = np.ascontiguousarray(arrays[f"past.{i}.{kv}"][:, :, :5])
    traced = {k: np.ascontiguousarray(v) for k, v in traced.items()}
    export_generation(model, "dynamo", True, True, out / GRAPHS["dynamo"], traced)
    print(f"exported {GRAPHS['dynamo']}", flush=True)
    export_generation(load(), "hf-onnx", True, True, out / GRAPHS["hf"], traced)  # its default experts
    print(f"exported {GRAPHS['hf']}", flush=True)


def ensure_cache_graphs(export_python: Path, model_dir: Path) -> Path:
    """The cached folder with both graphs and PyTorch's decode step (made when missing)."""
    folder = model_dir / f"cache-{EXPORT_FORMAT}"
    if not (folder / "decode.json").exists():
        staging = folder.with_name(folder.name + ".partial")
        staging.mkdir(parents=True, exist_ok=True)
        log(f"exporting the KV-cache decode graphs into {staging}")
        cmd = [export_python, Path(__file__).resolve(), "--export-child", staging, "--model-dir", model_dir]
        run_logged(cmd, "export-cache", env=dict(os.environ, PYTHONPATH=str(REPO)))
        staging.rename(folder)
    return folder


# ── the systems (timing child) ──────────────────────────────────────────────────


def graph_feeds(names: Sequence[str], decode: Any) -> dict[str, np.ndarray]:
    """The decode step's inputs under a graph's input names (token, mask, position, cache)."""
    from moec.runtime.generate import cache_key

    ids = decode["ids"]
    feeds = {}
    for name in names:
        if name == "input_ids":
            feeds[name] = ids[:, PROMPT_TOKENS:]
        elif name == "attention_mask":
            feeds[name] = np.ones_like(ids)
        elif name == "position_ids":
            feeds[name] = np.array([[PROMPT_TOKENS]], np.int64)
        else:
            layer, field = cache_key(name)
            feeds[name] = decode[f"past.{layer}.{field}"]
    return feeds


class MoecDecode:
    def __init__(self, folder: Path, decode: Any) -> None:
        from moec.runtime.session import ArtifactSession

        session = ArtifactSession(folder)
        feeds = graph_feeds([s["name"] for s in session.inputs], decode)
        function = session.vm[session.entry_for(feeds)]
        args, params = session.input_tensors(feeds), session.params
        self.call: Fn = lambda: function(*args, *params)
        self.logits = lambda: self.call()[0].numpy()


class OrtDecode:
    def __init__(self, path: Path, threads: int, decode: Any) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = graph_feeds([i.name for i in session.get_inputs()], decode)
        self.call: Fn = lambda: session.run(None, feeds)
        self.logits = lambda: self.call()[0]


class LlamaDecode:
    """llama.cpp's decode of token 17 after the 16-token prompt was decoded into its KV cache."""

    def __init__(self, model: LlamaModel, threads: int, decode: Any) -> None:
        lib = model.lib
        params = lib.llama_context_default_params()
        params.n_ctx = 256
        params.n_batch = params.n_ubatch = 32
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.type_k = params.type_v = GGML_TYPE_F32
        params.no_perf = True
        ctx = lib.llama_init_from_model(model.model, params)
        if not ctx:
            raise SystemExit("llama.cpp could not create a context")
        memory = lib.llama_get_memory(ctx)
        ids = decode["ids"][0]
        self._batches = [
            self._batch(lib, ids[:PROMPT_TOKENS], 0),
            self._batch(lib, ids[PROMPT_TOKENS:], PROMPT_TOKENS),
        ]
        if lib.llama_decode(ctx, self._batches[0]):
            raise SystemExit("llama.cpp could not decode the prompt")
        step, decode_fn, seq_rm, sync = (
            self._batches[1],
            lib.llama_decode,
            lib.llama_memory_seq_rm,
            lib.llama_synchronize,
        )

        def call() -> None:
            seq_rm(memory, 0, PROMPT_TOKENS, -1)  # forget the previous call's token
            if decode_fn(ctx, step):
                raise RuntimeError("llama_decode failed")
            sync(ctx)

        def logits() -> np.ndarray:
            call()
            row = lib.llama_get_logits_ith(ctx, 0)
            return np.ctypeslib.as_array(row, shape=(model.vocab,)).copy()[None, None]

        self.call, self.logits = call, logits

    @staticmethod
    def _batch(lib: Any, tokens: np.ndarray, start: int) -> Any:
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        for i, token in enumerate(tokens):
            batch.token[i] = int(token)
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if i == len(tokens) - 1 else 0
        batch.n_tokens = len(tokens)
        return batch


def cache_bytes() -> int:
    """The KV cache a decode step reads: 16 positions of keys and values in every layer, fp32."""
    head = MODEL["hidden_size"] // MODEL["num_attention_heads"]
    return PROMPT_TOKENS * MODEL["num_hidden_layers"] * 2 * MODEL["num_key_value_heads"] * head * 4


def decode_floor_bytes(
    system: str, token: np.ndarray, routed: list[list[int]], workdir: Path, model_dir: Path
) -> int:
    """The bytes ``system``'s decode step must read in its own weight format, cache included."""
    narrow = system in ("moec-int8-dot-all", "llama.cpp-q8_0")  # as its manifest / GGUF stores them
    weights = (
        system_floor_bytes(system, token, routed, workdir, model_dir)
        if narrow
        else floor_bytes(token, routed)
    )
    return weights + cache_bytes()


def run_child(args: argparse.Namespace) -> None:
    """Verify and time every system at this process's thread count; samples as JSON."""
    from concurrent.futures import ThreadPoolExecutor

    threads = int(args.threads)
    workdir, model_dir, graphs = Path(args.workdir), Path(args.model_dir), Path(args.graphs)
    chosen = args.systems.split(",")
    decode = dict(np.load(graphs / "decode.npz"))
    routed = json.loads((graphs / "decode.json").read_text())["routed"]
    llamas: dict[str, LlamaModel] = {}
    systems: dict[str, Any] = {}
    for name in chosen:
        if name in MOEC_SYSTEMS:
            systems[name] = MoecDecode(workdir / name, decode)
        elif name in ORT_SYSTEMS:
            systems[name] = OrtDecode(graphs / GRAPHS[ORT_SYSTEMS[name]], threads, decode)
        else:
            outtype = GGUF_TYPES[name]
            if outtype not in llamas:
                llamas[outtype] = LlamaModel(model_dir / f"model-{outtype}.gguf", Path(args.llama_site))
            systems[name] = LlamaDecode(llamas[outtype], threads, decode)
    want = decode["logits"]
    errors = {name: float(np.abs(system.logits() - want).max()) for name, system in systems.items()}
    top1 = {name: bool(system.logits().argmax() == want.argmax()) for name, system in systems.items()}
    bad = {name: e for name, e in errors.items() if name in STRICT and not e <= TOLERANCE}
    if bad:
        raise SystemExit(f"threads={threads}: logits disagree with PyTorch beyond {TOLERANCE}: {bad}")
    log(f"threads={threads}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + "; timing")
    pool = ThreadPoolExecutor(threads)
    evict = Evictor(args.evict_mb, threads, pool)
    token = decode["ids"][:, PROMPT_TOKENS:]
    floors = {
        f"floor {WEIGHTS[name]}": decode_floor_bytes(name, token, routed, workdir, model_dir)
        for name in chosen
    }
    floor_of = {name: f"floor {WEIGHTS[name]}" for name in chosen}
    calls = {name: system.call for name, system in systems.items()}
    for key, nbytes in floors.items():
        calls[key] = make_reference_read(nbytes, threads, pool)
        calls[key]()
    settle_s = 0.1 if threads > 1 else 0.005
    times = {
        mode: time_interleaved(calls, mode, args.reps, args.inner, evict, settle_s, settle_cold=True)
        for mode in MODES
    }
    out = {
        "threads": threads,
        "errors": errors,
        "top1": top1,
        "floors": floors,
        "floor_of": floor_of,
        "times": times,
    }
    Path(args.json_out).write_text(json.dumps(out))


# ── parent ──────────────────────────────────────────────────────────────────────


def compile_system(graphs: Path, workdir: Path, system: str) -> float:
    graph, flags = MOEC_SYSTEMS[system]
    started = time.perf_counter()
    cmd = [
        *moec_command(),
        "compile",
        str(graphs / GRAPHS[graph]),
        "--target",
        "host",
        "-o",
        str(workdir / system),
    ]
    subprocess.run([*cmd, *flags], check=True, capture_output=True)
    seconds = time.perf_counter() - started
    log(f"compiled {system} in {seconds:.1f} s")
    return seconds


def report(results: dict[int, list[dict[str, Any]]], facts: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: median ms per system, thread count and mode, ÷ floor, targets."""
    lines = [
        "## Decoding with a KV cache: moec, onnxruntime, llama.cpp (`benchmarks/bench_decode_cache.py`)",
        "",
        f"Decode of one token after a {PROMPT_TOKENS}-token prompt, with the KV cache, on the whole-decoder "
        "model of `bench_decoder` (4 layers, hidden 512, 8 experts top-2, 210 MiB fp32).",
        "",
        f"- command: `{facts['command']}`; {facts['date']}, git {facts['git']}",
        f"- machine: {facts['cpu']}, {facts['cores']} cores; tvm {facts['tvm']}, onnxruntime {facts['ort']}, "
        f"llama-cpp-python {facts['llama']}",
        f"- {facts['reps']} cold and {facts['reps']} × {facts['inner']} warm calls per system and thread "
        "count, interleaved; medians. `÷ floor`: the system's median over its floor's (a streaming read "
        "of the bytes the step must read in that weight format, cache included).",
        "",
        "| threads | mode | system | weights | ms | ÷ floor | max abs err vs PyTorch | top-1 = PyTorch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for threads, children in sorted(results.items()):
        pooled: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
        for child in children:
            for mode in MODES:
                for name, samples in child["times"][mode].items():
                    pooled[mode].setdefault(name, []).extend(samples)
        first = children[0]
        for mode in MODES:
            median = {name: float(np.median(s)) * 1e3 for name, s in pooled[mode].items()}
            summary[(threads, mode)] = median
            for name in facts["systems"]:
                floor = median[first["floor_of"][name]]
                lines.append(
                    f"| {threads} | {mode} | {name} | {WEIGHTS[name]} | {median[name]:.3f} | "
                    f"{median[name] / floor:.2f} | {first['errors'][name]:.1e} | "
                    f"{'yes' if first['top1'][name] else 'no'} |"
                )
    lines += ["", "Targets (median ms; ✅ met, ❌ not):", ""]
    mark = {True: "✅", False: "❌"}
    for (threads, mode), median in sorted(summary.items()):
        parts = []
        if "moec" in median and "llama.cpp" in median:
            ok = median["moec"] <= median["llama.cpp"]
            parts.append(f"fp32 moec {median['moec']:.3f} vs llama.cpp {median['llama.cpp']:.3f} {mark[ok]}")
        if "moec-int8-dot-all" in median and "llama.cpp-q8_0" in median:
            ok = median["moec-int8-dot-all"] <= median["llama.cpp-q8_0"]
            eight = median["moec-int8-dot-all"]
            parts.append(f"8-bit moec {eight:.3f} vs Q8_0 {median['llama.cpp-q8_0']:.3f} {mark[ok]}")
        for ours, theirs in (("moec", "onnxruntime"), ("moec-hf", "onnxruntime-hf")):
            if ours in median and theirs in median:  # the same ONNX file
                speedup = median[theirs] / median[ours]
                parts.append(f"{ours} {speedup:.2f}× faster than {theirs} {mark[speedup >= 1.5]} (≥ 1.5×)")
        lines.append(f"- {threads} thread(s), {mode}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def run_parent(args: argparse.Namespace, argv: Sequence[str]) -> None:
    export_python = ensure_export_venv()
    llama_src = llama_source()
    llama_site = ensure_llama_venv()
    chosen = args.systems.split(",")
    outtypes = sorted({GGUF_TYPES[s] for s in chosen if s in GGUF_TYPES})
    model_dir = ensure_model(export_python, llama_src, False, outtypes)
    for outtype in outtypes:  # the tensor sizes the GGUF floors read (model-<type>.gguf.json)
        gguf_tensors(export_python, llama_src, model_dir / f"model-{outtype}.gguf")
    graphs = ensure_cache_graphs(export_python, model_dir)
    thread_counts = [int(n) for n in args.threads.split(",")]
    with tempfile.TemporaryDirectory(prefix="moec-decode-cache-") as tmp:
        workdir = Path(tmp)
        compile_s = {s: compile_system(graphs, workdir, s) for s in chosen if s in MOEC_SYSTEMS}
        common = ["--workdir", str(workdir), "--model-dir", str(model_dir), "--graphs", str(graphs)]
        common += ["--llama-site", str(llama_site), "--systems", args.systems]
        common += ["--reps", str(args.reps), "--inner", str(args.inner), "--evict-mb", str(args.evict_mb)]
        children, _ = run_timing_children(
            Path(__file__).resolve(),
            workdir,
            thread_counts,
            args.procs,
            args.wait_quiet,
            lambda _p, _n: common,
        )
    import onnxruntime
    import tvm

    facts = {
        "command": " ".join(
            [".venv/bin/python", "benchmarks/bench_decode_cache.py", *map(shlex.quote, argv)]
        ),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "git": git_revision(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "tvm": tvm.__version__,
        "ort": onnxruntime.__version__,
        "llama": llama_version(),
        "systems": chosen,
        "compile_s": compile_s,
        "reps": args.reps * args.procs,
        "inner": args.inner,
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"facts": facts, "children": children}))
    publish(report(children, facts), args.markdown, MD_NAME)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = timing_parser(__doc__, default_evict_mb())
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated subset of: " + ", ".join(SYSTEMS)
    )
    parser.add_argument("--json", help="also write the raw samples and facts to this file")
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--graphs", help=argparse.SUPPRESS)
    parser.add_argument("--llama-site", help=argparse.SUPPRESS)
    parser.add_argument("--export-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    return timing_defaults(parser, args)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.export_child:
        export_cache_graphs(Path(args.model_dir), Path(args.export_child))
    elif args.child:
        run_child(args)
    else:
        run_parent(args, argv)


if __name__ == "__main__":
    main()
