"""Per-expert precisions chosen under an accuracy budget (``moec compile --accuracy-budget X``).

**The budget.** ``X`` bounds the *relative RMS error of the model's outputs*: over every output
of every calibration sample, ``sqrt(sum (y_plan - y)^2) / sqrt(sum y^2)``, where ``y`` is what
the artifact computes with every expert in fp32 (the same masking, pruning and early exit, if
any, so the budget measures only what the precisions change) and ``y_plan`` what it computes
with the chosen precisions. Both come from moec's numpy oracle of the artifact
(:func:`moec.reference.stored.run_stored_reference`), so choosing a plan needs no compiled code.

**The choice.** A token's cost on an edge board is the bytes of its experts read from memory,
so the objective is the expected bytes read per token, ``sum over experts of activation
frequency x stored bytes``. Each expert can step down from fp32 to fp16 (2 bytes saved per
weight) and then to int8 (1 more); each step saves ``frequency x weights x bytes saved`` per
token. The steps are ordered by that saving, largest first (an expert's fp16 step always
before its int8 step), and the longest prefix of that order whose error stays within ``X`` is
taken, found by bisection (a handful of reference runs rather than one per step; the error
grows with the prefix, and the result is measured, not assumed). The step that would break
the budget is then skipped (with that expert's later steps) and the search continues over the
steps after it, a few times: one expert whose weights quantize badly does not stop the rest.

**Held-out check.** With two or more calibration samples, every other sample is held out: the
plan is chosen on the first half and its error measured on the held-out half too, and the plan
is shortened until both stay within ``X``. The manifest records both errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from moec.canonical.semantics import LayerPlan
from moec.frontend.importer import find_blocks
from moec.options import CompileOptions
from moec.reference.stored import run_stored_reference

STEPS = (("fp32", "fp16", 2), ("fp16", "int8", 1))
"""The precision steps an expert can take: (from, to, bytes saved per weight)."""
MAX_SKIPS = 4
"""How many budget-breaking steps the search skips (each skip: another bisection over the rest)."""
METRIC = "relative RMS error of all outputs vs every expert in fp32, on the calibration data"


@dataclasses.dataclass(frozen=True)
class BudgetResult:
    """The chosen precisions per layer (model numbering), the error on the samples the plan was
    chosen on and on the held-out ones (None without held-out samples), and the expected expert
    bytes read per token before and after."""

    precisions: dict[str, tuple[str, ...]]
    error: float
    held_out_error: float | None
    bytes_per_token_fp32: float
    bytes_per_token: float

    def describe(self, budget: float, int8_group: int) -> dict[str, Any]:
        """The manifest's record of the choice."""
        return {
            "budget": budget,
            "metric": METRIC,
            "error": self.error,
            "held_out_error": self.held_out_error,
            "int8_group": int8_group,
            "expected_expert_bytes_per_token": {
                "fp32": self.bytes_per_token_fp32,
                "plan": self.bytes_per_token,
            },
        }


def relative_rms(actual: list[dict[str, np.ndarray]], expected: list[dict[str, np.ndarray]]) -> float:
    """``sqrt(sum (actual - expected)^2) / sqrt(sum expected^2)`` over every output of every sample."""
    error = scale = 0.0
    for got, want in zip(actual, expected, strict=True):
        for name, value in want.items():
            reference = np.asarray(value, np.float64)
            error += float(np.sum((np.asarray(got[name], np.float64) - reference) ** 2))
            scale += float(np.sum(reference**2))
    return float(np.sqrt(error / scale)) if scale > 0 else float(np.sqrt(error))


