"""Small ONNX models built around onnxruntime's ``com.microsoft::MoE`` contrib op.

These are test fixtures for moec: deterministic (seeded numpy weights stored as
initializers), tiny, and shaped like a real MoE block — a router MatMul feeding
``router_probs`` of one MoE node. Every model has graph input ``x`` of shape
``["tokens", hidden]`` (symbolic token count), output ``y`` of the same shape,
and imports opset 17 plus com.microsoft 1 at an IR version onnxruntime 1.32
accepts.

Weight layouts follow onnxruntime 1.32 (see :mod:`moec.reference.ms_moe`):
fc1 ``[E, F*inter, hidden]`` (F = 2 for fused swiglu/geglu), fc2
``[E, hidden, inter]``, fc3 ``[E, inter, hidden]``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["IR_VERSION", "OPSET", "build_ms_moe_model", "build_two_layer_ms_moe_model"]

#: IR version of the built models (onnxruntime 1.32 loads it; opset 17 needs >= 8).
IR_VERSION = 10
#: Default-domain opset of the built models.
OPSET = 17
_MS_DOMAIN = "com.microsoft"
_GATED = ("swiglu", "geglu")


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    """Make a float32 initializer."""
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def _moe_layer(
    prefix: str,
    src: str,
    dst: str,
    rng: np.random.Generator,
    *,
    hidden: int,
    inter: int,
    experts: int,
    k: int,
    activation: str,
    swiglu_fusion: int,
    normalize: int,
    expert_bias: bool,
    router_bias: bool,
    alpha: float | None,
    beta: float | None,
    limit: float | None,
    fc3: bool,
    use_sparse_mixer: int,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers for ``dst = MoE(src, router(src))``; names are prefixed."""
    gated = activation in _GATED
    # Separate fc3 for swiglu when not fused; for other activations only on request (Mixtral-style).
    has_fc3 = (activation == "swiglu" and swiglu_fusion == 0) or (fc3 and not gated)
    fc1_rows = 2 * inter if gated and not has_fc3 else inter

    inits = [_init(f"{prefix}router_w", rng.normal(0.0, 0.3, (hidden, experts)))]
    nodes = [
        helper.make_node("MatMul", [src, f"{prefix}router_w"], [f"{prefix}router_mm"], name=f"{prefix}router")
    ]
    router_out = f"{prefix}router_mm"
    if router_bias:
        inits.append(_init(f"{prefix}router_b", rng.normal(0.0, 0.3, (experts,))))
        nodes.append(
            helper.make_node(
                "Add",
                [router_out, f"{prefix}router_b"],
                [f"{prefix}router_logits"],
                name=f"{prefix}router_add",
            )
        )
        router_out = f"{prefix}router_logits"

    def weight(name: str, shape: tuple[int, ...], std: float) -> str:
        inits.append(_init(f"{prefix}{name}", rng.normal(0.0, std, shape)))
        return f"{prefix}{name}"

    # std 0.25 / 0.2 keeps fc1 pre-activations and the block output O(1) at the default sizes.
    moe_inputs = [
        src,
        router_out,
        weight("fc1_w", (experts, fc1_rows, hidden), 0.25),
        weight("fc1_b", (experts, fc1_rows), 0.1) if expert_bias else "",
        weight("fc2_w", (experts, hidden, inter), 0.2),
        weight("fc2_b", (experts, hidden), 0.1) if expert_bias else "",
    ]
    if has_fc3:
        moe_inputs.append(weight("fc3_w", (experts, inter, hidden), 0.25))
        if expert_bias:
            moe_inputs.append(weight("fc3_b", (experts, inter), 0.1))
    while moe_inputs[-1] == "":
        moe_inputs.pop()

    attrs: dict[str, object] = {"activation_type": activation, "k": k, "normalize_routing_weights": normalize}
    if gated:
        attrs["swiglu_fusion"] = swiglu_fusion
    if alpha is not None:
        attrs["activation_alpha"] = float(alpha)
    if beta is not None:
        attrs["activation_beta"] = float(beta)
    if limit is not None:
        attrs["swiglu_limit"] = float(limit)
    if use_sparse_mixer:
        attrs["use_sparse_mixer"] = use_sparse_mixer
    nodes.append(helper.make_node("MoE", moe_inputs, [dst], name=f"{prefix}moe", domain=_MS_DOMAIN, **attrs))
    return nodes, inits


