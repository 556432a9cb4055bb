"""The canonical MoE layer: the one description of an MoE block that every later stage reads.

Whatever exporter wrote the block (onnxruntime's ``com.microsoft::MoE`` node or a graph of
standard ops), the frontend reduces it to a :class:`MoELayer`: routing parameters plus expert
weights in one fixed layout. Weights are stored *output-channel major* (``[E, out, in]``) so
that every expert matmul is a row-by-vector dot product over contiguous memory, which is the
layout the sparse dispatch kernels stream.

Semantics, per token ``x`` (``[H]``) with router logits ``l`` (``[E]``)::

    s      = softmax(l) or sigmoid(l)       (scoring)
    c      = s + selection_bias             (DeepSeek-V3's correction bias: chooses, never weighs)
    c      = -inf outside the top_groups groups of experts with the largest top-2 sums of c
             (groups > 1: DeepSeek-V3's group-limited routing over ``groups`` equal groups)
    idx    = top_k(c)                       (ties: lowest or highest index first, tie_break)
    w      = scale * s[idx] / sum(s[idx])   (if normalize, else scale * s[idx])
    (capacity: an expert takes at most ``capacity`` selections of a sequence, counted in token
     order; later ones are dropped, adding nothing. Switch Transformers. A sequence is a row of
     the block input's second-last axis: all tokens of a 2-D input.)
    y      = sum_j w_j * FFN_{idx_j}(x)     (gain_on_input, top-1 only: y = FFN_idx(w * x), Llama 4)

``scoring="sparsemixer"`` is PhiMoE's inference router: step ``j`` picks the largest logit
``m`` among the experts not yet picked, and weighs it by a softmax over those same experts
whose ``(m - l_e) / max(|l_e|, m)`` is at most ``2 * jitter_eps``.
    FFN_e  = down_e(act(up_e(x)))                                   (ungated)
           = down_e(act(min(gate_e(x), limit)) * (clip(up_e(x), -limit, limit) + beta))  (gated)

``act`` is relu, gelu (erf), gelu_tanh, silu (``v * sigmoid(alpha * v)``) or identity. With the
defaults ``alpha=1, beta=0, limit=inf`` a gated silu expert is Mixtral's SwiGLU; GPT-OSS uses
``alpha=1.702, beta=1, limit=7``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "identity")
SCORINGS = ("softmax", "sigmoid", "sparsemixer")
WEIGHT_ROLES = ("w_up", "b_up", "w_gate", "b_gate", "w_down", "b_down")
"""Every expert tensor a layer can have, by role, in the expert kernels' argument order, which is
also the order of the canonical ``moec::MoELayer`` node's weight inputs."""
EXPERT_MATRICES = ("w_up", "w_gate", "w_down")
"""The roles that are ``[E, out, in]`` matrices (the others are ``[E, out]`` biases)."""
FFN_AXIS = {"w_up": 1, "b_up": 1, "w_gate": 1, "b_gate": 1, "w_down": 2}
"""Per role, the axis that runs over the intermediate (FFN) channels; ``b_down`` has none."""


