"""Per-target parameters of the MoE kernels, read from a target's schedule table."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CpuSchedule:
    """Tiling of the CPU expert kernels.

    lanes: vector width in float32 lanes of the dot-product accumulators (a power of two).
    rows_per_task: output rows per parallel task (a thread streams them contiguously).
    token_block: tokens of one expert group computed together, sharing each weight load.
    accumulators: independent vector accumulators per dot (a power of two), hiding FMA latency.
    """

    lanes: int = 16
    rows_per_task: int = 16
    token_block: int = 4
    accumulators: int = 2
