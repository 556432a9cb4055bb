"""Numerical confirmation: does a candidate region compute the layer extracted from it?

Structure only proposes: the region is run alone with onnx's reference evaluator on random
tokens and logits and must match the candidate layer's numpy semantics
(:func:`moec.canonical.semantics.moe_forward`). The sample is chosen so that wrong readings
show: routing weights far from 0 and 1 (renormalised or not differ), every expert hit (a trace
of a loop over the hit experts is exercised whole), and with an expert capacity one expert sent
more tokens than it takes. A candidate that does not match is not an MoE block as far as moec
is concerned: it stays in the graph and TVM compiles it densely.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from moec.canonical.layer import WEIGHT_ROLES, MoELayer
from moec.canonical.semantics import moe_forward
from moec.frontend.nonfinite import FLOAT_TYPES, poisoned
from moec.frontend.standard.walks import GraphWalk
from moec.onnx_fixes import FIXED_OPS

#: Largest expert capacity whose token drops the confirmation sample exercises (one more token
#: than the capacity goes to one expert); a larger one is confirmed on the structure alone.
MAX_SAMPLED_CAPACITY = 1024
#: The sample's size of a symbolic dimension that neither the tokens nor the logits have (a KV
#: cache's length, read off its shape for the batch size): not 1, so that a region that did depend
#: on it would compute something else and fail to confirm.
UNRELATED_DIM = 3


def _sample_shape(walk: GraphWalk, tensor: str, last: int, tokens: int) -> list[int]:
    """``tensor``'s inferred shape with ``tokens`` in the token axis (second-last) where it is
    symbolic, 1 in other symbolic axes, and ``last`` as the last dimension."""
    dims = walk.shapes.get(tensor, [None, last])
    leading = [d if d is not None else tokens if i == len(dims) - 2 else 1 for i, d in enumerate(dims[:-1])]
    return [*leading, last]


def _local_equivalents(
    walk: GraphWalk, sources: set[str], region: list[onnx.NodeProto], inputs: tuple[str, ...]
) -> dict[str, str]:
    """For each of ``sources`` (tensors whose shapes the region reads, computed outside it), the
    region's own tensor (or one of its ``inputs``: tokens, logits) with the same
    :meth:`~GraphWalk.signature`, where there is one."""
    by_signature: dict[int, str] = {}
    for tensor in [*inputs, *(t for node in region for t in node.output)]:
        by_signature.setdefault(walk.signature(tensor), tensor)
    return {
        source: by_signature[walk.signature(source)]
        for source in sources
        if walk.signature(source) in by_signature
    }


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each comes after the nodes computing its inputs (stable)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    placed: list[onnx.NodeProto] = []
    done: set[int] = set()

    def place(i: int) -> None:
        if i in done:
            return
        done.add(i)
        for tensor in nodes[i].input:
            if tensor in producer:
                place(producer[tensor])
        placed.append(nodes[i])

    for i in range(len(nodes)):
        place(i)
    return placed


def _reading(node: onnx.NodeProto, renamed: dict[str, str]) -> onnx.NodeProto:
    """``node``, or a copy of it reading ``renamed[t]`` in place of each renamed input ``t``."""
    if not any(i in renamed for i in node.input):
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.input[:]
    copy.input.extend(renamed.get(i, i) for i in node.input)
    return copy


def _sampled_dims(walk: GraphWalk, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """The sample's size of each symbolic dimension (by name) that the fed tensors have."""
    sizes: dict[str, int] = {}
    for name, value in feeds.items():
        for dim_name, size in zip(walk.dim_names.get(name, []), value.shape, strict=False):
            if dim_name is not None:
                sizes.setdefault(dim_name, size)
    return sizes


def _finite_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """``tensor``, or, when it is a weight holding NaN or Inf, a copy with those values replaced
    by 0 (:func:`confirms`)."""
    if tensor.data_type not in FLOAT_TYPES:
        return tensor
    value = numpy_helper.to_array(tensor)
    return numpy_helper.from_array(_zero_nonfinite(value), tensor.name) if poisoned(value) else tensor


