"""Backend strategies: how one kernel algorithm maps onto a target kind's parallelism.

Each kernel in this package is written once, as TVMScript over a few strategy hooks; a backend
fills them in for one kind of target:

- **Items** (``route``, ``capacity``, ``group``): independent work items (tokens, sequences).
  CPU: a parallel loop over the items. CUDA: blocks of threads, one item per thread, with a
  bounds guard.
- **Rows** (``expert_up``, ``expert_down``): output rows of the expert matrices. CPU: parallel
  tasks of ``rows_per_task`` contiguous rows, each computed whole by one thread. CUDA: a block
  owns ``rows_per_block`` rows (``threadIdx.y``) and ``threads_per_row`` lanes
  (``threadIdx.x``) share each row's dot product; lane 0 writes the result (the lane-0 guard).
- **Expert slots** (``expert_up``, ``expert_down``): the expert groups a kernel visits, one
  slot each (:class:`ExpertSlots`). CPU: a serial loop inside each row task. CUDA: ``blockIdx.y``,
  so each selected expert's rows get blocks of their own (``expert_down`` then writes per-pair
  partial rows, summed afterwards, so that no two blocks write one output).
- **Group workers** (``group``): one on a CPU (the whole counting sort in one pass); on CUDA one
  thread per expert, each sorting its own expert's pairs.
- **Dot**: the dot product of a weight row with ``count`` source rows. CPU: ``lanes``-wide
  vector accumulators (``accumulators`` chains) folded by halving. CUDA: lanes stride over the
  row (coalesced loads) and their partial sums are folded with warp shuffles.

The loops are returned as TVMScript frames (``T.parallel``, ``T.thread_binding``, ...), so the
kernels write ``for task in rows.tasks():`` whatever the target.
"""

from __future__ import annotations

import dataclasses

from tvm.script import tirx as T

from moec.kernels.formats import DOT_DEPTH, WeightFormat
from moec.kernels.int8_dot import DotInstruction, activation_word
from moec.schedule import CpuSchedule, GpuSchedule

WARP_SIZE = 32
_FULL_MASK = 0xFFFFFFFF


def _largest_divisor_at_most(value: int, limit: int) -> int:
    return max(d for d in range(1, min(value, limit) + 1) if value % d == 0)


def _largest_pow2_divisor_at_most(value: int, limit: int) -> int:
    size = 1
    while size * 2 <= limit and value % (size * 2) == 0:
        size *= 2
    return size


def halving_ladder(step, width: int):
    """A TIR macro ``fold(acc, m, pi)`` calling ``step(acc, m, pi, half)`` for ``half = width / 2,
    width / 4, ..., 1``: a tree reduction of ``width`` partial sums in log2 steps (vector halves on
    a CPU, warp shuffles on CUDA); None when ``width`` is 1 (nothing to fold). ``width`` is a
    power of two."""
    if width < 2:
        return None
    half = width // 2
    if half == 1:

        @T.macro
        def last(acc, m, pi):
            step(acc, m, pi, 1)

        return last
    rest = halving_ladder(step, half)

    @T.macro
    def fold(acc, m, pi):
        step(acc, m, pi, half)
        rest(acc, m, pi)

    return fold


