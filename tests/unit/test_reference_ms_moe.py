"""Checks the numpy ``com.microsoft::MoE`` oracle (moec.reference) against onnxruntime 1.32 CPU.

Three kinds of evidence, strongest first:

1. Variants the ORT CPU kernel runs: ``run_reference`` on zoo models versus
   onnxruntime, at 1, 5 and 17 tokens.
2. Variants it cannot run (fc3, swiglu_fusion 0/2): weight-permutation
   identities that map them onto the ORT-checked ``swiglu_fusion=1`` path.
3. All variants: ``ms_moe`` versus a deliberately naive per-token loop written
   below straight from the op's schema text (float64 scalars, no shared code).

Further tests pin down ORT behaviour the oracle documents (tie-breaking, which
variants ORT refuses, that ORT's CPU kernel ignores use_sparse_mixer), so a
future onnxruntime that changes them makes this file fail.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moec.reference.evaluator import run_reference
from moec.reference.ms_moe import ms_moe, ms_moe_routing
from tests.helpers import assert_close
from tests.zoo.ms_moe import build_ms_moe_model, build_two_layer_ms_moe_model

ATOL = 1e-5
TOKENS = (1, 5, 17)


# --------------------------------------------------------------------------- helpers


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` with onnxruntime's CPU provider; outputs keyed by name."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # expected failures below would otherwise spam stderr
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def bare_moe_model(
    inputs: list[np.ndarray | None], **attrs: Any
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A model holding a single MoE node whose eight inputs (None = omitted) are graph inputs."""
    names = [
        "input",
        "router_probs",
        "fc1_experts_weights",
        "fc1_experts_bias",
        "fc2_experts_weights",
        "fc2_experts_bias",
        "fc3_experts_weights",
        "fc3_experts_bias",
    ]
    node_inputs: list[str] = []
    graph_inputs = []
    feeds: dict[str, np.ndarray] = {}
    for name, value in zip(names, inputs + [None] * (len(names) - len(inputs)), strict=True):
        if value is None:
            node_inputs.append("")
            continue
        node_inputs.append(name)
        feeds[name] = np.asarray(value, dtype=np.float32)
        graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    while node_inputs[-1] == "":
        node_inputs.pop()
    node = helper.make_node("MoE", node_inputs, ["output"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], "bare_moe", graph_inputs, [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)]
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=10,
    )
    return model, feeds


def ort_moe(inputs: list[np.ndarray | None], **attrs: Any) -> np.ndarray:
    """Run one MoE node on onnxruntime CPU."""
    model, feeds = bare_moe_model(inputs, **attrs)
    return ort_run(model, feeds)["output"]


def random_weights(
    rng: np.random.Generator,
    *,
    tokens: int,
    hidden: int,
    inter: int,
    experts: int,
    fc1_rows: int,
    fc3: bool = False,
) -> dict[str, np.ndarray | None]:
    """Random float32 MoE inputs with O(1) activations."""

    def n(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.normal(0.0, std, shape).astype(np.float32)

    return {
        "x": n((tokens, hidden), 1.0),
        "router": n((tokens, experts), 1.0),
        "fc1_w": n((experts, fc1_rows, hidden), 0.3),
        "fc1_b": n((experts, fc1_rows), 0.1),
        "fc2_w": n((experts, hidden, inter), 0.2),
        "fc2_b": n((experts, hidden), 0.1),
        "fc3_w": n((experts, inter, hidden), 0.3) if fc3 else None,
        "fc3_b": n((experts, inter), 0.1) if fc3 else None,
    }


def as_inputs(w: dict[str, np.ndarray | None]) -> list[np.ndarray | None]:
    """The eight op inputs, in op order."""
    return [w["x"], w["router"], w["fc1_w"], w["fc1_b"], w["fc2_w"], w["fc2_b"], w["fc3_w"], w["fc3_b"]]


# ----------------------------------------------------------------- naive reference
# Written from the contrib schema text (ContribOperators.md "com.microsoft.MoE")
# and ORT's CUDA sparse_mixer/Phi-3.5 description, one token and one scalar at a
# time, deliberately sharing nothing with moec.reference.ms_moe.


def _sig(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a)) if a >= 0 else math.exp(a) / (1.0 + math.exp(a))


def _act(name: str, v: float) -> float:
    if name == "relu":
        return max(v, 0.0)
    if name == "relu2":
        return max(v, 0.0) ** 2
    if name == "gelu":  # ORT's MoE uses the tanh approximation
        return 0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    if name == "silu":
        return v * _sig(v)
    if name == "identity":
        return v
    raise AssertionError(name)


