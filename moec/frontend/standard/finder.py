"""The standard-op block finder: routers found, each one's block region delimited, candidate
layers extracted and the first that confirms numerically kept.

For each router (:mod:`~moec.frontend.standard.router`), the block input is the tensor before
the reshapes that feed the router; the block output is the first tensor after the logits with
the input's rank (or flat ``[tokens, H]``) whose *region* (nodes downstream of the input and
upstream of the output, router excluded) is closed: nothing inside is read from outside but that
tensor, and it reads only the input, the logits and constants. The region's candidate layers
(experts × routing rules × capacity readings) are tried in order, and the first that
:mod:`~moec.frontend.standard.confirm` confirms becomes the block. A router no region matches is
checked for a trace-specialised experts loop, which is refused.
"""

from __future__ import annotations

import itertools

import onnx

from moec.canonical.layer import MoELayer
from moec.frontend.block import MoEBlock
from moec.frontend.graph import GraphIndex
from moec.frontend.standard.confirm import confirms
from moec.frontend.standard.experts import expert_choices
from moec.frontend.standard.router import Router, find_router, routing_choices
from moec.frontend.standard.unmodelled import capacity_candidates, expert_capacity, reject_trace_specialised
from moec.frontend.standard.walks import GraphWalk


def find_standard_blocks(
    index: GraphIndex, opsets: list[onnx.OperatorSetIdProto], first_index: int = 0
) -> list[MoEBlock]:
    """Standard-op MoE blocks of the graph (whose model imports ``opsets``), in graph order."""
    walk = GraphWalk(index, list(opsets))
    blocks: list[MoEBlock] = []
    claimed: set[int] = set()
    for node in index.graph.node:
        if id(node) in claimed:
            continue
        router = find_router(walk, node)
        if router is None:
            continue
        block = _match(walk, router, f"moe{first_index + len(blocks)}")
        if block is not None:
            blocks.append(block)
            claimed |= {id(n) for n in block.nodes}
        else:
            reject_trace_specialised(walk, router)
    return blocks


def _match(walk: GraphWalk, router: Router, name: str) -> MoEBlock | None:
    """The block ``router`` routes for: the first closed region after its logits with a candidate
    layer that confirms; None when there is none."""
    router_input, logits = router.input, router.logits
    views = walk.views(router_input)
    x = views[0].input[0] if views else router_input
    # The views and the shape arithmetic they use (Shape(x) → Gather → Concat ...): functions
    # of x alone, which the experts may read too.
    prelude = [n for n in walk.descendants(x) if id(n) in walk.ancestor_ids(router_input)]
    aliases = {x} | {o for n in prelude for o in n.output}
    router_ids = {id(n) for n in router.nodes} | walk.ancestor_ids(logits)
    below_x = [n for n in walk.descendants(x) if id(n) not in router_ids]
    x_rank = len(walk.shapes[x]) if x in walk.shapes else None
    for candidate in walk.descendants(logits):
        out = candidate.output[0]
        out_rank = len(walk.shapes[out]) if out in walk.shapes else None
        flat = x_rank is not None and x_rank > 2 and out_rank == 2
        if x_rank is not None and out_rank is not None and out_rank != x_rank and not flat:
            continue
        ancestors = walk.ancestor_ids(out)
        region = [n for n in below_x if id(n) in ancestors]
        if not walk.closed(region, out, aliases | {logits}):
            continue
        capacity = expert_capacity(walk.index, region)
        for layer in _candidate_layers(walk.index, region, router, name):
            for candidate_layer in capacity_candidates(layer, capacity):
                if confirms(walk, prelude, region, candidate_layer, x, logits, out):
                    return MoEBlock(
                        layer=candidate_layer,
                        input=x,
                        logits=logits,
                        output=out,
                        nodes=region,
                        flat_output=flat,
                    )
    return None


def _candidate_layers(
    index: GraphIndex, region: list[onnx.NodeProto], router: Router, name: str
) -> list[MoELayer]:
    """The layers ``region`` may compute, in the order confirmation tries them: each reading of
    its experts with each routing rule the router's area may compute (combinations that make
    no valid layer are left out)."""
    experts = expert_choices(index, region, router.top_k, router.experts, name)
    if not experts:
        return []
    layers = []
    for fields, routing in itertools.product(experts, routing_choices(index, router)):
        try:
            layers.append(MoELayer(**(fields | routing)))
        except ValueError:
            continue
    return layers
