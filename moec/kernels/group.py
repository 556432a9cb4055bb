"""Grouping kernel: sorts the (token, slot) pairs of a batch by expert.

The dispatch kernels then read each selected expert's weights once and apply them to every
token routed to it (a GEMM per group instead of a GEMV per token). This is a stable
counting sort over ``n * k`` pairs, serial because it is tiny next to the expert matmuls.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T


def make_group_kernel(num_experts: int, top_k: int) -> tirx.PrimFunc:
    """PrimFunc ``group(index[n, k], weight[n, k]) -> (offset[E+1], token[n*k], gain[n*k])``.

    Rows ``offset[e] .. offset[e+1]`` of ``token``/``gain`` are the tokens routed to expert
    ``e`` and their routing weights, in token order. Slots the router skipped (index ``E``)
    sort after ``offset[E]``, where no expert kernel reads.
    """
    E, K = num_experts, top_k

    @T.prim_func
    def group(index_h: T.handle, weight_h: T.handle, offset_h: T.handle, token_h: T.handle, gain_h: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        n = T.int64()
        index = T.match_buffer(index_h, (n, K), "int32")
        weight = T.match_buffer(weight_h, (n, K), "float32")
        offset = T.match_buffer(offset_h, (E + 1,), "int32")
        token = T.match_buffer(token_h, (n * K,), "int32")
        gain = T.match_buffer(gain_h, (n * K,), "float32")
        cursor = T.alloc_buffer((E + 2,), "int32", scope="local")
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