def _naive_sparse_mixer(s: list[float], eps: float = 0.01) -> list[tuple[int, float]]:
    """Phi-3.5-MoE sparsemixer (top-2) for one token, in the PyTorch reference's division form."""
    chosen: list[tuple[int, float]] = []
    scores = list(s)
    for slot in range(2):
        m = max(scores)
        i = scores.index(m)
        mask = []
        for v in s:
            factor = max(abs(v), m)
            mask.append(factor > 0 and (m - v) / factor > 2 * eps)
        if slot == 1:
            mask[chosen[0][0]] = True
        denom = sum(math.exp(v - m) for j, v in enumerate(s) if not mask[j])
        chosen.append((i, math.exp(s[i] - m) / denom))
        scores[i] = -math.inf
    return chosen


def naive_ms_moe(
    x: np.ndarray,
    router: np.ndarray,
    fc1_w: np.ndarray,
    fc1_b: np.ndarray | None,
    fc2_w: np.ndarray,
    fc2_b: np.ndarray | None,
    fc3_w: np.ndarray | None,
    fc3_b: np.ndarray | None,
    *,
    activation_type: str = "relu",
    k: int = 1,
    normalize_routing_weights: int = 0,
    swiglu_fusion: int = 0,
    activation_alpha: float = 1.0,
    activation_beta: float = 0.0,
    swiglu_limit: float | None = None,
    use_sparse_mixer: int = 0,
) -> np.ndarray:
    """Per-token, per-scalar MoE straight from the schema (float64 math, float32 result)."""
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden).astype(np.float64)
    num_experts = router.shape[1]
    inter = fc2_w.shape[2]
    out = np.zeros_like(rows)
    for t, row in enumerate(rows):
        s = [float(v) for v in router[t]]
        if use_sparse_mixer:
            chosen = _naive_sparse_mixer(s)
        else:
            m = max(s)
            e_s = [math.exp(v - m) for v in s]
            p = [v / sum(e_s) for v in e_s]
            top = sorted(range(num_experts), key=lambda e: (p[e], e), reverse=True)[:k]
            ws = [p[e] for e in top]
            if normalize_routing_weights == 1:
                ws = [w / sum(ws) for w in ws]
            chosen = list(zip(top, ws, strict=True))
        for e, w in chosen:
            if w <= 0:
                continue
            f1 = fc1_w[e].astype(np.float64) @ row + (0.0 if fc1_b is None else fc1_b[e])
            f3 = (
                None
                if fc3_w is None
                else fc3_w[e].astype(np.float64) @ row + (0.0 if fc3_b is None else fc3_b[e])
            )
            h = np.zeros(inter)
            for j in range(inter):
                if activation_type in ("swiglu", "geglu"):
                    if f3 is not None:
                        g, lin = f1[j], f3[j]
                    elif swiglu_fusion == 2:
                        g, lin = f1[j], f1[inter + j]
                    else:  # 1, or 0 without fc3 (legacy interleaved)
                        g, lin = f1[2 * j], f1[2 * j + 1]
                    if activation_type == "geglu":
                        h[j] = _act("gelu", g) * lin
                        continue
                    if swiglu_limit is not None:
                        g = min(g, swiglu_limit)
                        lin = min(max(lin, -swiglu_limit), swiglu_limit)
                    h[j] = g * _sig(activation_alpha * g) * (lin + activation_beta)
                elif f3 is not None:
                    h[j] = _act(activation_type, f1[j]) * f3[j]
                else:
                    h[j] = _act(activation_type, f1[j])
            y = fc2_w[e].astype(np.float64) @ h + (0.0 if fc2_b is None else fc2_b[e])
            out[t] += w * y
    return out.reshape(x.shape).astype(np.float32)


# ------------------------------------------------- 1. ORT-runnable variants vs ORT

