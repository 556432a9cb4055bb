"""Grouping kernel: sorts the (token, slot) pairs of a batch by expert.

The dispatch kernels then read each selected expert's weights once and apply them to every
token routed to it (a GEMM per group instead of a GEMV per token). This is a stable counting
sort over the ``n * k`` pairs, split among the backend's workers by expert slot (the ``E``
experts and the skipped slot ``E``): a worker counts the pairs before its slots and those in
each of its slots, and then places its own pairs in token order. One worker (a CPU) owning
every slot is the plain counting sort in a single pass; on CUDA a thread per slot keeps the
``E``-long count and prefix arrays off one thread. Workers write disjoint outputs, so the
result is the same, and deterministic, for any number of them.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from moec.kernels.backend import Backend
from moec.kernels.config import GroupConfig


def make_group_kernel(config: GroupConfig, backend: Backend, workers: int | None = None) -> tirx.PrimFunc:
    """PrimFunc ``group(index[n, k], weight[n, k]) -> (offset[E+1], token[n*k], gain[n*k])``.

    Rows ``offset[e] .. offset[e+1]`` of ``token``/``gain`` are the tokens routed to expert
    ``e`` and their routing weights, in token order. Slots the router skipped (index ``E``)
    sort after ``offset[E]``, where no expert kernel reads. ``workers``: how many share the
    ``E + 1`` slots (None: the backend's choice, :meth:`~moec.kernels.backend.CpuBackend.group_workers`).
    """
    E, K = config.num_experts, config.top_k
    W = workers or backend.group_workers(E + 1)
    R = -(-(E + 1) // W)  # slots per worker
    items = backend.items(parallel=W > 1)

    @T.prim_func
    def group(index_h: T.handle, weight_h: T.handle, offset_h: T.handle, token_h: T.handle, gain_h: T.handle):
        T.func_attr(backend.attrs)
        n = T.int64()
        index = T.match_buffer(index_h, (n, K), "int32")
        weight = T.match_buffer(weight_h, (n, K), "float32")
        offset = T.match_buffer(offset_h, (E + 1,), "int32")
        token = T.match_buffer(token_h, (n * K,), "int32")
        gain = T.match_buffer(gain_h, (n * K,), "float32")
        for o in items.outer(W):
            for i in items.inner():
                if items.valid(o, i, W):
                    first = items.index(o, i) * R  # the worker's first slot
                    # cursor[0]: pairs before the worker's first slot; cursor[1 + r]: pairs in slot r
                    cursor = T.alloc_buffer((R + 1,), "int32", scope=backend.scratch_scope)
                    for r in range(R + 1):
                        cursor[r] = 0
                    for t, j in T.grid(n, K):
                        if index[t, j] < first:
                            cursor[0] = cursor[0] + 1
                        elif index[t, j] < first + R:
                            cursor[index[t, j] - first + 1] = cursor[index[t, j] - first + 1] + 1
                    for r in range(R):  # then cursor[r]: where slot r's pairs start
                        cursor[r + 1] = cursor[r + 1] + cursor[r]
                    for r in range(R):
                        if first + r <= E:
                            offset[first + r] = cursor[r]
                    for t, j in T.grid(n, K):
                        if first <= index[t, j] and index[t, j] < first + R:
                            token[cursor[index[t, j] - first]] = T.Cast("int32", t)
                            gain[cursor[index[t, j] - first]] = weight[t, j]
                            cursor[index[t, j] - first] = cursor[index[t, j] - first] + 1

    return group
