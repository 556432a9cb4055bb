"""moec's pass pipeline over the Relax module the frontend lifted, in phases.

Phase 0 (frontend, not here): MoE blocks → canonical layer functions calling our kernels.
Phase 1 (layers): rewrites of MoE layers driven by the calibration profile and options —
         expert weight storage precision (``StoreExpertWeights``); expert masking, pruning,
         per-expert precision and weight layout come with later issues.
Phase 2 (schedule): kernels retiled for the target (``ApplyKernelSchedule``).
Phase 3 (lowering, in ``tvm.compile``; :func:`lowering_pipeline`): redundant reshapes
         removed, then TVM's default lowering for the target (legalisation and fusion of the
         ordinary graph, dataflow lowering, memory planning, VM code generation) with moec's
         per-call overhead passes after the dataflow lowering: ``InlineLayers``, binding
         clean-up (and ``BoundTokens`` with ``--max-tokens``), before memory planning.

With ``dump_dir`` the module is written as TVMScript before and after every phase.
"""

from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax

from moec.passes.apply_kernel_schedule import ApplyKernelSchedule
from moec.passes.bound_tokens import BoundTokens
from moec.passes.dump_ir import DumpIR
from moec.passes.fixed_routing import FixedRouting
from moec.passes.inline_layers import InlineLayers
from moec.passes.mask_experts import MaskExperts
from moec.passes.prune_channels import PruneChannels
from moec.passes.skip_experts import SkipExperts
from moec.passes.store_expert_weights import StoreExpertWeights
from moec.schedule import CpuSchedule, GpuSchedule


def moe_pipeline(
    schedule: CpuSchedule | GpuSchedule,
    dump_dir: Path | None = None,
    weights_precision: str = "fp32",
    kept_experts: dict[str, list[int]] | None = None,
    kept_channels: dict[str, list[list[int]]] | None = None,
    early_exit: dict[str, float] | None = None,
    routing: str = "learned",
) -> tvm.transform.Pass:
    """The phases moec runs before handing the module to ``tvm.compile``.

    ``weights_precision``: how expert weight matrices are stored (``fp32``, ``fp16``).
    ``kept_experts``: per layer, the experts static masking keeps (the others are removed).
    ``kept_channels``: per layer and kept expert, the intermediate channels pruning keeps.
    ``early_exit``: ``SkipExperts`` thresholds (``top1_above``, ``below_fraction``).
    ``routing``: ``learned`` (the model's router) or a ``FixedRouting`` pattern.
    """
    phases: list[tuple[str, tvm.transform.Pass]] = [
        # Phase 1: MoE layer rewrites.
        (
            "layers",
            tvm.transform.Sequential(
                [
                    MaskExperts(kept_experts) if kept_experts else tvm.transform.Sequential([]),
                    PruneChannels(kept_channels) if kept_channels else tvm.transform.Sequential([]),
                    SkipExperts(**early_exit) if early_exit else tvm.transform.Sequential([]),
                    FixedRouting(routing) if routing != "learned" else tvm.transform.Sequential([]),
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


LOWERING_BACKENDS = {"llvm": "cpu_generic", "cuda": "cuda"}
"""Target kinds whose TVM default pipeline moec extends, and TVM's backend module for each."""


def lowering_pipeline(target: tvm.target.Target, max_tokens: int | None = None) -> tvm.transform.Pass:
    """Phase 3: TVM's default Relax pipeline for ``target`` with moec's call-overhead passes.

    First TVM's ``RemoveRedundantReshape`` drops reshapes to the shape a tensor already has
    (the frontend's flattening around each layer call; the last one was a copy kernel). The
    others run after TVM's dataflow lowering: by then the kernels' ``call_tir``s are plain calls
    outside any dataflow block, where TVM's dataflow passes (which expect schedulable TIR, not
    our hand-written kernels) no longer look, and before ``StaticPlanBlockMemory``:
    ``InlineLayers``; ``CanonicalizeBindings`` and ``DeadCodeElimination`` (the kernels' output
    tuples the inlined layers left unused); ``BoundTokens(max_tokens)`` if given.
    A target kind without an entry in :data:`LOWERING_BACKENDS` gets TVM's pipeline unchanged.
    """
    if target.kind.name not in LOWERING_BACKENDS:
        return relax.get_default_pipeline(target)
    backend = getattr(relax.backend, LOWERING_BACKENDS[target.kind.name]).pipeline
    ours: list[tvm.transform.Pass] = [
        InlineLayers(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.DeadCodeElimination(),
    ]
    if max_tokens is not None:
        ours.append(BoundTokens(max_tokens))  # after DCE, which would drop its unused check call

    @tvm.transform.module_pass(opt_level=0, name="MoecLowering")
    def lower(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(
                [relax.transform.RemoveRedundantReshape()]
                + backend.library_dispatch_passes(target)
                + backend.legalize_passes(target)
                + backend.dataflow_lower_passes(target)
                + ours
                + backend.finalize_passes(target)
            )(mod)

    return lower
