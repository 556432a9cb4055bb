"""A trained MoE classifier (scikit-learn's digits, ``fixtures/make_digits_moe.py``) compiled by moec:
its task accuracy, not only its output difference, is what masking, pruning and precision change.

The fixture holds the ONNX export (two transformers ``MixtralSparseMoeBlock`` layers, 8 experts,
top-2) and, for the calibration and held-out test splits, the scaled pixels, the labels and
PyTorch's logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moec.analysis.accuracy import artifact_logits, task_accuracy
from moec.analysis.masking import choose_kept
from moec.analysis.profile import profile_model
from moec.compiler.compile import compile_model
from moec.frontend.importer import find_blocks
from moec.frontend.loader import load_model
from moec.options import CompileOptions
from moec.runtime.session import ArtifactSession
from tests.helpers import FIXTURES, FP32_ATOL, assert_close

MODEL = FIXTURES / "models" / "digits-moe.onnx"
EXPERTS, TOP_K, KEEP = 8, 2, 6
MIN_ACCURACY, MIN_MASKED_ACCURACY = 0.95, 0.80


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    """The fixture's splits: ``calib.x``, ``test.x``, ``test.y``, ``test.logits``, ..."""
    with np.load(MODEL.with_suffix(".npz")) as npz:
        return {key: npz[key] for key in npz.files}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture compiled for the host, unchanged."""
    return compile_model(MODEL, tmp_path_factory.mktemp("digits") / "artifact")


def test_both_moe_layers_are_recognised_and_compiled_sparse(artifact: Path) -> None:
    assert len(find_blocks(load_model(MODEL))) == 2
    layers = ArtifactSession(artifact).manifest["layers"]
    assert [(layer["experts"], layer["top_k"]) for layer in layers] == [(EXPERTS, TOP_K)] * 2
    assert all(layer["bytes_per_token_sparse"] < layer["bytes_per_token_dense"] for layer in layers)
    assert all(step["kept"] for layer in layers for step in layer["plan"])


def test_compiled_logits_and_accuracy_match_pytorch(artifact: Path, data: dict[str, np.ndarray]) -> None:
    logits = artifact_logits(artifact, data["test.x"])
    assert_close(logits, data["test.logits"], FP32_ATOL, "test logits vs PyTorch")
    np.testing.assert_array_equal(logits.argmax(1), data["test.logits"].argmax(1))
    accuracy = task_accuracy(logits, data["test.y"])
    print(f"digits-moe test accuracy: compiled {accuracy:.4f}")
    assert accuracy == task_accuracy(data["test.logits"], data["test.y"])
    assert accuracy >= MIN_ACCURACY


def test_logits_do_not_depend_on_the_batch_size(artifact: Path, data: dict[str, np.ndarray]) -> None:
    x = data["test.x"][:40]
    assert_close(artifact_logits(artifact, x, batch_size=1), artifact_logits(artifact, x), FP32_ATOL)


def test_masking_the_least_used_experts_keeps_most_of_the_accuracy(
    tmp_path: Path, data: dict[str, np.ndarray]
) -> None:
    profile = profile_model(load_model(MODEL), MODEL, [{"pixels": data["calib.x"]}])
    kept = choose_kept(profile, keep_experts=KEEP)
    assert [len(ids) for ids in kept.values()] == [KEEP, KEEP]
    masked = compile_model(MODEL, tmp_path / "masked", CompileOptions(kept_experts=kept))
    plans = [layer["plan"] for layer in ArtifactSession(masked).manifest["layers"]]
    assert [sum(step["kept"] for step in plan) for plan in plans] == [KEEP, KEEP]
    accuracy = task_accuracy(artifact_logits(masked, data["test.x"]), data["test.y"])
    print(f"digits-moe test accuracy with {KEEP}/{EXPERTS} experts per layer: {accuracy:.4f} (kept {kept})")
    assert accuracy >= MIN_MASKED_ACCURACY


def test_task_accuracy_scores_the_argmax_and_refuses_labels_that_do_not_fit() -> None:
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5], [0.0, 1.0]], np.float32)
    assert task_accuracy(logits, np.array([1, 0, 0, 0])) == 0.75  # the tie goes to class 0
    with pytest.raises(ValueError, match="do not fit"):
        task_accuracy(logits, np.array([1, 0]))
