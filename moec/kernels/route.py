"""Router kernel: turns router logits into each token's top-k experts and routing weights.

One pass per token over its ``E`` logits: scores (softmax or sigmoid), a k-step arg-max
selection, then optional renormalisation of the selected weights. ``E`` is small, so the work is a few hundred
scalar operations per token; tokens run in parallel when there are many.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from moec.kernels.backend import Backend
from moec.kernels.config import RouteConfig


def route_token_macro(config: RouteConfig, scope: str):
    """A TIR macro ``route_token(logits, index, weight, score, taken, acc, best, t)`` routing token
    ``t``, with scratch ``score[E]``, ``taken[E]`` (int32), ``acc[2]``, ``best[1]`` (int32); its
    own scratch buffers are allocated in storage ``scope`` (the backend's ``scratch_scope``).

    The route kernel runs it once per token, on whichever thread its backend gives the token.
    The routing rule is :class:`moec.canonical.layer.MoELayer`'s: softmax, sigmoid or sparsemixer
    scores; the ``selection_bias`` (a constant table) and the ``groups``/``top_groups`` limit
    change which experts are chosen, never their weights; ``scale`` multiplies the weights.
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
    E, K, scoring, normalize, tie_break = (
        config.num_experts, config.top_k, config.scoring, config.normalize, config.tie_break
    )  # fmt: skip
    kept, pattern, selection_bias, scale, jitter_eps = (
        config.kept, config.pattern, config.selection_bias, config.scale, config.jitter_eps
    )  # fmt: skip
    skip_top1_above, skip_below_fraction = config.skip_top1_above, config.skip_below_fraction
    G, top_groups = config.groups, config.top_groups
    if pattern not in (None, "cycle", "tile"):
        raise ValueError(f"unknown routing pattern {pattern!r} (cycle, tile)")
    if scoring not in ("softmax", "sigmoid", "sparsemixer"):
        raise ValueError(f"unknown router scoring {scoring!r}")
    prefer_high = tie_break == "high"
    use_softmax = scoring == "softmax"
    sparsemixer = scoring == "sparsemixer"
    S = E // G  # experts per group
    if E % G or (G > 1 and S < 2) or not 1 <= top_groups <= G:
        raise ValueError(f"cannot route over the top {top_groups} of {G} groups of {E} experts")
    bias = [0.0] * E if selection_bias is None else [float(v) for v in selection_bias]
    if len(bias) != E:
        raise ValueError(f"selection_bias has {len(bias)} values for {E} experts")
    kept = list(range(E)) if kept is None else sorted(kept)
    if len(kept) < K or len(set(kept)) != len(kept) or not all(0 <= e < E for e in kept):
        raise ValueError(f"kept experts {kept} must be {K} or more distinct ids in 0..{E - 1}")
    masked = [e for e in range(E) if e not in kept]
    skipping = skip_top1_above is not None or skip_below_fraction is not None
    # thresholds that never trigger stand in for an absent rule (weights are at most 1)
    top1_limit = T.float32(2.0 * scale if skip_top1_above is None else skip_top1_above)
    fraction = T.float32(0.0 if skip_below_fraction is None else skip_below_fraction)
    gap_limit = T.float32(2.0 * jitter_eps)
    lowest = T.min_value("float32")

    def is_masked(e):
        """1 for a masked expert id, else 0 (an int32 expression over the loop variable)."""
        flags = [T.if_then_else(e == m, 1, 0) for m in masked]
        return sum(flags[1:], flags[0]) if flags else T.int32(0)

    def compact(e):
        """Position of kept expert ``e`` among the kept ones: ``e`` minus the masked ids below it."""
        below = [T.if_then_else(e > m, 1, 0) for m in masked]
        return e - sum(below[1:], below[0]) if below else e

    def bias_of(e, first=0, count=E):
        """``bias[e]`` as a balanced tree of selects over the constant table."""
        if count == 1:
            return T.float32(bias[first])
        half = count // 2
        return T.if_then_else(
            e < first + half, bias_of(e, first, half), bias_of(e, first + half, count - half)
        )

    fixed = pattern is not None
    slots = len(kept)

    def fixed_expert(t, j, tokens):
        start = t if pattern == "cycle" else t * slots // tokens
        return T.Cast("int32", (start + j) % slots)

    @T.macro
    def pick_best(values, taken, count, best, ties_to_high):
        """``best[0]``: the position below ``count`` not yet taken with the largest value (ties: the
        lowest position, or the highest with ``ties_to_high``)."""
        best[0] = -1
        for i in range(count):
            if taken[i] == 0:
                if best[0] < 0:
                    best[0] = i
                elif ties_to_high and values[i] >= values[best[0]]:
                    best[0] = i
                elif not ties_to_high and values[i] > values[best[0]]:
                    best[0] = i

    @T.macro
    def limit_groups(choice, taken):
        """Marks taken every expert outside the ``top_groups`` groups with the largest top-2 sums."""
        group_score = T.alloc_buffer((G,), "float32", scope=scope)
        group_taken = T.alloc_buffer((G,), "int32", scope=scope)
        top2 = T.alloc_buffer((2,), "float32", scope=scope)
        chosen = T.alloc_buffer((1,), "int32", scope=scope)
        for g in range(G):
            top2[0] = lowest
            top2[1] = lowest
            for i in range(S):
                if choice[g * S + i] > top2[0]:
                    top2[1] = top2[0]
                    top2[0] = choice[g * S + i]
                elif choice[g * S + i] > top2[1]:
                    top2[1] = choice[g * S + i]
            group_score[g] = top2[0] + top2[1]
            group_taken[g] = 0
        for _ in range(top_groups):
            pick_best(group_score, group_taken, G, chosen, False)
            group_taken[chosen[0]] = 1
        for e in range(E):
            if group_taken[e // S] == 0:
                taken[e] = 1

    @T.macro
    def select_top_k(logits, index, weight, score, taken, acc, best, t):
        """Softmax/sigmoid scores, then k arg-max steps over the scores plus the selection bias."""
        choice = T.alloc_buffer((E,), "float32", scope=scope)
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
        for e in range(E):
            choice[e] = score[e] + bias_of(e) if selection_bias is not None else score[e]
        if G > 1:
            limit_groups(choice, taken)
        for j in range(K):
            pick_best(choice, taken, E, best, prefer_high)
            taken[best[0]] = 1
            index[t, j] = compact(best[0])
            weight[t, j] = score[best[0]]

    @T.macro
    def select_sparsemixer(logits, index, weight, taken, acc, best, t):
        """k arg-max steps over the logits; each weighed by a softmax over the near experts left."""
        row = T.alloc_buffer((E,), "float32", scope=scope)
        for e in range(E):
            taken[e] = is_masked(e)
            row[e] = logits[t, e]
        for j in range(K):
            pick_best(row, taken, E, best, False)
            acc[0] = logits[t, best[0]]
            acc[1] = T.float32(0)
            for e in range(E):
                if taken[e] == 0:
                    acc[1] = acc[1] + T.if_then_else(
                        (acc[0] - logits[t, e]) / T.max(T.fabs(logits[t, e]), acc[0]) > gap_limit,
                        T.float32(0),
                        T.exp(logits[t, e] - acc[0]),
                    )
            taken[best[0]] = 1
            index[t, j] = compact(best[0])
            weight[t, j] = T.float32(1) / acc[1]

    @T.macro
    def renormalise(weight, acc, t):
        acc[1] = T.float32(0)
        for j in range(K):
            acc[1] = acc[1] + weight[t, j]
        for j in range(K):
            weight[t, j] = weight[t, j] / acc[1] * T.float32(scale)

    @T.macro
    def route_learned(logits, index, weight, score, taken, acc, best, t):
        if sparsemixer:
            select_sparsemixer(logits, index, weight, taken, acc, best, t)
        else:
            select_top_k(logits, index, weight, score, taken, acc, best, t)
        if normalize:
            renormalise(weight, acc, t)
        elif scale != 1.0:
            for j in range(K):
                weight[t, j] = weight[t, j] * T.float32(scale)
        if skipping:
            for j in range(1, K):
                if weight[t, 0] > top1_limit or weight[t, j] < fraction * weight[t, 0]:
                    index[t, j] = len(kept)
                    weight[t, j] = T.float32(0)
            if normalize:
                renormalise(weight, acc, t)

    @T.macro
    def route_token(logits, index, weight, score, taken, acc, best, t):
        if fixed:
            for j in range(K):
                index[t, j] = fixed_expert(t, j, logits.shape[0])
                weight[t, j] = T.float32(1.0 / K)
        else:
            route_learned(logits, index, weight, score, taken, acc, best, t)

    return route_token


def make_route_kernel(config: RouteConfig, backend: Backend) -> tirx.PrimFunc:
    """PrimFunc ``route(logits[n, E]) -> (expert_index[n, k] int32, weight[n, k] float32)``: every
    token routed by :func:`route_token_macro`, tokens spread over the backend's threads."""
    E, K = config.num_experts, config.top_k
    route_token = route_token_macro(config, backend.scratch_scope)

    tokens = backend.items()

    @T.prim_func
    def route(logits_h: T.handle, index_h: T.handle, weight_h: T.handle):
        T.func_attr(backend.attrs)
        n = T.int64()
        logits = T.match_buffer(logits_h, (n, E), "float32")
        index = T.match_buffer(index_h, (n, K), "int32")
        weight = T.match_buffer(weight_h, (n, K), "float32")
        for o in tokens.outer(n):
            for i in tokens.inner():
                score = T.alloc_buffer((E,), "float32", scope=backend.scratch_scope)
                taken = T.alloc_buffer((E,), "int32", scope=backend.scratch_scope)
                acc = T.alloc_buffer((2,), "float32", scope=backend.scratch_scope)
                best = T.alloc_buffer((1,), "int32", scope=backend.scratch_scope)
                if tokens.valid(o, i, n):
                    route_token(logits, index, weight, score, taken, acc, best, tokens.index(o, i))

    return route
