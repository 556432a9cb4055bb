"""Small Mixture-of-Experts ONNX models written with *standard* ONNX ops.

Why this module exists: ``moec`` must recognise MoE layers in ONNX graphs
produced by ordinary exporters (``torch.onnx.export`` of HF-style MoE code),
which never contain a dedicated "MoE" op.  These builders emit the three
shapes such exports take in practice, with deterministic random weights, so
tests, examples and benchmarks have small, reproducible inputs, and so the
pattern matcher has a fixed node structure to be written against.

Shared semantics of every MoE block (``T`` tokens, hidden ``H``, ``E``
experts, intermediate ``F``)::

    logits      = x @ Wr (+ br)                  Wr: [H, E]
    probs       = Softmax(logits, axis=-1)
    w, idx      = TopK(probs, k, axis=-1, largest=1, sorted=1)
    if normalize: w = w / ReduceSum(w, axes=[-1], keepdims=1)
    y[t]        = sum_j w[t, j] * FFN_{idx[t, j]}(x[t])

    FFN (relu/gelu/silu) = down(act(up(x)))
    FFN (swiglu)         = down(silu(gate(x)) * up(x))

``gelu`` is the exact, Erf-based GELU written the way PyTorch exports it
(``Div(x, sqrt 2) -> Erf -> Add 1 -> Mul x -> Mul 0.5``) and ``silu`` is
``Mul(x, Sigmoid(x))``.  Linear layers are ``MatMul`` with weights stored
``[in, out]``, each optionally followed by ``Add`` of a bias.

Every builder accepts ``weights_out``: when a dict is passed it is filled,
per MoE block (keyed by block prefix, ``"moe0"``, ``"moe1"``), with the
canonical numpy weights (see :func:`_moe_weights`) so tests can compute the
expected output independently of any ONNX runtime.

All constants (TopK's ``k``, reduce/unsqueeze axes, expert indices, ...)
are graph initializers, named ``{prefix}/...``; the input is ``x`` with
shape ``["tokens", H]`` (symbolic first dim) and the output is ``y``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
"""ONNX default-domain opset of every model built here."""

IR_VERSION = 8
"""IR version written into the models (the lowest that allows opset 17)."""

ACTIVATIONS = ("relu", "gelu", "silu", "swiglu")
"""Supported expert FFN kinds."""

WeightsOut = dict[str, dict[str, Any]]
"""``weights_out`` type: block prefix -> canonical weights of that block."""


class GraphBuilder:
    """Accumulates nodes and initializers of one ONNX graph.

    Block emitters append to a shared builder so that MoE blocks compose
    (:func:`build_two_layer_model` chains two of them).  Tensor and node
    names are derived from a caller-given prefix so blocks never collide.
    """

    def __init__(self) -> None:
        """Start an empty graph."""
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        """Add initializer ``name`` holding ``value`` and return its name."""
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def shared(self, name: str, value: np.ndarray) -> str:
        """Return initializer ``name``, adding it with ``value`` on first use."""
        return name if name in self._names else self.const(name, value)

    def node(
        self,
        op: str,
        inputs: list[str],
        prefix: str,
        n_out: int = 1,
        **attrs: Any,
    ) -> list[str]:
        """Append an ``op`` node; return its freshly named output tensors."""
        self._count += 1
        base = f"{prefix}/{op}_{self._count}"
        outputs = [f"{base}_out{i}" for i in range(n_out)]
        self._names.update(outputs)
        self.nodes.append(helper.make_node(op, inputs, outputs, name=base, **attrs))
        return outputs

    def one(self, op: str, inputs: list[str], prefix: str, **attrs: Any) -> str:
        """Append a single-output ``op`` node and return its output name."""
        return self.node(op, inputs, prefix, 1, **attrs)[0]

    def model(self, x: str, y: str, hidden: int, graph_name: str) -> onnx.ModelProto:
        """Wrap the graph into a checked model.

        The last node must produce ``y``; that tensor is renamed "y".
        """
        last = self.nodes[-1]
        if list(last.output) != [y]:
            raise ValueError(f"graph output {y!r} must be the sole output of the last node")
        last.output[0] = "y"
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["tokens", hidden])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", hidden])],
            self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="tests.zoo.standard",
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


# --------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------


def _moe_weights(
    rng: np.random.Generator,
    *,
    hidden: int,
    inter: int,
    experts: int,
    k: int,
    activation: str,
    normalize: bool,
    expert_bias: bool,
    router_bias: bool,
) -> dict[str, Any]:
    """Draw the canonical weights of one MoE block.

    Keys: ``router_w`` [H,E], ``router_b`` [E] | None, ``up`` [E,H,F],
    ``gate`` [E,H,F] | None (swiglu only), ``down`` [E,F,H], ``up_b`` /
    ``gate_b`` [E,F] | None, ``down_b`` [E,H] | None, plus ``k``,
    ``normalize`` and ``activation``.  Standard deviations are 1/sqrt(fan_in)
    so that activations stay O(1) for an O(1) input.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not 1 <= k <= experts:
        raise ValueError(f"need 1 <= k <= experts, got k={k}, experts={experts}")

    def draw(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    h, f, e = hidden, inter, experts
    swiglu = activation == "swiglu"
    return {
        "router_w": draw((h, e), 1.0 / np.sqrt(h)),
        "router_b": draw((e,), 0.5) if router_bias else None,
        "up": draw((e, h, f), 1.0 / np.sqrt(h)),
        "gate": draw((e, h, f), 1.0 / np.sqrt(h)) if swiglu else None,
        "down": draw((e, f, h), 1.0 / np.sqrt(f)),
        "up_b": draw((e, f), 0.1) if expert_bias else None,
        "gate_b": draw((e, f), 0.1) if expert_bias and swiglu else None,
        "down_b": draw((e, h), 0.1) if expert_bias else None,
        "k": k,
        "normalize": normalize,
        "activation": activation,
    }


# --------------------------------------------------------------------------
# shared sub-graphs
# --------------------------------------------------------------------------


def _router(g: GraphBuilder, x: str, p: str, w: dict[str, Any]) -> tuple[str, str, str]:
    """Emit the router; return (probs [T,E], topk_w [T,k], topk_idx [T,k]).

    Nodes: MatMul [-> Add] -> Softmax -> TopK [-> ReduceSum -> Div].
    """
    logits = g.one("MatMul", [x, g.const(f"{p}/router_w", w["router_w"])], p)
    if w["router_b"] is not None:
        logits = g.one("Add", [logits, g.const(f"{p}/router_b", w["router_b"])], p)
    probs = g.one("Softmax", [logits], p, axis=-1)
    k_name = g.const(f"{p}/k", np.array([w["k"]], dtype=np.int64))
    topk_w, topk_idx = g.node("TopK", [probs, k_name], p, 2, axis=-1, largest=1, sorted=1)
    if w["normalize"]:
        denom = g.one("ReduceSum", [topk_w, _axes_last(g, p)], p, keepdims=1)
        topk_w = g.one("Div", [topk_w, denom], p)
    return probs, topk_w, topk_idx


def _axes_last(g: GraphBuilder, block: str) -> str:
    """Return the block's shared ``[-1]`` int64 axes initializer."""
    return g.shared(f"{block}/axes_last", np.array([-1], dtype=np.int64))


def _linear(g: GraphBuilder, x: str, p: str, weight: str, bias: str | None) -> str:
    """Emit ``MatMul(x, weight)`` followed by ``Add(bias)`` when ``bias`` is given."""
    out = g.one("MatMul", [x, weight], p)
    return g.one("Add", [out, bias], p) if bias is not None else out


def _act(g: GraphBuilder, h: str, p: str, block: str, activation: str) -> str:
    """Emit relu / exact gelu / silu of ``h``; scalar constants are ``{block}/...``."""
    if activation == "relu":
        return g.one("Relu", [h], p)
    if activation == "gelu":
        t = g.one(
            "Div",
            [h, g.shared(f"{block}/sqrt2", np.array(np.sqrt(2.0), np.float32))],
            p,
        )
        t = g.one("Erf", [t], p)
        t = g.one("Add", [t, g.shared(f"{block}/one", np.array(1.0, np.float32))], p)
        t = g.one("Mul", [h, t], p)
        return g.one("Mul", [t, g.shared(f"{block}/half", np.array(0.5, np.float32))], p)
    if activation in ("silu", "swiglu"):
        return g.one("Mul", [h, g.one("Sigmoid", [h], p)], p)
    raise ValueError(f"unknown activation {activation!r}")


def _ffn(
    g: GraphBuilder,
    x: str,
    p: str,
    block: str,
    activation: str,
    names: dict[str, str | None],
) -> str:
    """Emit one expert FFN on ``x`` using initializer ``names`` (up/gate/down[_b]).

    ``p`` names the nodes, ``block`` the block whose shared scalars are used.

    relu/gelu/silu: MatMul[+Add] -> act -> MatMul[+Add];
    swiglu: MatMul[+Add](gate) -> Sigmoid -> Mul, MatMul[+Add](up), Mul,
    MatMul[+Add](down).
    """
    if activation == "swiglu":
        gate_w = names["gate"]
        assert gate_w is not None
        gate = _act(g, _linear(g, x, p, gate_w, names["gate_b"]), p, block, activation)
        up_w = names["up"]
        assert up_w is not None
        h = g.one("Mul", [gate, _linear(g, x, p, up_w, names["up_b"])], p)
    else:
        up_w = names["up"]
        assert up_w is not None
        h = _act(g, _linear(g, x, p, up_w, names["up_b"]), p, block, activation)
    down_w = names["down"]
    assert down_w is not None
    return _linear(g, h, p, down_w, names["down_b"])


def _expert_consts(g: GraphBuilder, p: str, w: dict[str, Any], e: int) -> dict[str, str | None]:
    """Add expert ``e``'s 2-D weights as ``{p}/expert{e}/...``; return the names."""
    names: dict[str, str | None] = {}
    for key in ("up", "gate", "down"):
        arr = w[key]
        names[key] = None if arr is None else g.const(f"{p}/expert{e}/{key}", arr[e])
        b = w[f"{key}_b"]
        names[f"{key}_b"] = None if b is None else g.const(f"{p}/expert{e}/{key}_b", b[e])
    return names


# --------------------------------------------------------------------------
# block emitters
# --------------------------------------------------------------------------


def emit_dense_onehot_block(g: GraphBuilder, x: str, prefix: str, w: dict[str, Any]) -> str:
    """Emit a dense MoE block combined through a OneHot routing matrix.

    Returns the name of the block's output tensor.

    Node order (after the router, see :func:`_router`)::

        OneHot(topk_idx, depth=E scalar int64, values=int64 [0,1]) -> [T,k,E]
        Cast(to=FLOAT)
        Unsqueeze(topk_w, axes=[-1]) -> [T,k,1]
        Mul -> [T,k,E]
        ReduceSum(axes=[1], keepdims=0) -> R [T,E]
        for e in 0..E-1:
            FFN_e(x)  (2-D per-expert weights {prefix}/expert{e}/up|gate|down[_b])
            Gather(R, e scalar int64, axis=1) -> [T]
            Unsqueeze(axes=[-1]) -> [T,1]
            Mul(FFN_e(x), column) -> [T,H]
            Add(previous_sum, term)  (for e >= 1)
    """
    p = prefix
    experts = w["router_w"].shape[1]
    _, topk_w, topk_idx = _router(g, x, p, w)
    depth = g.const(f"{p}/depth", np.array(experts, dtype=np.int64))
    values = g.const(f"{p}/onehot_values", np.array([0, 1], dtype=np.int64))
    onehot = g.one("OneHot", [topk_idx, depth, values], p, axis=-1)
    onehot = g.one("Cast", [onehot], p, to=TensorProto.FLOAT)
    w_unsq = g.one("Unsqueeze", [topk_w, _axes_last(g, p)], p)
    weighted = g.one("Mul", [onehot, w_unsq], p)
    axis1 = g.const(f"{p}/axes_1", np.array([1], dtype=np.int64))
    routing = g.one("ReduceSum", [weighted, axis1], p, keepdims=0)

    total: str | None = None
    for e in range(experts):
        pe = f"{p}/expert{e}"
        names = _expert_consts(g, p, w, e)
        out = _ffn(g, x, pe, p, w["activation"], names)
        idx = g.const(f"{pe}/index", np.array(e, dtype=np.int64))
        col = g.one("Gather", [routing, idx], pe, axis=1)
        col = g.one("Unsqueeze", [col, _axes_last(g, p)], pe)
        term = g.one("Mul", [out, col], pe)
        total = term if total is None else g.one("Add", [total, term], pe)
    assert total is not None
    return total


def emit_dense_batched_block(g: GraphBuilder, x: str, prefix: str, w: dict[str, Any]) -> str:
    """Emit a dense MoE block with stacked 3-D expert weights; return output name.

    Node order (after the router, see :func:`_router`)::

        Unsqueeze(x, axes=[0]) -> [1,T,H]
        FFN with batched MatMul on {prefix}/up|gate [E,H,F], {prefix}/down [E,F,H],
            biases {prefix}/up_b|gate_b [E,1,F], {prefix}/down_b [E,1,H] -> [E,T,H]
        Shape(probs) -> ConstantOfShape(value=0.0f) -> zeros [T,E]
        ScatterElements(zeros, topk_idx, topk_w, axis=1) -> R [T,E]
        Transpose(R, perm=[1,0]) -> [E,T]
        Unsqueeze(axes=[-1]) -> [E,T,1]
        Mul(expert_out, R') -> [E,T,H]
        ReduceSum(axes=[0], keepdims=0) -> [T,H]

    The expert FFN nodes come first, then the routing/combine nodes.
    """
    p = prefix
    probs, topk_w, topk_idx = _router(g, x, p, w)
    axis0 = g.const(f"{p}/axes_0", np.array([0], dtype=np.int64))
    x3 = g.one("Unsqueeze", [x, axis0], p)
    names: dict[str, str | None] = {}
    for key in ("up", "gate", "down"):
        arr = w[key]
        names[key] = None if arr is None else g.const(f"{p}/{key}", arr)
        b = w[f"{key}_b"]
        names[f"{key}_b"] = None if b is None else g.const(f"{p}/{key}_b", b[:, None, :])
    expert_out = _ffn(g, x3, p, p, w["activation"], names)

    shape = g.one("Shape", [probs], p)
    zeros = g.one(
        "ConstantOfShape",
        [shape],
        p,
        value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0]),
    )
    routing = g.one("ScatterElements", [zeros, topk_idx, topk_w], p, axis=1)
    routing_t = g.one("Transpose", [routing], p, perm=[1, 0])
    routing_t = g.one("Unsqueeze", [routing_t, _axes_last(g, p)], p)
    weighted = g.one("Mul", [expert_out, routing_t], p)
    return g.one("ReduceSum", [weighted, axis0], p, keepdims=0)


