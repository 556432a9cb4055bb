"""Compare an artifact's outputs with the independent numpy reference of the original model."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx

from moec.errors import MoecError
from moec.reference.evaluator import run_reference
from moec.reference.stored import run_stored_reference
from moec.runtime.session import ArtifactSession


@dataclasses.dataclass(frozen=True)
class OutputError:
    """How far one output of the artifact is from the reference."""

    name: str
    tokens: int
    max_abs: float
    max_rel: float
    shape_ok: bool

    def within(self, atol: float) -> bool:
        return self.shape_ok and self.max_abs <= atol


def compare_outputs(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], tokens: int
) -> list[OutputError]:
    """Max absolute and relative error per output (relative to the reference's largest value)."""
    errors = []
    for name, ref in expected.items():
        got = actual[name]
        shape_ok = got.shape == ref.shape and got.dtype == ref.dtype
        if not shape_ok or ref.size == 0:
            errors.append(
                OutputError(
                    name,
                    tokens,
                    float("inf") if not shape_ok else 0.0,
                    float("inf") if not shape_ok else 0.0,
                    shape_ok,
                )
            )
            continue
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        scale = max(float(np.abs(ref).max()), np.finfo(np.float32).tiny)
        errors.append(OutputError(name, tokens, float(diff.max()), float(diff.max() / scale), True))
    return errors


def stored_precision(manifest: dict[str, Any]) -> str:
    """The precision the artifact stores expert matrices in (``fp32`` when it has no MoE layer)."""
    precisions = {entry["precision"] for layer in manifest.get("layers", []) for entry in layer["plan"]}
    if len(precisions) > 1:
        raise MoecError(
            f"artifact mixes expert precisions {sorted(precisions)}; verify cannot model that yet"
        )
    return precisions.pop() if precisions else "fp32"


def reference_outputs(
    model: onnx.ModelProto, manifest: dict[str, Any], feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """What the artifact must compute: the model, with expert matrices rounded as it stores them."""
    precision = stored_precision(manifest)
    if precision == "fp32":
        return run_reference(model, feeds)
    return run_stored_reference(model, precision, feeds)


def verify_artifact(
    session: ArtifactSession, model: onnx.ModelProto, feeds: dict[str, np.ndarray], tokens: int
) -> list[OutputError]:
    """Run the artifact and the reference on ``feeds``; return the error of each output."""
    expected = reference_outputs(model, session.manifest, feeds)
    actual = session.run(feeds)
    return compare_outputs(actual, expected, tokens)