def make_model(
    name: str, hidden: int, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]
) -> onnx.ModelProto:
    """Wrap nodes into a checked model with input ``x`` and output ``y``, both ``[tokens, hidden]``."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", hidden])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(_MS_DOMAIN, 1)],
        ir_version=IR_VERSION,
        producer_name="tests.zoo",
    )
    onnx.checker.check_model(model)
    return model


def build_ms_moe_model(
    *,
    hidden: int = 16,
    inter: int = 32,
    experts: int = 4,
    k: int = 2,
    activation: str = "relu",
    swiglu_fusion: int = 0,
    normalize: int = 1,
    expert_bias: bool = True,
    router_bias: bool = False,
    alpha: float | None = None,
    beta: float | None = None,
    limit: float | None = None,
    seed: int = 0,
    fc3: bool = False,
    use_sparse_mixer: int = 0,
) -> onnx.ModelProto:
    """One MoE block: ``y = MoE(x, router_probs = x @ Wr [+ br])``.

    ``activation`` is the op's ``activation_type``. For ``swiglu``,
    ``swiglu_fusion`` 1/2 give a fused fc1 of width ``2*inter`` and 0 gives
    separate fc1 (gate) and fc3 (up) weights; for ``geglu`` use 1 or 2. ``fc3``
    adds a Mixtral-style up projection to a non-gated activation. ``alpha`` /
    ``beta`` / ``limit`` set activation_alpha / activation_beta / swiglu_limit
    (omitted when None, so the op's defaults apply). ``expert_bias`` adds
    fc1/fc2(/fc3) biases, ``router_bias`` an Add after the router MatMul.
    """
    nodes, inits = _moe_layer(
        "moe0_",
        "x",
        "y",
        np.random.default_rng(seed),
        hidden=hidden,
        inter=inter,
        experts=experts,
        k=k,
        activation=activation,
        swiglu_fusion=swiglu_fusion,
        normalize=normalize,
        expert_bias=expert_bias,
        router_bias=router_bias,
        alpha=alpha,
        beta=beta,
        limit=limit,
        fc3=fc3,
        use_sparse_mixer=use_sparse_mixer,
    )
    return make_model("ms_moe", hidden, nodes, inits)


def build_two_layer_ms_moe_model(
    *,
    hidden: int = 16,
    inter: int = 32,
    experts: int = 4,
    k: int = 2,
    activation: str = "relu",
    swiglu_fusion: int = 0,
    normalize: int = 1,
    expert_bias: bool = True,
    router_bias: bool = False,
    alpha: float | None = None,
    beta: float | None = None,
    limit: float | None = None,
    seed: int = 0,
    fc3: bool = False,
    use_sparse_mixer: int = 0,
) -> onnx.ModelProto:
    """Two MoE blocks with residuals, to exercise MoE nodes embedded in a larger graph::

        n  = LayerNormalization(x)                  (axis -1, eps 1e-5, learned scale/bias)
        r1 = x + MoE_1(n)
        h  = Relu(r1 @ Wm)                          (Wm: [hidden, hidden])
        y  = r1 + MoE_2(h)

    Both MoE layers take the same options as :func:`build_ms_moe_model` but have
    independent weights (one seeded generator feeds both, in order).
    """
    rng = np.random.default_rng(seed)
    opts = {
        "hidden": hidden,
        "inter": inter,
        "experts": experts,
        "k": k,
        "activation": activation,
        "swiglu_fusion": swiglu_fusion,
        "normalize": normalize,
        "expert_bias": expert_bias,
        "router_bias": router_bias,
        "alpha": alpha,
        "beta": beta,
        "limit": limit,
        "fc3": fc3,
        "use_sparse_mixer": use_sparse_mixer,
    }
    inits = [
        _init("ln_scale", 1.0 + rng.normal(0.0, 0.1, (hidden,))),
        _init("ln_bias", rng.normal(0.0, 0.1, (hidden,))),
    ]
    nodes = [
        helper.make_node(
            "LayerNormalization", ["x", "ln_scale", "ln_bias"], ["ln_out"], name="ln", axis=-1, epsilon=1e-5
        )
    ]
    n1, i1 = _moe_layer("moe0_", "ln_out", "moe0_out", rng, **opts)  # type: ignore[arg-type]
    nodes += n1
    inits += i1
    nodes.append(helper.make_node("Add", ["x", "moe0_out"], ["res0"], name="res0_add"))
    inits.append(_init("mid_w", rng.normal(0.0, 1.0 / np.sqrt(hidden), (hidden, hidden))))
    nodes.append(helper.make_node("MatMul", ["res0", "mid_w"], ["mid_mm"], name="mid_matmul"))
    nodes.append(helper.make_node("Relu", ["mid_mm"], ["mid_act"], name="mid_relu"))
    n2, i2 = _moe_layer("moe1_", "mid_act", "moe1_out", rng, **opts)  # type: ignore[arg-type]
    nodes += n2
    inits += i2
    nodes.append(helper.make_node("Add", ["res0", "moe1_out"], ["y"], name="res1_add"))
    return make_model("ms_moe_two_layer", hidden, nodes, inits)
