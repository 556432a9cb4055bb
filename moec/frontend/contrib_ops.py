"""Relax converters for onnxruntime's transformer contrib ops, which TVM's ONNX frontend lacks.

transformers' exporter with ``ort_fusions`` writes them into whole decoders:
``SimplifiedLayerNormalization`` (RMSNorm, in the *default* domain as onnxruntime registers it),
``com.microsoft::SkipSimplifiedLayerNormalization`` (residual add + RMSNorm),
``com.microsoft::SkipLayerNormalization`` (residual add + LayerNorm), ``com.microsoft::FusedMatMul``
(matmul with transposes and a scale), ``com.microsoft::RotaryEmbedding`` and
``com.microsoft::MultiHeadAttention``. Semantics follow
onnxruntime's ``docs/ContribOperators.md``; :mod:`moec.reference.contrib` is the independent
numpy version the tests compare against. Forms these converters do not implement raise
:class:`MoecError` naming the node's op and the attribute or input at fault.

Each converter takes ``(bb, inputs, attrs)`` like TVM's own (``inputs[i]`` is None for an
omitted optional input; ``attrs["tvm_custom"]["num_outputs"]`` the node's output count) and
returns a Relax expression, or a ``relax.Tuple`` for several outputs.
"""

from __future__ import annotations

from collections.abc import Callable

from tvm import relax

from moec.errors import MoecError

MS_DOMAIN = "com.microsoft"


def _shape(bb: relax.BlockBuilder, x: relax.Expr) -> list:
    return list(bb.normalize(x).ty.shape)


def _slice_last(x: relax.Expr, ndim: int, begin, end) -> relax.Expr:
    return relax.op.strided_slice(x, axes=[ndim - 1], begin=[begin], end=[end])


def _rms_norm(bb: relax.BlockBuilder, x: relax.Expr, scale: relax.Expr, epsilon: float, axis: int):
    ndim = len(_shape(bb, x))
    axes = list(range(axis % ndim, ndim))
    x32 = bb.emit(relax.op.astype(x, "float32"))
    mean_square = relax.op.mean(relax.op.multiply(x32, x32), axis=axes, keepdims=True)
    inv_std = bb.emit(relax.op.rsqrt(relax.op.add(mean_square, relax.const(epsilon, "float32"))))
    dtype = bb.normalize(x).ty.dtype
    out = relax.op.astype(relax.op.multiply(relax.op.multiply(x32, inv_std), scale), dtype)
    return out, inv_std


