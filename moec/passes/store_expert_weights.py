"""StoreExpertWeights: keep the MoE layers' expert weight matrices in a narrower precision.

Rewrite rules, for every Relax function with attribute ``moec.layer``, when ``precision`` is
not float32:

- its expert matrix parameters (``w_up``, ``w_gate``, ``w_down``: the ``[E, out, in]`` ones,
  found by role) get dtype ``precision``; the biases stay float32;
- the ``expert_up`` / ``expert_down`` kernels it calls are remade with ``weight_dtype =
  precision``: they widen each weight to float32 as they load it, so the arithmetic stays
  float32 (what the Cortex-A72 computes natively) while the bytes streamed from memory halve;
- ``main``'s parameters passed to those slots get the same dtype, so the artifact stores them
  narrow. If any slot is fed by something else (a weight also used by another op), nothing
  is rewritten. :class:`moec.passes.slice_weights.SliceWeights` then converts the
  weight arrays to ``main``'s signature.

Runs in the layers phase, on kernel specs: ``ApplyKernelSchedule`` then builds them.
"""

from __future__ import annotations

import tvm
from tvm import relax

from moec.canonical.layer import EXPERT_MATRICES
from moec.passes.signature import (
    called_kernels,
    is_layer,
    layer_weight_slots,
    rebuild,
    reconfigured,
)

PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16"}
WEIGHT_KERNELS = ("expert_up", "expert_down")


@tvm.transform.module_pass(opt_level=0, name="StoreExpertWeights")
class StoreExpertWeights:
    """Store every MoE layer's expert matrices as ``precision``; ``changed`` lists the layers."""

    def __init__(self, precision: str = "fp32") -> None:
        if precision not in PRECISION_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_DTYPES)}, got {precision!r}")
        self.dtype = PRECISION_DTYPES[precision]
        self.changed: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.changed = []
        if self.dtype == "float32":
            return mod
        layers = {}
        kernels: dict[str, tvm.tirx.PrimFunc] = {}
        for gvar, func in mod.functions_items():
            if not is_layer(func):
                continue
            types = {
                i: relax.TensorType(func.params[i].ty.shape, self.dtype)
                for role, i in layer_weight_slots(func).items()
                if role in EXPERT_MATRICES and func.params[i].ty.dtype == "float32"
            }
            if not types:
                continue
            names = {}
            for kernel in called_kernels(mod, func, WEIGHT_KERNELS):
                kernels[kernel.name_hint] = reconfigured(mod[kernel], {"weight_dtype": self.dtype})
                names[kernel.name_hint] = kernel.name_hint
            layers[gvar.name_hint] = (func, types, names)
        updated = rebuild(mod, kernels, layers) if layers else None
        if updated is None:
            return mod
        self.changed = sorted(layers)
        return updated
