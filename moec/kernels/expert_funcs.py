"""The expert kernels' PrimFunc signatures, shared by their row form (:mod:`moec.kernels.expert_ffn`)
and their panel form (:mod:`moec.kernels.expert_panels`).

Each kernel is declared once in TVMScript with every format's buffers (:mod:`moec.kernels.formats`)
and the token-sized buffers matched; its body is the form's macro ``body(buffers, quantized,
offset, n)``, where ``quantized`` holds the kernel's input rows quantized to INT8 when some
expert is int8-dot (:func:`moec.kernels.int8_dot.with_quantized_rows`), else ``()``.
:func:`signature_params` then keeps only the parameters the config's signature lists.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder

from moec.kernels.backend import Backend
from moec.kernels.config import ExpertConfig, ExpertDownConfig, ExpertUpConfig, KernelConfig
from moec.kernels.formats import FORMATS, WeightFormat
from moec.kernels.int8_dot import with_quantized_rows


def role_params(role: str) -> list[str]:
    """Every parameter a kernel declares for ``role``'s matrices: one per format of
    :data:`FORMATS`, and the int8 scales (:func:`signature_params` keeps those the config uses)."""
    names = []
    for name in FORMATS:
        fmt = WeightFormat(name)
        names += [fmt.matrix_name(role)] + ([fmt.scale_name(role)] if fmt.scaled else [])
    return names


def format_shapes(config: ExpertConfig, rows: int, columns: int) -> list[tuple]:
    """The shapes of ``role_params``' buffers of a ``rows × columns`` matrix (a format no expert
    uses gets a one-expert shape: its parameters are dropped)."""
    formats = config.expert_formats
    shapes = []
    for name in FORMATS:
        fmt = WeightFormat(name, config.int8_group)
        count = max(1, formats.count(name))
        shapes.append(config.matrix_shape(rows, columns, count, fmt))
        if fmt.scaled:
            shapes.append(fmt.scale_shape(count, config.scale_rows(rows), columns))
    return shapes


def signature_params(func: tirx.PrimFunc, declared: list[str], config: KernelConfig) -> tirx.PrimFunc:
    """``func`` (whose TVMScript declared the parameters ``declared``) with only the parameters of
    ``config``'s signature: one TVMScript source serves signatures that differ by optional inputs
    (the gate of ungated experts, formats no expert uses), which the body never touches.

    The parameters get their declared names back: TVMScript renames a buffer after the last name
    a macro bound it to (a kernel passes each format's buffers around in tuples).
    """
    rows = tuple(tirx.Var(f"rows{i}", "int64") for i in range(config.row_dims))
    wanted = {spec.name for spec in config.signature(rows)}
    params = []
    for param, name in zip(func.params, declared, strict=True):
        IRBuilder.name(name, param)
        if name in wanted:
            params.append(param)
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


def expert_up_func(config: ExpertUpConfig, backend: Backend, body) -> tirx.PrimFunc:
    """``expert_up``: the signature of :meth:`ExpertUpConfig.signature` around ``body(buffers,
    quantized, offset, n)``, ``buffers = (x, b_up, b_gate, token, inter, by_format)``
    (``by_format``: per format of :data:`FORMATS`, ``(w_up, its scales, w_gate, its scales)``;
    ``quantized``: the token rows ``x`` in INT8)."""
    c = config
    E, H, F, K = c.num_experts, c.hidden, c.ffn, c.top_k
    M32, M16, M8, S8, MD, SD = format_shapes(c, F, H)
    run = with_quantized_rows(backend, H, c.int8_group, c.int8_dot if c.has_dot else None, body)

    @T.prim_func
    def expert_up(
        x_h: T.handle,
        w_up: T.Buffer(M32, "float32"),
        w_up_fp16: T.Buffer(M16, "float16"),
        w_up_int8: T.Buffer(M8, "int8"),
        w_up_int8_scale: T.Buffer(S8, "float32"),
        w_up_int8_dot: T.Buffer(MD, "int8"),
        w_up_int8_dot_scale: T.Buffer(SD, "float32"),
        b_up: T.Buffer((E, F), "float32"),
        w_gate: T.Buffer(M32, "float32"),
        w_gate_fp16: T.Buffer(M16, "float16"),
        w_gate_int8: T.Buffer(M8, "int8"),
        w_gate_int8_scale: T.Buffer(S8, "float32"),
        w_gate_int8_dot: T.Buffer(MD, "int8"),
        w_gate_int8_dot_scale: T.Buffer(SD, "float32"),
        b_gate: T.Buffer((E, F), "float32"),
        offset: T.Buffer((E + 1,), "int32"),
        token_h: T.handle,
        inter_h: T.handle,
    ):
        T.func_attr(backend.attrs)
        n = T.int64()
        x = T.match_buffer(x_h, (n, H), "float32")
        token = T.match_buffer(token_h, (n * K,), "int32")
        inter = T.match_buffer(inter_h, (n * K, F), "float32")
        by_format = (
            (w_up, w_up, w_gate, w_gate),
            (w_up_fp16, w_up_fp16, w_gate_fp16, w_gate_fp16),
            (w_up_int8, w_up_int8_scale, w_gate_int8, w_gate_int8_scale),
            (w_up_int8_dot, w_up_int8_dot_scale, w_gate_int8_dot, w_gate_int8_dot_scale),
        )
        run(x, n, (x, b_up, b_gate, token, inter, by_format), offset, n)

    declared = [
        "x",
        *role_params("w_up"),
        "b_up",
        *role_params("w_gate"),
        "b_gate",
        "offset",
        "token",
        "inter",
    ]
    return signature_params(expert_up, declared, c)


def expert_down_func(config: ExpertDownConfig, backend: Backend, body) -> tirx.PrimFunc:
    """``expert_down``: the signature of :meth:`ExpertDownConfig.signature` around ``body(buffers,
    quantized, offset, n)``, ``buffers = (inter, b_down, token, gain, y, by_format)``
    (``by_format``: per format, ``(w_down, its scales)``; ``quantized``: the pairs' rows
    ``inter`` in INT8)."""
    c = config
    E, H, F, K = c.num_experts, c.hidden, c.ffn, c.top_k
    M32, M16, M8, S8, MD, SD = format_shapes(c, H, F)
    run = with_quantized_rows(backend, F, c.int8_group, c.int8_dot if c.has_dot else None, body)

    @T.prim_func
    def expert_down(
        inter_h: T.handle,
        w_down: T.Buffer(M32, "float32"),
        w_down_fp16: T.Buffer(M16, "float16"),
        w_down_int8: T.Buffer(M8, "int8"),
        w_down_int8_scale: T.Buffer(S8, "float32"),
        w_down_int8_dot: T.Buffer(MD, "int8"),
        w_down_int8_dot_scale: T.Buffer(SD, "float32"),
        b_down: T.Buffer((E, H), "float32"),
        offset: T.Buffer((E + 1,), "int32"),
        token_h: T.handle,
        gain_h: T.handle,
        y_h: T.handle,
    ):
        T.func_attr(backend.attrs)
        n = T.int64()
        inter = T.match_buffer(inter_h, (n * K, F), "float32")
        token = T.match_buffer(token_h, (n * K,), "int32")
        gain = T.match_buffer(gain_h, (n * K,), "float32")
        y = T.match_buffer(y_h, (n, H), "float32")
        by_format = (
            (w_down, w_down),
            (w_down_fp16, w_down_fp16),
            (w_down_int8, w_down_int8_scale),
            (w_down_int8_dot, w_down_int8_dot_scale),
        )
        run(inter, n * K, (inter, b_down, token, gain, y, by_format), offset, n)

    declared = ["inter", *role_params("w_down"), "b_down", "offset", "token", "gain", "y"]
    return signature_params(expert_down, declared, c)
