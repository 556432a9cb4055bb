"""The graph as the standard-op block finder walks it: which nodes lie downstream of a tensor,
upstream of it or between two, where a router's routing area ends, which reshapes made a tensor,
what is computed from constants alone, and whether a region is closed.

Every later step (router rules, the block's region, confirmation, trace refusal) asks these
questions of the same graph, so they are answered here once, over one :class:`GraphWalk` that
also holds the shapes onnx's shape inference found (hints only: a graph it cannot type still
walks).
"""

from __future__ import annotations

import onnx
from onnx import helper

from moec.frontend.graph import GraphIndex, attribute

MATMUL_OPS = ("MatMul", "Gemm")
VIEW_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
FLOAT = onnx.TensorProto.FLOAT


class GraphWalk:
    """Walks over one graph (whose model imports ``opsets``), in graph order, with its inferred
    shapes (``None`` for a dimension shape inference left symbolic)."""

    def __init__(self, index: GraphIndex, opsets: list[onnx.OperatorSetIdProto]) -> None:
        self.index = index
        self.opsets = opsets or [helper.make_opsetid("", 17)]
        self.position = {id(n): i for i, n in enumerate(index.graph.node)}
        self.graph_outputs = {o.name for o in index.graph.output}
        self._constant_memo: dict[str, list[onnx.NodeProto] | None] = {}
        model = helper.make_model(index.graph, opset_imports=self.opsets)
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
            infos = list(inferred.value_info) + list(inferred.input) + list(inferred.output)
        except Exception:  # shape inference is a hint only; fall back to no shapes
            infos = list(index.graph.input) + list(index.graph.output)
        self.shapes: dict[str, list] = {}
        for info in infos:
            if info.type.tensor_type.HasField("shape"):
                self.shapes[info.name] = [
                    d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim
                ]

    def in_graph_order(self, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """``nodes`` sorted by their position in the graph."""
        return sorted(nodes, key=lambda n: self.position[id(n)])

    def descendants(self, tensor: str) -> list[onnx.NodeProto]:
        """Every node that reads ``tensor``, directly or through other nodes, in graph order."""
        seen: dict[int, onnx.NodeProto] = {}
        frontier = [tensor]
        while frontier:
            for node in self.index.consumers.get(frontier.pop(), []):
                if id(node) not in seen:
                    seen[id(node)] = node
                    frontier.extend(node.output)
        return self.in_graph_order(list(seen.values()))

    def ancestor_ids(self, tensor: str) -> set[int]:
        """The ids of every node ``tensor`` is computed from."""
        seen: set[int] = set()
        frontier = [tensor]
        while frontier:
            node = self.index.producer.get(frontier.pop())
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                frontier.extend(node.input)
        return seen

    def nodes_between(self, source: str, tensor: str) -> list[onnx.NodeProto]:
        """The nodes downstream of ``source`` that ``tensor`` is computed from, in graph order."""
        ancestors = self.ancestor_ids(tensor)
        return [n for n in self.descendants(source) if id(n) in ancestors]

    def routing_area(self, logits: str) -> list[onnx.NodeProto]:
        """The nodes reachable from ``logits`` without passing a matmul, in graph order."""
        seen: dict[int, onnx.NodeProto] = {}
        frontier = [logits]
        while frontier:
            for node in self.index.consumers.get(frontier.pop(), []):
                if id(node) not in seen and node.op_type not in MATMUL_OPS:
                    seen[id(node)] = node
                    frontier.extend(node.output)
        return self.in_graph_order(list(seen.values()))

    def _is_view(self, node: onnx.NodeProto) -> bool:
        """A reshape or float-to-float ``Cast`` of a computed tensor: the same values."""
        if self.index.constant(node.input[0]) is not None:
            return False
        return node.op_type in VIEW_OPS or (node.op_type == "Cast" and attribute(node, "to", 0) == FLOAT)

    def views(self, x: str) -> list[onnx.NodeProto]:
        """The chain of reshapes that made ``x`` from an earlier tensor, earliest first.

        Exporters flatten the block input (``[b, s, H]`` → ``[b*s, H]``) once for the router
        and once more for the experts; the block's input is the tensor before that chain,
        and the chain's outputs are the same tokens in another shape.
        """
        chain = []
        node = self.index.producer.get(x)
        while node is not None and self._is_view(node):
            chain.append(node)
            node = self.index.producer.get(node.input[0])
        return chain[::-1]

    def constant_producers(self, tensor: str) -> list[onnx.NodeProto] | None:
        """The nodes computing ``tensor`` from constants alone (none for an initializer), or
        None when it depends on a graph input."""
        if tensor not in self._constant_memo:
            node = self.index.producer.get(tensor)
            if tensor in self.index.initializers:
                found: list | None = []
            elif node is None:
                found = None
            else:
                found = [node]
                for source in filter(None, node.input):
                    upstream = self.constant_producers(source)
                    if upstream is None:
                        found = None
                        break
                    found = upstream + found
            self._constant_memo[tensor] = found
        return self._constant_memo[tensor]

    def closed(self, region: list[onnx.NodeProto], out: str, allowed_inputs: set[str]) -> bool:
        """Whether nothing outside ``region`` reads what it computes but ``out``, and it reads
        only ``allowed_inputs`` and what constants compute."""
        ids = {id(n) for n in region}
        produced = {o for n in region for o in n.output}
        for node in region:
            for tensor in node.output:
                if tensor == out:
                    continue
                if tensor in self.graph_outputs:
                    return False
                if any(id(c) not in ids for c in self.index.consumers.get(tensor, [])):
                    return False
            for tensor in node.input:
                if (
                    tensor
                    and tensor not in produced
                    and tensor not in allowed_inputs
                    and self.constant_producers(tensor) is None
                ):
                    return False
        return True
