"""Precision plan files: which precision each MoE layer's experts are stored in.

``moec compile --precision-plan plan.toml`` reads a TOML file::

    # experts of layers the file does not name: --precision (default fp32)
    int8_group = 0          # optional: INT8 scale group (0 = per output channel, 32, 64, 128)

    [layers]
    moe0 = ["int8", "int8", "fp16", "fp32", "int8", "int8", "int8", "fp16"]  # one per expert
    moe1 = "int8"           # every expert of the layer

Layer names are those ``moec inspect MODEL`` lists; experts are numbered as in the model.
Precisions: ``fp32``, ``fp16``, ``int8``, ``int8-dot`` (see :mod:`moec.kernels.formats`).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from moec.errors import MoecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """A plan file's contents: per layer a precision for all its experts or one per expert, and
    the INT8 scale group (None: the file does not say)."""

    layers: dict[str, str | tuple[str, ...]]
    int8_group: int | None = None


def load_precision_plan(path: Path) -> PrecisionPlan:
    """The plan in ``path``, or a one-line :class:`MoecError` naming the file and what is wrong
    (precision names and layer sizes are checked against the model when it compiles)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as err:
        raise MoecError(f"{path}: cannot read the precision plan ({err.strerror})") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise MoecError(f"{path}: not a TOML file ({err})") from err
    unknown = sorted(set(data) - {"layers", "int8_group"})
    if unknown:
        raise MoecError(f"{path}: unknown key(s) {', '.join(unknown)}; a plan has [layers] and int8_group")
    layers = data.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise MoecError(f"{path}: needs a [layers] table naming at least one layer")
    plan = {}
    for name, value in layers.items():
        if isinstance(value, str):
            plan[name] = value
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            plan[name] = tuple(value)
        else:
            raise MoecError(f"{path}: layers.{name} must be a precision or a list of one per expert")
    group = data.get("int8_group")
    if group is not None and (not isinstance(group, int) or isinstance(group, bool)):
        raise MoecError(f"{path}: int8_group must be a whole number (0, 32, 64 or 128)")
    return PrecisionPlan(plan, group)
