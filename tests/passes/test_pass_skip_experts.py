"""SkipExperts: Before/Expected modules as literal TVMScript.

One MoE layer ``moe0`` of 3 experts (hidden 2, ffn 4, top-1, ungated relu, biases): the router
spec is remade with the early-exit thresholds in its config (``skip_top1_above``,
``skip_below_fraction``) under the same name and signature; the layer, ``main``, the group and
expert specs are untouched. A module without a router kernel is left alone.
"""

from __future__ import annotations

import pytest
import tvm

from moec.passes.skip_experts import SkipExperts
from tests.passes.lifted_layer import NoRouter, lifted_layer

SKIP_ROUTE_CONFIG = '{"groups": 1, "jitter_eps": 0.0, "kept": null, "normalize": false, "num_experts": 3, "pattern": null, "scale": 1.0, "scoring": "softmax", "selection_bias": null, "skip_below_fraction": 0.25, "skip_top1_above": 0.9, "tie_break": "low", "top_groups": 1, "top_k": 1}'

Before = lifted_layer()
Expected = lifted_layer(SKIP_ROUTE_CONFIG)
"""Thresholds top-1 above 0.9, below a quarter of the top-1: only the router's config changes."""


def test_router_gets_the_thresholds() -> None:
    skip = SkipExperts(top1_above=0.9, below_fraction=0.25)
    tvm.ir.assert_structural_equal(skip(Before), Expected)
    assert skip.changed == ["moe0_route"]


def test_module_without_router_is_left_alone() -> None:
    skip = SkipExperts(top1_above=0.9, below_fraction=0.25)
    tvm.ir.assert_structural_equal(skip(NoRouter), NoRouter)
    assert skip.changed == []


def test_a_router_already_configured_is_not_counted() -> None:
    skip = SkipExperts(top1_above=0.9, below_fraction=0.25)
    tvm.ir.assert_structural_equal(skip(Expected), Expected)
    assert skip.changed == []


def test_modules_really_differ() -> None:
    """Guard for the tests above: Before is not Expected."""
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(Before, Expected)
