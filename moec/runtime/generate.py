"""Greedy generation with a KV-cache decoder artifact, on TVM's runtime alone.

A decoder exported for generation (``use_cache=True``) takes the new tokens, optionally their
``attention_mask`` over cache + new tokens and their ``position_ids``, and each layer's past keys
and values, and returns logits and each layer's present keys and values (past + new). The
exporters name the cache tensors differently (``past_key_values.0.key`` → ``present.0.key`` from
``torch.onnx``; ``input.cache.layers.0.keys`` → ``output.cache.layers.0.keys`` from transformers'
exporter); both end in ``LAYER.FIELD``, which pairs each present output with the past input it
feeds on the next call (:func:`cache_interface`).

:func:`greedy_generate` runs the prompt once on an empty cache (0 cached positions: one compiled
function serves prefill and decode, its sequence and cache lengths symbolic), then one token per
call, each the argmax of the last position's logits, the cache carried from call to call.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from moec.errors import MoecError

CACHE_TENSOR = re.compile(r"(?:^|\.)(\d+)\.(\w+)$")
"""A cache tensor's name ends in its layer and field (``0.key``, ``1.values``)."""

FIELDS = {"key": "key", "keys": "key", "value": "value", "values": "value"}
"""Field spellings of the exporters, to one name per field."""

TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclasses.dataclass(frozen=True)
class CacheInterface:
    """How a decoder artifact takes and returns its KV cache (names from its manifest).

    ``past[i]`` is fed, on the next call, from output ``present[i]``; ``empty[i]`` is ``past[i]``'s
    shape for one sequence with no cached position.
    """

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    logits: str
    past: tuple[str, ...]
    present: tuple[str, ...]
    empty: tuple[tuple[int, ...], ...]
    vocab: int


def cache_key(name: str) -> tuple[int, str] | None:
    """A cache tensor's (layer, field: ``key`` or ``value``), from its name; None for other names."""
    found = CACHE_TENSOR.search(name)
    if found is None or found.group(2) not in FIELDS:
        return None
    return int(found.group(1)), FIELDS[found.group(2)]


def cache_length_inputs(names: list[str]) -> set[int]:
    """Positions of the inputs whose dimensions include a KV cache's length: the cache tensors and,
    when there are any, the ``attention_mask`` (over cache + new tokens). Empty without a cache."""
    cached = {i for i, name in enumerate(names) if cache_key(name) is not None}
    if cached:
        cached |= {i for i, name in enumerate(names) if name == "attention_mask"}
    return cached


def _dim(value: int | str) -> int | str:
    """A manifest dimension; exporters write some fixed ones as strings of digits (``"8"``)."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


def cache_interface(
    inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], where: str
) -> CacheInterface:
    """The cache interface of an artifact with these manifest ``inputs`` and ``outputs``; a
    :class:`MoecError` naming ``where`` when it is not a decoder with a KV cache."""
    names = {spec["name"]: spec for spec in inputs}
    if "input_ids" not in names:
        raise MoecError(f"{where}: no 'input_ids' input: generation needs a decoder that takes token ids")
    output_names = {spec["name"]: spec for spec in outputs}
    if "logits" not in output_names:
        raise MoecError(f"{where}: no 'logits' output: generation needs a decoder that returns logits")
    past = {}
    for name in names:
        if name in TOKEN_INPUTS:
            continue
        key = cache_key(name)
        if key is None:
            raise MoecError(
                f"{where}: input '{name}' is neither a token input ({', '.join(TOKEN_INPUTS)}) nor a "
                "cache tensor ('...LAYER.key' / '...LAYER.value'); generation cannot feed it"
            )
        past[key] = name
    if not past:
        raise MoecError(
            f"{where}: the decoder has no KV cache inputs; export it with use_cache=True "
            "(past_key_values in, present out) to generate with it"
        )
    present = {cache_key(name): name for name in output_names if cache_key(name) is not None}
    missing = [past[key] for key in past if key not in present]
    if missing:
        raise MoecError(f"{where}: no output returns the cache input '{missing[0]}' for the next call")
    batch = names["input_ids"]["shape"][0]
    keys = sorted(past)
    empty = []
    for key in keys:
        dims = [_dim(d) for d in names[past[key]]["shape"]]
        cached = [i for i, d in enumerate(dims) if isinstance(d, str) and d != batch]
        if len(cached) != 1:
            raise MoecError(
                f"{where}: cache input '{past[key]}' has shape {dims}: generation needs one symbolic "
                "cache-length dimension; export the decoder with a dynamic cache length"
            )
        empty.append(tuple(1 if d == batch else 0 if i == cached[0] else d for i, d in enumerate(dims)))
    vocab = _dim(output_names["logits"]["shape"][-1])
    if not isinstance(vocab, int):
        raise MoecError(f"{where}: the logits' vocabulary dimension is symbolic ({vocab})")
    return CacheInterface(
        input_ids="input_ids",
        attention_mask="attention_mask" if "attention_mask" in names else None,
        position_ids="position_ids" if "position_ids" in names else None,
        logits="logits",
        past=tuple(past[k] for k in keys),
        present=tuple(present[k] for k in keys),
        empty=tuple(empty),
        vocab=vocab,
    )


@dataclasses.dataclass
class Generation:
    """Greedy generation's tokens (prompt included, ``[1, P + new]``) and the seconds of each call:
    ``seconds[0]`` the prompt (prefill), then one per further token."""

    tokens: np.ndarray
    seconds: list[float]


def greedy_generate(
    session: Any,
    prompt: np.ndarray,
    new_tokens: int,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Greedily continue ``prompt`` (token ids ``[1, P]``) by ``new_tokens`` tokens with ``session``
    (an :class:`~moec.runtime.session.ArtifactSession` of a KV-cache decoder)."""
    where = str(getattr(session, "dir", "artifact"))
    interface = cache_interface(session.inputs, session.outputs, where)
    ids_dtype = np.dtype(next(s["dtype"] for s in session.inputs if s["name"] == interface.input_ids))
    prompt = np.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[0] != 1 or prompt.shape[1] == 0:
        raise MoecError(
            f"the prompt must be one non-empty sequence of token ids, got shape {list(prompt.shape)}"
        )
    if prompt.min() < 0 or prompt.max() >= interface.vocab:
        raise MoecError(f"prompt token ids must lie in [0, {interface.vocab}) (the decoder's vocabulary)")
    cache_dtypes = {s["name"]: np.dtype(s["dtype"]) for s in session.inputs}
    past = [
        np.zeros(shape, cache_dtypes[name])
        for name, shape in zip(interface.past, interface.empty, strict=True)
    ]
    step = prompt.astype(ids_dtype)
    tokens = [int(t) for t in prompt[0]]
    seconds = []
    for _ in range(new_tokens):
        cached = len(tokens) - step.shape[1]
        feeds = {interface.input_ids: step, **dict(zip(interface.past, past, strict=True))}
        if interface.attention_mask:
            feeds[interface.attention_mask] = np.ones((1, len(tokens)), ids_dtype)
        if interface.position_ids:
            feeds[interface.position_ids] = np.arange(cached, len(tokens), dtype=ids_dtype)[None]
        started = time.perf_counter()
        outputs = session.run(feeds)
        seconds.append(time.perf_counter() - started)
        token = int(np.argmax(outputs[interface.logits][0, -1]))
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        past = [outputs[name] for name in interface.present]
        step = np.array([[token]], ids_dtype)
    return Generation(tokens=np.array([tokens], dtype=np.int64), seconds=seconds)
