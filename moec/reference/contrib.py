"""onnxruntime's transformer contrib ops in numpy, for the reference evaluator.

transformers' ONNX exporter with ``ort_fusions`` writes, besides ``com.microsoft::MoE``:
``SimplifiedLayerNormalization`` (RMSNorm; onnxruntime registers it in the *default* domain),
``com.microsoft::SkipSimplifiedLayerNormalization`` (residual add + RMSNorm),
``com.microsoft::SkipLayerNormalization`` (residual add + LayerNorm), ``com.microsoft::FusedMatMul``
(matmul with transposes and a scale), ``com.microsoft::RotaryEmbedding`` and
``com.microsoft::MultiHeadAttention``. These follow
onnxruntime's operator specs (``docs/ContribOperators.md``) and its CPU kernels, written
independently of moec's Relax converters (``moec.frontend.contrib_ops``), which they check.
Arithmetic is float32 throughout (``stash_type=1``), the other values are refused.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

MS_DOMAIN = "com.microsoft"


def rms_norm(
    x: np.ndarray, scale: np.ndarray, epsilon: float, axis: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """``x / sqrt(mean(x², axes axis..) + epsilon) * scale`` and the inverse std (kept dims)."""
    axes = tuple(range(axis % x.ndim, x.ndim))
    x32 = x.astype(np.float32)
    inv_std = (1.0 / np.sqrt(np.mean(x32 * x32, axis=axes, keepdims=True) + np.float32(epsilon))).astype(
        np.float32
    )
    return (x32 * inv_std * scale).astype(x.dtype), inv_std


def skip_rms_norm(
    x: np.ndarray, skip: np.ndarray, gamma: np.ndarray, bias: np.ndarray | None, epsilon: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SkipSimplifiedLayerNormalization: (output, mean, inv_std_var, input + skip + bias)."""
    total = x + skip if bias is None else x + skip + bias
    out, inv_std = rms_norm(total, gamma, epsilon)
    mean = np.mean(total.astype(np.float32), axis=-1, keepdims=True)
    return out, mean, inv_std, total


