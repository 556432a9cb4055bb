"""Mutation operators over ONNX models: each breaks one thing a real file can get wrong.

A model-level operator edits a parsed :class:`onnx.ModelProto` in place and returns a short
description of what it did, or None when the model offers nothing to apply it to (no node with
attributes, no raw initializer, ...). A byte-level operator maps the serialized file to other
bytes (garbage, a truncated download). :func:`make_mutant` picks one operator and its choices
with a random generator seeded by ``(seed, index)`` alone, so mutant ``index`` of ``seed`` of a
source model is the same bytes on every machine and every run.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable

import onnx
from onnx import TensorProto, helper

ModelMutator = Callable[[onnx.ModelProto, random.Random], "str | None"]
ByteMutator = Callable[[bytes, random.Random], "tuple[bytes, str]"]

#: Dimensions no valid model of this size has: zero, negative, and far past any memory.
ODD_DIMS = (0, -1, -7, 1, 3, 2**31, 2**40, 2**62)
#: Integer attribute values off the usual range of axes, sizes and flags.
ODD_INTS = (0, 1, -1, 2, 7, 64, 2**31 - 1, -(2**40), 2**62)
#: Float attribute values: zero, negative, huge, and the non-finite ones.
ODD_FLOATS = (0.0, -1.0, 1e30, math.nan, math.inf, -math.inf)
#: Strings no op accepts as a mode or name, including bytes that are not UTF-8.
ODD_STRINGS = (b"", b"bogus", b"\xff\xfe")
#: Element types a tensor may claim: undefined, every family, and a number onnx does not define.
ODD_ELEM_TYPES = (
    TensorProto.UNDEFINED,
    TensorProto.UINT8,
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.BOOL,
    TensorProto.FLOAT16,
    TensorProto.DOUBLE,
    TensorProto.BFLOAT16,
    TensorProto.STRING,
    TensorProto.COMPLEX64,
    99,
)


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One mutated model: where it came from, how it was made, and its bytes."""

    source: str
    seed: int
    index: int
    operator: str
    description: str
    data: bytes


def drop_node(model: onnx.ModelProto, rng: random.Random) -> str | None:
    """Remove one node: its outputs dangle, or the graph output is never computed."""
    nodes = model.graph.node
    if not nodes:
        return None
    i = rng.randrange(len(nodes))
    label = _label(nodes[i])
    del nodes[i]
    return f"dropped node {i} {label}"


def duplicate_node(model: onnx.ModelProto, rng: random.Random) -> str | None:
    """Insert a copy of one node somewhere: its outputs now have two producers."""
    nodes = model.graph.node
    if not nodes:
        return None
    i, j = rng.randrange(len(nodes)), rng.randrange(len(nodes) + 1)
    copy = onnx.NodeProto()
    copy.CopyFrom(nodes[i])
    nodes.insert(j, copy)
    return f"duplicated node {i} {_label(copy)} at position {j}"


def change_attribute(model: onnx.ModelProto, rng: random.Random) -> str | None:
    """Give one attribute of one node another value or type, or remove it."""
    owners = [n for n in model.graph.node if n.attribute]
    if not owners:
        return None
    node = rng.choice(owners)
    k = rng.randrange(len(node.attribute))
    attr = node.attribute[k]
    name = attr.name
    if rng.random() < 0.2:
        del node.attribute[k]
        return f"removed attribute '{name}' of {_label(node)}"
    value = _odd_attribute_value(attr, rng)
    list_type = attr.type if attr.type in (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS) else None
    empty_type = list_type or onnx.AttributeProto.INTS  # an empty list's type cannot be inferred
    node.attribute[k].CopyFrom(
        helper.make_attribute(name, value, attr_type=None if value != [] else empty_type)
    )
    return f"set attribute '{name}' of {_label(node)} to {_short(value)}"


