"""MaskExperts: static expert masking — masked experts are never routed to and not stored.

Rewrite rules, for every MoE layer function named in ``kept`` (``{layer: kept expert ids}``):

- its router kernel is remade with ``kept``: scores stay the router's over all ``E`` experts,
  top-k is taken over the kept experts only, and selections are numbered by their position
  among the kept ones;
- its group and expert kernels are remade for ``len(kept)`` experts, and its weight parameters
  (``[E, ...]``) become ``[len(kept), ...]``;
- ``main``'s parameters that feed those slots are retyped to match and recorded in ``main``'s
  attribute ``moec.expert_slices`` (parameter name → kept ids), from which ``SliceWeights``
  slices the stored weights: masked experts' weights are not in the artifact.

A layer not in ``kept``, or kept whole, is left as it is. Runs first in the layers phase.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax

from moec.kernels import kernel_kind
from moec.passes.signature import (
    called_kernels,
    is_layer,
    layer_arguments,
    layer_weight_slots,
    rebuild,
    reconfigured,
)
from moec.passes.slice_weights import EXPERT_SLICES

LAYER_KERNELS = ("route", "capacity", "group", "expert_up", "expert_down")


@tvm.transform.module_pass(opt_level=0, name="MaskExperts")
class MaskExperts:
    """Keep only ``kept[layer]`` experts of each named layer; ``changed`` lists the layers."""

    def __init__(self, kept: dict[str, list[int]]) -> None:
        self.kept = {name: sorted(ids) for name, ids in kept.items()}
        self.changed: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.changed = []
        layers = {}
        kernels: dict[str, tvm.tirx.PrimFunc] = {}
        slices: dict[str, dict[int, list[int]]] = {}
        for gvar, func in mod.functions_items():
            name = gvar.name_hint
            if not is_layer(func) or name not in self.kept:
                continue
            slots = layer_weight_slots(func)
            experts = int(func.params[slots["w_up"]].ty.shape[0])
            kept = self.kept[name]
            if len(set(kept)) != len(kept) or not all(0 <= e < experts for e in kept):
                raise ValueError(f"{name}: kept experts {kept} are not distinct ids of its {experts} experts")
            if len(kept) == experts:
                continue
            types = {}
            for i in slots.values():
                shape, dtype = list(func.params[i].ty.shape), func.params[i].ty.dtype
                types[i] = relax.TensorType([len(kept), *shape[1:]], dtype)
            names = {}
            for kernel in called_kernels(mod, func, LAYER_KERNELS):
                kind = kernel_kind(mod[kernel])
                extra = {"kept": kept} if kind == "route" else {"num_experts": len(kept)}
                names[kernel.name_hint] = f"{name}_{kind}_masked"
                kernels[names[kernel.name_hint]] = reconfigured(mod[kernel], extra)
            layers[name] = (func, types, names)
            slices[name] = dict.fromkeys(types, kept)
        if not layers:
            return mod
        expert_slices = {
            var.name: self.kept[layer] for var, (layer, _) in layer_arguments(mod["main"], slices).items()
        }
        attrs = {EXPERT_SLICES: json.dumps(expert_slices)}
        updated = rebuild(mod, kernels, layers, attrs)
        if updated is None:
            return mod
        self.changed = sorted(layers)
        return updated