@dataclasses.dataclass
class MoELayer:
    """One MoE block in canonical form.

    Weights (float32 numpy arrays, output-channel major):
      ``w_up`` ``[E, F, H]`` (the only first-layer matrix for ungated experts),
      ``w_gate`` ``[E, F, H]`` (present exactly when the experts are gated), ``w_down`` ``[E, H, F]``,
      optional biases ``b_up``/``b_gate`` ``[E, F]`` and ``b_down`` ``[E, H]``.

    ``int8_steps``: when the model itself stores the expert matrices as integers (onnxruntime's
    ``QMoE``, symmetric once its zero points are subtracted), per matrix role the step of each
    output channel ``[E, out]`` (``int8_block`` 0) or of each block of ``int8_block`` inputs
    ``[E, in / int8_block, out]``: every weight above is ``float32(q × step)`` with ``q`` an
    integer in ``[-128, 127]``, so the weights can be stored as INT8 exactly. None otherwise.
    """

    name: str
    num_experts: int
    top_k: int
    hidden: int
    ffn: int
    activation: str
    normalize: bool
    w_up: np.ndarray
    w_down: np.ndarray
    w_gate: np.ndarray | None = None
    b_up: np.ndarray | None = None
    b_gate: np.ndarray | None = None
    b_down: np.ndarray | None = None
    scoring: str = "softmax"
    tie_break: str = "low"
    alpha: float = 1.0
    beta: float = 0.0
    limit: float = math.inf
    selection_bias: np.ndarray | None = None
    groups: int = 1
    top_groups: int = 1
    scale: float = 1.0
    jitter_eps: float = 0.0
    gain_on_input: bool = False
    capacity: int | None = None
    source: str = ""
    caveats: tuple[str, ...] = ()
    int8_steps: dict[str, np.ndarray] | None = None
    int8_block: int = 0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.tie_break not in ("low", "high"):
            raise ValueError(f"unknown tie_break {self.tie_break!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown router scoring {self.scoring!r}")
        e, f, h = self.num_experts, self.ffn, self.hidden
        expected = {
            "w_up": (e, f, h),
            "w_gate": (e, f, h),
            "w_down": (e, h, f),
            "b_up": (e, f),
            "b_gate": (e, f),
            "b_down": (e, h),
        }
        for key, shape in expected.items():
            value = getattr(self, key)
            if value is not None:
                if tuple(value.shape) != shape:
                    raise ValueError(f"{self.name}: {key} has shape {value.shape}, expected {shape}")
                setattr(self, key, np.ascontiguousarray(value, dtype=np.float32))
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{self.name}: top-k {self.top_k} outside 1..{self.num_experts}")
        if self.selection_bias is not None:
            self.selection_bias = np.ascontiguousarray(self.selection_bias, dtype=np.float32)
            if self.selection_bias.shape != (e,):
                raise ValueError(
                    f"{self.name}: selection_bias has shape {self.selection_bias.shape}, expected {(e,)}"
                )
        if self.groups > 1 and (e % self.groups or e // self.groups < 2):
            raise ValueError(f"{self.name}: {e} experts do not split into {self.groups} groups of 2 or more")
        if not 1 <= self.top_groups <= self.groups or self.top_groups * (e // self.groups) < self.top_k:
            raise ValueError(
                f"{self.name}: top {self.top_groups} of {self.groups} groups hold fewer than k experts"
            )
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"{self.name}: expert capacity {self.capacity} is not positive")
        if self.gain_on_input and self.top_k != 1:
            raise ValueError(f"{self.name}: routing weights scale the expert input only for top-1 routing")
        if self.int8_steps is not None:
            self._check_int8_steps()

    def _check_int8_steps(self) -> None:
        """``int8_steps`` has one float32 step array per matrix, of the shape ``int8_block`` says."""
        matrices = [r for r in EXPERT_MATRICES if getattr(self, r) is not None]
        if sorted(self.int8_steps) != sorted(matrices):
            raise ValueError(
                f"{self.name}: int8_steps names {sorted(self.int8_steps)}, the layer has {matrices}"
            )
        for role in matrices:
            experts, rows, columns = getattr(self, role).shape
            block = self.int8_block
            if block and columns % block:
                raise ValueError(f"{self.name}: int8 block {block} does not divide {role}'s {columns} inputs")
            shape = (experts, columns // block, rows) if block else (experts, rows)
            steps = np.ascontiguousarray(self.int8_steps[role], dtype=np.float32)
            if steps.shape != shape:
                raise ValueError(
                    f"{self.name}: int8 steps of {role} have shape {steps.shape}, expected {shape}"
                )
            self.int8_steps[role] = steps

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    @property
    def clamped(self) -> bool:
        return self.alpha != 1.0 or self.beta != 0.0 or math.isfinite(self.limit)

    @property
    def ffn_kind(self) -> str:
        """A readable name: relu, gelu, ..., swiglu, geglu, swiglu-clamped."""
        if not self.gated:
            return self.activation
        name = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}.get(
            self.activation, f"{self.activation}-glu"
        )
        return f"{name}-clamped" if self.clamped else name

    def router(self) -> dict[str, Any]:
        """The routing rule as JSON: scoring and renormalisation, plus what departs from the defaults."""
        rule: dict[str, Any] = {"scoring": self.scoring, "normalize": self.normalize}
        if self.selection_bias is not None:
            rule["selection_bias"] = [float(v) for v in self.selection_bias]
        if self.groups > 1:
            rule |= {"groups": self.groups, "top_groups": self.top_groups}
        if self.scale != 1.0:
            rule["scale"] = self.scale
        if self.scoring == "sparsemixer":
            rule["jitter_eps"] = self.jitter_eps
        if self.gain_on_input:
            rule["gain_on_input"] = True
        if self.capacity is not None:
            rule["capacity"] = self.capacity
        return rule

    @property
    def weight_roles(self) -> tuple[str, ...]:
        """The roles a layer's weight inputs take, in :data:`WEIGHT_ROLES` order: the gate's only
        when the experts are gated, the biases always (an absent one is passed as zeros)."""
        return tuple(r for r in WEIGHT_ROLES if self.gated or r not in ("w_gate", "b_gate"))

    def weights(self) -> dict[str, np.ndarray]:
        """The expert tensors present in this layer, by canonical role name."""
        return {r: getattr(self, r) for r in WEIGHT_ROLES if getattr(self, r) is not None}

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (all matrices and biases)."""
        return sum(w.nbytes for w in self.weights().values()) // self.num_experts

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary, used by ``moec inspect`` and the manifest."""
        return (
            {
                "name": self.name,
                "source": self.source,
                "experts": self.num_experts,
                "top_k": self.top_k,
                "hidden": self.hidden,
                "ffn": self.ffn,
                "activation": self.ffn_kind,
                "router": self.router(),
                "shared_expert": False,
                "expert_bias": self.b_up is not None or self.b_down is not None,
                "parameter_bytes": sum(w.nbytes for w in self.weights().values()),
                "bytes_per_token_dense": self.expert_bytes() * self.num_experts,
                "bytes_per_token_sparse": self.expert_bytes() * self.top_k,
            }
            | ({"caveats": list(self.caveats)} if self.caveats else {})
            | ({"stored_int8": {"block": self.int8_block}} if self.int8_steps is not None else {})
        )
