"""Recognises MoE blocks written with standard ONNX ops, whatever exporter wrote them.

Recognition is by structure, confirmed by semantics:

1. **Router**: ``logits = x @ W_r (+ b_r)`` with a constant ``W_r`` ``[H, E]`` whose *routing
   area* (the nodes after the logits, up to the next matmul) selects experts with a ``TopK``
   over ``E`` scores or with ``ArgMax`` steps. ``x`` is the block input. The area's ops hint
   at the routing rule (see :class:`~moec.frontend.layer.MoELayer`): ``Softmax`` or
   ``Sigmoid`` scores; ``Abs`` beside ``ArgMax`` is PhiMoE's sparsemixer (its ``Greater``
   threshold is twice the jitter eps); an ``Add`` of a constant ``[E]`` after the scores is a
   selection bias; a ``Reshape`` to ``[.., G, E/G]`` with a ``TopK`` over ``G`` group scores is
   group-limited routing; a float scalar ``Mul`` may be a routed scaling factor; a ``Mul``
   feeding a matmul applies the routing weight to the expert input (Llama 4).
2. **Block output**: the first tensor after the logits with ``x``'s rank whose *region*
   (nodes downstream of ``x`` and upstream of it, router excluded) is closed: nothing inside
   is read from outside but that tensor, and it reads only ``x``, the logits and constants.
3. **Experts**: the region's MatMul/Gemm nodes with constant weights. 3-D ``[E, in, out]``
   weights are batched experts; 2-D ones are grouped per expert around each down
   projection (experts ordered as they appear in the graph). A first-layer matmul whose
   path to the down projection passes an activation is the gate of a gated expert.
   ``Relu``/``Erf``/``Tanh``/``Sigmoid`` name the activation; ``Add`` of a constant after a matmul is
   its bias; a ``Div`` in the routing area hints at renormalisation.
4. **Confirmation**: the region is run alone with the ONNX reference evaluator on random
   tokens and logits, and must match the extracted layer's numpy semantics; where the
   structure leaves a choice open (renormalised or not, a fused weight's split, which scalar
   is the scaling factor) every choice is a candidate, hinted ones first. A candidate
   that does not match is not an MoE block as far as moec is concerned (it stays in the
   graph and is compiled densely by TVM).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator

from moec.errors import MoecError
from moec.frontend.block import MoEBlock
from moec.frontend.graph import GraphIndex, attribute, node_label
from moec.frontend.layer import MoELayer
from moec.reference.canonical import moe_forward
from moec.reference.onnx_fixes import FIXED_OPS

MATMUL_OPS = ("MatMul", "Gemm")
VIEW_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
GATHER_OPS = ("Gather", "GatherND")
FLOAT = onnx.TensorProto.FLOAT
#: Largest expert capacity whose token drops the confirmation sample exercises (one more token
#: than the capacity goes to one expert); a larger one is confirmed on the structure alone.
MAX_SAMPLED_CAPACITY = 1024


def find_standard_blocks(
    index: GraphIndex, opsets: list[onnx.OperatorSetIdProto], first_index: int = 0
) -> list[MoEBlock]:
    """Standard-op MoE blocks of the graph (whose model imports ``opsets``), in graph order."""
    finder = _BlockFinder(index, list(opsets))
    blocks: list[MoEBlock] = []
    claimed: set[int] = set()
    for node in index.graph.node:
        if id(node) in claimed:
            continue
        router = finder.router(node)
        if router is None:
            continue
        block = finder.match(router, f"moe{first_index + len(blocks)}")
        if block is not None:
            blocks.append(block)
            claimed |= {id(n) for n in block.nodes}
        else:
            finder.reject_trace_specialised(router)
    return blocks


@dataclasses.dataclass
class _Router:
    """A router candidate: ``logits = input @ W_r (+ b_r)`` and the routing area after it."""

    input: str
    logits: str
    nodes: list[onnx.NodeProto]  # the router matmul (and its bias Add)
    experts: int
    top_k: int
    area: list[onnx.NodeProto]

    def ops(self, *op_types: str) -> list[onnx.NodeProto]:
        return [n for n in self.area if n.op_type in op_types]


class _BlockFinder:
    def __init__(self, index: GraphIndex, opsets: list[onnx.OperatorSetIdProto]) -> None:
        self.index = index
        self.opsets = opsets or [helper.make_opsetid("", 17)]
        self.nodes = list(index.graph.node)
        self.position = {id(n): i for i, n in enumerate(self.nodes)}
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

    # --- graph walks -------------------------------------------------------------------
    def _descendant_nodes(self, tensor: str) -> list[onnx.NodeProto]:
        seen: dict[int, onnx.NodeProto] = {}
        frontier = [tensor]
        while frontier:
            for node in self.index.consumers.get(frontier.pop(), []):
                if id(node) not in seen:
                    seen[id(node)] = node
                    frontier.extend(node.output)
        return sorted(seen.values(), key=lambda n: self.position[id(n)])

    def _ancestor_ids(self, tensor: str) -> set[int]:
        seen: set[int] = set()
        frontier = [tensor]
        while frontier:
            node = self.index.producer.get(frontier.pop())
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                frontier.extend(node.input)
        return seen

    # --- trace-specialised graphs ---------------------------------------------------------
    def unrolled_experts(self, router: _Router) -> int | None:
        """How many expert iterations a traced loop over the *hit* experts was unrolled into.

        transformers' ``eager`` experts loop over ``nonzero(expert_hit)``; TorchScript records
        one iteration per expert the trace input hit, as a ``Split`` of that ``NonZero`` into
        fixed pieces. None when no such ``Split`` reads the routing of ``router``.
        """
        selected = {o for n in router.ops("TopK", "ArgMax") for o in n.output}
        for node in self._descendant_nodes(router.logits):
            if node.op_type != "Split":
                continue
            between = self._nodes_between(router.logits, node.input[0])
            if any(n.op_type == "NonZero" for n in between) and selected & {
                i for n in between for i in n.input
            }:
                return len(node.output)
        return None

    def _nodes_between(self, source: str, tensor: str) -> list[onnx.NodeProto]:
        ancestors = self._ancestor_ids(tensor)
        return [n for n in self._descendant_nodes(source) if id(n) in ancestors]

    def reject_trace_specialised(self, router: _Router) -> None:
        """Refuse a router whose experts were unrolled for fewer experts than it routes to."""
        unrolled = self.unrolled_experts(router)
        if unrolled is not None and unrolled < router.experts:
            selection = node_label((router.ops("TopK", "ArgMax") or router.nodes)[-1])
            raise MoecError(
                f"{selection}: this graph computes only {unrolled} of the router's {router.experts} experts: "
                "the TorchScript exporter unrolled transformers' 'eager' experts loop for the experts its "
                "trace input happened to hit, so other routings give wrong results or fail; re-export "
                "with config._experts_implementation = 'batched_mm' (or torch.onnx.export(..., dynamo=True))"
            )

    # --- matching ----------------------------------------------------------------------
    def _producer_past_casts(self, tensor: str) -> onnx.NodeProto | None:
        """The node making ``tensor``, looking through float-to-float ``Cast``s (TorchScript
        writes them around the router)."""
        node = self.index.producer.get(tensor)
        while node is not None and node.op_type == "Cast" and attribute(node, "to", 0) == FLOAT:
            node = self.index.producer.get(node.input[0])
        return node

    def _routing_area(self, logits: str) -> list[onnx.NodeProto]:
        """The nodes reachable from ``logits`` without passing a matmul, in graph order."""
        seen: dict[int, onnx.NodeProto] = {}
        frontier = [logits]
        while frontier:
            for node in self.index.consumers.get(frontier.pop(), []):
                if id(node) not in seen and node.op_type not in MATMUL_OPS:
                    seen[id(node)] = node
                    frontier.extend(node.output)
        return sorted(seen.values(), key=lambda n: self.position[id(n)])

    def router(self, node: onnx.NodeProto) -> _Router | None:
        """``node`` as a router matmul: a constant ``[H, E]`` weight whose routing area selects
        experts (a ``TopK`` over ``E`` scores, or ``ArgMax`` steps); None otherwise."""
        weight = _weight_of(self.index, node) if node.op_type in MATMUL_OPS else None
        if weight is None or weight.ndim != 2 or weight.shape[0] < 2:
            return None
        experts = weight.shape[0]
        nodes, logits = [node], node.output[0]
        consumers = self.index.consumers.get(logits, [])
        if len(consumers) == 1 and consumers[0].op_type == "Add":  # router bias (GPT-OSS)
            other = [i for i in consumers[0].input if i != logits]
            if other and self.index.constant(other[0]) is not None:
                nodes.append(consumers[0])
                logits = consumers[0].output[0]
        area = self._routing_area(logits)
        topks = [
            n
            for n in area
            if n.op_type == "TopK"
            and self.index.constant(n.input[1]) is not None
            and int(attribute(n, "largest", 1)) == 1
            and self.shapes.get(n.input[0], [experts])[-1] in (experts, None)
        ]
        if topks:
            k = int(self.index.constant(topks[-1].input[1]).reshape(-1)[0])
        else:
            k = sum(1 for n in area if n.op_type == "ArgMax")
        if not 1 <= k <= experts:
            return None
        return _Router(node.input[0], logits, nodes, experts, k, area)

    def _is_view(self, node: onnx.NodeProto) -> bool:
        """A reshape or float-to-float ``Cast`` of a computed tensor: the same values."""
        if self.index.constant(node.input[0]) is not None:
            return False
        return node.op_type in VIEW_OPS or (node.op_type == "Cast" and attribute(node, "to", 0) == FLOAT)

    def _views(self, x: str) -> list[onnx.NodeProto]:
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

    def match(self, router: _Router, name: str) -> MoEBlock | None:
        router_input, logits = router.input, router.logits
        views = self._views(router_input)
        x = views[0].input[0] if views else router_input
        # The views and the shape arithmetic they use (Shape(x) → Gather → Concat ...): functions
        # of x alone, which the experts may read too.
        prelude = [n for n in self._descendant_nodes(x) if id(n) in self._ancestor_ids(router_input)]
        aliases = {x} | {o for n in prelude for o in n.output}
        router_ids = {id(n) for n in router.nodes} | self._ancestor_ids(logits)
        below_x = [n for n in self._descendant_nodes(x) if id(n) not in router_ids]
        x_rank = len(self.shapes[x]) if x in self.shapes else None
        for candidate in self._descendant_nodes(logits):
            out = candidate.output[0]
            out_rank = len(self.shapes[out]) if out in self.shapes else None
            flat = x_rank is not None and x_rank > 2 and out_rank == 2
            if x_rank is not None and out_rank is not None and out_rank != x_rank and not flat:
                continue
            ancestors = self._ancestor_ids(out)
            region = [n for n in below_x if id(n) in ancestors]
            if not self._closed(region, out, aliases | {logits}):
                continue
            capacity = _expert_capacity(self.index, region)
            for layer in _extract_layers(self.index, region, router, name):
                for candidate in _capacity_candidates(layer, capacity):
                    if self._confirms(prelude, region, candidate, x, logits, out):
                        return MoEBlock(
                            layer=candidate,
                            input=x,
                            logits=logits,
                            output=out,
                            nodes=region,
                            flat_output=flat,
                        )
        return None

    def _constant_producers(self, tensor: str) -> list[onnx.NodeProto] | None:
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
                    upstream = self._constant_producers(source)
                    if upstream is None:
                        found = None
                        break
                    found = upstream + found
            self._constant_memo[tensor] = found
        return self._constant_memo[tensor]

    def _closed(self, region: list[onnx.NodeProto], out: str, allowed_inputs: set[str]) -> bool:
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
                    and self._constant_producers(tensor) is None
                ):
                    return False
        return True

    def _sample_shape(self, tensor: str, last: int, tokens: int) -> list[int]:
        dims = self.shapes.get(tensor, [None, last])
        return [
            d if d is not None else tokens if i == len(dims) - 2 else 1 for i, d in enumerate(dims[:-1])
        ] + [last]

    def _confirms(self, prelude, region, layer: MoELayer, x: str, logits: str, out: str) -> bool:
        """Run the region (after the ``prelude`` computed from ``x``) alone; compare with the layer."""
        region = list(prelude) + list(region)
        produced = {o for n in region for o in n.output}
        constant_nodes: dict[int, onnx.NodeProto] = {}
        for node in region:
            for tensor in node.input:
                if tensor and tensor not in produced and tensor not in (x, logits):
                    constant_nodes |= {id(n): n for n in self._constant_producers(tensor) or []}
        computed = sorted(constant_nodes.values(), key=lambda n: self.position[id(n)]) + region
        consts = [
            self.index.initializers[t]
            for t in dict.fromkeys(i for n in computed for i in n.input)
            if t in self.index.initializers
        ]
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
        x_value = rng.standard_normal(self._sample_shape(x, layer.hidden, tokens)).astype(np.float32)
        logit_value = rng.standard_normal(self._sample_shape(logits, experts, tokens))
        flat = logit_value.reshape(-1, experts)  # fewer rows when the graph fixes the token count
        flat[6 : 6 + crowd, 0] += 4.0
        boosted = np.arange(min(experts, len(flat)))
        flat[len(flat) - len(boosted) + boosted, boosted] += 4.0
        logit_value = flat.reshape(logit_value.shape).astype(np.float32)
        graph = helper.make_graph(
            computed,
            "moe_region",
            [
                helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, x_value.shape),
                helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, logit_value.shape),
            ],
            [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
            {t.name: t for t in consts}.values(),
        )
        model = helper.make_model(graph, opset_imports=self.opsets)
        try:
            (actual,) = ReferenceEvaluator(model, new_ops=FIXED_OPS).run(
                None, {x: x_value, logits: logit_value}
            )
        except Exception:  # the candidate is not a runnable block on its own
            return False
        expected = moe_forward(
            layer,
            x_value.reshape(-1, layer.hidden),
            logit_value.reshape(-1, layer.num_experts),
            sequence=x_value.shape[-2] if x_value.ndim >= 3 else None,
        )
        actual = np.asarray(actual, dtype=np.float64)
        if actual.size != expected.size:
            return False
        error = np.abs(actual.reshape(expected.shape) - expected).max()
        return bool(error <= 1e-4 * (1.0 + np.abs(expected).max()))


def _expert_capacity(index: GraphIndex, region: list[onnx.NodeProto]) -> int | None:
    """The expert capacity ``region`` applies, if any: a running count of each expert's tokens
    (``CumSum``) compared with a constant (Switch Transformers: ``<= capacity``)."""
    counts = {n.output[0] for n in region if n.op_type == "CumSum"}
    for node in region:
        if node.op_type in ("LessOrEqual", "Less") and node.input[0] in counts:
            limit = index.constant(node.input[1])
            if limit is not None and limit.size == 1:
                return int(limit.reshape(-1)[0]) - (node.op_type == "Less")
    return None


def _capacity_candidates(layer: MoELayer, capacity: int | None) -> list[MoELayer]:
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


def _gathered_weight(index: GraphIndex, tensor: str) -> np.ndarray | None:
    """The constant ``[E, out, in]`` stack that ``tensor`` gathers per token, or None.

    transformers' ``batched_mm`` experts pick each routed token's expert matrix with a
    ``Gather``/``GatherND`` on the stacked weights, then multiply it *in front of* the token
    column: the stack is already ``[E, out, in]``.
    """
    gather = index.producer.get(tensor)
    if gather is None or gather.op_type not in GATHER_OPS or int(attribute(gather, "axis", 0)) != 0:
        return None
    stack = index.constant(gather.input[0])
    return stack if stack is not None and stack.ndim == 3 and stack.dtype == np.float32 else None


def _picked_expert_weight(index: GraphIndex, tensor: str) -> str | None:
    """The name of the constant ``[E, out, in]`` stack whose one expert ``tensor`` is, transposed
    to ``[in, out]`` (how the TorchScript trace of transformers' ``eager`` loop reads it)."""
    transpose = index.producer.get(tensor)
    if (
        transpose is None
        or transpose.op_type != "Transpose"
        or list(attribute(transpose, "perm", [])) != [1, 0]
    ):
        return None
    gather = index.producer.get(transpose.input[0])
    if gather is None or gather.op_type != "Gather" or int(attribute(gather, "axis", 0)) != 0:
        return None
    stack = index.constant(gather.input[0])
    return gather.input[0] if stack is not None and stack.ndim == 3 and stack.dtype == np.float32 else None


def _stack_name(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, bool] | None:
    """The name of the stacked constant a MatMul reads one expert of per token, and whether the
    stack is laid out ``[E, in, out]`` (the expert matrix is the right operand) rather than
    ``[E, out, in]``; None for any other MatMul."""
    if node.op_type != "MatMul":
        return None
    picked = _picked_expert_weight(index, node.input[1])
    if picked is not None:
        return picked, False
    for operand, in_out in ((0, False), (1, True)):
        if _gathered_weight(index, node.input[operand]) is not None:
            return index.producer[node.input[operand]].input[0], in_out
    return None


def _weight_of(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    """The constant weight of a MatMul/Gemm as ``[..., out, in]``, or None."""
    if node.op_type not in MATMUL_OPS or len(node.input) < 2:
        return None
    if node.op_type == "MatMul" and index.constant(node.input[1]) is None:
        found = _stack_name(index, node)
        if found is None:
            return None
        stack = index.constant(found[0])
        return np.swapaxes(stack, -1, -2) if found[1] else stack
    weight = index.constant(node.input[1])
    if weight is None or weight.ndim not in (2, 3) or weight.dtype != np.float32:
        return None
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            return None
        return weight if attribute(node, "transB", 0) else weight.T
    return np.swapaxes(weight, -1, -2)


def _scalar(index: GraphIndex, tensor: str) -> float | None:
    """A floating-point scalar constant's value (integer constants are shape arithmetic)."""
    value = index.constant(tensor) if tensor else None
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        return None
    return float(value.reshape(-1)[0])


def _activation_constants(index: GraphIndex, region: list[onnx.NodeProto]) -> tuple[float, float, float]:
    """GPT-OSS's clamped SwiGLU constants read off the region: ``alpha`` (the scalar the gate is
    multiplied by inside the sigmoid), ``beta`` (a scalar added to the up projection) and
    ``limit`` (a ``Clip`` bound); 1, 0 and inf when absent. Confirmation checks the reading."""
    alpha, beta, limit = 1.0, 0.0, math.inf
    feeds_sigmoid = {n.input[0] for n in region if n.op_type == "Sigmoid"}
    for node in region:
        scalars = [
            v for v in (_scalar(index, i) for i in node.input[1:] if node.op_type != "Clip") if v is not None
        ]
        if node.op_type == "Mul" and node.output[0] in feeds_sigmoid and scalars:
            alpha = scalars[0]
        elif node.op_type == "Add" and len(node.input) == 2 and _scalar(index, node.input[1]) is not None:
            beta = _scalar(index, node.input[1])
        elif node.op_type == "Clip" and len(node.input) > 2 and _scalar(index, node.input[2]) is not None:
            limit = _scalar(index, node.input[2])
    return alpha, beta, limit


def _one_per_stack(index: GraphIndex, matmuls: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``matmuls`` with later ones that read the same weight stack as an earlier one dropped."""
    kept, seen = [], set()
    for node in matmuls:
        found = _stack_name(index, node)
        key = found[0] if found else node.input[1]
        if key not in seen:
            seen.add(key)
            kept.append(node)
    return kept


def _bias_after(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    """The constant added to a matmul's output (through reshapes), or the per-expert bias
    ``[E, out]`` that a ``Gather`` picks per routed token; None if there is none."""
    tensor = node.output[0]
    consumers = index.consumers.get(tensor, [])
    while len(consumers) == 1 and consumers[0].op_type in VIEW_OPS:
        tensor = consumers[0].output[0]
        consumers = index.consumers.get(tensor, [])
    if len(consumers) == 1 and consumers[0].op_type == "Add":
        other = [i for i in consumers[0].input if i != tensor]
        if not other:
            return None
        value = index.constant(other[0])
        gather = index.producer.get(other[0])
        if value is None and gather is not None and gather.op_type in GATHER_OPS:
            stack = index.constant(gather.input[0])
            value = stack if stack is not None and stack.ndim == 2 else None
        return value
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        return index.constant(node.input[2])
    return None


FUSED_SPLITS = {
    "gate|up": lambda w, f: (w[:, :f], w[:, f:]),
    "up|gate": lambda w, f: (w[:, f:], w[:, :f]),
    "gate,up interleaved": lambda w, f: (w[:, 0::2], w[:, 1::2]),
    "up,gate interleaved": lambda w, f: (w[:, 1::2], w[:, 0::2]),
}
"""How exporters lay out a fused ``[E, 2F, ...]`` gate+up weight; confirmation picks the one used."""


def _routing_choices(index: GraphIndex, router: _Router) -> list[dict]:
    """The routing rules (MoELayer fields) the routing area may compute, hinted ones first."""
    sparsemixer = bool(router.ops("Abs")) and bool(router.ops("ArgMax"))
    fields: dict = {"scoring": "softmax"}
    if sparsemixer:
        thresholds = [_scalar(index, n.input[1]) for n in router.ops("Greater")]
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
            and shape.size >= 2
            and shape[-1] > 0
            and shape[-2] * shape[-1] == router.experts
        ):
            groups = int(shape[-2])
            # the TopK over the group scores: a ReduceSum of each group's top two
            group_ks = [
                index.constant(n.input[1])
                for n in router.ops("TopK")
                if getattr(index.producer.get(n.input[0]), "op_type", None) == "ReduceSum"
            ]
            if groups > 1 and group_ks and group_ks[0] is not None:
                fields |= {"groups": groups, "top_groups": int(group_ks[0].reshape(-1)[0])}
    scales = [1.0]
    for node in router.ops("Mul"):
        value = next((v for v in map(lambda i: _scalar(index, i), node.input) if v is not None), None)
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


def _extract_layers(
    index: GraphIndex, region: list[onnx.NodeProto], router: _Router, name: str
) -> list[MoELayer]:
    """The layers ``region`` may compute, to be confirmed numerically (several when the
    structure leaves a choice open, e.g. how a fused gate+up weight is split)."""
    fields = _extract_layer(index, region, router.top_k, router.experts, name)
    if fields is None:
        return []
    half = fields["ffn"]
    fused = (
        fields["w_gate"] is None
        and fields["w_up"].shape[1] == 2 * half
        and fields["activation"] != "identity"
    )
    splits = FUSED_SPLITS.values() if fused else [None]
    variants = []
    for split, routing in itertools.product(splits, _routing_choices(index, router)):
        variant = fields | routing
        if split is not None:
            gate, up = split(fields["w_up"], half)
            b_gate, b_up = split(fields["b_up"], half) if fields["b_up"] is not None else (None, None)
            parts = {"w_gate": gate, "w_up": up, "b_gate": b_gate, "b_up": b_up}
            variant |= {k: None if v is None else np.ascontiguousarray(v) for k, v in parts.items()}
        variants.append(variant)
    layers = []
    for variant in variants:
        try:
            layers.append(MoELayer(**variant))
        except ValueError:
            continue
    return layers


def _extract_layer(
    index: GraphIndex, region: list[onnx.NodeProto], k: int, experts: int, name: str
) -> dict | None:
    """The fields of the MoELayer that ``region`` computes, as far as its structure tells."""
    ids = {id(n) for n in region}
    matmuls = [n for n in region if _weight_of(index, n) is not None]
    if not matmuls:
        return None
    producer_of = {o: n for n in region for o in n.output}

    def upstream(node: onnx.NodeProto) -> set[int]:
        seen: set[int] = set()
        frontier = [i for i in node.input]
        while frontier:
            src = producer_of.get(frontier.pop())
            if src is not None and id(src) not in seen:
                seen.add(id(src))
                frontier.extend(src.input)
        return seen

    matmul_ids = {id(m) for m in matmuls}
    downs = [m for m in matmuls if upstream(m) & matmul_ids]
    firsts = [m for m in matmuls if m not in downs]
    ops_between = {}
    for first in firsts:
        down = next((d for d in downs if id(first) in upstream(d)), None)
        if down is None:
            return None
        path = upstream(down) - upstream(first) - {id(first)}
        ops_between[id(first)] = ({n.op_type for n in region if id(n) in path and id(n) in ids}, down)
    alpha, beta, limit = _activation_constants(index, region)

    def activation_of(ops: set[str]) -> str:
        if "Relu" in ops:
            return "relu"
        if "Erf" in ops:
            return "gelu"
        if "Tanh" in ops:
            return "gelu_tanh"
        if "Sigmoid" in ops:
            return "silu"
        return "identity"

    def bias(node, count, width):
        value = _bias_after(index, node)
        return None if value is None else np.broadcast_to(value.reshape(count, -1), (count, width))

    batched = _weight_of(index, matmuls[0]).ndim == 3
    if batched:
        # A loop unrolled per expert reads the same stacks once per iteration: keep one of each.
        firsts, downs = _one_per_stack(index, firsts), _one_per_stack(index, downs)
        if len(downs) != 1 or len(firsts) not in (1, 2):
            return None
        groups = [(firsts, downs[0])]
    else:
        groups = []
        for down in downs:
            mine = [f for f in firsts if ops_between[id(f)][1] is down]
            groups.append((mine, down))
        if len(groups) != experts:
            return None
    roles: dict[str, list] = {"up": [], "gate": [], "down": [], "b_up": [], "b_gate": [], "b_down": []}
    activation = None
    for group_firsts, down in groups:
        if len(group_firsts) == 1:
            up, gate = group_firsts[0], None
            act = activation_of(ops_between[id(up)][0])
        elif len(group_firsts) == 2:
            acts = [activation_of(ops_between[id(f)][0] - {"Mul"}) for f in group_firsts]
            gate_pos = 0 if acts[0] != "identity" else 1
            gate, up = group_firsts[gate_pos], group_firsts[1 - gate_pos]
            act = acts[gate_pos]
        else:
            return None
        if activation not in (None, act):
            return None
        activation = act
        for role, node in (("up", up), ("gate", gate), ("down", down)):
            if node is None:
                continue
            weight = _weight_of(index, node)
            roles[role].append(weight if batched else weight[None])
            width = weight.shape[-2]
            roles[f"b_{role}"].append(bias(node, experts if batched else 1, width))
    stacked = {}
    for role, values in roles.items():
        if not values or any(v is None for v in values):
            stacked[role] = None
        else:
            stacked[role] = np.concatenate(values, axis=0).astype(np.float32)
    if stacked["up"] is None or stacked["down"] is None or stacked["up"].shape[0] != experts:
        return None
    return {
        "name": name,
        "num_experts": experts,
        "top_k": k,
        "hidden": stacked["up"].shape[2],
        "ffn": stacked["down"].shape[2],
        "activation": activation,
        "alpha": alpha,
        "beta": beta,
        "limit": limit,
        "w_up": stacked["up"],
        "w_gate": stacked["gate"],
        "w_down": stacked["down"],
        "b_up": stacked["b_up"],
        "b_gate": stacked["b_gate"],
        "b_down": stacked["b_down"],
        "source": "standard ONNX ops",
    }
