"""Each TIR kernel, compiled alone, against numpy — across schedules, tails and ties.

The CUDA kernels are checked here too, on this CPU: with one thread per row (no warp shuffles)
their threads never talk to each other, so running the thread-bound loops in turn computes what
the GPU computes (:func:`_compiled`); the GPU itself runs them in ``scripts/gpu-check.sh``."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import unittest.mock

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

import moec.kernels.backend as backend_module
from moec.canonical.layer import MoELayer
from moec.canonical.semantics import LayerPlan, drop_past_capacity, expert_ffn, expert_hidden, route
from moec.kernels import KERNEL_MAKERS, kernel_spec, make_kernel
from moec.kernels.backend import CpuBackend, CudaBackend
from moec.kernels.config import (
    CapacityConfig,
    ExpertDownConfig,
    ExpertUpConfig,
    GroupConfig,
    KernelConfig,
    LinearConfig,
    RouteConfig,
    config_from_json,
)
from moec.kernels.group import make_group_kernel
from moec.schedule import CpuSchedule, GpuSchedule
from tests.helpers import FP32_ATOL, assert_close

SCHEDULES = [
    CpuSchedule(),
    CpuSchedule(lanes=4, rows_per_task=3, token_block=3, accumulators=2),
    CpuSchedule(lanes=8, rows_per_task=1, token_block=1, accumulators=1),
]
CUDA_IN_TURN = [GpuSchedule(1, 32, 2), GpuSchedule(1, 8, 3)]
"""CUDA schedules whose kernels run on this CPU with their threads in turn (one thread per row:
no warp shuffles); the second has tail blocks of rows and of tokens."""


TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def _threads_in_turn(kind: str, extent):
    """A loop of the CUDA backend's kernels as this CPU runs it: a thread-bound loop is serial."""
    if kind.startswith(("blockIdx.", "threadIdx.")):
        return T.serial(extent)
    return _backend_loop(kind, extent)


_backend_loop = backend_module.loop


@functools.cache
def _compiled(kind: str, config: str, schedule: CpuSchedule | GpuSchedule):
    """The kernel compiled for this CPU. A CUDA schedule's kernel is the CUDA backend's, with its
    threads run in turn (:func:`_threads_in_turn`): exact for kernels whose threads never talk to
    each other, which with one thread per row (no warp shuffles) are all but int8-dot ones."""
    parsed = config_from_json(kind, config)
    if isinstance(schedule, GpuSchedule):
        with unittest.mock.patch.object(backend_module, "loop", _threads_in_turn):
            kernel = KERNEL_MAKERS[kind](parsed, CudaBackend(schedule))  # not make_kernel's cache
    else:
        kernel = make_kernel(parsed, schedule)
    return tvm.compile(kernel.with_attr("global_symbol", kind), target=TARGET)


def _run(
    kind: str,
    config: dict,
    schedule: CpuSchedule | GpuSchedule,
    *arrays: np.ndarray,
    outputs: list[tuple[tuple[int, ...], str]],
) -> list[np.ndarray]:
    """Run kernel ``kind`` (compiled once per config and schedule) and return its outputs."""
    lib = _compiled(kind, json.dumps(config, sort_keys=True), schedule)
    outs = [tvm.runtime.tensor(np.zeros(shape, dtype)) for shape, dtype in outputs]
    lib(*[tvm.runtime.tensor(a) for a in arrays], *outs)
    return [o.numpy() for o in outs]


def _layer(experts=5, hidden=20, ffn=12, k=2, activation="silu", gated=True, **extra) -> MoELayer:
    rng = np.random.default_rng(3)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    return MoELayer(
        name="t",
        num_experts=experts,
        top_k=k,
        hidden=hidden,
        ffn=ffn,
        activation=activation,
        normalize=True,
        w_up=w(experts, ffn, hidden),
        w_down=w(experts, hidden, ffn),
        w_gate=w(experts, ffn, hidden) if gated else None,
        b_up=w(experts, ffn),
        b_gate=w(experts, ffn) if gated else None,
        b_down=w(experts, hidden),
        **extra,
    )


