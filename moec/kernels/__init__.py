"""Our TIR kernels for the MoE layer, made from a JSON-able config plus a schedule.

Every kernel PrimFunc carries ``moec.kernel`` (its kind) and ``moec.config`` (the JSON of
the arguments it was made from), so passes can find it and remake it, e.g. with another
target's schedule.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tvm import tirx

from moec.kernels.capacity import make_capacity_kernel
from moec.kernels.expert_ffn import make_expert_down_kernel, make_expert_up_kernel
from moec.kernels.gpu import (
    make_gpu_capacity_kernel,
    make_gpu_expert_down_kernel,
    make_gpu_expert_up_kernel,
    make_gpu_group_kernel,
    make_gpu_route_kernel,
)
from moec.kernels.group import make_group_kernel
from moec.kernels.route import make_route_kernel
from moec.schedule import CpuSchedule, GpuSchedule

KERNEL_MAKERS: dict[str, Callable[..., tirx.PrimFunc]] = {
    "route": make_route_kernel,
    "capacity": make_capacity_kernel,
    "group": make_group_kernel,
    "expert_up": make_expert_up_kernel,
    "expert_down": make_expert_down_kernel,
}
SCHEDULED_KERNELS = ("expert_up", "expert_down")
# CUDA forms of every kernel: on a GPU each PrimFunc needs thread binding, so all take the schedule.
GPU_KERNEL_MAKERS: dict[str, Callable[..., tirx.PrimFunc]] = {
    "route": make_gpu_route_kernel,
    "capacity": make_gpu_capacity_kernel,
    "group": make_gpu_group_kernel,
    "expert_up": make_gpu_expert_up_kernel,
    "expert_down": make_gpu_expert_down_kernel,
}


def scheduled_kernels(schedule: CpuSchedule | GpuSchedule) -> tuple[str, ...]:
    """The kernel kinds whose code depends on ``schedule`` (all of them on a GPU)."""
    return tuple(GPU_KERNEL_MAKERS) if isinstance(schedule, GpuSchedule) else SCHEDULED_KERNELS


def make_kernel(kind: str, config: dict[str, Any], schedule: CpuSchedule | GpuSchedule) -> tirx.PrimFunc:
    """The ``kind`` kernel for ``config``, tiled by ``schedule`` where the kernel has tiles.

    A :class:`GpuSchedule` gives the CUDA form of the kernel (:mod:`moec.kernels.gpu`).
    """
    if isinstance(schedule, GpuSchedule):
        func = GPU_KERNEL_MAKERS[kind](**config, schedule=schedule)
    else:
        extra = {"schedule": schedule} if kind in SCHEDULED_KERNELS else {}
        func = KERNEL_MAKERS[kind](**config, **extra)
    # No global_symbol: the build names each kernel after its function in the module (unique per
    # layer), where TVMScript would name every kernel of a kind alike.
    func = func.without_attr("global_symbol") if func.attrs and "global_symbol" in func.attrs else func
    return func.with_attrs({"moec.kernel": kind, "moec.config": json.dumps(config, sort_keys=True)})


def kernel_kind(func: object) -> str | None:
    """The kind of a moec kernel PrimFunc, or None for any other function."""
    if isinstance(func, tirx.PrimFunc) and func.attrs is not None and "moec.kernel" in func.attrs:
        return str(func.attrs["moec.kernel"])
    return None
