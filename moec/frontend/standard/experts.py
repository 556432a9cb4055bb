"""Expert extraction: the experts a block's region computes, read off its structure.

The experts are the region's MatMul/Gemm nodes with constant weights (in any form
:mod:`~moec.frontend.standard.operands` reads). 3-D ``[E, in, out]`` weights are batched experts;
2-D ones are grouped per expert around each down projection (experts ordered as they appear in
the graph). A first-layer matmul whose path to the down projection passes an activation is the
gate of a gated expert. ``Relu``/``Erf``/``Tanh``/``Sigmoid`` name the activation; ``Add`` of a
constant after a matmul is its bias; GPT-OSS's clamp constants are read from its ``Mul``,
``Add`` and ``Clip``. What the structure cannot tell (how a fused gate+up weight is split) is
listed as alternatives for confirmation to decide.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx

from moec.frontend.graph import GraphIndex
from moec.frontend.standard.operands import bias_after, scalar, stack_name, weight_of

FUSED_SPLITS = {
    "gate|up": lambda w, f: (w[:, :f], w[:, f:]),
    "up|gate": lambda w, f: (w[:, f:], w[:, :f]),
    "gate,up interleaved": lambda w, f: (w[:, 0::2], w[:, 1::2]),
    "up,gate interleaved": lambda w, f: (w[:, 1::2], w[:, 0::2]),
}
"""How exporters lay out a fused ``[E, 2F, ...]`` gate+up weight; confirmation picks the one used."""


def expert_choices(
    index: GraphIndex, region: list[onnx.NodeProto], k: int, experts: int, name: str
) -> list[dict[str, Any]]:
    """The MoELayer fields but the routing rule that ``region`` may compute, to be confirmed
    numerically: one set, or one per split of a fused gate+up weight; none when the region's
    matmuls are not ``experts`` experts."""
    fields = _expert_fields(index, region, k, experts, name)
    if fields is None:
        return []
    half = fields["ffn"]
    fused = (
        fields["w_gate"] is None
        and fields["w_up"].shape[1] == 2 * half
        and fields["activation"] != "identity"
    )
    if not fused:
        return [fields]
    choices = []
    for split in FUSED_SPLITS.values():
        gate, up = split(fields["w_up"], half)
        b_gate, b_up = split(fields["b_up"], half) if fields["b_up"] is not None else (None, None)
        parts = {"w_gate": gate, "w_up": up, "b_gate": b_gate, "b_up": b_up}
        choices.append(fields | {r: None if v is None else np.ascontiguousarray(v) for r, v in parts.items()})
    return choices


def _activation_constants(index: GraphIndex, region: list[onnx.NodeProto]) -> tuple[float, float, float]:
    """GPT-OSS's clamped SwiGLU constants read off the region: ``alpha`` (the scalar the gate is
    multiplied by inside the sigmoid), ``beta`` (a scalar added to the up projection) and
    ``limit`` (a ``Clip`` bound); 1, 0 and inf when absent. Confirmation checks the reading."""
    alpha, beta, limit = 1.0, 0.0, math.inf
    feeds_sigmoid = {n.input[0] for n in region if n.op_type == "Sigmoid"}
    for node in region:
        scalars = [
            v for v in (scalar(index, i) for i in node.input[1:] if node.op_type != "Clip") if v is not None
        ]
        if node.op_type == "Mul" and node.output[0] in feeds_sigmoid and scalars:
            alpha = scalars[0]
        elif node.op_type == "Add" and len(node.input) == 2 and scalar(index, node.input[1]) is not None:
            beta = scalar(index, node.input[1])
        elif node.op_type == "Clip" and len(node.input) > 2 and scalar(index, node.input[2]) is not None:
            limit = scalar(index, node.input[2])
    return alpha, beta, limit


def _one_per_stack(index: GraphIndex, matmuls: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``matmuls`` with later ones that read the same weight stack as an earlier one dropped."""
    kept, seen = [], set()
    for node in matmuls:
        found = stack_name(index, node)
        key = found[0] if found else node.input[1]
        if key not in seen:
            seen.add(key)
            kept.append(node)
    return kept


def _activation_of(ops: set[str]) -> str:
    """The activation the op types between a first-layer matmul and its down projection name."""
    if "Relu" in ops:
        return "relu"
    if "Erf" in ops:
        return "gelu"
    if "Tanh" in ops:
        return "gelu_tanh"
    if "Sigmoid" in ops:
        return "silu"
    return "identity"


def _expert_fields(
    index: GraphIndex, region: list[onnx.NodeProto], k: int, experts: int, name: str
) -> dict[str, Any] | None:
    """The fields of the MoELayer that ``region`` computes, as far as its structure tells."""
    ids = {id(n) for n in region}
    matmuls = [n for n in region if weight_of(index, n) is not None]
    if not matmuls:
        return None
    producer_of = {o: n for n in region for o in n.output}

    def upstream(node: onnx.NodeProto) -> set[int]:
        seen: set[int] = set()
        frontier = list(node.input)
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

    def bias(node: onnx.NodeProto, count: int, width: int, expert: int) -> np.ndarray | None:
        value = bias_after(index, node)
        if value is not None and count == 1 and value.ndim == 2 and value.shape == (experts, width):
            value = value[expert]  # one expert's row of a per-expert bias stack (grouped_mm)
        return None if value is None else np.broadcast_to(value.reshape(count, -1), (count, width))

    batched = weight_of(index, matmuls[0]).ndim == 3
    if batched:
        # A loop unrolled per expert reads the same stacks once per iteration: keep one of each.
        firsts, downs = _one_per_stack(index, firsts), _one_per_stack(index, downs)
        if len(downs) != 1 or len(firsts) not in (1, 2):
            return None
        groups = [(firsts, downs[0])]
    elif all(upstream(d) >= {id(f) for f in firsts} for d in downs) and len(downs) > 1:
        # Every expert's rows are concatenated, activated together and split again (transformers'
        # ``grouped_mm``): each down projection reads every first-layer matmul. Experts are in
        # stack order, so the i-th down goes with the i-th first of each stack.
        if len(downs) != experts or len(firsts) % experts:
            return None
        per_stack = [firsts[i : i + experts] for i in range(0, len(firsts), experts)]
        groups = [([stack[e] for stack in per_stack], down) for e, down in enumerate(downs)]
    else:
        groups = []
        for down in downs:
            mine = [f for f in firsts if ops_between[id(f)][1] is down]
            groups.append((mine, down))
        if len(groups) != experts:
            return None
    roles: dict[str, list] = {"up": [], "gate": [], "down": [], "b_up": [], "b_gate": [], "b_down": []}
    activation = None
    for expert, (group_firsts, down) in enumerate(groups):
        if len(group_firsts) == 1:
            up, gate = group_firsts[0], None
            act = _activation_of(ops_between[id(up)][0])
        elif len(group_firsts) == 2:
            acts = [_activation_of(ops_between[id(f)][0] - {"Mul"}) for f in group_firsts]
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
            weight = weight_of(index, node)
            roles[role].append(weight if batched else weight[None])
            width = weight.shape[-2]
            roles[f"b_{role}"].append(bias(node, experts if batched else 1, width, expert))
    stacked = {}
    for role, values in roles.items():
        if not values or any(v is None for v in values):
            stacked[role] = None
        elif len({v.shape[1:] for v in values}) > 1:  # experts of different shapes: not one layer
            return None
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
