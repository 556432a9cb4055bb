"""Grouping kernel: sorts the (token, slot) pairs of a batch by expert.

The dispatch kernels then read each selected expert's weights once and apply them to every
token routed to it (a GEMM per group instead of a GEMV per token). This is a stable counting
sort over ``n * k`` pairs, run by one thread on every target (on CUDA one thread of one
block): it is tiny next to the expert matmuls, and a single pass keeps it deterministic.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from moec.kernels.backend import Backend
from moec.kernels.config import GroupConfig


def make_group_kernel(config: GroupConfig, backend: Backend) -> tirx.PrimFunc:
    """PrimFunc ``group(index[n, k], weight[n, k]) -> (offset[E+1], token[n*k], gain[n*k])``.

    Rows ``offset[e] .. offset[e+1]`` of ``token``/``gain`` are the tokens routed to expert
    ``e`` and their routing weights, in token order. Slots the router skipped (index ``E``)
    sort after ``offset[E]``, where no expert kernel reads.
    """
    E, K = config.num_experts, config.top_k
    single = backend.items(parallel=False)

    @T.prim_func
    def group(index_h: T.handle, weight_h: T.handle, offset_h: T.handle, token_h: T.handle, gain_h: T.handle):
        T.func_attr(backend.attrs)
        n = T.int64()
        index = T.match_buffer(index_h, (n, K), "int32")
        weight = T.match_buffer(weight_h, (n, K), "float32")
        offset = T.match_buffer(offset_h, (E + 1,), "int32")
        token = T.match_buffer(token_h, (n * K,), "int32")
        gain = T.match_buffer(gain_h, (n * K,), "float32")
        for _block in single.outer(1):
            for _thread in single.inner():
                cursor = T.alloc_buffer((E + 2,), "int32", scope=backend.scratch_scope)
                for e in range(E + 2):
                    cursor[e] = 0
                for t, j in T.grid(n, K):
                    cursor[index[t, j] + 1] = cursor[index[t, j] + 1] + 1
                for e in range(E + 1):
                    cursor[e + 1] = cursor[e + 1] + cursor[e]
                for e in range(E + 1):
                    offset[e] = cursor[e]
                for t, j in T.grid(n, K):
                    token[cursor[index[t, j]]] = T.Cast("int32", t)
                    gain[cursor[index[t, j]]] = weight[t, j]
                    cursor[index[t, j]] = cursor[index[t, j]] + 1

    return group
