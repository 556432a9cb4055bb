"""MaskExperts: Before/Expected modules as literal TVMScript.

One MoE layer ``moe0`` of 3 experts (hidden 2, ffn 4, top-1, ungated relu, biases) keeps experts
[0, 2]: the router spec learns ``kept`` (its scores stay over all 3 experts), the group and
expert specs are remade for 2 experts under ``moe0_<kind>_masked``, the layer's and ``main``'s
weights become ``[2, ...]`` and ``main`` records the kept ids per weight in
``moec.expert_slices``. Keeping every expert, naming no layer, or a weight that ``main`` also
uses elsewhere changes nothing.
"""

from __future__ import annotations

import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from moec.passes.mask_experts import MaskExperts
from tests.passes.lifted_layer import DOWN_CONFIG, GROUP_CONFIG, LAYER, ROUTE_CONFIG, UP_CONFIG, lifted_layer

# Experts [0, 2] kept: the router over all 3 with "kept"; the others for 2 experts.
MASKED_ROUTE_CONFIG = '{"groups": 1, "jitter_eps": 0.0, "kept": [0, 2], "normalize": false, "num_experts": 3, "pattern": null, "scale": 1.0, "scoring": "softmax", "selection_bias": null, "skip_below_fraction": null, "skip_top1_above": null, "tie_break": "low", "top_groups": 1, "top_k": 1}'
MASKED_GROUP_CONFIG = '{"num_experts": 2, "top_k": 1}'
MASKED_UP_CONFIG = '{"activation": "relu", "alpha": 1.0, "beta": 0.0, "ffn": 4, "formats": null, "fp16_arithmetic": false, "gated": false, "hidden": 2, "int8_dot": null, "int8_group": 0, "limit": Infinity, "num_experts": 2, "panel": null, "top_k": 1}'
MASKED_DOWN_CONFIG = '{"ffn": 4, "formats": null, "fp16_arithmetic": false, "hidden": 2, "int8_dot": null, "int8_group": 0, "num_experts": 2, "panel": null, "top_k": 1}'
EXPERT_SLICES = '{"moe0_w_up": [0, 2], "moe0_b_up": [0, 2], "moe0_w_down": [0, 2], "moe0_b_down": [0, 2]}'


Before = lifted_layer()


