"""Compare an artifact's outputs with the independent numpy reference of the original model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from moec.canonical.semantics import LayerPlan
from moec.errors import first_line
from moec.reference.evaluator import run_reference
from moec.reference.stored import canonical_evaluator, run_stored_reference


@dataclasses.dataclass(frozen=True)
class OutputError:
    """How far one output of the artifact is from the reference: the largest absolute and relative
    differences where both are numbers, and how many values are NaN in one but not the other
    (``nan_mismatches``: a NaN where the reference has a number is an error of unbounded size,
    which ``max`` alone would drop)."""

    name: str
    tokens: int
    max_abs: float
    max_rel: float
    shape_ok: bool
    nan_mismatches: int = 0

    @property
    def agrees(self) -> bool:
        """Same shape and dtype, and NaN exactly where the reference has NaN."""
        return self.shape_ok and self.nan_mismatches == 0

    def within(self, atol: float) -> bool:
        return self.agrees and self.max_abs <= atol


def compare_outputs(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], tokens: int
) -> list[OutputError]:
    """Per output, the largest absolute and relative (to the reference's largest finite magnitude)
    differences and the NaN mismatches. Equal values (infinities of one sign, NaN against NaN)
    differ by 0."""
    errors = []
    for name, ref in expected.items():
        got = actual[name]
        shape_ok = got.shape == ref.shape and got.dtype == ref.dtype
        if not shape_ok or ref.size == 0:
            worst = float("inf") if not shape_ok else 0.0
            errors.append(OutputError(name, tokens, worst, worst, shape_ok))
            continue
        got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
        nan_got, nan_ref = np.isnan(got64), np.isnan(ref64)
        with np.errstate(invalid="ignore"):
            diff = np.where((got64 == ref64) | (nan_got & nan_ref), 0.0, np.abs(got64 - ref64))
        mismatches = int(np.count_nonzero(nan_got != nan_ref))
        diff[nan_got != nan_ref] = 0.0  # counted apart; an infinity against a number stays inf
        finite = np.abs(ref64[np.isfinite(ref64)])
        scale = max(float(finite.max()) if finite.size else 0.0, np.finfo(np.float32).tiny)
        worst = float(diff.max())
        errors.append(OutputError(name, tokens, worst, worst / scale, True, mismatches))
    return errors


def layer_plans(manifest: dict[str, Any]) -> dict[str, LayerPlan]:
    """Per layer name, what the artifact changed (masking, pruning, early exit, stored precisions);
    empty if nothing."""
    early_exit = manifest.get("early_exit") or {}
    pruning = manifest.get("pruning") or {}
    plans = {}
    for layer in manifest.get("layers", []):
        kept = [entry["expert"] for entry in layer["plan"] if entry["kept"]]
        precisions = tuple(entry["precision"] for entry in layer["plan"])
        plan = LayerPlan(
            kept=kept if len(kept) < len(layer["plan"]) else None,
            channels=pruning.get(layer["name"], {}).get("channels"),
            top1_above=early_exit.get("top1_above"),
            below_fraction=early_exit.get("below_fraction"),
            pattern=None if manifest.get("routing", "learned") == "learned" else manifest["routing"],
            precisions=None if set(precisions) == {"fp32"} else precisions,
            int8_group=layer.get("int8_group") or 0,
            int8_from_model=layer.get("int8_source") == "model",
        )
        if plan != LayerPlan():
            plans[layer["name"]] = plan
    return plans


def reduced_arithmetic(manifest: dict[str, Any]) -> bool:
    """Whether some expert of the artifact multiplies in FP16 or INT8 (held to a relative bound)."""
    return any(
        entry["compute"] in ("fp16", "int8")
        for layer in manifest.get("layers", [])
        for entry in layer["plan"]
    )


def dense_storage(manifest: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
    """The dense weights the artifact stores narrower: name → (precision, output axis, group)."""
    return {
        name: (entry["precision"], entry["output_axis"], entry["group"])
        for name, entry in (manifest.get("dense_weights") or {}).items()
    }


def reference_outputs(
    model: onnx.ModelProto,
    manifest: dict[str, Any],
    feeds: dict[str, np.ndarray],
    on_fallback: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """What the artifact must compute: the model itself (the original graph, run by the ONNX
    reference evaluator), or, when the artifact changed the model (weights stored narrower,
    experts masked, channels pruned, early exit), its canonical layers (and dense weights) with
    those changes.

    A graph that does not run at ``feeds``' shapes (a TorchScript trace of a loop over the
    experts hit, whose split sizes came from the trace input) is checked through its canonical
    layers, which were confirmed against the graph when it was imported; ``on_fallback`` gets
    why, in one line.
    """
    plans, dense = layer_plans(manifest), dense_storage(manifest)
    if not plans and not dense:
        try:
            return run_reference(model, feeds)
        except Exception as err:  # the onnx reference raises anything numpy does
            if not manifest.get("layers"):
                raise
            if on_fallback is not None:
                on_fallback(
                    f"the graph itself does not run at these shapes ({type(err).__name__}: "
                    f"{first_line(err)[:100]}); "
                    "checked against its MoE layers' numpy reference instead"
                )
    return run_stored_reference(model, feeds, plans, dense)


@dataclasses.dataclass(frozen=True)
class AccuracyCost:
    """How far an optimised artifact's outputs are from the unoptimised model's, on some inputs."""

    name: str
    max_abs: float
    cosine: float
    top1_agreement: float | None  # share of positions with the same arg-max (logit-like outputs)


def accuracy_against_original(
    actual: dict[str, np.ndarray], model: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> list[AccuracyCost]:
    """Compare ``actual`` (the artifact's outputs) with the original model's (numpy reference)."""
    costs = []
    for name, ref in run_reference(model, feeds).items():
        got = actual[name].astype(np.float64).reshape(-1)
        want = np.asarray(ref, dtype=np.float64).reshape(-1)
        norm = np.linalg.norm(got) * np.linalg.norm(want)
        cosine = float(got @ want / norm) if norm > 0 else 1.0
        top1 = None
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            top1 = float(np.mean(np.argmax(actual[name], axis=-1) == np.argmax(ref, axis=-1)))
        costs.append(AccuracyCost(name, float(np.abs(got - want).max()), cosine, top1))
    return costs


def router_agreement(
    model: onnx.ModelProto, manifest: dict[str, Any], feeds: dict[str, np.ndarray]
) -> dict[str, float]:
    """Per MoE layer, the share of tokens the optimised model routes to the same set of experts
    as the original (both from the numpy reference; skipped slots count as not computed)."""
    routes: dict[str, dict[str, list[set[int]]]] = {"original": {}, "optimised": {}}

    def recorder(kind: str):
        def on_route(_index: int, layer: Any, _x: np.ndarray, index: np.ndarray, _w: np.ndarray) -> None:
            routes[kind].setdefault(layer.name, []).extend(set(row[row >= 0].tolist()) for row in index)

        return on_route

    canonical_evaluator(model, on_route=recorder("original"))[0].run(None, feeds)
    optimised = canonical_evaluator(
        model, recorder("optimised"), layer_plans(manifest), dense_storage(manifest)
    )
    optimised[0].run(None, feeds)
    return {
        layer: float(np.mean([a == b for a, b in zip(sets, routes["optimised"][layer], strict=True)]))
        for layer, sets in routes["original"].items()
    }