def emit_sparse_dispatch_block(g: GraphBuilder, x: str, prefix: str, w: dict[str, Any]) -> str:
    """Emit a sparse gather / scatter-add MoE block, as an eager expert loop exports.

    Returns the name of the block's output tensor.

    Node order (after the router, see :func:`_router`)::

        Shape(x) -> ConstantOfShape(value=0.0f) -> acc_0 [T,H]
        for e in 0..E-1:
            Equal(topk_idx, e scalar int64) -> mask [T,k] bool
            NonZero(mask) -> nz [2,N]
            Transpose(nz, perm=[1,0]) -> [N,2]
            Gather(nz, 0 scalar int64, axis=0) -> token_idx [N]
            Gather(x, token_idx, axis=0) -> x_e [N,H]
            GatherND(topk_w, nz^T) -> w_e [N]
            FFN_e(x_e) -> [N,H]
                (2-D per-expert weights {prefix}/expert{e}/up|gate|down[_b])
            Unsqueeze(w_e, axes=[-1]) -> [N,1]
            Mul -> [N,H]
            Unsqueeze(token_idx, axes=[-1]) -> [N,1]
            ScatterND(acc_e, token_idx', contrib, reduction="add") -> acc_{e+1} [T,H]

    ``acc_E`` is the block output.  Experts that receive no token produce
    ``N = 0`` and contribute nothing, which both runtimes handle.
    """
    p = prefix
    experts = w["router_w"].shape[1]
    _, topk_w, topk_idx = _router(g, x, p, w)
    zero_idx = g.const(f"{p}/index0", np.array(0, dtype=np.int64))
    shape = g.one("Shape", [x], p)
    acc = g.one(
        "ConstantOfShape",
        [shape],
        p,
        value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0]),
    )
    for e in range(experts):
        pe = f"{p}/expert{e}"
        idx = g.const(f"{pe}/index", np.array(e, dtype=np.int64))
        mask = g.one("Equal", [topk_idx, idx], pe)
        nz = g.one("NonZero", [mask], pe)
        nz_t = g.one("Transpose", [nz], pe, perm=[1, 0])
        token_idx = g.one("Gather", [nz, zero_idx], pe, axis=0)
        x_e = g.one("Gather", [x, token_idx], pe, axis=0)
        w_e = g.one("GatherND", [topk_w, nz_t], pe)
        names = _expert_consts(g, p, w, e)
        out = _ffn(g, x_e, pe, p, w["activation"], names)
        w_e = g.one("Unsqueeze", [w_e, _axes_last(g, p)], pe)
        contrib = g.one("Mul", [out, w_e], pe)
        scatter_idx = g.one("Unsqueeze", [token_idx, _axes_last(g, p)], pe)
        acc = g.one("ScatterND", [acc, scatter_idx, contrib], pe, reduction="add")
    return acc


