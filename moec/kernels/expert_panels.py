"""Expert kernels over packed weight panels: the many-token form of :mod:`moec.kernels.expert_ffn`.

Same contract as the row kernels (``expert_up`` writes ``inter``, ``expert_down`` adds each
pair's weighted result into ``y``; only experts with tokens are read), with the weights packed
in panels of ``panel`` output rows (:meth:`moec.kernels.config.ExpertConfig.matrix_shape`) and
the register blocking of :mod:`moec.kernels.linear`: a parallel task owns the same few panels
(the schedule's ``rows_per_task`` rows) of every expert and streams them expert by expert, one
contiguous stretch of each matrix; for each panel and expert group it takes ``token_block``
pairs at a time (then the remainder as one block) and keeps their ``token_block × panel``
partial outputs in vector registers (two sets for gated experts) while it streams the panel
once: for each input element one broadcast per pair, one vector load per weight row chunk,
FMAs, no horizontal reduction. int8-dot experts (:mod:`moec.kernels.int8_dot`) do the same 4
inputs at a time: per pair one broadcast of its 4 quantized activations, per weight vector (4
inputs of several rows) one INT8 dot instruction into INT32 accumulators, converted to float32
once per input group. The row kernels fold one dot per pair and weight row horizontally. Each
output element is written by the task owning its panel, experts in order, so results are
deterministic and need no atomics. CPU targets (the CUDA kernels stay row kernels).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from moec.kernels.backend import Backend, CpuBackend, source_row, token_blocks
from moec.kernels.config import ExpertConfig, ExpertDownConfig, ExpertUpConfig
from moec.kernels.expert_funcs import expert_down_func, expert_up_func
from moec.kernels.formats import DOT_DEPTH, FP16_CHUNK, WeightFormat
from moec.kernels.int8_dot import DotInstruction, activation_word, panel_instruction


def _check(config: ExpertConfig, backend: Backend) -> int:
    """The panel width, after checking the backend can build panel kernels (and, for FP16
    arithmetic, that both matrix widths are whole FP16 chunks)."""
    if not isinstance(backend, CpuBackend) or config.panel is None:
        raise ValueError("expert panel kernels are built for CPU targets, from configs with a panel")
    if config.fp16_arithmetic and (config.hidden % FP16_CHUNK or config.ffn % FP16_CHUNK):
        raise ValueError(f"FP16 arithmetic needs hidden and ffn sizes that are multiples of {FP16_CHUNK}")
    return config.panel


def _dot_instruction(config: ExpertConfig, backend: CpuBackend, panel: int):
    """The INT8 dot instruction int8-dot experts use in panels of ``panel`` rows (None without
    int8-dot experts)."""
    if not config.has_dot:
        return None
    return panel_instruction(config.int8_dot, panel, backend.schedule.lanes)


def _dot_panel_macro(
    dot: DotInstruction, fmt: WeightFormat, panel: int, length: int, matrices: int, indirect: bool
):
    """A TIR macro ``accumulate(accs, sums, weights, scales, slot, p, quantized, token, p0,
    count)``: for panel ``p`` of the first ``matrices`` (1 or 2) int8-dot ``weights`` (their
    ``scales``) and the ``count`` pairs from ``p0`` (source row ``token[p0 + t]`` when
    ``indirect``, else ``p0 + t``, of the ``quantized`` rows), per input group the INT32 sums
    ``sums[m]`` ``[token_block, panel]`` over ``length / 4`` dot instructions (one activation
    broadcast per pair and 4 inputs, shared by both matrices), then their float32 values added
    into ``accs[m]``."""
    row = source_row(indirect)
    lanes, size, two = dot.lanes, fmt.group or length, matrices == 2
    steps = size // DOT_DEPTH  # dot instructions per lane chunk and group

    def weights_at(w, slot, p, g, k, d):
        return w[slot, p, g * steps + k, T.Ramp(d * lanes * DOT_DEPTH, 1, lanes * DOT_DEPTH)]

    @T.macro
    def accumulate(accs, sums, weights, scales, slot, p, quantized, token, p0, count):
        for g in range(length // size):
            for t in T.unroll(count):
                for v in T.vectorized(panel):
                    sums[0][t, v] = 0
                    if two:
                        sums[1][t, v] = 0
            for k in range(steps):
                for t in T.unroll(count):
                    for d in T.unroll(panel // lanes):
                        sums[0][t, T.Ramp(d * lanes, 1, lanes)] = dot(
                            sums[0][t, T.Ramp(d * lanes, 1, lanes)],
                            weights_at(weights[0], slot, p, g, k, d),
                            activation_word(quantized[0], row(token, p0 + t), g * size + k * DOT_DEPTH),
                        )
                        if two:
                            sums[1][t, T.Ramp(d * lanes, 1, lanes)] = dot(
                                sums[1][t, T.Ramp(d * lanes, 1, lanes)],
                                weights_at(weights[1], slot, p, g, k, d),
                                activation_word(quantized[0], row(token, p0 + t), g * size + k * DOT_DEPTH),
                            )
            for t in T.unroll(count):
                for v in T.vectorized(panel):
                    accs[0][t, v] = accs[0][t, v] + dot.group_value(
                        sums[0][t, v], fmt, scales[0], slot, g, p * panel + v, quantized, row(token, p0 + t)
                    )
                    if two:
                        accs[1][t, v] = accs[1][t, v] + dot.group_value(
                            sums[1][t, v],
                            fmt,
                            scales[1],
                            slot,
                            g,
                            p * panel + v,
                            quantized,
                            row(token, p0 + t),
                        )

    return accumulate


def _panels_per_task(backend: CpuBackend, panel: int, panels: int) -> int:
    """Panels one parallel task streams from each expert: the schedule's ``rows_per_task``
    output rows (whole panels, at least one), so a task reads that many rows of an expert's
    matrix as one contiguous stream before it moves to the next expert."""
    return max(1, min(panels, backend.schedule.rows_per_task // panel))


def _groups_macro(
    config: ExpertConfig, backend: CpuBackend, token_block: int, panels: int, per_task: int, block_for
):
    """A TIR macro ``groups(buffers, quantized, acc, offset, task, pairs)``: for every expert with
    tokens (of the ``pairs`` grouped, through the backend's expert slots), in expert order,
    each of the task's ``per_task`` panels (of ``panels``) and the expert group's pairs through
    ``block((buffers, quantized, acc, e, slot, p), p0, count)`` of the expert's format
    (``block_for(fmt)``; ``slot``: the expert's entry in its format's buffers), ``token_block``
    pairs at a time, then the remainder."""

    def body_for(fmt: WeightFormat, _index: int):
        blocks = token_blocks(block_for(fmt), token_block)

        @T.macro
        def body(ctx, e, slot):
            buffers, quantized, acc, offset, p = ctx
            blocks((buffers, quantized, acc, e, slot, p), offset[e], offset[e + 1] - offset[e])

        return body

    run = config.expert_formats.dispatch(body_for)

    @T.macro
    def panels_of(ctx, e):
        buffers, quantized, acc, offset, task = ctx
        for q in range(per_task):
            if panels % per_task == 0 or task * per_task + q < panels:
                run((buffers, quantized, acc, offset, task * per_task + q), e)

    visit = backend.expert_slots(config.num_experts).visitor(panels_of)

    @T.macro
    def groups(buffers, quantized, acc, offset, task, pairs):
        visit((buffers, quantized, acc, offset, task), offset, pairs)

    return groups


def make_expert_up_panels(config: ExpertUpConfig, backend: Backend, act) -> tirx.PrimFunc:
    """PrimFunc ``inter[p] = act(gate_e(x[token[p]]), up_e(x[token[p]]))`` over packed panels.

    Signature: :meth:`ExpertUpConfig.signature` with a ``panel``; ``act`` is the activation
    epilogue (:func:`moec.kernels.expert_ffn.activation_epilogue`).
    """
    NB = _check(config, backend)
    c = config
    H, F, gated = c.hidden, c.ffn, c.gated
    P, TB = -(-F // NB), backend.token_block
    tail = F - (P - 1) * NB  # rows in the last panel

    dot = _dot_instruction(c, backend, NB)

    def block_for(fmt: WeightFormat):
        dot_panel = _dot_panel_macro(dot, fmt, NB, H, 2 if gated else 1, indirect=True) if fmt.dot else None

        @T.macro
        def block(ctx, p0, count):
            (x, b_up, b_gate, token, inter, by_format), quantized, accs, e, slot, p = ctx
            acc_up, acc_gate, half_up, half_gate, int_up, int_gate = accs
            w_up, s_up, w_gate, s_gate = fmt.of(by_format)
            for t in T.unroll(count):
                for v in T.vectorized(NB):
                    acc_up[t, v] = T.float32(0)
                    if gated:
                        acc_gate[t, v] = T.float32(0)
            if fmt.fp16_arithmetic:  # FP16 products and chunk sums, chunks added in float32
                for hc in range(H // FP16_CHUNK):
                    for t in T.unroll(count):
                        for v in T.vectorized(NB):
                            half_up[t, v] = T.float16(0)
                            if gated:
                                half_gate[t, v] = T.float16(0)
                    for hi in range(FP16_CHUNK):
                        for t in T.unroll(count):
                            for v in T.vectorized(NB):
                                half_up[t, v] = (
                                    half_up[t, v]
                                    + T.Cast("float16", x[token[p0 + t], hc * FP16_CHUNK + hi])
                                    * w_up[slot, p, hc * FP16_CHUNK + hi, v]
                                )
                                if gated:
                                    half_gate[t, v] = (
                                        half_gate[t, v]
                                        + T.Cast("float16", x[token[p0 + t], hc * FP16_CHUNK + hi])
                                        * w_gate[slot, p, hc * FP16_CHUNK + hi, v]
                                    )
                    for t in T.unroll(count):
                        for v in T.vectorized(NB):
                            acc_up[t, v] = acc_up[t, v] + T.Cast("float32", half_up[t, v])
                            if gated:
                                acc_gate[t, v] = acc_gate[t, v] + T.Cast("float32", half_gate[t, v])
            elif fmt.dot:  # INT8 products, INT32 sums per input group, groups added in float32
                dot_panel(
                    (acc_up, acc_gate), (int_up, int_gate), (w_up, w_gate), (s_up, s_gate), slot, p,
                    quantized, token, p0, count,
                )  # fmt: skip
            else:
                for h in range(H):
                    for t in T.unroll(count):
                        for v in T.vectorized(NB):
                            acc_up[t, v] = acc_up[t, v] + x[token[p0 + t], h] * fmt.load(
                                w_up, s_up, (slot, p, h, v), p * NB + v, h
                            )
                            if gated:
                                acc_gate[t, v] = acc_gate[t, v] + x[token[p0 + t], h] * fmt.load(
                                    w_gate, s_gate, (slot, p, h, v), p * NB + v, h
                                )
            for t in T.unroll(count):
                # the last panel's padding rows are not stored (unrolled, so the accumulator indices
                # stay constant and the accumulators in registers)
                for v in T.vectorized(NB) if tail == NB else T.unroll(NB):
                    if tail == NB or p < P - 1 or v < tail:
                        if gated:
                            inter[p0 + t, p * NB + v] = act(
                                fmt.finish(acc_gate[t, v], s_gate, slot, p * NB + v) + b_gate[e, p * NB + v],
                                fmt.finish(acc_up[t, v], s_up, slot, p * NB + v) + b_up[e, p * NB + v],
                            )
                        else:
                            inter[p0 + t, p * NB + v] = act(
                                T.float32(0),
                                fmt.finish(acc_up[t, v], s_up, slot, p * NB + v) + b_up[e, p * NB + v],
                            )

        return block

    PT = _panels_per_task(backend, NB, P)
    groups = _groups_macro(c, backend, TB, P, PT, block_for)
    second = (TB, NB) if gated else (1, 1)
    half = (TB, NB) if c.fp16_arithmetic else (1, 1)  # FP16 chunk sums, for fp16 experts
    half_second = (TB, NB) if c.fp16_arithmetic and gated else (1, 1)
    whole = (TB, NB) if dot else (1, 1)  # INT32 sums, for int8-dot experts
    whole_second = (TB, NB) if dot and gated else (1, 1)

    @T.macro
    def body(buffers, quantized, offset, n):
        for task in T.parallel(-(-P // PT)):
            # one buffer per matrix: each stays under the 1 KiB that a CPU keeps on the stack
            acc_up = T.alloc_buffer((TB, NB), "float32", scope=backend.scratch_scope)
            acc_gate = T.alloc_buffer(second, "float32", scope=backend.scratch_scope)
            half_up = T.alloc_buffer(half, "float16", scope=backend.scratch_scope)
            half_gate = T.alloc_buffer(half_second, "float16", scope=backend.scratch_scope)
            int_up = T.alloc_buffer(whole, "int32", scope=backend.scratch_scope)
            int_gate = T.alloc_buffer(whole_second, "int32", scope=backend.scratch_scope)
            accs = (acc_up, acc_gate, half_up, half_gate, int_up, int_gate)
            groups(buffers, quantized, accs, offset, task, n * c.top_k)

    return expert_up_func(c, backend, body)


def make_expert_down_panels(config: ExpertDownConfig, backend: Backend) -> tirx.PrimFunc:
    """PrimFunc ``y[token[p]] += gain[p] * (w_down_e @ inter[p] + b_down_e)`` over packed panels.

    Signature: :meth:`ExpertDownConfig.signature` with a ``panel``. Each task first zeroes its
    panel's columns of ``y`` for every token, then adds the expert groups in order.
    """
    NB = _check(config, backend)
    c = config
    H, F = c.hidden, c.ffn
    P, TB = -(-H // NB), backend.token_block
    tail = H - (P - 1) * NB

    dot = _dot_instruction(c, backend, NB)

    def block_for(fmt: WeightFormat):
        dot_panel = _dot_panel_macro(dot, fmt, NB, F, 1, indirect=False) if fmt.dot else None

        @T.macro
        def block(ctx, p0, count):
            (inter, b_down, token, gain, y, by_format), quantized, (acc, half, whole), e, slot, p = ctx
            w_down, s_down = fmt.of(by_format)
            for t in T.unroll(count):
                for v in T.vectorized(NB):
                    acc[t, v] = T.float32(0)
            if fmt.fp16_arithmetic:  # FP16 products and chunk sums, chunks added in float32
                for fc in range(F // FP16_CHUNK):
                    for t in T.unroll(count):
                        for v in T.vectorized(NB):
                            half[t, v] = T.float16(0)
                    for fi in range(FP16_CHUNK):
                        for t in T.unroll(count):
                            for v in T.vectorized(NB):
                                half[t, v] = (
                                    half[t, v]
                                    + T.Cast("float16", inter[p0 + t, fc * FP16_CHUNK + fi])
                                    * w_down[slot, p, fc * FP16_CHUNK + fi, v]
                                )
                    for t in T.unroll(count):
                        for v in T.vectorized(NB):
                            acc[t, v] = acc[t, v] + T.Cast("float32", half[t, v])
            elif fmt.dot:  # INT8 products, INT32 sums per input group, groups added in float32
                dot_panel(
                    (acc, acc),
                    (whole, whole),
                    (w_down, w_down),
                    (s_down, s_down),
                    slot,
                    p,
                    quantized,
                    token,
                    p0,
                    count,
                )
            else:
                for f in range(F):
                    for t in T.unroll(count):
                        for v in T.vectorized(NB):
                            acc[t, v] = acc[t, v] + inter[p0 + t, f] * fmt.load(
                                w_down, s_down, (slot, p, f, v), p * NB + v, f
                            )
            for t in T.unroll(count):
                for v in T.vectorized(NB) if tail == NB else T.unroll(NB):
                    if tail == NB or p < P - 1 or v < tail:
                        y[token[p0 + t], p * NB + v] = y[token[p0 + t], p * NB + v] + gain[p0 + t] * (
                            fmt.finish(acc[t, v], s_down, slot, p * NB + v) + b_down[e, p * NB + v]
                        )

        return block

    PT = _panels_per_task(backend, NB, P)
    groups = _groups_macro(c, backend, TB, P, PT, block_for)
    half_shape = (TB, NB) if c.fp16_arithmetic else (1, 1)  # FP16 chunk sums, for fp16 experts
    whole_shape = (TB, NB) if dot else (1, 1)  # INT32 sums, for int8-dot experts

    @T.macro
    def body(buffers, quantized, offset, n):
        y = buffers[4]
        for task in T.parallel(-(-P // PT)):
            acc = T.alloc_buffer((TB, NB), "float32", scope=backend.scratch_scope)
            half = T.alloc_buffer(half_shape, "float16", scope=backend.scratch_scope)
            whole = T.alloc_buffer(whole_shape, "int32", scope=backend.scratch_scope)
            for t in range(n):
                for v in range(min(PT * NB, H)):
                    if task * PT * NB + v < H:
                        y[t, task * PT * NB + v] = T.float32(0)
            groups(buffers, quantized, (acc, half, whole), offset, task, n * c.top_k)

    return expert_down_func(c, backend, body)