@pytest.mark.parametrize("tie_break", ["low", "high"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_route_matches_numpy_including_ties(tie_break, scoring, normalize):
    layer = _layer(experts=6, k=3, tie_break=tie_break, scoring=scoring)
    layer.normalize = normalize
    logits = np.random.default_rng(0).standard_normal((9, 6)).astype(np.float32)
    logits[0] = 0.5  # all six tied
    logits[1, [1, 4]] = 3.0  # a tie for first place
    config = {
        "num_experts": 6,
        "top_k": 3,
        "scoring": scoring,
        "normalize": normalize,
        "tie_break": tie_break,
    }
    index, weight = _run(
        "route", config, CpuSchedule(), logits, outputs=[((9, 3), "int32"), ((9, 3), "float32")]
    )
    expected_index, expected_weight = route(layer, logits)
    assert_close(index, expected_index.astype(np.int32), 0)
    assert_close(weight, expected_weight.astype(np.float32), 1e-6)


ROUTING_RULES = {
    # DeepSeek-V3: sigmoid, correction bias, 2 of 4 groups, renormalised then scaled
    "grouped": {"scoring": "sigmoid", "normalize": True, "groups": 4, "top_groups": 2, "scale": 2.5},
    "biased": {"scoring": "sigmoid", "normalize": False, "scale": 0.5},
    # PhiMoE's sparsemixer (a wide and a narrow jitter window)
    "sparsemixer": {"scoring": "sparsemixer", "normalize": False, "jitter_eps": 0.01},
    "sparsemixer-wide": {"scoring": "sparsemixer", "normalize": False, "jitter_eps": 0.5},
}


@pytest.mark.parametrize("schedule", [CpuSchedule(), CUDA_IN_TURN[0]], ids=["cpu", "cuda"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rule", sorted(ROUTING_RULES))
def test_route_rules_match_numpy(rule, masked, schedule):
    experts, k = 8, 2
    rng = np.random.default_rng(7)
    rule = dict(ROUTING_RULES[rule])
    if rule["scoring"] != "sparsemixer":
        rule["selection_bias"] = (rng.standard_normal(experts) * 0.3).astype(np.float32).tolist()
    layer = _layer(experts=experts, k=k, **{key: v for key, v in rule.items() if key != "normalize"})
    layer.normalize = rule["normalize"]
    logits = rng.standard_normal((11, experts)).astype(np.float32)
    logits[0] = 0.0  # sparsemixer's gap is 0/0 here: those experts count (torch's mask is False)
    logits[1, [2, 5]] = 2.0  # a tie for first place
    kept = [0, 2, 3, 5, 6, 7] if masked else None
    config = {"num_experts": experts, "top_k": k, "tie_break": "low", **rule}
    if kept:
        config["kept"] = kept
    index, weight = _run(
        "route", config, schedule, logits, outputs=[((11, k), "int32"), ((11, k), "float32")]
    )
    plan = LayerPlan(kept=kept)
    expected_index, expected_weight = route(layer, logits, plan)
    if kept:
        expected_index = np.searchsorted(kept, expected_index)
    assert_close(index, expected_index.astype(np.int32), 0)
    assert_close(weight, expected_weight.astype(np.float32), 1e-6)


@pytest.mark.parametrize("schedule", [CpuSchedule(), CUDA_IN_TURN[0]], ids=["cpu", "cuda"])
@pytest.mark.parametrize(("sequences", "tokens", "k", "capacity"), [(1, 1, 1, 1), (3, 9, 1, 2), (2, 7, 2, 3)])
def test_capacity_drops_what_numpy_drops(sequences, tokens, k, capacity, schedule):
    """Per sequence, each expert keeps its first ``capacity`` selections; slots already skipped
    (index E in the kernels, -1 in numpy) stay skipped and take no room."""
    experts = 4
    rng = np.random.default_rng(sequences * 10 + tokens)
    index = np.stack([rng.choice(experts, k, replace=False) for _ in range(sequences * tokens)])
    index[rng.random(index.shape) < 0.15] = -1
    weight = np.where(index >= 0, rng.random(index.shape), 0.0).astype(np.float32)
    kernel_index = np.where(index >= 0, index, experts).astype(np.int32).reshape(sequences, tokens, k)
    shape = (sequences, tokens, k)
    kept_index, kept_weight = _run(
        "capacity",
        {"num_experts": experts, "top_k": k, "capacity": capacity},
        schedule,
        kernel_index,
        weight.reshape(shape),
        outputs=[(shape, "int32"), (shape, "float32")],
    )
    expected_index, expected_weight = drop_past_capacity(index, weight, capacity, tokens)
    expected_kernel_index = np.where(expected_index >= 0, expected_index, experts).astype(np.int32)
    assert_close(kept_index.reshape(-1, k), expected_kernel_index, 0)
    assert_close(kept_weight.reshape(-1, k), expected_weight.astype(np.float32), 0)
    if sequences > 1:  # the case drops something, and counts each sequence afresh
        assert (expected_index == -1).sum() > (index == -1).sum()
        assert not np.array_equal(
            drop_past_capacity(index, weight, capacity, tokens)[0],
            drop_past_capacity(index, weight, capacity, len(index))[0],
        )


@pytest.mark.parametrize(
    "form", [None, 2, 6, CUDA_IN_TURN[0]], ids=["one-worker", "two-workers", "a-worker-per-slot", "cuda"]
)
@pytest.mark.parametrize("tokens", [0, 1, 4, 7])
def test_group_is_a_stable_counting_sort(tokens, form):
    """Any number of workers sorts alike: one (a CPU's), two, or one per expert slot (``E + 1``) as
    parallel CPU tasks, and the CUDA kernel (a thread per slot). Skipped slots (index ``E``) sort
    last."""
    E, K = 5, 2
    rng = np.random.default_rng(tokens)
    index = np.array([rng.choice(E + 1, K, replace=False) for _ in range(tokens)], np.int32).reshape(
        tokens, K
    )
    weight = rng.random((tokens, K)).astype(np.float32)
    outputs = [((E + 1,), "int32"), ((tokens * K,), "int32"), ((tokens * K,), "float32")]
    if isinstance(form, GpuSchedule):
        offset, token, gain = _run(
            "group", {"num_experts": E, "top_k": K}, form, index, weight, outputs=outputs
        )
    else:
        kernel = make_group_kernel(GroupConfig(num_experts=E, top_k=K), CpuBackend(CpuSchedule()), form)
        lib = tvm.compile(kernel.with_attr("global_symbol", "group"), target=TARGET)
        held = [tvm.runtime.tensor(a) for a in (index, weight)] + [
            tvm.runtime.tensor(np.full(shape, -1, dtype)) for shape, dtype in outputs
        ]
        lib(*held)
        offset, token, gain = (h.numpy() for h in held[2:])
    order = np.argsort(index.reshape(-1), kind="stable")
    counts = np.bincount(index.ravel(), minlength=E + 1)
    assert_close(offset, np.concatenate([[0], np.cumsum(counts[:E])]).astype(np.int32), 0)
    assert_close(token, (order // K).astype(np.int32), 0)
    assert_close(gain, weight.reshape(-1)[order], 0)


EXPERT_CASES = [
    ("relu", False, {}),
    ("gelu", False, {}),
    ("gelu_tanh", False, {}),
    ("identity", False, {}),
    ("silu", True, {}),
    ("gelu", True, {}),
    ("silu", True, {"alpha": 1.702, "beta": 1.0, "limit": 0.3}),
]


def _routed_pairs(rng, tokens: int, E: int, K: int, skipped: float = 0.0):
    """Random routing of ``tokens`` tokens to ``K`` distinct of ``E`` experts with random gains
    (about a ``skipped`` share of the slots skipped: index ``E``, as a capacity drops them), and
    the pairs grouped by expert as the group kernel leaves them: ``(index [tokens, K], gains
    [tokens, K], token per pair, gain per pair, offset [E + 1])``."""
    index = np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)])
    if skipped:
        index[rng.random(index.shape) < skipped] = E
    gain_in = rng.random((tokens, K))
    order = np.argsort(index.reshape(-1), kind="stable")
    token = (order // K).astype(np.int32)
    gain = gain_in.reshape(-1)[order].astype(np.float32)
    counts = np.bincount(index.ravel(), minlength=E + 1)[:E]  # skipped pairs sort past offset[E]
    offset = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return index, gain_in, token, gain, offset


def _moe_reference(layer: MoELayer, x: np.ndarray, index: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """The layer's output for ``x`` routed as ``index`` with ``gains``, in float64 from the numpy
    expert FFN; a skipped slot (index ``E``) adds nothing."""
    expected = np.zeros((x.shape[0], layer.hidden))
    for t in range(x.shape[0]):
        for slot in range(index.shape[1]):
            if index[t, slot] == layer.num_experts:
                continue
            row = x[t : t + 1].astype(np.float64)
            expected[t] += gains[t, slot] * expert_ffn(layer, int(index[t, slot]), row)[0]
    return expected


def pack_expert_panels(weight: np.ndarray, panel: int) -> np.ndarray:
    """Expert matrices ``[E, out, in]`` in the panel kernels' layout, element by element from its
    definition: ``packed[e, p, c, v] = weight[e, p * panel + v, c]``, zero past row ``out``."""
    experts, rows, columns = weight.shape
    packed = np.zeros((experts, -(-rows // panel), columns, panel), weight.dtype)
    for e, p, c, v in np.ndindex(*packed.shape):
        if p * panel + v < rows:
            packed[e, p, c, v] = weight[e, p * panel + v, c]
    return packed


@pytest.mark.parametrize(
    "schedule", SCHEDULES, ids=lambda s: f"l{s.lanes}r{s.rows_per_task}b{s.token_block}a{s.accumulators}"
)
@pytest.mark.parametrize(
    ("activation", "gated", "extra"),
    EXPERT_CASES,
    ids=[f"{a}{'-gated' if g else ''}{'-clamped' if e else ''}" for a, g, e in EXPERT_CASES],
)
@pytest.mark.parametrize("panel", [None, 8], ids=["rows", "panels-of-8"])
@pytest.mark.parametrize("tokens", [1, 3, 10])
def test_expert_kernels_match_numpy(schedule, activation, gated, extra, tokens, panel):
    """Both forms of the expert kernels: one row's dot at a time, and over packed panels (8-row
    panels of ffn 12 and hidden 20: the last panel of each is partly padding)."""
    layer = _layer(activation=activation, gated=gated, **extra)
    E, H, F, K = layer.num_experts, layer.hidden, layer.ffn, layer.top_k
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, H)).astype(np.float32)
    index, gain_in, token, gain, offset = _routed_pairs(rng, tokens, E, K)
    up_config = {
        "num_experts": E,
        "hidden": H,
        "ffn": F,
        "top_k": K,
        "activation": activation,
        "gated": gated,
        "alpha": layer.alpha,
        "beta": layer.beta,
        "limit": layer.limit,
    }
    pack = (lambda w: w) if panel is None else (lambda w: pack_expert_panels(w, panel))
    up_config["panel"] = panel
    first = [pack(layer.w_up), layer.b_up] + ([pack(layer.w_gate), layer.b_gate] if gated else [])
    (inter,) = _run(
        "expert_up", up_config, schedule, x, *first, offset, token, outputs=[((tokens * K, F), "float32")]
    )
    down_config = {"num_experts": E, "hidden": H, "ffn": F, "top_k": K, "panel": panel}
    (y,) = _run(
        "expert_down",
        down_config,
        schedule,
        inter,
        pack(layer.w_down),
        layer.b_down,
        offset,
        token,
        gain,
        outputs=[((tokens, H), "float32")],
    )
    expected = _moe_reference(layer, x, index, gain_in)
    assert_close(y, expected.astype(np.float32), 1e-5)


@pytest.mark.parametrize("panel", [None, 8], ids=["rows", "panels-of-8"])
@pytest.mark.parametrize(("experts", "k", "tokens"), [(37, 3, 1), (37, 3, 5), (37, 3, 20), (4, 3, 6)])
def test_expert_kernels_visit_only_the_routed_experts(experts, k, tokens, panel):
    """The expert slots: with at most ``E`` pairs each slot is a pair, visited when it starts its
    expert's group (a binary search of ``offset``; 37 experts: six steps), else each slot is an
    expert. Skipped slots sort past ``offset[E]`` and add nothing."""
    layer = _layer(experts=experts, k=k, gated=True)
    E, H, F, K = layer.num_experts, layer.hidden, layer.ffn, layer.top_k
    rng = np.random.default_rng(experts + tokens)
    x = rng.standard_normal((tokens, H)).astype(np.float32)
    index, gain_in, token, gain, offset = _routed_pairs(rng, tokens, E, K, skipped=0.25)
    common = {"num_experts": E, "hidden": H, "ffn": F, "top_k": K, "panel": panel}
    up_config = common | {"activation": "silu", "gated": True}
    pack = (lambda w: w) if panel is None else (lambda w: pack_expert_panels(w, panel))
    first = [pack(layer.w_up), layer.b_up, pack(layer.w_gate), layer.b_gate]
    (inter,) = _run(
        "expert_up",
        up_config,
        CpuSchedule(),
        x,
        *first,
        offset,
        token,
        outputs=[((tokens * K, F), "float32")],
    )
    down = [pack(layer.w_down), layer.b_down, offset, token, gain]
    (y,) = _run("expert_down", common, CpuSchedule(), inter, *down, outputs=[((tokens, H), "float32")])
    assert_close(y, _moe_reference(layer, x, index, gain_in).astype(np.float32), 1e-5)


MIXED = ("int8", "fp32", "fp16", "int8", "fp16")
"""A layer whose experts use every storage format, none in a run with its own kind."""


def _stored_formats(weight: np.ndarray, formats: tuple[str, ...], group: int, rng) -> tuple[dict, np.ndarray]:
    """Expert matrices ``weight`` ``[E, out, in]`` stored per expert as ``formats`` says: the kernel's
    buffers by format (``fp32``: the matrices; ``fp16``: rounded; ``int8``: random INT8 values
    with random positive scales per output row, or per ``group`` inputs and output row), and
    the float32 matrices those buffers hold (what the kernels must compute with)."""
    held = weight.astype(np.float32).copy()
    stored: dict[str, list] = {"fp32": [], "fp16": [], "int8": [], "scale": []}
    for e, fmt in enumerate(formats):
        out, columns = weight.shape[1:]
        if fmt == "fp16":
            stored["fp16"].append(weight[e].astype(np.float16))
            held[e] = stored["fp16"][-1].astype(np.float32)
        elif fmt == "int8":
            q = rng.integers(-127, 128, (out, columns)).astype(np.int8)
            if group:
                scale = rng.uniform(0.001, 0.01, (columns // group, out)).astype(np.float32)
                held[e] = q * np.repeat(scale.T, group, axis=1)
            else:
                scale = rng.uniform(0.001, 0.01, out).astype(np.float32)
                held[e] = q * scale[:, None]
            stored["int8"].append(q)
            stored["scale"].append(scale)
        else:
            stored["fp32"].append(weight[e])
    return {k: np.stack(v) for k, v in stored.items() if v}, held


@pytest.mark.parametrize(
    ("schedule", "panel"),
    [(SCHEDULES[0], None), (SCHEDULES[0], 8), (SCHEDULES[1], None), (SCHEDULES[1], 8)]
    + [(schedule, None) for schedule in CUDA_IN_TURN],
    ids=["rows", "panels-of-8", "l4r3b3a2-rows", "l4r3b3a2-panels-of-8", "cuda", "cuda-r8b3"],
)
@pytest.mark.parametrize("group", [0, 4], ids=["int8-per-channel", "int8-groups-of-4"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_mixed_format_expert_kernels_match_numpy(schedule, panel, group, gated, tokens):
    """One layer with fp32, fp16 and int8 experts in one call, some slots skipped: each expert's
    weights are read in its own format, and the result is the FFN over the weights those formats
    hold. On CUDA (threads in turn): the expert slots on ``blockIdx.y`` (pairs at 1 token, experts
    at 7) and ``expert_down``'s pair positions, partial rows and ordered sum."""
    layer = _layer(gated=gated, activation="silu" if gated else "relu")
    E, H, F, K = layer.num_experts, layer.hidden, layer.ffn, layer.top_k
    rng = np.random.default_rng(tokens + 10 * group)
    stored, held = {}, {}
    for role in ("w_up", "w_gate", "w_down") if gated else ("w_up", "w_down"):
        stored[role], held[role] = _stored_formats(getattr(layer, role), MIXED, group, rng)
    layer = dataclasses.replace(layer, **held)
    x = rng.standard_normal((tokens, H)).astype(np.float32)
    index, gain_in, token, gain, offset = _routed_pairs(rng, tokens, E, K, skipped=0.25)
    pack = (lambda w: w) if panel is None else (lambda w: pack_expert_panels(w, panel))

    def buffers(role: str) -> list[np.ndarray]:
        """The role's buffers as the kernels take them: matrices packed, scales over whole panels."""
        parts = stored[role]
        scale = parts["scale"]
        if panel is not None:
            rows = -(-scale.shape[-1] // panel) * panel
            scale = np.concatenate(
                [scale, np.zeros((*scale.shape[:-1], rows - scale.shape[-1]), np.float32)], -1
            )
        return [pack(parts["fp32"]), pack(parts["fp16"]), pack(parts["int8"]), scale]

    common = {"num_experts": E, "hidden": H, "ffn": F, "top_k": K, "panel": panel, "formats": MIXED}
    common["int8_group"] = group
    up_config = {**common, "activation": layer.activation, "gated": gated}
    gate = [*buffers("w_gate"), layer.b_gate] if gated else []
    (inter,) = _run(
        "expert_up", up_config, schedule, x, *buffers("w_up"), layer.b_up, *gate, offset, token,
        outputs=[((tokens * K, F), "float32")],
    )  # fmt: skip
    (y,) = _run(
        "expert_down", common, schedule, inter, *buffers("w_down"), layer.b_down, offset, token, gain,
        outputs=[((tokens, H), "float32")],
    )  # fmt: skip
    assert_close(y, _moe_reference(layer, x, index, gain_in).astype(np.float32), 1e-5)


HOST_INT8_DOT = "vnni" if tvm.target.codegen.llvm_cpu_has_features(["avx512vnni"], TARGET) else None
"""This machine's INT8 dot instructions, for the int8-dot kernel tests (AVX-512 VNNI)."""
DOT_MIXED = ("int8-dot", "fp32", "int8", "int8-dot", "fp16")
"""A layer with int8-dot experts beside the other formats."""


def pack_dot_panels(weight: np.ndarray, panel: int) -> np.ndarray:
    """int8-dot expert matrices ``[E, out, in]`` in the panel kernels' layout, element by element
    from its definition: ``packed[e, p, k, 4 v + d] = weight[e, p * panel + v, 4 k + d]``, zero
    past row ``out``."""
    experts, rows, columns = weight.shape
    packed = np.zeros((experts, -(-rows // panel), columns // 4, panel * 4), weight.dtype)
    for e, p, k, v, d in np.ndindex(experts, packed.shape[1], columns // 4, panel, 4):
        if p * panel + v < rows:
            packed[e, p, k, 4 * v + d] = weight[e, p * panel + v, 4 * k + d]
    return packed


def _int8_rows(rows: np.ndarray) -> np.ndarray:
    """``rows`` as W8A8 multiplies them: each row rounded to 255 levels of its own step
    ``max |row| / 127`` (float32 arithmetic, half to even), as exact float64 values."""
    rows = rows.astype(np.float32)
    step = np.abs(rows).max(axis=1, keepdims=True) / np.float32(127)
    step = np.where(step > 0, step, np.float32(1)).astype(np.float32)
    return np.clip(np.rint(rows / step), -127, 127).astype(np.float64) * step.astype(np.float64)


def _int8_dot_cases() -> list:
    """(schedule, panel, group, gated, tokens): every combination of the three VNNI widths, both
    scale layouts, gated or not and 1 or 7 tokens; CI runs the 512-bit form's and one case of
    each narrower form, the rest are slow."""
    widths = [
        ("vnni512", CpuSchedule(), 16),
        ("vnni256", CpuSchedule(lanes=8, rows_per_task=8, token_block=3), 8),
        ("vnni128", SCHEDULES[1], 8),
    ]
    cases = []
    for (name, schedule, panel), group, gated, tokens in itertools.product(
        widths, (0, 4), (True, False), (1, 7)
    ):
        in_ci = name == "vnni512" and tokens == 7 or (group, gated, tokens) == (4, True, 7)
        ident = (
            f"{name}-{'groups-of-4' if group else 'per-channel'}-{'gated' if gated else 'ungated'}-{tokens}"
        )
        marks = () if in_ci else pytest.mark.slow
        cases.append(pytest.param(schedule, panel, group, gated, tokens, id=ident, marks=marks))
    return cases


@pytest.mark.skipif(HOST_INT8_DOT is None, reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize(("schedule", "panel", "group", "gated", "tokens"), _int8_dot_cases())
def test_int8_dot_expert_kernels_match_numpy(schedule, panel, group, gated, tokens):
    """int8-dot experts beside fp32, int8 and fp16 ones in one call: each kernel's input rows are
    quantized per row and multiplied in INT8, so each kernel matches the FFN over the weights the
    formats hold with those experts' input rows rounded to INT8 (each kernel is given its input,
    so the INT32 sums are exact and only float32 rounding differs)."""
    layer = _layer(gated=gated, activation="silu" if gated else "relu")
    E, H, F, K = layer.num_experts, layer.hidden, layer.ffn, layer.top_k
    rng = np.random.default_rng(tokens + 10 * group + panel)
    formats = tuple("int8" if f == "int8-dot" else f for f in DOT_MIXED)  # what _stored_formats makes
    stored, held = {}, {}
    for role in ("w_up", "w_gate", "w_down") if gated else ("w_up", "w_down"):
        stored[role], held[role] = _stored_formats(getattr(layer, role), formats, group, rng)
    layer = dataclasses.replace(layer, **held)
    dot_experts = [e for e, f in enumerate(DOT_MIXED) if f == "int8-dot"]
    plain_int8 = [e for e, f in enumerate(DOT_MIXED) if f == "int8"]

    def buffers(role: str) -> list[np.ndarray]:
        """fp32, fp16, int8 (+ scales), int8-dot (+ scales): packed, scales over whole panels."""
        parts = stored[role]
        position = {e: i for i, e in enumerate(sorted(plain_int8 + dot_experts))}
        scale = parts["scale"]
        rows = -(-scale.shape[-1] // panel) * panel
        scale = np.concatenate([scale, np.zeros((*scale.shape[:-1], rows - scale.shape[-1]), np.float32)], -1)

        def take(array, experts):
            return array[[position[e] for e in experts]]

        return [
            pack_expert_panels(parts["fp32"], panel),
            pack_expert_panels(parts["fp16"], panel),
            pack_expert_panels(take(parts["int8"], plain_int8), panel),
            take(scale, plain_int8),
            pack_dot_panels(take(parts["int8"], dot_experts), panel),
            take(scale, dot_experts),
        ]

    common = {"num_experts": E, "hidden": H, "ffn": F, "top_k": K, "panel": panel, "formats": DOT_MIXED}
    common |= {"int8_group": group, "int8_dot": HOST_INT8_DOT}
    x = rng.standard_normal((tokens, H)).astype(np.float32)
    index, gain_in, token, gain, offset = _routed_pairs(rng, tokens, E, K)
    expert_of = np.repeat(np.arange(E), np.diff(offset))
    gate = [*buffers("w_gate"), layer.b_gate] if gated else []
    (inter,) = _run(
        "expert_up", {**common, "activation": layer.activation, "gated": gated}, schedule,
        x, *buffers("w_up"), layer.b_up, *gate, offset, token, outputs=[((tokens * K, F), "float32")],
    )  # fmt: skip
    expected_inter = np.stack(
        [
            expert_hidden(
                layer, int(e), (_int8_rows(x[[t]]) if e in dot_experts else x[[t]].astype(np.float64))
            )[0]
            for t, e in zip(token, expert_of, strict=True)
        ]
    )
    assert_close(inter, expected_inter.astype(np.float32), 1e-5, "expert_up")
    source = rng.standard_normal((tokens * K, F)).astype(np.float32)
    (y,) = _run(
        "expert_down", common, schedule, source, *buffers("w_down"), layer.b_down, offset, token, gain,
        outputs=[((tokens, H), "float32")],
    )  # fmt: skip
    expected = np.zeros((tokens, H))
    for p, (t, e) in enumerate(zip(token, expert_of, strict=True)):
        row = _int8_rows(source[[p]]) if e in dot_experts else source[[p]].astype(np.float64)
        expected[t] += gain[p] * (row @ layer.w_down[e].astype(np.float64).T + layer.b_down[e])[0]
    assert_close(y, expected.astype(np.float32), 1e-5, "expert_down")


SIGNATURE_CASES: list[KernelConfig] = [
    RouteConfig(num_experts=6, top_k=2, scoring="softmax", normalize=True, kept=(0, 2, 3, 5)),
    CapacityConfig(num_experts=4, top_k=2, capacity=3),
    GroupConfig(num_experts=5, top_k=2),
    ExpertUpConfig(num_experts=5, hidden=20, ffn=12, top_k=2, activation="silu", gated=True),
    ExpertUpConfig(
        num_experts=5, hidden=20, ffn=12, top_k=2, activation="relu", gated=False, formats=("fp16",) * 5
    ),
    ExpertDownConfig(num_experts=5, hidden=20, ffn=12, top_k=2, formats=("fp16",) * 5),
    ExpertUpConfig(
        num_experts=5, hidden=20, ffn=12, top_k=2, activation="silu", gated=True, formats=MIXED, int8_group=4
    ),
    ExpertDownConfig(num_experts=5, hidden=20, ffn=12, top_k=2, formats=MIXED),
]


def pack_panels(weight: np.ndarray, panel: int) -> np.ndarray:
    """``weight`` ``[K, N]`` in the linear kernel's layout, element by element from its definition:
    ``packed[p, k, v] = weight[k, p * panel + v]``, zero past column ``N``."""
    in_features, out_features = weight.shape
    packed = np.zeros((-(-out_features // panel), in_features, panel), np.float32)
    for p, k, v in np.ndindex(*packed.shape):
        if p * panel + v < out_features:
            packed[p, k, v] = weight[k, p * panel + v]
    return packed


LINEAR_SCHEDULES = [
    CpuSchedule(),
    CpuSchedule(lanes=4, token_block=3, panel_vectors=1),
    CpuSchedule(lanes=8, token_block=1, panel_vectors=2),
]


@pytest.mark.parametrize("schedule", LINEAR_SCHEDULES, ids=["default", "lanes4-block3", "lanes8-block1"])
@pytest.mark.parametrize(
    ("in_features", "out_features", "panel"),
    [(20, 12, 12), (16, 40, 16), (33, 7, 4), (8, 64, 32)],
    ids=["one-panel", "last-panel-partial", "odd-sizes", "exact-panels"],
)
@pytest.mark.parametrize("tokens", [1, 3, 5, 16])
def test_linear_matches_numpy(schedule, in_features, out_features, panel, tokens):
    """``y = x @ W`` for every token, including the tokens past the last full block, with the
    last panel partly padding."""
    rng = np.random.default_rng(in_features * 100 + out_features + tokens)
    x = rng.standard_normal((tokens, in_features)).astype(np.float32)
    w = rng.standard_normal((in_features, out_features)).astype(np.float32)
    config = LinearConfig(in_features=in_features, out_features=out_features, panel=panel)
    outputs = [((tokens, out_features), "float32")]
    (y,) = _run("linear", dataclasses.asdict(config), schedule, x, pack_panels(w, panel), outputs=outputs)
    assert_close(y, (x.astype(np.float64) @ w.astype(np.float64)).astype(np.float32), 5e-5)


def test_linear_kernel_is_refused_on_cuda():
    with pytest.raises(ValueError, match="CPU targets only"):
        make_kernel(LinearConfig(in_features=8, out_features=8, panel=8), GpuSchedule())


def _params(func: tvm.tirx.PrimFunc) -> list[tuple[str, str, str]]:
    """Each parameter's name, shape (as text: symbolic dims by name) and dtype."""
    return [(p.name, str(list(p.ty.shape)), str(p.ty.dtype)) for p in func.params]


@pytest.mark.parametrize("schedule", [CpuSchedule(), GpuSchedule()], ids=["cpu", "cuda"])
@pytest.mark.parametrize("config", SIGNATURE_CASES, ids=lambda c: f"{c.kind}")
def test_built_kernel_has_its_spec_signature(config, schedule):
    """The frontend's placeholder (from the config's signature table) and the kernel built from
    TVMScript take the same buffers, so a call typed by the spec is right for the kernel."""
    spec, built = kernel_spec(config), make_kernel(config, schedule)
    assert _params(built) == _params(spec)
    assert str(built.attrs["moec.config"]) == str(spec.attrs["moec.config"]) == config.to_json()
    assert json.loads(str(built.attrs["moec.schedule"]))["kind"] == schedule.kind
    assert "moec.schedule" not in spec.attrs


@pytest.mark.parametrize(
    "config",
    [
        ExpertUpConfig(num_experts=5, hidden=20, ffn=12, top_k=2, activation="silu", gated=True, panel=8),
        ExpertUpConfig(num_experts=5, hidden=20, ffn=12, top_k=2, activation="relu", gated=False, panel=8),
        ExpertDownConfig(num_experts=5, hidden=20, ffn=12, top_k=2, formats=("fp16",) * 5, panel=8),
        ExpertUpConfig(
            num_experts=5, hidden=20, ffn=12, top_k=2, activation="relu", gated=False, panel=8, formats=MIXED
        ),
    ],
    ids=["up-gated", "up", "down-fp16", "up-mixed"],
)
def test_built_panel_expert_kernel_has_its_spec_signature(config):
    spec, built = kernel_spec(config), make_kernel(config, CpuSchedule())
    assert _params(built) == _params(spec)
    rows, columns = (config.ffn, config.hidden) if config.kind == "expert_up" else (config.hidden, config.ffn)
    assert config.matrix_shape(rows, columns) == (5, -(-rows // 8), columns, 8)
    with pytest.raises(ValueError, match="CPU targets"):
        make_kernel(config, GpuSchedule())


def test_built_linear_kernel_has_its_spec_signature():
    config = LinearConfig(in_features=20, out_features=40, panel=16)
    spec, built = kernel_spec(config), make_kernel(config, CpuSchedule())
    assert _params(built) == _params(spec)
    assert _params(spec)[1] == ("w", "[3, 20, 16]", "float32")


def test_expert_kernels_with_one_lane_fold_nothing():
    """A one-lane dot (``lanes=1``, or an odd row length) has no partial sums to fold."""
    test_expert_kernels_match_numpy(
        CpuSchedule(lanes=1, rows_per_task=2, token_block=2, accumulators=1), "silu", True, {}, 3, None
    )


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_fp16_arithmetic_panel_kernels_stay_within_their_bound(gated, tokens):
    """fp16 experts multiplied in FP16 (chunked FP16 sums added in fp32) next to fp32 and int8
    experts: within the documented bound (1e-2 of the largest output) of the layer over the
    fp16-rounded weights, and not equal to the fp32-arithmetic result (FP16 really rounds)."""
    layer = _layer(experts=5, hidden=32, ffn=48, gated=gated, activation="silu" if gated else "relu")
    E, H, F, K = layer.num_experts, layer.hidden, layer.ffn, layer.top_k
    formats = ("fp16", "fp32", "fp16", "int8", "fp16")
    rng = np.random.default_rng(tokens)
    stored, held = {}, {}
    for role in ("w_up", "w_gate", "w_down") if gated else ("w_up", "w_down"):
        stored[role], held[role] = _stored_formats(getattr(layer, role), formats, 0, rng)
    layer = dataclasses.replace(layer, **held)
    x = rng.standard_normal((tokens, H)).astype(np.float32)
    index, gain_in, token, gain, offset = _routed_pairs(rng, tokens, E, K)
    panel = 16

    def buffers(role: str) -> list[np.ndarray]:
        parts = stored[role]
        return [pack_expert_panels(parts[f], panel) for f in ("fp32", "fp16", "int8")] + [parts["scale"]]

    results = {}
    for arithmetic in (True, False):
        common = {"num_experts": E, "hidden": H, "ffn": F, "top_k": K, "panel": panel, "formats": formats}
        common["fp16_arithmetic"] = arithmetic
        up_config = {**common, "activation": layer.activation, "gated": gated}
        gate = [*buffers("w_gate"), layer.b_gate] if gated else []
        (inter,) = _run(
            "expert_up", up_config, SCHEDULES[0], x, *buffers("w_up"), layer.b_up, *gate, offset, token,
            outputs=[((tokens * K, F), "float32")],
        )  # fmt: skip
        (results[arithmetic],) = _run(
            "expert_down", common, SCHEDULES[0], inter, *buffers("w_down"), layer.b_down, offset, token, gain,
            outputs=[((tokens, H), "float32")],
        )  # fmt: skip
    expected = _moe_reference(layer, x, index, gain_in)
    bound = 1e-2 * np.abs(expected).max()
    assert np.abs(results[True] - expected).max() <= bound
    assert_close(results[False], expected.astype(np.float32), FP32_ATOL)
    assert np.abs(results[True] - results[False]).max() > 1e-6, "FP16 arithmetic computed nothing in FP16"
