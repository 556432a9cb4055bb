"""INT8 arithmetic (W8A8) for int8-dot experts: run-time row quantization and dot instructions.

An int8-dot expert stores the INT8 weights of the ``int8`` format (:func:`moec.kernels.formats.
quantize_int8`, per output channel or per group of inputs) and multiplies them with INT8
activations: each row a kernel reads (a token's ``x`` for ``expert_up``, a pair's ``inter`` for
``expert_down``) is quantized per row when the kernel starts, exactly as the weights are at
compile time (``s = float32(max |row|) / 127``, 1 for an all-zero row; ``q = clip(rint(row / s),
-127, 127)``, in float32), into a scratch buffer of the call. The dot products then run on the
target's instruction with INT32 sums, ``DOT_DEPTH`` products per lane per instruction:

- ``vnni`` (x86 AVX-512 VNNI / AVX-VNNI): ``vpdpbusd`` multiplies *unsigned* by signed bytes, so
  the weights are read as ``q_w + 128`` (one ``xor 0x80`` per weight vector, shared by all the
  block's tokens) and ``128 × Σ q_x`` of the group is subtracted from each sum (the row sums are
  computed with the quantized row);
- ``sdot`` (AArch64 ``+dotprod``, Cortex-A76): signed by signed;
- ``dp4a`` (CUDA ``__dp4a``, sm_61 and newer): signed by signed, one 32-bit word at a time.

A group's (or the row's) INT32 sum is exact; it becomes float32 once per group:
``y[o] = s_x × Σ_g s_w[g, o] × Σ_{i in g} q_x[i] q_w[o, i]``. The reference computes the same
thing with the activations rounded the same way (:func:`moec.canonical.semantics.round_int8`).
"""

from __future__ import annotations

import dataclasses

from tvm import tirx
from tvm.script import tirx as T

from moec.kernels.formats import DOT_DEPTH, INT8_LIMIT

INSTRUCTION_SETS = ("vnni", "sdot", "dp4a")
"""The INT8 dot-product instruction sets a target may have (``TargetSpec.int8_dot``)."""
_VNNI_WIDTHS = {16: 512, 8: 256, 4: 128}
"""``vpdpbusd`` forms by INT32 lanes (the 256- and 128-bit ones are AVX-VNNI's too)."""
_UNSIGNED_OFFSET = 128


@dataclasses.dataclass(frozen=True)
class DotInstruction:
    """One INT8 dot-product instruction: ``lanes`` INT32 sums, each of ``DOT_DEPTH`` products of
    weight bytes with the same ``DOT_DEPTH`` activation bytes."""

    isa: str
    lanes: int

    @property
    def unsigned_weights(self) -> bool:
        """The weights are read as unsigned bytes ``q + 128`` (x86 ``vpdpbusd``)."""
        return self.isa == "vnni"

    def __call__(self, acc, weights, word) -> tirx.PrimExpr:
        """``acc`` (``int32 × lanes``) plus, per lane ``l``, ``Σ_d weights[4 l + d] × word[d]``:
        ``weights`` are ``4 × lanes`` int8 (``dp4a``: the 4 bytes as one int32), ``word`` the 4
        activation bytes as one int32."""
        n = self.lanes * DOT_DEPTH
        if self.isa == "vnni":
            offset = weights ^ T.Broadcast(T.int8(-_UNSIGNED_OFFSET), n)  # q + 128 as unsigned
            broadcast = T.reinterpret(f"int8x{n}", T.Broadcast(word, self.lanes))
            name = f"llvm.x86.avx512.vpdpbusd.{_VNNI_WIDTHS[self.lanes]}"
            return T.call_llvm_pure_intrin(f"int32x{self.lanes}", name, acc, offset, broadcast)
        if self.isa == "sdot":
            broadcast = T.reinterpret(f"int8x{n}", T.Broadcast(word, self.lanes))
            return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot", acc, weights, broadcast)
        return T.call_pure_extern("int32", "__dp4a", weights, word, acc)

    def group_value(self, total, fmt, scale, slot, group, out, quantized, row) -> tirx.PrimExpr:
        """The float32 value of a finished INT32 sum ``total`` of input group ``group`` (the whole
        row per channel) of output ``out`` and activation row ``row``: without the unsigned
        offset, times the row's scale and, in groups, the weight group's scale (a per-channel
        weight scale is left to :meth:`moec.kernels.formats.WeightFormat.finish`)."""
        _, xs, xsum = quantized
        if self.unsigned_weights:
            total = total - T.int32(_UNSIGNED_OFFSET) * xsum[row, group]
        value = T.Cast("float32", total) * xs[row]
        return value * scale[slot, group, out] if fmt.group else value


