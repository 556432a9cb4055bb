"""ApplyKernelSchedule: Before (kernel specs) and Expected (built kernels) as literal TVMScript."""

from __future__ import annotations

import tvm
from tvm.script import ir as I
from tvm.script import tirx as T

from moec.passes.apply_kernel_schedule import ApplyKernelSchedule
from moec.schedule import CpuSchedule

SCHEDULE = CpuSchedule(lanes=4, rows_per_task=2, token_block=1, accumulators=1)
DOWN_CONFIG = '{"ffn": 4, "formats": null, "fp16_arithmetic": false, "hidden": 2, "int8_dot": null, "int8_group": 0, "num_experts": 2, "panel": null, "top_k": 1}'
GROUP_CONFIG = '{"num_experts": 2, "top_k": 1}'
BUILT_FOR = '{"accumulators": 1, "kind": "cpu", "lanes": 4, "panel_vectors": 2, "rows_per_task": 2, "token_block": 1}'


@I.ir_module
class Before:
    @T.prim_func(private=True)
    def moe0_group(index_h: T.handle, weight_h: T.handle, offset: T.Buffer((3,), "int32"), token_h: T.handle, gain_h: T.handle):
        T.func_attr({"moec.config": GROUP_CONFIG, "moec.kernel": "group"})
        n = T.int64()
        index = T.match_buffer(index_h, (n, 1), "int32")
        weight = T.match_buffer(weight_h, (n, 1), "float32")
        token = T.match_buffer(token_h, (n,), "int32")
        gain = T.match_buffer(gain_h, (n,), "float32")
        assert T.bool(False), "moec: the group kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @T.prim_func(private=True)
    def moe0_expert_down(inter_h: T.handle, w_down: T.Buffer((2, 2, 4), "float32"), b_down: T.Buffer((2, 2), "float32"), offset: T.Buffer((3,), "int32"), token_h: T.handle, gain_h: T.handle, y_h: T.handle):
        T.func_attr({"moec.config": DOWN_CONFIG, "moec.kernel": "expert_down"})
        n = T.int64()
        inter = T.match_buffer(inter_h, (n, 4), "float32")
        token = T.match_buffer(token_h, (n,), "int32")
        gain = T.match_buffer(gain_h, (n,), "float32")
        y = T.match_buffer(y_h, (n, 2), "float32")
        assert T.bool(False), "moec: the expert_down kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @T.prim_func(private=True)
    def unrelated(a: T.Buffer((4,), "float32")):
        for i in range(4):
            a[i] = T.float32(0)


