"""The CPU schedules of a model's ordinary ops (``moec.kernels.ordinary_ops``): each op form a
decoder has around its MoE and linear layers, compiled with moec's lowering and run on the VM,
matches numpy, and no function is left on TVM's unscheduled default; the fixture decoders have
none left either.

Every case goes through :func:`check_op`: build a Relax function of the op (symbolic token
count where decoders have one), compile it for the host with
:func:`moec.passes.pipeline.lowering_pipeline`, run it at several token counts, compare with a
numpy formula of the op, and check that :func:`unscheduled_functions` finds nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from moec.compiler.compile import lower_model
from moec.frontend.importer import import_model
from moec.frontend.loader import load_model
from moec.kernels.ordinary_ops import (
    REDUCTION_NEEDS_SCHEDULE,
    loop_kinds_and_longest_reduction,
    unscheduled_functions,
)
from moec.passes.pipeline import lowering_pipeline
from moec.targets import load_target
from tests.helpers import FIXTURES, FP32_ATOL, assert_close

HOST = load_target("host").tvm_target
TOKENS = tirx.Var("tokens", "int64")
HEADS, HEAD_DIM, HIDDEN = 4, 8, 512


def _tensor(shape: tuple, dtype: str = "float32") -> relax.TensorType:
    return relax.TensorType(shape, dtype)


def check_op(
    inputs: dict[str, tuple],
    build: Callable[..., relax.Expr],
    expected: Callable[..., np.ndarray | tuple[np.ndarray, ...]],
    token_counts: tuple[int, ...] = (1, 5, 16),
    atol: float = FP32_ATOL,
) -> tvm.IRModule:
    """Compile ``build(*inputs)`` (shapes may use :data:`TOKENS`) for the host, run it at each of
    ``token_counts`` on standard-normal inputs, and compare with ``expected(*arrays)`` (a tuple
    for a tuple of outputs); assert
    no function of the lowered module is left unscheduled. Returns the lowered module."""
    builder = relax.BlockBuilder()
    params = [relax.Var(name, _tensor(shape)) for name, shape in inputs.items()]
    with builder.function("main", params):
        with builder.dataflow():
            output = builder.emit_output(build(*params))
        builder.emit_func_output(output)
    mod = builder.get()
    lowered = lowering_pipeline(HOST)(mod)
    assert unscheduled_functions(lowered) == [], "functions left on TVM's unscheduled default"
    vm = relax.VirtualMachine(
        tvm.compile(mod, target=HOST, relax_pipeline=lowering_pipeline(HOST)), tvm.cpu()
    )
    rng = np.random.default_rng(7)
    for tokens in token_counts:
        arrays = [
            rng.standard_normal([tokens if d is TOKENS else int(d) for d in shape]).astype(np.float32)
            for shape in inputs.values()
        ]
        result = vm["main"](*(tvm.runtime.tensor(a) for a in arrays))
        wanted = expected(*arrays)
        pairs = zip(result, wanted, strict=True) if isinstance(wanted, tuple) else [(result, wanted)]
        for number, (actual, value) in enumerate(pairs):
            assert_close(
                actual.numpy(), value.astype(np.float32), atol, f"{tokens} token(s), output {number}"
            )
    return lowered


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _functions(lowered: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)}


def _loop_kinds(func: tirx.PrimFunc) -> set[tirx.ForKind]:
    return loop_kinds_and_longest_reduction(func)[0]


@pytest.mark.parametrize("tokens", [TOKENS, 16])
def test_attention_scores_scaled_and_masked(tokens: tirx.Var | int) -> None:
    """Q·Kᵀ × scale + mask (the batched-matmul rule with an epilogue), symbolic or fixed length."""
    counts = (1, 5, 16) if tokens is TOKENS else (16,)
    lowered = check_op(
        {
            "q": (1, HEADS, tokens, HEAD_DIM),
            "k_t": (1, HEADS, HEAD_DIM, tokens),
            "mask": (1, 1, tokens, tokens),
        },
        lambda q, k_t, mask: relax.op.add(
            relax.op.multiply(relax.op.matmul(q, k_t), relax.const(0.125, "float32")), mask
        ),
        lambda q, k_t, mask: (q @ k_t) * 0.125 + mask,
        counts,
    )
    (matmul,) = [f for name, f in _functions(lowered).items() if "matmul" in name]
    assert tirx.ForKind.VECTORIZED in _loop_kinds(matmul) or tokens is TOKENS
    assert tirx.ForKind.PARALLEL in _loop_kinds(matmul) or tokens == 16


def test_attention_weighted_values() -> None:
    """P·V: a reduction over the token axis, vectorised over the head dimension."""
    lowered = check_op(
        {"p": (1, HEADS, TOKENS, TOKENS), "v": (1, HEADS, TOKENS, HEAD_DIM)},
        relax.op.matmul,
        lambda p, v: p @ v,
    )
    (matmul,) = [f for name, f in _functions(lowered).items() if "matmul" in name]
    assert {tirx.ForKind.VECTORIZED, tirx.ForKind.PARALLEL} <= _loop_kinds(matmul)


@pytest.mark.parametrize(
    "shape", [(1, HEADS, TOKENS, TOKENS), (1, HEADS, 1, 1), (1, HEADS, TOKENS, 1), (1, HEADS, TOKENS, 64)]
)
def test_softmax(shape: tuple) -> None:
    """Softmax over the last axis: symbolic; of length 1 as in a one-token step (TVM would
    inline the exponential into the one-element max and compute it wrong); fixed (a vector of
    partial sums)."""
    check_op({"x": shape}, lambda x: relax.op.nn.softmax(x, axis=-1), _softmax)


@pytest.mark.parametrize("shape", [(1, HEADS, 1, 1), (1, HEADS, TOKENS, 1)])
def test_reduction_of_one_element_then_element_wise(shape: tuple) -> None:
    """A max over an axis of length 1 (dlight's analysis takes it for an element-wise block)
    followed by an element-wise output, as in a one-token attention step."""
    check_op(
        {"x": shape},
        lambda x: relax.op.exp(relax.op.subtract(x, relax.op.max(x, axis=[-1], keepdims=True))),
        lambda x: np.exp(x - x.max(-1, keepdims=True)),
    )


def test_rms_norm_one_token_and_many() -> None:
    """x · rsqrt(mean(x²) + ε) · w as exporters write it (mean, add, sqrt, divide, multiply)."""

    def build(x: relax.Expr, w: relax.Expr) -> relax.Expr:
        mean = relax.op.mean(relax.op.multiply(x, x), axis=[-1], keepdims=True)
        scale = relax.op.divide(
            relax.const(1.0, "float32"), relax.op.sqrt(relax.op.add(mean, relax.const(1e-6)))
        )
        return relax.op.multiply(w, relax.op.multiply(x, scale))

    def expected(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6))

    for tokens in (1, TOKENS):
        lowered = check_op(
            {"x": (1, tokens, HIDDEN), "w": (HIDDEN,)}, build, expected, (1,) if tokens == 1 else (1, 5)
        )
        (norm,) = [f for f in _functions(lowered).values() if "mean" in str(f.script())]
        assert tirx.ForKind.VECTORIZED in _loop_kinds(norm), "the sum of squares is a vector of partials"


@pytest.mark.parametrize("shape", [(1, TOKENS, HIDDEN), (HIDDEN,)])
def test_layer_norm(shape: tuple) -> None:
    """Over rows, and over a rank-1 tensor, whose statistics are scalars (no axis to factor the
    vector of partial sums onto: the fuzzer's mutant 401 of seed 0 failed there)."""
    check_op(
        {"x": shape, "g": (HIDDEN,), "b": (HIDDEN,)},
        lambda x, g, b: relax.op.nn.layer_norm(x, g, b, axes=[-1], epsilon=1e-5),
        lambda x, g, b: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b,
    )


@pytest.mark.parametrize("tokens", [TOKENS, 8])
def test_rotary_embedding_with_head_split(tokens: tirx.Var | int) -> None:
    """Projection bias, reshape to heads, transpose, rotate half (slices, negation, concat),
    × cos + × sin: one fused element-wise chain whose rows (8 elements) are shorter than a
    vector (fusing its loops into one vectorised loop computed wrong values)."""
    half = HEAD_DIM // 2

    def build(x: relax.Expr, bias: relax.Expr, cos: relax.Expr, sin: relax.Expr) -> relax.Expr:
        projected = relax.op.add(relax.op.reshape(x, (1, tokens, HEADS * HEAD_DIM)), bias)
        heads = relax.op.permute_dims(relax.op.reshape(projected, (1, tokens, HEADS, HEAD_DIM)), [0, 2, 1, 3])
        first = relax.op.strided_slice(heads, axes=[3], begin=[0], end=[half])
        second = relax.op.strided_slice(heads, axes=[3], begin=[half], end=[HEAD_DIM])
        rotated = relax.op.concat([relax.op.negative(second), first], axis=3)
        return relax.op.add(relax.op.multiply(heads, cos), relax.op.multiply(rotated, sin))

    def expected(x: np.ndarray, bias: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        heads = (x + bias).reshape(1, x.shape[0], HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
        rotated = np.concatenate([-heads[..., half:], heads[..., :half]], axis=3)
        return heads * cos + rotated * sin

    counts = (1, 5, 16) if tokens is TOKENS else (8,)
    check_op(
        {
            "x": (tokens, HEADS * HEAD_DIM),
            "bias": (HEADS * HEAD_DIM,),
            "cos": (1, 1, tokens, HEAD_DIM),
            "sin": (1, 1, tokens, HEAD_DIM),
        },
        build,
        expected,
        counts,
    )


def test_split_of_a_transpose() -> None:
    """A transposed tensor split in two outputs: inlining one output into the shared producer
    would leave the other reading a buffer that no longer exists."""

    def build(x: relax.Expr) -> relax.Expr:
        return relax.op.split(
            relax.op.permute_dims(relax.op.reshape(x, (1, 8, 4, 16)), [0, 2, 1, 3]), 2, axis=3
        )

    def expected(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = x.reshape(1, 8, 4, 16).transpose(0, 2, 1, 3)
        return t[..., :8], t[..., 8:]

    check_op({"x": (8, 64)}, build, expected, (8,))


IN_CI_DECODERS = [
    "mixtral-decoder-dynamic-dynamo-batched_mm",
    "qwen3_moe-decoder-dynamic-hf-onnx-ort-cuda-batched_mm",
    "gpt_oss-decoder-hf-onnx-ort-cuda-batched_mm",
    "deepseek_v3-decoder-dynamo-batched_mm",
]


@pytest.mark.parametrize("name", IN_CI_DECODERS)
def test_fixture_decoder_leaves_nothing_unscheduled(name: str) -> None:
    """After moec's lowering every function of the decoder is a moec kernel or scheduled: none
    reduces over ≥ 256 elements without a parallel or vectorised loop (their numbers are checked
    against PyTorch in tests/e2e/test_exported_decoders.py). TVM's own CPU lowering leaves every
    one unscheduled, which the same check reports."""
    target = load_target("host")
    mod, _weights = lower_model(import_model(load_model(FIXTURES / "models" / f"{name}.onnx")), target)
    assert unscheduled_functions(lowering_pipeline(target.tvm_target)(mod)) == []
    default = unscheduled_functions(relax.get_default_pipeline(target.tvm_target)(mod))
    assert len(default) > 10, "the check finds TVM's unscheduled functions"


def test_check_flags_a_long_reduction_without_parallel_or_vector_loops() -> None:
    """The check itself: a scheduled-marked function that sums 512 elements in scalar loops is
    reported; the same sum over 255 elements is not."""

    def summed(length: int) -> tvm.IRModule:
        builder = relax.BlockBuilder()
        x = relax.Var("x", _tensor((4, length)))
        with builder.function("main", [x]):
            with builder.dataflow():
                out = builder.emit_output(relax.op.sum(x, axis=[1]))
            builder.emit_func_output(out)
        legalized = relax.transform.LegalizeOps()(builder.get())
        return tvm.IRModule(
            {
                gv: f.with_attr("tirx.is_scheduled", True) if isinstance(f, tirx.PrimFunc) else f
                for gv, f in legalized.functions_items()
            }
        )

    assert unscheduled_functions(summed(REDUCTION_NEEDS_SCHEDULE)) == ["sum"]
    assert unscheduled_functions(summed(REDUCTION_NEEDS_SCHEDULE - 1)) == []
