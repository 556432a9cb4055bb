"""Pure-numpy oracle for onnxruntime's ``com.microsoft::MoE`` contrib op (float32).

This module is the *independent* reference that moec's compiled MoE kernels are
checked against. It uses neither TVM nor onnxruntime; its semantics were pinned
down by reading onnxruntime's contrib schema and kernels and then checked
numerically against the onnxruntime 1.32.0 CPU kernel.

Semantics (T tokens, H = hidden_size, I = inter_size, E = num_experts)
======================================================================

Shapes (the 1.32 "new" layout; every weight is stored [out_features, in_features]
so a projection is ``x @ W[e].T``)::

    input                [T, H]  or  [B, S, H]  (3-D is just B*S token rows)
    router_probs         [T, E]  (always 2-D; these are router *logits*)
    fc1_experts_weights  [E, F*I, H]   F = 2 for fused swiglu/geglu, else 1
    fc1_experts_bias     [E, F*I]      optional
    fc2_experts_weights  [E, H, I]
    fc2_experts_bias     [E, H]        optional
    fc3_experts_weights  [E, I, H]     optional ("up"/linear projection)
    fc3_experts_bias     [E, I]        optional
    output               same shape as input

I is derived from fc2 (``I = fc2.shape[2]``). onnxruntime 1.32 also *accepts* the
legacy layout (fc1 [E, H, I], fc2 [E, I, H]) when both tensors use it, but its
CPU kernel then reinterprets the raw memory with new-layout strides, which is
not a meaningful computation; this oracle rejects legacy shapes instead.

Routing (``use_sparse_mixer=0``), per token::

    p      = softmax(router_probs[t])              # float32, max-subtracted
    top    = the k largest p; ties go to the HIGHER expert index
             (ORT sorts (p, index) pairs in descending order)
    w      = p[top]                                 normalize_routing_weights != 1
    w      = p[top] / sum(p[top])                   normalize_routing_weights == 1
    y[t]   = sum over j with w[j] > 0 of w[j] * expert_{top[j]}(x[t])

Only the value 1 turns normalisation on (ORT tests ``== 1``). Routes whose
weight is exactly 0 (softmax underflow) are skipped, so a non-finite expert
output cannot leak through a zero weight. ``1 <= k <= E`` is required.

Expert FFN::

    f1 = x @ fc1[e].T + fc1_b[e]
    h  = act(f1)                                   non-gated
    y  = h @ fc2[e].T + fc2_b[e]

Activations (``activation_type``)::

    relu      max(v, 0)
    gelu      tanh approximation: 0.5 v (1 + tanh(0.7978845608 (v + 0.044715 v^3)))
              (NOT the exact erf form; the difference is ~2e-4 and was measured)
    silu      v * sigmoid(v)
    identity  v
    swiglu    gated, see below
    relu2     max(v, 0)^2                  (CUDA-only in ORT)
    geglu     gelu_tanh(g) * l             (CUDA-only in ORT; fused fc1 only)

SwiGLU (the GPT-OSS clamped form)::

    G = min(g, limit);  L = clip(l, -limit, limit)      (no clamp if limit unset)
    h = G * sigmoid(alpha * G) * (L + beta)

with defaults ``activation_alpha = 1.0``, ``activation_beta = 0.0`` and
``swiglu_limit`` unset (= +inf, no clamping). GPT-OSS uses alpha=1.702,
beta=1.0, limit=7.0. alpha/beta/limit are ignored by every other activation.
Where g ("gate") and l ("linear"/"up") come from is set by ``swiglu_fusion``:

    1  fc1 output interleaved per row: g = f1[0::2], l = f1[1::2]
    2  fc1 output concatenated:        g = f1[:I],   l = f1[I:]
    0  separate projections:           g = f1 (fc1), l = x @ fc3[e].T + fc3_b[e]
       If fc3 is absent, 0 is read as 1 (the backward-compatibility rule of
       ORT's CUDA kernel for gpt-oss exports that omitted the attribute).

``swiglu_fusion`` is ignored for non-gated activations. When fc3 is given with a
non-swiglu activation, the expert is gated the Mixtral way:
``h = act(f1) * (x @ fc3[e].T + fc3_b[e])`` (silu + fc3 is Mixtral's
``w2(silu(w1 x) * w3 x)``; ORT's CUDA kernel maps exactly that case onto its
SwiGLU kernel).

Sparse mixer (``use_sparse_mixer=1``, Phi-3.5-MoE "sparsemixer", requires k=2),
on the raw logits ``s = router_probs[t]`` with ``eps = 0.01``, transcribed from
ORT's CUDA ``sparse_mixer_top2`` kernel::

    i0 = argmax(s)  (ties: lowest index),  m0 = s[i0]
    mask0[j] = (m0 - s[j]) > 2 eps max(|s[j]|, m0)
    w0 = exp(s[i0] - m0) / sum_{j not mask0} exp(s[j] - m0)
    i1 = argmax over j != i0,  m1 = s[i1]
    mask1[j] = (m1 - s[j]) > 2 eps max(|s[j]|, m1),  mask1[i0] = True
    w1 = exp(s[i1] - m1) / sum_{j not mask1} exp(s[j] - m1)

``normalize_routing_weights`` is ignored on this path (as on CUDA).

What was checked against onnxruntime 1.32.0 (CPU) and what was not
===================================================================

Cross-checked numerically against the ORT 1.32 CPU kernel (see
tests/unit/test_reference_ms_moe.py): the weight layouts above, softmax top-k
routing with both normalisation settings, the higher-index tie-break, skipping
of zero-weight routes, relu / gelu (tanh) / silu / identity, swiglu with
``swiglu_fusion=1`` (gate at even columns) including alpha, beta and limit and
their defaults, optional biases, 2-D and 3-D inputs.

ORT 1.32's CPU kernel cannot run the following, so they follow the schema text
and ORT's CUDA sources only (and are checked against a naive loop in the tests,
plus weight-permutation identities that tie them back to the ORT-checked
``swiglu_fusion=1`` path): ``swiglu_fusion`` 0 with fc3 and 2 (CPU throws "CPU
MoE only supports interleaved SwiGLU format"), any fc3 input (CPU: "FC3 is not
implemented for CPU MoE"), relu2 and geglu (CUDA-only activation types).

``use_sparse_mixer=1`` is a deliberate divergence: ORT 1.32's CPU kernel only
checks k == 2 and then silently ignores the flag (plain softmax top-2), whereas
this oracle implements the documented sparsemixer routing that ORT's CUDA
kernel runs. Unlike CUDA, any expert count is accepted (CUDA allows 8 or 16).
The CUDA-only ``swiglu_limit_after_activation=1`` is not implemented.

Only float32 has been checked; other float inputs are computed in float32 and
cast back to the input dtype.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "SPARSE_MIXER_JITTER_EPS",
    "ms_moe",
    "ms_moe_routing",
]

#: Every ``activation_type`` string this oracle accepts.
ACTIVATIONS = ("relu", "gelu", "silu", "identity", "swiglu", "relu2", "geglu")
#: Activations whose fc1 projection produces both a gate and a linear half.
GATED_ACTIVATIONS = ("swiglu", "geglu")
#: Jitter epsilon hard-coded in ORT's CUDA sparse_mixer_top2 kernel.
SPARSE_MIXER_JITTER_EPS = 0.01

_GELU_TANH_C = np.float32(0.7978845608)  # sqrt(2 / pi), as written in ORT's moe_utils.cc
_GELU_TANH_A = np.float32(0.044715)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    """Overflow-free float32 logistic function (same split as ORT's swiglu code)."""
    with np.errstate(over="ignore"):
        e_neg = np.exp(-np.abs(v))
    return np.where(v >= 0, 1.0 / (1.0 + e_neg), e_neg / (1.0 + e_neg)).astype(np.float32)


def _gelu_tanh(v: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation, which is what ORT's CPU MoE kernel computes."""
    return (np.float32(0.5) * v * (1 + np.tanh(_GELU_TANH_C * (v + _GELU_TANH_A * v * v * v)))).astype(
        np.float32
    )


def _pointwise(activation_type: str, v: np.ndarray) -> np.ndarray:
    """Apply a non-gated activation elementwise."""
    if activation_type == "relu":
        return np.maximum(v, np.float32(0))
    if activation_type == "gelu":
        return _gelu_tanh(v)
    if activation_type == "silu":
        return v * _sigmoid(v)
    if activation_type == "identity":
        return v
    if activation_type == "relu2":
        r = np.maximum(v, np.float32(0))
        return r * r
    raise ValueError(f"MoE: activation_type {activation_type!r} is not a pointwise activation")


def _swiglu(g: np.ndarray, lin: np.ndarray, alpha: float, beta: float, limit: float | None) -> np.ndarray:
    """Clamped SwiGLU: ``min(g, limit) * sigmoid(alpha * G) * (clip(l, +-limit) + beta)``."""
    if limit is not None and np.isfinite(limit):
        lim = np.float32(limit)
        g = np.minimum(g, lim)
        lin = np.clip(lin, -lim, lim)
    return g * _sigmoid(np.float32(alpha) * g) * (lin + np.float32(beta))


def _softmax_topk(logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over experts, then the k largest probabilities (ties -> higher index)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    ex = np.exp(shifted)
    probs = ex / ex.sum(axis=1, keepdims=True)
    num_experts = probs.shape[1]
    # Stable descending sort of the column-reversed array puts the higher
    # original index first among equal probabilities, matching ORT's
    # std::partial_sort of (prob, index) pairs with std::greater.
    order = np.argsort(-probs[:, ::-1], axis=1, kind="stable")[:, :k]
    experts = (num_experts - 1 - order).astype(np.int64)
    weights = np.take_along_axis(probs, experts, axis=1)
    if normalize:
        weights = weights / weights.sum(axis=1, keepdims=True)
    return experts, weights.astype(np.float32)


def _sparse_mixer_top2(logits: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Phi-3.5-MoE sparsemixer top-2 routing on raw logits (see module docstring)."""
    num_tokens = logits.shape[0]
    rows = np.arange(num_tokens)
    two_eps = np.float32(2.0 * eps)
    experts = np.zeros((num_tokens, 2), dtype=np.int64)
    weights = np.zeros((num_tokens, 2), dtype=np.float32)
    excluded = np.zeros(logits.shape, dtype=bool)
    for slot in range(2):
        candidates = np.where(excluded, -np.inf, logits)
        top = np.argmax(candidates, axis=1)  # first maximum: lowest index on ties
        top_val = logits[rows, top][:, None]
        factor = np.maximum(np.abs(logits), top_val)
        mask = (top_val - logits) > two_eps * factor
        mask |= excluded
        with np.errstate(over="ignore"):
            ex = np.where(mask, np.float32(0), np.exp(logits - top_val))
        weights[:, slot] = ex[rows, top] / ex.sum(axis=1)
        experts[:, slot] = top
        excluded = excluded.copy()
        excluded[rows, top] = True
    return experts, weights


def ms_moe_routing(
    router_probs: np.ndarray,
    *,
    k: int = 1,
    normalize_routing_weights: int = 0,
    use_sparse_mixer: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(experts [T, k] int64, weights [T, k] float32)`` chosen by the MoE router.

    ``experts[t]`` lists the selected experts best-first; routes with weight 0
    are still listed here (``ms_moe`` skips them). Exposed separately so that
    routing can be tested and reused on its own.
    """
    logits = np.asarray(router_probs, dtype=np.float32)
    if logits.ndim != 2:
        raise ValueError(f"MoE: router_probs must be 2-D [tokens, experts], got shape {logits.shape}")
    num_experts = logits.shape[1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"MoE: attribute k must satisfy 1 <= k <= num_experts ({num_experts}), got k={k}")
    if use_sparse_mixer == 1:
        if k != 2:
            raise ValueError(f"MoE: use_sparse_mixer=1 only supports k=2, got k={k}")
        return _sparse_mixer_top2(logits, SPARSE_MIXER_JITTER_EPS)
    return _softmax_topk(logits, k, normalize_routing_weights == 1)


def _check_shape(name: str, arr: np.ndarray | None, expected: tuple[int, ...]) -> None:
    """Raise ValueError naming the input when ``arr`` is present and mis-shaped."""
    if arr is not None and tuple(arr.shape) != expected:
        raise ValueError(f"MoE: {name} must have shape {list(expected)}, got {list(arr.shape)}")


def ms_moe(
    x: np.ndarray,
    router_probs: np.ndarray,
    fc1_w: np.ndarray,
    fc1_b: np.ndarray | None,
    fc2_w: np.ndarray,
    fc2_b: np.ndarray | None,
    fc3_w: np.ndarray | None,
    fc3_b: np.ndarray | None,
    *,
    activation_type: str = "relu",
    k: int = 1,
    normalize_routing_weights: int = 0,
    swiglu_fusion: int = 0,
    activation_alpha: float = 1.0,
    activation_beta: float = 0.0,
    swiglu_limit: float | None = None,
    use_sparse_mixer: int = 0,
) -> np.ndarray:
    """Compute ``com.microsoft::MoE`` exactly as documented in this module's docstring.

    Arguments mirror the op's eight inputs (None for an omitted optional input)
    and its attributes, with the op's defaults; ``swiglu_limit=None`` (or +inf)
    means "attribute not set", i.e. no clamping. Raises ValueError for shapes or
    attribute combinations the op rejects or that have no defined meaning.
    Returns an array with ``x``'s shape and dtype.
    """
    if isinstance(activation_type, bytes):
        activation_type = activation_type.decode()
    if activation_type not in ACTIVATIONS:
        raise ValueError(
            f"MoE: unsupported activation_type {activation_type!r}; expected one of {ACTIVATIONS}"
        )
    x = np.asarray(x)
    if x.ndim not in (2, 3):
        raise ValueError(
            f"MoE: input must be 2-D [tokens, hidden] or 3-D [batch, seq, hidden], got {x.shape}"
        )
    hidden = x.shape[-1]
    xt = x.reshape(-1, hidden).astype(np.float32)
    num_tokens = xt.shape[0]

    fc1_w, fc1_b, fc2_w, fc2_b, fc3_w, fc3_b = (
        None if a is None else np.asarray(a, dtype=np.float32)
        for a in (fc1_w, fc1_b, fc2_w, fc2_b, fc3_w, fc3_b)
    )
    logits = np.asarray(router_probs, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] != num_tokens:
        raise ValueError(
            f"MoE: router_probs must be 2-D [{num_tokens}, num_experts] (a row per token), got {logits.shape}"
        )
    num_experts = logits.shape[1]

    # --- validate shapes (fc2 fixes inter_size) ---------------------------------
    if fc2_w.ndim != 3 or fc2_w.shape[0] != num_experts or fc2_w.shape[1] != hidden:
        raise ValueError(
            f"MoE: fc2_experts_weights must have shape [{num_experts}, {hidden}, inter_size], "
            f"got {list(fc2_w.shape)} (the legacy [E, inter, hidden] layout is not supported)"
        )
    inter = fc2_w.shape[2]
    gated_fc1 = activation_type in GATED_ACTIVATIONS and fc3_w is None
    width = 2 * inter if gated_fc1 else inter
    _check_shape("fc1_experts_weights", fc1_w, (num_experts, width, hidden))
    _check_shape("fc1_experts_bias", fc1_b, (num_experts, width))
    _check_shape("fc2_experts_bias", fc2_b, (num_experts, hidden))
    _check_shape("fc3_experts_weights", fc3_w, (num_experts, inter, hidden))
    _check_shape("fc3_experts_bias", fc3_b, (num_experts, inter))
    if fc3_b is not None and fc3_w is None:
        raise ValueError("MoE: fc3_experts_bias is given without fc3_experts_weights")
    if activation_type in GATED_ACTIVATIONS:
        if swiglu_fusion not in (0, 1, 2):
            raise ValueError(f"MoE: swiglu_fusion must be 0, 1 or 2, got {swiglu_fusion}")
        if fc3_w is not None and swiglu_fusion != 0:
            raise ValueError(f"MoE: fc3_experts_weights requires swiglu_fusion=0, got {swiglu_fusion}")
        if activation_type == "geglu" and (fc3_w is not None or swiglu_fusion == 0):
            raise ValueError("MoE: geglu needs fused fc1 weights (swiglu_fusion 1 or 2) and no fc3 inputs")
    # fusion 0 without fc3 = legacy interleaved export (ORT CUDA's compatibility rule).
    fusion = 1 if (gated_fc1 and swiglu_fusion == 0) else swiglu_fusion

    experts, weights = ms_moe_routing(
        logits, k=k, normalize_routing_weights=normalize_routing_weights, use_sparse_mixer=use_sparse_mixer
    )

    out = np.zeros((num_tokens, hidden), dtype=np.float32)
    for e in np.unique(experts):
        hit = (experts == e) & (weights > 0)  # [T, k]; an expert appears at most once per row
        tokens = np.nonzero(hit.any(axis=1))[0]
        if tokens.size == 0:
            continue
        gate_w = (weights * hit).sum(axis=1)[tokens]
        xe = xt[tokens]
        f1 = xe @ fc1_w[e].T
        if fc1_b is not None:
            f1 = f1 + fc1_b[e]
        if fc3_w is not None:
            f3 = xe @ fc3_w[e].T
            if fc3_b is not None:
                f3 = f3 + fc3_b[e]
            if activation_type == "swiglu":
                h = _swiglu(f1, f3, activation_alpha, activation_beta, swiglu_limit)
            else:
                h = _pointwise(activation_type, f1) * f3
        elif gated_fc1:
            g, lin = (f1[:, 0::2], f1[:, 1::2]) if fusion == 1 else (f1[:, :inter], f1[:, inter:])
            if activation_type == "swiglu":
                h = _swiglu(g, lin, activation_alpha, activation_beta, swiglu_limit)
            else:
                h = _gelu_tanh(g) * lin
        else:
            h = _pointwise(activation_type, f1)
        y = h.astype(np.float32) @ fc2_w[e].T
        if fc2_b is not None:
            y = y + fc2_b[e]
        out[tokens] += gate_w[:, None] * y
    return out.reshape(x.shape).astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)
