"""A located MoE block: the canonical layer plus where it sits in the ONNX graph."""

from __future__ import annotations

import dataclasses

import onnx

from moec.canonical.layer import MoELayer


@dataclasses.dataclass
class MoEBlock:
    """An MoE block found in a graph.

    input: the tensor holding the tokens' hidden states (``[..., H]``).
    logits: the tensor holding the router logits (``[..., E]``), computed outside the block.
    output: the tensor the block produces: ``input``'s shape, or ``[tokens, H]`` when
        ``flat_output`` (the exporter flattened the tokens and reshapes back only later, e.g.
        after adding a shared expert).
    nodes: the graph nodes the canonical layer replaces.
    """

    layer: MoELayer
    input: str
    logits: str
    output: str
    nodes: list[onnx.NodeProto]
    flat_output: bool = False
