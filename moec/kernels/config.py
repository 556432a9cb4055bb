"""Typed configurations of moec's kernels and the signature each kernel has.

A config says *what* a kernel computes (sizes, routing rule, activation, weight format); a
schedule (:mod:`moec.schedule`) says *how* it is tiled for a target. The frontend and the layer
passes only ever handle configs: the kernel code is built once from config and schedule in the
schedule phase (:class:`moec.passes.apply_kernel_schedule.ApplyKernelSchedule`).

Every config knows its kernel's signature (:meth:`KernelConfig.signature`): the buffers it
takes and writes, their shapes over the caller's token count and their dtypes. One table
serves the kernel placeholders the frontend emits, the output types of each ``call_tir`` and
the built kernels, whose signature a test checks against it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

from tvm.ir import Expr as PrimExpr

from moec.kernels.formats import DOT_DEPTH, ExpertFormats, WeightFormat, uniform
from moec.kernels.int8_dot import INSTRUCTION_SETS


@dataclasses.dataclass(frozen=True)
class BufferSpec:
    """One parameter of a kernel: name, shape (over the token count), dtype, written or read."""

    name: str
    shape: tuple[PrimExpr | int, ...]
    dtype: str
    output: bool = False


TokenDims = tuple[PrimExpr, ...]
"""The caller's token dimensions: ``(n,)`` for a flat batch, ``(r, s)`` for ``r`` sequences."""


def _tokens(rows: TokenDims) -> PrimExpr:
    total = rows[0]
    for dim in rows[1:]:
        total = total * dim
    return total


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """What every kernel config has: its kind, its JSON form and its signature."""

    kind: ClassVar[str]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def signature(self, rows: TokenDims) -> tuple[BufferSpec, ...]:
        """The kernel's parameters, inputs then outputs, for a call over ``rows`` tokens."""
        raise NotImplementedError

    def outputs(self, rows: TokenDims) -> list[BufferSpec]:
        return [b for b in self.signature(rows) if b.output]

    @property
    def row_dims(self) -> int:
        """How many token dimensions the kernel's signature is written over."""
        return 1


@dataclasses.dataclass(frozen=True)
class MoEKernelConfig(KernelConfig):
    """What the kernels of an MoE layer have: the layer's expert count and top-k."""

    num_experts: int
    top_k: int


@dataclasses.dataclass(frozen=True)
class RouteConfig(MoEKernelConfig):
    """Router top-k over ``num_experts`` logits (see :func:`moec.kernels.route.route_token_macro`)."""

    kind: ClassVar[str] = "route"

    scoring: str
    normalize: bool
    tie_break: str = "low"
    kept: tuple[int, ...] | None = None
    skip_top1_above: float | None = None
    skip_below_fraction: float | None = None
    pattern: str | None = None
    selection_bias: tuple[float, ...] | None = None
    groups: int = 1
    top_groups: int = 1
    scale: float = 1.0
    jitter_eps: float = 0.0

    def signature(self, rows: TokenDims) -> tuple[BufferSpec, ...]:
        n, E, K = _tokens(rows), self.num_experts, self.top_k
        return (
            BufferSpec("logits", (n, E), "float32"),
            BufferSpec("index", (n, K), "int32", output=True),
            BufferSpec("weight", (n, K), "float32", output=True),
        )


@dataclasses.dataclass(frozen=True)
class CapacityConfig(MoEKernelConfig):
    """Expert capacity per sequence (Switch Transformers): see :mod:`moec.kernels.capacity`."""

    kind: ClassVar[str] = "capacity"

    capacity: int

    @property
    def row_dims(self) -> int:
        return 2

    def signature(self, rows: TokenDims) -> tuple[BufferSpec, ...]:
        shape = (*rows, self.top_k)
        return (
            BufferSpec("index", shape, "int32"),
            BufferSpec("weight", shape, "float32"),
            BufferSpec("index_out", shape, "int32", output=True),
            BufferSpec("weight_out", shape, "float32", output=True),
        )


@dataclasses.dataclass(frozen=True)
class GroupConfig(MoEKernelConfig):
    """Stable sort of the (token, slot) pairs by expert: see :mod:`moec.kernels.group`."""

    kind: ClassVar[str] = "group"

    def signature(self, rows: TokenDims) -> tuple[BufferSpec, ...]:
        n, E, K = _tokens(rows), self.num_experts, self.top_k
        return (
            BufferSpec("index", (n, K), "int32"),
            BufferSpec("weight", (n, K), "float32"),
            BufferSpec("offset", (E + 1,), "int32", output=True),
            BufferSpec("token", (n * K,), "int32", output=True),
            BufferSpec("gain", (n * K,), "float32", output=True),
        )


