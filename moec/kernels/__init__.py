"""moec's TIR kernels (an MoE layer's and dense linear layers'): one algorithm per kind, one
backend per target kind.

A kernel is described by a typed config (:mod:`moec.kernels.config`: what it computes) and
built for a schedule (:mod:`moec.schedule`: how a target tiles it) through the backend of the
schedule's target kind (:mod:`moec.kernels.backend`). Until the schedule phase a layer calls
*kernel specs*: PrimFuncs with the kernel's signature and no body, carrying ``moec.kernel``
(the kind) and ``moec.config`` (the config's JSON). Layer passes rewrite specs (cheap: no TIR
is built); :class:`moec.passes.apply_kernel_schedule.ApplyKernelSchedule` turns each into its kernel once,
which then also carries ``moec.schedule`` (the schedule's JSON).

Adding a kernel kind: a config class with its signature, and a ``make_*_kernel(config,
backend)`` in :data:`KERNEL_MAKERS`. Adding a target kind: a backend.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as IT

from moec.kernels.backend import Backend, backend_for
from moec.kernels.capacity import make_capacity_kernel
from moec.kernels.config import KernelConfig, config_from_json
from moec.kernels.expert_ffn import make_expert_down_kernel, make_expert_up_kernel
from moec.kernels.group import make_group_kernel
from moec.kernels.linear import make_linear_kernel
from moec.kernels.route import make_route_kernel
from moec.schedule import CpuSchedule, GpuSchedule

KERNEL_MAKERS: dict[str, Callable[[KernelConfig, Backend], tirx.PrimFunc]] = {
    "route": make_route_kernel,
    "capacity": make_capacity_kernel,
    "group": make_group_kernel,
    "expert_up": make_expert_up_kernel,
    "expert_down": make_expert_down_kernel,
    "linear": make_linear_kernel,
}


def schedule_json(schedule: CpuSchedule | GpuSchedule) -> str:
    """The ``moec.schedule`` attribute of kernels built for ``schedule``."""
    return json.dumps({"kind": schedule.kind, **dataclasses.asdict(schedule)}, sort_keys=True)


def make_kernel(config: KernelConfig, schedule: CpuSchedule | GpuSchedule) -> tirx.PrimFunc:
    """The kernel of ``config`` built for ``schedule`` (its target kind's backend and tiling).

    Built once per process for each (config, schedule): TVMScript parses a kernel's source each
    time it is built (about half a second for an expert kernel), a PrimFunc is immutable, and
    the layers of a model, and the compiles of one process, ask for the same kernels again."""
    return _built_kernel(config, schedule)


@functools.lru_cache(maxsize=512)
def _built_kernel(config: KernelConfig, schedule: CpuSchedule | GpuSchedule) -> tirx.PrimFunc:
    func = KERNEL_MAKERS[config.kind](config, backend_for(schedule))
    # No global_symbol: the build names each kernel after its function in the module (unique per
    # layer), where TVMScript would name every kernel of a kind alike.
    func = func.without_attr("global_symbol") if func.attrs and "global_symbol" in func.attrs else func
    return func.with_attrs(
        {
            "moec.kernel": config.kind,
            "moec.config": config.to_json(),
            "moec.schedule": schedule_json(schedule),
        }
    )


UNBUILT_KERNEL = "moec_kernel_not_built"
"""What a kernel spec's body calls (an external function nothing defines), after an assertion
that fails: a spec compiled without the schedule phase stops with an error instead of computing
nothing, and the call makes the spec impure like the kernel that writes its outputs (TVM's
dead-code elimination removes calls of pure functions whose results are unused)."""


def kernel_spec(config: KernelConfig) -> tirx.PrimFunc:
    """A placeholder for ``config``'s kernel: its signature, no code (built in the schedule phase)."""
    rows = tuple(tirx.Var(name, "int64") for name in (("r", "s") if config.row_dims == 2 else ("n",)))
    with IRBuilder() as builder:
        with IT.prim_func():
            for spec in config.signature(rows):
                IT.arg(spec.name, IT.buffer(spec.shape, spec.dtype))
            message = f"moec: the {config.kind} kernel was never built (no schedule phase ran)"
            with IT.Assert(tirx.const(False, "bool"), message):
                IT.evaluate(tirx.call_extern("int32", UNBUILT_KERNEL))
    return builder.get().with_attrs({"moec.kernel": config.kind, "moec.config": config.to_json()})


def kernel_kind(func: object) -> str | None:
    """The kind of a moec kernel or kernel spec PrimFunc, or None for any other function."""
    if isinstance(func, tirx.PrimFunc) and func.attrs is not None and "moec.kernel" in func.attrs:
        return str(func.attrs["moec.kernel"])
    return None


def kernel_config(func: tirx.PrimFunc) -> KernelConfig:
    """The config a moec kernel (or spec) was made from."""
    return config_from_json(str(func.attrs["moec.kernel"]), str(func.attrs["moec.config"]))
