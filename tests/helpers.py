"""The one numeric check every test uses, and helpers to compile and run test models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from moec.build.compile import compile_model
from moec.reference.evaluator import run_reference
from moec.runtime.session import ArtifactSession

FP32_ATOL = 1e-4
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float, what: str = "") -> None:
    """Assert equal shape and dtype, and every value within ``atol`` (no relative slack)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    label = f"{what}: " if what else ""
    assert actual.shape == expected.shape, f"{label}shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{label}dtype {actual.dtype} != {expected.dtype}"
    np.testing.assert_allclose(actual, expected, rtol=0.0, atol=atol, err_msg=label)


def tokens_input(tokens: int, hidden: int, seed: int = 0, batch: tuple[int, ...] = ()) -> np.ndarray:
    """Deterministic O(1) hidden states ``[*batch, tokens, hidden]``."""
    rng = np.random.default_rng(1000 + 17 * tokens + seed)
    return rng.standard_normal((*batch, tokens, hidden)).astype(np.float32)


def compile_to(model: onnx.ModelProto, directory: Path, target: str = "host") -> ArtifactSession:
    """Save ``model`` under ``directory``, compile it, and load the artifact."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    onnx.save(model, path)
    compile_model(path, target, directory / "artifact")
    return ArtifactSession(directory / "artifact")


def check_artifact(
    session: ArtifactSession,
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    atol: float = FP32_ATOL,
    onnxruntime: bool = True,
) -> None:
    """The artifact's outputs match the numpy reference (and onnxruntime, when it runs the model)."""
    actual = session.run(feeds)
    expected = run_reference(model, feeds)
    for name, value in expected.items():
        assert_close(actual[name], value, atol, f"{name} vs numpy reference")
    if onnxruntime:
        import onnxruntime as ort

        ort_session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in ort_session.get_outputs()]
        for name, value in zip(names, ort_session.run(None, feeds), strict=True):
            assert_close(actual[name], value, atol, f"{name} vs onnxruntime")


def softmax_top_k(x: np.ndarray, router_w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k experts and renormalised weights per token of a softmax router ``x @ router_w``,
    computed in float64 (the independent routing the masking/pruning/skipping tests start from)."""
    logits = x.astype(np.float64) @ router_w
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    index = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    gain = np.take_along_axis(probs, index, 1)
    return index, gain / gain.sum(1, keepdims=True)


def fixture_cases(name: str) -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """An exported fixture's npz (keys ``CASE.in.NAME`` / ``CASE.out.NAME``) as
    {case: (inputs, PyTorch outputs)}."""
    cases: dict = {}
    with np.load(FIXTURES / "models" / f"{name}.npz") as data:
        for key in data.files:
            case, kind, tensor = key.split(".", 2)
            cases.setdefault(case, ({}, {}))[0 if kind == "in" else 1][tensor] = data[key]
    return cases