def simplified_layer_norm(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """Y = X / sqrt(mean(X², axes axis..) + epsilon) * scale; output 1: the inverse std."""
    if attrs.get("stash_type", 1) != 1:
        raise MoecError("SimplifiedLayerNormalization: only stash_type=1 (float32) is supported")
    out, inv_std = _rms_norm(
        bb, inputs[0], inputs[1], float(attrs.get("epsilon", 1e-5)), attrs.get("axis", -1)
    )
    if attrs["tvm_custom"]["num_outputs"] > 1:
        return relax.Tuple([bb.emit(out), inv_std])
    return out


def skip_simplified_layer_norm(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """(RMSNorm(input + skip + bias) * gamma, mean, inverse std, input + skip + bias)."""
    x, skip, gamma, *rest = inputs
    bias = rest[0] if rest else None
    total = relax.op.add(x, skip)
    if bias is not None:
        total = relax.op.add(total, bias)
    total = bb.emit(total)
    out, inv_std = _rms_norm(bb, total, gamma, float(attrs.get("epsilon", 1e-5)), -1)
    if attrs["tvm_custom"]["num_outputs"] == 1:
        return out
    mean = bb.emit(relax.op.mean(relax.op.astype(total, "float32"), axis=[-1], keepdims=True))
    return relax.Tuple([bb.emit(out), mean, inv_std, total])


def skip_layer_norm(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """(LayerNorm(input + skip + bias) * gamma + beta, mean, inverse std, input + skip + bias)."""
    x, skip, gamma, *rest = inputs
    beta, bias = (rest + [None, None])[:2]
    total = relax.op.add(x, skip)
    if bias is not None:
        total = relax.op.add(total, bias)
    total = bb.emit(total)
    t32 = bb.emit(relax.op.astype(total, "float32"))
    mean = bb.emit(relax.op.mean(t32, axis=[-1], keepdims=True))
    centred = bb.emit(relax.op.subtract(t32, mean))
    variance = relax.op.mean(relax.op.multiply(centred, centred), axis=[-1], keepdims=True)
    epsilon = relax.const(float(attrs.get("epsilon", 1e-5)), "float32")
    inv_std = bb.emit(relax.op.rsqrt(relax.op.add(variance, epsilon)))
    out = relax.op.multiply(relax.op.multiply(centred, inv_std), gamma)
    if beta is not None:
        out = relax.op.add(out, beta)
    out = relax.op.astype(out, bb.normalize(x).ty.dtype)
    if attrs["tvm_custom"]["num_outputs"] == 1:
        return out
    return relax.Tuple([bb.emit(out), mean, inv_std, total])


def fused_matmul(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """``alpha * op(A) @ op(B)``: ``transA``/``transB`` swap the last two axes."""
    if attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
        raise MoecError(
            "FusedMatMul: transBatchA/transBatchB are not supported; re-export without ORT fusions"
        )
    a, b = inputs[:2]
    for flag, operand in (("transA", 0), ("transB", 1)):
        if attrs.get(flag, 0):
            value = (a, b)[operand]
            ndim = len(_shape(bb, value))
            axes = list(range(ndim - 2)) + [ndim - 1, ndim - 2]
            swapped = bb.emit(relax.op.permute_dims(value, axes))
            a, b = (swapped, b) if operand == 0 else (a, swapped)
    product = relax.op.matmul(a, b)
    alpha = float(attrs.get("alpha", 1.0))
    if alpha == 1.0:
        return product
    return relax.op.multiply(bb.emit(product), relax.const(alpha, bb.normalize(a).ty.dtype))


def rotary_embedding(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """RoPE on ``[B, S, N*H]`` or ``[B, N, S, H]`` with position ids ``[B, S]`` or a start offset ``[1]``."""
    x, position_ids, cos_cache, sin_cache = inputs[:4]
    if attrs.get("is_packed_batching", 0):
        raise MoecError("com.microsoft::RotaryEmbedding: is_packed_batching=1 is not supported")
    interleaved = attrs.get("interleaved", 0)
    num_heads = attrs.get("num_heads", 0)
    rotary_dim = attrs.get("rotary_embedding_dim", 0)
    shape = _shape(bb, x)
    half = int(_shape(bb, cos_cache)[1])
    if len(shape) == 3:
        batch, seq, hidden = shape
        if num_heads:
            head = int(hidden) // num_heads
        elif rotary_dim:
            raise MoecError(
                "com.microsoft::RotaryEmbedding: rotary_embedding_dim on 3-D input needs num_heads"
            )
        else:
            head = 2 * half
        heads = bb.emit(relax.op.reshape(x, (batch, seq, int(hidden) // head, head)))  # [B, S, N, H]
        seq_axis = 1
    elif len(shape) == 4:
        batch, _, seq, head = shape
        head = int(head)
        heads = x  # [B, N, S, H]
        seq_axis = 2
    else:
        raise MoecError(f"com.microsoft::RotaryEmbedding: input must be 3-D or 4-D, got rank {len(shape)}")
    rot = rotary_dim or head
    if rot != 2 * half:
        raise MoecError(
            f"com.microsoft::RotaryEmbedding: cos_cache has {half} columns for a rotary dim of {rot}"
        )

    pos_shape = _shape(bb, position_ids)
    if len(pos_shape) == 1:  # a start offset: positions offset + [0, S)
        steps = relax.op.arange(0, seq, 1, "int64")
        positions = relax.op.add(relax.op.astype(position_ids, "int64"), steps)
        positions = relax.op.broadcast_to(relax.op.expand_dims(positions, 0), relax.ShapeExpr([batch, seq]))
    else:
        positions = relax.op.reshape(position_ids, (batch, seq))
    positions = bb.emit(positions)
    # [B, S, 1, R/2] next to [B, S, N, H]; [B, 1, S, R/2] next to [B, N, S, H].
    cos = bb.emit(relax.op.expand_dims(relax.op.take(cos_cache, positions, axis=0), 3 - seq_axis))
    sin = bb.emit(relax.op.expand_dims(relax.op.take(sin_cache, positions, axis=0), 3 - seq_axis))

    rotated = bb.emit(_slice_last(heads, 4, 0, rot))
    if interleaved:
        pairs = bb.emit(relax.op.reshape(rotated, (*_shape(bb, rotated)[:3], half, 2)))
        halves = (*_shape(bb, rotated)[:3], half)
        x1 = relax.op.reshape(_slice_last(pairs, 5, 0, 1), halves)
        x2 = relax.op.reshape(_slice_last(pairs, 5, 1, 2), halves)
    else:
        x1, x2 = _slice_last(rotated, 4, 0, half), _slice_last(rotated, 4, half, rot)
    x1, x2 = bb.emit(x1), bb.emit(x2)
    out1 = relax.op.subtract(relax.op.multiply(x1, cos), relax.op.multiply(x2, sin))
    out2 = relax.op.add(relax.op.multiply(x2, cos), relax.op.multiply(x1, sin))
    if interleaved:
        out = relax.op.reshape(
            relax.op.concat([relax.op.expand_dims(out1, 4), relax.op.expand_dims(out2, 4)], axis=4),
            _shape(bb, rotated),
        )
    else:
        out = relax.op.concat([out1, out2], axis=3)
    if rot < head:
        out = relax.op.concat([out, _slice_last(heads, 4, rot, head)], axis=3)
    return relax.op.reshape(out, shape) if len(shape) == 3 else out


def _split_heads(bb: relax.BlockBuilder, x: relax.Expr, num_heads: int, what: str) -> relax.Expr:
    """``[B, L, N*H]`` → ``[B, N, L, H]``; a 4-D ``[B, N, L, H]`` stays."""
    shape = _shape(bb, x)
    if len(shape) == 4:
        return x
    if len(shape) != 3:
        raise MoecError(f"com.microsoft::MultiHeadAttention: {what} of rank {len(shape)} is not supported")
    batch, length, hidden = shape
    heads = relax.op.reshape(x, (batch, length, num_heads, int(hidden) // num_heads))
    return bb.emit(relax.op.permute_dims(heads, [0, 2, 1, 3]))


def multi_head_attention(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """softmax(Q Kᵀ · scale + attention_bias) V per head; outputs [B, S, N*Hv] (+ present K, V)."""
    inputs = list(inputs) + [None] * (10 - len(inputs))
    query, key, value, bias, key_padding_mask, attention_bias, past_key, past_value = inputs[:8]
    num_heads = attrs["num_heads"]
    for index, name in ((4, "key_padding_mask"), (8, "past_sequence_length"), (9, "cache_indirection")):
        if inputs[index] is not None:
            raise MoecError(f"com.microsoft::MultiHeadAttention: input {name} is not supported")
    if attrs.get("unidirectional", 0):
        raise MoecError("com.microsoft::MultiHeadAttention: unidirectional=1 is not supported")
    if key is None or value is None or len(_shape(bb, query)) != 3:
        raise MoecError("com.microsoft::MultiHeadAttention: packed QKV / KV inputs are not supported")
    del key_padding_mask
    if bias is not None:
        if len(_shape(bb, key)) != 3 or len(_shape(bb, value)) != 3:
            raise MoecError("com.microsoft::MultiHeadAttention: bias with 4-D key/value is not supported")
        d, dk, dv = (int(_shape(bb, t)[-1]) for t in (query, key, value))
        query = relax.op.add(query, relax.op.strided_slice(bias, [0], [0], [d]))
        key = relax.op.add(key, relax.op.strided_slice(bias, [0], [d], [d + dk]))
        value = relax.op.add(value, relax.op.strided_slice(bias, [0], [d + dk], [d + dk + dv]))
    q = _split_heads(bb, query, num_heads, "query")
    k = _split_heads(bb, key, num_heads, "key")
    v = _split_heads(bb, value, num_heads, "value")
    if past_key is not None:
        k = bb.emit(relax.op.concat([past_key, k], axis=2))
    if past_value is not None:
        v = bb.emit(relax.op.concat([past_value, v], axis=2))
    head = int(_shape(bb, q)[-1])
    scale = attrs.get("scale") or 1.0 / head**0.5
    scores = relax.op.multiply(
        relax.op.matmul(q, relax.op.permute_dims(k, [0, 1, 3, 2])), relax.const(scale, "float32")
    )
    if attention_bias is not None:
        scores = relax.op.add(scores, attention_bias)
    probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
    out = bb.emit(relax.op.permute_dims(relax.op.matmul(probs, v), [0, 2, 1, 3]))  # [B, S, N, Hv]
    batch, seq, heads, head_v = _shape(bb, out)
    out = relax.op.reshape(out, (batch, seq, heads * head_v))
    if attrs["tvm_custom"]["num_outputs"] > 1:
        return relax.Tuple([bb.emit(out), k, v][: attrs["tvm_custom"]["num_outputs"]])
    return out


Converter = Callable[[relax.BlockBuilder, list, dict], relax.Expr]

#: (domain, op type) → converter. SimplifiedLayerNormalization is registered by onnxruntime in
#: the default domain; accept it in com.microsoft too.
CONVERTERS: dict[tuple[str, str], Converter] = {
    ("", "SimplifiedLayerNormalization"): simplified_layer_norm,
    (MS_DOMAIN, "SimplifiedLayerNormalization"): simplified_layer_norm,
    (MS_DOMAIN, "SkipSimplifiedLayerNormalization"): skip_simplified_layer_norm,
    (MS_DOMAIN, "SkipLayerNormalization"): skip_layer_norm,
    (MS_DOMAIN, "FusedMatMul"): fused_matmul,
    (MS_DOMAIN, "RotaryEmbedding"): rotary_embedding,
    (MS_DOMAIN, "MultiHeadAttention"): multi_head_attention,
}


def converter(domain: str, op_type: str) -> Converter | None:
    """The converter of a node's op, if moec has one."""
    return CONVERTERS.get(("" if domain == "ai.onnx" else domain, op_type))