BlockEmitter = Callable[[GraphBuilder, str, str, dict[str, Any]], str]
"""Block emitter: (builder, input name, prefix, weights) -> output name."""

STANDARD_BLOCKS: dict[str, BlockEmitter] = {
    "dense_onehot": emit_dense_onehot_block,
    "dense_batched": emit_dense_batched_block,
    "sparse_dispatch": emit_sparse_dispatch_block,
}
"""Pattern name -> block emitter (for composing MoE blocks into bigger graphs)."""


# --------------------------------------------------------------------------
# public builders
# --------------------------------------------------------------------------


def _single_block(
    pattern: str,
    *,
    hidden: int,
    inter: int,
    experts: int,
    k: int,
    activation: str,
    normalize: bool,
    expert_bias: bool,
    router_bias: bool,
    seed: int,
    weights_out: WeightsOut | None,
) -> onnx.ModelProto:
    """Build a model that is one MoE block ``moe0`` of the given pattern: y = MoE(x)."""
    rng = np.random.default_rng(seed)
    w = _moe_weights(
        rng,
        hidden=hidden,
        inter=inter,
        experts=experts,
        k=k,
        activation=activation,
        normalize=normalize,
        expert_bias=expert_bias,
        router_bias=router_bias,
    )
    if weights_out is not None:
        weights_out["moe0"] = w
    g = GraphBuilder()
    out = STANDARD_BLOCKS[pattern](g, "x", "moe0", w)
    return g.model("x", out, hidden, f"moe_{pattern}")