ORT_VARIANTS: dict[str, dict[str, Any]] = {
    "relu": {"activation": "relu"},
    "gelu": {"activation": "gelu"},
    "silu": {"activation": "silu"},
    "identity": {"activation": "identity"},
    "relu_k1_raw_nobias_routerbias": {
        "activation": "relu",
        "k": 1,
        "normalize": 0,
        "expert_bias": False,
        "router_bias": True,
    },
    "gelu_k_all_raw": {"activation": "gelu", "k": 4, "normalize": 0},
    "silu_k3": {"activation": "silu", "k": 3, "experts": 6, "router_bias": True},
    "swiglu_defaults": {"activation": "swiglu", "swiglu_fusion": 1},
    "swiglu_gpt_oss": {"activation": "swiglu", "swiglu_fusion": 1, "alpha": 1.702, "beta": 1.0, "limit": 7.0},
    "swiglu_tight_limit": {
        "activation": "swiglu",
        "swiglu_fusion": 1,
        "alpha": 1.702,
        "beta": 1.0,
        "limit": 0.5,
    },
    "swiglu_alpha_beta_k1_raw_nobias": {
        "activation": "swiglu",
        "swiglu_fusion": 1,
        "alpha": 0.5,
        "beta": 0.25,
        "k": 1,
        "normalize": 0,
        "expert_bias": False,
    },
}


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("variant", sorted(ORT_VARIANTS))
def test_single_layer_matches_ort(variant: str, tokens: int) -> None:
    model = build_ms_moe_model(seed=tokens, **ORT_VARIANTS[variant])
    x = np.random.default_rng(100 + tokens).normal(size=(tokens, 16)).astype(np.float32)
    expected = ort_run(model, {"x": x})
    actual = run_reference(model, {"x": x})
    assert list(actual) == ["y"]
    assert_close(actual["y"], expected["y"], ATOL)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("variant", ["relu", "gelu_k_all_raw", "swiglu_gpt_oss", "swiglu_tight_limit"])
def test_two_layer_matches_ort(variant: str, tokens: int) -> None:
    model = build_two_layer_ms_moe_model(seed=7 * tokens, **ORT_VARIANTS[variant])
    x = np.random.default_rng(200 + tokens).normal(size=(tokens, 16)).astype(np.float32)
    assert_close(run_reference(model, {"x": x})["y"], ort_run(model, {"x": x})["y"], ATOL)


def test_3d_input_matches_ort() -> None:
    rng = np.random.default_rng(1)
    w = random_weights(rng, tokens=6, hidden=8, inter=12, experts=4, fc1_rows=24)
    w["x"] = w["x"].reshape(2, 3, 8)
    attrs = {"activation_type": "swiglu", "swiglu_fusion": 1, "k": 2, "normalize_routing_weights": 1}
    expected = ort_moe(as_inputs(w), **attrs)
    assert expected.shape == (2, 3, 8)
    assert_close(ms_moe(*as_inputs(w), **attrs), expected, ATOL)


def test_ties_go_to_higher_expert_index_like_ort() -> None:
    rng = np.random.default_rng(2)
    w = random_weights(rng, tokens=4, hidden=8, inter=8, experts=5, fc1_rows=8)
    w["router"] = np.array(
        [[1, 1, 0, 0, 0], [0, 2, 2, 2, 2], [3, 0, 3, 0, 3], [0, 0, 0, 0, 0]], dtype=np.float32
    )
    for k in (1, 2, 3):
        experts, _ = ms_moe_routing(w["router"], k=k)
        assert experts[1, 0] == 4 and experts[3, 0] == 4, experts
        attrs = {"k": k, "normalize_routing_weights": 1}
        assert_close(ms_moe(*as_inputs(w), **attrs), ort_moe(as_inputs(w), **attrs), ATOL)


def test_zero_weight_routes_are_skipped_like_ort() -> None:
    """A route whose softmax weight underflows to 0 must not propagate its expert's inf."""
    rng = np.random.default_rng(3)
    w = random_weights(rng, tokens=5, hidden=8, inter=8, experts=4, fc1_rows=8)
    w["router"][:, 3] = -1e4
    w["fc2_b"][3] = np.inf  # expert 3's output is inf; 0 * inf would be NaN
    with np.errstate(over="ignore", invalid="ignore"):
        actual = ms_moe(*as_inputs(w), k=4)
    expected = ort_moe(as_inputs(w), k=4)
    assert np.isfinite(expected).all()
    assert_close(actual, expected, ATOL)


def test_gelu_is_the_tanh_approximation() -> None:
    """Guards the gelu flavour: exact-erf GELU would differ from ORT by ~1e-4 here."""
    rng = np.random.default_rng(4)
    w = random_weights(rng, tokens=9, hidden=8, inter=16, experts=4, fc1_rows=16)
    w["x"] *= 3
    attrs = {"activation_type": "gelu", "k": 2}
    expected = ort_moe(as_inputs(w), **attrs)
    assert_close(ms_moe(*as_inputs(w), **attrs), expected, ATOL)
    f1 = np.einsum("eih,th->tei", w["fc1_w"].astype(np.float64), w["x"].astype(np.float64))
    erf_gelu = 0.5 * f1 * (1 + np.vectorize(math.erf)(f1 / math.sqrt(2)))
    tanh_gelu = 0.5 * f1 * (1 + np.tanh(math.sqrt(2 / math.pi) * (f1 + 0.044715 * f1**3)))
    assert np.abs(erf_gelu - tanh_gelu).max() > 1e-4  # the two flavours are distinguishable