def token_blocks(block, token_block: int):
    """A TIR macro ``blocks(ctx, start, count)`` calling ``block(ctx, p0, size)`` on ``count`` rows
    from ``start``: ``token_block`` at a time, then once on the remainder at its exact size.

    ``size`` is always a constant, so the block's loops over its rows unroll and its accumulators
    stay in registers; the remainder's size is picked at run time by a chain of ``if``s, so the
    rows past the last full block cost one more pass over the weights, not one pass each.
    """
    tail = None
    for size in range(token_block - 1, 0, -1):
        tail = _exact_block(block, size, tail)

    @T.macro
    def blocks(ctx, start, count):
        for b in range(count // token_block):
            block(ctx, start + b * token_block, token_block)
        if tail is not None:
            tail(ctx, start + count, count % token_block)

    return blocks


def _exact_block(block, size: int, smaller):
    """``tail(ctx, end, rest)``: ``block(ctx, end - size, size)`` when ``rest == size``, else
    ``smaller`` (the chain for the sizes below)."""
    if smaller is None:

        @T.macro
        def last(ctx, end, rest):
            if rest == size:
                block(ctx, end - size, size)

        return last

    @T.macro
    def step(ctx, end, rest):
        if rest == size:
            block(ctx, end - size, size)
        else:
            smaller(ctx, end, rest)

    return step


def loop(kind: str, extent):
    """A TVMScript loop frame: ``parallel``, ``serial``, or bound to the CUDA thread tag ``kind``."""
    if kind == "parallel":
        return T.parallel(extent)
    if kind == "serial":
        return T.serial(extent)
    return T.thread_binding(extent, thread=kind)


def source_row(indirect: bool):
    """``row(token, p)``: the source row of pair ``p``, through the ``token`` table (``indirect``:
    the pairs are an expert group's tokens) or ``p`` itself (the pairs' own rows)."""
    if indirect:
        return lambda token, p: token[p]
    return lambda token, p: p


@dataclasses.dataclass(frozen=True)
class Items:
    """Independent items (tokens, sequences), ``per_outer`` of them per outer loop step.

    A kernel over ``count`` items writes ``for o in items.outer(count): for i in items.inner():
    if items.valid(o, i, count):`` and works on item ``items.index(o, i)``.
    """

    per_outer: int
    outer_kind: str  # "parallel", "serial" or "blockIdx.x"
    inner_kind: str  # "serial" or "threadIdx.x"

    def outer(self, count):
        return loop(self.outer_kind, (count + self.per_outer - 1) // self.per_outer)

    def inner(self):
        return loop(self.inner_kind, self.per_outer)

    def index(self, o, i):
        return o if self.per_outer == 1 else o * self.per_outer + i

    def valid(self, o, i, count):
        return True if self.per_outer == 1 else o * self.per_outer + i < count


@dataclasses.dataclass(frozen=True)
class Rows:
    """``count`` output rows tiled as tasks × threads per task × rows per thread, with ``lanes``
    threads sharing each row.

    A kernel writes::

        for task in rows.tasks():
            for thread in rows.threads():
                for lane in rows.lanes():
                    ...
                    for r in rows.per_thread():
                        j = rows.row(task, thread, r)      # the row computed
                        if rows.owns(task, thread, r, lane):  # this thread writes row j
    """

    count: int
    threads_per_task: int
    rows_per_thread: int
    lane_count: int
    task_kind: str  # "parallel" or "blockIdx.x"
    thread_kind: str  # "serial" or "threadIdx.y"
    lane_kind: str  # "serial" or "threadIdx.x"

    @property
    def rows_per_task(self) -> int:
        return self.threads_per_task * self.rows_per_thread

    @property
    def exact(self) -> bool:
        return self.count % self.rows_per_task == 0

    def tasks(self):
        return loop(self.task_kind, (self.count + self.rows_per_task - 1) // self.rows_per_task)

    def threads(self):
        return loop(self.thread_kind, self.threads_per_task)

    def lanes(self):
        return loop(self.lane_kind, self.lane_count)

    def per_thread(self):
        return T.serial(self.rows_per_thread)

    def _unclamped(self, task, thread, r):
        return (task * self.threads_per_task + thread) * self.rows_per_thread + r

    def row(self, task, thread, r):
        """The row this thread computes; a tail thread recomputes the last row (its result is
        not written), so every lane of a warp takes part in the shuffles."""
        index = self._unclamped(task, thread, r)
        return index if self.exact else T.min(index, self.count - 1)

    def owns(self, task, thread, r, lane):
        """Whether this thread writes its row's result (lane 0 of a row inside the matrix)."""
        inside = True if self.exact else self._unclamped(task, thread, r) < self.count
        if self.lane_count == 1:
            return inside
        return lane == 0 if inside is True else T.And(lane == 0, inside)


@dataclasses.dataclass(frozen=True)
class ExpertSlots:
    """The expert groups (:mod:`moec.kernels.group`) a kernel visits, as ``min(pairs, E)`` slots.

    With more pairs than experts, slot ``s`` is expert ``s``, visited when its group is not
    empty. With at most ``E`` pairs (few tokens: at one token ``k`` pairs), slot ``s`` is the
    ``s``-th sorted pair, visited when it starts its expert's group: then the slots are exactly
    the selected experts' groups (no slot per idle expert), and the expert is found by a binary
    search of ``offset``. Either way the groups are visited in expert order.

    A kernel writes ``visit = slots.visitor(run)`` and ``visit(ctx, offset, pairs)`` to call
    ``run(ctx, e)`` for each expert ``e`` with pairs. Whether a slot is visited depends only on
    the slot and ``offset``, so on CUDA every thread of a block takes the same branch: the warp
    shuffles of ``run`` always have all their lanes.
    """

    num_experts: int
    kind: str  # "serial" or "blockIdx.y"
    scratch_scope: str

    def visitor(self, run):
        """The TIR macro ``visit(ctx, offset, pairs)``."""
        E = self.num_experts
        steps = E.bit_length()  # binary-search steps: 2 ** (steps - 1) <= E < 2 ** steps

        @T.macro
        def visit(ctx, offset, pairs):
            for s in loop(self.kind, T.min(pairs, T.int64(E))):
                slot = T.Cast("int32", s)
                e = T.alloc_buffer((1,), "int32", scope=self.scratch_scope)
                if pairs > E:
                    e[0] = slot
                else:  # the last expert whose group starts at or before pair s
                    e[0] = 0
                    for i in T.unroll(steps):
                        jump = T.shift_left(1, steps - 1 - i)
                        if e[0] + jump <= E:
                            if offset[e[0] + jump] <= slot:
                                e[0] = e[0] + jump
                if e[0] < E:
                    if offset[e[0] + 1] > offset[e[0]]:
                        if pairs > E or offset[e[0]] == slot:
                            run(ctx, e[0])

        return visit


@dataclasses.dataclass(frozen=True)
class CpuBackend:
    """Parallel row tasks and vector accumulators (:class:`moec.schedule.CpuSchedule`)."""

    schedule: CpuSchedule

    attrs = {"tir.noalias": True, "op_pattern": 8}
    scratch_scope = "global"
    """Per-thread scratch (accumulators, counters) in global scope: TVM puts a constant-size
    global allocation under 1 KiB on the stack, where LLVM keeps it in registers; any other (a
    ``local`` one, or a larger one) becomes a ``TVMBackendAllocWorkspace`` call per parallel
    task, whose memory LLVM cannot promote, so every accumulator update is stored back."""

    @property
    def token_block(self) -> int:
        return self.schedule.token_block

    def items(self, parallel: bool = True) -> Items:
        return Items(1, "parallel" if parallel else "serial", "serial")

    def expert_slots(self, num_experts: int) -> ExpertSlots:
        """Serial slots, inside each row task."""
        return ExpertSlots(num_experts, "serial", self.scratch_scope)

    def group_workers(self, slots: int) -> int:
        """One: a single pass of the counting sort, too small to be worth a parallel launch."""
        return 1

    def rows(self, count: int) -> Rows:
        rows_per_task = _largest_divisor_at_most(count, self.schedule.rows_per_task)
        return Rows(count, 1, rows_per_task, 1, "parallel", "serial", "serial")

    def dot(self, length: int, indirect: bool, fmt: WeightFormat):
        """``(dot, width)``: a TIR macro ``dot(acc, m, w, s, e, j, src, token, p0, count, lane)``
        leaving in ``acc[m][pi, 0]`` the dot of weight row ``w[e, j]`` (stored as ``fmt``, with
        scales ``s``; a per-channel scale is left for the caller) with source row
        ``token[p0 + pi]`` (``indirect``) or ``p0 + pi``, for ``pi < count``; ``acc`` holds one
        ``[token_block, width]`` scratch buffer per matrix.

        The ``length``-long dot runs ``accumulators`` independent vector chains, each ``lanes``
        wide, so FMA latency is hidden; the partial sums are then folded by halving (log2 steps,
        not a serial chain).
        """
        if fmt.dot:
            raise ValueError(
                "int8-dot experts run in the panel kernels on CPU targets (a config with a panel)"
            )
        row = source_row(indirect)
        L = _largest_pow2_divisor_at_most(length, self.schedule.lanes)
        A = _largest_pow2_divisor_at_most(length // L, self.schedule.accumulators)
        W = L * A

        @T.macro
        def halve(acc, m, pi, half):
            for v in T.vectorized(half):
                acc[m][pi, v] = acc[m][pi, v] + acc[m][pi, v + half]

        fold = halving_ladder(halve, W)

        @T.macro
        def dot(acc, m, w, s, e, j, src, token, p0, count, lane):
            for pi, v in T.grid(count, W):
                acc[m][pi, v] = T.float32(0)
            for ho in range(length // W):
                for a in T.unroll(A):
                    for pi in T.unroll(count):
                        for v in T.vectorized(L):
                            acc[m][pi, a * L + v] = (
                                acc[m][pi, a * L + v]
                                + fmt.load(w, s, (e, j, ho * W + a * L + v), j, ho * W + a * L + v)
                                * src[row(token, p0 + pi), ho * W + a * L + v]
                            )
            if fold is not None:
                for pi in T.unroll(count):
                    fold(acc, m, pi)

        return dot, W


@dataclasses.dataclass(frozen=True)
class CudaBackend:
    """Thread binding, warp reduction and the lane-0 guard (:class:`moec.schedule.GpuSchedule`).

    Kernels are marked ``tirx.is_scheduled`` so TVM's default GPU schedules (dlight) leave
    them alone; the ordinary graph operators get dlight's schedules in ``tvm.compile``.
    """

    schedule: GpuSchedule

    attrs = {"tir.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True}
    scratch_scope = "local"
    """Per-thread scratch in registers (``local``)."""

    def __post_init__(self) -> None:
        tpr = self.schedule.threads_per_row
        if tpr > WARP_SIZE or tpr & (tpr - 1):
            raise ValueError(f"threads_per_row must be a power of two at most {WARP_SIZE}, got {tpr}")
        if tpr * self.schedule.rows_per_block > 1024:
            raise ValueError("threads_per_row * rows_per_block must be at most 1024 (threads per block)")

    @property
    def token_block(self) -> int:
        return self.schedule.token_block

    def items(self, parallel: bool = True) -> Items:
        threads = self.schedule.threads_per_row * self.schedule.rows_per_block if parallel else 1
        return Items(threads, "blockIdx.x", "threadIdx.x")

    def expert_slots(self, num_experts: int) -> ExpertSlots:
        """``blockIdx.y``: each selected expert's rows get blocks of their own, so one token's
        ``k`` experts run side by side."""
        return ExpertSlots(num_experts, "blockIdx.y", self.scratch_scope)

    def group_workers(self, slots: int) -> int:
        """A thread per expert slot: each counts and places only its own expert's pairs, so no
        thread walks the ``E``-long count and prefix arrays alone."""
        return slots

    def rows(self, count: int) -> Rows:
        s = self.schedule
        return Rows(count, s.rows_per_block, 1, s.threads_per_row, "blockIdx.x", "threadIdx.y", "threadIdx.x")

    def dot(self, length: int, indirect: bool, fmt: WeightFormat):
        """``(dot, 1)``: the TIR macro of :meth:`CpuBackend.dot` for one lane of a row: lane
        ``lane`` reads units ``lane, lane + TPR, ...`` of the row (a warp's reads of a row are
        contiguous), loads each once into a register for all ``count`` tokens, and the lanes'
        sums are folded with warp shuffles so lane 0 holds them in ``acc[m][pi, 0]``.

        A unit is one weight, or for an int8-dot row (``src`` the quantized rows ``(xq, xs,
        xsum)``) a 4-byte word of weights, multiplied with the source's word by ``__dp4a``
        (exact in INT32) and added in float32 with its group's weight scale; the folded sum is
        then scaled by the source row's scale."""
        row = source_row(indirect)
        TPR = self.schedule.threads_per_row
        unit = DOT_DEPTH if fmt.dot else 1
        units = length // unit
        STEPS = (units + TPR - 1) // TPR
        exact = units % TPR == 0
        fold = self._warp_fold()
        dp4a = DotInstruction("dp4a", 1)

        def load(w, s, e, j, column):
            if fmt.dot:  # the word's 4 weights as one int32
                return T.reinterpret("int32", w[e, j, T.Ramp(column, 1, DOT_DEPTH)])
            return fmt.load(w, s, (e, j, column), j, column)

        def product(weight, s, e, j, src, r, column):
            if not fmt.dot:
                return weight * src[r, column]
            value = T.Cast("float32", dp4a(T.int32(0), weight, activation_word(src[0], r, column)))
            return value * s[e, column // fmt.group, j] if fmt.group else value

        @T.macro
        def dot(acc, m, w, s, e, j, src, token, p0, count, lane):
            wv = T.alloc_buffer((1,), "int32" if fmt.dot else "float32", scope=self.scratch_scope)
            for pi in range(count):
                acc[m][pi, 0] = T.float32(0)
            for step in range(STEPS):
                if exact or step * TPR + lane < units:
                    wv[0] = load(w, s, e, j, (step * TPR + lane) * unit)
                    for pi in T.unroll(count):
                        acc[m][pi, 0] = acc[m][pi, 0] + product(
                            wv[0], s, e, j, src, row(token, p0 + pi), (step * TPR + lane) * unit
                        )
            if fold is not None:
                for pi in T.unroll(count):
                    fold(acc, m, pi)
            if fmt.dot:
                for pi in T.unroll(count):
                    acc[m][pi, 0] = acc[m][pi, 0] * src[1][row(token, p0 + pi)]

        return dot, 1

    def _warp_fold(self):
        """``fold(acc, m, pi)``: the lanes' partial sums of ``acc[m][pi, 0]`` added with warp
        shuffles, lane 0 holding the row's sum (None with one lane per row)."""
        TPR = self.schedule.threads_per_row

        @T.macro
        def shuffle_down(acc, m, pi, delta):
            acc[m][pi, 0] = acc[m][pi, 0] + T.tvm_warp_shuffle_down(
                T.uint32(_FULL_MASK), acc[m][pi, 0], delta, TPR, WARP_SIZE
            )

        return halving_ladder(shuffle_down, TPR)


Backend = CpuBackend | CudaBackend


def backend_for(schedule: CpuSchedule | GpuSchedule) -> Backend:
    """The backend strategy of ``schedule``'s target kind."""
    if isinstance(schedule, GpuSchedule):
        return CudaBackend(schedule)
    return CpuBackend(schedule)