def change_value_shape(model: onnx.ModelProto, rng: random.Random) -> str | None:
    """Change the declared shape of a graph input, output or value_info entry."""
    graph = model.graph
    infos = [
        (kind, v)
        for kind, values in (
            ("input", graph.input),
            ("output", graph.output),
            ("value_info", graph.value_info),
        )
        for v in values
        if v.type.HasField("tensor_type")
    ]
    if not infos:
        return None
    kind, info = rng.choice(infos)
    tensor_type = info.type.tensor_type
    dims = tensor_type.shape.dim
    what = rng.choice(("dim", "dim", "dim", "symbol", "add", "remove", "clear"))
    if what == "clear" or (what in ("dim", "symbol", "remove") and not dims):
        tensor_type.ClearField("shape")
        return f"cleared the shape of {kind} '{info.name}'"
    if what == "add":
        dims.add().dim_value = rng.choice(ODD_DIMS)
        return f"appended dim {dims[-1].dim_value} to {kind} '{info.name}'"
    i = rng.randrange(len(dims))
    if what == "remove":
        del dims[i]
        return f"removed dim {i} of {kind} '{info.name}'"
    if what == "symbol":
        dims[i].dim_param = rng.choice(("n", "", "2**40", "-3"))
        return f"set dim {i} of {kind} '{info.name}' to symbol {dims[i].dim_param!r}"
    dims[i].dim_value = rng.choice(ODD_DIMS)
    return f"set dim {i} of {kind} '{info.name}' to {dims[i].dim_value}"


def change_elem_type(model: onnx.ModelProto, rng: random.Random) -> str | None:
    """Change the element type of a graph input, output, value_info entry or initializer."""
    graph = model.graph
    typed = [v for v in [*graph.input, *graph.output, *graph.value_info] if v.type.HasField("tensor_type")]
    targets: list[tuple[str, object]] = [("value", v) for v in typed] + [
        ("initializer", t) for t in graph.initializer
    ]
    if not targets:
        return None
    kind, target = rng.choice(targets)
    elem_type = rng.choice(ODD_ELEM_TYPES)
    if kind == "value":
        target.type.tensor_type.elem_type = elem_type
    else:
        target.data_type = elem_type
    return f"set the element type of {kind} '{target.name}' to {elem_type}"


def change_initializer_dims(model: onnx.ModelProto, rng: random.Random) -> str | None:
    """Change an initializer's dims so they no longer match its data."""
    inits = model.graph.initializer
    if not inits:
        return None
    tensor = rng.choice(inits)
    if tensor.dims and rng.random() < 0.8:
        i = rng.randrange(len(tensor.dims))
        tensor.dims[i] = rng.choice((*ODD_DIMS, tensor.dims[i] + 1, max(tensor.dims[i] - 1, 0)))
        return f"set dim {i} of initializer '{tensor.name}' to {tensor.dims[i]}"
    tensor.dims.append(rng.choice(ODD_DIMS))
    return f"appended dim {tensor.dims[-1]} to initializer '{tensor.name}'"


def truncate_initializer(model: onnx.ModelProto, rng: random.Random) -> str | None:
    """Cut an initializer's data short (a partial write or a bad conversion)."""
    inits = [t for t in model.graph.initializer if t.raw_data or _typed_data(t) is not None]
    if not inits:
        return None
    tensor = rng.choice(inits)
    if tensor.raw_data:
        cut = rng.randrange(len(tensor.raw_data))
        tensor.raw_data = tensor.raw_data[:cut]
        return f"cut the raw data of initializer '{tensor.name}' to {cut} bytes"
    field = _typed_data(tensor)
    values = getattr(tensor, field)
    cut = rng.randrange(len(values))
    del values[cut:]
    return f"cut the {field} of initializer '{tensor.name}' to {cut} values"


def flip_initializer_bits(model: onnx.ModelProto, rng: random.Random) -> str | None:
    """Flip a few bits of an initializer's raw data (which may make NaN, Inf or odd integers)."""
    inits = [t for t in model.graph.initializer if t.raw_data]
    if not inits:
        return None
    tensor = rng.choice(inits)
    data = bytearray(tensor.raw_data)
    flips = rng.randint(1, 8)
    for _ in range(flips):
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    tensor.raw_data = bytes(data)
    return f"flipped {flips} bit(s) of initializer '{tensor.name}'"


