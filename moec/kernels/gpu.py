"""CUDA versions of the MoE kernels: same signatures and semantics as the CPU ones.

On a GPU every PrimFunc needs its loops bound to threads, so every kernel has a CUDA
form here, parameterised by :class:`moec.schedule.GpuSchedule`:

- ``route``: one thread per token (the ``E`` scores live in thread-local memory).
- ``capacity``: one thread per sequence (the count is a running one over its tokens).
- ``group``: one thread block; thread ``e`` counts, then places, the pairs routed to expert
  ``e`` in token order (a stable counting sort with no atomics, so results are
  deterministic). All threads read the same ``index`` element at once: a broadcast.
- ``expert_up`` / ``expert_down``: a block owns ``rows_per_block`` output rows (one per
  ``threadIdx.y``); ``threads_per_row`` lanes (``threadIdx.x``) stride over a weight row, so a
  warp's loads of the row are consecutive addresses (coalesced). Each lane keeps one partial
  sum per token of a ``token_block``; the lanes' sums are folded with warp shuffles. The
  block walks the expert groups made by ``group``: an expert with no tokens costs one read
  of ``offset``; a selected expert's row is read from DRAM once and applied to all of its
  tokens. Every output element is written by one thread only (``expert_down`` loops over
  experts inside the thread), so there are no atomics and the sum order is fixed.

The kernels are marked ``tirx.is_scheduled`` so TVM's default GPU schedules (dlight) leave
them alone; the ordinary graph operators get dlight's schedules in ``tvm.compile``.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from moec.kernels.capacity import limit_sequence_macro
from moec.kernels.expert_ffn import _activation
from moec.kernels.route import route_token_macro
from moec.schedule import GpuSchedule

WARP_SIZE = 32
GPU_WEIGHT_DTYPES = ("float32", "float16")
_FULL_MASK = 0xFFFFFFFF
_SCHEDULED = {"tir.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True}


def _unnamed(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` without the ``global_symbol`` TVMScript gives it, so the build names the CUDA
    kernel after the module's function (``moe0_expert_up_kernel``): unique per layer and
    recognisable in the cubin."""
    return func.without_attr("global_symbol")


def _check_schedule(schedule: GpuSchedule) -> None:
    tpr = schedule.threads_per_row
    if tpr > WARP_SIZE or tpr & (tpr - 1):
        raise ValueError(f"threads_per_row must be a power of two at most {WARP_SIZE}, got {tpr}")
    if tpr * schedule.rows_per_block > 1024:
        raise ValueError("threads_per_row * rows_per_block must be at most 1024 (threads per block)")


def _widen(weight_dtype: str):
    """``load(value)``: a stored weight element as float32 (fp16 weights are widened on load)."""
    if weight_dtype not in GPU_WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {GPU_WEIGHT_DTYPES}, got {weight_dtype!r}")
    if weight_dtype == "float32":
        return lambda value: value
    return lambda value: T.Cast("float32", value)


