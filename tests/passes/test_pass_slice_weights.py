"""SliceWeights: Before/Expected modules compared structurally, the weights against numpy, and the
pass in the pipeline's export phase."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from moec.compiler.compile import lower_model
from moec.frontend.importer import import_model
from moec.frontend.loader import load_model
from moec.options import CompileOptions
from moec.passes.slice_weights import SliceWeights
from moec.targets import load_target

KEPT = [0, 2]  # of 3 experts
CHANNELS = [[0, 3], [1, 2]]  # of 4 intermediate channels, per kept expert
EXPERT_SLICES = json.dumps({"w_up": KEPT, "w_down": KEPT})
CHANNEL_SLICES = json.dumps({"w_up": [1, CHANNELS], "w_down": [2, CHANNELS]})


@I.ir_module
class Before:
    """``main`` as MaskExperts, PruneChannels and StoreExpertWeights leave it: weights retyped to
    2 experts, 2 channels, ``w_up`` fp16; the slices recorded in attributes."""

    @R.function
    def main(
        x: R.Tensor((4, 3), "float32"),
        w_up: R.Tensor((2, 2, 3), "float16"),
        w_down: R.Tensor((2, 3, 2), "float32"),
        b: R.Tensor((3,), "float32"),
    ) -> R.Tensor((4, 3), "float32"):
        R.func_attr(
            {"num_input": 1, "moec.expert_slices": EXPERT_SLICES, "moec.channel_slices": CHANNEL_SLICES}
        )
        y = R.add(x, b)
        return y


@I.ir_module
class Expected:
    @R.function
    def main(
        x: R.Tensor((4, 3), "float32"),
        w_up: R.Tensor((2, 2, 3), "float16"),
        w_down: R.Tensor((2, 3, 2), "float32"),
        b: R.Tensor((3,), "float32"),
    ) -> R.Tensor((4, 3), "float32"):
        R.func_attr({"num_input": 1})
        y = R.add(x, b)
        return y


def _full_weights() -> dict[str, np.ndarray]:
    """The detached weights as the frontend made them: 3 experts, 4 channels, fp32."""
    rng = np.random.default_rng(0)
    return {
        "w_up": rng.standard_normal((3, 4, 3)).astype("float32"),
        "w_down": rng.standard_normal((3, 3, 4)).astype("float32"),
        "b": rng.standard_normal(3).astype("float32"),
    }


def test_removes_the_slice_attributes_and_slices_the_weights() -> None:
    full = _full_weights()
    params = [tvm.runtime.tensor(full[name]) for name in ("w_up", "w_down", "b")]
    slicer = SliceWeights(dict(zip(("w_up", "w_down", "b"), params, strict=True)))
    tvm.ir.assert_structural_equal(slicer(Before), Expected)

    assert list(slicer.weights) == ["w_up", "w_down", "b"]
    w_up = np.stack([full["w_up"][expert][CHANNELS[i], :] for i, expert in enumerate(KEPT)])
    w_down = np.stack([full["w_down"][expert][:, CHANNELS[i]] for i, expert in enumerate(KEPT)])
    assert slicer.weights["w_up"].dtype == "float16"
    np.testing.assert_array_equal(slicer.weights["w_up"].numpy(), w_up.astype("float16"))
    assert slicer.weights["w_down"].dtype == "float32"
    np.testing.assert_array_equal(slicer.weights["w_down"].numpy(), w_down)
    assert slicer.weights["b"] is params[2], "an unchanged weight is passed through, not copied"


def test_nothing_recorded_changes_nothing() -> None:
    """No slice attributes and weights already in ``main``'s dtypes: module and weights as they are."""
    shapes = {"w_up": ((2, 2, 3), "float16"), "w_down": ((2, 3, 2), "float32"), "b": ((3,), "float32")}
    params = [tvm.runtime.tensor(np.ones(shape, dtype)) for shape, dtype in shapes.values()]
    slicer = SliceWeights(dict(zip(shapes, params, strict=True)))
    tvm.ir.assert_structural_equal(slicer(Expected), Expected)
    assert all(slicer.weights[name] is value for name, value in zip(shapes, params, strict=True))


def test_modules_really_differ() -> None:
    """Guard for the tests above: the attributes make Before differ from Expected."""
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(Before, Expected)


def test_export_phase_leaves_weights_that_fit_main(moe_block, tmp_path: Path) -> None:
    """In the pipeline: the layer phase records the slices, the export phase applies and drops
    them, and every weight has its ``main`` parameter's shape and dtype."""
    path, _ = moe_block(hidden=8, ffn=16, experts=4, top_k=2)
    options = CompileOptions(kept_experts={"moe0": [1, 3]}, precision="fp16", dump_ir=tmp_path)
    mod, weights = lower_model(import_model(load_model(path)), load_target("host"), options)
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps == ["00-frontend.py", "01-layers.py", "02-schedule.py", "03-export.py"]
    assert "moec.expert_slices" in (tmp_path / "01-layers.py").read_text()
    assert "moec.expert_slices" not in (tmp_path / "03-export.py").read_text()
    main = mod["main"]
    params = list(main.params)[int(main.attrs["num_input"]) :]
    assert list(weights) == [p.name for p in params]
    for param in params:
        value = weights[param.name]
        assert (list(value.shape), str(value.dtype)) == ([int(d) for d in param.ty.shape], param.ty.dtype)
    assert weights["moe0.w_up.fp16"].shape[0] == 2 and weights["moe0.w_up.fp16"].dtype == "float16"
