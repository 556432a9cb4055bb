"""PruneChannels: structured pruning inside experts — drop intermediate (FFN) channels.

Rewrite rules, for every MoE layer function named in ``kept`` (``{layer: per expert, the
intermediate channels it keeps}``, the same count ``F'`` for every expert):

- its first-layer weights ``w_up``/``w_gate`` ``[E, F, H]`` and biases ``[E, F]`` become
  ``[E, F', ...]``, its ``w_down`` ``[E, H, F]`` becomes ``[E, H, F']`` (``b_down`` is unchanged);
- its expert kernels are remade for ``ffn = F'`` and the intermediate tensor between them is
  ``[n*k, F']``;
- ``main``'s parameters that feed those slots are retyped and recorded in ``main``'s attribute
  ``moec.channel_slices`` (parameter name → [axis, per-expert channel ids]); ``SliceWeights``
  slices the stored weights, so pruned channels are not in the artifact.

Dropping a channel removes its row of ``w_up``/``w_gate`` and its column of ``w_down``, i.e. its
whole contribution; keeping every channel changes nothing. Runs after ``MaskExperts``.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax

from moec.canonical.layer import FFN_AXIS
from moec.kernels import kernel_kind
from moec.passes.signature import (
    called_kernels,
    is_layer,
    layer_arguments,
    layer_weight_slots,
    rebuild,
    reconfigured,
)
from moec.passes.slice_weights import CHANNEL_SLICES

EXPERT_KERNELS = ("expert_up", "expert_down")


@tvm.transform.module_pass(opt_level=0, name="PruneChannels")
class PruneChannels:
    """Keep ``kept[layer][e]`` intermediate channels of each expert ``e``; ``changed`` lists layers."""

    def __init__(self, kept: dict[str, list[list[int]]]) -> None:
        self.kept = {name: [sorted(c) for c in channels] for name, channels in kept.items()}
        self.changed: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.changed = []
        layers = {}
        kernels: dict[str, tvm.tirx.PrimFunc] = {}
        axes: dict[str, dict[int, int]] = {}
        for gvar, func in mod.functions_items():
            name = gvar.name_hint
            if not is_layer(func) or name not in self.kept:
                continue
            channels = self.kept[name]
            width = len(channels[0])
            roles = layer_weight_slots(func)
            ffn = int(func.params[roles["w_up"]].ty.shape[FFN_AXIS["w_up"]])
            experts = int(func.params[roles["w_up"]].ty.shape[0])
            if len(channels) != experts or any(not all(0 <= c < ffn for c in kept) for kept in channels):
                raise ValueError(f"{name}: give each of its {experts} experts channel ids below {ffn}")
            if any(len(c) != width for c in channels):
                raise ValueError(f"{name}: every expert must keep the same number of channels")
            if width == ffn:
                continue
            slots = {i: FFN_AXIS[role] for role, i in roles.items() if role in FFN_AXIS}
            types = {}
            for i, axis in slots.items():
                shape = [int(d) for d in func.params[i].ty.shape]
                shape[axis] = width
                types[i] = relax.TensorType(shape, func.params[i].ty.dtype)
            names = {}
            for kernel in called_kernels(mod, func, EXPERT_KERNELS):
                kind = kernel_kind(mod[kernel])
                names[kernel.name_hint] = f"{name}_{kind}_pruned"
                kernels[names[kernel.name_hint]] = reconfigured(mod[kernel], {"ffn": width})
            layers[name] = (func, types, names)
            axes[name] = slots
        if not layers:
            return mod
        channel_slices = {
            var.name: [axes[layer][slot], self.kept[layer]]
            for var, (layer, slot) in layer_arguments(mod["main"], axes).items()
        }
        attrs = {CHANNEL_SLICES: json.dumps(channel_slices)}
        updated = rebuild(mod, kernels, layers, attrs)
        if updated is None:
            return mod
        self.changed = sorted(layers)
        return updated
