"""The compile contract: every choice ``moec compile`` makes, as one frozen, validated value.

:class:`CompileOptions` is what :func:`moec.compiler.compile.compile_model` and the pass
pipeline (:func:`moec.passes.pipeline.moe_pipeline`) read; it is validated once, when it is
made. A bad value raises :class:`OptionError`, which names the option by its field here; a
front end that spells options differently (the command line's ``--flags``, in ``moec/cli.py``
only) restates the message with its own spelling. The module imports nothing heavy, so the
command line can read the choices below without loading TVM.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moec.errors import MoecError

PRECISIONS = ("fp32", "fp16", "int8", "int8-dot")
"""How expert weights may be stored and multiplied, per expert (``StoreExpertWeights``;
:mod:`moec.kernels.formats`): int8 is weight-only (W8A32), int8-dot multiplies in INT8 (W8A8)."""
AUTO = "auto"
"""``--precision``'s default: fp32, except for the layers the model itself stores as INT8
(onnxruntime's QMoE), whose experts stay int8, the model's own integers and steps."""
DENSE_PRECISIONS = ("fp32", "fp16", "int8")
"""How dense weights (routers, attention, LM head) may be stored (``DenseLinear``)."""
INT8_GROUPS = (0, 32, 64, 128)
"""INT8 scale groups along the input: 0 is one scale per output channel."""
ROUTINGS = ("learned", "cycle", "tile")
"""The model's own router, or a fixed pattern (``FixedRouting``'s ``PATTERNS``)."""


class OptionError(MoecError):
    """A bad compile option. The message says ``{option}`` where the option's name goes; ``str()``
    fills in the field name, :meth:`naming` any other spelling of it (a command-line flag)."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        self.message = message
        super().__init__(self.naming(option))

    def naming(self, spelling: str) -> str:
        """The one-line message with the option called ``spelling``."""
        return self.message.replace("{option}", spelling)


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What to compile for and what to change, for one ``compile_model`` call.

    ``target``: a bundled target name or the path of a target ``.toml`` file.
    ``precision``: how every expert's weight matrices are stored (``fp32``, ``fp16``, ``int8``:
    symmetric INT8 with float32 scales, the arithmetic fp32; ``int8-dot``: the same INT8 weights
    multiplied with INT8 activations, on targets that compute int8), or ``auto`` (the default):
    fp32, but int8 for a layer the model stores as INT8 itself. ``precision_plan``: per
    layer name, one precision per expert (the model's expert numbering), overriding
    ``precision`` for the layers it names (a single precision: every expert of the layer).
    ``int8_group``: INT8 scale group along the input
    (0: one scale per output channel; else 32, 64 or 128 inputs per scale). ``int8_exact``: per
    layer the model stores as INT8 itself (``MoELayer.int8_steps``), its block size: stored int8
    or int8-dot, its experts keep the model's integers and steps (not requantized), whatever
    ``int8_group`` says; :func:`resolve_stored_int8` fills it (and ``auto``). ``precision_budget``:
    when the plan was chosen under an accuracy budget, that choice's record (budget, metric,
    measured errors: :meth:`moec.analysis.precision_budget.BudgetResult.describe`), for the
    manifest. ``router_precision`` / ``dense_precision``: how the MoE routers' weights / the
    other dense matmul weights (attention, shared experts, LM head) are stored, on CPU targets
    (``DenseLinear``): ``fp32``, ``fp16`` or ``int8`` (one scale per output column).
    ``max_tokens``: an upper bound on the token dimension, so intermediates are planned
    statically (``BoundTokens``); a call with more tokens fails. None: no bound.
    ``kept_experts``: per layer name, the experts static masking keeps (the others are never
    routed to and not stored), as :func:`moec.analysis.masking.choose_kept` chooses them.
    ``kept_channels``: per layer name and kept expert, the intermediate channels pruning keeps
    (the same count for every expert; :func:`moec.analysis.masking.choose_channels`).
    ``skip_top1_above``: early exit; a token whose top-1 routing weight exceeds this skips its
    other experts. ``skip_below_fraction``: skip a token's expert whose routing weight is below
    this fraction of its top-1 expert's weight. Both in ``(0, 1]``; None: off.
    ``routing``: ``learned``, or a fixed pattern replacing the router (``cycle``, ``tile``).
    ``dump_ir``: a directory that receives the module as TVMScript after each pipeline phase.
    ``force``: replace an existing output directory.

    Frozen: fields are never reassigned, and the mappings are the options' own copies, so a
    caller changing its dict afterwards changes nothing here. ``dataclasses.replace`` makes a
    changed copy, validated again.
    """

    target: str = "host"
    precision: str = AUTO
    precision_plan: Mapping[str, str | Sequence[str]] | None = None
    int8_group: int = 0
    int8_exact: Mapping[str, int] | None = None
    precision_budget: Mapping[str, Any] | None = None
    router_precision: str = "fp32"
    dense_precision: str = "fp32"
    max_tokens: int | None = None
    kept_experts: Mapping[str, Sequence[int]] | None = None
    kept_channels: Mapping[str, Sequence[Sequence[int]]] | None = None
    skip_top1_above: float | None = None
    skip_below_fraction: float | None = None
    routing: str = "learned"
    dump_ir: Path | None = None
    force: bool = False

    def __post_init__(self) -> None:
        """Check every field and normalise it to plain Python values (JSON-ready for the manifest);
        raise :class:`OptionError` on the first bad one."""
        if not isinstance(self.target, str) or not self.target:
            raise OptionError("target", f"{{option}} {self.target!r}: name a bundled target or a .toml file")
        _choice("precision", self.precision, (AUTO, *PRECISIONS))
        _choice("router_precision", self.router_precision, DENSE_PRECISIONS)
        _choice("dense_precision", self.dense_precision, DENSE_PRECISIONS)
        if self.int8_group not in INT8_GROUPS:
            raise OptionError(
                "int8_group",
                f"{{option}} {self.int8_group}: must be one of {', '.join(map(str, INT8_GROUPS))}",
            )
        if self.precision_plan is not None:
            object.__setattr__(self, "precision_plan", _precision_plan(self.precision_plan))
        if self.int8_exact is not None:
            object.__setattr__(self, "int8_exact", {str(k): int(v) for k, v in self.int8_exact.items()})
        _choice("routing", self.routing, ROUTINGS)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise OptionError(
                "max_tokens", f"{{option}} {self.max_tokens}: must be a whole number of at least 1"
            )
        if self.max_tokens is not None:
            object.__setattr__(self, "max_tokens", int(self.max_tokens))
        for name in ("skip_top1_above", "skip_below_fraction"):
            value = getattr(self, name)
            if value is not None and not (_is_real(value) and 0.0 < value <= 1.0):
                raise OptionError(
                    name, f"{{option}} {value}: must be in (0, 1] (a routing weight or a fraction of one)"
                )
            if value is not None:
                object.__setattr__(self, name, float(value))
        if self.kept_experts is not None:
            object.__setattr__(self, "kept_experts", _kept_experts(self.kept_experts))
        if self.kept_channels is not None:
            object.__setattr__(self, "kept_channels", _kept_channels(self.kept_channels))
        if self.dump_ir is not None:
            object.__setattr__(self, "dump_ir", Path(self.dump_ir))
        object.__setattr__(self, "force", bool(self.force))

    def layer_precisions(self, layer: str, experts: int) -> tuple[str, ...]:
        """The precision of each of ``layer``'s ``experts`` experts (model numbering; ``auto``
        reads as fp32: :func:`resolve_stored_int8` plans the layers it makes int8)."""
        planned = (self.precision_plan or {}).get(layer, self.default_precision)
        return (planned,) * experts if isinstance(planned, str) else tuple(planned)

    @property
    def default_precision(self) -> str:
        """The precision of the experts of layers the plan does not name (``auto``: fp32)."""
        return "fp32" if self.precision == AUTO else self.precision

    def layer_int8_group(self, layer: str) -> int:
        """The INT8 scale group of ``layer``'s int8 experts: the model's block for a layer it
        stores as INT8 itself, else ``int8_group``."""
        return (self.int8_exact or {}).get(layer, self.int8_group)

    @property
    def stores_experts(self) -> bool:
        """Whether some expert is stored other than fp32 (``StoreExpertWeights`` runs)."""
        return self.precision not in (AUTO, "fp32") or bool(self.precision_plan)

    @property
    def uses_int8_dot(self) -> bool:
        """Whether some expert is planned int8-dot (the target must compute int8)."""
        planned = [self.precision, *(self.precision_plan or {}).values()]
        return any(p == "int8-dot" if isinstance(p, str) else "int8-dot" in p for p in planned)

    @property
    def skips_experts(self) -> bool:
        """Whether early exit is on (either threshold given)."""
        return self.skip_top1_above is not None or self.skip_below_fraction is not None


def resolve_stored_int8(
    options: CompileOptions, quantized: Mapping[str, int], pruned: Sequence[str] = ()
) -> CompileOptions:
    """``options`` for a model whose layers ``quantized`` (name → INT8 block size) it stores as
    INT8 itself: ``auto`` becomes fp32 with those layers planned int8 (unless the plan names
    them); each such layer stored int8 or int8-dot, and not pruned (``pruned``: pruning
    changes its rows and blocks), keeps the model's integers (``int8_exact``)."""
    plan = dict(options.precision_plan or {})
    if options.precision == AUTO:
        plan |= {name: "int8" for name in quantized if name not in plan}
    resolved = dataclasses.replace(
        options,
        precision="fp32" if options.precision == AUTO else options.precision,
        precision_plan=plan or None,
    )
    exact = {
        name: block
        for name, block in quantized.items()
        if name not in pruned and {"int8", "int8-dot"} & set(resolved.layer_precisions(name, 1))
    }
    return dataclasses.replace(resolved, int8_exact=exact or None)


