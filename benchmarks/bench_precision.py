#!/usr/bin/env python
"""Per-expert weight precision: speed on the Mixtral-style block, task accuracy on a trained classifier.

What, part 1 (speed): the block of ``bench_mixtral_block.py`` (hidden 512, FFN 1024, 8 SwiGLU
experts, top-2 of a softmax router renormalised over the two; 48 MiB of fp32 expert weights,
more than this machine's last-level cache), compiled by moec for ``host`` once per precision
plan, plus two onnxruntime systems on the same weights:

``fp32``       every expert fp32 (moec's default).
``fp16``       every expert fp16 (``--precision fp16``; widened to fp32 on load).
``int8``       every expert symmetric int8, one fp32 scale per output row (``--precision int8``).
``int8-g64``   int8 with one scale per 64 inputs of a row (``--precision int8 --int8-group 64``).
``int8-dot``   the int8 plan's weights multiplied in INT8 (W8A8, ``--precision int8-dot``): each
               kernel's input rows quantized per row at run time, VNNI ``vpdpbusd`` dot products;
               only where the host computes int8 (``moec targets``).
``article``    the policy of the edge-MoE article: the most frequently routed half of each layer's
               experts int8, the rest fp32; frequencies from ``moec.analysis.profile.profile_model``
               on a few hundred random tokens (not the timed inputs).
``budget``     the plan ``moec compile --accuracy-budget X`` chooses
               (``moec.analysis.precision_budget.choose_precisions`` on the profile and those random
               tokens); skipped with a note where that API is missing.
``ort-qmoe``   onnxruntime's ``com.microsoft::QMoE`` (8 bits, per channel, ``block_size`` 0) on the
               int8 plan's very weights: ``moec.kernels.formats.quantize_int8`` codes ``q`` stored as
               ``q + 128`` (QMoE's default zero point is 128), its scales; fc1 gate/up rows
               interleaved (``swiglu_fusion=1``) as in ``bench_mixtral_block``'s MoE model.
``qmoe4``      moec on a 4-bit ``QMoE`` model of the same weights (``qmoe4.onnx``: per output channel,
               ``q = clip(rint(W / s), -8, 7)``, ``s = max |W| / 7``, codes ``q + 8`` two per byte),
               compiled with the defaults: the model's own integers unpacked to one byte each and
               its scales (``int8_source: model``), nothing requantized.
``ort-qmoe4``  onnxruntime's ``QMoE`` on that 4-bit model: the packed codes, half the bytes again.
``ort-moe``    onnxruntime's fp32 ``com.microsoft::MoE`` (``bench_mixtral_block``'s model), baseline.

What, part 2 (accuracy): the trained digits classifier (``fixtures/models/digits-moe.onnx``, 2 MoE
layers of 8 experts) compiled with the equivalent plans (article policy and budget from a profile
of ``calib.x``), and with static expert masking (keep 6 and 4 of 8, ``choose_kept``) and early
exit (``skip_top1_above=0.6``): test-split task accuracy, the largest logit change against the fp32
artifact, and the expert weight bytes the manifest lists.

Why: storing experts narrower cuts the bytes a token reads, and decoding an MoE block is a
weight-streaming problem, so the speed-up should follow the bytes; the table says how closely
it does (latency ÷ a floor made of exactly those bytes) and what it costs a real task.

How:

* Verified before timing, at every token count and in every timing process: the fp32 plan and
  ORT's MoE against the float64 numpy block (``bench_mixtral_block.numpy_block``), every other
  moec plan against ``moec.reference.stored.run_stored_reference`` of the standard model with
  the artifact's layer plans (``moec.verify.layer_plans``), ORT's QMoE against that reference of
  the int8 plan; all within 1e-4. For QMoE that tolerance is not loosened: its weights
  ``(code - 128) * scale`` are bit for bit the int8 plan's ``q * scale`` in fp32, and ORT 1.32's
  CPU kernel runs 8-bit per-channel weights through a float path (only block-wise 8-bit
  quantizes the activations), so as for the fp32 systems only the summation order differs
  (measured: under 1e-6). The digits artifacts are checked the same way
  (``moec.verify.reference_outputs``) on the test split.
* Timing as ``bench_mixtral_block`` does it, with its helpers: one subprocess per thread count
  (and ``--procs`` processes each, samples pooled); systems interleaved round-robin, the order
  rotated every repetition; ``cold`` = caches flushed by streaming a buffer larger than the LLC
  before every timed call, ``warm`` = settle, one untimed call, then ``--inner`` timed calls.
* Floor: per system and case, a cold numpy read (``max``, one slice per thread) of exactly the
  bytes that call must read: the distinct routed experts' bytes in their stored formats, from
  the manifest's per-expert ``bytes`` (matrices at 4/2/1 bytes per weight, int8 scales,
  biases); for ORT's ops, their fc1/fc2 tensors (codes and scales for QMoE). Timed interleaved
  with the systems, as pseudo-systems (one per distinct byte count). Routing does not depend on
  the plan (the router stays fp32), so every plan hits the same experts.

Run from the repository root (about 2 minutes of it, whatever the options, choose and compile the
15 artifacts; the full run's timing adds about 2 more on a quiet 2-core machine, plus any wait
for it to become quiet)::

    .venv/bin/python benchmarks/bench_precision.py                  # full run, updates BENCHMARKS.md
    .venv/bin/python benchmarks/bench_precision.py --quick --no-markdown --wait-quiet 30   # smoke, ~3 min
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from bench_mixtral_block import (
    EXPERTS,
    FFN,
    HIDDEN,
    TOP_K,
    Evictor,
    bench_input,
    build_models,
    default_evict_mb,
    llc_bytes,
    make_reference_read,
    numpy_block,
    read_bandwidth,
    stats,
    time_interleaved,
)
from common import (
    REPO,
    MoecModel,
    cpu_model,
    git_revision,
    log,
    publish,
    run_timing_children,
    timing_defaults,
    timing_parser,
)

TOLERANCE = 1e-4
"""Max abs error of every system against its oracle (see the module docstring)."""
PROFILE_SEED = 4321
PROFILE_SAMPLES = 2
PROFILE_TOKENS = 128
"""The block's profile: PROFILE_SAMPLES x PROFILE_TOKENS standard-normal tokens (the budget
chooses on one sample and checks on the other)."""
DEFAULT_BUDGET = 0.01
DIGITS = REPO / "fixtures" / "models" / "digits-moe.onnx"
DIGITS_KEEP = (6, 4)
DIGITS_SKIP = 0.6
MODES = ("cold", "warm")
ORT_SYSTEMS = {"ort-qmoe": "ORT QMoE (int8)", "ort-qmoe4": "ORT QMoE (4-bit)", "ort-moe": "ORT MoE (fp32)"}
ORT_ORACLES = {"ort-qmoe": "int8", "ort-qmoe4": "qmoe4"}
"""The moec plan whose numpy oracle each QMoE system is checked against (the same weights)."""
MD_NAME = "bench_precision"

Make = Callable[[np.ndarray], tuple[Callable[[], object], Callable[[], np.ndarray]]]


# ---------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """One way to store the experts: a key (artifact folder), a label, the ``moec compile`` flags
    that make it, and the ``CompileOptions`` fields (JSON-ready)."""

    key: str
    label: str
    flags: str
    options: dict[str, Any]
    model: str = "standard.onnx"
    """The model compiled, in the work folder."""


def budget_api() -> Callable[..., Any] | None:
    """``choose_precisions`` of ``moec.analysis.precision_budget``, or None where it does not exist."""
    try:
        from moec.analysis.precision_budget import choose_precisions
    except ImportError:
        return None
    return choose_precisions


def host_int8_dot() -> bool:
    """Whether this machine's CPU computes int8 (the int8-dot plan runs here); logs when not."""
    from moec.targets import load_target

    if load_target("host").int8_dot is None:
        log("this CPU has no INT8 dot products (VNNI): no int8-dot plan")
        return False
    return True


