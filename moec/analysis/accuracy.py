"""Task accuracy of a compiled classifier: run an artifact over a batch of inputs, score its logits.

What a change to the experts (masking, pruning, lower-precision weights) costs is measured on a
trained model's task, not only as an output difference: ``task_accuracy(artifact_logits(artifact,
x), y)`` against the same on the unchanged artifact (or the framework's own logits). TVM is loaded
only by :func:`artifact_logits`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from moec.runtime.session import ArtifactSession


def task_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The share of rows whose highest logit (last axis; ties to the lower class) is the label."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.shape[:-1] != labels.shape or labels.size == 0:
        raise ValueError(f"task_accuracy: logits {logits.shape} do not fit labels {labels.shape}")
    return float(np.mean(logits.argmax(axis=-1) == labels))


def artifact_logits(
    artifact: str | Path | ArtifactSession, inputs: np.ndarray, batch_size: int | None = None
) -> np.ndarray:
    """The output of an artifact with one input and one output for ``inputs``, run ``batch_size``
    rows (leading axis) per call (None: all at once) and concatenated along that axis."""
    from moec.runtime.session import ArtifactSession

    session = artifact if isinstance(artifact, ArtifactSession) else ArtifactSession(artifact)
    if len(session.inputs) != 1 or len(session.outputs) != 1:
        raise ValueError(
            f"artifact_logits: {session.dir} has {len(session.inputs)} inputs and "
            f"{len(session.outputs)} outputs; expected one of each"
        )
    (name,), (output,) = [s["name"] for s in session.inputs], [s["name"] for s in session.outputs]
    step = batch_size or max(len(inputs), 1)
    parts = [session.run({name: inputs[i : i + step]})[output] for i in range(0, len(inputs), step)]
    return np.concatenate(parts, axis=0)