def _is_int(value: object) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A real number (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionError(option, f"{{option}} {value!r}: must be one of {', '.join(choices)}")


def _ids(option: str, layer: str, ids: Sequence[int], what: str) -> list[int]:
    """``ids`` as a list of distinct non-negative Python ints, or an error naming ``layer``."""
    ids = list(ids)
    if not ids or not all(_is_int(i) and i >= 0 for i in ids) or len(set(ids)) != len(ids):
        raise OptionError(
            option,
            f"{{option}}: layer {layer} keeps {ids}; {what} must be distinct non-negative ids, at least one",
        )
    return [int(i) for i in ids]


def _kept_experts(kept: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    return {layer: _ids("kept_experts", layer, ids, "experts") for layer, ids in kept.items()}


def _precision_plan(plan: Mapping[str, str | Sequence[str]]) -> dict[str, str | tuple[str, ...]]:
    out: dict[str, str | tuple[str, ...]] = {}
    for layer, precisions in plan.items():
        if not precisions:
            raise OptionError("precision_plan", f"{{option}}: layer {layer} needs a precision")
        for precision in [precisions] if isinstance(precisions, str) else precisions:
            if precision not in PRECISIONS:
                raise OptionError(
                    "precision_plan",
                    f"{{option}}: layer {layer} has precision {precision!r}; use {', '.join(PRECISIONS)}",
                )
        out[str(layer)] = precisions if isinstance(precisions, str) else tuple(precisions)
    return out


def _kept_channels(kept: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, list[list[int]]]:
    out = {}
    for layer, per_expert in kept.items():
        channels = [_ids("kept_channels", layer, ids, "channels") for ids in per_expert]
        if not channels or len({len(ids) for ids in channels}) != 1:
            raise OptionError(
                "kept_channels",
                f"{{option}}: layer {layer} keeps {[len(ids) for ids in channels]} channels per expert; "
                "every expert must keep the same number, at least one",
            )
        out[layer] = channels
    return out
