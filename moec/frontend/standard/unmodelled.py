"""What a standard-op graph may compute that a plain routed layer does not: an expert capacity,
and an experts loop a trace unrolled for only some experts.

- **Expert capacity** (Switch Transformers): a running count of each expert's tokens (``CumSum``)
  compared with a constant. The layer is proposed with that ``capacity`` (per sequence, in token
  order, as :class:`~moec.canonical.layer.MoELayer` models it) and, should confirmation reject
  that, without it and with a caveat: moec then computes every token, which differs from the
  graph only when an expert overflows.
- **Trace-specialised graphs**: TorchScript records transformers' ``eager`` loop over the experts
  its trace input happened to hit. When fewer iterations than the router has experts were
  recorded, no layer computes what the model means, so the graph is refused with how to re-export
  it rather than compiled to wrong results.
"""

from __future__ import annotations

import dataclasses

import onnx

from moec.canonical.layer import MoELayer
from moec.errors import MoecError
from moec.frontend.graph import GraphIndex, node_label
from moec.frontend.standard.operands import count
from moec.frontend.standard.router import Router
from moec.frontend.standard.walks import GraphWalk


def expert_capacity(index: GraphIndex, region: list[onnx.NodeProto]) -> int | None:
    """The expert capacity ``region`` applies, if any: a running count of each expert's tokens
    (``CumSum``) compared with a constant (Switch Transformers: ``<= capacity``)."""
    counts = {n.output[0] for n in region if n.op_type == "CumSum"}
    for node in region:
        if node.op_type in ("LessOrEqual", "Less") and node.input[0] in counts:
            limit = count(index, node.input[1])
            if limit is not None:
                return limit - (node.op_type == "Less")
    return None


def capacity_candidates(layer: MoELayer, capacity: int | None) -> list[MoELayer]:
    """``layer`` as the region may compute it: with the graph's expert capacity, else (a running
    count that is not the per-sequence one moec models) without it, saying so."""
    if capacity is None:
        return [layer]
    unmodelled = (
        f"the graph drops the tokens past an expert capacity of {capacity} in a way moec does not "
        f"model; moec computes every token, so outputs differ when more than {capacity} tokens go "
        "to one expert"
    )
    return [dataclasses.replace(layer, capacity=capacity), dataclasses.replace(layer, caveats=(unmodelled,))]


def unrolled_experts(walk: GraphWalk, router: Router) -> int | None:
    """How many expert iterations a traced loop over the *hit* experts was unrolled into.

    transformers' ``eager`` experts loop over ``nonzero(expert_hit)``; TorchScript records
    one iteration per expert the trace input hit, as a ``Split`` of that ``NonZero`` into
    fixed pieces. None when no such ``Split`` reads the routing of ``router``.
    """
    selected = {o for n in router.ops("TopK", "ArgMax") for o in n.output}
    for node in walk.descendants(router.logits):
        if node.op_type != "Split":
            continue
        between = walk.nodes_between(router.logits, node.input[0])
        if any(n.op_type == "NonZero" for n in between) and selected & {i for n in between for i in n.input}:
            return len(node.output)
    return None


def reject_trace_specialised(walk: GraphWalk, router: Router) -> None:
    """Refuse a router whose experts were unrolled for fewer experts than it routes to."""
    unrolled = unrolled_experts(walk, router)
    if unrolled is not None and unrolled < router.experts:
        selection = node_label((router.ops("TopK", "ArgMax") or router.nodes)[-1])
        raise MoecError(
            f"{selection}: this graph computes only {unrolled} of the router's {router.experts} experts: "
            "the TorchScript exporter unrolled transformers' 'eager' experts loop for the experts its "
            "trace input happened to hit, so other routings give wrong results or fail; re-export "
            "with config._experts_implementation = 'batched_mm' (or torch.onnx.export(..., dynamo=True))"
        )