def make_gpu_route_kernel(
    num_experts: int,
    top_k: int,
    scoring: str,
    normalize: bool,
    tie_break: str = "low",
    kept: list[int] | None = None,
    skip_top1_above: float | None = None,
    skip_below_fraction: float | None = None,
    pattern: str | None = None,
    *,
    schedule: GpuSchedule,
    **rule,
) -> tirx.PrimFunc:
    """CUDA ``route(logits[n, E]) -> (expert_index[n, k] int32, weight[n, k] float32)``.

    Same algorithm as :func:`moec.kernels.route.make_route_kernel`, one thread per token.
    """
    _check_schedule(schedule)
    E, K = num_experts, top_k
    B = schedule.threads_per_row * schedule.rows_per_block
    route_token = route_token_macro(
        E, K, scoring, normalize, tie_break, kept, skip_top1_above, skip_below_fraction, pattern, **rule
    )

    @T.prim_func
    def route(logits_h: T.handle, index_h: T.handle, weight_h: T.handle):
        T.func_attr(_SCHEDULED)
        n = T.int64()
        logits = T.match_buffer(logits_h, (n, E), "float32")
        index = T.match_buffer(index_h, (n, K), "int32")
        weight = T.match_buffer(weight_h, (n, K), "float32")
        for bx in T.thread_binding((n + B - 1) // B, thread="blockIdx.x"):
            for tx in T.thread_binding(B, thread="threadIdx.x"):
                score = T.alloc_buffer((E,), "float32", scope="local")
                taken = T.alloc_buffer((E,), "int32", scope="local")
                acc = T.alloc_buffer((2,), "float32", scope="local")
                best = T.alloc_buffer((1,), "int32", scope="local")
                if bx * B + tx < n:
                    route_token(logits, index, weight, score, taken, acc, best, bx * B + tx)

    return _unnamed(route)


def make_gpu_capacity_kernel(
    num_experts: int, top_k: int, capacity: int, *, schedule: GpuSchedule
) -> tirx.PrimFunc:
    """CUDA ``capacity(index[r, s, k], weight[r, s, k]) -> (index, weight)``: thread ``b`` walks
    sequence ``b`` as the CPU kernel does (:mod:`moec.kernels.capacity`)."""
    _check_schedule(schedule)
    E, K = num_experts, top_k
    B = schedule.threads_per_row * schedule.rows_per_block
    limit_sequence = limit_sequence_macro(num_experts, top_k, capacity)

    @T.prim_func
    def limit_capacity(index_h: T.handle, weight_h: T.handle, index_out_h: T.handle, weight_out_h: T.handle):
        T.func_attr(_SCHEDULED)
        r = T.int64()
        s = T.int64()
        index = T.match_buffer(index_h, (r, s, K), "int32")
        weight = T.match_buffer(weight_h, (r, s, K), "float32")
        index_out = T.match_buffer(index_out_h, (r, s, K), "int32")
        weight_out = T.match_buffer(weight_out_h, (r, s, K), "float32")
        for bx in T.thread_binding((r + B - 1) // B, thread="blockIdx.x"):
            for tx in T.thread_binding(B, thread="threadIdx.x"):
                count = T.alloc_buffer((E + 1,), "int32", scope="local")
                if bx * B + tx < r:
                    limit_sequence(index, weight, index_out, weight_out, count, bx * B + tx)

    return _unnamed(limit_capacity)


def make_gpu_group_kernel(num_experts: int, top_k: int, *, schedule: GpuSchedule) -> tirx.PrimFunc:
    """CUDA ``group(index[n, k], weight[n, k]) -> (offset[E+1], token[n*k], gain[n*k])``.

    One block; thread ``e`` (strided over experts) counts expert ``e``'s pairs into shared
    memory, every thread sums the counts before its experts (the offsets), then thread ``e``
    writes its pairs in token order — the stable counting sort of the CPU kernel.
    """
    _check_schedule(schedule)
    E, K = num_experts, top_k
    B = min(schedule.threads_per_row * schedule.rows_per_block, 1 << max(E - 1, 1).bit_length())
    ROUNDS = (E + B - 1) // B

    @T.prim_func
    def group(index_h: T.handle, weight_h: T.handle, offset_h: T.handle, token_h: T.handle, gain_h: T.handle):
        T.func_attr(_SCHEDULED)
        n = T.int64()
        index = T.match_buffer(index_h, (n, K), "int32")
        weight = T.match_buffer(weight_h, (n, K), "float32")
        offset = T.match_buffer(offset_h, (E + 1,), "int32")
        token = T.match_buffer(token_h, (n * K,), "int32")
        gain = T.match_buffer(gain_h, (n * K,), "float32")
        for bx in T.thread_binding(1, thread="blockIdx.x"):
            count = T.alloc_buffer((ROUNDS * B,), "int32", scope="shared")
            for tx in T.thread_binding(B, thread="threadIdx.x"):
                tally = T.alloc_buffer((1,), "int32", scope="local")
                for r in range(ROUNDS):
                    tally[0] = 0
                    if r * B + tx < E:
                        for t, j in T.grid(n, K):
                            if index[t, j] == r * B + tx:
                                tally[0] = tally[0] + 1
                    count[r * B + tx] = tally[0]
            for tx in T.thread_binding(B, thread="threadIdx.x"):
                cursor = T.alloc_buffer((1,), "int32", scope="local")
                for r in range(ROUNDS):
                    if r * B + tx < E:
                        cursor[0] = 0
                        for e in range(r * B + tx):
                            cursor[0] = cursor[0] + count[e]
                        offset[r * B + tx] = cursor[0]
                        for t, j in T.grid(n, K):
                            if index[t, j] == r * B + tx:
                                token[cursor[0]] = T.Cast("int32", t)
                                gain[cursor[0]] = weight[t, j]
                                cursor[0] = cursor[0] + 1
                if bx * B + tx == 0:  # pairs of skipped slots (index E) are not grouped
                    cursor[0] = 0
                    for e in range(E):
                        cursor[0] = cursor[0] + count[e]
                    offset[E] = cursor[0]

    return _unnamed(group)


def _warp_sum(value):
    """``value`` summed over the ``width`` lanes of its row group (only lane 0's result is used)."""

    @T.macro
    def fold(acc, pi, width):
        if width >= 32:
            acc[pi] = acc[pi] + T.tvm_warp_shuffle_down(T.uint32(_FULL_MASK), acc[pi], 16, width, WARP_SIZE)
        if width >= 16:
            acc[pi] = acc[pi] + T.tvm_warp_shuffle_down(T.uint32(_FULL_MASK), acc[pi], 8, width, WARP_SIZE)
        if width >= 8:
            acc[pi] = acc[pi] + T.tvm_warp_shuffle_down(T.uint32(_FULL_MASK), acc[pi], 4, width, WARP_SIZE)
        if width >= 4:
            acc[pi] = acc[pi] + T.tvm_warp_shuffle_down(T.uint32(_FULL_MASK), acc[pi], 2, width, WARP_SIZE)
        if width >= 2:
            acc[pi] = acc[pi] + T.tvm_warp_shuffle_down(T.uint32(_FULL_MASK), acc[pi], 1, width, WARP_SIZE)

    return fold


def _make_gpu_dot(length: int, schedule: GpuSchedule, indirect: bool, weight_dtype: str):
    """A TIR macro ``dot(acc, w, e, j, src, token, p0, count, tx)``: lane ``tx``'s share of the
    dots of weight row ``w[e, j]`` with the ``count`` source rows ``token[p0 + pi]``
    (``indirect``) or ``p0 + pi``, folded over the lanes so lane 0 holds them in ``acc[pi]``.

    Lane ``tx`` reads elements ``tx, tx + TPR, ...``: a warp's reads of a row are contiguous.
    Each weight element is loaded once into a register and used for all ``count`` tokens.
    """
    TPR = schedule.threads_per_row
    STEPS = (length + TPR - 1) // TPR
    exact = length % TPR == 0
    load = _widen(weight_dtype)
    fold = _warp_sum(None)

    @T.macro
    def dot(acc, wv, w, e, j, src, token, p0, count, tx):
        for pi in range(count):
            acc[pi] = T.float32(0)
        for s in range(STEPS):
            if exact or s * TPR + tx < length:
                wv[0] = load(w[e, j, s * TPR + tx])
                for pi in T.unroll(count):
                    if indirect:
                        acc[pi] = acc[pi] + wv[0] * src[token[p0 + pi], s * TPR + tx]
                    else:
                        acc[pi] = acc[pi] + wv[0] * src[p0 + pi, s * TPR + tx]
        for pi in T.unroll(count):
            fold(acc, pi, TPR)

    return dot


def make_gpu_expert_up_kernel(
    num_experts: int,
    hidden: int,
    ffn: int,
    top_k: int,
    activation: str,
    gated: bool,
    *,
    schedule: GpuSchedule,
    alpha: float = 1.0,
    beta: float = 0.0,
    limit: float = math.inf,
    weight_dtype: str = "float32",
) -> tirx.PrimFunc:
    """CUDA ``inter[p] = act(gate_e(x[token[p]]), up_e(x[token[p]]))`` per expert group.

    Signature as :func:`moec.kernels.expert_ffn.make_expert_up_kernel`: ``(x[n, H],
    w_up[E, F, H], b_up[E, F], [w_gate[E, F, H], b_gate[E, F],] offset[E+1], token[n*k])
    -> inter[n*k, F]``; the ``w_*`` are ``weight_dtype``, everything else float32.
    """
    _check_schedule(schedule)
    E, H, F, K = num_experts, hidden, ffn, top_k
    TPR, RPB, PB = schedule.threads_per_row, schedule.rows_per_block, schedule.token_block
    ROW_BLOCKS = (F + RPB - 1) // RPB
    row = (lambda r: r) if F % RPB == 0 else (lambda r: T.min(r, F - 1))
    act = _activation(activation, gated, alpha, beta, limit)
    dot = _make_gpu_dot(H, schedule, indirect=True, weight_dtype=weight_dtype)
    WD = weight_dtype

    if gated:

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
            T.func_attr(_SCHEDULED)
            n = T.int64()
            x = T.match_buffer(x_h, (n, H), "float32")
            token = T.match_buffer(token_h, (n * K,), "int32")
            inter = T.match_buffer(inter_h, (n * K, F), "float32")
            for bx in T.thread_binding(ROW_BLOCKS, thread="blockIdx.x"):
                for ty in T.thread_binding(RPB, thread="threadIdx.y"):
                    for tx in T.thread_binding(TPR, thread="threadIdx.x"):
                        acc_u = T.alloc_buffer((PB,), "float32", scope="local")
                        acc_g = T.alloc_buffer((PB,), "float32", scope="local")
                        wv = T.alloc_buffer((1,), "float32", scope="local")
                        j = row(bx * RPB + ty)
                        for e in range(E):
                            for pb in range((offset[e + 1] - offset[e]) // PB):
                                dot(acc_u, wv, w_up, e, j, x, token, offset[e] + pb * PB, PB, tx)
                                dot(acc_g, wv, w_gate, e, j, x, token, offset[e] + pb * PB, PB, tx)
                                if tx == 0 and bx * RPB + ty < F:
                                    for pi in range(PB):
                                        inter[offset[e] + pb * PB + pi, j] = act(
                                            acc_g[pi] + b_gate[e, j],
                                            acc_u[pi] + b_up[e, j],
                                        )
                            for pt in range((offset[e + 1] - offset[e]) % PB):
                                dot(acc_u, wv, w_up, e, j, x, token, offset[e + 1] - pt - 1, 1, tx)
                                dot(acc_g, wv, w_gate, e, j, x, token, offset[e + 1] - pt - 1, 1, tx)
                                if tx == 0 and bx * RPB + ty < F:
                                    inter[offset[e + 1] - pt - 1, j] = act(
                                        acc_g[0] + b_gate[e, j], acc_u[0] + b_up[e, j]
                                    )

        return _unnamed(expert_up)

    @T.prim_func
    def expert_up_ungated(
        x_h: T.handle,
        w_up: T.Buffer((E, F, H), WD),
        b_up: T.Buffer((E, F), "float32"),
        offset: T.Buffer((E + 1,), "int32"),
        token_h: T.handle,
        inter_h: T.handle,
    ):
        T.func_attr(_SCHEDULED)
        n = T.int64()
        x = T.match_buffer(x_h, (n, H), "float32")
        token = T.match_buffer(token_h, (n * K,), "int32")
        inter = T.match_buffer(inter_h, (n * K, F), "float32")
        for bx in T.thread_binding(ROW_BLOCKS, thread="blockIdx.x"):
            for ty in T.thread_binding(RPB, thread="threadIdx.y"):
                for tx in T.thread_binding(TPR, thread="threadIdx.x"):
                    acc_u = T.alloc_buffer((PB,), "float32", scope="local")
                    wv = T.alloc_buffer((1,), "float32", scope="local")
                    j = row(bx * RPB + ty)
                    for e in range(E):
                        for pb in range((offset[e + 1] - offset[e]) // PB):
                            dot(acc_u, wv, w_up, e, j, x, token, offset[e] + pb * PB, PB, tx)
                            if tx == 0 and bx * RPB + ty < F:
                                for pi in range(PB):
                                    inter[offset[e] + pb * PB + pi, j] = act(
                                        T.float32(0), acc_u[pi] + b_up[e, j]
                                    )
                        for pt in range((offset[e + 1] - offset[e]) % PB):
                            dot(acc_u, wv, w_up, e, j, x, token, offset[e + 1] - pt - 1, 1, tx)
                            if tx == 0 and bx * RPB + ty < F:
                                inter[offset[e + 1] - pt - 1, j] = act(T.float32(0), acc_u[0] + b_up[e, j])

    return _unnamed(expert_up_ungated)


def make_gpu_expert_down_kernel(
    num_experts: int,
    hidden: int,
    ffn: int,
    top_k: int,
    *,
    schedule: GpuSchedule,
    weight_dtype: str = "float32",
) -> tirx.PrimFunc:
    """CUDA ``y[token[p]] += gain[p] * (w_down_e @ inter[p] + b_down_e)`` over all groups.

    Signature as :func:`moec.kernels.expert_ffn.make_expert_down_kernel`; ``y`` is zeroed
    first. Lane 0 of row ``j`` owns ``y[:, j]`` and visits the experts in order, so a token's
    k contributions are added by one thread in a fixed order (no atomics).
    """
    _check_schedule(schedule)
    E, H, F, K = num_experts, hidden, ffn, top_k
    TPR, RPB, PB = schedule.threads_per_row, schedule.rows_per_block, schedule.token_block
    ROW_BLOCKS = (H + RPB - 1) // RPB
    row = (lambda r: r) if H % RPB == 0 else (lambda r: T.min(r, H - 1))
    dot = _make_gpu_dot(F, schedule, indirect=False, weight_dtype=weight_dtype)
    WD = weight_dtype

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
        T.func_attr(_SCHEDULED)
        n = T.int64()
        inter = T.match_buffer(inter_h, (n * K, F), "float32")
        token = T.match_buffer(token_h, (n * K,), "int32")
        gain = T.match_buffer(gain_h, (n * K,), "float32")
        y = T.match_buffer(y_h, (n, H), "float32")
        for bx in T.thread_binding(ROW_BLOCKS, thread="blockIdx.x"):
            for ty in T.thread_binding(RPB, thread="threadIdx.y"):
                for tx in T.thread_binding(TPR, thread="threadIdx.x"):
                    acc = T.alloc_buffer((PB,), "float32", scope="local")
                    wv = T.alloc_buffer((1,), "float32", scope="local")
                    j = row(bx * RPB + ty)
                    if tx == 0 and bx * RPB + ty < H:
                        for t in range(n):
                            y[t, j] = T.float32(0)
                    for e in range(E):
                        for pb in range((offset[e + 1] - offset[e]) // PB):
                            dot(acc, wv, w_down, e, j, inter, token, offset[e] + pb * PB, PB, tx)
                            if tx == 0 and bx * RPB + ty < H:
                                for pi in range(PB):
                                    y[token[offset[e] + pb * PB + pi], j] = y[
                                        token[offset[e] + pb * PB + pi], j
                                    ] + gain[offset[e] + pb * PB + pi] * (acc[pi] + b_down[e, j])
                        for pt in range((offset[e + 1] - offset[e]) % PB):
                            dot(acc, wv, w_down, e, j, inter, token, offset[e + 1] - pt - 1, 1, tx)
                            if tx == 0 and bx * RPB + ty < H:
                                y[token[offset[e + 1] - pt - 1], j] = y[
                                    token[offset[e + 1] - pt - 1], j
                                ] + gain[offset[e + 1] - pt - 1] * (acc[0] + b_down[e, j])

    return _unnamed(expert_down)
