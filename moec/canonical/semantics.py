"""Numpy semantics of the canonical MoE layer (:class:`moec.canonical.layer.MoELayer`).

Used to confirm that a subgraph the frontend recognised really computes the layer it
extracted, by the reference of an artifact (:mod:`moec.reference.stored`, with the artifact's
masking, pruning and early exit as a :class:`LayerPlan`), by the router profile, and by tests
as a second oracle beside the ONNX reference evaluator.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moec.canonical.layer import MoELayer

INT8_LEVELS = 127


def round_to_steps(matrix: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """``matrix`` ``[rows, columns]`` rounded to INT8 with given steps, ``[rows]`` per row or
    ``[columns / group, rows]`` per group of columns: ``clip(rint(W / step), -128, 127) * step``
    in float32 (a model's own INT8 weights, already on their steps, come back unchanged)."""
    rows, columns = matrix.shape
    per_weight = steps[:, None] if steps.ndim == 1 else np.repeat(steps.T, columns // steps.shape[0], axis=1)
    levels = np.clip(np.rint(matrix.astype(np.float32) / per_weight), -128, 127).astype(np.float32)
    return levels * per_weight


def round_int8(matrix: np.ndarray, group: int = 0) -> np.ndarray:
    """``matrix`` ``[rows, columns]`` rounded to symmetric INT8 per row and group of ``group``
    columns (the whole row when 0), as float32: ``step = float32(max |group|) / 127`` (1 for an
    all-zero group), ``clip(rint(value / step), -127, 127) * step``, all in float32, ``rint``
    rounding half to even. INT8 weights are stored this way (rows: output channels), and the
    activations an int8-dot expert multiplies (rows: tokens, one group)."""
    rows, columns = matrix.shape
    groups = matrix.astype(np.float32).reshape(rows, columns // (group or columns), -1)
    peak = np.abs(groups).max(axis=-1, keepdims=True)
    step = np.where(peak > 0, peak / np.float32(INT8_LEVELS), np.float32(1)).astype(np.float32)
    levels = np.clip(np.rint(groups / step), -INT8_LEVELS, INT8_LEVELS).astype(np.float32)
    return (levels * step).reshape(rows, columns)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _activation(layer: MoELayer, v: np.ndarray) -> np.ndarray:
    name = layer.activation
    if name == "relu":
        return np.maximum(v, 0.0)
    if name == "gelu":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return 0.5 * v * (1.0 + erf(v / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    if name == "silu":
        return v * _sigmoid(layer.alpha * v)
    return v


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What a compiled artifact changed in one layer (read from its manifest).

    kept: the experts static masking kept (None: all). channels: per kept expert, the
    intermediate channels pruning kept (None: all). top1_above / below_fraction: early exit.
    pattern: fixed routing (``cycle``/``tile``) instead of the router. precisions: per expert
    (all of them, masked or not) how its matrices are stored (None: all fp32), with
    ``int8_group`` the INT8 scale group (0: per output channel); the rounding of the weights is
    applied by :func:`moec.reference.stored.stored_layer`, not here; an ``int8-dot`` expert's
    input rows (each token's ``x``, each pair's intermediate activations) are rounded here, per
    row (:func:`round_int8`), before they are multiplied. int8_from_model: the int8 experts
    keep the integers and steps the model stores (``MoELayer.int8_steps``) instead of being
    rounded afresh.
    """

    kept: list[int] | None = None
    channels: list[list[int]] | None = None
    top1_above: float | None = None
    below_fraction: float | None = None
    pattern: str | None = None
    precisions: tuple[str, ...] | None = None
    int8_group: int = 0
    int8_from_model: bool = False


def route(
    layer: MoELayer, logits: np.ndarray, plan: LayerPlan | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k expert indices ``[n, k]`` and routing weights ``[n, k]`` for logits ``[n, E]``.

    With a ``plan``: top-k over the kept experts only (scores still over all), and early-exit
    slots dropped (index -1, weight 0) with the rest renormalised when the layer renormalises.
    """
    plan = plan or LayerPlan()
    if plan.pattern is not None:
        kept = np.array(plan.kept if plan.kept is not None else range(layer.num_experts))
        tokens = np.arange(len(logits))
        start = tokens if plan.pattern == "cycle" else tokens * len(kept) // len(logits)
        slots = (start[:, None] + np.arange(layer.top_k)[None, :]) % len(kept)
        return kept[slots], np.full(slots.shape, 1.0 / layer.top_k)
    logits = logits.astype(np.float64)
    masked = np.setdiff1d(np.arange(layer.num_experts), plan.kept) if plan.kept is not None else []
    if layer.scoring == "sparsemixer":
        index, weight = _sparsemixer(logits, layer.top_k, layer.jitter_eps, masked)
    else:
        index, weight = _top_k(layer, logits, masked)
    if layer.normalize:
        weight = weight / weight.sum(axis=-1, keepdims=True)
    weight = weight * layer.scale
    if plan.top1_above is not None or plan.below_fraction is not None:
        top1 = weight[:, :1]
        skip = np.zeros_like(weight, dtype=bool)
        if plan.top1_above is not None:
            skip[:, 1:] |= top1 > plan.top1_above
        if plan.below_fraction is not None:
            skip[:, 1:] |= weight[:, 1:] < plan.below_fraction * top1
        weight = np.where(skip, 0.0, weight)
        index = np.where(skip, -1, index)
        if layer.normalize:
            weight = weight / weight.sum(axis=-1, keepdims=True) * layer.scale
    return index, weight


def _top_k(layer: MoELayer, logits: np.ndarray, masked) -> tuple[np.ndarray, np.ndarray]:
    """Softmax or sigmoid scores; top-k of the scores plus the selection bias, over the
    experts of the best groups and never a ``masked`` one; the selected scores."""
    if layer.scoring == "softmax":
        scores = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
    else:
        scores = _sigmoid(logits)
    choice = scores if layer.selection_bias is None else scores + layer.selection_bias
    if layer.groups > 1:
        by_group = choice.reshape(len(choice), layer.groups, -1)
        group_score = np.sort(by_group, axis=-1)[..., -2:].sum(axis=-1)
        best_groups = np.argsort(-group_score, axis=-1, kind="stable")[:, : layer.top_groups]
        outside = np.ones(group_score.shape, dtype=bool)
        np.put_along_axis(outside, best_groups, False, axis=-1)
        choice = np.where(np.repeat(outside, by_group.shape[-1], axis=-1), -np.inf, choice)
    choice = choice.copy()
    choice[:, masked] = -np.inf  # never selected
    if layer.tie_break == "low":
        index = np.argsort(-choice, axis=-1, kind="stable")[:, : layer.top_k]
    else:  # reverse the expert order so the stable sort prefers the highest index
        flipped = np.argsort(-choice[:, ::-1], axis=-1, kind="stable")[:, : layer.top_k]
        index = choice.shape[-1] - 1 - flipped
    return index, np.take_along_axis(scores, index, axis=-1)


def _sparsemixer(logits: np.ndarray, k: int, jitter_eps: float, masked) -> tuple[np.ndarray, np.ndarray]:
    """PhiMoE's inference routing (see :class:`MoELayer`): k arg-max steps, each weighed by a
    softmax over the experts left whose relative gap to the step's maximum is within 2 eps."""
    left = np.ones(logits.shape, dtype=bool)
    left[:, masked] = False
    rows = np.arange(len(logits))
    index = np.zeros((len(logits), k), dtype=np.int64)
    weight = np.zeros((len(logits), k))
    for j in range(k):
        candidates = np.where(left, logits, -np.inf)
        best = np.argmax(candidates, axis=-1)
        top = candidates[rows, best][:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            far = (top - logits) / np.maximum(np.abs(logits), top) > 2 * jitter_eps
        weight[:, j] = 1.0 / np.where(left & ~far, np.exp(candidates - top), 0.0).sum(axis=-1)
        index[:, j] = best
        left[rows, best] = False
    return index, weight


def expert_hidden(layer: MoELayer, expert: int, x: np.ndarray) -> np.ndarray:
    """One expert's intermediate activations ``[m, F]`` on rows ``x`` ``[m, H]`` (float64): what
    its down projection reads."""

    def linear(w, b):
        out = x @ w[expert].astype(np.float64).T
        return out if b is None else out + b[expert]

    up = linear(layer.w_up, layer.b_up)
    if layer.gated:
        gate = np.minimum(linear(layer.w_gate, layer.b_gate), layer.limit)
        return _activation(layer, gate) * (np.clip(up, -layer.limit, layer.limit) + layer.beta)
    return _activation(layer, up)


def expert_ffn(layer: MoELayer, expert: int, x: np.ndarray) -> np.ndarray:
    """One expert's FFN on rows ``x`` ``[m, H]`` (float64)."""
    out = expert_hidden(layer, expert, x) @ layer.w_down[expert].astype(np.float64).T
    return out if layer.b_down is None else out + layer.b_down[expert]


def drop_past_capacity(
    index: np.ndarray, weight: np.ndarray, capacity: int, sequence: int
) -> tuple[np.ndarray, np.ndarray]:
    """``index``/``weight`` ``[n, k]`` with each expert's selections past its ``capacity`` in
    each run of ``sequence`` tokens (counted token by token, then slot) dropped (-1, weight 0)."""
    rows, k = len(index) // sequence, index.shape[1]
    flat = index.reshape(rows, sequence * k)
    hits = flat[..., None] == np.arange(max(int(index.max(initial=0)) + 1, 1))
    position = np.take_along_axis(np.cumsum(hits, axis=1), np.maximum(flat, 0)[..., None], axis=2)[..., 0]
    dropped = ((flat >= 0) & (position > capacity)).reshape(index.shape)
    return np.where(dropped, -1, index), np.where(dropped, 0.0, weight)


def moe_forward(
    layer: MoELayer,
    x: np.ndarray,
    logits: np.ndarray,
    plan: LayerPlan | None = None,
    sequence: int | None = None,
) -> np.ndarray:
    """The layer's output for tokens ``x`` ``[n, H]`` and router logits ``[n, E]`` (with the
    masking, pruning and early exit of ``plan``); an expert capacity counts per run of
    ``sequence`` tokens (default: all ``n``)."""
    plan = plan or LayerPlan()
    x64 = x.astype(np.float64)
    index, weight = route(layer, logits, plan)
    if layer.capacity is not None:
        index, weight = drop_past_capacity(index, weight, layer.capacity, sequence or len(x))
    y = np.zeros_like(x64)
    for expert in np.unique(index[index >= 0]):
        rows, slots = np.nonzero(index == expert)
        gain = weight[rows, slots, None]
        tokens = x64[rows] * gain if layer.gain_on_input else x64[rows]
        int8_inputs = plan.precisions is not None and plan.precisions[expert] == "int8-dot"
        if int8_inputs:
            tokens = round_int8(tokens).astype(np.float64)
        hidden = expert_hidden(layer, int(expert), tokens)
        if plan.channels is not None:
            position = plan.kept.index(int(expert)) if plan.kept is not None else int(expert)
            pruned = np.setdiff1d(np.arange(layer.ffn), plan.channels[position])
            hidden[:, pruned] = 0.0
        if int8_inputs:
            hidden = round_int8(hidden).astype(np.float64)
        out = hidden @ layer.w_down[expert].astype(np.float64).T
        if layer.b_down is not None:
            out = out + layer.b_down[expert]
        y[rows] += out if layer.gain_on_input else gain * out
    return y.astype(x.dtype)
