"""Whole-graph numpy reference: ``onnx.reference.ReferenceEvaluator`` plus onnxruntime's contrib ops.

moec needs an oracle for complete models, not just the MoE node. The ONNX
reference evaluator runs every standard op; this module teaches it the
onnxruntime ``MoE`` and ``QMoE`` contrib ops by registering custom ``OpRun``s that call
:func:`moec.reference.ms_moe.ms_moe` and :func:`moec.reference.qmoe.qmoe`, and the attention
fusions of transformers' exporter
(:mod:`moec.reference.contrib`). Nothing here imports TVM or onnxruntime.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from moec.onnx_fixes import FIXED_OPS
from moec.reference.contrib import CONTRIB_OPS
from moec.reference.ms_moe import ms_moe
from moec.reference.qmoe import qmoe

__all__ = ["MS_DOMAIN", "MoE", "QMoE", "run_reference"]

#: The domain of onnxruntime's contrib ops.
MS_DOMAIN = "com.microsoft"


def _as_str(value: str | bytes) -> str:
    """Attribute strings may arrive as bytes depending on the onnx version."""
    return value.decode() if isinstance(value, bytes) else value


class MoE(OpRun):
    """``com.microsoft::MoE`` for the ONNX reference evaluator (delegates to ``ms_moe``).

    The keyword defaults below are the op's attribute defaults: the evaluator
    only passes attributes that the node actually sets, because a custom op has
    no registered schema to take defaults from.
    """

    op_domain = MS_DOMAIN

    def _run(  # type: ignore[override]
        self,
        x: np.ndarray,
        router_probs: np.ndarray,
        fc1_experts_weights: np.ndarray,
        fc1_experts_bias: np.ndarray | None = None,
        fc2_experts_weights: np.ndarray | None = None,
        fc2_experts_bias: np.ndarray | None = None,
        fc3_experts_weights: np.ndarray | None = None,
        fc3_experts_bias: np.ndarray | None = None,
        *,
        activation_type: str | bytes = "relu",
        k: int = 1,
        normalize_routing_weights: int = 0,
        swiglu_fusion: int = 0,
        activation_alpha: float = 1.0,
        activation_beta: float = 0.0,
        swiglu_limit: float | None = None,
        use_sparse_mixer: int = 0,
        swiglu_limit_after_activation: int = 0,
    ) -> tuple[np.ndarray]:
        if fc2_experts_weights is None:
            raise ValueError("MoE: input 4 (fc2_experts_weights) is required")
        if swiglu_limit_after_activation:
            raise NotImplementedError(
                "MoE: swiglu_limit_after_activation=1 (CUDA-only post-activation clipping) is not implemented"
            )
        out = ms_moe(
            x,
            router_probs,
            fc1_experts_weights,
            fc1_experts_bias,
            fc2_experts_weights,
            fc2_experts_bias,
            fc3_experts_weights,
            fc3_experts_bias,
            activation_type=_as_str(activation_type),
            k=int(k),
            normalize_routing_weights=int(normalize_routing_weights),
            swiglu_fusion=int(swiglu_fusion),
            activation_alpha=float(activation_alpha),
            activation_beta=float(activation_beta),
            swiglu_limit=None if swiglu_limit is None else float(swiglu_limit),
            use_sparse_mixer=int(use_sparse_mixer),
        )
        return (out,)


def _with_ms_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return ``model``, or a copy importing com.microsoft v1 if a node needs it and it is missing.

    Some exporters omit the contrib domain from ``opset_import``; onnxruntime is
    lenient about that for contrib ops, the reference evaluator is not.
    """
    if any(op.domain == MS_DOMAIN for op in model.opset_import):
        return model
    if not any(node.domain == MS_DOMAIN for node in model.graph.node):
        return model
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return fixed


class QMoE(OpRun):
    """``com.microsoft::QMoE`` for the ONNX reference evaluator (delegates to ``qmoe``, which
    takes the node's inputs and attributes as the op defines them)."""

    op_domain = MS_DOMAIN

    def _run(self, *inputs: np.ndarray | None, **attributes: Any) -> tuple[np.ndarray]:  # type: ignore[override]
        return (qmoe(*inputs, **attributes),)


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` on ``feeds`` with the numpy reference and return ``{output name: array}``.

    Graph outputs are returned in graph order, keyed by their names.
    """
    model = _with_ms_opset(model)
    sess = ReferenceEvaluator(model, new_ops=[MoE, QMoE, *CONTRIB_OPS, *FIXED_OPS])
    names = [out.name for out in model.graph.output]
    results: list[Any] = sess.run(names, feeds)
    return {name: np.asarray(value) for name, value in zip(names, results, strict=True)}
