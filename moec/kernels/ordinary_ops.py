"""CPU schedules for a model's ordinary ops: everything TVM legalises that is not a moec kernel.

Around the MoE layers and the dense linear layers (moec's own kernels) a model has attention's
activation × activation matmuls, softmax, norms, rotary embeddings, masks and element-wise
chains. TVM legalises them to TIR, fuses them, and its CPU pipeline leaves them unscheduled:
scalar loops on one thread. :func:`ordinary_op_rules` are the dlight rules moec applies to them
(``dlight.ApplyDefaultSchedule`` in the lowering phase), tried in order:

1. :class:`BatchedMatmul`: ``C[b, i, j] = Σ_k A[b, i, k] · B[b, k, j]`` over any batch axes
   (attention scores and attention-weighted values), with element-wise epilogues (scale, mask):
   the outermost batch axis in parallel, each row computed as a sum of ``A[b, i, k] · B[b, k, :]``
   rows, vectorised over ``j`` — no horizontal reduction and a contiguous row of ``B`` per ``k``.
   First, because the next rule takes a matmul too, with one scalar dot per output element.
2. :class:`RowReduction`: reductions over the innermost axes (softmax, RMS and layer norms):
   each reduction kept as a vector of partial results, the element-wise blocks vectorised.
   (TVM's ``dlight.cpu.Reduction`` recomputes a norm's sum for every output element when the
   leading axes are 1, as in one-token decoding: 0.2 ms per norm of 512 instead of 0.3 µs.)
3. :class:`Injective`: element-wise chains: every block that can be inlined is, the rest
   vectorised.

Rows or chunks run in parallel only where the work is large or symbolic (``main``'s token
count): around one decoding step an op covers a few hundred elements, less work than waking a
thread pool.

Each rule declines (returns None) what it does not fit; a function no rule fits stays as TVM
left it, which :func:`unscheduled_functions` reports (with any function that reduces over many
elements in neither a parallel nor a vectorised loop).
"""

from __future__ import annotations

import re

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import TensorRegion
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

PARALLEL_MIN_ELEMENTS = 1 << 15
"""Elements a loop nest must cover to run in parallel when its size is known at compile time:
waking the thread pool costs more than a few thousand element-wise operations."""


