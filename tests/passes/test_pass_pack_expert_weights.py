"""PackExpertWeights: Before/Expected modules as literal TVMScript, then the packed weights' numbers.

One MoE layer ``moe0`` of 3 experts (hidden 2, ffn 4, top-1, ungated relu) calls its two expert
kernel specs. With 4-lane, one-vector panels: ``w_up`` ``[3, 4, 2]`` (4 outputs of 2 inputs)
becomes one 4-row panel per expert, ``[3, 1, 2, 4]``; ``w_down`` ``[3, 2, 4]`` (2 outputs: the
panel shrinks to 2 rows) becomes ``[3, 1, 4, 2]``; the specs get those panels; the biases stay.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from moec.passes.pack_expert_weights import PackExpertWeights
from moec.passes.slice_weights import SliceWeights
from moec.schedule import CpuSchedule

SCHEDULE = CpuSchedule(lanes=4, panel_vectors=1)
LAYER = '{"name": "moe0", "experts": 3, "top_k": 1, "hidden": 2, "ffn": 4, "activation": "relu"}'
UP_CONFIG = '{"activation": "relu", "alpha": 1.0, "beta": 0.0, "ffn": 4, "formats": null, "fp16_arithmetic": false, "gated": false, "hidden": 2, "int8_dot": null, "int8_group": 0, "limit": Infinity, "num_experts": 3, "panel": null, "top_k": 1}'
DOWN_CONFIG = '{"ffn": 4, "formats": null, "fp16_arithmetic": false, "hidden": 2, "int8_dot": null, "int8_group": 0, "num_experts": 3, "panel": null, "top_k": 1}'
PACKED_UP_CONFIG = '{"activation": "relu", "alpha": 1.0, "beta": 0.0, "ffn": 4, "formats": null, "fp16_arithmetic": false, "gated": false, "hidden": 2, "int8_dot": null, "int8_group": 0, "limit": Infinity, "num_experts": 3, "panel": 4, "top_k": 1}'
PACKED_DOWN_CONFIG = '{"ffn": 4, "formats": null, "fp16_arithmetic": false, "hidden": 2, "int8_dot": null, "int8_group": 0, "num_experts": 3, "panel": 2, "top_k": 1}'
PACKED = '{"moe0_w_down": {"experts": true, "panel": 2, "transposed": true}, "moe0_w_up": {"experts": true, "panel": 4, "transposed": true}}'


@I.ir_module
class Before:
    @T.prim_func(private=True)
    def moe0_expert_up(x_h: T.handle, w_up: T.Buffer((3, 4, 2), "float32"), b_up: T.Buffer((3, 4), "float32"), offset: T.Buffer((4,), "int32"), token_h: T.handle, inter_h: T.handle):
        T.func_attr({"moec.config": UP_CONFIG, "moec.kernel": "expert_up"})
        n = T.int64()
        x = T.match_buffer(x_h, (n, 2), "float32")
        token = T.match_buffer(token_h, (n,), "int32")
        inter = T.match_buffer(inter_h, (n, 4), "float32")
        assert T.bool(False), "moec: the expert_up kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @T.prim_func(private=True)
    def moe0_expert_down(inter_h: T.handle, w_down: T.Buffer((3, 2, 4), "float32"), b_down: T.Buffer((3, 2), "float32"), offset: T.Buffer((4,), "int32"), token_h: T.handle, gain_h: T.handle, y_h: T.handle):
        T.func_attr({"moec.config": DOWN_CONFIG, "moec.kernel": "expert_down"})
        n = T.int64()
        inter = T.match_buffer(inter_h, (n, 4), "float32")
        token = T.match_buffer(token_h, (n,), "int32")
        gain = T.match_buffer(gain_h, (n,), "float32")
        y = T.match_buffer(y_h, (n, 2), "float32")
        assert T.bool(False), "moec: the expert_down kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @R.function(private=True)
    def moe0(
        x: R.Tensor(("n", 2), "float32"),
        offset: R.Tensor((4,), "int32"),
        token: R.Tensor(("n",), "int32"),
        gain: R.Tensor(("n",), "float32"),
        w_up: R.Tensor((3, 4, 2), "float32"),
        b_up: R.Tensor((3, 4), "float32"),
        w_down: R.Tensor((3, 2, 4), "float32"),
        b_down: R.Tensor((3, 2), "float32"),
    ) -> R.Tensor(("n", 2), "float32"):
        R.func_attr({"moec.layer": LAYER})
        n = T.int64()
        cls = Before
        inter = R.call_tir(cls.moe0_expert_up, (x, w_up, b_up, offset, token), out_ty=R.Tensor((n, 4), "float32"))
        y = R.call_tir(cls.moe0_expert_down, (inter, w_down, b_down, offset, token, gain), out_ty=R.Tensor((n, 2), "float32"))
        return y

    @R.function
    def main(
        x: R.Tensor(("n", 2), "float32"),
        offset: R.Tensor((4,), "int32"),
        token: R.Tensor(("n",), "int32"),
        gain: R.Tensor(("n",), "float32"),
        moe0_w_up: R.Tensor((3, 4, 2), "float32"),
        moe0_b_up: R.Tensor((3, 4), "float32"),
        moe0_w_down: R.Tensor((3, 2, 4), "float32"),
        moe0_b_down: R.Tensor((3, 2), "float32"),
    ) -> R.Tensor(("n", 2), "float32"):
        R.func_attr({"num_input": 4})
        n = T.int64()
        cls = Before
        y: R.Tensor((n, 2), "float32") = cls.moe0(x, offset, token, gain, moe0_w_up, moe0_b_up, moe0_w_down, moe0_b_down)
        return y


@I.ir_module
class Expected:
    @T.prim_func(private=True)
    def moe0_expert_up(x_h: T.handle, w_up: T.Buffer((3, 1, 2, 4), "float32"), b_up: T.Buffer((3, 4), "float32"), offset: T.Buffer((4,), "int32"), token_h: T.handle, inter_h: T.handle):
        T.func_attr({"moec.config": PACKED_UP_CONFIG, "moec.kernel": "expert_up"})
        n = T.int64()
        x = T.match_buffer(x_h, (n, 2), "float32")
        token = T.match_buffer(token_h, (n,), "int32")
        inter = T.match_buffer(inter_h, (n, 4), "float32")
        assert T.bool(False), "moec: the expert_up kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @T.prim_func(private=True)
    def moe0_expert_down(inter_h: T.handle, w_down: T.Buffer((3, 1, 4, 2), "float32"), b_down: T.Buffer((3, 2), "float32"), offset: T.Buffer((4,), "int32"), token_h: T.handle, gain_h: T.handle, y_h: T.handle):
        T.func_attr({"moec.config": PACKED_DOWN_CONFIG, "moec.kernel": "expert_down"})
        n = T.int64()
        inter = T.match_buffer(inter_h, (n, 4), "float32")
        token = T.match_buffer(token_h, (n,), "int32")
        gain = T.match_buffer(gain_h, (n,), "float32")
        y = T.match_buffer(y_h, (n, 2), "float32")
        assert T.bool(False), "moec: the expert_down kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @R.function(private=True)
    def moe0(
        x: R.Tensor(("n", 2), "float32"),
        offset: R.Tensor((4,), "int32"),
        token: R.Tensor(("n",), "int32"),
        gain: R.Tensor(("n",), "float32"),
        w_up: R.Tensor((3, 1, 2, 4), "float32"),  # per expert: one panel of 4 rows, 2 inputs deep
        b_up: R.Tensor((3, 4), "float32"),
        w_down: R.Tensor((3, 1, 4, 2), "float32"),  # per expert: one panel of 2 rows, 4 inputs deep
        b_down: R.Tensor((3, 2), "float32"),
    ) -> R.Tensor(("n", 2), "float32"):
        R.func_attr({"moec.layer": LAYER})
        n = T.int64()
        cls = Expected
        inter = R.call_tir(cls.moe0_expert_up, (x, w_up, b_up, offset, token), out_ty=R.Tensor((n, 4), "float32"))
        y = R.call_tir(cls.moe0_expert_down, (inter, w_down, b_down, offset, token, gain), out_ty=R.Tensor((n, 2), "float32"))
        return y

    @R.function
    def main(
        x: R.Tensor(("n", 2), "float32"),
        offset: R.Tensor((4,), "int32"),
        token: R.Tensor(("n",), "int32"),
        gain: R.Tensor(("n",), "float32"),
        moe0_w_up: R.Tensor((3, 1, 2, 4), "float32"),
        moe0_b_up: R.Tensor((3, 4), "float32"),
        moe0_w_down: R.Tensor((3, 1, 4, 2), "float32"),
        moe0_b_down: R.Tensor((3, 2), "float32"),
    ) -> R.Tensor(("n", 2), "float32"):
        R.func_attr({"num_input": 4, "moec.packed_weights": PACKED})
        n = T.int64()
        cls = Expected
        y: R.Tensor((n, 2), "float32") = cls.moe0(x, offset, token, gain, moe0_w_up, moe0_b_up, moe0_w_down, moe0_b_down)
        return y


def test_expert_matrices_are_packed_in_panels():
    pack = PackExpertWeights(SCHEDULE)
    tvm.ir.assert_structural_equal(pack(Before), Expected)
    assert pack.changed == ["moe0"]


def test_packed_layers_are_left_alone():
    pack = PackExpertWeights(SCHEDULE)
    tvm.ir.assert_structural_equal(pack(Expected), Expected)
    assert pack.changed == []


def test_modules_really_differ():
    """Guard for the tests above: Before is not Expected."""
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(Before, Expected)


def test_slice_weights_packs_each_experts_matrix():
    """``packed[e, p, c, v] = W[e, p * panel + v, c]``; the biases are stored as they were."""
    rng = np.random.default_rng(0)
    shapes = ((3, 4, 2), (3, 4), (3, 2, 4), (3, 2))
    w_up, b_up, w_down, b_down = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    arrays = {"moe0_w_up": w_up, "moe0_b_up": b_up, "moe0_w_down": w_down, "moe0_b_down": b_down}
    weights = SliceWeights({name: tvm.runtime.tensor(value) for name, value in arrays.items()})
    weights(PackExpertWeights(SCHEDULE)(Before))
    for name, matrix, panel in (("moe0_w_up", w_up, 4), ("moe0_w_down", w_down, 2)):
        packed = weights.weights[name].numpy()
        experts, rows, columns = matrix.shape
        assert packed.shape == (experts, 1, columns, panel)
        for e, c, v in np.ndindex(experts, columns, panel):
            assert packed[e, 0, c, v] == matrix[e, v, c], f"{name}[{e}, 0, {c}, {v}]"
    np.testing.assert_array_equal(weights.weights["moe0_b_up"].numpy(), b_up)
    np.testing.assert_array_equal(weights.weights["moe0_b_down"].numpy(), b_down)
