"""Legalisations of the min/max ops that propagate NaN, as ONNX Runtime, PyTorch and numpy do.

TVM lowers ``max(a, b)`` to ``a > b ? a : b``, so a NaN first operand is dropped: its ``relu``
(``max(x, 0)``) turns a NaN into 0, and ``clip`` (``max(min(x, hi), lo)``) into ``hi``. A NaN
in a token's input then gives a row of ordinary numbers instead of the NaN row every framework
gives, and nothing says anything went wrong. These replace TVM's legalisation of those ops
(:data:`NAN_PROPAGATING_LEGALIZE`, given to ``LegalizeOps``) for floating-point tensors:

- ``relu(x)`` → ``x < 0 ? 0 : x``
- ``clip(x, lo, hi)`` → ``x < lo ? lo : (x > hi ? hi : x)``
- ``maximum(a, b)`` → ``(a > b or isnan(a)) ? a : b``; ``minimum`` likewise with ``<``

Each is one elementwise (broadcast) stage that fuses as TVM's own does; integer tensors keep
TVM's legalisation. moec's kernels write their own activations the same way
(:func:`moec.kernels.expert_ffn.activation_epilogue`).
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, te, tirx, topi

LegalizeFunc = Callable[[relax.BlockBuilder, relax.Call], relax.Expr]


def _is_float(expr: relax.Expr) -> bool:
    info = expr.ty
    return isinstance(info, relax.TensorType) and str(info.dtype).startswith(("float", "bfloat"))


def _float_only(op_name: str, legalize: LegalizeFunc) -> LegalizeFunc:
    """``legalize`` for calls on floating-point tensors, TVM's own legalisation for the others."""
    default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def choose(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        return legalize(bb, call) if _is_float(call.args[0]) else default(bb, call)

    return choose


def _relu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    def compute(x: te.Tensor) -> te.Tensor:
        zero = tirx.const(0, x.dtype)
        return te.compute(x.shape, lambda *i: tirx.Select(x(*i) < zero, zero, x(*i)), name="relu")

    return bb.call_te(compute, call.args[0], primfunc_name_hint="relu")


def _clip(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    def compute(x: te.Tensor, low: tirx.PrimExpr, high: tirx.PrimExpr) -> te.Tensor:
        lo, hi = tirx.Cast(x.dtype, low), tirx.Cast(x.dtype, high)

        def element(*i: tirx.PrimExpr) -> tirx.PrimExpr:
            v = x(*i)
            return tirx.Select(v < lo, lo, tirx.Select(v > hi, hi, v))

        return te.compute(x.shape, element, name="clip")

    return bb.call_te(compute, *call.args, primfunc_name_hint="clip")


def _extremum(keeps_first: Callable[[te.Tensor, te.Tensor], te.Tensor], name: str) -> LegalizeFunc:
    """``maximum``/``minimum``: the first operand where ``keeps_first`` or where it is NaN, else the
    second (so a NaN in either gives NaN), broadcast as TVM's own."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        def compute(a: te.Tensor, b: te.Tensor) -> te.Tensor:
            return topi.where(topi.logical_or(keeps_first(a, b), topi.isnan(a)), a, b)

        return bb.call_te(compute, *call.args, primfunc_name_hint=name)

    return legalize


NAN_PROPAGATING_LEGALIZE: dict[str, LegalizeFunc] = {
    "relax.nn.relu": _float_only("relax.nn.relu", _relu),
    "relax.clip": _float_only("relax.clip", _clip),
    "relax.maximum": _float_only("relax.maximum", _extremum(topi.greater, "maximum")),
    "relax.minimum": _float_only("relax.minimum", _extremum(topi.less, "minimum")),
}
"""``LegalizeOps``' custom map: the ops above, NaN-propagating for floating-point tensors."""
