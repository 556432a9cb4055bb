"""Sparse expert dispatch kernels: only the experts that some token selected are read.

Both kernels walk the groups made by :mod:`moec.kernels.group` (``offset``/``token``):
for each expert with at least one token, every weight row is streamed from memory once
and dotted with all of that expert's tokens while it sits in L1 (a GEMM over the group;
at one token this is a gather-GEMV over the k selected experts). Experts with no tokens
cost nothing: their weights are never touched.

Schedule (from :class:`moec.schedule.CpuSchedule`): output rows are split into
``rows_per_task`` chunks run in parallel (each thread streams its own contiguous slice of
each expert); the dot over the input dimension is vectorised ``lanes`` wide with a
register accumulator per token; tokens are processed ``token_block`` at a time so one row
load feeds several FMAs. Each thread owns whole output columns, so accumulating into the
output needs no synchronisation.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from moec.schedule import CpuSchedule

WEIGHT_DTYPES = ("float32", "float16")


def _largest_divisor_at_most(value: int, limit: int) -> int:
    return max(d for d in range(1, min(value, limit) + 1) if value % d == 0)


def _largest_pow2_divisor_at_most(value: int, limit: int) -> int:
    size = 1
    while size * 2 <= limit and value % (size * 2) == 0:
        size *= 2
    return size


def _widen(weight_dtype: str):
    """``load(value)``: a weight element as float32 (weights may be stored narrower)."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    if weight_dtype == "float32":
        return lambda value: value
    return lambda value: T.Cast("float32", value)