def test_reference_adds_missing_ms_opset_import() -> None:
    model = build_ms_moe_model(activation="silu")
    x = np.random.default_rng(5).normal(size=(5, 16)).astype(np.float32)
    expected = run_reference(model, {"x": x})["y"]
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.opset_import[:]
    stripped.opset_import.append(helper.make_opsetid("", 17))
    assert_close(run_reference(stripped, {"x": x})["y"], expected, 0.0)


# ---------------------------- 2. ORT-unrunnable variants tied to ORT by permutation


def _interleaved_swiglu_case(seed: int) -> dict[str, np.ndarray | None]:
    return random_weights(np.random.default_rng(seed), tokens=17, hidden=8, inter=12, experts=4, fc1_rows=24)


SWIGLU_ATTR_SETS = [{}, {"activation_alpha": 1.702, "activation_beta": 1.0, "swiglu_limit": 0.5}]


@pytest.mark.parametrize("extra", SWIGLU_ATTR_SETS)
def test_swiglu_fusion2_equals_ort_fusion1_on_deinterleaved_weights(extra: dict[str, float]) -> None:
    w = _interleaved_swiglu_case(10)
    attrs = {"activation_type": "swiglu", "k": 2, "normalize_routing_weights": 1, **extra}
    expected = ort_moe(as_inputs(w), swiglu_fusion=1, **attrs)
    cat = dict(w)
    cat["fc1_w"] = np.concatenate([w["fc1_w"][:, 0::2], w["fc1_w"][:, 1::2]], axis=1)
    cat["fc1_b"] = np.concatenate([w["fc1_b"][:, 0::2], w["fc1_b"][:, 1::2]], axis=1)
    assert_close(ms_moe(*as_inputs(cat), swiglu_fusion=2, **attrs), expected, ATOL)


@pytest.mark.parametrize("extra", SWIGLU_ATTR_SETS)
def test_swiglu_fusion0_fc3_equals_ort_fusion1(extra: dict[str, float]) -> None:
    w = _interleaved_swiglu_case(11)
    attrs = {"activation_type": "swiglu", "k": 2, "normalize_routing_weights": 0, **extra}
    expected = ort_moe(as_inputs(w), swiglu_fusion=1, **attrs)
    split = dict(w)
    split["fc1_w"], split["fc3_w"] = w["fc1_w"][:, 0::2], w["fc1_w"][:, 1::2]
    split["fc1_b"], split["fc3_b"] = w["fc1_b"][:, 0::2], w["fc1_b"][:, 1::2]
    assert_close(ms_moe(*as_inputs(split), swiglu_fusion=0, **attrs), expected, ATOL)
    # fusion 0 without fc3 is read as interleaved (ORT CUDA's legacy rule).
    assert_close(ms_moe(*as_inputs(w), swiglu_fusion=0, **attrs), expected, ATOL)


def test_mixtral_silu_fc3_equals_ort_plain_swiglu() -> None:
    """silu(fc1 x) * (fc3 x) is SwiGLU with alpha=1, beta=0 and no limit."""
    w = _interleaved_swiglu_case(12)
    expected = ort_moe(
        as_inputs(w), activation_type="swiglu", swiglu_fusion=1, k=2, normalize_routing_weights=1
    )
    split = dict(w)
    split["fc1_w"], split["fc3_w"] = w["fc1_w"][:, 0::2], w["fc1_w"][:, 1::2]
    split["fc1_b"], split["fc3_b"] = w["fc1_b"][:, 0::2], w["fc1_b"][:, 1::2]
    actual = ms_moe(*as_inputs(split), activation_type="silu", k=2, normalize_routing_weights=1)
    assert_close(actual, expected, ATOL)


# ------------------------------------------------ 3. every variant vs the naive loop