def skip_layer_norm(
    x: np.ndarray,
    skip: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray | None,
    bias: np.ndarray | None,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SkipLayerNormalization: (LayerNorm(input + skip + bias) * gamma + beta, mean, inv_std_var,
    input + skip + bias), normalising over the last axis."""
    total = x + skip if bias is None else x + skip + bias
    t32 = total.astype(np.float32)
    mean = np.mean(t32, axis=-1, keepdims=True)
    inv_std = (
        1.0 / np.sqrt(np.mean((t32 - mean) ** 2, axis=-1, keepdims=True) + np.float32(epsilon))
    ).astype(np.float32)
    out = (t32 - mean) * inv_std * gamma
    if beta is not None:
        out = out + beta
    return out.astype(x.dtype), mean, inv_std, total


def fused_matmul(
    a: np.ndarray, b: np.ndarray, *, alpha: float = 1.0, trans_a: int = 0, trans_b: int = 0
) -> np.ndarray:
    """``alpha * op(A) @ op(B)``, ``op`` swapping the last two axes where asked."""
    if trans_a:
        a = np.swapaxes(a, -1, -2)
    if trans_b:
        b = np.swapaxes(b, -1, -2)
    return (np.float32(alpha) * np.matmul(a, b)).astype(a.dtype)


def rotary_embedding(
    x: np.ndarray,
    position_ids: np.ndarray,
    cos_cache: np.ndarray,
    sin_cache: np.ndarray,
    *,
    interleaved: int = 0,
    num_heads: int = 0,
    rotary_embedding_dim: int = 0,
) -> np.ndarray:
    """RoPE on ``x`` ``[B, S, N*H]`` or ``[B, N, S, H]``; ``position_ids`` ``[B, S]`` or a start
    offset ``[1]``.

    The first ``rotary_embedding_dim`` (default: the head size) entries of each head rotate,
    as halves (``interleaved=0``) or adjacent pairs (``interleaved=1``); the rest pass through.
    """
    half = cos_cache.shape[1]
    if x.ndim == 3:
        batch, seq, hidden = x.shape
        if num_heads:
            head = hidden // num_heads
        elif rotary_embedding_dim:
            raise ValueError("RotaryEmbedding: num_heads is required with rotary_embedding_dim on 3-D input")
        else:
            head = 2 * half
        heads = x.reshape(batch, seq, hidden // head, head).transpose(0, 2, 1, 3)
    elif x.ndim == 4:
        heads = x
        batch, _, seq, head = x.shape
    else:
        raise ValueError(f"RotaryEmbedding: input must be 3-D or 4-D, got {x.shape}")
    rot = rotary_embedding_dim or head
    if rot != 2 * half:
        raise ValueError(f"RotaryEmbedding: cos_cache has {half} columns for a rotary dim of {rot}")
    if position_ids.size == 1 and position_ids.ndim <= 1:
        positions = np.broadcast_to(int(position_ids.reshape(-1)[0]) + np.arange(seq), (batch, seq))
    else:
        positions = position_ids.reshape(batch, seq)
    cos = cos_cache[positions][:, None]  # [B, 1, S, R/2]
    sin = sin_cache[positions][:, None]
    rotated, passed = heads[..., :rot], heads[..., rot:]
    if interleaved:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        out = np.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rotated.shape)
    else:
        x1, x2 = rotated[..., :half], rotated[..., half:]
        out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    out = np.concatenate([out, passed], axis=-1).astype(x.dtype)
    return out.transpose(0, 2, 1, 3).reshape(x.shape) if x.ndim == 3 else out


def _heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """``[B, L, N*H]`` → ``[B, N, L, H]``; a 4-D ``[B, N, L, H]`` stays."""
    if x.ndim == 4:
        return x
    batch, length, hidden = x.shape
    return x.reshape(batch, length, num_heads, hidden // num_heads).transpose(0, 2, 1, 3)


def multi_head_attention(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    bias: np.ndarray | None = None,
    attention_bias: np.ndarray | None = None,
    past_key: np.ndarray | None = None,
    past_value: np.ndarray | None = None,
    *,
    num_heads: int,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scaled dot-product attention: (output ``[B, S, N*Hv]``, present key, present value).

    ``key``/``value`` are ``[B, L, D]`` or already split ``[B, N, L, H]``; ``bias`` adds to the
    3-D query, key and value (concatenated); ``attention_bias`` ``[B|1, N|1, S, T]`` adds to the
    scaled scores.
    """
    if query.ndim != 3:
        raise NotImplementedError("MultiHeadAttention: only a 3-D query [B, S, D] is implemented")
    if bias is not None:
        d, dk = query.shape[-1], key.shape[-1]
        if key.ndim != 3 or value.ndim != 3:
            raise NotImplementedError("MultiHeadAttention: bias with 4-D key/value is not implemented")
        query, key, value = query + bias[:d], key + bias[d : d + dk], value + bias[d + dk :]
    q, k, v = _heads(query, num_heads), _heads(key, num_heads), _heads(value, num_heads)
    if past_key is not None:
        k = np.concatenate([past_key, k], axis=2)
    if past_value is not None:
        v = np.concatenate([past_value, v], axis=2)
    scale = float(scale) if scale else 1.0 / np.sqrt(q.shape[-1])
    scores = (q.astype(np.float32) @ np.swapaxes(k, -1, -2).astype(np.float32)) * np.float32(scale)
    if attention_bias is not None:
        scores = scores + attention_bias
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = probs @ v.astype(np.float32)  # [B, N, S, Hv]
    batch, _, seq, _ = out.shape
    return out.transpose(0, 2, 1, 3).reshape(batch, seq, -1).astype(query.dtype), k, v


class SimplifiedLayerNormalization(OpRun):
    """onnxruntime's RMSNorm (registered in the default domain)."""

    op_domain = ""

    def _run(self, x, scale, *, axis=-1, epsilon=1e-5, stash_type=1):  # type: ignore[override]
        if stash_type != 1:
            raise NotImplementedError(
                "SimplifiedLayerNormalization: only stash_type=1 (float32) is implemented"
            )
        out, inv_std = rms_norm(x, scale, epsilon, axis)
        return (out, inv_std)


#: The same op where a graph names it in the ``com.microsoft`` domain (the evaluator keys ops by
#: class name and domain).
SimplifiedLayerNormalizationMs = type(
    "SimplifiedLayerNormalization", (SimplifiedLayerNormalization,), {"op_domain": MS_DOMAIN}
)


class SkipSimplifiedLayerNormalization(OpRun):
    op_domain = MS_DOMAIN

    def _run(self, x, skip, gamma, bias=None, *, epsilon=1e-5):  # type: ignore[override]
        return skip_rms_norm(x, skip, gamma, bias, epsilon)


class SkipLayerNormalization(OpRun):
    op_domain = MS_DOMAIN

    def _run(self, x, skip, gamma, beta=None, bias=None, *, epsilon=1e-5):  # type: ignore[override]
        return skip_layer_norm(x, skip, gamma, beta, bias, epsilon)


class FusedMatMul(OpRun):
    op_domain = MS_DOMAIN

    def _run(  # type: ignore[override]
        self, a, b, *, alpha=1.0, transA=0, transB=0, transBatchA=0, transBatchB=0
    ):
        if transBatchA or transBatchB:
            raise NotImplementedError("FusedMatMul: transBatchA/transBatchB are not implemented")
        return (fused_matmul(a, b, alpha=alpha, trans_a=transA, trans_b=transB),)


class RotaryEmbedding(OpRun):
    op_domain = MS_DOMAIN

    def _run(  # type: ignore[override]
        self,
        x,
        position_ids,
        cos_cache,
        sin_cache,
        *,
        interleaved=0,
        num_heads=0,
        rotary_embedding_dim=0,
        is_packed_batching=0,
        scale=1.0,
    ):
        if is_packed_batching:
            raise NotImplementedError("RotaryEmbedding: is_packed_batching=1 is not implemented")
        out = rotary_embedding(
            x,
            position_ids,
            cos_cache,
            sin_cache,
            interleaved=interleaved,
            num_heads=num_heads,
            rotary_embedding_dim=rotary_embedding_dim,
        )
        return (out,)


class MultiHeadAttention(OpRun):
    op_domain = MS_DOMAIN

    def _run(  # type: ignore[override]
        self,
        query,
        key=None,
        value=None,
        bias=None,
        key_padding_mask=None,
        attention_bias=None,
        past_key=None,
        past_value=None,
        past_sequence_length=None,
        cache_indirection=None,
        *,
        num_heads,
        mask_filter_value=-10000.0,
        scale=0.0,
        unidirectional=0,
    ):
        if key is None or value is None:
            raise NotImplementedError("MultiHeadAttention: packed QKV / KV inputs are not implemented")
        if key_padding_mask is not None or unidirectional or cache_indirection is not None:
            raise NotImplementedError(
                "MultiHeadAttention: key_padding_mask, unidirectional and cache_indirection "
                "are not implemented"
            )
        return multi_head_attention(
            query,
            key,
            value,
            bias,
            attention_bias,
            past_key,
            past_value,
            num_heads=num_heads,
            scale=scale,
        )


#: The OpRun classes :func:`moec.reference.evaluator.run_reference` registers.
CONTRIB_OPS = [
    SimplifiedLayerNormalization,
    SimplifiedLayerNormalizationMs,
    SkipSimplifiedLayerNormalization,
    SkipLayerNormalization,
    FusedMatMul,
    RotaryEmbedding,
    MultiHeadAttention,
]
