"""Checks of what onnx's checker leaves to the reader: tensor data against its dims and type,
dimensions that are sizes, and ``Constant`` nodes that hold a value.

onnx's checker accepts an initializer whose raw data is *longer* than its dims need (or whose
element type it does not define), a graph input with a negative or astronomically large
dimension, and a ``Constant`` node without a value. Each of those later fails deep inside moec
or TVM (a numpy reshape, an int64 overflow, an allocation of exabytes), so the loader rejects
them up front, naming the tensor and what is wrong with it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import onnx
from onnx import TensorProto, helper, numpy_helper

from moec.errors import MoecError
from moec.frontend.graph import node_label

MAX_DIM = 2**31 - 1
"""The largest dimension, and element count of a declared tensor, moec compiles: 2 G elements of
one tensor (8 GB of fp32) is past any edge device's memory, and TVM indexes with 32-bit
integers where it can."""

SUB_BYTE_BITS = {
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
    TensorProto.FLOAT4E2M1: 4,
    TensorProto.INT2: 2,
    TensorProto.UINT2: 2,
    TensorProto.FLOAT6E2M3: 6,
    TensorProto.FLOAT6E3M2: 6,
}
"""Bits per element of the types ONNX packs several to a byte (raw data) or to a field entry."""

CONSTANT_VALUES = (
    "value",
    "value_float",
    "value_floats",
    "value_int",
    "value_ints",
    "value_string",
    "value_strings",
    "sparse_value",
)
"""The attributes one of which (exactly) a ``Constant`` node holds its value in."""

SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1}
"""The ops that build a tensor of a shape one input holds, and that input's position."""
FIX = "re-export the model or fix the file"
ARITHMETIC = re.compile(r"//|[-+*/]")
"""What TVM's ONNX frontend splits a dimension name on (``parse_shape_name``)."""


def check_model_data(model: onnx.ModelProto, path: str) -> None:
    """Raise :class:`MoecError` naming ``path`` and the culprit for a declared shape, tensor or
    ``Constant`` node that onnx's checker let through but no reader can use."""
    graph = model.graph
    for kind, values in (("input", graph.input), ("output", graph.output), ("value_info", graph.value_info)):
        for value in values:
            _check_declared_shape(value, f"{path}: {kind} '{value.name}'")
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            _check_interface_type(value, f"{path}: {kind} '{value.name}'")
    _check_input_dim_names(list(graph.input), path)
    for value in graph.input:
        _check_no_empty_dims(value, f"{path}: input '{value.name}'")
    for tensor in graph.initializer:
        check_tensor(tensor, f"{path}: initializer '{tensor.name}'")
    for node in all_nodes(graph):
        where = f"{path}: {node_label(node)}"
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            held = [a.name for a in node.attribute if a.name in CONSTANT_VALUES]
            if len(held) != 1:
                raise MoecError(
                    f"{where} holds {len(held)} values ({', '.join(held) or 'none'}) where a Constant "
                    f"holds exactly one of {', '.join(CONSTANT_VALUES)}; {FIX}"
                )
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                check_tensor(attr.t, f"{where} attribute '{attr.name}'")
    _check_shape_constants(graph, path)


def check_tensor(tensor: TensorProto, where: str) -> None:
    """Raise :class:`MoecError` (``where`` names the tensor) unless the tensor has an element type
    ONNX defines, dimensions that are sizes, and exactly the data its dims need."""
    if tensor.HasField("segment"):
        raise MoecError(f"{where} is stored in segments, which moec does not read; {FIX}")
    known = set(helper.get_all_tensor_dtypes())
    if tensor.data_type not in known or tensor.data_type == TensorProto.UNDEFINED:
        raise MoecError(f"{where} has element type {tensor.data_type}, which ONNX does not define; {FIX}")
    dims = list(tensor.dims)
    _check_dims(dims, where)
    count = math.prod(dims)
    type_name = helper.tensor_dtype_to_string(tensor.data_type).removeprefix("TensorProto.")
    if tensor.data_type == TensorProto.STRING:
        held, needed, unit = len(tensor.string_data), count, "strings"
    elif tensor.HasField("raw_data"):
        bits = SUB_BYTE_BITS.get(
            tensor.data_type, 8 * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        )
        held, needed, unit = len(tensor.raw_data), math.ceil(count * bits / 8), "bytes"
    elif tensor.data_type in SUB_BYTE_BITS:
        return  # packed into field entries as exporters choose; moec reads none of these types
    else:
        field = helper.tensor_dtype_to_field(tensor.data_type)
        per_element = 2 if tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
        held, needed, unit = len(getattr(tensor, field)), count * per_element, f"{field} values"
    if held != needed:
        raise MoecError(
            f"{where} holds {held} {unit} but its dims {dims} of {type_name} need {needed}; "
            f"the file is damaged or was written wrongly: {FIX}"
        )


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of the subgraphs in its nodes' attributes (If, Loop, Scan)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from all_nodes(sub)