NAIVE_CASES: dict[str, dict[str, Any]] = {
    # ORT-runnable ones too, so that the naive loop is itself validated against ORT.
    "relu": {"attrs": {"activation_type": "relu", "k": 2, "normalize_routing_weights": 1}},
    "gelu_raw": {"attrs": {"activation_type": "gelu", "k": 3}},
    "swiglu_f1_gpt_oss": {
        "attrs": {
            "activation_type": "swiglu",
            "swiglu_fusion": 1,
            "k": 2,
            "activation_alpha": 1.702,
            "activation_beta": 1.0,
            "swiglu_limit": 0.5,
        },
        "fused": True,
    },
    # ORT CPU cannot run these:
    "swiglu_f2": {"attrs": {"activation_type": "swiglu", "swiglu_fusion": 2, "k": 2}, "fused": True},
    "swiglu_f2_clamped": {
        "attrs": {
            "activation_type": "swiglu",
            "swiglu_fusion": 2,
            "k": 1,
            "activation_alpha": 1.702,
            "activation_beta": 1.0,
            "swiglu_limit": 0.7,
        },
        "fused": True,
    },
    "swiglu_f0_fc3": {
        "attrs": {"activation_type": "swiglu", "swiglu_fusion": 0, "k": 2, "normalize_routing_weights": 1},
        "fc3": True,
    },
    "swiglu_f0_fc3_clamped": {
        "attrs": {
            "activation_type": "swiglu",
            "swiglu_fusion": 0,
            "k": 2,
            "activation_alpha": 1.702,
            "activation_beta": 1.0,
            "swiglu_limit": 0.7,
        },
        "fc3": True,
    },
    "silu_fc3_mixtral": {
        "attrs": {"activation_type": "silu", "k": 2, "normalize_routing_weights": 1},
        "fc3": True,
    },
    "relu_fc3": {"attrs": {"activation_type": "relu", "k": 1}, "fc3": True},
    "geglu_f1": {"attrs": {"activation_type": "geglu", "swiglu_fusion": 1, "k": 2}, "fused": True},
    "geglu_f2": {"attrs": {"activation_type": "geglu", "swiglu_fusion": 2, "k": 2}, "fused": True},
    "relu2": {"attrs": {"activation_type": "relu2", "k": 2}},
    "sparse_mixer": {"attrs": {"activation_type": "silu", "k": 2, "use_sparse_mixer": 1}, "fc3": True},
    "sparse_mixer_close_logits": {
        "attrs": {"activation_type": "relu", "k": 2, "use_sparse_mixer": 1, "normalize_routing_weights": 1},
        "close_logits": True,
    },
}


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("case", sorted(NAIVE_CASES))
def test_ms_moe_matches_naive_loop(case: str, tokens: int) -> None:
    spec = NAIVE_CASES[case]
    inter = 12
    rng = np.random.default_rng(1000 + tokens)
    w = random_weights(
        rng,
        tokens=tokens,
        hidden=8,
        inter=inter,
        experts=8,
        fc1_rows=2 * inter if spec.get("fused") else inter,
        fc3=bool(spec.get("fc3")),
    )
    if spec.get("close_logits"):
        # Logits within a few percent of each other, so the sparsemixer's 2*eps
        # relative threshold masks some experts and keeps others.
        w["router"] = (3.0 + 0.05 * rng.normal(size=w["router"].shape)).astype(np.float32)
        # An all-negative row exercises the factor = max(|s|, m) rule with m < 0.
        # -1.0202 is kept only because the factor is max(|s|, m) = 1.0202, not |m| = 1.
        w["router"][0] = [-1.0, -1.01, -1.5, -1.03, -2.0, -1.005, -3.0, -1.0202]
    assert_close(ms_moe(*as_inputs(w), **spec["attrs"]), naive_ms_moe(*as_inputs(w), **spec["attrs"]), ATOL)


def test_naive_sparse_mixer_masks_some_but_not_all() -> None:
    """Sanity of the sparse-mixer fixture: weights strictly between 0 and 1 do occur."""
    rng = np.random.default_rng(7)
    logits = (3.0 + 0.05 * rng.normal(size=(17, 8))).astype(np.float32)
    _, weights = ms_moe_routing(logits, k=2, use_sparse_mixer=1)
    assert ((weights > 0.05) & (weights < 0.95)).any()


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize(
    "options",
    [
        {"activation": "swiglu", "swiglu_fusion": 0, "alpha": 1.702, "beta": 1.0, "limit": 0.7},
        {"activation": "swiglu", "swiglu_fusion": 2, "router_bias": True},
        {"activation": "silu", "fc3": True, "expert_bias": False},
    ],
    ids=["swiglu_f0_fc3", "swiglu_f2", "silu_fc3"],
)
def test_reference_on_unrunnable_zoo_models_matches_naive(options: dict[str, Any], tokens: int) -> None:
    """run_reference on zoo models ORT cannot run, versus the naive loop on the same initializers."""
    model = build_ms_moe_model(seed=tokens, **options)
    x = np.random.default_rng(300 + tokens).normal(size=(tokens, 16)).astype(np.float32)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MoE")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs["activation_type"] = attrs["activation_type"].decode()
    router = x @ inits["moe0_router_w"] + inits.get("moe0_router_b", np.float32(0))
    ins = [inits.get(name) for name in list(node.input[2:]) + [""] * (8 - len(node.input))]
    expected = naive_ms_moe(x, router, *ins, **attrs)
    assert_close(run_reference(model, {"x": x})["y"], expected, ATOL)


