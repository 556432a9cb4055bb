"""Sparse expert dispatch kernels: only the experts that some token selected are read.

Both kernels walk the groups made by :mod:`moec.kernels.group` (``offset``/``token``): for
each expert with at least one token, every weight row is streamed from memory once and dotted
with all of that expert's tokens while it sits in cache (a GEMM over the group; at one token
this is a gather-GEMV over the k selected experts). Experts with no tokens cost nothing: their
weights are never touched.

One algorithm per kernel, for every target: the output rows are tiled by the backend
(:mod:`moec.kernels.backend`: parallel row tasks on a CPU, thread blocks on CUDA) and the
expert groups are visited through its expert slots (on CUDA a block's own); for each expert
group, tokens are taken ``token_block`` at a time so one weight load feeds several FMAs (then
the tail one by one); the backend's dot leaves each row's sums in ``acc[m][pi, 0]`` and the
thread that owns the row applies the epilogue (the activation, or the pair's weighted partial
row, which ``expert_down`` then sums per token in expert order). Each output element is written
by one thread only, so there are no atomics and results are deterministic.

A config with a ``panel`` (weights packed in panels of output rows, CPU targets) gets the
output-stationary form of the same two kernels instead: :mod:`moec.kernels.expert_panels`.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from moec.kernels.backend import Backend
from moec.kernels.config import ExpertConfig, ExpertDownConfig, ExpertUpConfig
from moec.kernels.expert_funcs import expert_down_func, expert_up_func
from moec.kernels.expert_panels import make_expert_down_panels, make_expert_up_panels
from moec.kernels.formats import WeightFormat


def activation_epilogue(name: str, gated: bool, alpha: float, beta: float, limit: float):
    """A TIR expression builder ``(gate, up) -> value`` for the expert activation.

    Ungated: ``act(up)``; gated: ``act(min(gate, limit)) * (clip(up, -limit, limit) + beta)``
    (see :class:`moec.canonical.layer.MoELayer`); clamps are left out when ``limit`` is inf.
    A NaN stays NaN through ``relu`` and the clamps, as in PyTorch and onnxruntime.
    """

    def sigmoid(v):
        return T.float32(1) / (T.float32(1) + T.exp(T.float32(0) - v))

    def act(v):
        if name == "relu":  # not max(v, 0), which TVM makes 0 for a NaN v (see nan_legalize)
            return T.if_then_else(v < T.float32(0), T.float32(0), v)
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

    top, bottom = T.float32(limit), T.float32(-limit)

    def clamped(g, u):  # selects that keep a NaN, as torch.clamp does (TVM's min/max drop it)
        g = T.if_then_else(g > top, top, g)
        u = T.if_then_else(u > top, top, T.if_then_else(u < bottom, bottom, u))
        return act(g) * (u + T.float32(beta))

    return clamped


def expert_rows_macro(
    backend: Backend, count: int, config: ExpertConfig, matrices: int, width: int, step_for
):
    """The loop nest both expert kernels share, as a TIR macro ``nest(buffers, quantized, offset, n)``.

    The backend tiles the ``count`` output rows over threads; each thread visits the expert
    groups (``offset``) through the backend's expert slots (:class:`~moec.kernels.backend.ExpertSlots`:
    on a GPU each slot gets blocks of its own, so a kernel's threads must write only their own
    expert's outputs) in expert order and, for each expert with tokens and each of its rows, calls
    ``step(acc, (buffers, quantized), e, slot, j, p0, count, lane, owner)`` of the expert's format
    (``step_for(fmt)``; ``slot``: the expert's entry in its format's buffers) on the group's
    tokens ``token_block`` at a time, then one by one for the tail. ``acc`` is the thread's
    accumulators, one ``[token_block, width]`` buffer per matrix; ``owner`` says whether this
    thread writes row ``j``.
    """
    rows, PB = backend.rows(count), backend.token_block
    second = (PB, width) if matrices == 2 else (1,)

    def body_for(fmt: WeightFormat, _index: int):
        step = step_for(fmt)

        @T.macro
        def body(ctx, e, slot):
            acc, buffers, offset, task, thread, lane = ctx
            for r in rows.per_thread():
                for pb in range((offset[e + 1] - offset[e]) // PB):
                    step(
                        acc, buffers, e, slot, rows.row(task, thread, r), offset[e] + pb * PB, PB,
                        lane, rows.owns(task, thread, r, lane),
                    )  # fmt: skip
                for pt in range((offset[e + 1] - offset[e]) % PB):
                    step(
                        acc, buffers, e, slot, rows.row(task, thread, r), offset[e + 1] - pt - 1, 1,
                        lane, rows.owns(task, thread, r, lane),
                    )  # fmt: skip

        return body

    run = config.expert_formats.dispatch(body_for)
    visit = backend.expert_slots(config.num_experts).visitor(run)

    @T.macro
    def nest(buffers, quantized, offset, n):
        for task in rows.tasks():
            for thread in rows.threads():
                for lane in rows.lanes():
                    # one buffer per matrix: each stays under the 1 KiB that a CPU keeps on the stack
                    acc_first = T.alloc_buffer((PB, width), "float32", scope=backend.scratch_scope)
                    acc_second = T.alloc_buffer(second, "float32", scope=backend.scratch_scope)
                    acc = (acc_first, acc_second)
                    visit((acc, (buffers, quantized), offset, task, thread, lane), offset, n * config.top_k)

    return nest


def make_expert_up_kernel(config: ExpertUpConfig, backend: Backend) -> tirx.PrimFunc:
    """PrimFunc ``inter[p] = act(gate_e(x[token[p]]), up_e(x[token[p]]))`` per expert group.

    Signature: :meth:`ExpertUpConfig.signature` (``x``, the ``w_up`` buffers, ``b_up``, [the
    ``w_gate`` buffers, ``b_gate``,] ``offset``, ``token`` → ``inter``): one matrix buffer per
    expert format used (:mod:`moec.kernels.formats`), the rest float32.
    """
    c = config
    H, F, gated = c.hidden, c.ffn, c.gated
    act = activation_epilogue(c.activation, gated, c.alpha, c.beta, c.limit)
    if c.panel is not None:
        return make_expert_up_panels(c, backend, act)
    width = backend.dot(H, indirect=True, fmt=WeightFormat("fp32"))[1]

    def step_for(fmt: WeightFormat):
        dot = backend.dot(H, indirect=True, fmt=fmt)[0]

        @T.macro
        def step(acc, inputs, e, slot, j, p0, count, lane, owner):
            """Row ``j`` of expert ``e`` for the ``count`` pairs from ``p0``: up (and gate) dots,
            then the activation."""
            (x, b_up, b_gate, token, inter, by_format), quantized = inputs
            w_up, s_up, w_gate, s_gate = fmt.of(by_format)
            dot(acc, 0, w_up, s_up, slot, j, quantized if fmt.dot else x, token, p0, count, lane)
            if gated:
                dot(acc, 1, w_gate, s_gate, slot, j, quantized if fmt.dot else x, token, p0, count, lane)
            if owner:
                for pi in range(count):
                    if gated:
                        inter[p0 + pi, j] = act(
                            fmt.finish(acc[1][pi, 0], s_gate, slot, j) + b_gate[e, j],
                            fmt.finish(acc[0][pi, 0], s_up, slot, j) + b_up[e, j],
                        )
                    else:
                        inter[p0 + pi, j] = act(
                            T.float32(0), fmt.finish(acc[0][pi, 0], s_up, slot, j) + b_up[e, j]
                        )

        return step

    nest = expert_rows_macro(backend, F, c, 2 if gated else 1, width, step_for)
    return expert_up_func(c, backend, nest)


def make_expert_down_kernel(config: ExpertDownConfig, backend: Backend) -> tirx.PrimFunc:
    """PrimFunc ``y[t] = sum of gain[p] * (w_down_e @ inter[p] + b_down_e)`` over token ``t``'s pairs.

    Signature: :meth:`ExpertDownConfig.signature` (``inter``, the ``w_down`` buffers, ``b_down``,
    ``offset``, ``token``, ``gain`` → ``y``); every row of ``y`` is written, so the result is the
    full MoE output. Three steps, so that the experts' rows spread like ``expert_up``'s while
    each output stays written by one thread in a fixed order (no atomics):

    1. ``pos[t, r]``: where token ``t``'s ``r``-th pair sits in the grouped order (its pairs in
       that order, so by expert);
    2. ``partial[p] = gain[p] * (w_down_e @ inter[p] + b_down_e)`` for every routed pair ``p``,
       over the backend's row tiles and spread expert slots;
    3. ``y[t, j]``: the sum, from 0, of ``partial[pos[t, r], j]`` over ``r`` (skipped slots,
       past ``offset[E]``, add nothing).
    """
    c = config
    E, H, F, K = c.num_experts, c.hidden, c.ffn, c.top_k
    if c.panel is not None:
        return make_expert_down_panels(c, backend)
    width = backend.dot(F, indirect=False, fmt=WeightFormat("fp32"))[1]

    def step_for(fmt: WeightFormat):
        dot = backend.dot(F, indirect=False, fmt=fmt)[0]

        @T.macro
        def step(acc, inputs, e, slot, j, p0, count, lane, owner):
            """Row ``j`` of expert ``e`` for the ``count`` pairs from ``p0``, into ``partial``."""
            (inter, b_down, token, gain, partial, by_format), quantized = inputs
            w_down, s_down = fmt.of(by_format)
            dot(acc, 0, w_down, s_down, slot, j, quantized if fmt.dot else inter, token, p0, count, lane)
            if owner:
                for pi in range(count):
                    partial[p0 + pi, j] = gain[p0 + pi] * (
                        fmt.finish(acc[0][pi, 0], s_down, slot, j) + b_down[e, j]
                    )

        return step

    nest = expert_rows_macro(backend, H, c, 1, width, step_for)
    items = backend.items()

    @T.macro
    def body(buffers, quantized, offset, n):
        inter, b_down, token, gain, y, by_format = buffers
        partial = T.alloc_buffer((n * K, H), "float32")
        pos = T.alloc_buffer((n, K), "int32")
        for o in items.outer(n * K):
            for i in items.inner():
                if items.valid(o, i, n * K):
                    p = items.index(o, i)
                    rank = T.alloc_buffer((1,), "int32", scope=backend.scratch_scope)
                    rank[0] = 0
                    for q in range(p):
                        if token[q] == token[p]:
                            rank[0] = rank[0] + 1
                    if rank[0] < K:  # always (a token has K pairs); guards a corrupt token table
                        pos[token[p], rank[0]] = T.Cast("int32", p)
        nest((inter, b_down, token, gain, partial, by_format), quantized, offset, n)
        for o in items.outer(n * H):
            for i in items.inner():
                if items.valid(o, i, n * H):
                    t = items.index(o, i) // H
                    j = items.index(o, i) % H
                    total = T.alloc_buffer((1,), "float32", scope=backend.scratch_scope)
                    total[0] = T.float32(0)
                    for r in range(K):
                        if pos[t, r] < offset[E]:
                            total[0] = total[0] + partial[pos[t, r], j]
                    y[t, j] = total[0]

    return expert_down_func(c, backend, body)