def _check_declared_shape(value: onnx.ValueInfoProto, where: str) -> None:
    """A graph input's, output's or value_info's declared dimensions must be sizes moec can build."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return
    dims = [d.dim_value for d in value.type.tensor_type.shape.dim if d.HasField("dim_value")]
    _check_dims(dims, where)


def _check_shape_constants(graph: onnx.GraphProto, path: str) -> None:
    """The constant shapes that ``Reshape``, ``Expand``, ``ConstantOfShape`` and ``Tile`` read
    must be sizes moec can build (-1 and 0 mean what Reshape says): TVM computes with their
    product, which a bit flip in a shape constant makes overflow 64 bits."""
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and node.output and attr.name == "value":
                constants[node.output[0]] = attr.t
    for node in graph.node:
        position = SHAPE_INPUTS.get(node.op_type)
        if position is None or node.domain not in ("", "ai.onnx") or len(node.input) <= position:
            continue
        tensor = constants.get(node.input[position])
        if tensor is None or tensor.data_type != TensorProto.INT64:
            continue
        values = [int(v) for v in numpy_helper.to_array(tensor).ravel()]
        if any(not -1 <= v <= MAX_DIM for v in values) or math.prod(v for v in values if v > 0) > MAX_DIM:
            raise MoecError(
                f"{path}: {node_label(node)} reads the shape {values} from '{node.input[position]}': "
                f"not sizes of a tensor moec compiles (each -1..{MAX_DIM}, at most {MAX_DIM} elements); "
                f"{FIX}"
            )


def _check_no_empty_dims(value: onnx.ValueInfoProto, where: str) -> None:
    """A graph input's dimensions must not be fixed to 0: no data could ever flow through it, and
    a 0 there is nearly always a dimension that varies, exported at an empty example (a KV cache
    of length 0); TVM's lowering fails on the empty loops it makes."""
    if not value.type.HasField("tensor_type"):
        return
    for i, dim in enumerate(value.type.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value == 0:
            raise MoecError(
                f"{where} has its dimension {i} fixed to 0, so no data ever flows through it; give a "
                f"dimension that varies a name (dim_param), e.g. re-export with it dynamic; {FIX}"
            )


def _check_interface_type(value: onnx.ValueInfoProto, where: str) -> None:
    """A graph input's or output's element type must be one ONNX defines: the artifact's
    manifest records it, and callers pass and receive arrays of it."""
    if not value.type.HasField("tensor_type"):
        return
    elem_type = value.type.tensor_type.elem_type
    if elem_type == TensorProto.UNDEFINED or elem_type not in helper.get_all_tensor_dtypes():
        raise MoecError(
            f"{where} has element type {elem_type}, which is not a type ONNX defines; declare its "
            f"type (e.g. FLOAT); {FIX}"
        )


def _check_input_dim_names(inputs: list[onnx.ValueInfoProto], path: str) -> None:
    """Graph inputs' dimension names must be names TVM can bind: its ONNX frontend reads
    ``+ - * /`` in a name as arithmetic (``past + 1``), which it can only compute when each
    name in it is a whole dimension name of some input (``past``); ``2**40`` reads an unnamed
    dimension and fails deep in TVM's lowering."""
    params = [
        (value.name, i, dim.dim_param)
        for value in inputs
        if value.type.HasField("tensor_type")
        for i, dim in enumerate(value.type.tensor_type.shape.dim)
        if dim.HasField("dim_param")
    ]
    plain = {param for _, _, param in params if not ARITHMETIC.search(param)}
    for name, i, param in params:
        operands = ARITHMETIC.split(param.replace(" ", "")) if ARITHMETIC.search(param) else []
        unknown = [o for o in operands if not o.isdigit() and o not in plain]
        if unknown:
            raise MoecError(
                f"{path}: input '{name}' names its dimension {i} '{param}', which TVM's ONNX frontend "
                f"reads as arithmetic on {', '.join(repr(o) for o in unknown)}, not a dimension name "
                f"of any input; name it with a plain word (e.g. 'tokens') or give its size; {FIX}"
            )


def _check_dims(dims: list[int], where: str) -> None:
    for dim in dims:
        if dim < 0:
            raise MoecError(
                f"{where} has dimension {dim}; a dimension is a size (0 or more) or a name "
                f"(dim_param) for one that varies; {FIX}"
            )
        if dim > MAX_DIM:
            raise MoecError(f"{where} has dimension {dim}, above the {MAX_DIM} moec compiles; {FIX}")
    if math.prod(dims) > MAX_DIM:
        raise MoecError(
            f"{where} has {math.prod(dims)} elements (dims {dims}), above the {MAX_DIM} moec "
            f"compiles in one tensor; {FIX}"
        )