def choose_precisions(
    model: onnx.ModelProto,
    profile: dict[str, Any],
    samples: Sequence[dict[str, np.ndarray]],
    budget: float,
    options: CompileOptions | None = None,
    progress: Callable[[str], None] = lambda _line: None,
) -> BudgetResult:
    """The precisions minimising expected expert bytes per token with the output error within
    ``budget`` (see the module docstring). ``profile``: ``moec profile``'s, for the activation
    frequencies; ``samples``: calibration feeds; ``options``: the artifact's other changes
    (masking, pruning, early exit, fixed routing) and its ``int8_group``."""
    if not samples:
        raise ValueError("choose_precisions needs at least one calibration sample")
    chosen_on = list(samples[0::2]) if len(samples) > 1 else list(samples)
    held_out = list(samples[1::2]) if len(samples) > 1 else []
    options = options or CompileOptions()
    int8_group = options.int8_group
    frequencies = {layer["name"]: layer["activation_frequency"] for layer in profile["layers"]}
    layers = {
        block.layer.name: {
            "experts": block.layer.num_experts,
            "weights": (3 if block.layer.gated else 2) * block.layer.hidden,  # per intermediate channel
            "ffn": block.layer.ffn,
            "activation_frequency": frequencies[block.layer.name],
        }
        for block in find_blocks(model)
    }
    base = base_plans(options, list(layers))
    steps = _ordered_steps(layers, base)

    def run(feeds_list, taken: Sequence[tuple[str, int, str]]) -> list[dict[str, np.ndarray]]:
        plans = _plans(layers, base, taken, int8_group)
        return [run_stored_reference(model, feeds, plans) for feeds in feeds_list]

    reference, reference_held = run(chosen_on, []), run(held_out, [])

    def errors(taken: Sequence[tuple[str, int, str]]) -> tuple[float, float | None]:
        error = relative_rms(run(chosen_on, taken), reference)
        held = relative_rms(run(held_out, taken), reference_held) if held_out else None
        progress(
            f"{len(taken)} of {len(steps)} precision steps: error {error:.3g}"
            + (f", held out {held:.3g}" if held is not None else "")
        )
        return error, held

    def within(result: tuple[float, float | None]) -> bool:
        return result[0] <= budget and (result[1] is None or result[1] <= budget)

    taken: list[tuple[str, int, str]] = []
    result: tuple[float, float | None] = (0.0, 0.0 if held_out else None)
    remaining = list(steps)
    for _ in range(MAX_SKIPS + 1):
        low, high = 0, len(remaining)  # the longest prefix of remaining within the budget is in [low, high]
        found = {0: result}
        while low < high:
            middle = (low + high + 1) // 2
            found[middle] = errors(taken + remaining[:middle])
            low, high = (middle, high) if within(found[middle]) else (low, middle - 1)
        taken, result = taken + remaining[:low], found[low]
        if low == len(remaining):
            break
        # skip the step that broke the budget, and every later step of that expert
        name, expert, _ = remaining[low]
        remaining = [step for step in remaining[low + 1 :] if step[:2] != (name, expert)]
        if not remaining:
            break
    precisions = _precisions(layers, taken)
    return BudgetResult(
        precisions=precisions,
        error=result[0],
        held_out_error=result[1],
        bytes_per_token_fp32=_bytes_per_token(layers, base, _precisions(layers, [])),
        bytes_per_token=_bytes_per_token(layers, base, precisions),
    )


def base_plans(options: CompileOptions, layers: Sequence[str]) -> dict[str, LayerPlan]:
    """The oracle's plans for what ``options`` change besides precisions (masking, pruning, early
    exit, fixed routing), for each of ``layers`` it changes."""
    plans = {}
    for name in layers:
        plan = LayerPlan(
            kept=(options.kept_experts or {}).get(name),
            channels=(options.kept_channels or {}).get(name),
            top1_above=options.skip_top1_above,
            below_fraction=options.skip_below_fraction,
            pattern=None if options.routing == "learned" else options.routing,
        )
        if plan != LayerPlan():
            plans[name] = plan
    return plans


def _weights_per_expert(layer: dict[str, Any], plan: LayerPlan | None) -> int:
    """Matrix weights of one expert: gate (if gated), up and down, over the kept channels."""
    ffn = len(plan.channels[0]) if plan is not None and plan.channels is not None else layer["ffn"]
    return layer["weights"] * ffn


def _kept(layer: dict[str, Any], plan: LayerPlan | None) -> list[int]:
    return list(plan.kept) if plan is not None and plan.kept is not None else list(range(layer["experts"]))


def _ordered_steps(layers: dict[str, dict], base: dict[str, LayerPlan]) -> list[tuple[str, int, str]]:
    """Every (layer, expert, precision after the step), largest saving per token first."""
    scored = []
    for name, layer in layers.items():
        weights = _weights_per_expert(layer, base.get(name))
        for expert in _kept(layer, base.get(name)):
            frequency = layer["activation_frequency"][expert]
            for order, (_, to, saved) in enumerate(STEPS):
                scored.append((-frequency * weights * saved, name, expert, order, to))
    scored.sort()
    return [(name, expert, to) for _, name, expert, _, to in scored]


def _precisions(layers: dict[str, dict], steps: Sequence[tuple[str, int, str]]) -> dict[str, tuple[str, ...]]:
    """Per layer each expert's precision after ``steps`` (from all fp32)."""
    chosen = {name: ["fp32"] * layer["experts"] for name, layer in layers.items()}
    for name, expert, to in steps:
        chosen[name][expert] = to
    return {name: tuple(p) for name, p in chosen.items()}


def _plans(
    layers: dict[str, dict], base: dict[str, LayerPlan], steps: Sequence[tuple[str, int, str]], group: int
) -> dict[str, LayerPlan]:
    """The oracle's plans: ``base`` with the precisions after ``steps``."""
    plans = dict(base)
    for name, precisions in _precisions(layers, steps).items():
        if set(precisions) != {"fp32"}:
            plans[name] = dataclasses.replace(
                base.get(name, LayerPlan()), precisions=precisions, int8_group=group
            )
    return plans


BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "int8": 1}


def _bytes_per_token(
    layers: dict[str, dict], base: dict[str, LayerPlan], precisions: dict[str, tuple[str, ...]]
) -> float:
    """Expected expert matrix bytes read per token: activation frequency x stored bytes, summed."""
    total = 0.0
    for name, layer in layers.items():
        weights = _weights_per_expert(layer, base.get(name))
        for expert in _kept(layer, base.get(name)):
            total += (
                layer["activation_frequency"][expert] * weights * BYTES_PER_WEIGHT[precisions[name][expert]]
            )
    return total