def allowed_error(key: str, expected: np.ndarray) -> float:
    """How far a system may be from its oracle: 1e-4, or for INT8 arithmetic (int8-dot) the
    documented relative bound (``REDUCED_ARITHMETIC_TOLERANCE`` of the largest output: an
    intermediate activation may round to the neighbouring INT8 level)."""
    from moec.kernels.formats import REDUCED_ARITHMETIC_TOLERANCE

    if key.startswith("int8-dot"):
        return max(TOLERANCE, REDUCED_ARITHMETIC_TOLERANCE * float(np.abs(expected).max()))
    return TOLERANCE


def precision_plans(
    model: Any, model_path: Path, samples: list[dict[str, np.ndarray]], budget: float
) -> tuple[list[Plan], dict[str, Any], dict[str, Any] | None]:
    """The plans for ``model`` (see the module docstring), its profile over ``samples``, and the
    budget choice's record (None where the API is missing or refused the call)."""
    from moec.analysis.profile import profile_model

    profile = profile_model(model, model_path, samples)
    article = {}
    for layer in profile["layers"]:
        order = np.argsort(-np.asarray(layer["activation_frequency"]), kind="stable")
        hot = set(order[: layer["experts"] // 2].tolist())
        article[layer["name"]] = ["int8" if e in hot else "fp32" for e in range(layer["experts"])]
    plans = [
        Plan("fp32", "all fp32", "–", {}),
        Plan("fp16", "all fp16", "`--precision fp16`", {"precision": "fp16"}),
        Plan("int8", "all int8, per channel", "`--precision int8`", {"precision": "int8"}),
        Plan(
            "int8-g64",
            "all int8, groups of 64",
            "`--precision int8 --int8-group 64`",
            {"precision": "int8", "int8_group": 64},
        ),
        *(
            [Plan("int8-dot", "all int8-dot (W8A8)", "`--precision int8-dot`", {"precision": "int8-dot"})]
            if host_int8_dot()
            else []
        ),
        Plan(
            "article",
            "article: hot half int8",
            "`--precision-plan` (each layer's most routed half int8)",
            {"precision_plan": article},
        ),
    ]
    choose = budget_api()
    record = None
    if choose is None:
        log("moec.analysis.precision_budget.choose_precisions is not importable: no budget plan")
    else:
        try:
            result = choose(model, profile, samples, budget, progress=lambda m: log(f"budget: {m}"))
        except TypeError as err:  # the API is new; say so rather than fail the whole benchmark
            log(f"choose_precisions refused this call ({err}): no budget plan")
        else:
            precisions = {name: list(p) for name, p in result.precisions.items()}
            record = {
                "budget": budget,
                "error": float(result.error),
                "held_out_error": None if result.held_out_error is None else float(result.held_out_error),
            }
            plans.append(
                Plan(
                    "budget",
                    f"budget {budget:g}",
                    f"`--accuracy-budget {budget:g}`",
                    {"precision_plan": precisions},
                )
            )
    return plans, profile, record


def compile_plan(model_path: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Compile ``model_path`` for ``host`` with ``options`` into ``out``; return its manifest."""
    from moec.compiler.compile import compile_model
    from moec.options import CompileOptions

    compile_model(model_path, out, CompileOptions(target="host", force=True, **options))
    return json.loads((out / "manifest.json").read_text())


def expert_bytes(manifest: dict[str, Any]) -> dict[str, list[int]]:
    """Per layer name, the bytes each expert occupies in ``weights.bin`` (0 when masked)."""
    return {layer["name"]: [entry["bytes"] for entry in layer["plan"]] for layer in manifest["layers"]}


def precisions_text(manifest: dict[str, Any]) -> str:
    """Each layer's expert precisions, compactly: ``int8 ×8`` or ``0-3 int8, 4-7 fp32`` style."""
    parts = []
    for layer in manifest["layers"]:
        names = [entry["precision"] for entry in layer["plan"] if entry["kept"]]
        if len(set(names)) == 1:
            text = f"{names[0]} ×{len(names)}"
        else:
            text = " ".join(
                f"{entry['expert']}:{entry['precision']}" for entry in layer["plan"] if entry["kept"]
            )
        parts.append(text if len(manifest["layers"]) == 1 else f"{layer['name']} {text}")
    return "; ".join(parts)


def expected_bytes(profile: dict[str, Any], manifest: dict[str, Any]) -> float:
    """Expected expert bytes read per token: sum over layers and experts of activation frequency
    (share of tokens routed to the expert) x the expert's stored bytes."""
    stored = expert_bytes(manifest)
    return float(
        sum(np.dot(layer["activation_frequency"], stored[layer["name"]]) for layer in profile["layers"])
    )


# ---------------------------------------------------------------------------
# the block: onnxruntime's QMoE model, references
# ---------------------------------------------------------------------------


def build_qmoe(workdir: Path, weights: dict[str, np.ndarray], bits: int = 8) -> None:
    """Write ``qmoe.onnx`` (8 bits: the int8 plan's weights) or ``qmoe4.onnx`` (4 bits per
    channel, see the module docstring): the router MatMul and ``com.microsoft::QMoE``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from moec.kernels.formats import quantize_int8

    def codes_and_scales(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[E, in, out]`` matrices (``x @ W``) as QMoE's uint8 ``[E, out, in]`` codes (4 bits:
        unpacked, ``[E, out, in]`` values 0..15) and ``[E, out]`` scales."""
        w = np.ascontiguousarray(matrices.transpose(0, 2, 1)).astype(np.float32)
        if bits == 8:
            q, scale = quantize_int8(w, 0)
            return (q.astype(np.int16) + 128).astype(np.uint8), scale
        scale = (np.abs(w).max(axis=2) / np.float32(7)).astype(np.float32)
        q = np.clip(np.rint(w / scale[..., None]), -8, 7)
        return (q + 8).astype(np.uint8), scale

    def packed(codes: np.ndarray) -> np.ndarray:
        """Codes as QMoE stores them: 8 bits as they are, 4 bits two per byte, low nibble first."""
        return codes if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)

    gate, gate_s = codes_and_scales(weights["gate"])
    up, up_s = codes_and_scales(weights["up"])
    fc2, fc2_s = codes_and_scales(weights["down"])
    fc1 = np.empty((EXPERTS, 2 * FFN, HIDDEN), np.uint8)  # row 2i: gate channel i, row 2i+1: up channel i
    fc1[:, 0::2], fc1[:, 1::2] = gate, up
    fc1, fc2 = packed(fc1), packed(fc2)
    fc1_s = np.empty((EXPERTS, 2 * FFN), np.float32)
    fc1_s[:, 0::2], fc1_s[:, 1::2] = gate_s, up_s
    nodes = [
        helper.make_node("MatMul", ["x", "router_w"], ["logits"], name="router"),
        helper.make_node(
            "QMoE",
            ["x", "logits", "fc1", "fc1_scales", "", "fc2", "fc2_scales"],
            ["y"],
            name="qmoe",
            domain="com.microsoft",
            activation_type="swiglu",
            swiglu_fusion=1,
            k=TOP_K,
            normalize_routing_weights=1,
            activation_alpha=1.0,
            activation_beta=0.0,
            expert_weight_bits=bits,
        ),
    ]
    initializers = {"router_w": weights["router_w"], "fc1": fc1, "fc1_scales": fc1_s, "fc2": fc2}
    initializers["fc2_scales"] = fc2_s
    graph = helper.make_graph(
        nodes,
        "mixtral_block_qmoe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", HIDDEN])],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )
    model = helper.make_model(
        graph,
        ir_version=10,
        producer_name="bench_precision",
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    onnx.checker.check_model(model)
    onnx.save(model, workdir / ("qmoe.onnx" if bits == 8 else "qmoe4.onnx"))


ORT_EXPERT_BYTES = {
    "ort-moe": 3 * HIDDEN * FFN * 4,
    "ort-qmoe": 3 * HIDDEN * FFN + (2 * FFN + HIDDEN) * 4,
    "ort-qmoe4": 3 * HIDDEN * FFN // 2 + (2 * FFN + HIDDEN) * 4,
}
"""Bytes of one expert in ORT's ops: fp32 fc1 + fc2; uint8 codes (4 bits: two per byte) + fp32
per-row scales."""


def prepare_block(workdir: Path, tokens: Sequence[int], budget: float) -> dict[str, Any]:
    """Build the block's models, choose and compile the plans, compute every plan's oracle output;
    write ``systems.json`` and ``references.npz`` for the timing processes; return the facts."""
    from moec.frontend.loader import load_model
    from moec.reference.stored import run_stored_reference
    from moec.verify import layer_plans

    weights = build_models(workdir)
    build_qmoe(workdir, weights)
    build_qmoe(workdir, weights, bits=4)
    model = load_model(workdir / "standard.onnx")
    rng = np.random.default_rng(PROFILE_SEED)
    samples = [
        {"x": rng.standard_normal((PROFILE_TOKENS, HIDDEN)).astype(np.float32)}
        for _ in range(PROFILE_SAMPLES)
    ]
    log(f"block: profiling on {PROFILE_SAMPLES} x {PROFILE_TOKENS} random tokens, choosing plans")
    plans, profile, budget_record = precision_plans(model, workdir / "standard.onnx", samples, budget)
    plans.append(Plan("qmoe4", "4-bit QMoE model, its own int8", "– (on `qmoe4.onnx`)", {}, "qmoe4.onnx"))
    models = {name: load_model(workdir / name) for name in {plan.model for plan in plans}}
    references: dict[str, np.ndarray] = {}
    rows = []
    fp32_y = {t: numpy_block(bench_input(t), weights)[0] for t in tokens}
    for plan in plans:
        log(f"block: compiling plan {plan.key}")
        manifest = compile_plan(workdir / plan.model, workdir / plan.key, plan.options)
        layer_plan = layer_plans(manifest)
        errors = {}
        for t in tokens:
            if layer_plan:
                y = run_stored_reference(models[plan.model], {"x": bench_input(t)}, layer_plan)["y"]
                references[f"{plan.key}.{t}"] = y
            else:
                y = fp32_y[t]
            diff = np.asarray(y, np.float64) - fp32_y[t]
            errors[t] = (float(np.sqrt((diff**2).sum() / (fp32_y[t] ** 2).sum())), float(np.abs(diff).max()))
        rows.append(
            {
                "key": plan.key,
                "label": plan.label,
                "flags": plan.flags,
                "precisions": precisions_text(manifest),
                "expert_bytes": expert_bytes(manifest)["moe0"],
                "expected_bytes": expected_bytes(profile, manifest),
                "output_error": errors,
                "quantized": bool(layer_plan),
            }
        )
    np.savez(workdir / "references.npz", **references)
    (workdir / "systems.json").write_text(json.dumps(rows))
    return {
        "plans": rows,
        "budget": budget_record,
        "frequency": profile["layers"][0]["activation_frequency"],
    }


# ---------------------------------------------------------------------------
# the digits classifier: accuracy and bytes
# ---------------------------------------------------------------------------


def digits_accuracy(workdir: Path, budget: float) -> dict[str, Any]:
    """Every plan, two maskings and early exit on the digits classifier: accuracy, logit change,
    expert bytes; each artifact first checked against its numpy oracle on the test split."""
    from moec.analysis.accuracy import artifact_logits, task_accuracy
    from moec.analysis.masking import choose_kept
    from moec.frontend.loader import load_model
    from moec.verify import reference_outputs

    with np.load(DIGITS.with_suffix(".npz")) as npz:
        data = {key: npz[key] for key in npz.files}
    model = load_model(DIGITS)
    samples = [{"pixels": part} for part in np.array_split(data["calib.x"], 2)]
    log(f"digits: profiling on calib.x ({len(data['calib.x'])} images), choosing plans")
    plans, profile, budget_record = precision_plans(model, DIGITS, samples, budget)
    for keep in DIGITS_KEEP:
        kept = choose_kept(profile, keep_experts=keep)
        plans.append(
            Plan(
                f"keep{keep}",
                f"mask: keep {keep} of {EXPERTS}",
                f"`--keep-experts {keep}`",
                {"kept_experts": kept},
            )
        )
    plans.append(
        Plan(
            "skip",
            f"early exit: top-1 > {DIGITS_SKIP:g}",
            f"`--skip-top1-above {DIGITS_SKIP:g}`",
            {"skip_top1_above": DIGITS_SKIP},
        )
    )
    rows = []
    baseline = None
    feeds = {"pixels": data["test.x"]}
    for plan in plans:
        log(f"digits: compiling {plan.key}")
        out = workdir / f"digits-{plan.key}"
        manifest = compile_plan(DIGITS, out, plan.options)
        logits = artifact_logits(out, data["test.x"])
        expected = reference_outputs(model, manifest, feeds)["logits"]
        error = float(np.abs(logits.astype(np.float64) - expected).max())
        allowed = allowed_error(plan.key, expected)
        if not error <= allowed:
            raise SystemExit(f"digits {plan.key}: artifact vs numpy oracle {error:.2e} > {allowed:.2e}")
        baseline = logits if baseline is None else baseline
        stored = sum(sum(b) for b in expert_bytes(manifest).values())
        precision_plan = plan.key not in {"skip"} and not plan.key.startswith("keep")
        rows.append(
            {
                "key": plan.key,
                "label": plan.label,
                "flags": plan.flags,
                "precisions": precisions_text(manifest) if precision_plan else "fp32",
                "accuracy": task_accuracy(logits, data["test.y"]),
                "logit_diff": float(np.abs(logits - baseline).max()),
                "agreement": float(np.mean(logits.argmax(1) == baseline.argmax(1))),
                "expert_bytes": int(stored),
                "expected_bytes": expected_bytes(profile, manifest) if precision_plan else None,
                "oracle_error": error,
            }
        )
    return {
        "rows": rows,
        "budget": budget_record,
        "pytorch_accuracy": task_accuracy(data["test.logits"], data["test.y"]),
        "test_images": len(data["test.y"]),
        "calib_images": len(data["calib.x"]),
    }


# ---------------------------------------------------------------------------
# child: load, verify, time one thread count
# ---------------------------------------------------------------------------


def load_systems(workdir: Path, plans: list[dict[str, Any]], threads: int) -> dict[str, Make]:
    """Every system as ``make(x) -> (timed call, output)``: moec's plans, then ORT's two ops."""
    import onnxruntime as ort

    systems: dict[str, Make] = {}
    for plan in plans:
        systems[plan["key"]] = MoecModel(workdir / plan["key"]).make

    def ort_make(path: Path) -> Make:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def make(x: np.ndarray) -> tuple[Callable[[], object], Callable[[], np.ndarray]]:
            feeds = {"x": x}
            return (lambda: session.run(["y"], feeds)), (lambda: session.run(["y"], feeds)[0])

        return make

    systems["ort-qmoe"] = ort_make(workdir / "qmoe.onnx")
    systems["ort-qmoe4"] = ort_make(workdir / "qmoe4.onnx")
    systems["ort-moe"] = ort_make(workdir / "ms_moe.onnx")
    return systems


def run_child(args: argparse.Namespace) -> None:
    """Verify and time every system for one thread count (this process's ``TVM_NUM_THREADS``)."""
    threads = int(args.threads)
    if os.environ.get("TVM_NUM_THREADS") != str(threads):
        raise SystemExit("child must be started with TVM_NUM_THREADS equal to --threads")
    workdir = Path(args.workdir)
    plans = json.loads((workdir / "systems.json").read_text())
    weights = dict(np.load(workdir / "weights.npz"))
    with np.load(workdir / "references.npz") as npz:
        references = {key: npz[key] for key in npz.files}
    log(f"threads={threads}: loading {len(plans)} moec artifacts and onnxruntime")
    systems = load_systems(workdir, plans, threads)
    per_expert = {plan["key"]: np.asarray(plan["expert_bytes"]) for plan in plans}
    per_expert.update({name: np.full(EXPERTS, size) for name, size in ORT_EXPERT_BYTES.items()})
    quantized = {plan["key"] for plan in plans if plan["quantized"]}
    pool = ThreadPoolExecutor(threads)
    evict = Evictor(args.evict_mb, threads, pool)
    repeats = 3 if args.quick else 5
    bandwidths = [read_bandwidth(evict.buffer, threads, repeats, pool)]
    settle_s = 0.1 if threads > 1 else 0.005
    out: dict[str, Any] = {"threads": threads, "settle_s": settle_s, "cases": {}}
    for t in (int(v) for v in args.tokens.split(",")):
        x = bench_input(t)
        y64, top = numpy_block(x, weights)
        hit = np.unique(top)
        made = {name: make(x) for name, make in systems.items()}
        errors, allowed = {}, {}
        for name, (_, output) in made.items():
            oracle = ORT_ORACLES.get(name, name)
            expected = references[f"{oracle}.{t}"] if oracle in quantized else y64
            errors[name] = float(np.abs(output().astype(np.float64) - expected).max())
            allowed[name] = allowed_error(name, expected)
        bad = {name: e for name, e in errors.items() if not e <= allowed[name]}
        if bad:
            raise SystemExit(
                f"threads={threads} tokens={t}: outputs differ from their oracle beyond bounds: {bad}"
            )
        log(
            f"threads={threads} tokens={t}: every system matches its oracle "
            f"(max {max(errors.values()):.1e}); timing"
        )
        read_bytes = {name: int(per_expert[name][hit].sum()) for name in systems}
        calls = {name: call for name, (call, _) in made.items()}
        for size in sorted(set(read_bytes.values())):
            calls[f"read:{size}"] = make_reference_read(size, threads, pool)
            calls[f"read:{size}"]()
        out["cases"][str(t)] = {
            "experts": hit.tolist(),
            "errors": errors,
            "read_bytes": read_bytes,
            "times": {
                mode: time_interleaved(calls, mode, args.reps, args.inner, evict, settle_s) for mode in MODES
            },
        }
    bandwidths.append(read_bandwidth(evict.buffer, threads, repeats, pool))
    out["bandwidth"] = max(bandwidths)
    Path(args.json_out).write_text(json.dumps(out))


def merge(children: list[dict[str, Any]]) -> dict[str, Any]:
    """One thread count's child results: samples pooled, the highest bandwidth, the worst error."""
    first = children[0]
    merged = {"threads": first["threads"], "settle_s": first["settle_s"], "processes": len(children)}
    merged["cases"] = {}
    merged["bandwidth"] = max(c["bandwidth"] for c in children)
    for t, case in first["cases"].items():
        cases = [c["cases"][t] for c in children]
        merged["cases"][t] = {
            "experts": case["experts"],
            "read_bytes": case["read_bytes"],
            "errors": {name: max(c["errors"][name] for c in cases) for name in case["errors"]},
            "times": {
                mode: {
                    name: [v for c in cases for v in c["times"][mode][name]] for name in case["times"][mode]
                }
                for mode in MODES
            },
        }
    return merged


# ---------------------------------------------------------------------------
# parent: prepare, run children, report
# ---------------------------------------------------------------------------


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


def report(
    block: dict[str, Any], results: dict[int, dict[str, Any]], digits: dict[str, Any], facts: dict[str, Any]
) -> str:
    """The Markdown section: setup, the block's plans, speed per thread and token count, digits."""
    plans = block["plans"]
    labels = {plan["key"]: f"moec {plan['label']}" for plan in plans} | ORT_SYSTEMS
    bw = ", ".join(
        f"{n} thread{'s' if n > 1 else ''}: {r['bandwidth'] / 1e9:.1f} GB/s"
        for n, r in sorted(results.items())
    )
    worst = max(
        (e for r in results.values() for c in r["cases"].values() for e in c["errors"].values()), default=0.0
    )
    freq = ", ".join(f"{e}: {f * 100:.0f} %" for e, f in enumerate(block["frequency"]))
    lines = [
        "## Per-expert precision: speed on the Mixtral-style block, accuracy on a trained classifier "
        "(`benchmarks/bench_precision.py`)",
        "",
        f"Command (repo root): `{facts['command']}`  ",
        f"Run {facts['date']}, commit {facts['git']}, moec {facts['moec']}, TVM {facts['tvm']}, "
        f"onnxruntime {facts['ort']}, numpy {np.__version__}; total wall time {facts['wall_s']:.0f} s.",
        "",
        f"Machine: {facts['cpu']}, {facts['cores']} cores, LLC {facts['llc_mib']:.0f} MiB (sysfs), "
        f"DRAM read bandwidth {bw} (numpy `max`, as in `bench_mixtral_block`). Shared: other processes "
        "used, per timing process, "
        + "; ".join(
            f"{n} thread(s): " + ", ".join(f"{c:.2f}" for c in cores)
            for n, cores in sorted(facts["others_cores"].items())
        )
        + " cores (the script waits for a quiet machine before each timing process).",
        "",
        "### Speed: Mixtral-style block",
        "",
        f"Block: `bench_mixtral_block`'s (hidden {HIDDEN}, FFN {FFN}, {EXPERTS} SwiGLU experts, top-{TOP_K}, "
        f"softmax router renormalised, no biases; {EXPERTS * 3 * HIDDEN * FFN * 4 / 2**20:.0f} MiB of fp32 "
        f"expert weights), same weights in every system. Plans chosen from a profile of {PROFILE_SAMPLES} × "
        f"{PROFILE_TOKENS} standard-normal tokens (seed {PROFILE_SEED}); share of tokens routed to each "
        f"expert: {freq}."
        + (
            f" Budget plan: relative RMS output error {block['budget']['error']:.2g} on the sample it was "
            f"chosen on, {block['budget']['held_out_error']:.2g} held out "
            f"(budget {block['budget']['budget']:g})."
            if block["budget"] and block["budget"]["held_out_error"] is not None
            else ""
        )
        + ("" if block["budget"] else " No budget plan: `moec.analysis.precision_budget` was not available."),
        "",
        "| plan | `moec compile` flags | expert precisions | stored expert MiB | expected MiB read per token "
        f"(profile) | output error vs fp32 at {max(plans[0]['output_error'], key=int)} tokens: "
        "relative RMS / max abs |",
        "|---|---|---|---|---|---|",
    ]
    for plan in plans:
        rms, peak = plan["output_error"][max(plan["output_error"], key=int)]
        lines.append(
            f"| {plan['label']} | {plan['flags']} | {plan['precisions']} | "
            f"{mib(sum(plan['expert_bytes']))} | {mib(plan['expected_bytes'])} | {rms:.2e} / {peak:.2e} |"
        )
    lines += [
        "",
        "Verified before timing, in every timing process: moec's fp32 plan and ORT's MoE against the float64 "
        "numpy block, every other moec plan against `run_stored_reference` with the artifact's layer plans, "
        f"ORT's QMoE against that reference of the int8 plan; all within {TOLERANCE:g} "
        f"(int8-dot: within 1% of the largest output, the documented bound of INT8 arithmetic; "
        f"largest error seen {worst:.1e}).",
        "",
        "Cells: median and p90 latency in ms; × floor = median ÷ the floor; vs fp32 = moec all-fp32's median "
        "÷ this system's (> 1: faster). Floor = the cold median of a numpy read of exactly the bytes this "
        "system must read for this call (its distinct routed experts in their stored formats), timed "
        "interleaved with the systems.",
        "",
    ]
    for n, res in sorted(results.items()):
        for t, case in res["cases"].items():
            times = case["times"]
            floors = {
                name: stats(times["cold"][f"read:{size}"])[0] for name, size in case["read_bytes"].items()
            }
            base = {mode: stats(times[mode]["fp32"])[0] for mode in MODES}
            lines += [
                f"**{n} thread{'s' if n > 1 else ''}, {t} token{'s' if t != '1' else ''}** "
                f"(experts hit: {', '.join(map(str, case['experts']))})",
                "",
                "| system | MiB read | floor ms | cold median | cold p90 | cold × floor | cold vs fp32 | "
                "warm median | warm p90 | warm vs fp32 |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for name in case["read_bytes"]:
                cold, warm = stats(times["cold"][name]), stats(times["warm"][name])
                lines.append(
                    f"| {labels[name]} | {mib(case['read_bytes'][name])} | {floors[name]:.3f} | "
                    f"{cold[0]:.3f} | {cold[1]:.3f} | {cold[0] / floors[name]:.2f}× | "
                    f"{base['cold'] / cold[0]:.2f}× | "
                    f"{warm[0]:.3f} | {warm[1]:.3f} | {base['warm'] / warm[0]:.2f}× |"
                )
            lines.append("")
    fp32_bytes = next(r["expert_bytes"] for r in digits["rows"] if r["key"] == "fp32")
    fp32_accuracy = next(r["accuracy"] for r in digits["rows"] if r["key"] == "fp32")
    lines += [
        "### Accuracy and bytes: trained digits classifier",
        "",
        f"`fixtures/models/digits-moe.onnx` (2 MoE layers of {EXPERTS} SwiGLU experts, top-2; PyTorch test "
        f"accuracy {digits['pytorch_accuracy']:.4f}), compiled for `host` with each plan; article policy, "
        f"budget and masking from a profile of `calib.x` ({digits['calib_images']} images; the budget "
        f"chooses on one half and checks on the other). Accuracy on `test.x` ({digits['test_images']} "
        f"images); every artifact matched its numpy oracle (`moec.verify.reference_outputs`) within "
        f"{TOLERANCE:g} (int8-dot: 1% of the largest logit) first."
        + (
            f" Budget plan: relative RMS logit error {digits['budget']['error']:.2g} chosen on, "
            f"{digits['budget']['held_out_error']:.2g} held out."
            if digits["budget"] and digits["budget"]["held_out_error"] is not None
            else ""
        ),
        "",
        "| variant | `moec compile` flags | expert precisions | expert KiB (× less) | expected KiB read per "
        "image (profile) | test accuracy (Δ points) | max abs logit change vs fp32 | "
        "top-1 agreement with fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in digits["rows"]:
        expected = "–" if row["expected_bytes"] is None else f"{row['expected_bytes'] / 1024:.1f}"
        lines.append(
            f"| {row['label']} | {row['flags']} | {row['precisions']} | {row['expert_bytes'] / 1024:.1f} "
            f"({fp32_bytes / row['expert_bytes']:.2f}×) | {expected} | {row['accuracy']:.4f} "
            f"({(row['accuracy'] - fp32_accuracy) * 100:+.1f}) | {row['logit_diff']:.3g} | "
            f"{row['agreement'] * 100:.1f} % |"
        )
    first = next(iter(results.values()))
    lines += [
        "",
        "Method:",
        "",
        '- Plans: `compile_model(model, out, CompileOptions(target="host", ...))` with `precision`, '
        "`int8_group`, or `precision_plan` per layer; article policy = the `experts // 2` experts of "
        "highest `activation_frequency` per layer int8, the rest fp32; budget plan = "
        "`moec.analysis.precision_budget.choose_precisions(model, profile, samples, budget)` compiled as its "
        "`precision_plan`. Stored bytes = the manifest's per-expert `bytes` (matrices, int8 scales, biases); "
        "expected bytes read per token = Σ activation frequency × stored bytes.",
        "- ORT QMoE: the int8 plan's codes (`moec.kernels.formats.quantize_int8`, per channel) + 128 as "
        "uint8, its fp32 scales, `expert_weight_bits=8`, `block_size` 0, fc1 gate/up rows interleaved "
        "(`swiglu_fusion=1`, `activation_alpha=1`, `activation_beta=0`). ORT MoE: `bench_mixtral_block`'s "
        "fp32 model. Sessions with `intra_op_num_threads` = the thread count, `inter_op_num_threads=1`.",
        f"- Timing: one subprocess per thread count, {first['processes']} per count ({facts['reps']} "
        "repetitions in all, samples pooled); each repetition runs every system and every floor read once, "
        "round-robin, "
        f"the order rotated. Cold: a {facts['evict_mb']} MiB buffer (max(2 × LLC, 64 MiB)) is read+written, "
        "then read, on as many threads as the benchmark, before every timed call. Warm: a settle pause "
        f"({first['settle_s'] * 1e3:.0f} ms at 1 thread, 100 ms at more), one untimed call, then "
        f"{facts['inner']} timed calls.",
        "- Floor reads: numpy `max` over a buffer of the system's byte count, one slice per thread on a "
        "thread pool; at 2 threads it includes the pool's hand-off.",
        "",
    ]
    return "\n".join(lines)


def run_parent(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Prepare the plans and artifacts, measure digits accuracy, run the timing children, report."""
    import onnxruntime
    import tvm

    import moec

    wall = time.perf_counter()
    thread_counts = [int(n) for n in args.threads.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    reps_per_process = -(-args.reps // args.procs)
    with tempfile.TemporaryDirectory(prefix="moec-bench-precision-") as tmp:
        workdir = Path(tmp)
        block = prepare_block(workdir, tokens, args.accuracy_budget)
        digits = digits_accuracy(workdir, args.accuracy_budget)
        child_args = ["--workdir", str(workdir), "--tokens", args.tokens, "--reps", str(reps_per_process)]
        child_args += ["--inner", str(args.inner), "--evict-mb", str(args.evict_mb)]
        child_args += ["--quick"] if args.quick else []
        children, others = run_timing_children(
            Path(__file__).resolve(),
            workdir,
            thread_counts,
            args.procs,
            args.wait_quiet,
            lambda _p, _n: child_args,
        )
    results = {n: merge(c) for n, c in children.items()}
    facts = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_precision.py", *map(shlex.quote, argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "git": git_revision(),
        "moec": moec.__version__,
        "tvm": tvm.__version__,
        "ort": onnxruntime.__version__,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "llc_mib": llc_bytes() / 2**20,
        "others_cores": dict(others),
        "evict_mb": args.evict_mb,
        "reps": reps_per_process * args.procs,
        "inner": args.inner,
        "wall_s": time.perf_counter() - wall,
    }
    publish(report(block, results, digits, facts), args.markdown, MD_NAME)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers the repetition defaults."""
    parser = timing_parser(__doc__, default_evict_mb())
    parser.add_argument(
        "--accuracy-budget",
        type=float,
        default=DEFAULT_BUDGET,
        help="relative RMS output error the budget plan may cost (default %(default)s)",
    )
    args = timing_defaults(parser, parser.parse_args(argv))
    if not args.accuracy_budget > 0:
        parser.error("--accuracy-budget must be positive")
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
