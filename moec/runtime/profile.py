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


def profile_functions(
    session: ArtifactSession, feeds: dict[str, np.ndarray], repeats: int = 10
) -> list[FunctionTime]:
    """Time per function over ``repeats`` instrumented calls of the entry point ``feeds`` use
    (``main``, or the one-token entry), after one uncounted warm-up call; largest first."""
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
    try:
        main(*args, *session.params)  # the first instrumented call pays one-off costs: not counted
        totals.clear()
        counts.clear()
        for _ in range(repeats):
            main(*args, *session.params)
    finally:
        session.vm.set_instrument(None)
    found = [FunctionTime(name, counts[name] / repeats, t / repeats * 1e3) for name, t in totals.items()]
    return sorted(found, key=lambda f: -f.ms)
