"""ApplyKernelSchedule: retile moec's expert kernels with a target's schedule.

Rewrite rule: every PrimFunc with ``moec.kernel`` in ``scheduled_kernels(schedule)`` is remade
from its ``moec.config`` with the given :class:`~moec.schedule.CpuSchedule` (vector lanes, rows
per parallel task, token block) or :class:`~moec.schedule.GpuSchedule` (thread layout; on a GPU
every kernel, route and group too, is remade in its CUDA form since each needs thread binding).
Kernels that already have that schedule, other kernels and Relax functions are left as they
are. The frontend emits target-independent IR; this pass is where the target file's choices enter.
"""

from __future__ import annotations

import json

import tvm
from tvm import tirx

from moec.kernels import kernel_kind, make_kernel, scheduled_kernels
from moec.schedule import CpuSchedule, GpuSchedule


@tvm.transform.module_pass(opt_level=0, name="ApplyKernelSchedule")
class ApplyKernelSchedule:
    """Remake the scheduled MoE kernels with ``schedule``; ``changed`` lists the ones rewritten."""

    def __init__(self, schedule: CpuSchedule | GpuSchedule) -> None:
        self.schedule = schedule
        self.changed: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.changed = []
        updated = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gvar, func in mod.functions_items():
            kind = kernel_kind(func)
            if kind not in scheduled_kernels(self.schedule):
                continue
            remade = make_kernel(kind, json.loads(str(func.attrs["moec.config"])), self.schedule)
            if not _same(remade, func):
                updated[gvar] = remade
                self.changed.append(gvar.name_hint)
        return updated


def _same(a: tirx.PrimFunc, b: tirx.PrimFunc) -> bool:
    try:
        tvm.ir.assert_structural_equal(a, b)
    except ValueError:
        return False
    return True