def build_dense_onehot_moe(
    *,
    hidden: int = 16,
    inter: int = 32,
    experts: int = 4,
    k: int = 2,
    activation: str = "silu",
    normalize: bool = True,
    expert_bias: bool = False,
    router_bias: bool = False,
    seed: int = 0,
    weights_out: WeightsOut | None = None,
) -> onnx.ModelProto:
    """Single MoE block, all experts dense, combined via a OneHot routing matrix.

    See :func:`emit_dense_onehot_block` for the node structure.
    """
    return _single_block(
        "dense_onehot",
        hidden=hidden,
        inter=inter,
        experts=experts,
        k=k,
        activation=activation,
        normalize=normalize,
        expert_bias=expert_bias,
        router_bias=router_bias,
        seed=seed,
        weights_out=weights_out,
    )


def build_dense_batched_moe(
    *,
    hidden: int = 16,
    inter: int = 32,
    experts: int = 4,
    k: int = 2,
    activation: str = "silu",
    normalize: bool = True,
    expert_bias: bool = False,
    router_bias: bool = False,
    seed: int = 0,
    weights_out: WeightsOut | None = None,
) -> onnx.ModelProto:
    """Single MoE block: experts as one batched MatMul, combined via ScatterElements.

    See :func:`emit_dense_batched_block` for the node structure.
    """
    return _single_block(
        "dense_batched",
        hidden=hidden,
        inter=inter,
        experts=experts,
        k=k,
        activation=activation,
        normalize=normalize,
        expert_bias=expert_bias,
        router_bias=router_bias,
        seed=seed,
        weights_out=weights_out,
    )


