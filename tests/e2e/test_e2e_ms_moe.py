"""onnxruntime's fused com.microsoft::MoE node compiled end to end, against numpy (and ORT where it runs)."""

from __future__ import annotations

import pytest

from tests.helpers import check_artifact, compile_to, tokens_input
from tests.zoo.ms_moe import build_ms_moe_model, build_two_layer_ms_moe_model

TOKENS = [1, 6, 37]

# (id, builder options, onnxruntime's CPU kernel can run it)
VARIANTS = [
    ("relu", dict(activation="relu"), True),
    ("gelu", dict(activation="gelu"), True),
    ("silu", dict(activation="silu"), True),
    ("identity-no-bias", dict(activation="identity", expert_bias=False), True),
    ("swiglu-interleaved", dict(activation="swiglu", swiglu_fusion=1), True),
    ("swiglu-concatenated", dict(activation="swiglu", swiglu_fusion=2), False),
    ("swiglu-fc3", dict(activation="swiglu", swiglu_fusion=0), False),
    ("gpt-oss-clamped", dict(activation="swiglu", swiglu_fusion=1, alpha=1.702, beta=1.0, limit=7.0), True),
    ("clamp-limit-only", dict(activation="swiglu", swiglu_fusion=2, limit=0.5), False),
    ("geglu", dict(activation="geglu", swiglu_fusion=1), False),
    ("silu-with-fc3", dict(activation="silu", fc3=True), False),
    ("top1-unnormalised", dict(activation="relu", k=1, normalize=0, router_bias=True), True),
    ("top3-of-8", dict(activation="silu", k=3, experts=8), True),
    # onnxruntime's CPU kernel ignores use_sparse_mixer (plain softmax top-2): numpy only
    ("sparse-mixer", dict(activation="silu", k=2, use_sparse_mixer=1), False),
]


@pytest.mark.parametrize(("options", "ort_runs"), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_ms_moe_variant(tmp_path, options, ort_runs):
    model = build_ms_moe_model(hidden=24, inter=40, seed=7, **options)
    session = compile_to(model, tmp_path)
    assert len(session.manifest["layers"]) == 1
    for tokens in TOKENS:
        check_artifact(session, model, {"x": tokens_input(tokens, 24)}, onnxruntime=ort_runs)


def test_two_ms_moe_layers(tmp_path):
    model = build_two_layer_ms_moe_model(activation="swiglu", swiglu_fusion=1, hidden=32, inter=64, experts=8)
    session = compile_to(model, tmp_path)
    assert len(session.manifest["layers"]) == 2
    for tokens in TOKENS:
        check_artifact(session, model, {"x": tokens_input(tokens, 32)})
