"""moec's own converters for standard ONNX ops where TVM's lose the shapes a graph needs.

Each takes ``(bb, inputs, attrs)`` like TVM's converters and returns a Relax expression, or
None to fall back to TVM's own converter (:class:`moec.frontend.lift.MoEGraphImporter`).

* ``Range`` with a run-time limit (``arange(seq_len)`` of the position ids, the causal mask):
  TVM's converter computes the element count as a tensor and reads it back into a *fresh*
  symbolic dim (``range_len``), which is unrelated to the sequence dim it came from; the
  rotary embedding ``x * cos[positions]`` then broadcasts ``seq`` against ``range_len`` and
  loses its shape (``Expand``: "'NoneType' object is not iterable"). With an integer start and
  step known at compile time and a limit that is a shape expression, the count *is* a shape
  expression: ``relax.op.arange`` infers it, and the dims stay the same variables.
* ``Reshape`` of a scalar of shape arithmetic: see :func:`reshape`.
* ``Expand`` of symbolic-shape data to a constant shape: see :func:`expand`.
* ``Squeeze`` of a shape scalar: see :func:`squeeze`.
* ``Max`` / ``Min`` of shape arithmetic: see :func:`_extremum`.
* ``Equal`` and ``CumSum`` of booleans: see :func:`equal`, :func:`cumsum`.
* ``ScatterND`` of a contiguous block of rows (torch's slice assignment): see :func:`scatter_nd`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

Converter = Callable[[relax.BlockBuilder, list, dict], "relax.Expr | None"]


def _scalar(x: relax.Expr | None):
    """An int, a ``PrimExpr`` (shape arithmetic), or None when ``x`` is a run-time tensor."""
    if x is not None and tvm.ir.is_prim_expr(x):  # shape arithmetic (e.g. Squeeze of a Shape)
        return int(x.value) if isinstance(x, tvm.tirx.IntImm) else x
    if isinstance(x, tvm.ir.GenericConst):
        value = x.value.numpy()
        return int(value.reshape(-1)[0]) if value.size == 1 and value.dtype.kind in "iu" else None
    if isinstance(x, relax.ShapeExpr) and len(x.values) == 1:
        return x.values[0]
    return None


def range_(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr | None:
    start, limit, delta = (_scalar(x) for x in inputs[:3])
    if not isinstance(start, int) or not isinstance(delta, int) or delta == 0 or limit is None:
        return None
    if isinstance(limit, int):
        return None  # constant: TVM's converter folds it
    dtype = str(inputs[0].ty.dtype) if isinstance(inputs[0].ty, relax.TensorType) else "int64"
    if dtype not in ("int64", "int32"):
        return None
    return relax.op.arange(start, limit, delta, dtype)


def reshape(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr | None:
    """``Reshape`` of a scalar of shape arithmetic (``Add(1, seq_len)`` → ``Reshape [-1]``).

    TVM's shape arithmetic turns such a scalar into a ``PrimExpr``, which its ``Reshape``
    converter cannot take ("Reshape expects the input data to be a Tensor"); to one element it
    is the shape expression ``[x]`` (what ``Slice`` and ``Concat`` of shapes accept), to a
    scalar the value itself.
    """
    data, shape = inputs[0], inputs[1] if len(inputs) > 1 else None
    if data is None or not tvm.ir.is_prim_expr(data) or not isinstance(shape, tvm.ir.GenericConst):
        return None
    target = [int(d) for d in shape.value.numpy().reshape(-1)]
    if target == []:
        return data
    if target in ([-1], [1]):
        return relax.ShapeExpr([data])
    return None


def expand(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr | None:
    """``Expand`` to a constant shape of data with symbolic dims.

    TVM's converter reads every data dim as a number on this path ("'Var' object has no
    attribute 'value'"); its path for a shape *expression* applies the same broadcasting rules
    to symbolic dims, so hand it the constant as one.
    """
    data, shape = inputs[0], inputs[1]
    if not isinstance(shape, tvm.ir.GenericConst) or not isinstance(data.ty, relax.TensorType):
        return None
    if data.ty.shape is None or all(isinstance(d, tvm.tirx.IntImm) for d in data.ty.shape):
        return None
    target = relax.ShapeExpr([int(d) for d in shape.value.numpy().reshape(-1)])
    return _get_convert_map()["Expand"].get_converter(13)(bb, [data, target], attrs, [{}, {}])


def squeeze(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr | None:
    """``Squeeze`` of a scalar of shape arithmetic (a ``PrimExpr``, e.g. ``Gather`` of a shape at
    one index) is the scalar itself; TVM's converter wants a tensor."""
    data = inputs[0]
    return data if data is not None and tvm.ir.is_prim_expr(data) else None