@I.ir_module
class Expected:
    """Experts [0, 2] kept: the ``[3, ...]`` weights are ``[2, ...]``, ``offset`` has 2 + 1
    entries, the intermediate and output tensors are as they were."""

    @T.prim_func(private=True)
    def moe0_route_masked(logits_h: T.handle, index_h: T.handle, weight_h: T.handle):
        T.func_attr({"moec.config": MASKED_ROUTE_CONFIG, "moec.kernel": "route"})
        n = T.int64()
        logits = T.match_buffer(logits_h, (n, 3), "float32")  # scores over all 3 experts
        index = T.match_buffer(index_h, (n, 1), "int32")  # positions among the kept ones
        weight = T.match_buffer(weight_h, (n, 1), "float32")
        assert T.bool(False), "moec: the route kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @T.prim_func(private=True)
    def moe0_group_masked(index_h: T.handle, weight_h: T.handle, offset: T.Buffer((3,), "int32"), token_h: T.handle, gain_h: T.handle):
        T.func_attr({"moec.config": MASKED_GROUP_CONFIG, "moec.kernel": "group"})
        n = T.int64()
        index = T.match_buffer(index_h, (n, 1), "int32")
        weight = T.match_buffer(weight_h, (n, 1), "float32")
        token = T.match_buffer(token_h, (n,), "int32")
        gain = T.match_buffer(gain_h, (n,), "float32")
        assert T.bool(False), "moec: the group kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @T.prim_func(private=True)
    def moe0_expert_up_masked(x_h: T.handle, w_up: T.Buffer((2, 4, 2), "float32"), b_up: T.Buffer((2, 4), "float32"), offset: T.Buffer((3,), "int32"), token_h: T.handle, inter_h: T.handle):
        T.func_attr({"moec.config": MASKED_UP_CONFIG, "moec.kernel": "expert_up"})
        n = T.int64()
        x = T.match_buffer(x_h, (n, 2), "float32")
        token = T.match_buffer(token_h, (n,), "int32")
        inter = T.match_buffer(inter_h, (n, 4), "float32")
        assert T.bool(False), "moec: the expert_up kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @T.prim_func(private=True)
    def moe0_expert_down_masked(inter_h: T.handle, w_down: T.Buffer((2, 2, 4), "float32"), b_down: T.Buffer((2, 2), "float32"), offset: T.Buffer((3,), "int32"), token_h: T.handle, gain_h: T.handle, y_h: T.handle):
        T.func_attr({"moec.config": MASKED_DOWN_CONFIG, "moec.kernel": "expert_down"})
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
        logits: R.Tensor(("n", 3), "float32"),
        w_up: R.Tensor((2, 4, 2), "float32"),
        b_up: R.Tensor((2, 4), "float32"),
        w_down: R.Tensor((2, 2, 4), "float32"),
        b_down: R.Tensor((2, 2), "float32"),
    ) -> R.Tensor(("n", 2), "float32"):
        R.func_attr({"moec.layer": LAYER})
        n = T.int64()
        cls = Expected
        routed = R.call_tir(cls.moe0_route_masked, (logits,), out_ty=[R.Tensor((n, 1), "int32"), R.Tensor((n, 1), "float32")])
        index: R.Tensor((n, 1), "int32") = routed[0]
        weight: R.Tensor((n, 1), "float32") = routed[1]
        grouped = R.call_tir(cls.moe0_group_masked, (index, weight), out_ty=[R.Tensor((3,), "int32"), R.Tensor((n,), "int32"), R.Tensor((n,), "float32")])
        offset: R.Tensor((3,), "int32") = grouped[0]
        token: R.Tensor((n,), "int32") = grouped[1]
        inter = R.call_tir(cls.moe0_expert_up_masked, (x, w_up, b_up, offset, token), out_ty=R.Tensor((n, 4), "float32"))
        gain: R.Tensor((n,), "float32") = grouped[2]
        y = R.call_tir(cls.moe0_expert_down_masked, (inter, w_down, b_down, offset, token, gain), out_ty=R.Tensor((n, 2), "float32"))
        return y

    @R.function
    def main(
        x: R.Tensor(("n", 2), "float32"),
        logits: R.Tensor(("n", 3), "float32"),
        moe0_w_up: R.Tensor((2, 4, 2), "float32"),
        moe0_b_up: R.Tensor((2, 4), "float32"),
        moe0_w_down: R.Tensor((2, 2, 4), "float32"),
        moe0_b_down: R.Tensor((2, 2), "float32"),
    ) -> R.Tensor(("n", 2), "float32"):
        R.func_attr({"num_input": 2, "moec.expert_slices": EXPERT_SLICES})
        n = T.int64()
        cls = Expected
        y: R.Tensor((n, 2), "float32") = cls.moe0(x, logits, moe0_w_up, moe0_b_up, moe0_w_down, moe0_b_down)
        return y


