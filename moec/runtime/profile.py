"""Where an artifact's time goes: time per function the Relax VM calls, for ``moec run --profile``.

The Relax VM can call a hook before and after every function it calls (kernels, TVM's
operators, VM built-ins such as ``vm.builtin.alloc_tensor``). The hook is a Python callback, so
each call gains a few microseconds: the profile says where time goes, the latency figures of
``moec run`` say how much there is. A function that calls others (a layer function not
inlined) includes their time.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from moec.runtime.session import ArtifactSession


@dataclasses.dataclass(frozen=True)
class FunctionTime:
    """One function's share of a call of ``main``."""

    name: str
    calls: float
    """Times it is called per call of ``main``."""
    ms: float
    """Milliseconds spent in it per call of ``main`` (all its calls together)."""


@dataclasses.dataclass(frozen=True)
class Profile:
    """Where a call's time goes."""

    functions: list[FunctionTime]
    """Every function the VM called, largest time first."""
    call_ms: float
    """Wall milliseconds of one instrumented call (the hook's own cost included)."""


def profile_functions(
    session: ArtifactSession,
    feeds: dict[str, np.ndarray],
    repeats: int = 10,
    before_call: Callable[[], object] | None = None,
) -> Profile:
    """Time per function over ``repeats`` instrumented calls of the entry point ``feeds`` use
    (``main``, or the one-token entry), after one uncounted warm-up call. ``before_call`` runs
    before each counted call, untimed (a benchmark's cache flush, for cold calls)."""
    args = session.input_tensors(feeds)
    main = session.vm[session.entry_for(feeds)]
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    starts: dict[str, list[float]] = defaultdict(list)

    def instrument(_func: object, symbol: str, before: bool, _ret: object, *_args: object) -> int:
        if before:
            starts[symbol].append(time.perf_counter())
        else:
            totals[symbol] += time.perf_counter() - starts[symbol].pop()
            counts[symbol] += 1
        return 0

    main(*args, *session.params)
    session.vm.set_instrument(instrument)
    wall = 0.0
    try:
        main(*args, *session.params)  # the first instrumented call pays one-off costs: not counted
        totals.clear()
        counts.clear()
        for _ in range(repeats):
            if before_call is not None:
                before_call()
            start = time.perf_counter()
            main(*args, *session.params)
            wall += time.perf_counter() - start
    finally:
        session.vm.set_instrument(None)
    found = [FunctionTime(name, counts[name] / repeats, t / repeats * 1e3) for name, t in totals.items()]
    return Profile(sorted(found, key=lambda f: -f.ms), wall / repeats * 1e3)
