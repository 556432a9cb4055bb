"""Frontend entry point: find the MoE blocks of an ONNX model and lift it into Relax."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
import tvm
from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

from moec.canonical.layer import MoELayer
from moec.errors import MoecError, first_line
from moec.frontend.block import MoEBlock
from moec.frontend.contrib_ops import converter as contrib_converter
from moec.frontend.fold import fold_constants
from moec.frontend.graph import GraphIndex, node_label
from moec.frontend.indexed_experts import rewrite_indexed_experts
from moec.frontend.lift import lift_to_relax
from moec.frontend.ms_moe import find_ms_moe_blocks
from moec.frontend.rewrite import LAYER_OP, replace_blocks
from moec.frontend.shape_arith import scalarize_shape_arithmetic
from moec.frontend.standard.finder import find_standard_blocks


@dataclasses.dataclass
class ImportedModel:
    """An ONNX model with its MoE blocks located and replaced by canonical layer nodes."""

    original: onnx.ModelProto
    canonical: onnx.ModelProto
    blocks: list[MoEBlock]
    indexed_experts: int = 0  # sums of input-indexed experts computed one per sample
    path: str = ""  # the file it was read from, for errors to name ("": not from a file)

    @property
    def layers(self) -> list[MoELayer]:
        return [b.layer for b in self.blocks]

    def to_relax(self) -> tvm.IRModule:
        """The Relax module; ``main`` takes the graph inputs followed by every weight."""
        try:
            return lift_to_relax(self.canonical, self.layers)
        except MoecError as err:
            raise MoecError(_in_file(self.path, str(err))) from err
        except Exception as err:  # TVM's frontend raises many types; name the cause, once
            message = f"TVM's ONNX frontend could not convert the model: {first_line(err)}"
            raise MoecError(_in_file(self.path, message)) from err


def _in_file(path: str, message: str) -> str:
    """``message`` about a model, led by the model's file when known."""
    return f"{path}: {message}" if path else message


def find_blocks(model: onnx.ModelProto) -> list[MoEBlock]:
    """All MoE blocks, fused ``com.microsoft::MoE`` nodes and standard-op subgraphs alike."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    index = GraphIndex(model.graph, opset)
    blocks = find_ms_moe_blocks(index) + find_standard_blocks(index, model.opset_import)
    for i, block in enumerate(blocks):
        block.layer.name = f"moe{i}"
    return blocks


def import_model(model: onnx.ModelProto, path: str | Path = "") -> ImportedModel:
    """Compute input-indexed experts one per sample (:mod:`moec.frontend.indexed_experts`), locate
    MoE blocks, replace them, and check every remaining op can be converted. ``path``: the file
    ``model`` was read from, which errors name."""
    rewritten, indexed = rewrite_indexed_experts(model)
    blocks = find_blocks(rewritten)
    canonical = replace_blocks(rewritten, blocks) if blocks else rewritten
    canonical = fold_constants(canonical)  # shapes known at compile time: see moec.frontend.fold
    canonical = scalarize_shape_arithmetic(canonical)
    supported = _get_convert_map()
    for node in canonical.graph.node:
        if node.op_type == LAYER_OP and node.domain == "moec":
            continue
        if contrib_converter(node.domain, node.op_type) is not None:
            continue
        if node.op_type not in supported or node.domain not in ("", "ai.onnx"):
            raise MoecError(
                _in_file(
                    str(path),
                    f"{node_label(node)}: operator not supported by moec or TVM's ONNX "
                    "frontend; re-export without it or open an issue with the model",
                )
            )
    return ImportedModel(
        original=model, canonical=canonical, blocks=blocks, indexed_experts=indexed, path=str(path)
    )
