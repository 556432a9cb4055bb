"""ApplyKernelSchedule: build moec's kernels for a target's schedule.

Rewrite rule: every PrimFunc with ``moec.kernel`` — a kernel spec the frontend or a layer pass
emitted, or a kernel built for another schedule — becomes the kernel built from its
``moec.config`` for the given :class:`~moec.schedule.CpuSchedule` (vector lanes, rows per
parallel task, token block, accumulators) or :class:`~moec.schedule.GpuSchedule` (thread
layout), through that target kind's backend (:mod:`moec.kernels.backend`). Kernels already
built for that schedule, other PrimFuncs and Relax functions are left as they are. The frontend
emits target-independent specs; this pass is where the target file's choices enter, and the
only place kernel code is built.
"""

from __future__ import annotations

import tvm

from moec.kernels import kernel_config, kernel_kind, make_kernel, schedule_json
from moec.schedule import CpuSchedule, GpuSchedule


@tvm.transform.module_pass(opt_level=0, name="ApplyKernelSchedule")
class ApplyKernelSchedule:
    """Build every moec kernel for ``schedule``; ``changed`` lists the ones built."""

    def __init__(self, schedule: CpuSchedule | GpuSchedule) -> None:
        self.schedule = schedule
        self.changed: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.changed = []
        wanted = schedule_json(self.schedule)
        updated = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gvar, func in mod.functions_items():
            if kernel_kind(func) is None or str(func.attrs.get("moec.schedule", "")) == wanted:
                continue
            updated[gvar] = make_kernel(kernel_config(func), self.schedule)
            self.changed.append(gvar.name_hint)
        return updated
