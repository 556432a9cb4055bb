"""Fixtures shared by moec's tests (the importable helpers are in ``tests/helpers.py``).

The tests are grouped by kind:

- ``unit/``: one piece alone — the numpy reference, frontend converters and folding, kernels,
  profiling, the exporters' advice, the test-model builders;
- ``passes/``: one compiler pass each (``test_pass_*``, masking, pruning, early exit, fixed
  routing), structurally and against plain numpy;
- ``e2e/``: whole models compiled and run against numpy, onnxruntime or PyTorch's outputs
  (the exported fixtures);
- ``cli/``: the ``moec`` command line as a user drives it;
- ``targets/``: target files, cross builds (Cortex-A72 under qemu, Orin), the native runner
  and TVM's runtime wheels.

``zoo/`` is not tests: it builds the MoE models they compile (``unit/test_zoo_standard.py`` pins it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from tests.zoo.standard import WeightsOut, build_dense_onehot_moe

MoeBlock = Callable[..., tuple[Path, dict]]


@pytest.fixture(scope="session")
def moe_block(tmp_path_factory: pytest.TempPathFactory) -> MoeBlock:
    """Factory: ``moe_block(hidden=, ffn=, experts=, top_k=, activation="swiglu")`` saves a
    one-layer MoE model (``x [tokens, hidden] -> y``) and returns its path and the layer's weights
    (``router_w`` ``[H, E]``; ``gate``, ``up`` ``[E, H, F]``; ``down`` ``[E, F, H]``). Each
    model is built once per session."""
    built: dict[tuple[int, int, int, int, str], tuple[Path, dict]] = {}

    def make(
        *, hidden: int, ffn: int, experts: int, top_k: int, activation: str = "swiglu"
    ) -> tuple[Path, dict]:
        key = (hidden, ffn, experts, top_k, activation)
        if key not in built:
            weights: WeightsOut = {}
            proto = build_dense_onehot_moe(
                hidden=hidden, inter=ffn, experts=experts, k=top_k, activation=activation, weights_out=weights
            )
            path = tmp_path_factory.mktemp(f"block-{experts}x{top_k}-{activation}") / "model.onnx"
            onnx.save(proto, path)
            built[key] = path, weights["moe0"]
        return built[key]

    return make
