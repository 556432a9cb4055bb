"""The shape of a valid ``manifest.json``, checked before anything reads it.

A manifest is a file a user can edit, damage or be handed by someone else, and every runtime
command reads fields of it deep down (a layer's plan in ``verify``, the inputs' shapes in
``run``): a damaged field there would surface as a ``KeyError`` far from its cause. So
:func:`check_manifest` walks the whole manifest once against :data:`MANIFEST_SCHEMA` and names
the first field that is wrong (``inputs[0].shape[1]``) in a one-line :class:`MoecError`.

The schema says what moec's readers rely on; keys it does not name are allowed (a manifest from
a newer moec may add some) and ignored. File names (``library``, ``weights`` and the keys of
``files``) must be plain names inside the artifact directory: a manifest never points a reader
at another file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from moec.errors import MoecError
from moec.options import DENSE_PRECISIONS, PRECISIONS, ROUTINGS


@dataclasses.dataclass(frozen=True)
class Value:
    """A leaf: ``accepts(value)`` says whether the value is valid; ``wants`` says what is."""

    accepts: Callable[[Any], bool]
    wants: str


@dataclasses.dataclass(frozen=True)
class ListOf:
    """A JSON array whose items all match ``item``."""

    item: Any


@dataclasses.dataclass(frozen=True)
class MapOf:
    """A JSON object whose keys match ``key`` and whose values all match ``value``."""

    key: Value
    value: Any


@dataclasses.dataclass(frozen=True)
class Record:
    """A JSON object with ``required`` and ``optional`` keys (others are allowed and ignored)."""

    required: dict[str, Any]
    optional: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Nullable:
    """``null`` or a value matching ``spec``."""

    spec: Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def _is_dtype(value: Any) -> bool:
    try:
        return isinstance(value, str) and np.dtype(value).name == value
    except TypeError:
        return False


def is_file_name(value: Any) -> bool:
    """Whether ``value`` is a plain file name: no directory part, not ``.``/``..``, not empty."""
    return isinstance(value, str) and value not in ("", ".", "..") and not re.search(r"[/\\\0]", value)


TEXT = Value(lambda v: isinstance(v, str), "a string")
FLAG = Value(lambda v: isinstance(v, bool), "true or false")
NUMBER = Value(_is_number, "a number")
COUNT = Value(lambda v: _is_int(v) and v >= 0, "a non-negative integer")
POSITIVE = Value(lambda v: _is_int(v) and v >= 1, "a positive integer")
DIMENSION = Value(lambda v: (_is_int(v) and v >= 0) or isinstance(v, str), "a size or a dimension name")
DTYPE = Value(_is_dtype, "a numpy dtype name such as float32")
FILE_NAME = Value(is_file_name, "a file name inside the artifact directory")
SHA256 = Value(
    lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None, "a SHA-256 (hex)"
)


def choice(values: tuple[str, ...]) -> Value:
    """One of ``values``."""
    return Value(lambda v: v in values, f"one of {', '.join(values)}")


VALUE_INFO = Record(
    {"name": TEXT, "shape": ListOf(DIMENSION), "dtype": DTYPE},
    {
        "range": Value(
            lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_int, v)) and v[0] < v[1],
            "[low, high]",
        )
    },
)
EXPERT_PLAN = Record(
    {"expert": COUNT, "kept": FLAG, "precision": choice(PRECISIONS), "compute": TEXT, "bytes": COUNT}
)
MANIFEST_SCHEMA = Record(
    required={
        "format": TEXT,
        "moec_version": TEXT,
        "tvm_version": TEXT,
        "model": Record({"path": TEXT, "sha256": TEXT}),
        "target": Record(
            {"name": TEXT, "hardware": Record({"arch": TEXT}), "cuda": Nullable(Record({"arch": TEXT}))},
            {"description": TEXT},
        ),
        "inputs": ListOf(VALUE_INFO),
        "outputs": ListOf(VALUE_INFO),
        "params": ListOf(TEXT),
        "library": FILE_NAME,
        "weights": FILE_NAME,
        "files": MapOf(FILE_NAME, Record({"bytes": COUNT, "sha256": SHA256})),
        "layers": ListOf(
            Record(
                {"name": TEXT, "plan": ListOf(EXPERT_PLAN)},
                {"int8_group": Nullable(COUNT), "int8_source": TEXT},
            )
        ),
        "early_exit": Record({}, {"top1_above": Nullable(NUMBER), "below_fraction": Nullable(NUMBER)}),
        "routing": choice(ROUTINGS),
        "pruning": MapOf(TEXT, Record({"ffn_kept": COUNT, "channels": ListOf(ListOf(COUNT))})),
        "max_tokens": Nullable(POSITIVE),
    },
    optional={
        "entries": Record({}, {"one_token": TEXT, "one_token_dims": ListOf(TEXT)}),
        "dense_weights": MapOf(
            TEXT,
            Record(
                {"precision": choice(DENSE_PRECISIONS), "output_axis": COUNT, "group": COUNT},
                {"router": FLAG},
            ),
        ),
        "precision_budget": Record(
            {"budget": NUMBER, "metric": TEXT, "error": NUMBER, "held_out_error": Nullable(NUMBER)}
        ),
        "cuda_build": Record({}),
    },
)
"""What every reader of a manifest may rely on (see :func:`check_manifest`)."""


def check_manifest(manifest: Any, path: str) -> None:
    """Raise a one-line :class:`MoecError` naming the first field of ``manifest`` (read from
    ``path``) that does not match :data:`MANIFEST_SCHEMA`, and what it should be."""
    problem = _mismatch(manifest, MANIFEST_SCHEMA, "")
    if problem is not None:
        raise MoecError(f"{path}: damaged manifest: {problem}; recompile the model")


def _mismatch(value: Any, spec: Any, where: str) -> str | None:
    """What is wrong with ``value`` at ``where`` against ``spec``, or None if nothing is."""
    label = f"'{where}'" if where else "the manifest"
    if isinstance(spec, Nullable):
        return None if value is None else _mismatch(value, spec.spec, where)
    if isinstance(spec, Value):
        return None if spec.accepts(value) else f"{label} must be {spec.wants}, got {_shown(value)}"
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            return f"{label} must be a list, got {_shown(value)}"
        return _first(_mismatch(item, spec.item, f"{where}[{i}]") for i, item in enumerate(value))
    if not isinstance(value, dict):
        return f"{label} must be an object, got {_shown(value)}"
    if isinstance(spec, MapOf):
        return _first(
            _mismatch(key, spec.key, f"{where} key") or _mismatch(item, spec.value, _child(where, key))
            for key, item in value.items()
        )
    missing = [key for key in spec.required if key not in value]
    if missing:
        return f"{label} has no '{missing[0]}'"
    fields = {**spec.required, **{k: v for k, v in spec.optional.items() if k in value}}
    return _first(_mismatch(value[key], child, _child(where, key)) for key, child in fields.items())


def _child(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _first(problems: Any) -> str | None:
    return next((p for p in problems if p is not None), None)


def _shown(value: Any) -> str:
    """``value`` as JSON-ish text, cut short: a damaged field may hold anything."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
