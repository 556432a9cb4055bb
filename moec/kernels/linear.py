"""Dense linear layer ``y = x @ W``: output-stationary register blocking over packed weight panels.

A dense matmul with a weight (attention projections, routers, shared experts, LM heads) reads
every weight once per call, so it must stream ``W`` at memory speed and, with several tokens,
reuse each weight load for all of them. The weight is packed at compile time into panels of
``panel`` output columns (:class:`moec.kernels.config.LinearConfig`): panel ``p`` is
``[in_features, panel]``, contiguous. One parallel task owns one panel and, for
``token_block`` tokens at a time, keeps their ``token_block × panel`` partial outputs in vector
registers; for each input feature ``k`` it loads the panel's row ``k`` once (a few vectors) and
adds ``x[t, k] ×`` that row into every token's accumulators (a broadcast, then FMAs). No
horizontal reduction, no partial sums leaving registers until the panel is done. Tokens past the
last full block form one more block of their exact count (:func:`moec.kernels.backend.token_blocks`).

Summation over ``k`` runs in order, so results do not depend on the thread count. The weight's
storage format (fp32, fp16, int8 with a scale per output column) is read as the expert kernels
read it (:class:`moec.kernels.formats.WeightFormat`).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from moec.kernels.backend import Backend, CpuBackend, token_blocks
from moec.kernels.config import LinearConfig
from moec.kernels.expert_funcs import signature_params
from moec.kernels.formats import WeightFormat


def make_linear_kernel(config: LinearConfig, backend: Backend) -> tirx.PrimFunc:
    """PrimFunc ``y[t, :] = x[t, :] @ W`` with ``W`` in packed panels (:class:`LinearConfig`).

    Signature: :meth:`LinearConfig.signature` (``x`` ``[n, K]``, the weight ``[P, K, panel]``
    [and its int8 scales] → ``y`` ``[n, N]``). CPU targets only: on CUDA targets dense matmuls
    stay with TVM's dlight GPU schedules.
    """
    if not isinstance(backend, CpuBackend):
        raise ValueError("the linear kernel is built for CPU targets only (CUDA uses dlight's matmul)")
    K, N, NB, P = config.in_features, config.out_features, config.panel, config.panels
    fmt = WeightFormat(config.weight_format, config.int8_group)
    TB = backend.token_block
    exact = N % NB == 0

    @T.macro
    def panel_block(ctx, t0, count):
        """Tokens ``t0 .. t0 + count`` of panel ``p``: accumulate over ``k``, then store."""
        acc, x, w, s, y, p = ctx
        for t in T.unroll(count):
            for v in T.vectorized(NB):
                acc[t, v] = T.float32(0)
        for k in range(K):
            for t in T.unroll(count):
                for v in T.vectorized(NB):
                    acc[t, v] = acc[t, v] + x[t0 + t, k] * fmt.load(w, s, (p, k, v), p * NB + v, k, slot=0)
        for t in T.unroll(count):
            if exact or p < P - 1:
                for v in T.vectorized(NB):
                    y[t0 + t, p * NB + v] = fmt.finish(acc[t, v], s, 0, p * NB + v)
            else:  # unrolled: constant accumulator indices keep them in registers
                for v in T.unroll(NB):
                    if v < N - (P - 1) * NB:
                        y[t0 + t, p * NB + v] = fmt.finish(acc[t, v], s, 0, p * NB + v)

    blocks = token_blocks(panel_block, TB)
    S = fmt.scale_shape(1, P * NB, K)  # int8: per output column, or per group of inputs too

    @T.prim_func
    def linear(x_h: T.handle, w: T.Buffer((P, K, NB), fmt.dtype), s: T.Buffer(S, "float32"), y_h: T.handle):
        T.func_attr(backend.attrs)
        n = T.int64()
        x = T.match_buffer(x_h, (n, K), "float32")
        y = T.match_buffer(y_h, (n, N), "float32")
        for p in T.parallel(P):
            acc = T.alloc_buffer((TB, NB), "float32", scope=backend.scratch_scope)
            blocks((acc, x, w, s, y, p), 0, n)

    return signature_params(linear, ["x", fmt.matrix_name("w"), fmt.scale_name("w"), "y"], config)