def bad_opset(model: onnx.ModelProto, rng: random.Random) -> str | None:
    """Import an opset version onnx does not have, drop the default one, or use an unknown domain."""
    what = rng.choice(("version 1", "version 999", "no default", "unknown domain", "ir version"))
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if what.startswith("version") and default:
        default[0].version = int(what.split()[1])
        return f"set the default-domain opset to {default[0].version}"
    if what == "no default" and default:
        model.opset_import.remove(default[0])
        return "removed the default-domain opset import"
    if what == "ir version":
        model.ir_version = rng.choice((0, 1, 3, 99))
        return f"set the IR version to {model.ir_version}"
    if not model.graph.node:
        return None
    node = rng.choice(model.graph.node)
    node.domain = "org.example.unknown"
    if rng.random() < 0.5:
        model.opset_import.append(helper.make_opsetid(node.domain, 1))
    return f"moved {_label(node)} to the unknown domain '{node.domain}'"


def make_cycle(model: onnx.ModelProto, rng: random.Random) -> str | None:
    """Make a node read its own output or a later node's output."""
    nodes = model.graph.node
    readers = [i for i, n in enumerate(nodes) if n.input]
    if not readers:
        return None
    j = rng.choice(readers)
    later = [k for k in range(j, len(nodes)) if any(nodes[k].output)]
    if not later:
        return None
    k = rng.choice(later)
    source = rng.choice([o for o in nodes[k].output if o])
    slot = rng.randrange(len(nodes[j].input))
    nodes[j].input[slot] = source
    return f"{_label(nodes[j])} input {slot} now reads '{source}' of node {k} (node {j})"


def dangle_input(model: onnx.ModelProto, rng: random.Random) -> str | None:
    """Rename a graph input, a graph output or one node input so that it names nothing."""
    graph = model.graph
    what = rng.choice(("graph input", "graph output", "node input"))
    if what == "graph input" and graph.input:
        value = rng.choice(graph.input)
    elif what == "graph output" and graph.output:
        value = rng.choice(graph.output)
    else:
        readers = [n for n in graph.node if any(n.input)]
        if not readers:
            return None
        node = rng.choice(readers)
        slot = rng.choice([i for i, name in enumerate(node.input) if name])
        node.input[slot] = f"{node.input[slot]}__dangling"
        return f"{_label(node)} input {slot} now reads the missing '{node.input[slot]}'"
    old = value.name
    value.name = f"{old}__renamed"
    return f"renamed {what} '{old}' to '{value.name}'"


def empty_graph(model: onnx.ModelProto, rng: random.Random) -> str | None:
    """Remove every node (and perhaps the outputs and initializers too)."""
    graph = model.graph
    what = rng.choice(("nodes", "nodes and outputs", "everything"))
    del graph.node[:]
    if what != "nodes":
        del graph.output[:]
    if what == "everything":
        del graph.input[:]
        del graph.initializer[:]
        del graph.value_info[:]
    return f"removed {what} of the graph"


def garbage_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Replace the file by random bytes, or put random bytes in front of it."""
    size = rng.choice((0, 1, 7, 64, 4096))
    noise = rng.randbytes(size)
    if rng.random() < 0.5:
        return noise, f"replaced the file by {size} random bytes"
    return noise + data, f"put {size} random bytes in front of the file"


def truncate_file(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Cut the serialized file short (an interrupted download)."""
    cut = rng.randrange(len(data))
    return data[:cut], f"cut the file to {cut} of {len(data)} bytes"


def flip_file_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Overwrite a few bytes of the serialized file (disk or transfer damage)."""
    damaged = bytearray(data)
    count = rng.randint(1, 4)
    for _ in range(count):
        damaged[rng.randrange(len(damaged))] = rng.randrange(256)
    return bytes(damaged), f"overwrote {count} byte(s) of the file"


MODEL_MUTATORS: dict[str, ModelMutator] = {
    "drop_node": drop_node,
    "duplicate_node": duplicate_node,
    "change_attribute": change_attribute,
    "change_value_shape": change_value_shape,
    "change_elem_type": change_elem_type,
    "change_initializer_dims": change_initializer_dims,
    "truncate_initializer": truncate_initializer,
    "flip_initializer_bits": flip_initializer_bits,
    "bad_opset": bad_opset,
    "make_cycle": make_cycle,
    "dangle_input": dangle_input,
    "empty_graph": empty_graph,
}
BYTE_MUTATORS: dict[str, ByteMutator] = {
    "garbage_bytes": garbage_bytes,
    "truncate_file": truncate_file,
    "flip_file_bytes": flip_file_bytes,
}
OPERATORS = (*MODEL_MUTATORS, *BYTE_MUTATORS)
"""Every operator's name, in the order :func:`make_mutant` draws from."""


