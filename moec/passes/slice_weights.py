"""SliceWeights: make the detached weights follow ``main``'s signature, as the layer passes left it.

The layer passes retype ``main``'s weight parameters but cannot touch the weight arrays, which
live outside the module (``relax.frontend.detach_params``). This pass holds those arrays, in
``main``'s weight parameter order, and applies what the passes recorded.

Rewrite rules, on ``main``:

- its attributes ``moec.expert_slices`` (parameter name → kept expert ids, from
  ``MaskExperts``), ``moec.channel_slices`` (parameter name → ``[axis, per kept expert the
  channel ids]``, from ``PruneChannels``) and ``moec.packed_weights`` (parameter name →
  ``{"panel", "transposed"[, "experts"]}``, from ``DenseLinear`` and ``PackExpertWeights``)
  are removed: once the weights are sliced and packed they say nothing more about the module;
- the module is otherwise unchanged.

Alongside, ``weights`` (parameter name → tensor, in ``main``'s parameter order, under the names
the parameters have when the pass runs: the ONNX names) holds each weight with the experts and
channels the attributes list sliced away, converted to its parameter's dtype
(``StoreExpertWeights``' fp16), and packed in panels where ``DenseLinear`` or
``PackExpertWeights`` asked (``packed[p, k, v] = W[k, p * panel + v]``, ``W`` transposed first
if stored ``[N, K]``, zeros past the last column; with ``experts``, each expert's matrix so).
A weight nothing changed is passed through, not copied.

Runs in the export phase, after every pass that retypes ``main``'s weights and before
``CIdentifiers`` renames them.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

EXPERT_SLICES = "moec.expert_slices"
CHANNEL_SLICES = "moec.channel_slices"
PACKED_WEIGHTS = "moec.packed_weights"


@tvm.transform.module_pass(opt_level=0, name="SliceWeights")
class SliceWeights:
    """Slice and convert ``params`` (``main``'s detached weights, in order) to ``main``'s
    signature; ``weights`` holds the result by parameter name once the pass has run."""

    def __init__(self, params: list[tvm.runtime.Tensor]) -> None:
        self.params = list(params)
        self.weights: dict[str, tvm.runtime.Tensor] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        main = mod["main"]
        slices = _attr_json(main, EXPERT_SLICES)
        channels = _attr_json(main, CHANNEL_SLICES)
        packing = _attr_json(main, PACKED_WEIGHTS)
        num_inputs = int(main.attrs["num_input"])
        self.weights = {
            var.name: _follow(
                value, str(var.ty.dtype), slices.get(var.name), channels.get(var.name), packing.get(var.name)
            )
            for var, value in zip(main.params[num_inputs:], self.params, strict=True)
        }
        if not slices and not channels and not packing:
            return mod
        for key in (EXPERT_SLICES, CHANNEL_SLICES, PACKED_WEIGHTS):
            if main.attrs is not None and key in main.attrs:
                main = main.without_attr(key)
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
        if packing.get("experts"):  # one [out, in] matrix per expert, each packed
            array = np.stack([_panels(matrix.T if transposed else matrix, panel) for matrix in array])
        else:
            array = _panels(array.T if transposed else array, panel)
    return tvm.runtime.tensor(np.ascontiguousarray(array.astype(dtype, copy=False)))


def _panels(weight: np.ndarray, panel: int) -> np.ndarray:
    """``weight`` ``[K, N]`` as ``[ceil(N / panel), K, panel]`` panels, zeros past column ``N``."""
    in_features, out_features = weight.shape
    panels = -(-out_features // panel)
    padded = np.zeros((in_features, panels * panel), weight.dtype)
    padded[:, :out_features] = weight
    return padded.reshape(in_features, panels, panel).transpose(1, 0, 2)
