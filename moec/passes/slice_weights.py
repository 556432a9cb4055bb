"""SliceWeights: make the detached weights follow ``main``'s signature, as the layer passes left it.

The layer passes retype ``main``'s weight parameters but cannot touch the weight arrays, which
live outside the module (``relax.frontend.detach_params``). This pass holds those arrays, in
``main``'s weight parameter order, and applies what the passes recorded.

Rewrite rules, on ``main``:

- its attributes ``moec.expert_slices`` (parameter name → kept expert ids, from
  ``MaskExperts``), ``moec.channel_slices`` (parameter name → ``[axis, per kept expert the
  channel ids]``, from ``PruneChannels``), ``moec.expert_formats`` (parameter name → the
  ``source`` parameter, ``experts``, ``format``, ``group`` and whether it holds the ``scale``,
  from ``StoreExpertWeights``) and ``moec.packed_weights`` (parameter name → ``{"panel",
  "transposed"[, "experts"][, "scale"]}``, from ``DenseLinear`` and ``PackExpertWeights``) are
  removed: once the weights are sliced and packed they say nothing more about the module;
- the dense weights stored narrower (parts with an ``output_axis``) are summarised in
  ``moec.dense_weights`` (source name → ``{"precision", "group", "output_axis", "router"}``), which the
  manifest and the reference read;
- the module is otherwise unchanged.

Alongside, ``weights`` (parameter name → tensor, in ``main``'s parameter order, under the names
the parameters have when the pass runs: the ONNX names, and ``{source}.{format}`` for the
parts of a weight stored per format) holds each weight with the experts and channels the
attributes list sliced away; for a part, its experts in its format (float16, or int8 values
or scales as :func:`moec.kernels.formats.quantize_int8` makes them); converted to its
parameter's dtype; and packed in panels where ``DenseLinear`` or ``PackExpertWeights`` asked
(``packed[p, k, v] = W[k, p * panel + v]``, ``W`` transposed first if stored ``[N, K]``, zeros
past the last column; with ``experts``, each expert's matrix so; with ``dot`` (int8-dot), 4
inputs of a row together, ``packed[p, k, 4 v + d] = W[4 k + d, p * panel + v]``; with ``scale``,
only the last axis padded with zeros to whole panels). A weight nothing changed is passed through, not copied.

Runs in the export phase, after every pass that retypes ``main``'s weights and before
``CIdentifiers`` renames them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import tvm
from tvm import relax

from moec.kernels.formats import DOT_DEPTH, INT8_FORMATS, quantize_int8

EXPERT_SLICES = "moec.expert_slices"
CHANNEL_SLICES = "moec.channel_slices"
EXPERT_FORMATS = "moec.expert_formats"
PACKED_WEIGHTS = "moec.packed_weights"
DENSE_WEIGHTS = "moec.dense_weights"


@tvm.transform.module_pass(opt_level=0, name="SliceWeights")
class SliceWeights:
    """Slice and convert ``params`` (``main``'s detached weights by their parameter names before
    the pipeline ran) to ``main``'s signature; ``weights`` holds the result by parameter name
    once the pass has run."""

    def __init__(
        self, params: Mapping[str, tvm.runtime.Tensor], int8_steps: Mapping[str, np.ndarray] | None = None
    ) -> None:
        self.params = dict(params)
        self.int8_steps = dict(int8_steps or {})
        self.weights: dict[str, tvm.runtime.Tensor] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        main = mod["main"]
        slices = _attr_json(main, EXPERT_SLICES)
        channels = _attr_json(main, CHANNEL_SLICES)
        formats = _attr_json(main, EXPERT_FORMATS)
        packing = _attr_json(main, PACKED_WEIGHTS)
        num_inputs = int(main.attrs["num_input"])
        sliced: dict[str, np.ndarray] = {}  # a split weight's source, sliced once for all its parts

        def follow(name: str, dtype: str) -> tvm.runtime.Tensor:
            part = formats.get(name)
            if part is None:
                return _follow(
                    self.params[name], dtype, slices.get(name), channels.get(name), packing.get(name)
                )
            source = part["source"]
            if source not in sliced:
                value = self.params[source]
                sliced[source] = _follow(value, "float32", slices.get(source), channels.get(source)).numpy()
            steps = self.int8_steps.get(source)
            if steps is not None and slices.get(source) is not None:
                steps = steps[slices[source]]
            stored = _stored_part(sliced[source], part, steps)
            return _follow(tvm.runtime.tensor(stored), dtype, None, None, packing.get(name))

        self.weights = {var.name: follow(var.name, str(var.ty.dtype)) for var in main.params[num_inputs:]}
        dense = {
            part["source"]: {
                "precision": part["format"],
                "group": part["group"],
                "output_axis": part["output_axis"],
                "router": part["router"],
            }
            for part in formats.values()
            if "output_axis" in part
        }
        if not slices and not channels and not packing and not formats:
            return mod
        for key in (EXPERT_SLICES, CHANNEL_SLICES, EXPERT_FORMATS, PACKED_WEIGHTS):
            if main.attrs is not None and key in main.attrs:
                main = main.without_attr(key)
        if dense:
            main = main.with_attr(DENSE_WEIGHTS, json.dumps(dense, sort_keys=True))
        updated = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        updated["main"] = main
        return updated


def _attr_json(func: relax.Function, key: str) -> dict:
    """``func``'s JSON attribute ``key``, parsed ({} if absent)."""
    return json.loads(str(func.attrs[key])) if func.attrs is not None and key in func.attrs else {}


