"""PruneChannels: Before/Expected modules as literal TVMScript.

One MoE layer ``moe0`` of 3 experts (hidden 2, ffn 4, top-1, ungated relu, biases) keeps 3 of
its 4 intermediate channels per expert: ``w_up`` ``[3, 4, 2]`` and ``b_up`` ``[3, 4]`` lose a row
(axis 1), ``w_down`` ``[3, 2, 4]`` a column (axis 2), ``b_down`` stays; the expert specs are
remade for ``ffn = 3`` under ``moe0_<kind>_pruned``, the intermediate tensor is ``[n, 3]``, the
router and group specs are untouched, and ``main`` records the kept channels in
``moec.channel_slices``. Keeping every channel changes nothing; unequal counts are refused.
"""

from __future__ import annotations

import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from moec.passes.prune_channels import PruneChannels
from tests.passes.lifted_layer import GROUP_CONFIG, LAYER, ROUTE_CONFIG, lifted_layer

KEPT = [[0, 1, 3], [0, 2, 3], [1, 2, 3]]  # per expert, 3 of the 4 channels
PRUNED_UP_CONFIG = '{"activation": "relu", "alpha": 1.0, "beta": 0.0, "ffn": 3, "formats": null, "fp16_arithmetic": false, "gated": false, "hidden": 2, "int8_dot": null, "int8_group": 0, "limit": Infinity, "num_experts": 3, "panel": null, "top_k": 1}'
PRUNED_DOWN_CONFIG = '{"ffn": 3, "formats": null, "fp16_arithmetic": false, "hidden": 2, "int8_dot": null, "int8_group": 0, "num_experts": 3, "panel": null, "top_k": 1}'
CHANNEL_SLICES = '{"moe0_w_up": [1, [[0, 1, 3], [0, 2, 3], [1, 2, 3]]], "moe0_b_up": [1, [[0, 1, 3], [0, 2, 3], [1, 2, 3]]], "moe0_w_down": [2, [[0, 1, 3], [0, 2, 3], [1, 2, 3]]]}'


Before = lifted_layer()


@I.ir_module
class Expected:
    """3 channels kept per expert: the FFN axis of ``w_up``/``b_up``/``w_down`` and of the
    intermediate tensor is 3; ``b_down``, the router and the group kernel are as they were."""

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
    def moe0_expert_up_pruned(x_h: T.handle, w_up: T.Buffer((3, 3, 2), "float32"), b_up: T.Buffer((3, 3), "float32"), offset: T.Buffer((4,), "int32"), token_h: T.handle, inter_h: T.handle):
        T.func_attr({"moec.config": PRUNED_UP_CONFIG, "moec.kernel": "expert_up"})
        n = T.int64()
        x = T.match_buffer(x_h, (n, 2), "float32")
        token = T.match_buffer(token_h, (n,), "int32")
        inter = T.match_buffer(inter_h, (n, 3), "float32")
        assert T.bool(False), "moec: the expert_up kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @T.prim_func(private=True)
    def moe0_expert_down_pruned(inter_h: T.handle, w_down: T.Buffer((3, 2, 3), "float32"), b_down: T.Buffer((3, 2), "float32"), offset: T.Buffer((4,), "int32"), token_h: T.handle, gain_h: T.handle, y_h: T.handle):
        T.func_attr({"moec.config": PRUNED_DOWN_CONFIG, "moec.kernel": "expert_down"})
        n = T.int64()
        inter = T.match_buffer(inter_h, (n, 3), "float32")
        token = T.match_buffer(token_h, (n,), "int32")
        gain = T.match_buffer(gain_h, (n,), "float32")
        y = T.match_buffer(y_h, (n, 2), "float32")
        assert T.bool(False), "moec: the expert_down kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @R.function(private=True)
    def moe0(
        x: R.Tensor(("n", 2), "float32"),
        logits: R.Tensor(("n", 3), "float32"),
        w_up: R.Tensor((3, 3, 2), "float32"),
        b_up: R.Tensor((3, 3), "float32"),
        w_down: R.Tensor((3, 2, 3), "float32"),
        b_down: R.Tensor((3, 2), "float32"),
    ) -> R.Tensor(("n", 2), "float32"):
        R.func_attr({"moec.layer": LAYER})
        n = T.int64()
        cls = Expected
        routed = R.call_tir(cls.moe0_route, (logits,), out_ty=[R.Tensor((n, 1), "int32"), R.Tensor((n, 1), "float32")])
        index: R.Tensor((n, 1), "int32") = routed[0]
        weight: R.Tensor((n, 1), "float32") = routed[1]
        grouped = R.call_tir(cls.moe0_group, (index, weight), out_ty=[R.Tensor((4,), "int32"), R.Tensor((n,), "int32"), R.Tensor((n,), "float32")])
        offset: R.Tensor((4,), "int32") = grouped[0]
        token: R.Tensor((n,), "int32") = grouped[1]
        inter = R.call_tir(cls.moe0_expert_up_pruned, (x, w_up, b_up, offset, token), out_ty=R.Tensor((n, 3), "float32"))
        gain: R.Tensor((n,), "float32") = grouped[2]
        y = R.call_tir(cls.moe0_expert_down_pruned, (inter, w_down, b_down, offset, token, gain), out_ty=R.Tensor((n, 2), "float32"))
        return y

    @R.function
    def main(
        x: R.Tensor(("n", 2), "float32"),
        logits: R.Tensor(("n", 3), "float32"),
        moe0_w_up: R.Tensor((3, 3, 2), "float32"),
        moe0_b_up: R.Tensor((3, 3), "float32"),
        moe0_w_down: R.Tensor((3, 2, 3), "float32"),
        moe0_b_down: R.Tensor((3, 2), "float32"),
    ) -> R.Tensor(("n", 2), "float32"):
        R.func_attr({"num_input": 2, "moec.channel_slices": CHANNEL_SLICES})
        n = T.int64()
        cls = Expected
        y: R.Tensor((n, 2), "float32") = cls.moe0(x, logits, moe0_w_up, moe0_b_up, moe0_w_down, moe0_b_down)
        return y


def test_prunes_channels_of_the_named_layer() -> None:
    prune = PruneChannels({"moe0": KEPT})
    tvm.ir.assert_structural_equal(prune(Before), Expected)
    assert prune.changed == ["moe0"]


def test_keeping_every_channel_changes_nothing() -> None:
    prune = PruneChannels({"moe0": [[0, 1, 2, 3]] * 3})
    tvm.ir.assert_structural_equal(prune(Before), Before)
    assert prune.changed == []


def test_experts_keeping_different_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="same number of channels"):
        PruneChannels({"moe0": [[0, 1, 3], [0, 2], [1, 2, 3]]})(Before)


@pytest.mark.parametrize("channels", [[[0, 1, 2]] * 2, [[0, 1, 4]] * 3], ids=["one-list-short", "id-past-ffn"])
def test_channel_lists_not_matching_the_layer_are_refused(channels) -> None:
    with pytest.raises(ValueError, match="give each of its 3 experts channel ids below 4"):
        PruneChannels({"moe0": channels})(Before)


def test_modules_really_differ() -> None:
    """Guard for the tests above: Before is not Expected."""
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(Before, Expected)