def _make_dot(length: int, schedule: CpuSchedule, indirect: bool, weight_dtype: str = "float32"):
    """A TIR macro ``dot(acc, w, e, j, src, token, p0, count)`` leaving in ``acc[pi, 0]`` the dot of
    weight row ``w[e, j]`` with source row ``token[p0 + pi]`` (``indirect``) or ``p0 + pi``, for
    ``pi < count``. Weights are read as ``weight_dtype`` and multiplied in float32.

    The ``length``-long dot runs ``accumulators`` independent vector chains, each ``lanes`` wide, so
    FMA latency is hidden; the partial sums are then folded by halving (log2 steps, not a serial
    chain). ``acc`` must be a local ``[token_block, lanes * accumulators]`` buffer.
    """
    load = _widen(weight_dtype)
    L = _largest_pow2_divisor_at_most(length, schedule.lanes)
    A = _largest_pow2_divisor_at_most(length // L, schedule.accumulators)
    W = L * A

    @T.macro
    def halve(acc, pi, half):
        for lane in T.vectorized(half):
            acc[pi, lane] = acc[pi, lane] + acc[pi, lane + half]

    @T.macro
    def dot(acc, w, e, j, src, token, p0, count):
        for pi, lane in T.grid(count, W):
            acc[pi, lane] = T.float32(0)
        for ho in range(length // W):
            for a in T.unroll(A):
                for pi in T.unroll(count):
                    for lane in T.vectorized(L):
                        if indirect:
                            acc[pi, a * L + lane] = (
                                acc[pi, a * L + lane]
                                + load(w[e, j, ho * W + a * L + lane])
                                * src[token[p0 + pi], ho * W + a * L + lane]
                            )
                        else:
                            acc[pi, a * L + lane] = (
                                acc[pi, a * L + lane]
                                + load(w[e, j, ho * W + a * L + lane]) * src[p0 + pi, ho * W + a * L + lane]
                            )
        for pi in T.unroll(count):
            if W >= 128:
                halve(acc, pi, 64)
            if W >= 64:
                halve(acc, pi, 32)
            if W >= 32:
                halve(acc, pi, 16)
            if W >= 16:
                halve(acc, pi, 8)
            if W >= 8:
                halve(acc, pi, 4)
            if W >= 4:
                halve(acc, pi, 2)
            if W >= 2:
                halve(acc, pi, 1)

    if W > 256:
        raise ValueError(f"lanes x accumulators = {W} is more than the 256 this kernel folds")
    return dot, W


def _activation(name: str, gated: bool, alpha: float, beta: float, limit: float):
    """A TIR expression builder ``(gate, up) -> value`` for the expert activation.

    Ungated: ``act(up)``; gated: ``act(min(gate, limit)) * (clip(up, -limit, limit) + beta)``
    (see :class:`moec.frontend.layer.MoELayer`); clamps are left out when ``limit`` is inf.
    """

    def sigmoid(v):
        return T.float32(1) / (T.float32(1) + T.exp(T.float32(0) - v))

    def act(v):
        if name == "relu":
            return T.max(v, T.float32(0))
        if name == "gelu":
            return T.float32(0.5) * v * (T.float32(1) + T.erf(v * T.float32(0.7071067811865476)))
        if name == "gelu_tanh":
            inner = T.float32(0.7978845608028654) * (v + T.float32(0.044715) * v * v * v)
            return T.float32(0.5) * v * (T.float32(1) + T.tanh(inner))
        if name == "silu":
            return v * sigmoid(v if alpha == 1.0 else T.float32(alpha) * v)
        if name == "identity":
            return v
        raise ValueError(f"unknown activation {name!r}")

    if not gated:
        return lambda g, u: act(u)
    if not math.isfinite(limit):
        if beta == 0.0:
            return lambda g, u: act(g) * u
        return lambda g, u: act(g) * (u + T.float32(beta))

    def clamped(g, u):
        g = T.min(g, T.float32(limit))
        u = T.max(T.min(u, T.float32(limit)), T.float32(-limit))
        return act(g) * (u + T.float32(beta))

    return clamped


def make_expert_up_kernel(
    num_experts: int,
    hidden: int,
    ffn: int,
    top_k: int,
    activation: str,
    gated: bool,
    *,
    schedule: CpuSchedule,
    alpha: float = 1.0,
    beta: float = 0.0,
    limit: float = math.inf,
    weight_dtype: str = "float32",
) -> tirx.PrimFunc:
    """PrimFunc computing ``inter[p] = act(gate_e(x[token[p]]), up_e(x[token[p]]))`` per group.

    Signature: ``(x[n, H], w_up[E, F, H], b_up[E, F], [w_gate[E, F, H], b_gate[E, F],]
    offset[E+1], token[n*k]) -> inter[n*k, F]``; the ``w_*`` are ``weight_dtype``, the rest
    float32.
    """
    E, H, F, K = num_experts, hidden, ffn, top_k
    RB = _largest_divisor_at_most(F, schedule.rows_per_task)
    PB = schedule.token_block
    act = _activation(activation, gated, alpha, beta, limit)
    dot, W = _make_dot(H, schedule, indirect=True, weight_dtype=weight_dtype)

    if gated:

        @T.prim_func
        def expert_up(
            x_h: T.handle,
            w_up: T.Buffer((E, F, H), weight_dtype),
            b_up: T.Buffer((E, F), "float32"),
            w_gate: T.Buffer((E, F, H), weight_dtype),
            b_gate: T.Buffer((E, F), "float32"),
            offset: T.Buffer((E + 1,), "int32"),
            token_h: T.handle,
            inter_h: T.handle,
        ):
            T.func_attr({"tir.noalias": True, "op_pattern": 8})
            n = T.int64()
            x = T.match_buffer(x_h, (n, H), "float32")
            token = T.match_buffer(token_h, (n * K,), "int32")
            inter = T.match_buffer(inter_h, (n * K, F), "float32")
            for jo in T.parallel(F // RB):
                acc_u = T.alloc_buffer((PB, W), "float32", scope="local")
                acc_g = T.alloc_buffer((PB, W), "float32", scope="local")
                for e in range(E):
                    for ji in range(RB):
                        for pb in range((offset[e + 1] - offset[e]) // PB):
                            dot(acc_u, w_up, e, jo * RB + ji, x, token, offset[e] + pb * PB, PB)
                            dot(acc_g, w_gate, e, jo * RB + ji, x, token, offset[e] + pb * PB, PB)
                            for pi in range(PB):
                                inter[offset[e] + pb * PB + pi, jo * RB + ji] = act(
                                    acc_g[pi, 0] + b_gate[e, jo * RB + ji],
                                    acc_u[pi, 0] + b_up[e, jo * RB + ji],
                                )
                        for pt in range((offset[e + 1] - offset[e]) % PB):
                            dot(acc_u, w_up, e, jo * RB + ji, x, token, offset[e + 1] - pt - 1, 1)
                            dot(acc_g, w_gate, e, jo * RB + ji, x, token, offset[e + 1] - pt - 1, 1)
                            inter[offset[e + 1] - pt - 1, jo * RB + ji] = act(
                                acc_g[0, 0] + b_gate[e, jo * RB + ji], acc_u[0, 0] + b_up[e, jo * RB + ji]
                            )

        return expert_up

    @T.prim_func
    def expert_up_ungated(
        x_h: T.handle,
        w_up: T.Buffer((E, F, H), weight_dtype),
        b_up: T.Buffer((E, F), "float32"),
        offset: T.Buffer((E + 1,), "int32"),
        token_h: T.handle,
        inter_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(x_h, (n, H), "float32")
        token = T.match_buffer(token_h, (n * K,), "int32")
        inter = T.match_buffer(inter_h, (n * K, F), "float32")
        for jo in T.parallel(F // RB):
            acc_u = T.alloc_buffer((PB, W), "float32", scope="local")
            for e in range(E):
                for ji in range(RB):
                    for pb in range((offset[e + 1] - offset[e]) // PB):
                        dot(acc_u, w_up, e, jo * RB + ji, x, token, offset[e] + pb * PB, PB)
                        for pi in range(PB):
                            inter[offset[e] + pb * PB + pi, jo * RB + ji] = act(
                                T.float32(0), acc_u[pi, 0] + b_up[e, jo * RB + ji]
                            )
                    for pt in range((offset[e + 1] - offset[e]) % PB):
                        dot(acc_u, w_up, e, jo * RB + ji, x, token, offset[e + 1] - pt - 1, 1)
                        inter[offset[e + 1] - pt - 1, jo * RB + ji] = act(
                            T.float32(0), acc_u[0, 0] + b_up[e, jo * RB + ji]
                        )

    return expert_up_ungated


def make_expert_down_kernel(
    num_experts: int,
    hidden: int,
    ffn: int,
    top_k: int,
    *,
    schedule: CpuSchedule,
    weight_dtype: str = "float32",
) -> tirx.PrimFunc:
    """PrimFunc ``y[token[p]] += gain[p] * (w_down_e @ inter[p] + b_down_e)`` over all groups.

    Signature: ``(inter[n*k, F], w_down[E, H, F], b_down[E, H], offset[E+1], token[n*k],
    gain[n*k]) -> y[n, H]``; ``y`` is zeroed first, so the result is the full MoE output.
    ``w_down`` is ``weight_dtype``, the rest float32.
    """
    E, H, F, K = num_experts, hidden, ffn, top_k
    RB = _largest_divisor_at_most(H, schedule.rows_per_task)
    PB = schedule.token_block
    dot, W = _make_dot(F, schedule, indirect=False, weight_dtype=weight_dtype)

    @T.macro
    def accumulate(acc, y, b_down, gain, token, e, j, p, pi):
        y[token[p], j] = y[token[p], j] + gain[p] * (acc[pi, 0] + b_down[e, j])

    @T.prim_func
    def expert_down(
        inter_h: T.handle,
        w_down: T.Buffer((E, H, F), weight_dtype),
        b_down: T.Buffer((E, H), "float32"),
        offset: T.Buffer((E + 1,), "int32"),
        token_h: T.handle,
        gain_h: T.handle,
        y_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        n = T.int64()
        inter = T.match_buffer(inter_h, (n * K, F), "float32")
        token = T.match_buffer(token_h, (n * K,), "int32")
        gain = T.match_buffer(gain_h, (n * K,), "float32")
        y = T.match_buffer(y_h, (n, H), "float32")
        for jo in T.parallel(H // RB):
            acc = T.alloc_buffer((PB, W), "float32", scope="local")
            for t, ji in T.grid(n, RB):
                y[t, jo * RB + ji] = T.float32(0)
            for e in range(E):
                for ji in range(RB):
                    for pb in range((offset[e + 1] - offset[e]) // PB):
                        dot(acc, w_down, e, jo * RB + ji, inter, token, offset[e] + pb * PB, PB)
                        for pi in range(PB):
                            accumulate(
                                acc, y, b_down, gain, token, e, jo * RB + ji, offset[e] + pb * PB + pi, pi
                            )
                    for pt in range((offset[e + 1] - offset[e]) % PB):
                        dot(acc, w_down, e, jo * RB + ji, inter, token, offset[e + 1] - pt - 1, 1)
                        accumulate(acc, y, b_down, gain, token, e, jo * RB + ji, offset[e + 1] - pt - 1, 0)

    return expert_down
