"""Sparse expert dispatch kernels: only the experts that some token selected are read.

Both kernels walk the groups made by :mod:`moec.kernels.group` (``offset``/``token``): for
each expert with at least one token, every weight row is streamed from memory once and dotted
with all of that expert's tokens while it sits in cache (a GEMM over the group; at one token
this is a gather-GEMV over the k selected experts). Experts with no tokens cost nothing: their
weights are never touched.

One algorithm per kernel, for every target: the output rows are tiled by the backend
(:mod:`moec.kernels.backend`: parallel row tasks on a CPU, thread blocks on CUDA); for each
expert group, tokens are taken ``token_block`` at a time so one weight load feeds several
FMAs (then the tail one by one); the backend's dot leaves each row's sums in ``acc[m][pi, 0]``
and the thread that owns the row applies the epilogue (the activation, or the weighted
accumulation into the output). Each output element is written by one thread only, experts in
a fixed order, so there are no atomics and results are deterministic.

A config with a ``panel`` (weights packed in panels of output rows, CPU targets) gets the
output-stationary form of the same two kernels instead: :mod:`moec.kernels.expert_panels`.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from moec.kernels.backend import Backend
from moec.kernels.config import ExpertDownConfig, ExpertUpConfig
from moec.kernels.expert_panels import make_expert_down_panels, make_expert_up_panels


def activation_epilogue(name: str, gated: bool, alpha: float, beta: float, limit: float):
    """A TIR expression builder ``(gate, up) -> value`` for the expert activation.

    Ungated: ``act(up)``; gated: ``act(min(gate, limit)) * (clip(up, -limit, limit) + beta)``
    (see :class:`moec.canonical.layer.MoELayer`); clamps are left out when ``limit`` is inf.
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


def _without_params(func: tirx.PrimFunc, names: tuple[str, ...]) -> tirx.PrimFunc:
    """``func`` without the (unused) parameters ``names``: one TVMScript source serves signatures
    that differ only by optional inputs (the gate of ungated experts)."""
    params = [p for p in func.params if p.name not in names]
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