@I.ir_module
class SharedWeight:
    """``main`` also returns ``moe0_w_down``: masking would change what it returns."""

    @T.prim_func(private=True)
    def moe0_route(logits_h: T.handle, index_h: T.handle, weight_h: T.handle):
        T.func_attr({"moec.config": ROUTE_CONFIG, "moec.kernel": "route"})
        n = T.int64()
        logits = T.match_buffer(logits_h, (n, 3), "float32")
        index = T.match_buffer(index_h, (n, 1), "int32")
        weight = T.match_buffer(weight_h, (n, 1), "float32")
        assert T.bool(False), "moec: the route kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @T.prim_func(private=True)
    def moe0_group(index_h: T.handle, weight_h: T.handle, offset: T.Buffer((4,), "int32"), token_h: T.handle, gain_h: T.handle):
        T.func_attr({"moec.config": GROUP_CONFIG, "moec.kernel": "group"})
        n = T.int64()
        index = T.match_buffer(index_h, (n, 1), "int32")
        weight = T.match_buffer(weight_h, (n, 1), "float32")
        token = T.match_buffer(token_h, (n,), "int32")
        gain = T.match_buffer(gain_h, (n,), "float32")
        assert T.bool(False), "moec: the group kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

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
        logits: R.Tensor(("n", 3), "float32"),
        w_up: R.Tensor((3, 4, 2), "float32"),
        b_up: R.Tensor((3, 4), "float32"),
        w_down: R.Tensor((3, 2, 4), "float32"),
        b_down: R.Tensor((3, 2), "float32"),
    ) -> R.Tensor(("n", 2), "float32"):
        R.func_attr({"moec.layer": LAYER})
        n = T.int64()
        cls = SharedWeight
        routed = R.call_tir(cls.moe0_route, (logits,), out_ty=[R.Tensor((n, 1), "int32"), R.Tensor((n, 1), "float32")])
        index: R.Tensor((n, 1), "int32") = routed[0]
        weight: R.Tensor((n, 1), "float32") = routed[1]
        grouped = R.call_tir(cls.moe0_group, (index, weight), out_ty=[R.Tensor((4,), "int32"), R.Tensor((n,), "int32"), R.Tensor((n,), "float32")])
        offset: R.Tensor((4,), "int32") = grouped[0]
        token: R.Tensor((n,), "int32") = grouped[1]
        inter = R.call_tir(cls.moe0_expert_up, (x, w_up, b_up, offset, token), out_ty=R.Tensor((n, 4), "float32"))
        gain: R.Tensor((n,), "float32") = grouped[2]
        y = R.call_tir(cls.moe0_expert_down, (inter, w_down, b_down, offset, token, gain), out_ty=R.Tensor((n, 2), "float32"))
        return y

    @R.function
    def main(
        x: R.Tensor(("n", 2), "float32"),
        logits: R.Tensor(("n", 3), "float32"),
        moe0_w_up: R.Tensor((3, 4, 2), "float32"),
        moe0_b_up: R.Tensor((3, 4), "float32"),
        moe0_w_down: R.Tensor((3, 2, 4), "float32"),
        moe0_b_down: R.Tensor((3, 2), "float32"),
    ) -> R.Tuple(R.Tensor(("n", 2), "float32"), R.Tensor((3, 2, 4), "float32")):
        R.func_attr({"num_input": 2})
        n = T.int64()
        cls = SharedWeight
        y: R.Tensor((n, 2), "float32") = cls.moe0(x, logits, moe0_w_up, moe0_b_up, moe0_w_down, moe0_b_down)
        return (y, moe0_w_down)


def test_masks_experts_of_the_named_layer() -> None:
    mask = MaskExperts({"moe0": [2, 0]})  # in any order: kept ids are sorted
    tvm.ir.assert_structural_equal(mask(Before), Expected)
    assert mask.changed == ["moe0"]


def test_keeping_every_expert_changes_nothing() -> None:
    mask = MaskExperts({"moe0": [0, 1, 2]})
    tvm.ir.assert_structural_equal(mask(Before), Before)
    assert mask.changed == []


def test_a_layer_not_named_is_left_alone() -> None:
    mask = MaskExperts({"moe1": [0]})
    tvm.ir.assert_structural_equal(mask(Before), Before)
    assert mask.changed == []


def test_weight_used_elsewhere_changes_nothing() -> None:
    mask = MaskExperts({"moe0": [0, 2]})
    tvm.ir.assert_structural_equal(mask(SharedWeight), SharedWeight)
    assert mask.changed == []


@pytest.mark.parametrize("kept", [[0, 3], [1, 1]], ids=["id-past-last", "repeated"])
def test_kept_ids_not_naming_distinct_experts_are_refused(kept) -> None:
    with pytest.raises(ValueError, match="not distinct ids of its 3 experts"):
        MaskExperts({"moe0": kept})(Before)


def test_modules_really_differ() -> None:
    """Guard for the tests above: Before is not Expected, and SharedWeight is not Before."""
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(Before, Expected)
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(Before, SharedWeight)
