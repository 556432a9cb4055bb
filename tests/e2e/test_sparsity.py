"""The dispatch reads only the selected experts' weights.

An artifact whose unselected experts' weights are NaN must still give finite, correct
output; poisoning a selected expert instead must show up (so the test can fail).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from moec.artifact import WEIGHTS, read_manifest
from moec.reference.ms_moe import ms_moe_routing
from moec.runtime.session import ArtifactSession
from moec.weights_file import read_weights
from tests.helpers import check_artifact, compile_to, rewrite_weights, tokens_input
from tests.zoo.ms_moe import build_ms_moe_model
from tests.zoo.standard import build_dense_batched_moe


def _poison(artifact_dir, experts: set[int]) -> None:
    """Overwrite every weight and bias of ``experts`` in the stored weights file with NaN."""
    path = artifact_dir / WEIGHTS
    params = {name: np.array(value) for name, value in read_weights(path).items()}
    for name in read_manifest(artifact_dir)["layers"][0]["weights"].values():
        for expert in experts:
            params[name][expert] = np.nan
    rewrite_weights(artifact_dir, params)


def _selected(model, x: np.ndarray, k: int) -> set[int]:
    """The experts the router picks for tokens ``x`` (the builders have no router bias)."""
    router = next(t for t in model.graph.initializer if "router" in t.name and len(t.dims) == 2)
    logits = x @ numpy_helper.to_array(router)
    experts, _ = ms_moe_routing(logits, k=k, normalize_routing_weights=1)
    return {int(e) for e in experts.reshape(-1)}


@pytest.mark.parametrize("builder", [build_ms_moe_model, build_dense_batched_moe], ids=["ms-moe", "standard"])
def test_unselected_experts_are_never_read(tmp_path, builder):
    model = builder(
        activation="swiglu",
        hidden=32,
        inter=48,
        experts=8,
        k=2,
        seed=5,
        **({"swiglu_fusion": 1} if builder is build_ms_moe_model else {}),
    )
    x = tokens_input(1, 32, seed=9)
    selected = _selected(model, x, k=2)
    assert len(selected) == 2
    compile_to(model, tmp_path)
    _poison(tmp_path / "artifact", set(range(8)) - selected)
    poisoned = ArtifactSession(tmp_path / "artifact")
    assert np.isfinite(poisoned.run({"x": x})["y"]).all()
    check_artifact(poisoned, model, {"x": x})


def test_poisoning_a_selected_expert_is_detected(tmp_path):
    model = build_ms_moe_model(activation="silu", hidden=32, inter=48, experts=8, k=2, seed=5)
    x = tokens_input(1, 32, seed=9)
    compile_to(model, tmp_path)
    _poison(tmp_path / "artifact", {min(_selected(model, x, k=2))})
    assert np.isnan(ArtifactSession(tmp_path / "artifact").run({"x": x})["y"]).any()
