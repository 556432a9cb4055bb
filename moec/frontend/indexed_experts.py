"""Experts picked by an input index (ViTPose+'s per-dataset experts), computed one per sample.

Some models pick an expert per sample by an *input*, not by a router: ViTPose+'s MLPs end in one
small linear expert per dataset, chosen by ``dataset_index``. transformers computes every expert
and masks the results; the exporters write that as a chain, which this rewrite recognises::

    acc_0 = 0;  acc_{i+1} = acc_i + (h @ W_e + b_e) * Cast(index == e)      (e = 0 .. E-1)

with constant ``W_e`` ``[in, out]``, ``b_e`` ``[out]`` and scalar ``e``, one ``index`` (a value per
sample: ``[B]`` or ``[B, 1, 1]``) and one ``h`` ``[B, T, in]`` for all experts (the ``Add`` and
``Mul`` operands either way round; the experts in any order, each once). It becomes::

    W = [W_0 .. W_{E-1}]  [E, in, out],   b = [b_0 .. b_{E-1}]  [E, out]      (initializers)
    i = Reshape(index, [-1]);  picked = Clip(i, 0, E - 1)
    acc_E = (h @ Gather(W, picked) + Unsqueeze(Gather(b, picked), 1)) * Cast(0 <= i < E)[:, None, None]

Each sample reads and multiplies only its own expert's weights (E times less expert work and
weight traffic), and an index outside ``0 .. E-1`` still gives zeros, as the masked sum does.
Runs on the ONNX graph before MoE blocks are looked for; the masked terms, no longer read, are
removed with the other dead nodes by :func:`moec.frontend.fold.fold_constants`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moec.frontend.graph import GraphIndex


@dataclasses.dataclass
class _Term:
    """One masked expert term ``(h @ W + b) * Cast(index == expert)`` (its ``Mul`` node)."""

    mul: onnx.NodeProto
    h: str
    index: str
    expert: int
    weight: np.ndarray
    bias: np.ndarray


def _producer(index: GraphIndex, tensor: str, op_type: str) -> onnx.NodeProto | None:
    node = index.producer.get(tensor)
    return node if node is not None and node.op_type == op_type else None


def _term(index: GraphIndex, mul: onnx.NodeProto) -> _Term | None:
    """``mul`` as a masked expert term, or None."""
    if mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    for linear_name, mask_name in (mul.input, mul.input[::-1]):
        cast = _producer(index, mask_name, "Cast")
        equal = _producer(index, cast.input[0], "Equal") if cast is not None else None
        add = _producer(index, linear_name, "Add")
        if equal is None or add is None:
            continue
        expert = next((index.constant(i) for i in equal.input if index.constant(i) is not None), None)
        selector = [i for i in equal.input if index.constant(i) is None]
        if expert is None or expert.size != 1 or expert.dtype.kind not in "iu" or len(selector) != 1:
            continue
        for matmul_name, bias_name in (add.input, add.input[::-1]):
            matmul = _producer(index, matmul_name, "MatMul")
            bias = index.constant(bias_name)
            weight = index.constant(matmul.input[1]) if matmul is not None else None
            if weight is None or bias is None or weight.ndim != 2 or bias.shape != (weight.shape[1],):
                continue
            return _Term(mul, matmul.input[0], selector[0], int(expert.reshape(-1)[0]), weight, bias)
    return None


def _is_zeros(index: GraphIndex, tensor: str) -> bool:
    """Whether ``tensor`` is all zeros: a constant, or a ``ConstantOfShape`` / ``Expand`` of one."""
    value = index.constant(tensor)
    if value is not None:
        return not np.any(value)
    node = index.producer.get(tensor)
    if node is not None and node.op_type == "ConstantOfShape":
        fill = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), np.zeros(1))
        return not np.any(fill)
    if node is not None and node.op_type == "Expand":
        fill = index.constant(node.input[0])
        return fill is not None and not np.any(fill)
    return False


def _chain(
    index: GraphIndex, terms: dict[str, _Term], first: _Term
) -> tuple[list[_Term], onnx.NodeProto] | None:
    """The terms summed from zeros by a chain of ``Add``s starting with ``first``, and the last
    ``Add``; None unless every step adds one term to the sum so far and nothing else reads it."""
    consumers = index.consumers.get(first.mul.output[0], [])
    if len(consumers) != 1 or consumers[0].op_type != "Add":
        return None
    add = consumers[0]
    init = [i for i in add.input if i != first.mul.output[0]]
    if len(init) != 1 or not _is_zeros(index, init[0]):
        return None
    chain = [first]
    while True:
        following = index.consumers.get(add.output[0], [])
        nxt = following[0] if len(following) == 1 and following[0].op_type == "Add" else None
        other = [i for i in nxt.input if i != add.output[0]] if nxt is not None else []
        term = terms.get(other[0]) if len(other) == 1 else None
        if term is None or term.h != first.h or term.index != first.index:
            return chain, add
        chain.append(term)
        add = nxt


def rewrite_indexed_experts(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every input-indexed expert sum computed one expert per sample
    (see the module docstring), and how many such sums there were."""
    index = GraphIndex(model.graph)
    terms = {t.mul.output[0]: t for node in model.graph.node if (t := _term(index, node)) is not None}
    replacements: dict[int, list[onnx.NodeProto]] = {}
    initializers: list[onnx.TensorProto] = []
    for term in terms.values():
        found = _chain(index, terms, term)
        if found is None:
            continue
        chain, last = found
        experts = sorted(t.expert for t in chain)
        shapes = {(t.weight.shape, t.bias.shape) for t in chain}
        if experts != list(range(len(chain))) or len(shapes) != 1 or len(chain) < 2:
            continue
        ordered = sorted(chain, key=lambda t: t.expert)
        n = f"{last.output[0]}__indexed"  # the prefix of every tensor the rewrite adds
        initializers += [
            numpy_helper.from_array(np.stack([t.weight for t in ordered]).astype(np.float32), f"{n}.weight"),
            numpy_helper.from_array(np.stack([t.bias for t in ordered]).astype(np.float32), f"{n}.bias"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{n}.flat"),
            numpy_helper.from_array(np.array([-1, 1, 1], np.int64), f"{n}.per_sample"),
            numpy_helper.from_array(np.array(0, np.int64), f"{n}.zero"),
            numpy_helper.from_array(np.array(len(chain) - 1, np.int64), f"{n}.last"),
            numpy_helper.from_array(np.array(len(chain), np.int64), f"{n}.count"),
            numpy_helper.from_array(np.array([1], np.int64), f"{n}.axis1"),
        ]
        replacements[id(last)] = [
            helper.make_node("Reshape", [term.index, f"{n}.flat"], [f"{n}.i"]),
            helper.make_node("Cast", [f"{n}.i"], [f"{n}.i64"], to=onnx.TensorProto.INT64),
            helper.make_node("Clip", [f"{n}.i64", f"{n}.zero", f"{n}.last"], [f"{n}.picked"]),
            helper.make_node("Gather", [f"{n}.weight", f"{n}.picked"], [f"{n}.w"], axis=0),
            helper.make_node("Gather", [f"{n}.bias", f"{n}.picked"], [f"{n}.b"], axis=0),
            helper.make_node("Unsqueeze", [f"{n}.b", f"{n}.axis1"], [f"{n}.b1"]),
            helper.make_node("MatMul", [term.h, f"{n}.w"], [f"{n}.hw"]),
            helper.make_node("Add", [f"{n}.hw", f"{n}.b1"], [f"{n}.y"]),
            helper.make_node("GreaterOrEqual", [f"{n}.i64", f"{n}.zero"], [f"{n}.ge"]),
            helper.make_node("Less", [f"{n}.i64", f"{n}.count"], [f"{n}.lt"]),
            helper.make_node("And", [f"{n}.ge", f"{n}.lt"], [f"{n}.valid"]),
            helper.make_node("Cast", [f"{n}.valid"], [f"{n}.valid_f"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Reshape", [f"{n}.valid_f", f"{n}.per_sample"], [f"{n}.mask"]),
            helper.make_node("Mul", [f"{n}.y", f"{n}.mask"], [last.output[0]], name=last.name or n),
        ]
    if not replacements:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in model.graph.node:
        nodes.extend(replacements.get(id(node), [node]))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(initializers)
    return out, len(replacements)