@dataclasses.dataclass(frozen=True)
class ExpertConfig(MoEKernelConfig):
    """What both expert kernels have: the layer's sizes and the stored format of each expert."""

    hidden: int
    ffn: int
    formats: tuple[str, ...] | None = dataclasses.field(default=None, kw_only=True)
    """Per expert its storage format (:mod:`moec.kernels.formats`); None: every expert fp32."""
    int8_group: int = dataclasses.field(default=0, kw_only=True)
    """INT8 scale group along the input (0: one scale per output channel)."""
    fp16_arithmetic: bool = dataclasses.field(default=False, kw_only=True)
    """fp16 experts multiply in FP16 (CPU targets with FP16 arithmetic; panel kernels)."""
    int8_dot: str | None = dataclasses.field(default=None, kw_only=True)
    """The target's INT8 dot-product instructions (:data:`moec.kernels.int8_dot.INSTRUCTION_SETS`)
    with which int8-dot experts multiply; None when no expert is int8-dot."""
    panel: int | None = dataclasses.field(default=None, kw_only=True)
    """None: matrices ``[E, out, in]``, one output row's dot at a time; an int: matrices packed in
    panels of ``panel`` output rows (see :meth:`matrix_shape`) for the output-stationary kernels
    of :mod:`moec.kernels.expert_panels`."""

    def __post_init__(self) -> None:
        if self.formats is not None and len(self.formats) != self.num_experts:
            raise ValueError(f"formats names {len(self.formats)} experts, the layer has {self.num_experts}")
        ExpertFormats(uniform(self.formats, self.num_experts), self.int8_group)  # validates
        if self.has_dot:
            if self.int8_dot not in INSTRUCTION_SETS:
                raise ValueError(
                    "int8-dot experts need the target's INT8 dot-product instructions (int8_dot: "
                    f"one of {', '.join(INSTRUCTION_SETS)}), got {self.int8_dot!r}"
                )
            if self.hidden % DOT_DEPTH or self.ffn % DOT_DEPTH:
                raise ValueError(
                    f"int8-dot experts need hidden and ffn sizes that are multiples of {DOT_DEPTH}, "
                    f"got {self.hidden} and {self.ffn}"
                )

    @property
    def expert_formats(self) -> ExpertFormats:
        return ExpertFormats(uniform(self.formats, self.num_experts), self.int8_group, self.fp16_arithmetic)

    @property
    def has_dot(self) -> bool:
        """Whether some expert is int8-dot (the kernels then quantize their input rows)."""
        return self.formats is not None and "int8-dot" in self.formats

    def matrix_shape(
        self, rows: int, columns: int, experts: int | None = None, fmt: WeightFormat | None = None
    ) -> tuple[int, ...]:
        """``experts`` (default: all) expert matrices of ``rows`` outputs by ``columns`` inputs:
        ``[experts, rows, columns]``, or packed ``[experts, ceil(rows / panel), columns, panel]``
        (``packed[e, p, c, v] = W[e, p * panel + v, c]``, zeros past the last row). int8-dot
        panels (``fmt``) hold ``DOT_DEPTH`` consecutive inputs of each row together,
        ``[experts, ceil(rows / panel), columns / 4, panel * 4]`` (``packed[e, p, k, 4 v + d] =
        W[e, p * panel + v, 4 k + d]``), so one dot instruction reads 4 inputs of several rows."""
        experts = self.num_experts if experts is None else experts
        if self.panel is None:
            return (experts, rows, columns)
        if fmt is not None and fmt.dot:
            return (experts, -(-rows // self.panel), columns // DOT_DEPTH, self.panel * DOT_DEPTH)
        return (experts, -(-rows // self.panel), columns, self.panel)

    def matrix_buffers(self, role: str, rows: int, columns: int) -> list[BufferSpec]:
        """The buffers holding ``role``'s ``rows × columns`` matrices: one per format the experts
        use (and int8's scales), see :meth:`moec.kernels.formats.ExpertFormats.buffers`."""
        return [
            BufferSpec(name, shape, dtype)
            for name, shape, dtype in self.expert_formats.buffers(
                role,
                rows,
                columns,
                lambda count, fmt: self.matrix_shape(rows, columns, count, fmt),
                self.scale_rows(rows),
            )
        ]

    def scale_rows(self, rows: int) -> int:
        """Rows of an int8 scale buffer: ``rows``, padded to whole panels for the panel kernels
        (which read a panel's scales as one vector)."""
        return rows if self.panel is None else -(-rows // self.panel) * self.panel


@dataclasses.dataclass(frozen=True)
class ExpertUpConfig(ExpertConfig):
    """First expert layer ``act(gate(x), up(x))`` per expert group: see :mod:`moec.kernels.expert_ffn`."""

    kind: ClassVar[str] = "expert_up"

    activation: str
    gated: bool
    alpha: float = 1.0
    beta: float = 0.0
    limit: float = math.inf

    def signature(self, rows: TokenDims) -> tuple[BufferSpec, ...]:
        n, E, H, F, K = _tokens(rows), self.num_experts, self.hidden, self.ffn, self.top_k
        gate = (*self.matrix_buffers("w_gate", F, H), BufferSpec("b_gate", (E, F), "float32"))
        return (
            BufferSpec("x", (n, H), "float32"),
            *self.matrix_buffers("w_up", F, H),
            BufferSpec("b_up", (E, F), "float32"),
            *(gate if self.gated else ()),
            BufferSpec("offset", (E + 1,), "int32"),
            BufferSpec("token", (n * K,), "int32"),
            BufferSpec("inter", (n * K, F), "float32", output=True),
        )


@dataclasses.dataclass(frozen=True)
class ExpertDownConfig(ExpertConfig):
    """Second expert layer, weighted and summed into the output: see :mod:`moec.kernels.expert_ffn`."""

    kind: ClassVar[str] = "expert_down"

    def signature(self, rows: TokenDims) -> tuple[BufferSpec, ...]:
        n, E, H, F, K = _tokens(rows), self.num_experts, self.hidden, self.ffn, self.top_k
        return (
            BufferSpec("inter", (n * K, F), "float32"),
            *self.matrix_buffers("w_down", H, F),
            BufferSpec("b_down", (E, H), "float32"),
            BufferSpec("offset", (E + 1,), "int32"),
            BufferSpec("token", (n * K,), "int32"),
            BufferSpec("gain", (n * K,), "float32"),
            BufferSpec("y", (n, H), "float32", output=True),
        )


@dataclasses.dataclass(frozen=True)
class LinearConfig(KernelConfig):
    """A dense linear layer ``y = x @ W`` over weight panels: see :mod:`moec.kernels.linear`.

    The weight ``W`` (``[in_features, out_features]``) is stored packed in ``panel``-column
    panels, ``[panels, in_features, panel]`` (``packed[p, k, v] = W[k, p * panel + v]``, zeros
    past ``out_features``), so one parallel task streams one contiguous panel; in
    ``weight_format`` (:mod:`moec.kernels.formats`: int8 with one scale per output column,
    ``[1, panels * panel]``, or per ``int8_group`` inputs of it, ``[1, in / group, panels *
    panel]``; zeros past ``out_features``).
    """

    kind: ClassVar[str] = "linear"

    in_features: int
    out_features: int
    panel: int
    weight_format: str = "fp32"
    int8_group: int = 0
    """int8: one scale per output column (0) or per ``int8_group`` inputs of it."""

    def __post_init__(self) -> None:
        ExpertFormats((self.weight_format,), self.int8_group)  # validates

    @property
    def panels(self) -> int:
        return -(-self.out_features // self.panel)

    def signature(self, rows: TokenDims) -> tuple[BufferSpec, ...]:
        n, K, N = _tokens(rows), self.in_features, self.out_features
        weight = ExpertFormats((self.weight_format,), self.int8_group).buffers(
            "w", N, K, lambda _count, _fmt: (self.panels, K, self.panel), self.panels * self.panel
        )
        return (
            BufferSpec("x", (n, K), "float32"),
            *(BufferSpec(name, shape, dtype) for name, shape, dtype in weight),
            BufferSpec("y", (n, N), "float32", output=True),
        )


CONFIG_TYPES: dict[str, type[KernelConfig]] = {
    cls.kind: cls
    for cls in (RouteConfig, CapacityConfig, GroupConfig, ExpertUpConfig, ExpertDownConfig, LinearConfig)
}


def _hashable(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with lists made tuples, so configs stay hashable (JSON gives lists)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def config_from_dict(kind: str, fields: dict[str, Any]) -> KernelConfig:
    """The ``kind`` config with these fields."""
    return CONFIG_TYPES[kind](**_hashable(fields))


def config_from_json(kind: str, text: str) -> KernelConfig:
    """The ``kind`` config written by :meth:`KernelConfig.to_json`."""
    return config_from_dict(kind, json.loads(text))


def replace(config: KernelConfig, **changes: Any) -> KernelConfig:
    """``config`` with ``changes``."""
    return dataclasses.replace(config, **_hashable(changes))
