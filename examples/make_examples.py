"""Regenerates the bundled example models (random weights, deterministic).

    .venv/bin/python examples/make_examples.py

mixtral_tiny.onnx: two Mixtral-style MoE layers (8 SwiGLU experts, top-2, hidden 64, FFN 128)
written with standard ONNX ops the way an eager expert loop exports (NonZero / Gather /
ScatterND dispatch), with LayerNorm, residuals and an MLP between them.
ms_moe_tiny.onnx: the same kind of block as onnxruntime's fused com.microsoft::MoE node.
qmoe_tiny.onnx: one onnxruntime com.microsoft::QMoE node (GPT-OSS-style clamped SwiGLU, 8
experts, top-2, hidden 64, FFN 128) with 4-bit weights in blocks of 32 and zero points.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent


def main() -> None:
    # The builders are the tests' synthetic models (tests/zoo/), importable from the repository root.
    sys.path.insert(0, str(HERE.parent))
    from tests.zoo.ms_moe import build_two_layer_ms_moe_model
    from tests.zoo.qmoe import build_qmoe_model
    from tests.zoo.standard import build_two_layer_model

    models = {
        "mixtral_tiny.onnx": build_two_layer_model(
            "sparse_dispatch", activation="swiglu", hidden=64, inter=128, experts=8, k=2, seed=2026
        ),
        "ms_moe_tiny.onnx": build_two_layer_ms_moe_model(
            activation="swiglu", swiglu_fusion=1, hidden=64, inter=128, experts=8, k=2, seed=2026
        ),
        "qmoe_tiny.onnx": build_qmoe_model(
            bits=4,
            block_size=32,
            zero_points=True,
            activation="swiglu",
            alpha=1.702,
            beta=1.0,
            limit=7.0,
            hidden=64,
            inter=128,
            experts=8,
            k=2,
            seed=2026,
        ),
    }
    for name, model in models.items():
        onnx.save(model, HERE / name)
        print(f"wrote {HERE / name} ({(HERE / name).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