def _finite_node(node: onnx.NodeProto) -> onnx.NodeProto:
    """``node``, or for a ``Constant`` holding NaN or Inf a copy holding 0 in their place."""
    tensors = [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    if node.op_type != "Constant" or all(_finite_tensor(t) is t for t in tensors):
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for attr in copy.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            attr.t.CopyFrom(_finite_tensor(attr.t))
    return copy


def _finite_layer(layer: MoELayer) -> MoELayer:
    """``layer``, or a copy whose weight arrays hold 0 where the layer's hold NaN or Inf."""
    fields = {
        role: _zero_nonfinite(value)
        for role in (*WEIGHT_ROLES, "selection_bias")
        if (value := getattr(layer, role)) is not None and poisoned(value)
    }
    return dataclasses.replace(layer, **fields) if fields else layer


def _zero_nonfinite(value: np.ndarray) -> np.ndarray:
    zeroed = value.copy()
    zeroed[~np.isfinite(value)] = 0
    return zeroed


def confirms(
    walk: GraphWalk,
    prelude: list[onnx.NodeProto],
    region: list[onnx.NodeProto],
    layer: MoELayer,
    x: str,
    logits: str,
    out: str,
) -> bool:
    """Run the region (after the ``prelude`` computed from ``x``) alone; compare with the layer.

    NaN and Inf in the weights are replaced by 0 on both sides first: where a weight is, it is
    what the layer reads, whatever its value, but ``NaN != NaN`` would fail the comparison (and
    a graph that computes every expert for every token spreads one NaN expert over all tokens
    where the layer's sparse semantics do not). Masks and fill values (``-inf`` among zeros:
    :func:`moec.frontend.nonfinite.poisoned`) are the graph's arithmetic and stay.
    """
    region = list(prelude) + list(region)
    produced = {o for n in region for o in n.output}
    outside_nodes: dict[int, onnx.NodeProto] = {}
    shape_sources: set[str] = set()
    for node in region:
        for tensor in node.input:
            if tensor and tensor not in produced and tensor not in (x, logits):
                nodes, sources = walk.shape_producers(tensor) or ([], set())
                outside_nodes |= {id(n): n for n in nodes}
                shape_sources |= sources - {x, logits} - produced
    # A shape read off another layer's tensor (merged by onnxruntime's fusions) is read off this
    # layer's tensor computed the same way.
    local = _local_equivalents(walk, shape_sources, region, (x, logits))
    shape_sources -= set(local)
    outside = [_reading(node, local) for node in walk.in_graph_order(list(outside_nodes.values()))]
    computed = [_finite_node(node) for node in _topological(outside + region)]
    initializers = walk.index.initializers
    read = dict.fromkeys(i for n in computed for i in n.input)
    consts = [_finite_tensor(initializers[t]) for t in read if t in initializers]
    layer = _finite_layer(layer)
    rng = np.random.default_rng(1234)
    # 6 tokens with unit-scale logits (routing weights far from 0/1, so e.g. renormalised and
    # raw top-k weights differ clearly), then one token per expert whose logit for it is
    # boosted: every expert is hit, so a graph that only works when every expert is (a trace
    # of a loop over the hit experts) is still exercised as a whole.
    # With an expert capacity, first capacity + 2 more tokens all for expert 0, so that the
    # sample drops some (when the capacity is small enough to sample).
    sampled = layer.capacity is not None and layer.capacity <= MAX_SAMPLED_CAPACITY
    crowd = layer.capacity + 2 if sampled else 0
    experts, tokens = layer.num_experts, 6 + crowd + layer.num_experts
    x_value = rng.standard_normal(_sample_shape(walk, x, layer.hidden, tokens)).astype(np.float32)
    logit_value = rng.standard_normal(_sample_shape(walk, logits, experts, tokens))
    flat = logit_value.reshape(-1, experts)  # fewer rows when the graph fixes the token count
    flat[6 : 6 + crowd, 0] += 4.0
    boosted = np.arange(min(experts, len(flat)))
    flat[len(flat) - len(boosted) + boosted, boosted] += 4.0
    logit_value = flat.reshape(logit_value.shape).astype(np.float32)
    feeds = {x: x_value, logits: logit_value}
    sampled_dims = _sampled_dims(walk, feeds)
    for source in sorted(shape_sources):  # read for their shapes only: zeros of the sampled shape
        if source not in walk.shapes:
            return False
        dims = [
            size if size is not None else sampled_dims.get(name, UNRELATED_DIM)
            for size, name in zip(walk.shapes[source], walk.dim_names[source], strict=True)
        ]
        feeds[source] = np.zeros(dims, dtype=np.float32)
    graph = helper.make_graph(
        computed,
        "moe_region",
        [
            helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, value.shape)
            for name, value in feeds.items()
        ],
        [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
        {t.name: t for t in consts}.values(),
    )
    model = helper.make_model(graph, opset_imports=walk.opsets)
    # Overflow and the like on this random sample (huge weights) are the comparison's business,
    # not the user's: numpy's warnings about them are not printed.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            (actual,) = ReferenceEvaluator(model, new_ops=FIXED_OPS).run(None, feeds)
        except Exception:  # the candidate is not a runnable block on its own
            return False
        try:
            expected = moe_forward(
                layer,
                x_value.reshape(-1, layer.hidden),
                logit_value.reshape(-1, layer.num_experts),
                sequence=x_value.shape[-2] if x_value.ndim >= 3 else None,
            )
        except ValueError:  # the sample does not fit the layer (tokens not whole sequences)
            return False
        actual = np.asarray(actual, dtype=np.float64)
        if actual.size != expected.size or not expected.size:  # an empty sample shows nothing
            return False
        error = np.abs(actual.reshape(expected.shape) - expected).max()
        return bool(error <= 1e-4 * (1.0 + np.abs(expected).max()))