# ------------------------------------------- ORT behaviour the oracle documents


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"activation": "swiglu", "swiglu_fusion": 0}, "interleaved SwiGLU"),
        ({"activation": "swiglu", "swiglu_fusion": 2}, "interleaved SwiGLU"),
        ({"activation": "silu", "fc3": True}, "FC3 is not implemented"),
        ({"activation": "geglu", "swiglu_fusion": 1}, "Unsupported MoE activation type"),
        ({"activation": "relu2"}, "Unsupported MoE activation type"),
    ],
)
def test_ort_cpu_still_refuses(options: dict[str, Any], message: str) -> None:
    """If a future onnxruntime runs these, cross-check them directly and update ms_moe's docstring."""
    model = build_ms_moe_model(**options)
    x = np.ones((3, 16), dtype=np.float32)
    with pytest.raises(Exception, match=message):
        ort_run(model, {"x": x})


def test_ort_cpu_ignores_sparse_mixer() -> None:
    """Documents the known divergence: ORT 1.32 CPU runs use_sparse_mixer=1 as plain softmax top-2."""
    rng = np.random.default_rng(8)
    w = random_weights(rng, tokens=17, hidden=8, inter=8, experts=8, fc1_rows=8)
    ort_out = ort_moe(as_inputs(w), k=2, use_sparse_mixer=1)
    assert_close(ort_out, ms_moe(*as_inputs(w), k=2, use_sparse_mixer=0), ATOL)
    assert np.abs(ort_out - ms_moe(*as_inputs(w), k=2, use_sparse_mixer=1)).max() > 1e-3


# ------------------------------------------------------------------ input checks


@pytest.mark.parametrize(
    ("change", "attrs", "message"),
    [
        ("legacy_layout", {}, "fc2_experts_weights must have shape"),
        (None, {"k": 5}, "1 <= k <= num_experts"),
        (None, {"k": 0}, "1 <= k <= num_experts"),
        (None, {"k": 1, "use_sparse_mixer": 1}, "only supports k=2"),
        (None, {"activation_type": "tanh"}, "unsupported activation_type"),
        ("router_3d", {}, "router_probs must be 2-D"),
        ("fc3", {"activation_type": "swiglu", "swiglu_fusion": 1}, "requires swiglu_fusion=0"),
        (None, {"activation_type": "swiglu", "swiglu_fusion": 1}, "fc1_experts_weights must have shape"),
    ],
)
def test_ms_moe_rejects_bad_inputs(change: str | None, attrs: dict[str, Any], message: str) -> None:
    w = random_weights(np.random.default_rng(9), tokens=4, hidden=8, inter=12, experts=4, fc1_rows=12)
    if change == "legacy_layout":
        w["fc1_w"] = np.ascontiguousarray(w["fc1_w"].transpose(0, 2, 1))
        w["fc2_w"] = np.ascontiguousarray(w["fc2_w"].transpose(0, 2, 1))
    elif change == "router_3d":
        w["router"] = w["router"].reshape(1, 4, 4)
    elif change == "fc3":
        w["fc3_w"] = np.zeros((4, 12, 8), np.float32)
    with pytest.raises(ValueError, match=message):
        ms_moe(*as_inputs(w), **attrs)


def test_evaluator_rejects_post_activation_clipping() -> None:
    model = build_ms_moe_model(activation="swiglu", swiglu_fusion=1)
    node = next(n for n in model.graph.node if n.op_type == "MoE")
    node.attribute.append(helper.make_attribute("swiglu_limit_after_activation", 1))
    with pytest.raises(NotImplementedError, match="swiglu_limit_after_activation"):
        run_reference(model, {"x": np.ones((2, 16), np.float32)})
