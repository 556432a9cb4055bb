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

import functools
import json

import tvm
from tvm import relax

from moec.kernels import kernel_kind
from moec.passes.signature import (
    OutTypeFix,
    called_kernels,
    is_layer,
    layer_arguments,
    main_param_types,
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
        out_types: dict[str, OutTypeFix] = {}
        axes: dict[str, dict[int, int]] = {}
        for gvar, func in mod.functions_items():
            name = gvar.name_hint
            if not is_layer(func) or name not in self.kept:
                continue
            channels = self.kept[name]
            width = len(channels[0])
            weights = list(enumerate(func.params[2:], start=2))
            ffn = int(weights[0][1].ty.shape[1])
            if any(len(c) != width for c in channels):
                raise ValueError(f"{name}: every expert must keep the same number of channels")
            if width == ffn:
                continue
            # w_up, b_up[, w_gate, b_gate]: channels on axis 1; w_down [E, H, F]: axis 2
            slots = {i: 1 for i, _ in weights[:-2]} | {weights[-2][0]: 2}
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
                if kind == "expert_up":
                    out_types[names[kernel.name_hint]] = functools.partial(_intermediate, width)
            layers[name] = (func, types, names)
            axes[name] = slots
        retyped = {n: t for n, (_, t, _) in layers.items()}
        main_types = main_param_types(mod["main"], retyped) if layers else None
        if main_types is None:
            return mod
        channel_slices = {
            var.name: [axes[layer][slot], self.kept[layer]]
            for var, (layer, slot) in layer_arguments(mod["main"], axes).items()
        }
        attrs = {CHANNEL_SLICES: json.dumps(channel_slices)}
        updated = rebuild(mod, kernels, layers, main_types, attrs, out_types)
        self.changed = sorted(layers)
        return updated


def _intermediate(width: int, declared: relax.TensorType) -> relax.TensorType:
    """The expert_up kernel's output ``[n*k, width]`` (rows as declared)."""
    return relax.TensorType([declared.shape.values[0], width], declared.dtype)
