"""SkipExperts: early exit — a confident router's token skips its other experts at run time.

Rewrite rule: every router kernel (``moec.kernel == "route"``) is remade with the thresholds:
slots after the first are skipped when the token's top-1 routing weight exceeds
``top1_above``, or (each) when their weight is below ``below_fraction`` of the top-1 weight.
Skipped slots carry the index one past the last expert, which the group kernel sorts after
every expert's tokens, so no expert kernel computes them; with renormalisation the weights
left are renormalised. Kernel signatures do not change. ``top1_above = 1`` never skips.
"""

from __future__ import annotations

import json

import tvm

from moec.kernels import kernel_kind, make_kernel
from moec.schedule import CpuSchedule


@tvm.transform.module_pass(opt_level=0, name="SkipExperts")
class SkipExperts:
    """Remake the router kernels with early-exit thresholds; ``changed`` lists them."""

    def __init__(self, top1_above: float | None = None, below_fraction: float | None = None) -> None:
        self.skip = {"skip_top1_above": top1_above, "skip_below_fraction": below_fraction}
        self.changed: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.changed = []
        updated = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gvar, func in mod.functions_items():
            if kernel_kind(func) != "route":
                continue
            config = json.loads(str(func.attrs["moec.config"])) | self.skip
            updated[gvar] = make_kernel("route", config, CpuSchedule())
            self.changed.append(gvar.name_hint)
        return updated
