"""Weights that hold NaN or Inf: named once, when the model is loaded.

A NaN weight makes every output that reads it NaN, in moec's artifact as in onnxruntime and
PyTorch; moec compiles such a model as it is (recognition does not depend on the values:
:func:`moec.frontend.standard.confirm.confirms`), but says which weights they are, since a
checkpoint with NaN in it is almost always a broken training run or conversion.

Infinities are also how exporters write masks: a ``-inf`` fill value (PhiMoE's router, causal
attention) or an additive mask of 0 and ``-inf``. A tensor whose finite values are all 0 is such
a mask, not a weight, and is not reported.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from moec.frontend.graph import node_label
from moec.frontend.validate import all_nodes

FLOAT_TYPES = frozenset(
    {
        TensorProto.FLOAT,
        TensorProto.FLOAT16,
        TensorProto.BFLOAT16,
        TensorProto.DOUBLE,
        TensorProto.FLOAT8E4M3FN,
        TensorProto.FLOAT8E4M3FNUZ,
        TensorProto.FLOAT8E5M2,
        TensorProto.FLOAT8E5M2FNUZ,
    }
)
"""The element types that can hold NaN or Inf."""


def nonfinite_weights(model: onnx.ModelProto) -> Iterator[tuple[str, int, int]]:
    """``(what, NaN count, Inf count)`` of each initializer and ``Constant`` node value (in
    subgraphs too) holding NaN or Inf; ``what`` names it (``initializer 'w'``)."""
    for tensor in model.graph.initializer:
        yield from _counted(f"initializer '{tensor.name}'", tensor)
    for node in all_nodes(model.graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            if attr.name == "value":
                yield from _counted(node_label(node), attr.t)
            elif attr.name in ("value_float", "value_floats"):
                values = np.array([attr.f] if attr.name == "value_float" else list(attr.floats), np.float32)
                yield from _counts(node_label(node), values)


def nonfinite_warnings(model: onnx.ModelProto, path: str) -> list[str]:
    """One warning line (without ``moec: warning:``) per weight of ``model`` holding NaN or Inf."""
    lines = []
    for what, nans, infs in nonfinite_weights(model):
        effect = "will be NaN" if nans else "may be Inf or NaN"
        lines.append(f"{path}: {what} holds {nans} NaN and {infs} Inf values; outputs that read it {effect}")
    return lines


def _counted(what: str, tensor: onnx.TensorProto) -> Iterator[tuple[str, int, int]]:
    if tensor.data_type in FLOAT_TYPES:
        yield from _counts(what, numpy_helper.to_array(tensor))


def poisoned(values: np.ndarray) -> bool:
    """Whether ``values`` (of any float type) are a weight holding NaN or Inf: a NaN, or an Inf
    beside non-zero numbers (Inf among zeros only is a mask or a fill value)."""
    # The ufuncs work on every float type (ml_dtypes' too), with no cast that a signalling NaN
    # would make numpy warn about.
    finite = np.isfinite(values)
    return not finite.all() and bool(np.isnan(values).any() or np.any(values[finite] != 0))


def _counts(what: str, values: np.ndarray) -> Iterator[tuple[str, int, int]]:
    if poisoned(values):
        yield what, int(np.isnan(values).sum()), int(np.isinf(values).sum())
