"""FixedRouting: Before/Expected modules as literal TVMScript.

One MoE layer ``moe0`` of 3 experts (hidden 2, ffn 4, top-1, ungated relu, biases): the router
spec is remade with ``pattern`` in its config under the same name and signature (the logits
still come in); the layer, ``main``, the group and expert specs are untouched. A module without
a router kernel is left alone; an unknown pattern is refused.
"""

from __future__ import annotations

import pytest
import tvm

from moec.passes.fixed_routing import FixedRouting
from tests.passes.lifted_layer import NoRouter, lifted_layer

CYCLE_ROUTE_CONFIG = '{"groups": 1, "jitter_eps": 0.0, "kept": null, "normalize": false, "num_experts": 3, "pattern": "cycle", "scale": 1.0, "scoring": "softmax", "selection_bias": null, "skip_below_fraction": null, "skip_top1_above": null, "tie_break": "low", "top_groups": 1, "top_k": 1}'

Before = lifted_layer()
Expected = lifted_layer(CYCLE_ROUTE_CONFIG)
"""Routing fixed to the cycle pattern: only the router's config changes."""


def test_router_gets_the_pattern() -> None:
    fixed = FixedRouting("cycle")
    tvm.ir.assert_structural_equal(fixed(Before), Expected)
    assert fixed.changed == ["moe0_route"]


def test_module_without_router_is_left_alone() -> None:
    fixed = FixedRouting("tile")
    tvm.ir.assert_structural_equal(fixed(NoRouter), NoRouter)
    assert fixed.changed == []


def test_unknown_pattern_is_refused() -> None:
    with pytest.raises(ValueError, match="pattern must be one of cycle, tile"):
        FixedRouting("random")


def test_a_router_already_configured_is_not_counted() -> None:
    fixed = FixedRouting("cycle")
    tvm.ir.assert_structural_equal(fixed(Expected), Expected)
    assert fixed.changed == []


def test_modules_really_differ() -> None:
    """Guard for the tests above: Before is not Expected."""
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(Before, Expected)
