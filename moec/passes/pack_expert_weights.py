"""PackExpertWeights: store every MoE layer's expert matrices in panels for the panel kernels.

Rewrite rules, for every Relax function with attribute ``moec.layer``, for a CPU schedule:

- its expert matrix parameters (``w_up``, ``w_gate`` ``[E, F, H]``, ``w_down`` ``[E, H, F]``,
  found by role; and each format's part of them, ``w_up_fp16``, ``w_up_int8``, …, from
  ``StoreExpertWeights``) become their packed form ``[E, ceil(out / panel), in, panel]``
  (:meth:`moec.kernels.config.ExpertConfig.matrix_shape`; ``panel`` = the schedule's ``lanes ×
  panel_vectors``, or the matrix's output size when smaller; int8-dot parts ``[E, ceil(out /
  panel), in / 4, panel * 4]``, 4 inputs of a row together), their dtype kept; int8 scales
  (``w_up_int8_scale``, outputs last) get their output axis padded to whole panels;
- the ``expert_up`` / ``expert_down`` kernel specs it calls are remade with that ``panel``, so
  the schedule phase builds the output-stationary kernels of :mod:`moec.kernels.expert_panels`;
- ``main``'s parameters passed to those slots are retyped the same way and recorded in
  ``main``'s attribute ``moec.packed_weights`` (name → ``{"panel", "transposed": true,
  "experts": true[, "dot": true]}``: each expert's ``[out, in]`` matrix is packed like a dense
  weight ``[in, out]``, int8-dot parts with 4 inputs together), from which ``SliceWeights``
  packs the stored arrays — after slicing away masked experts and pruned channels, which the
  layer passes recorded on the unpacked layout.
  If a slot is fed by anything but a parameter used only there, nothing is rewritten.

Runs in the schedule phase, after the layer passes and before ``ApplyKernelSchedule``.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax

from moec.canonical.layer import EXPERT_MATRICES
from moec.kernels import kernel_config
from moec.kernels.config import replace
from moec.kernels.formats import ExpertFormats, WeightFormat
from moec.passes.signature import (
    called_kernels,
    is_layer,
    layer_arguments,
    rebuild,
    reconfigured,
)
from moec.passes.slice_weights import PACKED_WEIGHTS
from moec.schedule import CpuSchedule

EXPERT_KERNELS = ("expert_up", "expert_down")


@tvm.transform.module_pass(opt_level=0, name="PackExpertWeights")
class PackExpertWeights:
    """Pack every MoE layer's expert matrices in panels; ``changed`` lists the layers."""

    def __init__(self, schedule: CpuSchedule) -> None:
        self.schedule = schedule
        self.changed: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.changed = []
        layers = {}
        kernels: dict[str, tvm.tirx.PrimFunc] = {}
        panels: dict[str, dict[int, tuple[int, bool, bool]]] = {}
        for gvar, func in mod.functions_items():
            if not is_layer(func):
                continue
            found = called_kernels(mod, func, EXPERT_KERNELS)
            configs = [kernel_config(mod[k]) for k in found]
            if not configs or any(c.panel is not None for c in configs):
                continue
            hidden, ffn = configs[0].hidden, configs[0].ffn
            # w_up / w_gate: ffn outputs of hidden inputs; w_down: hidden outputs of ffn inputs
            widths = {"expert_up": self.schedule.panel(ffn), "expert_down": self.schedule.panel(hidden)}
            types, slots = {}, {}
            for i, param in enumerate(func.params):
                part = ExpertFormats.part_of(param.name, EXPERT_MATRICES)
                if part is None:
                    continue
                role, fmt, scale = part
                width = widths["expert_down" if role == "w_down" else "expert_up"]
                *outer, rows = (int(d) for d in param.ty.shape)
                if scale:
                    shape = [*outer, -(-rows // width) * width]
                else:
                    experts, rows, columns = (int(d) for d in param.ty.shape)
                    packed = replace(configs[0], panel=width)
                    shape = list(packed.matrix_shape(rows, columns, experts, WeightFormat(fmt)))
                types[i] = relax.TensorType(shape, param.ty.dtype)
                slots[i] = (width, scale, WeightFormat(fmt).dot)
            names = {}
            for kernel, config in zip(found, configs, strict=True):
                kernels[kernel.name_hint] = reconfigured(mod[kernel], {"panel": widths[config.kind]})
                names[kernel.name_hint] = kernel.name_hint
            layers[gvar.name_hint] = (func, types, names)
            panels[gvar.name_hint] = slots
        if not layers:
            return mod
        main = mod["main"]
        record = json.loads(str(main.attrs[PACKED_WEIGHTS])) if PACKED_WEIGHTS in main.attrs else {}
        for var, (layer, slot) in layer_arguments(main, panels).items():
            width, scale, dot = panels[layer][slot]
            record[var.name] = (
                {"experts": True, "panel": width, "transposed": True}
                | ({"scale": True} if scale else {})
                | ({"dot": True} if dot else {})
            )
        attrs = {PACKED_WEIGHTS: json.dumps(record, sort_keys=True)}
        updated = rebuild(mod, kernels, layers, attrs)
        if updated is None:
            return mod
        self.changed = sorted(layers)
        return updated
