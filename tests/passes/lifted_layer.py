"""The one MoE layer the literal pass tests start from, as the frontend lifts it, in TVMScript.

``moe0``: 3 experts, hidden 2, ffn 4, top-1, ungated relu, with biases; kernel specs for route,
group, expert_up and expert_down; ``main(x, logits, *weights)`` calls the layer function. The
router's config is a parameter: a pass that only remakes the router (SkipExperts,
FixedRouting) expects this same module with another router config.
"""

from __future__ import annotations

import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

LAYER = '{"name": "moe0", "experts": 3, "top_k": 1, "hidden": 2, "ffn": 4, "activation": "relu"}'
ROUTE_CONFIG = '{"groups": 1, "jitter_eps": 0.0, "kept": null, "normalize": false, "num_experts": 3, "pattern": null, "scale": 1.0, "scoring": "softmax", "selection_bias": null, "skip_below_fraction": null, "skip_top1_above": null, "tie_break": "low", "top_groups": 1, "top_k": 1}'
GROUP_CONFIG = '{"num_experts": 3, "top_k": 1}'
UP_CONFIG = '{"activation": "relu", "alpha": 1.0, "beta": 0.0, "ffn": 4, "formats": null, "fp16_arithmetic": false, "gated": false, "hidden": 2, "int8_dot": null, "int8_group": 0, "limit": Infinity, "num_experts": 3, "panel": null, "top_k": 1}'
DOWN_CONFIG = '{"ffn": 4, "formats": null, "fp16_arithmetic": false, "hidden": 2, "int8_dot": null, "int8_group": 0, "num_experts": 3, "panel": null, "top_k": 1}'


def lifted_layer(route_config: str = ROUTE_CONFIG) -> tvm.IRModule:
    """The lifted layer, its router spec carrying ``route_config``."""

    @I.ir_module
    class Lifted:
        """As the frontend lifts it (TVMScript spells ``moe0.w_up`` as ``moe0_w_up``)."""

        @T.prim_func(private=True)
        def moe0_route(logits_h: T.handle, index_h: T.handle, weight_h: T.handle):
            T.func_attr({"moec.config": route_config, "moec.kernel": "route"})
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
            cls = Lifted
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
        ) -> R.Tensor(("n", 2), "float32"):
            R.func_attr({"num_input": 2})
            n = T.int64()
            cls = Lifted
            y: R.Tensor((n, 2), "float32") = cls.moe0(x, logits, moe0_w_up, moe0_b_up, moe0_w_down, moe0_b_down)
            return y

    return Lifted


@I.ir_module
class NoRouter:
    """No router kernel: an ordinary PrimFunc called from ``main``."""

    @T.prim_func(private=True)
    def double(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            b[i] = a[i] * T.float32(2)

    @R.function
    def main(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
        cls = NoRouter
        y = R.call_tir(cls.double, (x,), out_ty=R.Tensor((4,), "float32"))
        return y
