"""FixedRouting: replace the learned router by a fixed pattern over the tokens.

Rewrite rule: every router kernel (``moec.kernel == "route"``) is remade with ``pattern``
(``"cycle"``: token ``t``'s slot ``j`` goes to expert ``(t + j) mod E``; ``"tile"``: ``E``
contiguous tiles of tokens, tile ``i``'s slot ``j`` to expert ``(i + j) mod E``; every slot
weighs ``1/k``). The router matmul still runs but its logits are ignored. For models trained
with such routing; on a model that was not, ``moec verify --against original`` reports the cost.
"""

from __future__ import annotations

import tvm

from moec.passes.signature import reconfigure_kernels

PATTERNS = ("cycle", "tile")


@tvm.transform.module_pass(opt_level=0, name="FixedRouting")
class FixedRouting:
    """Remake the router kernels with a fixed routing pattern; ``changed`` lists them."""

    def __init__(self, pattern: str) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
        self.pattern = pattern
        self.changed: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updated, self.changed = reconfigure_kernels(mod, "route", {"pattern": self.pattern})
        return updated
