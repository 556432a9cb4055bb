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

from moec.frontend.fold import infer_types
from moec.frontend.graph import GraphIndex, attribute

MATMUL_OPS = ("MatMul", "Gemm")
VIEW_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
FLOAT = onnx.TensorProto.FLOAT
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}
SIGNATURE_CONSTANT = 64  # integer constants up to this many elements are part of a signature by value


class GraphWalk:
    """Walks over one graph (whose model imports ``opsets``), in graph order, with its inferred
    shapes (``None`` for a dimension shape inference left symbolic; through the contrib ops that
    keep their input's shape too: :func:`moec.frontend.fold.infer_types`)."""

    def __init__(self, index: GraphIndex, opsets: list[onnx.OperatorSetIdProto]) -> None:
        self.index = index
        self.opsets = opsets or [helper.make_opsetid("", 17)]
        self.position = {id(n): i for i, n in enumerate(index.graph.node)}
        self.graph_outputs = {o.name for o in index.graph.output}
        self._constant_memo: dict[str, list[onnx.NodeProto] | None] = {}
        model = helper.make_model(index.graph, opset_imports=self.opsets)
        try:
            types = infer_types(model)
        except Exception:  # shape inference is a hint only; fall back to the graph's own types
            types = {v.name: v.type for v in [*index.graph.input, *index.graph.output]}
        self.shapes: dict[str, list] = {}
        self.dim_names: dict[str, list[str | None]] = {}
        for name, ty in types.items():
            if ty.HasField("tensor_type") and ty.tensor_type.HasField("shape"):
                dims = ty.tensor_type.shape.dim
                self.shapes[name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
                self.dim_names[name] = [d.dim_param or None for d in dims]
        self._signatures: dict[str, int] = {}
        self._interned: dict[tuple, int] = {}
        self._shape_memo: dict[str, tuple[list[onnx.NodeProto], set[str]] | None] = {}

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
        """The nodes reachable from ``logits`` without passing a matmul or reading a shape, in
        graph order (onnxruntime's CPU fusions let later layers read shapes of this layer's
        routing tensors: what follows a ``Shape`` is not this router's routing)."""
        seen: dict[int, onnx.NodeProto] = {}
        frontier = [logits]
        while frontier:
            for node in self.index.consumers.get(frontier.pop(), []):
                if id(node) not in seen and node.op_type not in (*MATMUL_OPS, "Shape", "Size"):
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

    def shape_producers(self, tensor: str) -> tuple[list[onnx.NodeProto], set[str]] | None:
        """The nodes computing ``tensor`` from constants and the *shapes* of other tensors alone
        (``Shape`` → ``Gather`` → ``Mul`` …), in graph order, with the tensors whose shapes they
        read; None when it depends on a value that is not a shape.

        transformers' exporter sizes an MoE block's scratch by the token count it reads off
        ``input_ids``' shape: a function of the block input's shape too, not of other data.
        """
        if tensor not in self._shape_memo:
            node = self.index.producer.get(tensor)
            found: tuple[list[onnx.NodeProto], set[str]] | None
            if tensor in self.index.initializers or self.constant_producers(tensor) is not None:
                found = (self.constant_producers(tensor) or [], set())
            elif node is None:
                found = None
            elif node.op_type == "Shape":
                found = ([node], {node.input[0]})
            else:
                nodes, sources = [node], set()
                for source in filter(None, node.input):
                    upstream = self.shape_producers(source)
                    if upstream is None:
                        nodes = None
                        break
                    nodes = upstream[0] + nodes
                    sources |= upstream[1]
                found = None if nodes is None else (nodes, sources)
            self._shape_memo[tensor] = found
        return self._shape_memo[tensor]

    def closed(self, region: list[onnx.NodeProto], out: str, allowed_inputs: set[str]) -> bool:
        """Whether nothing outside ``region`` reads what it computes but ``out`` and shapes, and
        it reads only ``allowed_inputs`` and what constants and shapes compute
        (:meth:`shape_producers`).

        Shapes may cross: onnxruntime's CPU fusions merge equal shape computations of all layers
        into the first (every layer's top-k count is ``Shape`` of layer 0's indices), which the
        rewrite keeps for as long as anything reads them (:func:`moec.frontend.rewrite.replace_blocks`).
        """
        ids = {id(n) for n in region}
        produced = {o for n in region for o in n.output}
        for node in region:
            for tensor in node.output:
                if tensor == out:
                    continue
                if tensor in self.graph_outputs:
                    return False
                escapes = any(id(c) not in ids for c in self.index.consumers.get(tensor, []))
                if escapes and self.shape_producers(tensor) is None:
                    return False
            for tensor in node.input:
                if (
                    tensor
                    and tensor not in produced
                    and tensor not in allowed_inputs
                    and self.shape_producers(tensor) is None
                ):
                    return False
        return True

    def signature(self, tensor: str) -> int:
        """How ``tensor`` is computed, as a number that names no tensor: equal for two tensors
        computed by the same ops with the same attributes and small integer constants from
        matmul outputs (by their weight's shape), float constants of the same shapes (each layer
        has its own weights) and the same graph inputs.

        Two layers' tensors with one signature hold values of the same shape for the same token
        count: the router's top-k indices, flattened, in every layer. (Hash-consed: each distinct
        computation gets the next number, so a signature costs one visit per node.)
        """
        stack = [tensor]
        while stack:
            current = stack[-1]
            if current in self._signatures:
                stack.pop()
                continue
            node = self.index.producer.get(current)
            key = self._leaf_key(current, node)
            if key is None:
                pending = [i for i in node.input if i and i not in self._signatures]
                if pending:
                    stack.extend(pending)
                    continue
                attrs = tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute))
                inputs = tuple(self._signatures[i] if i else -1 for i in node.input)
                key = (node.domain, node.op_type, list(node.output).index(current), attrs, inputs)
            self._signatures[current] = self._interned.setdefault(key, len(self._interned))
            stack.pop()
        return self._signatures[tensor]

    def _leaf_key(self, tensor: str, node: onnx.NodeProto | None) -> tuple | None:
        """:meth:`signature`'s key of a tensor it does not look above, or None for a computed one:
        integer constants by value, float ones by shape (a float initializer is not even read),
        matmul outputs by their weight's shape, graph inputs by name."""
        initializer = self.index.initializers.get(tensor)
        if initializer is not None and initializer.data_type in FLOAT_TYPES:
            return ("float", initializer.data_type, tuple(initializer.dims))
        if node is not None and node.op_type in MATMUL_OPS:
            weight = self.index.initializers.get(node.input[1]) if len(node.input) > 1 else None
            return ("matmul", tuple(weight.dims) if weight is not None else None)
        value = self.index.constant(tensor)
        if value is not None:
            if value.size <= SIGNATURE_CONSTANT and value.dtype.kind in "biu":  # shape data, indices
                return ("const", value.dtype.str, value.shape, value.tobytes())
            return ("float", value.dtype.str, value.shape)
        return ("input", tensor) if node is None else None
