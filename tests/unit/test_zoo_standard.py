"""Tests for ``tests.zoo.standard``: standard-op MoE ONNX model builders.

Why: these models are the inputs the compiler's pattern matcher and every
end-to-end test rely on, so their semantics must be pinned down
independently of any ONNX runtime.  Each model is run in onnxruntime and
checked against (a) a plain numpy per-token loop computed in float64 from
the canonical weights the builder hands out through ``weights_out``, and
(b) ``onnx.reference.ReferenceEvaluator``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from tests.helpers import assert_close
from tests.zoo.standard import (
    ACTIVATIONS,
    OPSET,
    STANDARD_BLOCKS,
    STANDARD_PATTERNS,
    build_dense_model,
    build_two_layer_model,
)

ATOL = 1e-5
TOKENS = (1, 7)
HIDDEN = 16

# name -> builder kwargs; "plain" is the default config, "biased" turns every
# optional feature the other way (no renormalisation, router and expert biases).
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {"normalize": True, "expert_bias": False, "router_bias": False},
    "biased": {"normalize": False, "expert_bias": True, "router_bias": True},
}

_erf = np.vectorize(math.erf, otypes=[np.float64])


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _inputs(tokens: int, hidden: int = HIDDEN, seed: int = 123) -> np.ndarray:
    """Deterministic O(1) activations of shape [tokens, hidden]."""
    return np.random.default_rng(seed + tokens).standard_normal((tokens, hidden)).astype(np.float32)


def _activation(h: np.ndarray, kind: str) -> np.ndarray:
    """Elementwise relu / exact gelu / silu in float64."""
    if kind == "relu":
        return np.maximum(h, 0.0)
    if kind == "gelu":
        return 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
    return h / (1.0 + np.exp(-h))  # silu (also the gate of swiglu)


def _expert(xt: np.ndarray, w: dict[str, Any], e: int) -> np.ndarray:
    """FFN of expert ``e`` on one token ``xt`` [H], float64."""

    def lin(v: np.ndarray, key: str) -> np.ndarray:
        out = v @ w[key][e].astype(np.float64)
        bias = w[f"{key}_b"]
        return out if bias is None else out + bias[e]

    if w["activation"] == "swiglu":
        h = _activation(lin(xt, "gate"), "silu") * lin(xt, "up")
    else:
        h = _activation(lin(xt, "up"), w["activation"])
    return lin(h, "down")


def numpy_moe(x: np.ndarray, w: dict[str, Any]) -> np.ndarray:
    """Reference MoE block: an explicit loop over tokens and their top-k experts."""
    x64 = x.astype(np.float64)
    out = np.zeros_like(x64)
    for t in range(x64.shape[0]):
        logits = x64[t] @ w["router_w"]
        if w["router_b"] is not None:
            logits = logits + w["router_b"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs, kind="stable")[: w["k"]]
        gates = probs[top]
        if w["normalize"]:
            gates = gates / gates.sum()
        for gate, e in zip(gates, top, strict=True):
            out[t] += gate * _expert(x64[t], w, int(e))
    return out


def numpy_layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """LayerNormalization over the last axis, float64."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    """Initializer ``name`` of ``model`` as float64."""
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor).astype(np.float64)
    raise KeyError(name)


class Runner:
    """A built model with its weights, an ORT session and a reference evaluator."""

    def __init__(self, model: onnx.ModelProto, weights: dict[str, dict[str, Any]]) -> None:
        """Create both runtimes once so parametrised token counts reuse them."""
        self.model = model
        self.weights = weights
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.reference = ReferenceEvaluator(model)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run in onnxruntime, assert ReferenceEvaluator agrees; return ORT's output."""
        (got,) = self.session.run(["y"], {"x": x})
        (ref,) = self.reference.run(["y"], {"x": x})
        assert_close(got, np.asarray(ref), ATOL)
        return got


@functools.cache
def _runner(kind: str, activation: str, config: str) -> Runner:
    """Build (once) the model ``kind`` (a pattern or "two_layer:<pattern>")."""
    weights: dict[str, dict[str, Any]] = {}
    kwargs = {"activation": activation, "weights_out": weights, **CONFIGS[config]}
    if kind.startswith("two_layer:"):
        model = build_two_layer_model(kind.split(":", 1)[1], **kwargs)
    else:
        model = STANDARD_PATTERNS[kind](**kwargs)
    return Runner(model, weights)


# --------------------------------------------------------------------------
# semantics
# --------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("pattern", sorted(STANDARD_PATTERNS))
def test_single_block_matches_numpy(pattern: str, activation: str, config: str, tokens: int) -> None:
    """One MoE block equals the per-token numpy loop, for every pattern and FFN kind."""
    runner = _runner(pattern, activation, config)
    assert set(runner.weights) == {"moe0"}
    x = _inputs(tokens)
    expected = numpy_moe(x, runner.weights["moe0"]).astype(np.float32)
    assert_close(runner.run(x), expected, ATOL)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("pattern", sorted(STANDARD_PATTERNS))
def test_two_layer_matches_numpy(pattern: str, activation: str, tokens: int) -> None:
    """Two composed blocks (LayerNorm, residuals, dense layer between) equal numpy."""
    runner = _runner(
        f"two_layer:{pattern}",
        activation,
        "biased" if activation == "gelu" else "plain",
    )
    w = runner.weights
    assert set(w) == {"moe0", "moe1"}
    assert not np.array_equal(w["moe0"]["up"], w["moe1"]["up"])
    x = _inputs(tokens)
    x64 = x.astype(np.float64)
    ln = numpy_layer_norm(x64, _init(runner.model, "ln/scale"), _init(runner.model, "ln/bias"))
    h1 = x64 + numpy_moe(ln, w["moe0"])
    h2 = np.maximum(h1 @ _init(runner.model, "mlp/w"), 0.0)
    expected = (h2 + numpy_moe(h2, w["moe1"])).astype(np.float32)
    assert_close(runner.run(x), expected, ATOL)