def make_mutant(
    source: str, data: bytes, seed: int, index: int, operators: tuple[str, ...] = OPERATORS
) -> Mutant:
    """Mutant ``index`` of ``seed`` of the model ``data`` (read from ``source``): one operator of
    ``operators``, drawn with its choices from a generator seeded by ``(seed, index)`` alone; an
    operator with nothing to act on in this model makes way for the next draw."""
    rng = random.Random(f"moec-fuzz/{seed}/{index}")
    for _ in range(100):
        name = rng.choice(operators)
        if name in BYTE_MUTATORS:
            mutated, description = BYTE_MUTATORS[name](data, rng)
            return Mutant(source, seed, index, name, description, mutated)
        model = onnx.load_from_string(data)
        description = MODEL_MUTATORS[name](model, rng)
        if description is not None:
            return Mutant(source, seed, index, name, description, model.SerializeToString())
    raise ValueError(f"{source}: none of {operators} applies to this model")


def _odd_attribute_value(attr: onnx.AttributeProto, rng: random.Random) -> object:
    """Another value for ``attr``: one off the usual range for its type, or one of another type."""
    kind = attr.type
    if rng.random() < 0.15:  # a value of another type than the op expects
        return rng.choice((1.5, 3, "x", [1, 2], [0.5]))
    if kind == onnx.AttributeProto.INT:
        return rng.choice(ODD_INTS)
    if kind == onnx.AttributeProto.FLOAT:
        return rng.choice(ODD_FLOATS)
    if kind == onnx.AttributeProto.STRING:
        return rng.choice(ODD_STRINGS)
    if kind == onnx.AttributeProto.INTS:
        values = list(attr.ints)
        choice = rng.choice(("empty", "reverse", "extend", "replace"))
        if choice == "empty" or not values:
            return []
        if choice == "reverse":
            return values[::-1]
        if choice == "extend":
            return [*values, rng.choice(ODD_INTS)]
        values[rng.randrange(len(values))] = rng.choice(ODD_INTS)
        return values
    if kind == onnx.AttributeProto.FLOATS:
        return [rng.choice(ODD_FLOATS) for _ in range(rng.randint(0, 3))]
    if kind == onnx.AttributeProto.TENSOR:
        return _odd_tensor(attr.t, rng)
    return rng.choice(ODD_INTS)  # graphs, sparse tensors, lists of strings: replaced by an int


def _odd_tensor(tensor: onnx.TensorProto, rng: random.Random) -> onnx.TensorProto:
    """A tensor attribute's replacement: empty, another type, another shape, non-finite, or huge dims."""
    name = tensor.name
    choice = rng.choice(("empty", "int scalar", "float matrix", "nan", "dims"))
    if choice == "empty":
        return helper.make_tensor(name, TensorProto.FLOAT, [0], [])
    if choice == "int scalar":
        return helper.make_tensor(name, TensorProto.INT64, [], [rng.choice(ODD_INTS)])
    if choice == "float matrix":
        return helper.make_tensor(name, TensorProto.FLOAT, [3, 5], [rng.uniform(-2, 2) for _ in range(15)])
    if choice == "nan":
        return helper.make_tensor(name, TensorProto.FLOAT, [2], [math.nan, math.inf])
    damaged = onnx.TensorProto()
    damaged.CopyFrom(tensor)
    damaged.dims.append(rng.choice(ODD_DIMS))
    return damaged


def _typed_data(tensor: onnx.TensorProto) -> str | None:
    """The name of the repeated field holding a tensor's values when it has no raw data."""
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        if len(getattr(tensor, field)):
            return field
    return None


def _label(node: onnx.NodeProto) -> str:
    """A node as descriptions name it: its name or first output, and its op type."""
    name = node.name or (node.output[0] if node.output else "?")
    return f"'{name}' ({node.op_type})"


def _short(value: object) -> str:
    """An attribute value in a few characters for a mutant's description."""
    if isinstance(value, onnx.TensorProto):
        return f"a tensor of type {value.data_type} and dims {list(value.dims)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