def panel_instruction(isa: str, panel: int, simd_lanes: int) -> DotInstruction:
    """The widest instruction of ``isa`` whose INT32 lanes fit the SIMD registers (``simd_lanes``
    float32 lanes) and divide the panel width."""
    widths = {"vnni": tuple(_VNNI_WIDTHS), "sdot": (4,)}.get(isa)
    if widths is None:
        raise ValueError(f"no panel form of INT8 dot products with {isa!r} (use vnni or sdot)")
    for lanes in widths:
        if lanes <= simd_lanes and panel % lanes == 0:
            return DotInstruction(isa, lanes)
    raise ValueError(f"int8-dot panels of {panel} rows: {isa} needs a multiple of {widths[-1]}")


def activation_word(xq, row, column) -> tirx.PrimExpr:
    """Quantized activations ``xq[row, column .. column + 3]`` as one int32."""
    return T.reinterpret("int32", xq[row, T.Ramp(column, 1, DOT_DEPTH)])


def quantize_rows(backend, length: int, group: int, sums: bool):
    """A TIR macro ``quantize(src, rows, quantized)``: each of ``src``'s ``rows`` rows (float32,
    ``length`` wide) quantized to ``quantized = (xq, xs, xsum)``: ``xq[r]`` int8, ``xs[r]`` its
    scale and, when ``sums`` (``vnni``), ``xsum[r, g]`` the sum of ``xq[r]`` over each group of
    ``group`` inputs (the whole row when 0). Rows are the backend's items (parallel on a CPU, a
    thread each on CUDA); a CPU quantizes a row a vector at a time."""
    size = group or length
    lanes = getattr(backend.schedule, "lanes", 1)
    while lanes > 1 and (length % lanes or size % lanes):
        lanes //= 2
    items = backend.items()

    @T.macro
    def quantize_row(src, r, quantized):
        xq, xs, xsum = quantized
        peak = T.alloc_buffer((lanes,), "float32", scope=backend.scratch_scope)
        for v in T.vectorized(lanes):
            peak[v] = T.float32(0)
        # The row's largest magnitude, NaN if any value is NaN (T.max alone drops a NaN in its
        # first operand): a NaN in the token then makes its scale, and so its outputs, NaN.
        for ho in range(length // lanes):
            for v in T.vectorized(lanes):
                peak[v] = T.Select(
                    T.isnan(src[r, ho * lanes + v]),
                    src[r, ho * lanes + v],
                    T.max(T.abs(src[r, ho * lanes + v]), peak[v]),
                )
        for v in range(1, lanes):
            peak[0] = T.Select(T.isnan(peak[v]), peak[v], T.max(peak[v], peak[0]))
        xs[r] = T.Select(peak[0] == T.float32(0), T.float32(1), peak[0] / T.float32(INT8_LIMIT))
        for ho in range(length // lanes):
            for v in T.vectorized(lanes):
                xq[r, ho * lanes + v] = T.Cast(
                    "int8",
                    T.max(
                        T.min(T.nearbyint(src[r, ho * lanes + v] / xs[r]), T.float32(INT8_LIMIT)),
                        T.float32(-INT8_LIMIT),
                    ),
                )
        if sums:
            total = T.alloc_buffer((lanes,), "int32", scope=backend.scratch_scope)
            for g in range(length // size):
                for v in T.vectorized(lanes):
                    total[v] = 0
                for ho in range(size // lanes):
                    for v in T.vectorized(lanes):
                        total[v] = total[v] + T.Cast("int32", xq[r, g * size + ho * lanes + v])
                for v in range(1, lanes):
                    total[0] = total[0] + total[v]
                xsum[r, g] = total[0]

    @T.macro
    def quantize(src, rows, quantized):
        for o in items.outer(rows):
            for i in items.inner():
                if items.valid(o, i, rows):
                    quantize_row(src, items.index(o, i), quantized)

    return quantize


def with_quantized_rows(backend, length: int, group: int, isa: str | None, body):
    """A TIR macro ``run(src, rows, buffers, offset, n)`` calling ``body(buffers, quantized,
    offset, n)``: with ``isa`` (some expert is int8-dot), ``quantized`` holds ``src``'s ``rows``
    rows quantized by :func:`quantize_rows` into scratch buffers of the call; else ``()``."""
    if isa is None:

        @T.macro
        def plain(src, rows, buffers, offset, n):
            body(buffers, (), offset, n)

        return plain
    sums = isa == "vnni"
    quantize = quantize_rows(backend, length, group, sums)
    groups = length // (group or length) if sums else 1

    @T.macro
    def quantized_run(src, rows, buffers, offset, n):
        xq = T.alloc_buffer((rows, length), "int8")
        xs = T.alloc_buffer((rows,), "float32")
        xsum = T.alloc_buffer((rows, groups), "int32")
        quantize(src, rows, (xq, xs, xsum))
        body(buffers, (xq, xs, xsum), offset, n)

    return quantized_run