def _follow(
    value: tvm.runtime.Tensor,
    dtype: str,
    experts: list[int] | None,
    channels: list | None,
    packing: dict | None = None,
) -> tvm.runtime.Tensor:
    """``value`` with only the ``experts`` kept, only the ``channels`` (``[axis, per expert ids]``)
    kept, in ``dtype``, packed in panels (``{"panel", "transposed"}``); ``value`` itself if none
    of that changes it."""
    if experts is None and channels is None and packing is None and str(value.dtype) == dtype:
        return value
    array = value.numpy()
    if experts is not None:
        array = array[experts]
    if channels is not None:
        axis, kept = channels
        array = np.stack([np.take(array[e], ids, axis=axis - 1) for e, ids in enumerate(kept)])
    if packing is not None:
        panel, transposed = int(packing["panel"]), bool(packing["transposed"])
        if packing.get("scale"):  # scales [..., out]: the last axis padded to whole panels
            padded = np.zeros((*array.shape[:-1], -(-array.shape[-1] // panel) * panel), array.dtype)
            padded[..., : array.shape[-1]] = array
            array = padded
        elif packing.get("experts"):  # one [out, in] matrix per expert, each packed
            pack = _dot_panels if packing.get("dot") else _panels
            array = np.stack([pack(matrix.T if transposed else matrix, panel) for matrix in array])
        else:
            array = _panels(array.T if transposed else array, panel)
    return tvm.runtime.tensor(np.ascontiguousarray(array.astype(dtype, copy=False)))


def _stored_part(matrices: np.ndarray, part: dict, steps: np.ndarray | None = None) -> np.ndarray:
    """One part of expert matrices ``[E, out, in]`` stored per format: the ``experts`` of the
    part's ``format`` (int8: their quantized values, or their scales; with the model's own
    ``steps``, ``[E, out]`` or ``[E, in / group, out]``, those steps and ``rint(W / step)``:
    the model's integers, exactly). A dense weight (a part with an ``output_axis``) is one
    matrix: its int8 values in its own orientation, or its scales ``[1, out]``."""
    if "output_axis" in part:
        if part["format"] == "fp16":
            return matrices.astype(np.float16)
        by_output = matrices if part["output_axis"] == 0 else matrices.T
        q, scale = quantize_int8(by_output[None], int(part["group"]))
        return scale if part["scale"] else (q[0] if part["output_axis"] == 0 else q[0].T)
    chosen = matrices[part["experts"]]
    if part["format"] == "fp16":
        return chosen.astype(np.float16)
    if part["format"] in INT8_FORMATS and steps is not None:
        scale = steps[part["experts"]]
        if part["scale"]:
            return scale
        group = int(part["group"])
        # per weight: [E, out, 1] per channel; [E, in / group, out] → [E, out, in] per group
        per_weight = np.repeat(scale.transpose(0, 2, 1), group, axis=2) if group else scale[:, :, None]
        return np.clip(np.rint(chosen / per_weight), -128, 127).astype(np.int8)
    if part["format"] in INT8_FORMATS:
        q, scale = quantize_int8(chosen, int(part["group"]))
        return scale if part["scale"] else q
    return chosen


def _panels(weight: np.ndarray, panel: int) -> np.ndarray:
    """``weight`` ``[K, N]`` as ``[ceil(N / panel), K, panel]`` panels, zeros past column ``N``."""
    in_features, out_features = weight.shape
    panels = -(-out_features // panel)
    padded = np.zeros((in_features, panels * panel), weight.dtype)
    padded[:, :out_features] = weight
    return padded.reshape(in_features, panels, panel).transpose(1, 0, 2)


def _dot_panels(weight: np.ndarray, panel: int) -> np.ndarray:
    """``weight`` ``[K, N]`` as int8-dot panels ``[ceil(N / panel), K / 4, panel * 4]``: each
    panel's rows 4 inputs at a time, the 4 inputs of one column together."""
    panels = _panels(weight, panel)  # [P, K, panel]
    count, in_features, _ = panels.shape
    grouped = panels.reshape(count, in_features // DOT_DEPTH, DOT_DEPTH, panel).transpose(0, 1, 3, 2)
    return grouped.reshape(count, in_features // DOT_DEPTH, panel * DOT_DEPTH)
