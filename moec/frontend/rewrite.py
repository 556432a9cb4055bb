"""Replaces each located MoE block in an ONNX graph by one canonical ``moec::MoELayer`` node.

The new node reads the block's hidden states and router logits, plus the layer's expert
weights as fresh initializers in canonical layout (``<layer>.w_up`` ...). Nodes of the block
whose outputs are still read elsewhere (e.g. router probabilities exported as an extra
output) are kept; initializers nothing reads any more are dropped.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moec.frontend.block import MoEBlock

LAYER_DOMAIN = "moec"
LAYER_OP = "MoELayer"


def layer_weight_names(block: MoEBlock) -> list[str]:
    """Initializer names of the canonical node's weight inputs, in kernel argument order."""
    return [f"{block.layer.name}.{role}" for role in block.layer.weight_roles]


def _canonical_weights(block: MoEBlock) -> dict[str, np.ndarray]:
    layer = block.layer
    e, f, h = layer.num_experts, layer.ffn, layer.hidden
    zeros = {"b_up": (e, f), "b_gate": (e, f), "b_down": (e, h)}
    out = {}
    for name in layer_weight_names(block):
        role = name.rsplit(".", 1)[1]
        value = getattr(layer, role)
        out[name] = value if value is not None else np.zeros(zeros[role], np.float32)
    return out


def replace_blocks(model: onnx.ModelProto, blocks: list[MoEBlock]) -> onnx.ModelProto:
    """A copy of ``model`` where every block is one ``moec::MoELayer`` node (attr ``layer``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    removed = {id_ for b in blocks for id_ in (n.output[0] for n in b.nodes)}
    removed_nodes = [n for n in graph.node if n.output and n.output[0] in removed]
    keep = _nodes_still_needed(graph, removed_nodes, [b.output for b in blocks])
    layer_nodes = {b.output: _layer_nodes(b, i) for i, b in enumerate(blocks)}
    new_nodes = []
    for node in graph.node:
        block_output = next((o for o in node.output if o in layer_nodes), None)
        if block_output is not None:
            new_nodes.extend(layer_nodes[block_output])
        if not (node.output and node.output[0] in removed) or node.output[0] in keep:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    for block in blocks:
        for name, value in _canonical_weights(block).items():
            graph.initializer.append(numpy_helper.from_array(value, name))
    _drop_unused_initializers(graph)
    if not any(op.domain == LAYER_DOMAIN for op in out.opset_import):
        out.opset_import.append(helper.make_opsetid(LAYER_DOMAIN, 1))
    return out


def _layer_nodes(block: MoEBlock, index: int) -> list[onnx.NodeProto]:
    """The ``moec::MoELayer`` node for ``block`` (output in the input's shape), followed by a
    flattening ``Reshape`` to ``[tokens, H]`` when the block's output is flat."""
    name = block.layer.name
    full = f"{block.output}__{name}_full" if block.flat_output else block.output
    nodes = [
        helper.make_node(
            LAYER_OP,
            [block.input, block.logits, *layer_weight_names(block)],
            [full],
            name=name,
            domain=LAYER_DOMAIN,
            layer=index,
        )
    ]
    if block.flat_output:
        shape = helper.make_tensor(
            f"{name}.flat_shape", onnx.TensorProto.INT64, [2], [-1, block.layer.hidden]
        )
        nodes.append(helper.make_node("Constant", [], [shape.name], name=f"{name}_flat_shape", value=shape))
        nodes.append(helper.make_node("Reshape", [full, shape.name], [block.output], name=f"{name}_flatten"))
    return nodes


def _nodes_still_needed(
    graph: onnx.GraphProto, removed: list[onnx.NodeProto], block_outputs: list[str]
) -> set[str]:
    """First outputs of removed nodes that kept nodes or graph outputs still read."""
    removed_by_output = {o: n for n in removed for o in n.output}
    removed_ids = {n.output[0] for n in removed}
    needed = {o.name for o in graph.output} - set(block_outputs)
    for node in graph.node:
        if node.output and node.output[0] not in removed_ids:
            needed.update(node.input)
    keep: set[str] = set()
    frontier = [t for t in needed if t in removed_by_output and t not in block_outputs]
    while frontier:
        node = removed_by_output[frontier.pop()]
        if node.output[0] in keep:
            continue
        keep.add(node.output[0])
        frontier.extend(t for t in node.input if t in removed_by_output)
    return keep


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
