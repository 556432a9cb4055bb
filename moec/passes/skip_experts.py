"""SkipExperts: early exit — a confident router's token skips its other experts at run time.

Rewrite rule: every router kernel (``moec.kernel == "route"``) is remade with the thresholds:
slots after the first are skipped when the token's top-1 routing weight exceeds
``top1_above``, or (each) when their weight is below ``below_fraction`` of the top-1 weight.
Skipped slots carry the index one past the last expert, which the group kernel sorts after
every expert's tokens, so no expert kernel computes them; with renormalisation the weights
left are renormalised. Kernel signatures do not change. ``top1_above = 1`` never skips.
"""

from __future__ import annotations

import tvm

from moec.passes.signature import reconfigure_kernels


@tvm.transform.module_pass(opt_level=0, name="SkipExperts")
class SkipExperts:
    """Remake the router kernels with early-exit thresholds; ``changed`` lists them."""

    def __init__(self, top1_above: float | None = None, below_fraction: float | None = None) -> None:
        self.skip = {"skip_top1_above": top1_above, "skip_below_fraction": below_fraction}
        self.changed: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updated, self.changed = reconfigure_kernels(mod, "route", self.skip)
        return updated
