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
FMAs, no horizontal reduction. The
row kernels fold one dot per pair and weight row horizontally. Each output element is written
by the task owning its panel, experts in order, so results are deterministic and need no
atomics. CPU targets (the CUDA kernels stay row kernels).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from moec.kernels.backend import Backend, CpuBackend, token_blocks, widen
from moec.kernels.config import ExpertConfig, ExpertDownConfig, ExpertUpConfig


def _check(config: ExpertConfig, backend: Backend) -> int:
    """The panel width, after checking the backend can build panel kernels."""
    if not isinstance(backend, CpuBackend) or config.panel is None:
        raise ValueError("expert panel kernels are built for CPU targets, from configs with a panel")
    return config.panel


def _panels_per_task(backend: CpuBackend, panel: int, panels: int) -> int:
    """Panels one parallel task streams from each expert: the schedule's ``rows_per_task``
    output rows (whole panels, at least one), so a task reads that many rows of an expert's
    matrix as one contiguous stream before it moves to the next expert."""
    return max(1, min(panels, backend.schedule.rows_per_task // panel))


def _groups_macro(experts: int, token_block: int, panels: int, per_task: int, block):
    """A TIR macro ``groups(buffers, acc, offset, task)``: for every expert, each of the task's
    ``per_task`` panels (of ``panels``) and the expert group's pairs through
    ``block((buffers, acc, e, p), p0, count)``, ``token_block`` at a time, then the remainder."""
    blocks = token_blocks(block, token_block)

    @T.macro
    def groups(buffers, acc, offset, task):
        for e in range(experts):
            for q in range(per_task):
                if panels % per_task == 0 or task * per_task + q < panels:
                    blocks((buffers, acc, e, task * per_task + q), offset[e], offset[e + 1] - offset[e])

    return groups


def make_expert_up_panels(config: ExpertUpConfig, backend: Backend, act) -> tirx.PrimFunc:
    """PrimFunc ``inter[p] = act(gate_e(x[token[p]]), up_e(x[token[p]]))`` over packed panels.

    Signature: :meth:`ExpertUpConfig.signature` with a ``panel``; ``act`` is the activation
    epilogue (:func:`moec.kernels.expert_ffn.activation_epilogue`).
    """
    NB = _check(config, backend)
    c = config
    E, H, F, K, WD, gated = c.num_experts, c.hidden, c.ffn, c.top_k, c.weight_dtype, c.gated
    P, TB, load = -(-F // NB), backend.token_block, widen(WD)
    tail = F - (P - 1) * NB  # rows in the last panel

    @T.macro
    def block(ctx, p0, count):
        (x, w_up, b_up, w_gate, b_gate, token, inter), (acc_up, acc_gate), e, p = ctx
        for t in T.unroll(count):
            for v in T.vectorized(NB):
                acc_up[t, v] = T.float32(0)
                if gated:
                    acc_gate[t, v] = T.float32(0)
        for h in range(H):
            for t in T.unroll(count):
                for v in T.vectorized(NB):
                    acc_up[t, v] = acc_up[t, v] + x[token[p0 + t], h] * load(w_up[e, p, h, v])
                    if gated:
                        acc_gate[t, v] = acc_gate[t, v] + x[token[p0 + t], h] * load(w_gate[e, p, h, v])
        for t in T.unroll(count):
            # the last panel's padding rows are not stored (unrolled, so the accumulator indices
            # stay constant and the accumulators in registers)
            for v in T.vectorized(NB) if tail == NB else T.unroll(NB):
                if tail == NB or p < P - 1 or v < tail:
                    if gated:
                        inter[p0 + t, p * NB + v] = act(
                            acc_gate[t, v] + b_gate[e, p * NB + v], acc_up[t, v] + b_up[e, p * NB + v]
                        )
                    else:
                        inter[p0 + t, p * NB + v] = act(T.float32(0), acc_up[t, v] + b_up[e, p * NB + v])

    PT = _panels_per_task(backend, NB, P)
    groups = _groups_macro(E, TB, P, PT, block)
    second = (TB, NB) if gated else (1, 1)

    @T.prim_func
    def expert_up(
        x_h: T.handle,
        w_up: T.Buffer((E, P, H, NB), WD),
        b_up: T.Buffer((E, F), "float32"),
        w_gate: T.Buffer((E, P, H, NB), WD),
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
        for task in T.parallel(-(-P // PT)):
            # one buffer per matrix: each stays under the 1 KiB that a CPU keeps on the stack
            acc_up = T.alloc_buffer((TB, NB), "float32", scope=backend.scratch_scope)
            acc_gate = T.alloc_buffer(second, "float32", scope=backend.scratch_scope)
            groups((x, w_up, b_up, w_gate, b_gate, token, inter), (acc_up, acc_gate), offset, task)

    return expert_up


def make_expert_down_panels(config: ExpertDownConfig, backend: Backend) -> tirx.PrimFunc:
    """PrimFunc ``y[token[p]] += gain[p] * (w_down_e @ inter[p] + b_down_e)`` over packed panels.

    Signature: :meth:`ExpertDownConfig.signature` with a ``panel``. Each task first zeroes its
    panel's columns of ``y`` for every token, then adds the expert groups in order.
    """
    NB = _check(config, backend)
    c = config
    E, H, F, K, WD = c.num_experts, c.hidden, c.ffn, c.top_k, c.weight_dtype
    P, TB, load = -(-H // NB), backend.token_block, widen(WD)
    tail = H - (P - 1) * NB

    @T.macro
    def block(ctx, p0, count):
        (inter, w_down, b_down, token, gain, y), acc, e, p = ctx
        for t in T.unroll(count):
            for v in T.vectorized(NB):
                acc[t, v] = T.float32(0)
        for f in range(F):
            for t in T.unroll(count):
                for v in T.vectorized(NB):
                    acc[t, v] = acc[t, v] + inter[p0 + t, f] * load(w_down[e, p, f, v])
        for t in T.unroll(count):
            for v in T.vectorized(NB) if tail == NB else T.unroll(NB):
                if tail == NB or p < P - 1 or v < tail:
                    y[token[p0 + t], p * NB + v] = y[token[p0 + t], p * NB + v] + gain[p0 + t] * (
                        acc[t, v] + b_down[e, p * NB + v]
                    )

    PT = _panels_per_task(backend, NB, P)
    groups = _groups_macro(E, TB, P, PT, block)

    @T.prim_func
    def expert_down(
        inter_h: T.handle,
        w_down: T.Buffer((E, P, F, NB), WD),
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
        for task in T.parallel(-(-P // PT)):
            acc = T.alloc_buffer((TB, NB), "float32", scope=backend.scratch_scope)
            for t in range(n):
                for v in range(min(PT * NB, H)):
                    if task * PT * NB + v < H:
                        y[t, task * PT * NB + v] = T.float32(0)
            groups((inter, w_down, b_down, token, gain, y), acc, offset, task)

    return expert_down