def expert_rows_macro(backend: Backend, count: int, experts: int, matrices: int, width: int, step, zero=None):
    """The loop nest both expert kernels share, as a TIR macro ``nest(buffers, offset, n)``.

    The backend tiles the ``count`` output rows over threads; each thread walks the expert
    groups (``offset``) in order and, for each of its rows, calls
    ``step(acc, buffers, e, j, p0, count, lane, owner)`` on the group's tokens ``token_block`` at
    a time, then one by one for the tail. ``acc`` is the thread's accumulators, one
    ``[token_block, width]`` buffer per matrix; ``owner`` says whether this thread writes row ``j``.
    ``zero(buffers, n, j)``, if given, first clears each owned output row.
    """
    rows, PB = backend.rows(count), backend.token_block
    second = (PB, width) if matrices == 2 else (1,)

    @T.macro
    def nest(buffers, offset, n):
        for task in rows.tasks():
            for thread in rows.threads():
                for lane in rows.lanes():
                    # one buffer per matrix: each stays under the 1 KiB that a CPU keeps on the stack
                    acc_first = T.alloc_buffer((PB, width), "float32", scope=backend.scratch_scope)
                    acc_second = T.alloc_buffer(second, "float32", scope=backend.scratch_scope)
                    acc = (acc_first, acc_second)
                    if zero is not None:
                        for r in rows.per_thread():
                            if rows.owns(task, thread, r, lane):
                                zero(buffers, n, rows.row(task, thread, r))
                    for e in range(experts):
                        for r in rows.per_thread():
                            for pb in range((offset[e + 1] - offset[e]) // PB):
                                step(
                                    acc, buffers, e, rows.row(task, thread, r), offset[e] + pb * PB, PB,
                                    lane, rows.owns(task, thread, r, lane),
                                )  # fmt: skip
                            for pt in range((offset[e + 1] - offset[e]) % PB):
                                step(
                                    acc, buffers, e, rows.row(task, thread, r), offset[e + 1] - pt - 1, 1,
                                    lane, rows.owns(task, thread, r, lane),
                                )  # fmt: skip

    return nest


def make_expert_up_kernel(config: ExpertUpConfig, backend: Backend) -> tirx.PrimFunc:
    """PrimFunc ``inter[p] = act(gate_e(x[token[p]]), up_e(x[token[p]]))`` per expert group.

    Signature: :meth:`ExpertUpConfig.signature` (``x``, ``w_up``, ``b_up``, [``w_gate``,
    ``b_gate``,] ``offset``, ``token`` → ``inter``); the ``w_*`` are ``weight_dtype``, the rest
    float32.
    """
    c = config
    E, H, F, K, WD, gated = c.num_experts, c.hidden, c.ffn, c.top_k, c.weight_dtype, c.gated
    act = activation_epilogue(c.activation, gated, c.alpha, c.beta, c.limit)
    if c.panel is not None:
        panels = make_expert_up_panels(c, backend, act)
        return panels if gated else _without_params(panels, ("w_gate", "b_gate"))
    dot, W = backend.dot(H, indirect=True, weight_dtype=WD)

    @T.macro
    def step(acc, buffers, e, j, p0, count, lane, owner):
        """Row ``j`` of expert ``e`` for the ``count`` pairs from ``p0``: up (and gate) dots, then
        the activation."""
        x, w_up, b_up, w_gate, b_gate, token, inter = buffers
        dot(acc, 0, w_up, e, j, x, token, p0, count, lane)
        if gated:
            dot(acc, 1, w_gate, e, j, x, token, p0, count, lane)
        if owner:
            for pi in range(count):
                if gated:
                    inter[p0 + pi, j] = act(acc[1][pi, 0] + b_gate[e, j], acc[0][pi, 0] + b_up[e, j])
                else:
                    inter[p0 + pi, j] = act(T.float32(0), acc[0][pi, 0] + b_up[e, j])

    nest = expert_rows_macro(backend, F, E, 2 if gated else 1, W, step)

    @T.prim_func
    def expert_up(
        x_h: T.handle,
        w_up: T.Buffer((E, F, H), WD),
        b_up: T.Buffer((E, F), "float32"),
        w_gate: T.Buffer((E, F, H), WD),
        b_gate: T.Buffer((E, F), "float32"),
        offset: T.Buffer((E + 1,), "int32"),
        token_h: T.handle,
        inter_h: T.handle,
    ):
        T.func_attr(backend.attrs)
        n = T.int64()
        x = T.match_buffer(x_h, (n, H), "float32")
        token = T.match_buffer(token_h, (n * K,), "int32")
        inter = T.match_buffer(inter_h, (n * K, F), "float32")
        nest((x, w_up, b_up, w_gate, b_gate, token, inter), offset, n)

    return expert_up if gated else _without_params(expert_up, ("w_gate", "b_gate"))


def make_expert_down_kernel(config: ExpertDownConfig, backend: Backend) -> tirx.PrimFunc:
    """PrimFunc ``y[token[p]] += gain[p] * (w_down_e @ inter[p] + b_down_e)`` over all groups.

    Signature: :meth:`ExpertDownConfig.signature` (``inter``, ``w_down``, ``b_down``, ``offset``,
    ``token``, ``gain`` → ``y``); ``y`` is zeroed first, so the result is the full MoE output.
    The thread owning row ``j`` visits the experts in order, so a token's k contributions are
    added by one thread in a fixed order.
    """
    c = config
    E, H, F, K, WD = c.num_experts, c.hidden, c.ffn, c.top_k, c.weight_dtype
    if c.panel is not None:
        return make_expert_down_panels(c, backend)
    dot, W = backend.dot(F, indirect=False, weight_dtype=WD)

    @T.macro
    def zero(buffers, n, j):
        y = buffers[-1]
        for t in range(n):
            y[t, j] = T.float32(0)

    @T.macro
    def step(acc, buffers, e, j, p0, count, lane, owner):
        """Row ``j`` of expert ``e`` for the ``count`` pairs from ``p0``, added into ``y``."""
        inter, w_down, b_down, token, gain, y = buffers
        dot(acc, 0, w_down, e, j, inter, token, p0, count, lane)
        if owner:
            for pi in range(count):
                y[token[p0 + pi], j] = y[token[p0 + pi], j] + gain[p0 + pi] * (acc[0][pi, 0] + b_down[e, j])

    nest = expert_rows_macro(backend, H, E, 1, W, step, zero)

    @T.prim_func
    def expert_down(
        inter_h: T.handle,
        w_down: T.Buffer((E, H, F), WD),
        b_down: T.Buffer((E, H), "float32"),
        offset: T.Buffer((E + 1,), "int32"),
        token_h: T.handle,
        gain_h: T.handle,
        y_h: T.handle,
    ):
        T.func_attr(backend.attrs)
        n = T.int64()
        inter = T.match_buffer(inter_h, (n * K, F), "float32")
        token = T.match_buffer(token_h, (n * K,), "int32")
        gain = T.match_buffer(gain_h, (n * K,), "float32")
        y = T.match_buffer(y_h, (n, H), "float32")
        nest((inter, w_down, b_down, token, gain, y), offset, n)

    return expert_down
