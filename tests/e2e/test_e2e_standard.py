"""Standard-op MoE blocks (as exporters write them) compiled end to end, against numpy and ORT."""

from __future__ import annotations

import pytest

from tests.helpers import check_artifact, compile_to, tokens_input
from tests.zoo.standard import STANDARD_PATTERNS, build_dense_model, build_two_layer_model

ACTIVATIONS = ["relu", "gelu", "silu", "swiglu"]
TOKENS = [1, 5, 37]  # 5 and 37 are not multiples of the 4-token block nor of any tile


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("pattern", sorted(STANDARD_PATTERNS))
def test_pattern_matches_reference(tmp_path, pattern, activation):
    model = STANDARD_PATTERNS[pattern](activation=activation, hidden=24, inter=40, experts=6, k=2)
    session = compile_to(model, tmp_path)
    assert len(session.manifest["layers"]) == 1, "the MoE block was not recognised"
    for tokens in TOKENS:
        check_artifact(session, model, {"x": tokens_input(tokens, 24)})


@pytest.mark.parametrize("pattern", sorted(STANDARD_PATTERNS))
def test_biases_no_renormalisation_top1(tmp_path, pattern):
    model = STANDARD_PATTERNS[pattern](
        activation="swiglu", normalize=False, expert_bias=True, router_bias=True, k=1, experts=5, seed=3
    )
    session = compile_to(model, tmp_path)
    layer = session.manifest["layers"][0]
    assert (layer["top_k"], layer["router"]["normalize"], layer["expert_bias"]) == (1, False, True)
    for tokens in TOKENS:
        check_artifact(session, model, {"x": tokens_input(tokens, 16)})


@pytest.mark.parametrize("pattern", sorted(STANDARD_PATTERNS))
def test_two_moe_layers_with_ordinary_layers_between(tmp_path, pattern):
    model = build_two_layer_model(pattern, activation="silu", hidden=32, inter=48, experts=4, k=2)
    session = compile_to(model, tmp_path)
    assert [layer["name"] for layer in session.manifest["layers"]] == ["moe0", "moe1"]
    for tokens in TOKENS:
        check_artifact(session, model, {"x": tokens_input(tokens, 32)})


def test_model_without_moe_compiles_densely(tmp_path):
    model = build_dense_model(hidden=16, inter=32)
    session = compile_to(model, tmp_path)
    assert session.manifest["layers"] == []
    for tokens in (1, 9):
        check_artifact(session, model, {"x": tokens_input(tokens, 16)})
