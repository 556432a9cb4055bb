"""ApplyKernelSchedule: Before/Expected modules compared structurally."""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from moec.kernels import make_kernel
from moec.passes.apply_kernel_schedule import ApplyKernelSchedule
from moec.schedule import CpuSchedule

UP_CONFIG = {
    "num_experts": 4,
    "hidden": 32,
    "ffn": 64,
    "top_k": 2,
    "activation": "silu",
    "gated": True,
    "alpha": 1.0,
    "beta": 0.0,
    "limit": float("inf"),
}
DOWN_CONFIG = {"num_experts": 4, "hidden": 32, "ffn": 64, "top_k": 2}
ROUTE_CONFIG = {"num_experts": 4, "top_k": 2, "scoring": "softmax", "normalize": True, "tie_break": "low"}
DEFAULT = CpuSchedule()
NARROW = CpuSchedule(lanes=4, rows_per_task=8, token_block=2)


@T.prim_func
def unrelated(a: T.Buffer((4,), "float32")):
    for i in range(4):
        a[i] = T.float32(0)


def _module(schedule: CpuSchedule) -> tvm.IRModule:
    return tvm.IRModule(
        {
            "moe0_route": make_kernel("route", ROUTE_CONFIG, schedule),
            "moe0_expert_up": make_kernel("expert_up", UP_CONFIG, schedule),
            "moe0_expert_down": make_kernel("expert_down", DOWN_CONFIG, schedule),
            "unrelated": unrelated,
        }
    )


def test_retiles_expert_kernels_only():
    before, expected = _module(DEFAULT), _module(NARROW)
    apply = ApplyKernelSchedule(NARROW)
    after = apply(before)
    tvm.ir.assert_structural_equal(after, expected)
    assert sorted(apply.changed) == ["moe0_expert_down", "moe0_expert_up"]


def test_same_schedule_changes_nothing():
    before = _module(NARROW)
    apply = ApplyKernelSchedule(NARROW)
    tvm.ir.assert_structural_equal(apply(before), _module(NARROW))
    assert apply.changed == []


def test_schedule_really_differs():
    """Guard for the tests above: the two schedules give different kernels."""
    try:
        tvm.ir.assert_structural_equal(_module(DEFAULT), _module(NARROW))
    except ValueError:
        return
    raise AssertionError("DEFAULT and NARROW schedules produced identical kernels")
