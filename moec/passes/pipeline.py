"""moec's pass pipeline over the Relax module the frontend lifted, in phases.

Phase 0 (frontend, not here): MoE blocks → canonical layer functions calling our kernels.
Phase 1 (layers): rewrites of MoE layers driven by the calibration profile and options —
         expert weight storage precision (``StoreExpertWeights``); expert masking, pruning,
         per-expert precision and weight layout come with later issues.
Phase 2 (schedule): kernels retiled for the target (``ApplyKernelSchedule``).
Phase 3 (TVM, in ``tvm.compile``): legalisation of the ordinary graph, memory planning,
         VM code generation.

With ``dump_dir`` the module is written as TVMScript before and after every phase.
"""

from __future__ import annotations

from pathlib import Path

import tvm

from moec.passes.apply_kernel_schedule import ApplyKernelSchedule
from moec.passes.dump_ir import DumpIR
from moec.passes.store_expert_weights import StoreExpertWeights
from moec.schedule import CpuSchedule


def moe_pipeline(
    schedule: CpuSchedule, dump_dir: Path | None = None, weights_precision: str = "fp32"
) -> tvm.transform.Pass:
    """The phases moec runs before handing the module to ``tvm.compile``.

    ``weights_precision``: how expert weight matrices are stored (``fp32``, ``fp16``).
    """
    phases: list[tuple[str, tvm.transform.Pass]] = [
        # Phase 1: MoE layer rewrites.
        (
            "layers",
            tvm.transform.Sequential(
                [
                    StoreExpertWeights(weights_precision)
                    if weights_precision != "fp32"
                    else tvm.transform.Sequential([]),
                ]
            ),
        ),
        # Phase 2: kernel schedules from the target file.
        ("schedule", ApplyKernelSchedule(schedule)),
    ]
    passes: list[tvm.transform.Pass] = [
        DumpIR(dump_dir, "00-frontend") if dump_dir else tvm.transform.Sequential([])
    ]
    for number, (name, phase) in enumerate(phases, start=1):
        passes.append(phase)
        passes.append(DumpIR(dump_dir, f"{number:02d}-{name}") if dump_dir else tvm.transform.Sequential([]))
    return tvm.transform.Sequential(passes, name="moec")
