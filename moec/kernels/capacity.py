"""Expert-capacity kernel: drops the selections past an expert's capacity in a sequence.

Switch Transformers' router lets each expert take at most ``capacity`` tokens of a sequence,
in token order; a token routed to a full expert gets nothing from it. Applied between
``route`` and ``group``, a dropped selection becomes a skipped slot (index ``E``, weight 0),
so no expert kernel computes it. Serial per sequence (the count is a running one); tiny next
to the expert matmuls.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from moec.kernels.backend import Backend
from moec.kernels.config import CapacityConfig


def limit_sequence_macro(num_experts: int, top_k: int, capacity: int):
    """A TIR macro ``limit_sequence(index, weight, index_out, weight_out, count, b)``: sequence
    ``b`` of the ``[r, s, k]`` buffers, counting in ``count`` (``E + 1`` local int32s); the
    kernel runs it once per sequence."""
    E, K, C = num_experts, top_k, capacity

    @T.macro
    def limit_sequence(index, weight, index_out, weight_out, count, b):
        for e in range(E + 1):
            count[e] = 0
        for t, j in T.grid(index.shape[1], K):
            count[index[b, t, j]] = count[index[b, t, j]] + 1
            if index[b, t, j] < E and count[index[b, t, j]] > C:
                index_out[b, t, j] = E
                weight_out[b, t, j] = T.float32(0)
            else:
                index_out[b, t, j] = index[b, t, j]
                weight_out[b, t, j] = weight[b, t, j]

    return limit_sequence


def make_capacity_kernel(config: CapacityConfig, backend: Backend) -> tirx.PrimFunc:
    """PrimFunc ``capacity(index[r, s, k], weight[r, s, k]) -> (index[r, s, k], weight[r, s, k])``.

    For each of the ``r`` sequences of ``s`` tokens (spread over the backend's threads), the
    selections (token-major, then slot) are counted per expert; from the ``capacity + 1``-th on,
    an expert's selections become skipped slots. Slots already skipped (index ``E``) stay so and
    count for no expert.
    """
    E, K = config.num_experts, config.top_k
    limit_sequence = limit_sequence_macro(E, K, config.capacity)

    sequences = backend.items()

    @T.prim_func
    def limit_capacity(index_h: T.handle, weight_h: T.handle, index_out_h: T.handle, weight_out_h: T.handle):
        T.func_attr(backend.attrs)
        r = T.int64()
        s = T.int64()
        index = T.match_buffer(index_h, (r, s, K), "int32")
        weight = T.match_buffer(weight_h, (r, s, K), "float32")
        index_out = T.match_buffer(index_out_h, (r, s, K), "int32")
        weight_out = T.match_buffer(weight_out_h, (r, s, K), "float32")
        for o in sequences.outer(r):
            for i in sequences.inner():
                count = T.alloc_buffer((E + 1,), "int32", scope=backend.scratch_scope)
                if sequences.valid(o, i, r):
                    limit_sequence(index, weight, index_out, weight_out, count, sequences.index(o, i))

    return limit_capacity