def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    """Elements of ``dtype_bits`` one SIMD register of ``target`` holds (128-bit if unknown)."""
    bits = llvm_get_vector_width(target)
    return max((bits if bits > 0 else 128) // dtype_bits, 2)


def _extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    """A loop's extent, or None when it is symbolic (a token count)."""
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _elements(sch: s_tir.Schedule, loops: list[s_tir.schedule.LoopRV]) -> int | None:
    """The iterations of a loop nest, or None when one extent is symbolic."""
    extents = [_extent(sch, loop) for loop in loops]
    return None if None in extents else int(np.prod(extents, dtype=np.int64))


def _parallel_outermost(
    sch: s_tir.Schedule, loops: list[s_tir.schedule.LoopRV], elements: int | None
) -> None:
    """Run the outermost loop of ``loops`` longer than 1 in parallel, if the nest covers at
    least :data:`PARALLEL_MIN_ELEMENTS` or a symbolic number (``main`` runs any token count).

    Loops are not fused for it: a fused index over symbolic extents costs a division by a
    runtime value per element, more than the element's work."""
    if elements is not None and elements < PARALLEL_MIN_ELEMENTS:
        return
    for loop in loops:
        if _extent(sch, loop) != 1:
            sch.parallel(loop)
            return


def _vectorizable(extent: int | None, lanes: int) -> bool:
    """Whether a loop of ``extent`` vectorises in whole vectors of ``lanes`` or fewer.

    A symbolic or ragged extent would need a masked last vector, which TVM lowers to scalar code
    with a bounds check per element; such loops are left to LLVM's loop vectoriser."""
    return extent is not None and (extent <= lanes or extent % lanes == 0)


def _vectorize(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV, lanes: int) -> None:
    """Vectorise ``loop`` in whole vectors of ``lanes`` where :func:`_vectorizable`."""
    extent = _extent(sch, loop)
    if not _vectorizable(extent, lanes) or extent == 1:
        return
    sch.vectorize(loop if extent <= lanes else sch.split(loop, factors=[None, lanes])[1])


def _sole_reader(sch: s_tir.Schedule, producer: s_tir.schedule.SBlockRV) -> bool:
    """Whether an output block may be inlined into ``producer``: it is not a reduction (TVM
    would inline into one of length 1 and compute it wrong) and has no other consumer (TVM would
    drop the buffer that consumer still reads)."""
    return sch.get(producer).init is None and len(sch.get_consumers(producer)) == 1


def _inline(sch: s_tir.Schedule, infos: list[SBlockInfo]) -> list[SBlockInfo]:
    """Inline the element-wise blocks that feed one consumer into it, and an output block into
    its one producer, until none is left that can be; return the blocks left.

    Unlike dlight's ``try_inline``, a block read by several consumers keeps its buffer: inlining
    it recomputes it in each (softmax's exponentials, twice)."""
    left = list(infos)
    changed = True
    while changed:
        changed = False
        for info in left:
            if not info.is_injective():
                continue
            consumers = sch.get_consumers(info.block_rv)
            producers = sch.get_producers(info.block_rv)
            try:
                if len(consumers) == 1:
                    sch.compute_inline(info.block_rv)
                elif not consumers and len(producers) == 1 and _sole_reader(sch, producers[0]):
                    sch.reverse_compute_inline(info.block_rv)
                else:
                    continue
            except s_tir.ScheduleError:
                continue
            left.remove(info)
            changed = True
            break
    return left


def _schedule_elementwise(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """An injective block: its innermost loop vectorised (see :func:`_vectorizable`), its
    outermost loop longer than 1 parallel when the nest is large (see :func:`_parallel_outermost`).

    Loops are not fused into one vectorised loop: a vector that spans rows has indices TVM's
    vectoriser gets wrong (measured: a fused rotary embedding with 8-element rows and 16 lanes
    computed the wrong rows)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    _parallel_outermost(sch, loops[:-1], _elements(sch, loops))
    _vectorize(sch, loops[-1], lanes)


class _CpuRule(dlight.cpu.base.CPUScheduleRule):
    """What the rules share: a schedule of the function, its blocks (dlight's analysis) and the
    target's vector width go to :meth:`schedule`, which returns False to decline."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not self.schedule(sch, infos, vector_lanes(target)):
            return None
        return sch

    def schedule(self, sch: s_tir.Schedule, infos: list[SBlockInfo], lanes: int) -> bool:
        """Schedule ``sch`` whose blocks are ``infos``; False if the rule does not fit it."""
        raise NotImplementedError


class BatchedMatmul(_CpuRule):
    """``C[..., i, j] = Σ_k A[..., i, k] · B[..., k, j]`` (+ element-wise epilogues) on the CPU.

    Matches a function whose one reduction block has spatial axes (batch..., i, j) then a single
    reduction axis k, reads two buffers, and has ``j`` as the innermost axis of its output and of
    one input (the ``B`` row streamed per ``k``); element-wise blocks before it are inlined and
    those after it computed per row ``i``. Loops: the outermost batch axis parallel (when
    large); per row, per vector of ``j`` the accumulator initialised, then one vector
    multiply-add per ``k`` (a symbolic ``j``: the ``j`` loop innermost, for LLVM to vectorise).
    """

    def schedule(self, sch: s_tir.Schedule, infos: list[SBlockInfo], lanes: int) -> bool:
        infos = _inline(sch, infos)
        reductions = [info for info in infos if not info.is_injective()]
        if len(reductions) != 1 or infos[0] is not reductions[0]:
            return False
        matmul = reductions[0]
        if not re.fullmatch("S{2,}R", matmul.dom_kind()):
            return False
        if not self._streams_rows_of_j(sch.get(matmul.block_rv)):
            return False
        loops = sch.get_loops(matmul.block_rv)
        *outer, j, k = loops
        _parallel_outermost(sch, outer, _elements(sch, loops))
        if _vectorizable(_extent(sch, j), lanes):
            j_vectors, j_lanes = sch.split(j, factors=[None, min(lanes, _extent(sch, j))])
            sch.reorder(j_vectors, k, j_lanes)
            sch.vectorize(j_lanes)
        else:
            sch.reorder(k, j)
        init = sch.decompose_reduction(matmul.block_rv, k)
        _vectorize(sch, sch.get_loops(init)[-1], lanes)
        for epilogue in infos[1:]:
            sch.reverse_compute_at(epilogue.block_rv, outer[-1])
            _vectorize(sch, sch.get_loops(epilogue.block_rv)[-1], lanes)
        return True

    @staticmethod
    def _streams_rows_of_j(block: s_tir.SBlock) -> bool:
        """Whether ``block`` writes one buffer and reads two, its output's and one input's last
        index being its innermost spatial iterator ``j`` (so a ``j`` loop reads contiguously)."""
        if len(block.writes) != 1 or len(block.reads) != 2:
            return False
        j = block.iter_vars[-2].var

        def last_index_is_j(region: TensorRegion) -> bool:
            last = region.region[-1]
            return isinstance(last.min, tirx.Var) and last.min.same_as(j) and int(last.extent) == 1

        return last_index_is_j(block.writes[0]) and any(last_index_is_j(r) for r in block.reads)


class RowReduction(_CpuRule):
    """Reductions over the innermost axes with element-wise blocks around them (softmax, RMS and
    layer norms, a matmul with one output column) on the CPU.

    Matches a function with a reduction block whose axes are spatial then reduction (``S…SR…R``)
    and any injective blocks. Element-wise blocks that can be inlined are; every block left keeps
    its own loop nest. A reduction of constant length in whole vectors is factored: a vector of
    partial results (one vector operation per step, no horizontal reduction until the end), then
    the vector summed (or maxed) to the result; rows run in parallel when large or symbolic.
    Element-wise blocks as :func:`_schedule_elementwise` does.
    """

    def schedule(self, sch: s_tir.Schedule, infos: list[SBlockInfo], lanes: int) -> bool:
        if all(info.is_injective() for info in infos):
            return False
        if not all(info.is_injective() or re.fullmatch("S*R+", info.dom_kind()) for info in infos):
            return False
        for info in _inline(sch, infos):
            if info.is_injective():
                _schedule_elementwise(sch, info.block_rv, lanes)
                continue
            loops = sch.get_loops(info.block_rv)
            spatial = info.dom_kind().count("S")
            _parallel_outermost(sch, loops[:spatial], _elements(sch, loops))
            length = _elements(sch, loops[spatial:])
            output_rank = len(sch.get(info.block_rv).writes[0].source.shape)
            # a scalar result (a norm over a rank-1 tensor) has no axis to put the partials on
            if length is None or length % lanes != 0 or output_rank == 0:
                continue
            reduced = sch.fuse(*loops[spatial:]) if len(loops) - spatial > 1 else loops[spatial]
            _steps, partial = sch.split(reduced, factors=[None, lanes])
            # the partials innermost in their buffer: one contiguous vector per row
            factored = sch.rfactor(partial, factor_axis=output_rank)
            sch.vectorize(sch.get_loops(factored)[-1])
            sch.decompose_reduction(factored, sch.get_loops(factored)[spatial])
        return True


class Injective(_CpuRule):
    """Element-wise chains on the CPU: inline what can be inlined, vectorise what is left.

    Matches a function whose blocks are all injective (spatial only); each block left after
    inlining as :func:`_schedule_elementwise` does.
    """

    def schedule(self, sch: s_tir.Schedule, infos: list[SBlockInfo], lanes: int) -> bool:
        if not all(info.is_injective() for info in infos):
            return False
        for info in _inline(sch, infos):
            _schedule_elementwise(sch, info.block_rv, lanes)
        return True


def ordinary_op_rules() -> list[dlight.ScheduleRule]:
    """The rules moec's CPU lowering applies to the functions that are not moec kernels."""
    return [BatchedMatmul(), RowReduction(), Injective()]


REDUCTION_NEEDS_SCHEDULE = 256
"""A reduction over at least this many elements must run in a parallel or vectorised loop."""


def unscheduled_functions(mod: tvm.IRModule) -> list[str]:
    """The TIR functions of ``mod`` (after :func:`ordinary_op_rules` ran in the lowering) that
    are left on TVM's unscheduled default: no rule took them and they have neither a parallel
    nor a vectorised loop, or they reduce over at least :data:`REDUCTION_NEEDS_SCHEDULE`
    elements (a symbolic length counts as more) in neither. moec's kernels are scheduled by
    construction, TVM's library dispatch (scans, sorts) comes scheduled, and the VM's shape
    functions run on the host once per call, on a few integers."""
    left = []
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or "moec.kernel" in func.attrs:
            continue
        if func.attrs.get("tirx.is_host_func", False):
            continue
        kinds, longest_reduction = loop_kinds_and_longest_reduction(func)
        fast = bool({tirx.ForKind.PARALLEL, tirx.ForKind.VECTORIZED} & kinds)
        scheduled = bool(func.attrs.get("tirx.is_scheduled", False)) or fast
        if not scheduled or (longest_reduction >= REDUCTION_NEEDS_SCHEDULE and not fast):
            left.append(gvar.name_hint)
    return sorted(left)


def loop_kinds_and_longest_reduction(func: tirx.PrimFunc) -> tuple[set[tirx.ForKind], int]:
    """The kinds of ``func``'s loops and the most elements one of its blocks reduces over (a
    symbolic extent counts as unbounded)."""
    kinds: set[tirx.ForKind] = set()
    longest = 0

    def visit_for(loop: tirx.For) -> None:
        kinds.add(loop.kind)

    def visit_block(block: s_tir.SBlock) -> None:
        nonlocal longest
        size = 1
        for iv in block.iter_vars:
            if iv.iter_type == tirx.IterVar.CommReduce:
                extent = iv.dom.extent
                size *= int(extent) if isinstance(extent, tirx.IntImm) else 1 << 30
        longest = max(longest, size if size > 1 else 0)

    tvm_ffi.structural_walk(func.body, [(tirx.For, visit_for), (s_tir.SBlock, visit_block)], order="post")
    return kinds, longest