def _extremum(combine: Callable) -> Converter:
    def convert(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr | None:
        """``Max``/``Min`` of shape arithmetic and integer constants (a sliding window's first
        position, ``max(0, total - window)``) is shape arithmetic too; TVM's converter wants tensors."""
        scalars = [_scalar(x) for x in inputs]
        if any(v is None for v in scalars) or not any(tvm.ir.is_prim_expr(x) for x in inputs):
            return None
        result = scalars[0]
        for value in scalars[1:]:
            result = combine(result, value)
        return result

    return convert


def equal(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr | None:
    """``Equal`` of booleans (Llama 4's attention masks) compared as integers: TVM's legalisation
    emits a floating-point compare of the 1-bit values, which LLVM rejects (``fcmp oeq i1``)."""
    if not all(isinstance(x, relax.Expr) and getattr(x.ty, "dtype", None) == "bool" for x in inputs[:2]):
        return None
    return relax.op.equal(relax.op.astype(inputs[0], "int8"), relax.op.astype(inputs[1], "int8"))


def cumsum(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr | None:
    """``CumSum`` of booleans, which the TorchScript exporter writes for torch's ``cumsum`` of a
    mask (not valid ONNX: onnxruntime refuses the graph) and which TVM cannot compute: the
    running count as int64, as PyTorch computes it."""
    data = inputs[0]
    if not isinstance(data, relax.Expr) or getattr(data.ty, "dtype", None) != "bool":
        return None
    converter = _get_convert_map()["CumSum"].get_converter(14)
    return converter(bb, [bb.normalize(relax.op.astype(data, "int64")), *inputs[1:]], attrs, [{}, {}])


def scatter_nd(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr | None:
    """``ScatterND`` of a contiguous block of leading-axis rows: the rest of the data around them.

    torch's slice assignment (``k[..., :d] = k_nope``, DeepSeek-V3's attention) exports as
    ``ScatterND`` into the transposed tensor at constant indices ``[[a], [a+1], ...]``. With the
    sequence dim symbolic (``past + seq``), TVM's scatter legalisation asserts the data's and the
    updates' dims equal with ``==`` on two equal but distinct expressions, and fails. Rows
    ``a..b`` replaced are ``concat(data[:a], updates, data[b:])``: exact, and shape-safe.
    """
    data, indices, updates = inputs[:3]
    if attrs.get("reduction", "none") not in ("none", b"none") or not isinstance(
        indices, tvm.ir.GenericConst
    ):
        return None
    rows = indices.value.numpy()
    if (
        rows.ndim != 2
        or rows.shape[1] != 1
        or rows.shape[0] == 0
        or not isinstance(data.ty, relax.TensorType)
    ):
        return None
    first, count = int(rows[0, 0]), rows.shape[0]
    if first < 0 or not np.array_equal(rows[:, 0], np.arange(first, first + count)):
        return None
    extent = data.ty.shape[0] if data.ty.shape is not None else None
    if not isinstance(extent, tvm.tirx.IntImm) or first + count > int(extent):
        return None
    parts = []
    if first > 0:
        parts.append(relax.op.strided_slice(data, [0], [0], [first]))
    parts.append(updates)
    if first + count < int(extent):
        parts.append(relax.op.strided_slice(data, [0], [first + count], [int(extent)]))
    return bb.normalize(relax.op.concat(parts, axis=0)) if len(parts) > 1 else updates


#: ONNX op type → converter that runs before TVM's (and may decline with None).
CONVERTERS: dict[str, Converter] = {
    "Range": range_,
    "Reshape": reshape,
    "Expand": expand,
    "Squeeze": squeeze,
    "ScatterND": scatter_nd,
    "Equal": equal,
    "CumSum": cumsum,
    "Max": _extremum(tvm.tirx.max),
    "Min": _extremum(tvm.tirx.min),
}

__all__ = ["CONVERTERS"]
