"""Router kernel: turns router logits into each token's top-k experts and routing weights.

One pass per token over its ``E`` logits: scores (softmax or sigmoid), a k-step arg-max
selection, then optional renormalisation of the selected weights. ``E`` is small, so the work is a few hundred
scalar operations per token; tokens run in parallel when there are many.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T


def route_token_macro(
    num_experts: int,
    top_k: int,
    scoring: str,
    normalize: bool,
    tie_break: str,
    kept: list[int] | None = None,
    skip_top1_above: float | None = None,
    skip_below_fraction: float | None = None,
    pattern: str | None = None,
):
    """A TIR macro ``route_token(logits, index, weight, score, taken, acc, best, t)`` routing token
    ``t``, with local scratch ``score[E]``, ``taken[E]`` (int32), ``acc[2]``, ``best[1]`` (int32).

    Shared by the CPU and CUDA route kernels, which differ only in how tokens map to threads.
    ``tie_break`` picks the lowest (ONNX ``TopK``) or highest (onnxruntime's fused MoE) expert
    index among equal scores. With ``kept`` (ascending expert ids; static expert masking) the
    scores are still the router's over all ``E`` experts, but top-k is taken over the kept ones
    only, and each selection is written as its position in ``kept`` (the masked layer's weights
    hold only the kept experts).

    Early exit: slots after the first are skipped (index ``len(kept)``, weight 0: no expert
    computes them) when the top-1 weight exceeds ``skip_top1_above``, or, each, when their
    weight is below ``skip_below_fraction`` of the top-1 weight. With renormalisation the
    weights left are renormalised over the experts still computed.

    Fixed-pattern routing ignores the logits: ``pattern = "cycle"`` sends token ``t``'s slot
    ``j`` to expert ``(t + j) mod E``, ``"tile"`` splits the tokens into ``E`` contiguous tiles
    (tile ``i``'s slot ``j`` goes to expert ``(i + j) mod E``); every slot weighs ``1/k``
    (experts counted among the kept ones).
    """
    if pattern not in (None, "cycle", "tile"):
        raise ValueError(f"unknown routing pattern {pattern!r} (cycle, tile)")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown router scoring {scoring!r}")
    prefer_high = tie_break == "high"
    use_softmax = scoring == "softmax"
    E, K = num_experts, top_k
    kept = list(range(E)) if kept is None else sorted(kept)
    if len(kept) < K or len(set(kept)) != len(kept) or not all(0 <= e < E for e in kept):
        raise ValueError(f"kept experts {kept} must be {K} or more distinct ids in 0..{E - 1}")
    masked = [e for e in range(E) if e not in kept]
    skipping = skip_top1_above is not None or skip_below_fraction is not None
    # thresholds that never trigger stand in for an absent rule (weights are at most 1)
    top1_limit = T.float32(2.0 if skip_top1_above is None else skip_top1_above)
    fraction = T.float32(0.0 if skip_below_fraction is None else skip_below_fraction)

    def is_masked(e):
        """1 for a masked expert id, else 0 (an int32 expression over the loop variable)."""
        flags = [T.if_then_else(e == m, 1, 0) for m in masked]
        return sum(flags[1:], flags[0]) if flags else T.int32(0)

    def compact(e):
        """Position of kept expert ``e`` among the kept ones: ``e`` minus the masked ids below it."""
        below = [T.if_then_else(e > m, 1, 0) for m in masked]
        return e - sum(below[1:], below[0]) if below else e

    fixed = pattern is not None
    slots = len(kept)

    def fixed_expert(t, j, tokens):
        start = t if pattern == "cycle" else t * slots // tokens
        return T.Cast("int32", (start + j) % slots)

    @T.macro
    def route_learned(logits, index, weight, score, taken, acc, best, t):
        # scores
        acc[0] = logits[t, 0]
        for e in range(E):
            acc[0] = T.max(acc[0], logits[t, e])
        acc[1] = T.float32(0)
        for e in range(E):
            taken[e] = is_masked(e)
            if use_softmax:
                score[e] = T.exp(logits[t, e] - acc[0])
                acc[1] = acc[1] + score[e]
            else:
                score[e] = T.float32(1) / (T.float32(1) + T.exp(T.float32(0) - logits[t, e]))
        if use_softmax:
            for e in range(E):
                score[e] = score[e] / acc[1]
        # top-k selection
        acc[1] = T.float32(0)
        for j in range(K):
            best[0] = -1
            for e in range(E):
                if taken[e] == 0:
                    if best[0] < 0:
                        best[0] = e
                    elif prefer_high and score[e] >= score[best[0]]:
                        best[0] = e
                    elif not prefer_high and score[e] > score[best[0]]:
                        best[0] = e
            taken[best[0]] = 1
            index[t, j] = compact(best[0])
            weight[t, j] = score[best[0]]
            acc[1] = acc[1] + score[best[0]]
        if normalize:
            for j in range(K):
                weight[t, j] = weight[t, j] / acc[1]
        if skipping:
            acc[1] = weight[t, 0]
            for j in range(1, K):
                if weight[t, 0] > top1_limit or weight[t, j] < fraction * weight[t, 0]:
                    index[t, j] = len(kept)
                    weight[t, j] = T.float32(0)
                acc[1] = acc[1] + weight[t, j]
            if normalize:
                for j in range(K):
                    weight[t, j] = weight[t, j] / acc[1]

    @T.macro
    def route_token(logits, index, weight, score, taken, acc, best, t):
        if fixed:
            for j in range(K):
                index[t, j] = fixed_expert(t, j, logits.shape[0])
                weight[t, j] = T.float32(1.0 / K)
        else:
            route_learned(logits, index, weight, score, taken, acc, best, t)

    return route_token


def make_route_kernel(
    num_experts: int,
    top_k: int,
    scoring: str,
    normalize: bool,
    tie_break: str = "low",
    kept: list[int] | None = None,
    skip_top1_above: float | None = None,
    skip_below_fraction: float | None = None,
    pattern: str | None = None,
) -> tirx.PrimFunc:
    """PrimFunc ``route(logits[n, E]) -> (expert_index[n, k] int32, weight[n, k] float32)``, tokens
    in parallel (see :func:`route_token_macro`)."""
    E, K = num_experts, top_k
    route_token = route_token_macro(
        E, K, scoring, normalize, tie_break, kept, skip_top1_above, skip_below_fraction, pattern
    )

    @T.prim_func
    def route(logits_h: T.handle, index_h: T.handle, weight_h: T.handle):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        n = T.int64()
        logits = T.match_buffer(logits_h, (n, E), "float32")
        index = T.match_buffer(index_h, (n, K), "int32")
        weight = T.match_buffer(weight_h, (n, K), "float32")
        for t in T.parallel(n):
            score = T.alloc_buffer((E,), "float32", scope="local")
            taken = T.alloc_buffer((E,), "int32", scope="local")
            acc = T.alloc_buffer((2,), "float32", scope="local")
            best = T.alloc_buffer((1,), "int32", scope="local")
            route_token(logits, index, weight, score, taken, acc, best, t)

    return route