@I.ir_module
class Expected:
    @T.prim_func(private=True)
    def moe0_group(index_h: T.handle, weight_h: T.handle, offset: T.Buffer((3,), "int32"), token_h: T.handle, gain_h: T.handle):
        T.func_attr({"moec.config": GROUP_CONFIG, "moec.kernel": "group", "moec.schedule": BUILT_FOR, "op_pattern": 8, "tir.noalias": True})
        n = T.int64()
        index = T.match_buffer(index_h, (n, 1), "int32")
        weight = T.match_buffer(weight_h, (n, 1), "float32")
        token = T.match_buffer(token_h, (n,), "int32")
        gain = T.match_buffer(gain_h, (n,), "float32")
        # one worker (a CPU's) owning all three expert slots (the experts and the skipped slot 2):
        # the serial stable counting sort of the (token, slot) pairs by expert
        for o, i in T.grid(1, 1):
            first = o * 3  # the worker's first slot
            cursor = T.alloc_buffer((4,), "int32")  # CPU scratch: global scope, on the stack
            for r in range(4):
                cursor[r] = 0
            for t, j in T.grid(n, 1):
                if index[t, j] < first:  # before the worker's first slot (none, for one worker)
                    cursor[0] = cursor[0] + 1
                elif index[t, j] < first + 3:
                    cursor[index[t, j] - first + 1] = cursor[index[t, j] - first + 1] + 1
            for r in range(3):
                cursor[r + 1] = cursor[r + 1] + cursor[r]
            for r in range(3):
                if first + r <= 2:
                    offset[first + r] = cursor[r]
            for t, j in T.grid(n, 1):
                if first <= index[t, j] and index[t, j] < first + 3:
                    token[cursor[index[t, j] - first]] = T.Cast("int32", t)
                    gain[cursor[index[t, j] - first]] = weight[t, j]
                    cursor[index[t, j] - first] = cursor[index[t, j] - first] + 1

    @T.prim_func(private=True)
    def moe0_expert_down(inter_h: T.handle, w_down: T.Buffer((2, 2, 4), "float32"), b_down: T.Buffer((2, 2), "float32"), offset: T.Buffer((3,), "int32"), token_h: T.handle, gain_h: T.handle, y_h: T.handle):
        T.func_attr({"moec.config": DOWN_CONFIG, "moec.kernel": "expert_down", "moec.schedule": BUILT_FOR, "op_pattern": 8, "tir.noalias": True})
        n = T.int64()
        inter = T.match_buffer(inter_h, (n, 4), "float32")
        token = T.match_buffer(token_h, (n,), "int32")
        gain = T.match_buffer(gain_h, (n,), "float32")
        y = T.match_buffer(y_h, (n, 2), "float32")
        partial = T.alloc_buffer((n, 2))  # each pair's weighted output row
        pos = T.alloc_buffer((n, 1), "int32")  # where each token's pairs sit in the grouped order
        for o in T.parallel(n):
            for i in range(1):
                p = o
                rank = T.alloc_buffer((1,), "int32")
                rank[0] = 0
                for q in range(p):  # the token's pairs before this one
                    if token[q] == token[p]:
                        rank[0] = rank[0] + 1
                if rank[0] < 1:
                    pos[token[p], rank[0]] = T.Cast("int32", p)
        # rows_per_task=2: both output rows in one parallel task; one thread, one lane per row
        for task in T.parallel(1):
            for thread, lane in T.grid(1, 1):
                # one accumulator buffer per matrix (one here), global scope: on the stack
                acc = T.alloc_buffer((1, 4))
                acc_unused = T.alloc_buffer((1,))
                # expert slots: min(pairs, experts) of them
                for s in range(T.min(n, T.int64(2))):
                    slot = T.Cast("int32", s)
                    e = T.alloc_buffer((1,), "int32")
                    if n > T.int64(2):  # more pairs than experts: slot s is expert s
                        e[0] = slot
                    else:  # slot s is pair s: binary search for the last group starting at or before it
                        e[0] = 0
                        for i in T.unroll(2):
                            jump = T.shift_left(1, 1 - i)
                            if e[0] + jump <= 2:
                                if offset[e[0] + jump] <= slot:
                                    e[0] = e[0] + jump
                    if e[0] < 2:  # an expert, not the skipped slot
                        if offset[e[0] + 1] > offset[e[0]]:  # only experts with tokens
                            if n > T.int64(2) or offset[e[0]] == slot:  # visited once
                                for r in range(2):
                                    # token_block=1: every pair of the group in a full block, no tail
                                    for pb in range(offset[e[0] + 1] - offset[e[0]]):
                                        for pi, v in T.grid(1, 4):
                                            acc[pi, v] = T.float32(0)
                                        for ho in range(1):
                                            for a in T.unroll(1):
                                                for pi in T.unroll(1):
                                                    # lanes=4: one 4-wide vector accumulator per token
                                                    for v in T.vectorized(4):
                                                        acc[pi, a * 4 + v] = acc[pi, a * 4 + v] + w_down[e[0], (task + thread) * 2 + r, ho * 4 + a * 4 + v] * inter[offset[e[0]] + pb + pi, ho * 4 + a * 4 + v]
                                        for pi in T.unroll(1):  # fold the 4 lanes by halving
                                            for v in T.vectorized(2):
                                                acc[pi, v] = acc[pi, v] + acc[pi, v + 2]
                                            for v in T.vectorized(1):
                                                acc[pi, v] = acc[pi, v] + acc[pi, v + 1]
                                        for pi in range(1):
                                            partial[offset[e[0]] + pb + pi, (task + thread) * 2 + r] = gain[offset[e[0]] + pb + pi] * (acc[pi, 0] + b_down[e[0], (task + thread) * 2 + r])
                                    for pt in range(0):
                                        for pi, v in T.grid(1, 4):
                                            acc[pi, v] = T.float32(0)
                                        for ho in range(1):
                                            for a in T.unroll(1):
                                                for pi in T.unroll(1):
                                                    for v in T.vectorized(4):
                                                        acc[pi, a * 4 + v] = acc[pi, a * 4 + v] + w_down[e[0], (task + thread) * 2 + r, ho * 4 + a * 4 + v] * inter[offset[e[0] + 1] - pt - 1 + pi, ho * 4 + a * 4 + v]
                                        for pi in T.unroll(1):
                                            for v in T.vectorized(2):
                                                acc[pi, v] = acc[pi, v] + acc[pi, v + 2]
                                            for v in T.vectorized(1):
                                                acc[pi, v] = acc[pi, v] + acc[pi, v + 1]
                                        for pi in range(1):
                                            partial[offset[e[0] + 1] - pt - 1 + pi, (task + thread) * 2 + r] = gain[offset[e[0] + 1] - pt - 1 + pi] * (acc[pi, 0] + b_down[e[0], (task + thread) * 2 + r])
        # each output element: its token's partial rows summed from 0 in expert order
        for o in T.parallel(n * T.int64(2)):
            for i in range(1):
                t = o // T.int64(2)
                j = o % T.int64(2)
                total = T.alloc_buffer((1,))
                total[0] = T.float32(0)
                for r in range(1):
                    if pos[t, r] < offset[2]:  # not a skipped slot
                        total[0] = total[0] + partial[pos[t, r], j]
                y[t, j] = total[0]

    @T.prim_func(private=True)
    def unrelated(a: T.Buffer((4,), "float32")):
        for i in range(4):
            a[i] = T.float32(0)


def test_builds_every_kernel_spec_and_nothing_else():
    apply = ApplyKernelSchedule(SCHEDULE)
    tvm.ir.assert_structural_equal(apply(Before), Expected)
    assert sorted(apply.changed) == ["moe0_expert_down", "moe0_group"]


def test_kernels_built_for_the_schedule_are_left_alone():
    apply = ApplyKernelSchedule(SCHEDULE)
    tvm.ir.assert_structural_equal(apply(Expected), Expected)
    assert apply.changed == []


def test_kernels_built_for_another_schedule_are_rebuilt():
    other = ApplyKernelSchedule(CpuSchedule())(Before)
    apply = ApplyKernelSchedule(SCHEDULE)
    tvm.ir.assert_structural_equal(apply(other), Expected)
    assert sorted(apply.changed) == ["moe0_expert_down", "moe0_group"]
