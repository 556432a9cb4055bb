"""Storage formats of expert weights, per expert, and how the expert kernels read each.

An MoE layer's experts need not share one format: each expert is stored as

- ``fp32``: float32, read as is;
- ``fp16``: float16, widened to float32 as it is loaded (the arithmetic stays float32); or, on a
  target with FP16 arithmetic (``fp16_arithmetic``: Cortex-A76 ``+fullfp16``), multiplied in
  FP16: the panel kernels cast each activation to float16 and accumulate ``FP16_CHUNK`` inputs
  at a time in float16 vectors, then add each chunk's sums into float32 accumulators (twice the
  lanes per instruction; the error bound is in :data:`FP16_CHUNK`'s note);
- ``int8``: symmetric INT8 with float32 scales (W8A32), widened and multiplied in float32.
  Per output channel (``group == 0``): ``W[o, i] ≈ q[o, i] * s[o]``, and the kernels apply
  ``s[o]`` once to each finished dot (``acc * s[o]``). In groups of ``group`` inputs:
  ``W[o, i] ≈ q[o, i] * s[i // group, o]``, applied to each weight as it is loaded.
- ``int8-dot``: the same INT8 weights multiplied in INT8 (W8A8): each input row of the kernel
  is quantized per row at run time and the dot products run on the target's INT8 dot-product
  instruction with INT32 sums (:mod:`moec.kernels.int8_dot`); needs a target that computes int8.

A layer's kernels take, per expert matrix role (``w_up``, ``w_gate``, ``w_down``), one buffer per
format its experts use, holding those experts in expert order: ``w_up`` (fp32), ``w_up_fp16``,
``w_up_int8`` plus its scales ``w_up_int8_scale`` (:meth:`ExpertFormats.buffers`). Expert ``e``
is entry ``slot(e)`` of its format's buffer. The kernels dispatch on the expert's format at run
time (:meth:`ExpertFormats.dispatch`): a compare chain over compile-time constants, run once per
expert that has tokens, so every format's experts run in the same call and only the selected
experts' bytes are read. The same reader code serves the CPU panel kernels and the row kernels
(CUDA): only the index of a weight element differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

FORMATS = ("fp32", "fp16", "int8", "int8-dot")
"""Every storage format, in the order a layer's buffers list them."""
FORMAT_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8", "int8-dot": "int8"}
INT8_FORMATS = ("int8", "int8-dot")
"""The formats stored as symmetric INT8 with float32 scales (:func:`quantize_int8`)."""
INT8_GROUPS = (0, 32, 64, 128)
"""INT8 scale groups along the input a plan may ask for: 0 is one scale per output channel
(the kernels take any group that divides the input size)."""
FP16_CHUNK = 16
"""Inputs accumulated in float16 before a chunk's sums join the float32 accumulators (FP16
arithmetic). Each product and partial sum rounds to float16 (relative step 2^-11), so a chunk's
sum is within about ``FP16_CHUNK`` x 2^-11 of its magnitude, and the chunks add in float32: the
tests hold FP16-arithmetic outputs to 1e-2 of the largest output against the fp16-rounded
reference (measured ~1e-3)."""
DOT_DEPTH = 4
"""Inputs one INT8 dot-product instruction sums into each INT32 lane (``vpdpbusd``, ``sdot``,
``dp4a``): int8-dot matrices are read (and, in panels, packed) ``DOT_DEPTH`` inputs at a time."""
INT8_LIMIT = 127
"""Symmetric INT8: quantized values lie in ``[-127, 127]`` (-128 unused, so negation is exact)."""


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How one format's experts are stored and read (``group``: int8 scale group, 0 per channel)."""

    name: str
    group: int = 0
    fp16_arithmetic: bool = False
    """fp16 weights multiplied in FP16 (the panel kernels' chunked FP16 accumulation)."""

    @property
    def dtype(self) -> str:
        return FORMAT_DTYPES[self.name]

    @property
    def scaled(self) -> bool:
        return self.name in INT8_FORMATS

    @property
    def dot(self) -> bool:
        """Multiplied in INT8 (W8A8): the kernels' integer dot-product path, not :meth:`load`."""
        return self.name == "int8-dot"

    @property
    def suffix(self) -> str:
        """The format in buffer and parameter names: ``fp16``, ``int8``, ``int8_dot``."""
        return self.name.replace("-", "_")

    def matrix_name(self, role: str) -> str:
        """This format's buffer of ``role``'s matrices: ``w_up``, ``w_up_fp16``, ``w_up_int8``,
        ``w_up_int8_dot``."""
        return role if self.name == "fp32" else f"{role}_{self.suffix}"

    def scale_name(self, role: str) -> str:
        return f"{self.matrix_name(role)}_scale"

    def scale_shape(self, count: int, rows: int, columns: int) -> tuple[int, ...]:
        """Scales of ``count`` experts' ``rows × columns`` matrices: ``[count, rows]`` per channel,
        ``[count, columns / group, rows]`` per group (rows innermost, so a panel's scales are one
        vector)."""
        if self.group == 0:
            return (count, rows)
        return (count, columns // self.group, rows)

    def load(self, matrix, scale, index: tuple, row, column, slot=None) -> tirx.PrimExpr:
        """Weight element ``matrix[index]`` (output ``row``, input ``column``; ``slot``: its
        matrix's entry in the scales, default ``index[0]``) as float32, with its group's scale
        applied (a per-channel scale is applied by :meth:`finish`)."""
        value = matrix[index]
        if self.name == "fp32":
            return value
        widened = T.Cast("float32", value)
        if self.scaled and self.group:
            return widened * scale[index[0] if slot is None else slot, column // self.group, row]
        return widened

    def of(self, by_format: tuple) -> tuple:
        """This format's entry of a kernel's per-format tuple (one entry per :data:`FORMATS`)."""
        return by_format[FORMATS.index(self.name)]

    def finish(self, acc, scale, slot, row) -> tirx.PrimExpr:
        """A finished dot ``acc`` of output ``row``, with the per-channel scale applied."""
        if self.scaled and not self.group:
            return acc * scale[slot, row]
        return acc


@dataclasses.dataclass(frozen=True)
class ExpertFormats:
    """The formats of one layer's experts: ``formats[e]`` is expert ``e``'s, ``group`` the int8
    scale group, ``fp16_arithmetic`` whether fp16 experts multiply in FP16."""

    formats: tuple[str, ...]
    group: int = 0
    fp16_arithmetic: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown:
            raise ValueError(f"unknown expert weight format(s) {unknown}: use {', '.join(FORMATS)}")
        if self.group < 0:
            raise ValueError(f"int8 group must be 0 (per channel) or a group size, got {self.group}")

    @property
    def present(self) -> tuple[WeightFormat, ...]:
        """The formats some expert uses, in :data:`FORMATS` order."""
        return tuple(
            WeightFormat(f, self.group, f == "fp16" and self.fp16_arithmetic)
            for f in FORMATS
            if f in self.formats
        )

    def count(self, name: str) -> int:
        return self.formats.count(name)

    def slot(self, expert: int) -> int:
        """Expert ``expert``'s entry in its format's buffer."""
        return self.formats[:expert].count(self.formats[expert])

    def experts(self, name: str) -> list[int]:
        """The experts stored as ``name``, in order (entry ``i`` is slot ``i``)."""
        return [e for e, f in enumerate(self.formats) if f == name]

    def buffers(
        self,
        role: str,
        rows: int,
        columns: int,
        shape: Callable[[int, WeightFormat], tuple[int, ...]],
        scale_rows: int | None = None,
    ):
        """``(name, shape, dtype)`` of ``role``'s buffers: per present format its matrices
        (``shape(count, fmt)``) and, for int8, their scales (over ``scale_rows`` outputs, default
        ``rows``: the panel kernels pad them to whole panels)."""
        found = []
        for fmt in self.present:
            count = self.count(fmt.name)
            found.append((fmt.matrix_name(role), shape(count, fmt), fmt.dtype))
            if fmt.scaled:
                scales = fmt.scale_shape(count, scale_rows or rows, columns)
                found.append((fmt.scale_name(role), scales, "float32"))
        return found

    @staticmethod
    def part_of(name: str, roles: Sequence[str]) -> tuple[str, str, bool] | None:
        """``(role, format, is_scale)`` of a buffer named as :meth:`buffers` names them, or None."""
        for role in roles:
            for fmt in map(WeightFormat, FORMATS):
                if name == fmt.matrix_name(role):
                    return role, fmt.name, False
                if fmt.scaled and name == fmt.scale_name(role):
                    return role, fmt.name, True
        return None

    def dispatch(self, body_for: Callable[[WeightFormat, int], object]):
        """A TIR macro ``run(ctx, e)`` calling ``body(ctx, e, slot)`` of expert ``e``'s format.

        ``body_for(fmt, index)`` gives the macro of a format (``index``: its position among the
        present ones). With one format ``slot`` is ``e``; otherwise the experts are numbered
        format by format (:meth:`position`) and a compare chain on that number picks the body.
        """
        present = self.present
        bodies = [body_for(fmt, i) for i, fmt in enumerate(present)]
        if len(present) == 1:
            return _single(bodies[0])
        starts = [0]
        for fmt in present:
            starts.append(starts[-1] + self.count(fmt.name))
        chain = None
        for i in range(len(present) - 1, -1, -1):
            chain = _format_branch(bodies[i], starts[i], starts[i + 1], chain, self.position)
        return chain

    def position(self, e) -> tirx.PrimExpr:
        """Expert ``e``'s number when the experts are listed format by format: a chain of selects
        over the runs of consecutive experts with consecutive numbers."""
        order = [expert for fmt in self.present for expert in self.experts(fmt.name)]
        number = {expert: i for i, expert in enumerate(order)}
        runs: list[tuple[int, int]] = []  # (first expert, its number) of each run
        for expert in range(len(self.formats)):
            if not runs or number[expert] != number[expert - 1] + 1:
                runs.append((expert, number[expert]))
        first, numbered = runs[-1]
        expr = e - first + numbered
        for i in range(len(runs) - 2, -1, -1):
            first, numbered = runs[i]
            expr = T.Select(e < runs[i + 1][0], e - first + numbered, expr)
        return expr


def _single(body):
    """``run(ctx, e)``: ``body(ctx, e, e)`` (every expert in one format)."""

    @T.macro
    def single(ctx, e):
        body(ctx, e, e)

    return single


def _format_branch(body, start: int, stop: int, rest, position):
    """``run(ctx, e)``: ``body(ctx, e, number - start)`` if expert ``e``'s number is below
    ``stop``, else ``rest(ctx, e)`` (None: this is the last format)."""
    if rest is None:

        @T.macro
        def last(ctx, e):
            body(ctx, e, position(e) - start)

        return last

    @T.macro
    def branch(ctx, e):
        if position(e) < stop:
            body(ctx, e, position(e) - start)
        else:
            rest(ctx, e)

    return branch


def fp16_arithmetic(cpu_fp16: bool, hidden: int, ffn: int) -> bool:
    """Whether a layer's fp16 experts multiply in FP16: on a CPU target with FP16 arithmetic
    (``cpu_fp16``), when both matrix widths are whole :data:`FP16_CHUNK`s."""
    return cpu_fp16 and hidden % FP16_CHUNK == 0 and ffn % FP16_CHUNK == 0


REDUCED_ARITHMETIC_TOLERANCE = 1e-2
"""What an artifact whose experts multiply in FP16 or INT8 is held to against the reference (with
the weights rounded as stored, int8-dot experts' input rows rounded to INT8, computed in fp64):
max abs error over the output's largest value. FP16: the chunk sums' rounding (measured ~1e-3).
INT8: the INT32 sums are exact, but an activation the artifact computes a float32 rounding away
from the reference's can land on the other side of an INT8 rounding boundary, one step
(``max |row| / 127``) apart."""


def uniform(formats: Sequence[str] | None, experts: int) -> tuple[str, ...]:
    """``formats`` as a tuple, or all fp32 for ``experts`` experts when None."""
    return tuple(formats) if formats is not None else ("fp32",) * experts


def quantize_int8(weight: np.ndarray, group: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 of expert matrices ``weight`` ``[E, out, in]``: ``(q, scale)`` with
    ``W ≈ q * scale``, ``q`` int8 in ``[-127, 127]``.

    Per output channel (``group == 0``): ``scale[e, o] = max_i |W[e, o, i]| / 127``, shape
    ``[E, out]``. In groups of ``group`` inputs: ``scale[e, g, o] = max over the group's inputs
    / 127``, shape ``[E, in / group, out]``. All in float32: ``scale = float32(max) / 127``,
    ``q = rint(W / scale)`` (round half to even); an all-zero channel gets scale 1 and q 0.
    """
    experts, rows, columns = weight.shape
    w = weight.astype(np.float32)
    size = group or columns
    blocks = w.reshape(experts, rows, columns // size, size)
    peak = np.abs(blocks).max(axis=3)  # [E, out, groups]
    scale = np.where(peak > 0, peak / np.float32(INT8_LIMIT), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -INT8_LIMIT, INT8_LIMIT).astype(np.int8)
    q = q.reshape(experts, rows, columns)
    return q, (scale[..., 0] if group == 0 else scale.transpose(0, 2, 1).copy())
