"""Standard ops that ``onnx.reference.ReferenceEvaluator`` (onnx 1.x) computes wrongly, redone.

- ``GatherElements`` with a negative ``axis`` (PhiMoE's exporters write ``axis=-1``): onnx's
  implementation compares the wrong cross-sections of ``data`` and ``indices`` and raises.

Pass :data:`FIXED_OPS` as ``new_ops`` to every ``ReferenceEvaluator`` moec builds: the frontend's
numerical confirmation of a block and the reference alike, which is why it belongs to neither.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun


class GatherElements(OpRun):
    """ONNX ``GatherElements``: ``out[i][j][k] = data[i][indices[i][j][k]][k]`` (for axis 1)."""

    def _run(self, data: np.ndarray, indices: np.ndarray, axis: int = 0) -> tuple[np.ndarray]:  # type: ignore[override]
        axis = axis + data.ndim if axis < 0 else axis
        indices = np.where(indices < 0, indices + data.shape[axis], indices).astype(np.int64)
        return (np.take_along_axis(data, indices, axis=axis),)


FIXED_OPS: list[type[OpRun]] = [GatherElements]
