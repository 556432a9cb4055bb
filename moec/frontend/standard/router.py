"""Router rules: which matmul is an MoE router, and which routing rules its routing area may
compute.

A router is ``logits = x @ W_r (+ b_r)`` with a constant ``W_r`` ``[H, E]`` whose *routing area*
(the nodes after the logits, up to the next matmul) selects experts with a ``TopK`` over ``E``
scores or with ``ArgMax`` steps. The area's ops hint at the rule (see
:class:`~moec.canonical.layer.MoELayer`): ``Softmax`` or ``Sigmoid`` scores; ``Abs`` beside
``ArgMax`` is PhiMoE's sparsemixer (its ``Greater`` threshold is twice the jitter eps); an
``Add`` of a constant ``[E]`` after the scores is a selection bias; a ``Reshape`` to
``[.., G, E/G]`` with a ``TopK`` over ``G`` group scores is group-limited routing; a float scalar
``Mul`` may be a routed scaling factor; a ``Div`` hints at renormalisation; a ``Mul`` feeding a
matmul applies the routing weight to the expert input (Llama 4). Where the ops leave a choice
open, every choice is listed, hinted ones first, for confirmation to decide.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import onnx

from moec.frontend.graph import GraphIndex, attribute
from moec.frontend.standard.operands import count, scalar, weight_of
from moec.frontend.standard.walks import MATMUL_OPS, VIEW_OPS, GraphWalk


@dataclasses.dataclass
class Router:
    """A router candidate: ``logits = input @ W_r (+ b_r)`` and the routing area after it."""

    input: str
    logits: str
    nodes: list[onnx.NodeProto]  # the router matmul (and its bias Add)
    experts: int
    top_k: int
    area: list[onnx.NodeProto]

    def ops(self, *op_types: str) -> list[onnx.NodeProto]:
        """The routing area's nodes of these op types, in graph order."""
        return [n for n in self.area if n.op_type in op_types]


def find_router(walk: GraphWalk, node: onnx.NodeProto) -> Router | None:
    """``node`` as a router matmul: a constant ``[H, E]`` weight whose routing area selects
    experts (a ``TopK`` over ``E`` scores, or ``ArgMax`` steps); None otherwise."""
    index = walk.index
    weight = weight_of(index, node) if node.op_type in MATMUL_OPS else None
    if weight is None or weight.ndim != 2 or weight.shape[0] < 2:
        return None
    experts = weight.shape[0]
    nodes, logits = [node], node.output[0]
    consumers = index.consumers.get(logits, [])
    if len(consumers) == 1 and consumers[0].op_type == "Add":  # router bias (GPT-OSS)
        other = [i for i in consumers[0].input if i != logits]
        if other and index.constant(other[0]) is not None:
            nodes.append(consumers[0])
            logits = consumers[0].output[0]
    area = walk.routing_area(logits)
    topks = [
        n
        for n in area
        if n.op_type == "TopK"
        and count(index, n.input[1]) is not None
        and attribute(n, "largest", 1) == 1
        and walk.shapes.get(n.input[0], [experts])[-1] in (experts, None)
    ]
    if topks:
        k = count(index, topks[-1].input[1])
    else:
        k = sum(1 for n in area if n.op_type == "ArgMax")
    if not 1 <= k <= experts:
        return None
    return Router(node.input[0], logits, nodes, experts, k, area)


def routing_choices(index: GraphIndex, router: Router) -> list[dict[str, Any]]:
    """The routing rules (MoELayer fields) the routing area may compute, hinted ones first."""
    sparsemixer = bool(router.ops("Abs")) and bool(router.ops("ArgMax"))
    fields: dict[str, Any] = {"scoring": "softmax"}
    if sparsemixer:
        thresholds = [scalar(index, n.input[1]) for n in router.ops("Greater")]
        jitter_eps = next((t / 2 for t in thresholds if t is not None), 0.0)
        fields = {"scoring": "sparsemixer", "jitter_eps": jitter_eps}
    elif router.ops("Sigmoid") and not router.ops("Softmax"):
        fields["scoring"] = "sigmoid"
    scored = {o for n in router.ops("Sigmoid", "Softmax") for o in n.output}
    for node in router.ops("Add"):
        bias = [index.constant(i) for i in node.input if i not in scored]
        reads_scores = any(i in scored for i in node.input)
        if reads_scores and bias and bias[0] is not None and bias[0].size == router.experts:
            fields["selection_bias"] = bias[0].reshape(-1)
    for node in router.ops("Reshape"):
        shape = index.constant(node.input[1])
        if (
            shape is not None
            and shape.ndim == 1
            and shape.dtype.kind in "iu"
            and shape.size >= 2
            and shape[-1] > 0
            and int(shape[-2]) * int(shape[-1]) == router.experts  # Python ints: no int64 overflow
        ):
            groups = int(shape[-2])
            # the TopK over the group scores: a ReduceSum of each group's top two
            group_ks = [
                count(index, n.input[1])
                for n in router.ops("TopK")
                if getattr(index.producer.get(n.input[0]), "op_type", None) == "ReduceSum"
            ]
            if groups > 1 and group_ks and group_ks[0] is not None:
                fields |= {"groups": groups, "top_groups": group_ks[0]}
    scales = [1.0]
    for node in router.ops("Mul"):
        value = next((v for v in (scalar(index, i) for i in node.input) if v is not None), None)
        if value is not None and value not in scales:
            scales.append(value)
    gain_on_input = [False]
    if router.top_k == 1 and any(_feeds_matmul(index, n.output[0]) for n in router.ops("Mul")):
        gain_on_input.insert(0, True)
    normalize = [bool(router.ops("Div")), not router.ops("Div")]
    return [
        fields | {"normalize": norm, "scale": scale, "gain_on_input": gain}
        for gain, scale, norm in itertools.product(gain_on_input, scales[::-1], normalize)
    ]


def _feeds_matmul(index: GraphIndex, tensor: str) -> bool:
    """Whether ``tensor`` is a matmul's input, directly or through reshapes."""
    for node in index.consumers.get(tensor, []):
        if node.op_type in MATMUL_OPS or (node.op_type in VIEW_OPS and _feeds_matmul(index, node.output[0])):
            return True
    return False
