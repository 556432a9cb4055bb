"""DenseLinear: Before/Expected modules as literal TVMScript, then the packed weights' numbers.

``main`` multiplies ``x`` ``[b, s, 4]`` by ``w_q`` ``[4, 6]`` (as ``torch.onnx`` writes a
``Linear``) and by ``w_head`` ``[5, 4]`` through ``permute_dims`` (as a ``Gemm`` with
``transB`` reads it), and multiplies an embedding lookup by the transposed embedding table (a
tied LM head). With 4-column panels: both weights are packed ``[2, 4, 4]`` and their matmuls
become linear kernel calls between reshapes; the embedding table, also gathered by ``take``,
keeps its layout and its matmul.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from moec.passes.dense_linear import DenseLinear
from moec.passes.slice_weights import SliceWeights
from moec.schedule import CpuSchedule

SCHEDULE = CpuSchedule(lanes=4, panel_vectors=1)
Q_CONFIG = '{"in_features": 4, "int8_group": 0, "out_features": 6, "panel": 4, "weight_format": "fp32"}'
HEAD_CONFIG = '{"in_features": 4, "int8_group": 0, "out_features": 5, "panel": 4, "weight_format": "fp32"}'
PACKED = '{"w_head": {"panel": 4, "transposed": true}, "w_q": {"panel": 4, "transposed": false}}'


@I.ir_module
class Before:
    @R.function
    def main(
        x: R.Tensor(("b", "s", 4), "float32"),
        tokens: R.Tensor((3,), "int64"),
        w_q: R.Tensor((4, 6), "float32"),
        w_head: R.Tensor((5, 4), "float32"),
        embed: R.Tensor((10, 4), "float32"),
    ):
        R.func_attr({"num_input": 2})
        b = T.int64()
        s = T.int64()
        with R.dataflow():
            q = R.matmul(x, w_q)
            t = R.permute_dims(w_head, axes=[1, 0])
            h = R.matmul(x, t)
            e = R.take(embed, tokens, axis=0)
            et = R.permute_dims(embed, axes=[1, 0])
            logits = R.matmul(e, et)
            out = (q, h, logits)
            R.output(out)
        return out


@I.ir_module
class Expected:
    @T.prim_func(private=True)
    def linear_4x6(x_h: T.handle, w: T.Buffer((2, 4, 4), "float32"), y_h: T.handle):
        T.func_attr({"moec.config": Q_CONFIG, "moec.kernel": "linear"})
        n = T.int64()
        x = T.match_buffer(x_h, (n, 4), "float32")
        y = T.match_buffer(y_h, (n, 6), "float32")
        assert T.bool(False), "moec: the linear kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @T.prim_func(private=True)
    def linear_4x5(x_h: T.handle, w: T.Buffer((2, 4, 4), "float32"), y_h: T.handle):
        T.func_attr({"moec.config": HEAD_CONFIG, "moec.kernel": "linear"})
        n = T.int64()
        x = T.match_buffer(x_h, (n, 4), "float32")
        y = T.match_buffer(y_h, (n, 5), "float32")
        assert T.bool(False), "moec: the linear kernel was never built (no schedule phase ran)"
        T.evaluate(T.call_extern("int32", "moec_kernel_not_built"))

    @R.function
    def main(
        x: R.Tensor(("b", "s", 4), "float32"),
        tokens: R.Tensor((3,), "int64"),
        w_q: R.Tensor((2, 4, 4), "float32"),  # 6 columns in two 4-column panels
        w_head: R.Tensor((2, 4, 4), "float32"),  # [5, 4] transposed, 5 columns in two panels
        embed: R.Tensor((10, 4), "float32"),  # also gathered: left as it is
    ):
        R.func_attr({"num_input": 2, "moec.packed_weights": PACKED})
        b = T.int64()
        s = T.int64()
        cls = Expected
        with R.dataflow():
            x_q = R.reshape(x, R.shape([b * s, 4]))
            y_q = R.call_tir(cls.linear_4x6, (x_q, w_q), out_ty=R.Tensor((b * s, 6), "float32"))
            q = R.reshape(y_q, R.shape([b, s, 6]))
            x_h = R.reshape(x, R.shape([b * s, 4]))
            y_h = R.call_tir(cls.linear_4x5, (x_h, w_head), out_ty=R.Tensor((b * s, 5), "float32"))
            h = R.reshape(y_h, R.shape([b, s, 5]))
            e = R.take(embed, tokens, axis=0)
            et = R.permute_dims(embed, axes=[1, 0])
            logits = R.matmul(e, et)
            out = (q, h, logits)
            R.output(out)
        return out


def test_matmuls_with_weights_run_the_linear_kernel():
    dense = DenseLinear(SCHEDULE)
    tvm.ir.assert_structural_equal(dense(Before), Expected)
    assert dense.changed == ["w_head", "w_q"]


def test_a_module_without_weight_matmuls_is_left_alone():
    dense = DenseLinear(SCHEDULE)
    tvm.ir.assert_structural_equal(dense(Expected), Expected)
    assert dense.changed == []


def test_modules_really_differ():
    """Guard for the tests above: Before is not Expected."""
    with pytest.raises(ValueError):
        tvm.ir.assert_structural_equal(Before, Expected)


def test_slice_weights_packs_what_dense_linear_recorded():
    """Stored arrays follow the packed signature: ``packed[p, k, v] = W[k, 4p + v]`` (``W``
    transposed first for ``w_head``), zeros past the last column; other weights untouched."""
    rng = np.random.default_rng(0)
    w_q, w_head, embed = (rng.standard_normal(s).astype(np.float32) for s in ((4, 6), (5, 4), (10, 4)))
    arrays = {"w_q": w_q, "w_head": w_head, "embed": embed}
    weights = SliceWeights({name: tvm.runtime.tensor(value) for name, value in arrays.items()})
    weights(DenseLinear(SCHEDULE)(Before))
    for name, matrix in (("w_q", w_q), ("w_head", w_head.T)):
        packed = weights.weights[name].numpy()
        assert packed.shape == (2, 4, 4)
        for p, k, v in np.ndindex(2, 4, 4):
            column = 4 * p + v
            expected = matrix[k, column] if column < matrix.shape[1] else 0.0
            assert packed[p, k, v] == expected, f"{name}[{p}, {k}, {v}]"
    np.testing.assert_array_equal(weights.weights["embed"].numpy(), embed)


def test_int8_weights_become_values_and_column_scales():
    """``dense_format="int8"``: each packed weight becomes ``{name}.int8`` (the panels, int8) and
    ``{name}.int8_scale`` (``[1, panels * panel]``), the kernels read int8 and their scales, and
    SliceWeights stores ``q = rint(W / s)`` with ``s`` = each output column's max |W| / 127
    (zero past the last column), in either orientation of the source."""
    rng = np.random.default_rng(1)
    w_q, w_head, embed = (rng.standard_normal(s).astype(np.float32) for s in ((4, 6), (5, 4), (10, 4)))
    arrays = {"w_q": w_q, "w_head": w_head, "embed": embed}
    weights = SliceWeights({name: tvm.runtime.tensor(value) for name, value in arrays.items()})
    dense = DenseLinear(SCHEDULE, dense_format="int8")
    after = weights(dense(Before))
    main = after["main"]
    params = [(p.name, [int(d) for d in p.ty.shape], str(p.ty.dtype)) for p in main.params[2:]]
    assert params == [
        ("w_q.int8", [2, 4, 4], "int8"),
        ("w_q.int8_scale", [1, 8], "float32"),
        ("w_head.int8", [2, 4, 4], "int8"),
        ("w_head.int8_scale", [1, 8], "float32"),
        ("embed", [10, 4], "float32"),
    ]
    kernels = {gv.name_hint: f for gv, f in after.functions_items() if gv.name_hint.startswith("linear")}
    assert sorted(kernels) == ["linear_4x5_int8", "linear_4x6_int8"]
    assert all('"weight_format": "int8"' in str(f.attrs["moec.config"]) for f in kernels.values())
    assert json.loads(str(main.attrs["moec.dense_weights"])) == {
        "w_head": {"group": 0, "output_axis": 0, "precision": "int8", "router": False},
        "w_q": {"group": 0, "output_axis": 1, "precision": "int8", "router": False},
    }
    for name, matrix in (("w_q", w_q), ("w_head", w_head.T)):  # matrix: [in, out]
        scale = np.abs(matrix).max(axis=0) / np.float32(127)
        q = np.clip(np.rint(matrix / scale), -127, 127)
        stored_scale = weights.weights[f"{name}.int8_scale"].numpy()
        np.testing.assert_array_equal(stored_scale[0, : matrix.shape[1]], scale.astype(np.float32))
        assert not stored_scale[0, matrix.shape[1] :].any()
        packed = weights.weights[f"{name}.int8"].numpy()
        for p, k, v in np.ndindex(2, 4, 4):
            column = 4 * p + v
            assert packed[p, k, v] == (q[k, column] if column < matrix.shape[1] else 0), f"{name}[{p}, {k}, {v}]"
