"""Per-target parameters of the MoE kernels, read from a target's schedule table (``schedules/``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass(frozen=True)
class CpuSchedule:
    """Tiling of the CPU expert kernels.

    lanes: vector width in float32 lanes of the dot-product accumulators (a power of two).
    rows_per_task: output rows per parallel task (a thread streams them contiguously).
    token_block: tokens of one expert group computed together, sharing each weight load.
    accumulators: independent vector accumulators per dot (a power of two), hiding FMA latency.
    panel_vectors: output columns of a dense linear kernel's parallel task, in vectors of
        ``lanes``: with ``token_block`` tokens that many vector accumulators stay in registers.
    """

    kind: ClassVar[str] = "cpu"

    lanes: int = 16
    rows_per_task: int = 16
    token_block: int = 4
    accumulators: int = 2
    panel_vectors: int = 2

    def panel(self, outputs: int) -> int:
        """The panel width for a weight of ``outputs`` output columns: ``lanes × panel_vectors``,
        or ``outputs`` when fewer."""
        return min(self.lanes * self.panel_vectors, outputs)


@dataclasses.dataclass(frozen=True)
class GpuSchedule:
    """Thread layout of the CUDA expert kernels.

    threads_per_row: threads that share one weight row's dot product (a warp-sized power of two),
        reading consecutive elements so each warp load is coalesced.
    rows_per_block: output rows per thread block (``threads_per_row * rows_per_block`` threads).
    token_block: tokens of one expert group computed together, sharing each weight load.
    """

    kind: ClassVar[str] = "cuda"

    threads_per_row: int = 32
    rows_per_block: int = 8
    token_block: int = 4


SCHEDULE_KINDS: dict[str, type[CpuSchedule] | type[GpuSchedule]] = {
    CpuSchedule.kind: CpuSchedule,
    GpuSchedule.kind: GpuSchedule,
}