def build_sparse_dispatch_moe(
    *,
    hidden: int = 16,
    inter: int = 32,
    experts: int = 4,
    k: int = 2,
    activation: str = "silu",
    normalize: bool = True,
    expert_bias: bool = False,
    router_bias: bool = False,
    seed: int = 0,
    weights_out: WeightsOut | None = None,
) -> onnx.ModelProto:
    """Single MoE block as an eager per-expert NonZero/Gather/ScatterND loop.

    See :func:`emit_sparse_dispatch_block` for the node structure.
    """
    return _single_block(
        "sparse_dispatch",
        hidden=hidden,
        inter=inter,
        experts=experts,
        k=k,
        activation=activation,
        normalize=normalize,
        expert_bias=expert_bias,
        router_bias=router_bias,
        seed=seed,
        weights_out=weights_out,
    )


def build_two_layer_model(
    pattern: str = "dense_onehot",
    *,
    hidden: int = 16,
    inter: int = 32,
    experts: int = 4,
    k: int = 2,
    activation: str = "silu",
    normalize: bool = True,
    expert_bias: bool = False,
    router_bias: bool = False,
    seed: int = 0,
    weights_out: WeightsOut | None = None,
) -> onnx.ModelProto:
    """Two MoE blocks of one pattern around dense layers, to test composition::

        ln = LayerNormalization(x, "ln/scale", "ln/bias", axis=-1, epsilon=1e-5)
        h1 = Add(x, MoE_moe0(ln))
        h2 = Relu(MatMul(h1, "mlp/w" [H,H]))
        y  = Add(h2, MoE_moe1(h2))

    ``weights_out`` receives blocks ``"moe0"`` and ``"moe1"`` (different
    weights); the dense parameters are the initializers named above.
    """
    if pattern not in STANDARD_BLOCKS:
        raise ValueError(f"pattern must be one of {sorted(STANDARD_BLOCKS)}, got {pattern!r}")
    rng = np.random.default_rng(seed)
    kwargs: dict[str, Any] = {
        "hidden": hidden,
        "inter": inter,
        "experts": experts,
        "k": k,
        "activation": activation,
        "normalize": normalize,
        "expert_bias": expert_bias,
        "router_bias": router_bias,
    }
    w0 = _moe_weights(rng, **kwargs)
    w1 = _moe_weights(rng, **kwargs)
    if weights_out is not None:
        weights_out["moe0"] = w0
        weights_out["moe1"] = w1
    emit = STANDARD_BLOCKS[pattern]
    g = GraphBuilder()
    scale = g.const("ln/scale", (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    bias = g.const("ln/bias", (0.1 * rng.standard_normal(hidden)).astype(np.float32))
    ln = g.one("LayerNormalization", ["x", scale, bias], "ln", axis=-1, epsilon=1e-5)
    h1 = g.one("Add", ["x", emit(g, ln, "moe0", w0)], "res0")
    mlp_w = g.const(
        "mlp/w",
        (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32),
    )
    h2 = g.one("Relu", [g.one("MatMul", [h1, mlp_w], "mlp")], "mlp")
    y = g.one("Add", [h2, emit(g, h2, "moe1", w1)], "res1")
    return g.model("x", y, hidden, f"two_layer_{pattern}")


def build_dense_model(
    *,
    hidden: int = 16,
    inter: int = 32,
    seed: int = 0,
) -> onnx.ModelProto:
    """An ordinary MLP without any MoE, for the "no MoE found" path::

    y = MatMul(Relu(MatMul(LayerNormalization(x), "mlp/w1" [H,F])), "mlp/w2" [F,H])
    """
    rng = np.random.default_rng(seed)
    g = GraphBuilder()
    scale = g.const("ln/scale", (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    bias = g.const("ln/bias", (0.1 * rng.standard_normal(hidden)).astype(np.float32))
    ln = g.one("LayerNormalization", ["x", scale, bias], "ln", axis=-1, epsilon=1e-5)
    w1 = g.const(
        "mlp/w1",
        (rng.standard_normal((hidden, inter)) / np.sqrt(hidden)).astype(np.float32),
    )
    w2 = g.const(
        "mlp/w2",
        (rng.standard_normal((inter, hidden)) / np.sqrt(inter)).astype(np.float32),
    )
    h = g.one("Relu", [g.one("MatMul", [ln, w1], "mlp")], "mlp")
    y = g.one("MatMul", [h, w2], "mlp")
    return g.model("x", y, hidden, "dense_mlp")


STANDARD_PATTERNS: dict[str, Callable[..., onnx.ModelProto]] = {
    "dense_onehot": build_dense_onehot_moe,
    "dense_batched": build_dense_batched_moe,
    "sparse_dispatch": build_sparse_dispatch_moe,
}
"""Pattern name -> single-block model builder."""

__all__ = [
    "ACTIVATIONS",
    "OPSET",
    "STANDARD_BLOCKS",
    "STANDARD_PATTERNS",
    "BlockEmitter",
    "GraphBuilder",
    "WeightsOut",
    "build_dense_batched_moe",
    "build_dense_model",
    "build_dense_onehot_moe",
    "build_sparse_dispatch_moe",
    "build_two_layer_model",
    "emit_dense_batched_block",
    "emit_dense_onehot_block",
    "emit_sparse_dispatch_block",
]