@pytest.mark.parametrize("tokens", TOKENS)
def test_dense_model_matches_numpy(tokens: int) -> None:
    """The no-MoE model is LayerNorm -> MatMul -> Relu -> MatMul."""
    model = build_dense_model()
    runner = Runner(model, {})
    x = _inputs(tokens)
    ln = numpy_layer_norm(x.astype(np.float64), _init(model, "ln/scale"), _init(model, "ln/bias"))
    expected = (np.maximum(ln @ _init(model, "mlp/w1"), 0.0) @ _init(model, "mlp/w2")).astype(np.float32)
    assert_close(runner.run(x), expected, ATOL)
    assert {n.op_type for n in model.graph.node} == {
        "LayerNormalization",
        "MatMul",
        "Relu",
    }


@pytest.mark.parametrize("pattern", sorted(STANDARD_PATTERNS))
def test_other_shapes(pattern: str) -> None:
    """Non-default sizes (k=1, 8 experts, odd dims) and k=E also match numpy."""
    for kwargs in (
        {"hidden": 8, "inter": 12, "experts": 8, "k": 1, "activation": "swiglu"},
        {
            "hidden": 12,
            "inter": 20,
            "experts": 3,
            "k": 3,
            "activation": "gelu",
            "expert_bias": True,
        },
    ):
        weights: dict[str, dict[str, Any]] = {}
        runner = Runner(STANDARD_PATTERNS[pattern](seed=5, weights_out=weights, **kwargs), weights)
        for tokens in (1, 5):
            x = _inputs(tokens, hidden=int(kwargs["hidden"]))
            assert_close(runner.run(x), numpy_moe(x, weights["moe0"]).astype(np.float32), ATOL)


# --------------------------------------------------------------------------
# structure and metadata
# --------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    **STANDARD_PATTERNS,
    **{f"two_layer:{p}": functools.partial(build_two_layer_model, p) for p in STANDARD_BLOCKS},
    "dense": build_dense_model,
}


@pytest.mark.parametrize("name", sorted(_BUILDERS))
def test_interface(name: str) -> None:
    """Every model: opset 17, float32 x ["tokens", H] -> y, passes the full check."""
    model = _BUILDERS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    for value_info, name_ in ((model.graph.input, "x"), (model.graph.output, "y")):
        (vi,) = value_info
        assert vi.name == name_
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = vi.type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == ["tokens", HIDDEN]


def test_pattern_signature_ops() -> None:
    """Each pattern has its signature ops (what the matcher keys on), not others'."""
    ops = {p: [n.op_type for n in b(experts=4).graph.node] for p, b in STANDARD_PATTERNS.items()}
    for types in ops.values():
        assert types[:3] == ["MatMul", "Softmax", "TopK"]
    assert ops["dense_onehot"].count("OneHot") == 1
    assert ops["dense_onehot"].count("Gather") == 4
    assert "ScatterElements" not in ops["dense_onehot"]
    assert ops["dense_batched"].count("ScatterElements") == 1
    assert ops["dense_batched"].count("MatMul") == 3  # router, up, down
    assert {"OneHot", "NonZero"}.isdisjoint(ops["dense_batched"])
    assert ops["sparse_dispatch"].count("NonZero") == 4
    assert ops["sparse_dispatch"].count("ScatterND") == 4
    assert "OneHot" not in ops["sparse_dispatch"]
    assert "TopK" not in {n.op_type for n in build_dense_model().graph.node}


def test_weights_out_matches_initializers() -> None:
    """The weights handed out are exactly the ones stored in the graph."""
    weights: dict[str, dict[str, Any]] = {}
    model = STANDARD_PATTERNS["dense_batched"](activation="swiglu", expert_bias=True, weights_out=weights)
    w = weights["moe0"]
    np.testing.assert_array_equal(_init(model, "moe0/up"), w["up"])
    np.testing.assert_array_equal(_init(model, "moe0/gate"), w["gate"])
    np.testing.assert_array_equal(_init(model, "moe0/down_b")[:, 0, :], w["down_b"])
    assert w["router_w"].shape == (16, 4) and w["down"].shape == (4, 32, 16)
    assert (w["k"], w["normalize"], w["activation"], w["router_b"]) == (
        2,
        True,
        "swiglu",
        None,
    )


def test_deterministic_seed() -> None:
    """Same seed gives byte-identical models; another seed gives other weights."""
    build = STANDARD_PATTERNS["sparse_dispatch"]
    assert build(seed=1).SerializeToString() == build(seed=1).SerializeToString()
    assert build(seed=1).SerializeToString() != build(seed=2).SerializeToString()


@pytest.mark.parametrize(
    "kwargs",
    [{"activation": "tanh"}, {"k": 5, "experts": 4}, {"k": 0}],
)
def test_invalid_arguments(kwargs: dict[str, Any]) -> None:
    """Unsupported activations and out-of-range k are rejected up front."""
    with pytest.raises(ValueError):
        STANDARD_PATTERNS["dense_onehot"](**kwargs)
    with pytest.raises(ValueError):
        build_two_layer_model("nope")
